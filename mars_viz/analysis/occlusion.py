"""The occlusion check: cover one region of the input with the neutral colour, re-score, and see how much the score
falls. Slower than the projection map (one forward per region) and more faithful: it measures what the region does to
the score the gate reads, through the whole model, instead of reading each token's own residual.

Pure: it takes the input and a scoring callable, so it is tested with a fake scorer; `analysis.gate_scorer` gives the
real one (the gate's re-centred score at the detection layer).

Example:
    >>> res = occlusion(query, gate_scorer(backbone, state, options), cells=4)    # doctest: +SKIP
    >>> res.contribution   # [regions] s(input) - s(region covered): positive = pushes toward refusal  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

from ..maps.layout import Grid
from ..model.inputs import Query

__all__ = ["Occlusion", "Region", "Scorer", "neutral_fill", "occlusion", "occlusion_grids", "regions"]

Scorer = Callable[[Sequence[Query]], list[float]]  # queries -> the score the gate reads, one per query


@dataclass(frozen=True)
class Region:
    """A rectangle of one image (kind "image") or one sampled frame (kind "frame"), in normalised coordinates."""

    kind: str
    index: int  # image number or frame number
    row: int
    col: int
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in [0, 1]


@dataclass
class Occlusion:
    base: float  # the score of the unmodified input
    regions: list[Region]
    covered: list[float]  # the score with each region covered
    cells: tuple[int, int]  # (rows, cols) of each image's / frame's region grid
    notes: list[str] = field(default_factory=list)

    @property
    def contribution(self) -> np.ndarray:
        """`[regions]` s(input) - s(region covered): positive where the region pushes the score up."""
        return self.base - np.asarray(self.covered, dtype=float)


def regions(query: Query, cells: int = 4, whole_frames: bool = True) -> list[Region]:
    """A `cells` x `cells` grid of regions over every image; for a video, each whole frame (or, with
    `whole_frames=False`, the same grid over every frame)."""
    out = []
    step = 1.0 / cells
    grid = [(r, c, (c * step, r * step, (c + 1) * step, (r + 1) * step)) for r in range(cells) for c in range(cells)]
    for i in range(len(query.images)):
        out += [Region("image", i, r, c, box) for r, c, box in grid]
    for f in range(len(query.video or ())):
        out += [Region("frame", f, 0, 0, (0.0, 0.0, 1.0, 1.0))] if whole_frames else \
            [Region("frame", f, r, c, box) for r, c, box in grid]
    return out


def _cover(image: Image.Image, box: tuple[float, float, float, float], fill: tuple[int, int, int]) -> Image.Image:
    out = image.convert("RGB").copy()
    w, h = out.size
    x0, y0, x1, y1 = round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)
    out.paste(fill, (x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))
    return out


def covered_query(query: Query, region: Region, fill: tuple[int, int, int]) -> Query:
    """`query` with `region` painted in `fill`."""
    if region.kind == "image":
        ims = list(query.images)
        ims[region.index] = _cover(ims[region.index], region.box, fill)
        return replace(query, images=tuple(ims))
    frames = list(query.video or ())
    frames[region.index] = _cover(frames[region.index], region.box, fill)
    return replace(query, video=tuple(frames))


def occlusion(query: Query, score: Scorer, cells: int = 4, fill: tuple[int, int, int] = (128, 128, 128),
              whole_frames: bool = True, batch_size: int = 4,
              progress: Callable[[int, int], None] | None = None) -> Occlusion:
    """Score `query`, then each copy with one region covered in `fill` (batched `batch_size` at a time)."""
    if query.modality == "text":
        raise ValueError("the occlusion check needs an image or a video: this input is text only")
    if cells < 1:
        raise ValueError("cells must be at least 1")
    regs = regions(query, cells, whole_frames)
    base = float(score([query])[0])
    covered: list[float] = []
    for i in range(0, len(regs), batch_size):
        chunk = regs[i:i + batch_size]
        covered += [float(s) for s in score([covered_query(query, r, fill) for r in chunk])]
        if progress:
            progress(min(i + batch_size, len(regs)), len(regs))
    shape = (1, 1) if query.video and whole_frames else (cells, cells)
    return Occlusion(base=base, regions=regs, covered=covered, cells=shape)


def occlusion_grids(res: Occlusion) -> list[Grid]:
    """The contributions as `layout.Grid`s (one per image / frame, `positions` -1: no token), for the overlay plots."""
    contrib = res.contribution
    by: dict[tuple[str, int], np.ndarray] = {}
    for reg, v in zip(res.regions, contrib, strict=True):
        g = by.setdefault((reg.kind, reg.index), np.full(res.cells, np.nan))
        g[reg.row, reg.col] = v
    return [Grid(kind, idx, "occlusion", np.full(res.cells, -1, dtype=np.int64),
                 frames=(idx,) if kind == "frame" else (), scores=sc) for (kind, idx), sc in by.items()]


def neutral_fill(seed: int = 0, k: int = 16) -> tuple[int, int, int]:
    """The neutral colour: the mean of the K seeded solid colours the state's neutral inputs used (re-centring
    removes what such colours do, so covering a region with it removes the region's content, not more)."""
    from ..model.media import neutral_images

    px = np.array([np.asarray(im.convert("RGB"))[0, 0] for im in neutral_images(k, seed=seed, size=2)], dtype=float)
    return tuple(int(round(v)) for v in px.mean(0))
