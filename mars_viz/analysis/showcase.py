"""The showcase: evaluation items where MARS changed the outcome, ready to replay in Explore (no gradio here).

A teacher's demo should come from the model's real behaviour, not from a hand-picked prompt: after an evaluation,
`showcase(items, rows)` lists the harmful inputs MARS turned from an answer into a refusal, the harmless ones it
over-refused, and a few it left alone. `save_media` writes an entry's image (PNG, lossless) or video (MP4) so the
dashboard can load it like an upload.

Example:
    >>> entries = showcase(items, evaluate(backbone, state, items))     # doctest: +SKIP
    >>> entries[0].category, entries[0].label()                        # doctest: +SKIP
    ('mars_refused', 'MARS refused (was answered) · text/harmful · How do I ...')
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image

from .evaluate import EvalItem

__all__ = ["CATEGORIES", "ShowcaseEntry", "save_media", "showcase"]

Category = Literal["mars_refused", "over_refused", "unchanged"]
CATEGORIES: dict[str, str] = {
    "mars_refused": "MARS refused (was answered)",
    "over_refused": "over-refused by MARS (harmless)",
    "unchanged": "left unchanged",
}


@dataclass(frozen=True)
class ShowcaseEntry:
    category: Category
    condition: str  # e.g. "image/harmful"
    instruction: str  # the underlying request
    prompt: str  # what the model was asked (for typographic / word videos: the carrier prompt)
    unsteered: str
    steered: str
    images: tuple[Image.Image, ...] = ()
    video: tuple[Image.Image, ...] | None = None

    def label(self) -> str:
        text = self.instruction if len(self.instruction) <= 70 else self.instruction[:67] + "..."
        return f"{CATEGORIES[self.category]} · {self.condition} · {text}"

    def row(self) -> list[str]:
        return [CATEGORIES[self.category], self.condition, self.instruction, self.unsteered, self.steered]


def _category(item: EvalItem, row: dict) -> Category | None:
    before, after = row["unsteered"], row["mars"]
    if not before["refused"] and after["refused"]:
        return "mars_refused" if item.kind == "harmful" else "over_refused"
    if after["text"] == before["text"]:
        return "unchanged"
    return None


def showcase(items: Sequence[EvalItem], rows: Sequence[dict], per_category: int = 6,
             unchanged: int = 3) -> list[ShowcaseEntry]:
    """Entries where MARS changed the outcome (harmful answered -> refused first, then over-refusals), then a few it
    left unchanged. `rows` are `evaluate`'s per-item rows, in the order of `items`."""
    if len(items) != len(rows):
        raise ValueError(f"got {len(items)} items but {len(rows)} rows: pass evaluate()'s rows for these items")
    caps = {"mars_refused": per_category, "over_refused": per_category, "unchanged": unchanged}
    picked: dict[str, list[ShowcaseEntry]] = {c: [] for c in CATEGORIES}
    for item, row in zip(items, rows, strict=True):
        if row["prompt"] != item.prompt:
            raise ValueError("rows and items are not in the same order")
        cat = _category(item, row)
        if cat is None or len(picked[cat]) >= caps[cat]:
            continue
        q = item.query
        picked[cat].append(ShowcaseEntry(cat, item.condition, item.prompt, q.prompt, row["unsteered"]["text"],
                                         row["mars"]["text"], tuple(q.images), q.video))
    return [e for c in CATEGORIES for e in picked[c]]


def save_media(entry: ShowcaseEntry, folder: str | os.PathLike) -> tuple[str | None, str | None]:
    """(image path, video path) of the entry's media written into `folder` (PNG / MP4), None where it has none."""
    from ..model.videoio import write_video

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"showcase_{abs(hash((entry.condition, entry.instruction))) % 10**10}"
    image = video = None
    if entry.images:
        image = str(out / f"{stem}.png")
        entry.images[0].convert("RGB").save(image)
    if entry.video:
        video = write_video(out / f"{stem}.mp4", list(entry.video), fps=4)
    return image, video
