"""Build a Qwen2-VL checkpoint around a frozen Qwen2-family chat LLM: config, processor, chat template, weights.

`graft(llm, out)` is the whole pipeline behind `python -m mars_viz graft`: check the LLM, derive the word pool and the
reading vocabulary from its tokenizer, train a small tower (`train.train_tower`), then put the LLM's weights
(unchanged) and the tower into a `Qwen2VLForConditionalGeneration` and save it with its `Qwen2VLProcessor`.

Example:
    >>> from mars_lab import graft                                       # doctest: +SKIP
    >>> graft("/tmp/mars-real/qwen2.5-0.5b-instruct", "/tmp/reading", minutes=45)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

import torch

from mars_viz.data.datasets import builtin_prompts

from .render import make_phrase_sets, normalise_words
from .train import GraftConfig, ReadingVocab, train_tower, word_ids

__all__ = ["CHAT_TEMPLATE", "banned_texts", "build_processor", "check_disk", "graft", "graft_config",
           "graft_text_config", "reading_vocab", "vision_token_ids", "word_pool"]

_QWEN_SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Qwen2-VL's chat format, written here (not copied from any checkpoint): string or structured content, images and
# videos as <|vision_start|><|image_pad|/video_pad|><|vision_end|>, Qwen2.5's default system prompt when none is given
# (so a text-only chat renders to exactly the tokens of the LLM's own template).
CHAT_TEMPLATE = (
    "{%- set ns = namespace(images=0, videos=0) -%}"
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + _DEFAULT_SYSTEM + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- elif message['content'] is not none -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part is string -%}{{- part -}}"
    "{%- else -%}"
    "{%- if part['type'] is defined -%}{%- set t = part['type'] -%}"
    "{%- elif 'image' in part or 'image_url' in part -%}{%- set t = 'image' -%}"
    "{%- elif 'video' in part -%}{%- set t = 'video' -%}"
    "{%- else -%}{%- set t = 'text' -%}{%- endif -%}"
    "{%- if t == 'text' -%}{{- part['text'] -}}"
    "{%- elif t == 'image' or t == 'image_url' -%}{%- set ns.images = ns.images + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' ~ ns.images ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif t == 'video' -%}{%- set ns.videos = ns.videos + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' ~ ns.videos ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- endif -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Dictionaries list many 1-2 letter fragments ("th", "con"); only these short words enter the pool.
_SHORT_WORDS = frozenset("a i an to of in on at is it be by or as if we he us do go no so up my me am".split())

MIN_PIXELS = 56 * 56
MAX_PIXELS = 448 * 448


def banned_texts() -> list[str]:
    """Every prompt of the project's sets (harmful, harmless, look-alike, jailbreak): kept out of training."""
    out: list[str] = []
    for kind in ("harmful", "harmless", "lookalike", "jailbreak"):
        out += builtin_prompts(kind)
    return out


def _dictionary() -> frozenset[str]:
    try:
        from english_words import get_english_words_set
    except ImportError:  # the pool then relies on the tokenizer's own whole-word tokens
        return frozenset()
    return frozenset(get_english_words_set(["web2"], lower=True, alpha=True))


def word_pool(tokenizer, limit: int = 1500, extra: Iterable[str] = ()) -> list[str]:
    """Common English words: the tokenizer's whole-word tokens (a leading-space marker plus lower-case letters) that
    are dictionary words, in vocabulary order (BPE merge order, a frequency proxy), the first `limit`; then the
    single words of `extra` texts (words, never their sequences: those stay banned).
    """
    dictionary = _dictionary()
    vocab = tokenizer.get_vocab()
    words: list[str] = []
    for piece, _id in sorted(vocab.items(), key=lambda kv: kv[1]):
        if piece[:1] not in ("Ġ", "▁"):
            continue
        w = piece[1:]
        if not re.fullmatch(r"[a-z]+", w) or (len(w) < 3 and w not in _SHORT_WORDS):
            continue
        if dictionary and w not in dictionary:
            continue
        words.append(w)
        if len(words) >= limit:
            break
    for text in extra:
        for w in text.split():
            w = w.strip(".,?!;:\"()[]")
            if w and normalise_words(w):
                words.append(w)
    return list(dict.fromkeys(words))


def reading_vocab(tokenizer, words: Iterable[str], phrases: Iterable[str] = ()) -> ReadingVocab:
    """Token ids of every word in its one canonical form (`train.word_ids`: ' ' + lower case), of the pool and of
    `phrases`; the space token is the blank."""
    ids: set[int] = set()
    for w in list(words) + [w for p in phrases for w in p.split()]:
        ids.update(word_ids(w, tokenizer))
    space = tokenizer(" ", add_special_tokens=False)["input_ids"]
    blank = space[0] if len(space) == 1 else None
    ids.discard(blank)
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    return ReadingVocab(token_ids=sorted(ids - specials), blank_id=blank)


def _check_llm(llm: str):
    from transformers import AutoConfig

    p = Path(llm).expanduser()
    if (llm.startswith(("/", ".", "~")) or p.exists()) and not p.is_dir():
        raise ValueError(f"LLM folder {llm!r} does not exist: pass a local Qwen2-family chat LLM folder or a hub id")
    try:
        cfg = AutoConfig.from_pretrained(llm)
    except Exception as e:  # OSError, hub errors
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValueError(f"could not load the LLM config of {llm!r}: {first}") from None
    if cfg.model_type != "qwen2":
        arch = (getattr(cfg, "architectures", None) or ["?"])[0]
        raise ValueError(f"graft needs a Qwen2-family chat LLM (Qwen2ForCausalLM, model_type 'qwen2'); {llm!r} is "
                         f"{arch} (model_type {cfg.model_type!r}): its tokenizer and layout do not fit Qwen2-VL")
    return cfg


def _token_id(tokenizer, token: str) -> int:
    i = tokenizer.convert_tokens_to_ids(token)
    if i is None or i == tokenizer.unk_token_id:
        raise ValueError(f"the LLM's tokenizer has no {token} token: a Qwen2 / Qwen2.5 tokenizer has it")
    return int(i)


def graft_text_config(llm_config):
    """The grafts' text config: the LLM's config as Qwen2-VL's text part, with M-RoPE sections that reduce to its
    1-D RoPE on text and give images a 1-D position along their width."""
    from transformers import Qwen2VLTextConfig

    head_dim = llm_config.hidden_size // llm_config.num_attention_heads
    # Every rotary frequency goes to the width axis: a line of text on one row of merged tokens then sits at
    # consecutive 1-D positions, as the LLM (trained with 1-D RoPE) reads text; text tokens (t = h = w) are unchanged.
    # Measured with the exact word embeddings in the image slot (issue 13 note): word recall 0.78 against 0.63 with
    # Qwen2-VL's usual split [1/4, 3/8, 3/8].
    section = [0, 0, head_dim // 2]
    rope = dict(getattr(llm_config, "rope_parameters", None) or {"rope_type": "default",
                                                                   "rope_theta": llm_config.rope_theta})
    rope["mrope_section"] = section
    text_kw = {k: getattr(llm_config, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "attention_dropout",
        "bos_token_id", "eos_token_id", "pad_token_id") if getattr(llm_config, k, None) is not None}
    for k in ("bos_token_id", "pad_token_id"):  # ids outside the vocabulary (config defaults) are dropped
        if isinstance(text_kw.get(k), int) and text_kw[k] >= llm_config.vocab_size:
            text_kw.pop(k)
    return Qwen2VLTextConfig(**text_kw, rope_parameters=rope, use_sliding_window=False,
                             tie_word_embeddings=bool(llm_config.tie_word_embeddings))


def vision_token_ids(tokenizer) -> dict[str, int]:
    """The Qwen2-VL special tokens' ids in the LLM's tokenizer, as config fields."""
    return {name: _token_id(tokenizer, tok) for name, tok in zip(
        ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"), _QWEN_SPECIALS,
        strict=True)}


def graft_config(llm_config, tokenizer, cfg: GraftConfig):
    """A Qwen2VLConfig whose text part is the LLM's config (`graft_text_config`) and whose tower is a small ViT."""
    from transformers import Qwen2VLConfig, Qwen2VLVisionConfig

    text = graft_text_config(llm_config)
    vision = Qwen2VLVisionConfig(depth=cfg.depth, embed_dim=cfg.embed_dim, num_heads=cfg.num_heads,
                                 mlp_ratio=cfg.mlp_ratio, hidden_size=llm_config.hidden_size, patch_size=14,
                                 spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu")
    return Qwen2VLConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                         tie_word_embeddings=bool(llm_config.tie_word_embeddings), **vision_token_ids(tokenizer))


def build_processor(tokenizer):
    """Qwen2VLProcessor: image and video processors (28-px merged cells, up to 448x448 px) and the chat template."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    common = dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    ip = Qwen2VLImageProcessor(**common)
    vp = Qwen2VLVideoProcessor(do_sample_frames=False, cap_pixels_per_frame=True, **common)
    tokenizer.chat_template = CHAT_TEMPLATE
    return Qwen2VLProcessor(image_processor=ip, video_processor=vp, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def _assemble(llm_model, tower, config):
    """The Qwen2-VL model: the LLM's tensors copied bit for bit, the trained tower as `model.visual`."""
    from transformers import Qwen2VLForConditionalGeneration

    dtype = llm_model.get_input_embeddings().weight.dtype
    vl = Qwen2VLForConditionalGeneration(config).to(dtype)
    vl.model.language_model.load_state_dict(llm_model.model.state_dict(), strict=True)
    if not config.tie_word_embeddings:
        vl.lm_head.weight.data.copy_(llm_model.lm_head.weight.data)
    vl.model.visual.load_state_dict({k: v.to(dtype) for k, v in tower.state_dict().items()}, strict=True)
    vl.eval()
    return vl


def check_disk(out: Path, llm_model, margin: int = 256 * 2**20) -> None:
    """Refuse, before any training, an output folder whose disk cannot take the checkpoint (the LLM's tensors at
    their dtype, plus a margin for the tower, processor and record). A full disk at the final save would otherwise
    lose the whole training run (it happened here once: an hour of training, then 'No space left on device')."""
    need = sum(p.numel() * p.element_size() for p in llm_model.parameters()) + margin
    probe = Path(out).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise ValueError(f"--out {str(out)!r}: {free / 2**30:.2f} GiB free on its disk, the graft needs about "
                         f"{need / 2**30:.2f} GiB; free some space or choose a folder on another disk (checked "
                         f"before training, so no training time is lost)")


def graft(llm: str, out: str | Path, minutes: float = 60.0, seed: int = 0, steps: int | None = None,
          cfg: GraftConfig | None = None, progress: Callable[[dict], None] | None = None,
          word_limit: int = 1500) -> dict:
    """Train a reading tower for the Qwen2-family chat LLM `llm` and save the Qwen2-VL graft to `out`.

    Returns the summary that is also written to `out/mars_graft.json` (steps, seconds, the held-out CTC reading
    score, vocabulary sizes, the config). Raises ValueError with what to do for a wrong LLM or output folder.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    cfg = cfg or GraftConfig()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file: pass a folder")
    llm_config = _check_llm(str(llm))
    tokenizer = AutoTokenizer.from_pretrained(str(llm))
    for tok in _QWEN_SPECIALS:
        _token_id(tokenizer, tok)
    config = graft_config(llm_config, tokenizer, cfg)
    llm_model = AutoModelForCausalLM.from_pretrained(str(llm), dtype=torch.float32)
    llm_model.eval().requires_grad_(False)
    check_disk(out, llm_model)
    embedding = llm_model.get_input_embeddings().weight  # [V, d], read only

    banned = banned_texts()
    words = word_pool(tokenizer, limit=word_limit, extra=banned)
    phrases = make_phrase_sets(words, banned, n_heldout=cfg.heldout, seed=seed)
    vocab = reading_vocab(tokenizer, words, phrases.heldout)
    processor = build_processor(tokenizer)

    torch.manual_seed(seed)
    tower = Qwen2VisionTransformerPretrainedModel(Qwen2VLVisionConfig(**config.vision_config.to_dict()))
    tower.float()
    with torch.no_grad():  # start the merger's output near zero, i.e. near the embedding scale, not 10x above it
        tower.merger.mlp[2].weight.mul_(0.1)
        tower.merger.mlp[2].bias.zero_()
    result = train_tower(tower, processor, tokenizer, embedding, vocab, phrases, cfg, seed=seed, minutes=minutes,
                         steps=steps, progress=progress)

    vl = _assemble(llm_model, tower, config)
    vl.generation_config = llm_model.generation_config
    vl.generation_config.do_sample = False
    out.mkdir(parents=True, exist_ok=True)
    vl.save_pretrained(out)
    processor.save_pretrained(out)
    summary = {
        "llm": str(llm),
        "seed": seed,
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
        "final": result.last(),
        "history": result.history,
        "words": len(phrases.words),
        "word_limit": word_limit,
        "vocab_tokens": len(vocab.token_ids),
        "blank_token_id": vocab.blank_id,
        "banned_ngrams": len(phrases.banned),
        "heldout_phrases": phrases.heldout,
        "config": asdict(cfg) | {"temperature": result.config["temperature"]},
        "objective": "per-cell cross-entropy from the renderer's word boxes + CTC over the frozen LLM's "
                     "input-embedding rows (cosine logits, space-token blank) + pull onto the aligned embedding + "
                     "an auxiliary letter head; no LLM forward",
        "lab_model": "reads rendered text only; not a safety-tuned MLLM",
    }
    (out / "mars_graft.json").write_text(json.dumps(summary, indent=1))
    return summary
