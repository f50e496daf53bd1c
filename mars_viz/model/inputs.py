"""Turn prompts (+ images or a video) into one left-padded model batch via the processor's chat template.

Left padding puts every prompt's last token at position -1, the position that produces the first generated token:
the one MARS reads and steers.

Example:
    >>> q = Query("Describe this picture.", images=(img,))      # doctest: +SKIP
    >>> batch = build_batch(backbone, [q, Query("Hello")])      # doctest: +SKIP
    >>> batch["input_ids"].shape                                 # doctest: +SKIP
    torch.Size([2, 31])
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Literal

import torch
from PIL import Image

from .backbone import Backbone

__all__ = ["GATE_POSITIONS", "MAX_PROMPT_CHARS", "Query", "build_batch", "clean_prompt", "gate_index",
           "inst_positions", "instruction_offset", "media_token_ids", "render_chat", "row_modalities"]

MAX_PROMPT_CHARS = 8000
# Where the gate reads (Zhao et al. 2025, "LLMs Encode Harmfulness and Refusal Separately"): "post" is the prompt's
# last position (after the chat template's closing tokens; where the model decides to refuse, and where MARS pushes),
# "inst" the last token of the user's instruction (where it encodes whether the request is harmful).
GATE_POSITIONS = ("post", "inst")
_SENTINEL = "Describe the weather in Paris today"
Modality = Literal["text", "image", "video"]


def clean_prompt(prompt: str, max_chars: int = MAX_PROMPT_CHARS) -> str:
    """Strip control characters (keeping newlines and tabs); reject empty or over-long prompts with a ValueError."""
    if not isinstance(prompt, str):
        raise ValueError(f"the prompt must be text, got {type(prompt).__name__}")
    cleaned = "".join(ch for ch in prompt if ch in "\n\t" or unicodedata.category(ch)[0] != "C").strip()
    if not cleaned:
        raise ValueError("the prompt is empty: type a question or instruction")
    if len(cleaned) > max_chars:
        raise ValueError(f"the prompt has {len(cleaned)} characters; the limit is {max_chars}: shorten it")
    return cleaned


@dataclass(frozen=True)
class Query:
    """One user turn: a prompt with optional images or one video (given as sampled RGB frames)."""

    prompt: str
    images: tuple[Image.Image, ...] = ()
    video: tuple[Image.Image, ...] | None = None
    tag: str = field(default="", compare=False)  # free label for reports

    def __post_init__(self) -> None:
        if self.images and self.video:
            raise ValueError("give either images or a video, not both")
        if self.video is not None and len(self.video) == 0:
            raise ValueError("the video has no frames")

    @property
    def modality(self) -> Modality:
        return "video" if self.video else "image" if self.images else "text"


def _content(q: Query, backbone: Backbone) -> tuple[list[dict], list[Image.Image], list[list[Image.Image]]]:
    """Structured chat content plus the images and videos the processor must receive for this query."""
    images: list[Image.Image] = list(q.images)
    videos: list[list[Image.Image]] = []
    parts: list[dict] = []
    if q.video:
        frames = list(q.video)
        if backbone.video_mode == "native":
            # a video token covering `temporal_patch` frames (Qwen-VL: pairs) needs a whole number of groups: repeat
            # the last frame, as the model's own video processor does where it pads (`ArchSpec.even_frames`)
            frames += frames[-1:] * (-len(frames) % backbone.arch.frame_multiple)
            videos.append(frames)
            parts.append({"type": "video"})
        elif backbone.video_mode == "frames":
            images.extend(frames)
        else:
            raise ValueError(f"{backbone.model_id} is a text-only model: it cannot take a video")
    if q.images and backbone.video_mode == "none":
        raise ValueError(f"{backbone.model_id} is a text-only model: it cannot take an image")
    parts = [{"type": "image"} for _ in images] + parts + [{"type": "text", "text": q.prompt}]
    return parts, images, videos


def render_chat(backbone: Backbone, q: Query) -> str:
    """The chat-templated prompt string, generation prompt appended."""
    parts, _, _ = _content(q, backbone)
    if backbone.video_mode == "none":
        messages = [{"role": "user", "content": q.prompt}]
    else:
        messages = [{"role": "user", "content": parts}]
    proc = backbone.processor
    if getattr(proc, "chat_template", None) is None and getattr(backbone.tokenizer, "chat_template", None) is None:
        raise ValueError(f"{backbone.model_id} has no chat template: use an instruction-tuned (chat) checkpoint")
    return proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def build_batch(backbone: Backbone, queries: list[Query]):
    """One left-padded `BatchEncoding` on the model's input device for `queries` (any mix of modalities).

    A processor that refuses a prompt without an image (`ArchSpec.text_format`: PaliGemma) gets the media rows only;
    the text-only rows are tokenized as it would tokenize them, and the two are merged back in order. Training
    `labels`, which such a processor adds, are dropped: generation does not take them."""
    if not queries:
        raise ValueError("no queries to build a batch from")
    texts = [render_chat(backbone, q) for q in queries]
    tok = backbone.tokenizer
    if backbone.video_mode == "none":
        enc = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    elif backbone.arch.text_format and any(q.modality == "text" for q in queries):
        text_rows = [i for i, q in enumerate(queries) if q.modality == "text"]
        media_rows = [i for i, q in enumerate(queries) if q.modality != "text"]
        parts = [(text_rows, _tokenize_text_only(backbone, [texts[i] for i in text_rows]))]
        if media_rows:
            parts.append((media_rows, _process(backbone, [queries[i] for i in media_rows],
                                               [texts[i] for i in media_rows])))
        enc = _merge_rows(backbone, parts, len(queries))
    else:
        enc = _process(backbone, queries, texts)
    enc.pop("labels", None)
    return enc.to(backbone.input_device)


def _process(backbone: Backbone, queries: list[Query], texts: list[str]):
    """The processor's batch for `queries` (their templated `texts`), images and videos attached."""
    flat_images, nested_images, videos = [], [], []
    for q in queries:
        _, imgs, vids = _content(q, backbone)
        flat_images.extend(imgs)
        nested_images.append(imgs)
        videos.extend(vids)
    kwargs: dict = dict(text=texts, return_tensors="pt", padding=True, padding_side="left")
    if flat_images:
        kwargs["images"] = nested_images if backbone.arch.nested_images else flat_images
    if videos:
        kwargs["videos"] = videos
    return backbone.processor(**kwargs)


def _text_only(backbone: Backbone, text: str) -> str:
    """What a processor that refuses text alone (`ArchSpec.text_format`) would feed its tokenizer for `text`."""
    return backbone.arch.text_format.format(bos=backbone.tokenizer.bos_token or "", text=text)


def _tokenize_text_only(backbone: Backbone, texts: list[str]):
    """Text-only rows for a processor that refuses them: the processor's text format, tokenized without further
    special tokens, with the (all-zero: prefix) token_type_ids the processor would return alongside."""
    return backbone.tokenizer([_text_only(backbone, t) for t in texts], return_tensors="pt", padding=True,
                              padding_side="left", add_special_tokens=False, return_token_type_ids=True)


_PAD_VALUES = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0}


def _merge_rows(backbone: Backbone, parts: list, n: int):
    """Merge left-padded batches of disjoint rows (`[(row indices, encoding), ...]`) into one of `n` rows in row
    order: the per-token entries are re-padded on the left, the others (media) are kept as they come, in order."""
    from transformers import BatchEncoding

    width = max(int(enc["input_ids"].shape[1]) for _, enc in parts)
    pad_id = backbone.tokenizer.pad_token_id
    out: dict = {}
    for key, fill in _PAD_VALUES.items():
        if not all(key in enc for _, enc in parts):
            continue
        rows: list = [None] * n
        for idx, enc in parts:
            v = enc[key]
            padded = torch.full((v.shape[0], width), pad_id if fill is None else fill, dtype=v.dtype)
            padded[:, width - v.shape[1]:] = v
            for j, i in enumerate(idx):
                rows[i] = padded[j]
        out[key] = torch.stack(rows)
    for _, enc in parts:
        for key, v in enc.items():
            if key not in _PAD_VALUES and key != "labels":
                if key in out:
                    raise ValueError(f"cannot merge two batches that both carry {key!r}")
                out[key] = v
    return BatchEncoding(out)


def media_token_ids(backbone: Backbone) -> tuple[int | None, int | None]:
    """The (image, video) placeholder token ids of the model's config (None where it has none)."""
    cfg = backbone.model.config

    def first(*names: str) -> int | None:
        return next((int(v) for v in (getattr(cfg, n, None) for n in names) if v is not None), None)

    return first("image_token_id", "image_token_index"), first("video_token_id", "video_token_index")


def row_modalities(backbone: Backbone, input_ids: torch.Tensor) -> list[Modality]:
    """Each row's modality, read from its token ids: "video" if it holds a video placeholder, else "image" if it
    holds an image placeholder, else "text". A model that takes a video as a list of frames (video_mode "frames")
    sees images: name such rows "video" yourself."""
    image, video = media_token_ids(backbone)
    out: list[Modality] = []
    for row in input_ids:
        if video is not None and bool((row == video).any()):
            out.append("video")
        elif image is not None and bool((row == image).any()):
            out.append("image")
        else:
            out.append("text")
    return out


def instruction_offset(backbone: Backbone) -> int:
    """How many template tokens follow the user's text in a templated prompt (end of turn + generation prompt):
    t_inst is the position `-1 - instruction_offset` of every left-padded row, t_post is `-1`.

    The user's text is the last part of the turn (media come first, `_content`), so the offset is the same for every
    prompt and modality. Measured once from the chat template and checked token by token: a template whose suffix
    would merge with the user's last token is refused with a clear error rather than read at a wrong position.
    """
    if backbone.instruction_suffix is not None:
        return backbone.instruction_suffix
    text = render_chat(backbone, Query(_SENTINEL))
    end = text.rfind(_SENTINEL)
    if end < 0:
        raise ValueError(f"{backbone.model_id}'s chat template does not keep the user's text verbatim: the gate "
                         "cannot find the instruction's last token (use --gate-position post)")
    tok = backbone.tokenizer
    head_text = text[: end + len(_SENTINEL)]
    if backbone.arch.text_format:  # the prompt as the processor tokenizes it (PaliGemma appends "\n")
        text, head_text = _text_only(backbone, text), _text_only(backbone, head_text)
        head_text = head_text[: head_text.rfind(_SENTINEL) + len(_SENTINEL)]
    full = tok(text, add_special_tokens=False)["input_ids"]
    head = tok(head_text, add_special_tokens=False)["input_ids"]
    k = len(full) - len(head)
    if k < 1 or full[: len(head)] != head:
        raise ValueError(f"{backbone.model_id}'s chat template merges the user's last token with the text after it: "
                         "the gate cannot read the instruction's last token (use --gate-position post)")
    backbone.instruction_suffix = k
    return k


def gate_index(backbone: Backbone, position: str) -> int:
    """The gate's position as an index from the end of the prompt: -1 for "post", `-1 - instruction_offset` for
    "inst"."""
    if position not in GATE_POSITIONS:
        raise ValueError(f"unknown gate position {position!r}: use one of {', '.join(GATE_POSITIONS)}")
    return -1 if position == "post" else -1 - instruction_offset(backbone)


def inst_positions(backbone: Backbone, input_ids) -> torch.Tensor:
    """t_inst as an absolute index in each row of a left-padded batch `input_ids [B, T]` -> long `[B, 1]` (the
    `positions` of `hooks.capture_residuals`). A shared prefill of prompt[:-1] holds t_inst at the same index."""
    n, t = input_ids.shape
    return torch.full((n, 1), t + gate_index(backbone, "inst"), dtype=torch.long)
