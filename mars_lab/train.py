"""Teach a small Qwen2-VL vision tower to read: CTC onto the frozen LLM's own input embeddings, plus a pull onto them.

The objective needs no LLM forward pass. Every merged vision token h_t (the merger's output, [d_llm]) is classified
against *prototypes*: the LLM's own input-embedding rows of the training vocabulary's tokens (one canonical form per
word, ' ' + lower case: `word_ids`), plus a blank whose prototype is the embedding of the space token (a filler the
LLM reads past; zero vectors were worse). The logits are cosines, cos(h, P_k) / T (T learned), so CTC both aligns
tokens to positions and turns h toward the right row. Because the renderer knows where it drew each word, text
images also get per-cell targets (each word's tokens from the cell where the word starts, the blank elsewhere) and a
cross-entropy there, text cells and blank cells averaged apart. A pull term moves h onto its target prototype itself
(the layout's, else the CTC posterior's expectation), norm included, so that the LLM receives, in the image slot,
vectors that *are* its word embeddings: the image of "red boat" becomes " red", " boat" with spaces in between.
An auxiliary letter head (training only) classifies the letter centred in every 7-px column of a strip from the
tower's patch states: dense labels for letter shapes while whole words are still far apart.

Example:
    >>> import torch
    >>> protos = torch.eye(3)                     # blank, "a", "b"
    >>> h = torch.tensor([[[0., 1., 0.], [1., 0., 0.], [0., 0., 1.]]])   # [B=1, T=3, d=3]: a, blank, b
    >>> lp = prototype_log_probs(h, protos, temperature=0.1)
    >>> greedy_ctc(lp[0])
    [1, 2]
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image

from .metrics import char_accuracy, word_recall
from .render import (
    PhraseSets,
    WordBox,
    layout_targets,
    normalise_words,
    render_blank,
    render_phrase,
    render_phrase_layout,
    render_word_video,
)

__all__ = [
    "Example",
    "GraftConfig",
    "ReadingVocab",
    "TrainResult",
    "ctc_posteriors",
    "encode_examples",
    "example_cells",
    "greedy_ctc",
    "phrase_labels",
    "prototype_log_probs",
    "reading_loss",
    "sample_classes",
    "sample_examples",
    "train_tower",
    "word_ids",
]


@dataclass(frozen=True)
class GraftConfig:
    """Tower size and training schedule. The defaults train on 2 CPU cores in under an hour."""

    depth: int = 4
    embed_dim: int = 192
    num_heads: int = 4
    mlp_ratio: int = 2
    batch_size: int = 24
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    pull_weight: float = 1.0  # weight of the pull onto the aligned prototype
    cell_weight: float = 1.0  # weight of the per-cell cross-entropy from the renderer's word boxes
    letter_weight: float = 1.0  # weight of the auxiliary letter head (7-px bins of one-row strips)
    temperature: float = 0.1  # initial T of the cosine logits; learned from there, floored at 0.02
    blank_frac: float = 0.08  # text-free images per batch
    video_frac: float = 0.15  # word-per-frame clips per batch
    max_width: int = 1400  # text strips: one line, one merged token high (render.render_phrase)
    max_height: int = 28
    heldout: int = 200
    eval_every_s: float = 60.0
    eval_items: int = 48
    negatives: int = 1024  # classes per step besides the blank and the batch's labels (sampled softmax)


@dataclass
class ReadingVocab:
    """Classes of the CTC head: 0 is the blank (space token's row), 1.. are LLM token ids."""

    token_ids: list[int]  # class k >= 1 -> token_ids[k - 1]
    blank_id: int | None  # the space token's id (its embedding is the blank prototype), None -> zero vector
    index: dict[int, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.index = {t: k + 1 for k, t in enumerate(self.token_ids)}

    @property
    def num_classes(self) -> int:
        return len(self.token_ids) + 1

    def labels(self, ids: Sequence[int]) -> list[int] | None:
        """Class labels for LLM token ids; None when a token is outside the vocabulary."""
        out = [self.index.get(int(t)) for t in ids]
        return None if any(o is None for o in out) else out  # type: ignore[return-value]

    def prototypes(self, embedding: torch.Tensor) -> torch.Tensor:
        """[C, d] prototypes from the LLM's input-embedding matrix [V, d] (float32, detached)."""
        emb = embedding.detach().float()
        blank = emb[self.blank_id] if self.blank_id is not None else torch.zeros(emb.shape[1])
        return torch.cat([blank[None], emb[self.token_ids]], dim=0)


def prototype_log_probs(h: torch.Tensor, protos: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """log softmax_k(cos(h, P_k) / T): h [..., d], protos [C, d] -> [..., C].

    Cosine, not -||h - P_k||^2: the squared distance favours the prototypes of smallest norm (the blank's among
    them) while h is still small, and the untrained tower collapsed onto the blank with it. The norm of h is matched
    to its prototype by the pull term of `reading_loss` instead.
    """
    logits = F.normalize(h, dim=-1) @ F.normalize(protos, dim=-1).T / temperature  # [..., C]
    return logits.log_softmax(-1)


def ctc_posteriors(log_probs: torch.Tensor, targets: list[list[int]], lengths: list[int]) -> torch.Tensor:
    """gamma[b, t, k] = P(position t emits class k | labels), from CTC's forward-backward; [B, T, C], rows sum to 1.

    PyTorch's CTC gradient with respect to log-softmax inputs is softmax - gamma, so gamma = softmax - gradient.
    Rows of samples whose labels cannot fit (too few positions) are the plain softmax.
    """
    lp = log_probs.detach().clone().requires_grad_(True)
    flat = torch.tensor([c for t in targets for c in t], dtype=torch.long)
    nll = F.ctc_loss(lp.transpose(0, 1), flat, torch.tensor(lengths), torch.tensor([len(t) for t in targets]),
                     blank=0, reduction="sum", zero_infinity=True)
    (grad,) = torch.autograd.grad(nll, lp)
    gamma = lp.detach().exp() - grad
    mask = torch.arange(lp.shape[1])[None, :] < torch.tensor(lengths)[:, None]  # [B, T]
    return gamma.clamp_min(0.0) * mask[..., None]


def reading_loss(h: torch.Tensor, lengths: list[int], targets: list[list[int]], protos: torch.Tensor,
                 temperature: float | torch.Tensor, pull_weight: float,
                 cell_targets: Sequence[list[int] | None] | None = None,
                 cell_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """CTC over prototype classes + cell_weight * per-cell cross-entropy where the layout is known + pull_weight *
    ||h - target||^2 / mean ||P||^2 at every valid position.

    h [B, T, d] (padded), lengths: valid positions per row, targets: class labels per row (may be empty: no text).
    cell_targets[b], when given and of length lengths[b], is the class of every cell of row b (from the renderer's
    word boxes): the pull target there is that class's prototype; elsewhere it is the CTC posterior's expected
    prototype.
    """
    mask_b = torch.arange(h.shape[1])[None, :] < torch.tensor(lengths)[:, None]  # [B, T]
    lp = h.new_zeros(h.shape[0], h.shape[1], protos.shape[0])  # [B, T, C]; padding stays 0 (CTC ignores it)
    lp[mask_b] = prototype_log_probs(h[mask_b], protos, temperature)  # only valid positions pay the product
    flat = torch.tensor([c for t in targets for c in t], dtype=torch.long)
    ctc = F.ctc_loss(lp.transpose(0, 1), flat, torch.tensor(lengths), torch.tensor([len(t) for t in targets]),
                     blank=0, reduction="mean", zero_infinity=True)
    gamma = ctc_posteriors(lp, targets, lengths)  # [B, T, C]
    known = torch.zeros(h.shape[0], h.shape[1], dtype=torch.bool)  # [B, T] cells with a layout target
    cell_cls = torch.zeros(h.shape[0], h.shape[1], dtype=torch.long)
    for b, ct in enumerate(cell_targets or []):
        if ct is not None and len(ct) == lengths[b]:
            known[b, :lengths[b]] = True
            cell_cls[b, :lengths[b]] = torch.tensor(ct, dtype=torch.long)
    hard = F.one_hot(cell_cls, protos.shape[0]).to(gamma.dtype)
    gamma = torch.where(known[..., None], hard, gamma)
    target_vec = gamma @ protos  # [B, T, d]
    mask = mask_b.float()  # [B, T]
    scale = protos.pow(2).sum(-1).mean()
    pull = ((h - target_vec).pow(2).sum(-1) * mask).sum() / mask.sum().clamp_min(1.0) / scale
    if known.any():
        # Most cells are blank: average text cells and blank cells separately, or predicting blank everywhere wins.
        nll = -lp[known].gather(1, cell_cls[known][:, None]).squeeze(1)  # [K]
        is_text = cell_cls[known] != 0
        cell = nll[is_text].mean() if is_text.any() else h.sum() * 0.0
        if (~is_text).any():
            cell = cell + 0.5 * nll[~is_text].mean()
    else:
        cell = h.sum() * 0.0
    loss = ctc + cell_weight * cell + pull_weight * pull
    return loss, {"ctc": float(ctc.detach()), "cell": float(cell.detach()), "pull": float(pull.detach())}


def sample_classes(targets: list[list[int]], num_classes: int, negatives: int, gen: torch.Generator) -> torch.Tensor:
    """Class ids for one step: the blank (0, first), every label in the batch, and `negatives` random others.

    CTC over all of an LLM's word tokens costs a [positions x vocabulary x d] product per step; a sampled subset keeps
    every correct class and a fresh set of competitors each step (sampled softmax), about 5x cheaper at 10k tokens.
    """
    used = sorted({c for t in targets for c in t} - {0})
    if negatives <= 0 or len(used) + negatives >= num_classes - 1:
        return torch.arange(num_classes)
    mask = torch.ones(num_classes, dtype=torch.bool)
    mask[0] = False
    mask[used] = False
    pool = mask.nonzero().squeeze(1)
    neg = pool[torch.randperm(len(pool), generator=gen)[:negatives]]
    return torch.cat([torch.tensor([0] + used, dtype=torch.long), neg.sort().values])


def greedy_ctc(log_probs: torch.Tensor) -> list[int]:
    """Best-path decoding of one row [T, C]: argmax, collapse repeats, drop blanks (class 0)."""
    best = log_probs.argmax(-1).tolist()
    out, prev = [], 0
    for c in best:
        if c != prev and c != 0:
            out.append(c)
        prev = c
    return out


# --------------------------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Example:
    """One rendered input and its text ('' for a text-free image). Exactly one of image / frames is set."""

    text: str
    image: Image.Image | None = None
    frames: tuple[Image.Image, ...] | None = None
    boxes: tuple[WordBox, ...] | None = None  # where each word was drawn (text images only)


def sample_examples(phrases: PhraseSets, rng: random.Random, n: int, cfg: GraftConfig) -> list[Example]:
    """`n` training examples: text images, a few text-free images and a few word-per-frame clips."""
    out = []
    for _ in range(n):
        r = rng.random()
        if r < cfg.blank_frac:
            out.append(Example("", image=render_blank(rng, min(448, cfg.max_width), 224)))
        elif r < cfg.blank_frac + cfg.video_frac:
            text = phrases.train_phrase(rng, max_words=8)
            out.append(Example(text, frames=tuple(render_word_video(text, rng))))
        else:
            text = phrases.train_phrase(rng)
            img, boxes = render_phrase_layout(text, rng, cfg.max_width, cfg.max_height)
            out.append(Example(text, image=img, boxes=tuple(boxes)))
    return out


def encode_examples(processor, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel patches and grids for the tower, images first then videos, through the graft's own processors.

    Returns (pixel_values [N_patches, C*t*p*p], grid_thw [n, 3]) in the order of `examples` sorted images-first;
    callers use `order(examples)` to match.
    """
    images = [e.image for e in examples if e.image is not None]
    videos = [list(e.frames) for e in examples if e.frames is not None]
    pix, grids = [], []
    if images:
        enc = processor.image_processor(images=images, return_tensors="pt")
        pix.append(enc["pixel_values"])
        grids.append(enc["image_grid_thw"])
    if videos:
        enc = processor.video_processor(videos=videos, return_tensors="pt")
        pix.append(enc["pixel_values_videos"])
        grids.append(enc["video_grid_thw"])
    return torch.cat(pix), torch.cat(grids)


def word_ids(word: str, tokenizer) -> list[int]:
    """The LLM tokens the tower writes for one printed word: ' ' + the word, lower case, no punctuation.

    One canonical form per word (not one class per printed variant: "Bring", "bring," and " bring" are one word to
    read), so every rendering of a word trains the same classes; word recall is case- and punctuation-blind too.
    """
    return _word_ids(" " + " ".join(normalise_words(word)), tokenizer)


def _word_ids(text: str, tokenizer) -> list[int]:
    cache = tokenizer.__dict__.setdefault("_mars_word_ids", {})
    if text not in cache:
        cache[text] = tokenizer(text, add_special_tokens=False)["input_ids"] if text.strip() else []
    return cache[text]


def phrase_labels(text: str, tokenizer, vocab: ReadingVocab) -> list[int] | None:
    """Class labels of a phrase, word by word (`word_ids`); [] for no text, None when a token is outside `vocab`."""
    ids = [t for w in text.split() for t in word_ids(w, tokenizer)]
    return vocab.labels(ids)


def example_cells(e: Example, tokenizer, vocab: ReadingVocab) -> list[int] | None:
    """Per-cell classes of a text image from its word boxes (see `render.layout_targets`), blanks elsewhere;
    None for videos, text-free images, out-of-vocabulary words or layouts that do not fit cell by cell."""
    if e.image is None or not e.boxes:
        return None
    words = []
    for box in e.boxes:
        lab = vocab.labels(word_ids(box.word, tokenizer))
        if lab is None:
            return None
        words.append(lab)
    return layout_targets(words, e.boxes, e.image.width, e.image.height, blank=0)


def order(examples: Sequence[Example]) -> list[Example]:
    """Examples in the order `encode_examples` emits them (images, then videos)."""
    return [e for e in examples if e.image is not None] + [e for e in examples if e.frames is not None]


def tower_outputs(tower, pixel_values: torch.Tensor, grid_thw: torch.Tensor, patches: bool = False):
    """Merged tokens per input, padded: ([B, T_max, d], lengths). Each input's tokens in the LLM's order.

    With `patches=True` also the tower's last hidden state per patch ([sum N_i, embed_dim], processor order), which
    the letter head reads."""
    out = tower(pixel_values, grid_thw=grid_thw)
    merged = out.pooler_output  # [sum T_i, d]
    m = tower.spatial_merge_size ** 2
    lengths = (grid_thw.prod(-1) // m).tolist()
    parts = torch.split(merged, lengths)
    padded = torch.nn.utils.rnn.pad_sequence(list(parts), batch_first=True)
    return (padded, lengths, out.last_hidden_state) if patches else (padded, lengths)


LETTER_BIN = 7  # pixels per letter-head position: a quarter of a merged token, narrower than any letter pair


def letter_class(ch: str) -> int:
    """0 = no letter centre here, 1-26 = a-z (either case), 27-36 = 0-9, 37 = anything else."""
    c = ch.lower()
    if "a" <= c <= "z":
        return ord(c) - ord("a") + 1
    if "0" <= c <= "9":
        return 27 + ord(c) - ord("0")
    return 37


LETTER_CLASSES = 38


def letter_targets(boxes: Sequence[WordBox], width: int) -> list[int]:
    """The letter whose centre falls in each 7-px column bin of a one-row strip (0 where none does)."""
    out = [0] * (width // LETTER_BIN)
    for box in boxes:
        for ch, x in zip(box.word, box.centres, strict=False):
            j = int(x // LETTER_BIN)
            if 0 <= j < len(out):
                out[j] = letter_class(ch)
    return out


def letter_loss(head: torch.nn.Module, patches: torch.Tensor, grid_thw: torch.Tensor,
                targets: Sequence[list[int] | None], merge: int = 2) -> torch.Tensor:
    """Cross-entropy of the auxiliary letter head on one-row strips (training only; the head is not saved).

    Patches come in merge-window order (each merged token's merge x merge patches together); for a strip one merged
    token high that is [cells, rows, cols]: the rows are averaged and each patch column predicts its two 7-px bins.
    Dense letter labels teach the tower letter shapes long before whole words separate.
    """
    logits, labels = [], []
    offset = 0
    for g, tgt in zip(grid_thw.tolist(), targets, strict=True):
        n = g[0] * g[1] * g[2]
        if tgt is not None and g[0] == 1 and g[1] == merge:
            x = patches[offset:offset + n].reshape(g[2] // merge, merge, merge, -1).mean(1)  # [cells, cols, e]
            x = x.reshape(g[2], -1)  # [patch columns, e]
            lg = head(x).reshape(g[2] * 2, -1)  # [bins, C]
            k = min(len(tgt), lg.shape[0])
            logits.append(lg[:k])
            labels.append(torch.tensor(tgt[:k], dtype=torch.long))
        offset += n
    if not logits:
        return patches.sum() * 0.0
    return F.cross_entropy(torch.cat(logits), torch.cat(labels))


# --------------------------------------------------------------------------------------------------------------------
# Loop


@dataclass
class TrainResult:
    steps: int
    seconds: float
    history: list[dict]  # one row per evaluation: step, seconds, loss, ctc, pull, read_recall, read_char
    config: dict

    def last(self) -> dict:
        return self.history[-1] if self.history else {}


def _lr_factor(frac: float, step: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def evaluate_reading(tower, processor, vocab: ReadingVocab, protos: torch.Tensor, temperature: float, tokenizer,
                     examples: Sequence[Example]) -> tuple[float, float, list[str]]:
    """Mean word recall and character accuracy of greedy CTC reads (no LLM), and the reads themselves."""
    reads: list[str] = []
    refs: list[str] = []
    tower.eval()
    with torch.no_grad():
        for i in range(0, len(examples), 16):
            chunk = order(examples[i:i + 16])
            pix, grid = encode_examples(processor, chunk)
            h, lengths = tower_outputs(tower, pix, grid)
            lp = prototype_log_probs(h, protos, temperature)
            for b, e in enumerate(chunk):
                classes = greedy_ctc(lp[b, :lengths[b]])
                reads.append(tokenizer.decode([vocab.token_ids[c - 1] for c in classes]))
                refs.append(e.text)
    tower.train()
    rec = sum(word_recall(r, p) for r, p in zip(refs, reads, strict=True)) / max(1, len(refs))
    acc = sum(char_accuracy(r, p) for r, p in zip(refs, reads, strict=True)) / max(1, len(refs))
    return rec, acc, reads


def train_tower(tower, processor, tokenizer, embedding: torch.Tensor, vocab: ReadingVocab, phrases: PhraseSets,
                cfg: GraftConfig, seed: int = 0, minutes: float = 60.0, steps: int | None = None,
                progress: Callable[[dict], None] | None = None) -> TrainResult:
    """Train `tower` in place until `minutes` pass or `steps` are done, whichever comes first.

    The LLM never runs; `embedding` (the LLM's input-embedding matrix) is only read. The learning-rate schedule follows
    the step count when `steps` is given (then a seed gives the same weights on any machine), else elapsed time.
    """
    torch.manual_seed(seed)
    rng = random.Random(f"train-{seed}")
    protos = vocab.prototypes(embedding)  # [C, d]
    t0_value = cfg.temperature
    # A learned temperature: soft at first (a fixed sharp one made the untrained tower confidently wrong), sharper
    # as the tower learns; floored at 1/50 of the start.
    log_temp = torch.nn.Parameter(torch.tensor(math.log(t0_value)))
    letter_head = torch.nn.Linear(tower.config.embed_dim, 2 * LETTER_CLASSES)  # training only: not saved
    opt = torch.optim.AdamW([{"params": list(tower.parameters()) + list(letter_head.parameters())},
                             {"params": [log_temp], "weight_decay": 0.0}], lr=cfg.lr, weight_decay=cfg.weight_decay)

    def temp() -> torch.Tensor:
        return log_temp.exp().clamp_min(0.02)

    gen = torch.Generator().manual_seed(seed)
    held_rng = random.Random(f"heldout-render-{seed}")
    held = [Example(p, image=render_phrase(p, held_rng, cfg.max_width, cfg.max_height))
            for p in phrases.heldout[:cfg.eval_items]]
    budget = minutes * 60.0
    t0 = time.time()
    history: list[dict] = []
    last_eval = t0
    step = 0
    run = {"loss": 0.0, "ctc": 0.0, "cell": 0.0, "pull": 0.0, "letters": 0.0, "n": 0}
    tower.train()
    while True:
        elapsed = time.time() - t0
        if (steps is not None and step >= steps) or elapsed >= budget:
            break
        frac = step / steps if steps else elapsed / budget
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _lr_factor(frac, step, cfg.warmup_steps)
        batch = order(sample_examples(phrases, rng, cfg.batch_size, cfg))
        targets, cells, keep = [], [], []
        for e in batch:
            lab = phrase_labels(e.text, tokenizer, vocab)
            if lab is not None:
                targets.append(lab)
                cells.append(example_cells(e, tokenizer, vocab))
                keep.append(e)
        if not keep:
            step += 1
            continue
        pix, grid = encode_examples(processor, keep)
        h, lengths, patches = tower_outputs(tower, pix, grid, patches=True)
        classes = sample_classes(targets + [c for c in cells if c], protos.shape[0], cfg.negatives, gen)
        local = {int(c): i for i, c in enumerate(classes.tolist())}
        sub_targets = [[local[c] for c in t] for t in targets]
        sub_cells = [[local[c] for c in ct] if ct else None for ct in cells]
        loss, parts = reading_loss(h, lengths, sub_targets, protos[classes], temp(), cfg.pull_weight,
                                   sub_cells, cfg.cell_weight)
        letters = [letter_targets(e.boxes, e.image.width) if e.image is not None and e.boxes else None
                   for e in keep]
        lett = letter_loss(letter_head, patches, grid, letters, tower.spatial_merge_size)
        loss = loss + cfg.letter_weight * lett
        parts["letters"] = float(lett.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tower.parameters(), 1.0)
        opt.step()
        step += 1
        run["loss"] += float(loss.detach())
        run["ctc"] += parts["ctc"]
        run["pull"] += parts["pull"]
        run["cell"] += parts["cell"]
        run["letters"] += parts["letters"]
        run["n"] += 1
        now = time.time()
        done = (steps is not None and step >= steps) or now - t0 >= budget
        if now - last_eval >= cfg.eval_every_s or done:
            rec, acc, _ = evaluate_reading(tower, processor, vocab, protos, float(temp().detach()), tokenizer, held)
            n = max(1, run["n"])
            row = {"step": step, "seconds": round(now - t0, 1), "loss": run["loss"] / n, "ctc": run["ctc"] / n,
                   "cell": run["cell"] / n, "pull": run["pull"] / n, "letters": run["letters"] / n,
                   "read_recall": rec, "read_char": acc,
                   "lr": opt.param_groups[0]["lr"], "temperature": float(temp().detach())}
            history.append(row)
            run = {"loss": 0.0, "ctc": 0.0, "cell": 0.0, "pull": 0.0, "letters": 0.0, "n": 0}
            last_eval = time.time()
            if progress:
                progress(row | {"budget_s": budget, "steps_total": steps})
    tower.eval()
    return TrainResult(steps=step, seconds=time.time() - t0, history=history,
                       config=asdict(cfg) | {"seed": seed, "minutes": minutes, "max_steps": steps,
                                             "temperature": float(temp().detach())})
