"""Where in the input: per-position unsafety scores, mapped back to the prompt's words, the image's patch grid and
the video's frames.

The Run's prefill already computes the residual at every prompt position; `generate.stream_pair(seq_layers=...)`
keeps it at the detection layer (T x d floats). Each position is scored along that layer's r-hat with the gate's
own affine map (`steering.gate_scores`, i.e. `geometry.unsafety_score`); image and video tokens are re-centred by
a *per-position* offset measured at fit time on the neutral solid-colour inputs (so a neutral image scores 0, the
safe centroid's score, in every cell). Then the media tokens are placed on their grids:

  qwen2_vl, qwen2_5_vl   `image_grid_thw` / `video_grid_thw` / `spatial_merge_size`: one token per merged 2x2 patch,
                         a video token covers `temporal_patch_size` consecutive frames (flagged: not per frame)
  llava                  the CLIP patch grid of the centre crop (the class token, if kept, is not placed)
  llava_onevision        the base grid, then the anyres tiles stitched and unpadded (traced through the model's own
                         `pack_image_features`; downsampled tiles are flagged); video: frames x pooled grid
  idefics3 / smolvlm     `<row_r_col_c>` tiles stitched into one grid, plus the `<global-img>` grid
  gemma3                 the pooled `mm_tokens_per_image` grid (pan-and-scan crops: region unknown, flagged)

Everything except `layout_spec` (which reads the processor, config and model) is pure: ids and metadata in, grids
out. Where a mapping is not exact, the grid says so (`exact=False` and a note) instead of guessing.

Example:
    >>> for upd in stream_pair(bb, state, q, opts, seq_layers=[plan(state, opts).detect_layer]):  # doctest: +SKIP
    ...     pass
    >>> m = input_map(bb, state, opts, q, upd.seq)                                               # doctest: +SKIP
    >>> m.grids[0].scores.shape, m.text()[:3]                                                    # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..steer.steering import Plan, SteerOptions, gate_scores, plan

__all__ = ["Grid", "InputMap", "LayoutSpec", "build_input_map", "input_map", "layout_grids", "layout_spec",
           "map_csv", "neutral_position_offsets", "position_scores", "rescore"]

Box = tuple[float, float, float, float]  # normalised x0, y0, x1, y1 of the source image
FULL: Box = (0.0, 0.0, 1.0, 1.0)


@dataclass
class Grid:
    """One 2-D token grid over (a region of) one image or sampled video frame(s).

    `positions[r, c]` is the prompt position of the token in that cell (-1: no token there). `box` is the region of
    the source image the grid covers (None: unknown). `scores` is filled by `build_input_map`.
    """

    kind: str  # "image" or "frame"
    index: int  # image number, or the first sampled frame the grid covers
    view: str  # "patches", "base", "tiles", "global", "pooled", "frames", "sequence", "crop"
    positions: np.ndarray  # [rows, cols] int64
    box: Box | None = FULL
    frames: tuple[int, ...] = ()  # video: the sampled frames its tokens cover
    exact: bool = True
    note: str = ""
    scores: np.ndarray | None = None  # [rows, cols] float64, NaN where no token

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.positions.shape[0]), int(self.positions.shape[1])

    @property
    def label(self) -> str:
        if self.kind == "frame":
            f = (f"frame {self.frames[0]}" if len(self.frames) == 1 else
                 f"frames {self.frames[0]}-{self.frames[-1]}" if self.frames else f"frame {self.index}")
            return f"{f} ({self.view})"
        return f"image {self.index + 1} ({self.view})"

    def to_json(self) -> dict:
        sc = None if self.scores is None else [[None if math.isnan(v) else float(v) for v in row]
                                               for row in self.scores.tolist()]
        return {"kind": self.kind, "index": self.index, "view": self.view, "frames": list(self.frames),
                "rows": self.shape[0], "cols": self.shape[1], "box": None if self.box is None else list(self.box),
                "exact": self.exact, "note": self.note, "positions": self.positions.tolist(), "scores": sc}


@dataclass
class InputMap:
    """Per-position scores of one input and where they sit: text tokens, image grids, video frame grids."""

    layer: int  # the layer scored (the gate's detection layer)
    recenter: bool
    tokens: list[str]  # [T] the text of every prompt position
    kinds: list[str]  # [T] "text", "image" or "video"
    scores: np.ndarray  # [T] float64
    grids: list[Grid]
    offset_source: str  # "per-position", "mean modality offset" or "none"
    notes: list[str] = field(default_factory=list)
    modality: str = "text"  # the input's modality (text positions are re-centred by its offset, as the gate does)
    layout_notes: list[str] = field(default_factory=list)  # the layout's own notes (kept when re-scored)
    h: torch.Tensor | None = field(default=None, repr=False, compare=False)  # [T, d] the residuals scored
    gate_at: int = -1  # the position the gate reads (t_post: the last; t_inst: the user's last token), from the start

    @property
    def exact(self) -> bool:
        return all(g.exact for g in self.grids)

    def text(self) -> list[tuple[int, str, float]]:
        """(position, token, score) of every text (non-media) position, in order."""
        return [(i, t, float(s)) for i, (t, k, s) in enumerate(zip(self.tokens, self.kinds, self.scores, strict=True))
                if k == "text"]

    def frame_grids(self) -> list[Grid]:
        return [g for g in self.grids if g.kind == "frame"]

    def image_grids(self) -> list[Grid]:
        return [g for g in self.grids if g.kind == "image"]

    def to_json(self) -> dict:
        return {"layer": self.layer, "recenter": self.recenter, "offset_source": self.offset_source,
                "exact": self.exact, "notes": list(self.notes), "gate_at": self.gate_at % len(self.tokens),
                "positions": [{"pos": i, "token": t, "kind": k, "score": float(s)}
                              for i, (t, k, s) in enumerate(zip(self.tokens, self.kinds, self.scores, strict=True))],
                "grids": [g.to_json() for g in self.grids]}


# ---- the layout table -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayoutSpec:
    """What the layout needs to know about one model (read once by `layout_spec`; everything after is pure)."""

    family: str  # "qwen", "llava", "onevision", "idefics3", "gemma3" or "" (unknown: tokens in sequence order)
    model_type: str
    image_token_id: int | None
    video_token_id: int | None = None
    video_mode: str = "frames"  # "native": a video has its own tokens; "frames": its frames are images
    merge: int = 1  # qwen: spatial_merge_size
    temporal_patch: int = 1  # qwen: frames per video token
    crop: tuple[int, int, int] | None = None  # llava: (resize shortest edge, crop width, crop height)
    tags: dict[int, tuple[str, int, int]] = field(default_factory=dict)  # idefics3: tag id -> (view, row, col)
    seq_len: int = 0  # idefics3: tokens per tile / view
    base_side: int = 0  # onevision: patches per side of the base image (and of one tile)
    video_grid: tuple[int, int] = (0, 0)  # onevision: pooled grid of one video frame
    trace: Callable[[dict, int], list[np.ndarray]] | None = None  # onevision: per image, the packed order codes


def _tok(tokenizer, token: str) -> int | None:
    i = tokenizer.convert_tokens_to_ids(token)
    return None if i is None or i == tokenizer.unk_token_id else int(i)


def _onevision_trace(model) -> Callable[[dict, int], list[np.ndarray]]:
    """Run the model's own `pack_image_features` on index codes instead of features: code k + 1 is patch k // (h*w)
    (0 = base, then the anyres tiles), cell k % (h*w); -1 is a newline token; a non-integer code was resampled."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    cfg, inner = model.config, model.model
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size

    def trace(meta: dict, n_images: int) -> list[np.ndarray]:
        sizes = meta["image_sizes"][:n_images]
        bni = meta.get("batch_num_images")
        need = [True] * len(sizes) if bni is None else [int(n) == 1 for n in bni.tolist() for _ in range(int(n))]
        feats = []
        for size, patched in zip(sizes, need, strict=False):
            n = image_size_to_num_patches(image_size=size, grid_pinpoints=cfg.image_grid_pinpoints,
                                          patch_size=cfg.vision_config.image_size) if patched else 1
            feats.append(torch.arange(1, n * side * side + 1, dtype=torch.float64).view(n, side * side, 1))
        packed, _ = inner.pack_image_features(feats, sizes, image_newline=torch.tensor([-1.0], dtype=torch.float64),
                                              vision_aspect_ratio=getattr(cfg, "vision_aspect_ratio", "anyres_max_9"))
        return [p[:, 0].numpy() for p in packed]

    return trace


def _size(d, key: str):
    """A processor size field (`dict` or transformers' `SizeDict`), None when absent."""
    if d is None:
        return None
    return d.get(key) if isinstance(d, dict) else getattr(d, key, None)


def layout_spec(backbone) -> LayoutSpec:
    """The layout facts of a loaded `Backbone` (the only transformers-specific part of the maps)."""
    mt, cfg, proc = backbone.model_type, backbone.model.config, backbone.processor
    tok = backbone.tokenizer
    img = getattr(cfg, "image_token_id", None)
    img = getattr(cfg, "image_token_index", None) if img is None else img
    vid = getattr(cfg, "video_token_id", None)
    vid = getattr(cfg, "video_token_index", None) if vid is None else vid
    base = dict(model_type=mt, image_token_id=img, video_token_id=vid, video_mode=backbone.video_mode)
    if mt in ("qwen2_vl", "qwen2_5_vl", "mars_reader"):
        vc = cfg.vision_config
        return LayoutSpec("qwen", merge=int(vc.spatial_merge_size), temporal_patch=int(vc.temporal_patch_size),
                          **base)
    if mt == "llava":
        ip = proc.image_processor
        crop = None
        edge = _size(getattr(ip, "size", None), "shortest_edge")
        cw, ch = (_size(getattr(ip, "crop_size", None), k) for k in ("width", "height"))
        if getattr(ip, "do_center_crop", False) and edge and cw and ch:
            crop = (int(edge), int(cw), int(ch))
        return LayoutSpec("llava", crop=crop, **base)
    if mt == "llava_onevision":
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        return LayoutSpec("onevision", base_side=side, video_grid=(math.ceil(side / 2), math.ceil(side / 2)),
                          trace=_onevision_trace(backbone.model), **base)
    if mt in ("idefics3", "smolvlm"):
        tags = {}
        g = _tok(tok, getattr(proc, "global_image_tag", "<global-img>"))
        if g is not None:
            tags[g] = ("global", 0, 0)
        for r in range(1, 13):
            for c in range(1, 13):
                i = _tok(tok, f"<row_{r}_col_{c}>")
                if i is not None:
                    tags[i] = ("tiles", r - 1, c - 1)
        return LayoutSpec("idefics3", tags=tags, seq_len=int(proc.image_seq_len), **base)
    if mt == "gemma3":
        return LayoutSpec("gemma3", **base)
    return LayoutSpec("", **base)


# ---- pure layout ---------------------------------------------------------------------------------------------------

def _runs(positions: Sequence[int]) -> list[list[int]]:
    """Split sorted positions into runs of consecutive ones."""
    out: list[list[int]] = []
    for p in positions:
        if out and p == out[-1][-1] + 1:
            out[-1].append(p)
        else:
            out.append([p])
    return out


def _square(n: int) -> int | None:
    s = math.isqrt(n)
    return s if s * s == n and s > 0 else None


def _grid(pos: Sequence[int], rows: int, cols: int) -> np.ndarray:
    return np.asarray(pos, dtype=np.int64).reshape(rows, cols)


def _llava_box(size: tuple[int, int], crop: tuple[int, int, int] | None) -> Box:
    """The region of a (w, h) image a LLaVA-1.5 grid covers: resize the shortest edge, then centre-crop."""
    if crop is None:
        return FULL
    s, cw, ch = crop
    w, h = size
    scale = s / min(w, h)
    rw, rh = w * scale, h * scale
    x0, y0 = max(rw - cw, 0) / 2 / rw, max(rh - ch, 0) / 2 / rh
    return (x0, y0, 1 - x0, 1 - y0)


def _sequence_grids(runs: list[list[int]], kind: str, why: str) -> list[Grid]:
    return [Grid(kind, i, "sequence", _grid(r, 1, len(r)), box=None, exact=False, note=why) for i, r in enumerate(runs)]


def _qwen(spec: LayoutSpec, img: list[int], vid: list[int], meta: dict, n_frames: int, notes: list[str]):
    grids, m = [], spec.merge
    thw = meta.get("image_grid_thw")
    k = 0
    for i, (t, h, w) in enumerate([] if thw is None or not img else thw.tolist()):
        n = t * h * w // (m * m)
        if k + n > len(img):
            break  # a doubled batch lists the copies' grids too
        grids.append(Grid("image", i, "patches", _grid(img[k:k + n], h // m, w // m)))
        k += n
    vthw = meta.get("video_grid_thw")
    if vid and vthw is not None:
        t, h, w = vthw.tolist()[0]
        per = h * w // (m * m)
        for g in range(t):
            frames = tuple(f for f in range(g * spec.temporal_patch, (g + 1) * spec.temporal_patch) if f < n_frames)
            grids.append(Grid("frame", frames[0] if frames else g, "frames",
                              _grid(vid[g * per:(g + 1) * per], h // m, w // m), frames=frames,
                              exact=len(frames) == 1,
                              note="" if len(frames) == 1 else
                              f"one token covers {len(frames)} consecutive frames (temporal patch of "
                              f"{spec.temporal_patch}): each frame's map is shared with frames of its pair"))
    return grids


def _llava(spec: LayoutSpec, img: list[int], n_images: int, sizes: list[tuple[int, int]], kind: str):
    if not n_images or len(img) % n_images:
        return None
    per = len(img) // n_images
    skip = 0 if _square(per) else 1 if _square(per - 1) else None
    if skip is None:
        return None
    s = _square(per - skip)
    note = "the first token (the vision class token) is not a patch: not placed" if skip else ""
    return [Grid(kind, i, "patches", _grid(img[i * per + skip:(i + 1) * per], s, s),
                 box=_llava_box(sizes[i], spec.crop) if i < len(sizes) else FULL, note=note)
            for i in range(n_images)]


def _gemma3(img: list[int], n_images: int, kind: str):
    runs = _runs(img)
    if len(runs) > n_images > 1:  # pan-and-scan crops of several images: which crops belong to which is not kept
        return None
    grids = []
    for i, r in enumerate(runs):
        s = _square(len(r))
        if s is None:
            return None
        if i < n_images:
            grids.append(Grid(kind, i, "pooled", _grid(r, s, s)))
        else:  # pan-and-scan: the processor does not report where its crops came from
            grids.append(Grid(kind, i - n_images, "crop", _grid(r, s, s), box=None, exact=False,
                              note="a pan-and-scan crop: the processor does not record its region"))
    return grids


def _idefics3(spec: LayoutSpec, ids: Sequence[int], n_images: int, kind: str):
    s = _square(spec.seq_len)
    if s is None:
        return None
    views: list[dict] = []  # per image: {"tiles": {(r, c): [pos]}, "global": [pos]}
    cur: dict = {"tiles": {}}
    i = 0
    while i < len(ids):
        tag = spec.tags.get(int(ids[i]))
        if tag is None:
            i += 1
            continue
        run = [j for j in range(i + 1, min(i + 1 + spec.seq_len, len(ids))) if ids[j] == spec.image_token_id]
        if len(run) != spec.seq_len:
            return None
        if tag[0] == "tiles":
            cur["tiles"][(tag[1], tag[2])] = run
        else:
            cur["global"] = run
            views.append(cur)
            cur = {"tiles": {}}
        i += 1 + spec.seq_len
    if len(views) != n_images:
        return None
    grids = []
    for k, v in enumerate(views):
        if v["tiles"]:
            tr = 1 + max(r for r, _ in v["tiles"])
            tc = 1 + max(c for _, c in v["tiles"])
            pos = np.full((tr * s, tc * s), -1, dtype=np.int64)
            for (r, c), run in v["tiles"].items():
                pos[r * s:(r + 1) * s, c * s:(c + 1) * s] = _grid(run, s, s)
            grids.append(Grid(kind, k, "tiles", pos))
        grids.append(Grid(kind, k, "global", _grid(v["global"], s, s)))
    return grids


def _onevision(spec: LayoutSpec, img: list[int], vid: list[int], meta: dict, n_images: int, n_frames: int):
    grids = []
    nb = spec.base_side ** 2
    if img:
        codes = spec.trace(meta, n_images)
        if sum(len(c) for c in codes) != len(img):
            return None
        k = 0
        for i, c in enumerate(codes):
            pos = img[k:k + len(c)]
            k += len(c)
            if len(c) <= nb or not np.array_equal(c[:nb], np.arange(1, nb + 1)):
                return None
            rest, rpos = c[nb:], pos[nb:]
            if len(rest) == 1 and rest[0] == -1:  # one patch (several images in one sample): base + newline
                grids.append(Grid("image", i, "base", _grid(pos[:nb], spec.base_side, spec.base_side),
                                  note="the newline token after the grid is not placed"))
                continue
            grids.append(Grid("image", i, "base", _grid(pos[:nb], spec.base_side, spec.base_side)))
            rows, row = [], []
            for code, p in zip(rest, rpos, strict=True):
                if code == -1:
                    rows.append(row)
                    row = []
                else:
                    row.append(p)
            if row or not rows or len({len(r) for r in rows}) != 1:
                return None
            if not rows[0]:  # unpadding left no tile columns (a very narrow image): only newline tokens
                grids[-1].note = "the anyres tiles were unpadded to nothing; their newline tokens are not placed"
                continue
            exact = bool(np.all(np.mod(rest[rest > 0], 1) == 0))
            grids.append(Grid("image", i, "tiles", np.asarray(rows, dtype=np.int64), exact=exact,
                              note="anyres tiles, stitched and unpadded; the newline token ending each row is not "
                                   "placed" + ("" if exact else "; the tiles were downsampled (bilinear), so each "
                                               "cell mixes neighbouring patches")))
    if vid:
        gh, gw = spec.video_grid
        per = gh * gw
        fed = (len(vid) - 1) // per  # frames the processor got (an odd count gets its last frame repeated)
        if fed * per + 1 != len(vid) or fed not in (n_frames, n_frames + 1):
            return None
        for f in range(fed):
            dup = f >= n_frames
            grids.append(Grid("frame", min(f, n_frames - 1), "frames", _grid(vid[f * per:(f + 1) * per], gh, gw),
                              frames=(min(f, n_frames - 1),),
                              note=("a repeat of the last frame (the frame count is made even); " if dup else "")
                              + "2x2 bilinear pooling of the frame's patches; the closing newline token is not "
                                "placed"))
    return grids


def layout_grids(spec: LayoutSpec, ids: Sequence[int], meta: dict, n_images: int, n_frames: int,
                 sizes: Sequence[tuple[int, int]] = ()) -> tuple[list[Grid], list[str]]:
    """Place the media tokens of one unpadded prompt (`ids`) on their grids. Pure: ids + metadata in.

    `n_images` / `n_frames`: the query's images and sampled video frames; `sizes` their (width, height). On a
    model whose video frames go in as images (`video_mode="frames"`), pass the frames as images and `n_frames`.
    Returns the grids (in prompt order) and notes; a layout that does not match the token counts falls back to the
    tokens in sequence order, flagged not exact, rather than guess.
    """
    ids = [int(t) for t in ids]
    img = [i for i, t in enumerate(ids) if spec.image_token_id is not None and t == spec.image_token_id]
    vid = [i for i, t in enumerate(ids) if spec.video_token_id is not None and t == spec.video_token_id]
    notes: list[str] = []
    frames_as_images = spec.video_mode != "native" and n_frames > 0
    kind = "frame" if frames_as_images else "image"
    n_img = n_frames if frames_as_images else n_images
    grids = None
    if spec.family == "qwen":
        grids = _qwen(spec, img, vid, meta, n_frames, notes)
        if sum(int(np.sum(g.positions >= 0)) for g in grids) != len(img) + len(vid):
            grids = None
    elif spec.family == "llava":
        grids = _llava(spec, img, n_img, list(sizes), kind)
    elif spec.family == "gemma3":
        grids = _gemma3(img, n_img, kind)
    elif spec.family == "idefics3":
        grids = _idefics3(spec, ids, n_img, kind)
    elif spec.family == "onevision" and spec.trace is not None:
        grids = _onevision(spec, img, vid, meta, n_images, n_frames)
    if grids is None:
        why = (f"no patch layout is known for {spec.model_type}" if not spec.family else
               f"the {spec.model_type} layout does not match the prompt's media tokens")
        notes.append(f"{why}: media tokens are shown in sequence order (not a spatial map)")
        grids = _sequence_grids(_runs(img), kind, why) + _sequence_grids(_runs(vid), "frame", why)
    if frames_as_images:
        for g in grids:
            if g.kind == "frame" and not g.frames:
                g.frames = (g.index,)
    return grids, notes


# ---- scores ------------------------------------------------------------------------------------------------------

def _score(state, p: Plan, h: torch.Tensor) -> torch.Tensor:
    """The gate's own score of residuals `h [N, d]` at the detection layer, with no further offset (any re-centring
    was applied to `h` already): `steering.gate_scores`, i.e. `geometry.unsafety_score`."""
    return gate_scores(state, p, h, ["text"] * h.shape[0], recenter=False)


def _cell_offsets(cells: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Fit-time offsets `[gh, gw, d]` resampled (bilinear; identity when the shapes agree) to `shape` -> [r, c, d]."""
    if tuple(cells.shape[:2]) == tuple(shape):
        return cells
    x = cells.permute(2, 0, 1)[None].double()
    return torch.nn.functional.interpolate(x, size=shape, mode="bilinear", align_corners=False)[0].permute(1, 2, 0)


def position_scores(state, options: SteerOptions, h: torch.Tensor, kinds: Sequence[str], grids: Sequence[Grid],
                    modality: str = "text") -> tuple[np.ndarray, str, list[str]]:
    """Score every position `h [T, d]` (residuals at the detection layer) -> (`[T]` scores, offset source, notes).

    Text positions are scored as the gate scores the last one: re-centred by the input's modality offset (the gate's
    delta; zero for a text-only input), so the last position's score *is* the gate's. Media positions, with
    re-centring: minus the per-position offset the state measured on neutral inputs for that grid view (resampled
    when the grid's shape differs), or the mean over the neutral media tokens where no view matches. A state without
    per-position offsets (fitted before maps existed, or read at another layer) falls back to the gate's mean modality
    offset, and says so. Without re-centring every position is scored raw.
    """
    p = plan(state, options)
    h = h.double()
    kinds = list(kinds)
    text = [i for i, k in enumerate(kinds) if k == "text"]
    media = [i for i, k in enumerate(kinds) if k != "text"]
    scores = torch.zeros(len(kinds), dtype=torch.float64)
    notes: list[str] = []
    source = "none"
    if text:
        scores[text] = gate_scores(state, p, h[text], [modality] * len(text), options.recenter).cpu()
    if not media:
        return scores.numpy(), source, notes
    if not options.recenter:
        scores[media] = _score(state, p, h[media]).cpu()
        return scores.numpy(), source, notes
    diag = state.diagnostics
    cells = getattr(diag, "map_cells", None) or {}
    tokens = getattr(diag, "map_tokens", None) or {}
    measured = (getattr(diag, "map_layer", None), getattr(diag, "map_position", "post"))
    if measured != (p.detect_layer, p.gate_position) or not tokens:
        why = ("this state has no per-position offsets (fitted before the maps existed)" if not tokens else
               f"the per-position offsets were measured at layer {measured[0]} for the gate at t_{measured[1]}, "
               f"not at layer {p.detect_layer} for t_{p.gate_position}")
        notes.append(f"{why}: image and video tokens are re-centred by the mean modality offset (the gate's δ)")
        scores[media] = gate_scores(state, p, h[media], [kinds[i] for i in media], recenter=True).cpu()
        return scores.numpy(), "mean modality offset", notes
    delta = torch.zeros_like(h)
    for i in media:
        if kinds[i] not in tokens:
            raise ValueError(f"this state has no {kinds[i]} offsets: refit it with neutral {kinds[i]} inputs")
        delta[i] = tokens[kinds[i]].double()
    resampled = set()
    for g in grids:
        placed = g.positions[g.positions >= 0]
        if not len(placed):
            continue
        key = f"{kinds[int(placed[0])]}.{g.view}"
        if key not in cells:
            continue
        off = _cell_offsets(cells[key].double(), g.shape)
        if tuple(cells[key].shape[:2]) != g.shape:
            resampled.add(f"{key} {tuple(cells[key].shape[:2])} -> {g.shape}")
        for (r, c), pos in np.ndenumerate(g.positions):
            if pos >= 0:
                delta[pos] = off[r, c]
    if resampled:
        notes.append("per-position offsets resampled (bilinear) from the neutral inputs' grid: "
                     + "; ".join(sorted(resampled)))
    scores[media] = _score(state, p, h[media] - delta[media]).cpu()
    return scores.numpy(), "per-position", notes


def build_input_map(spec: LayoutSpec, decode: Callable[[int], str], state, options: SteerOptions, query,
                    ids: Sequence[int], h: torch.Tensor, meta: dict, gate_at: int = -1) -> InputMap:
    """The `InputMap` of one query from its unpadded prompt ids, residuals `h [T, d]` at the detection layer and the
    processor's media metadata (`image_grid_thw`, `image_sizes`, ...). `decode(id)` gives a token's text; `gate_at`
    is the position the gate reads (`inputs.gate_index`)."""
    ids = [int(t) for t in ids]
    if h.shape[0] != len(ids):
        raise ValueError(f"{h.shape[0]} residuals for {len(ids)} prompt positions")
    n_frames = len(query.video or ())
    sizes = [im.size for im in (query.images or ())] or [f.size for f in (query.video or ())]
    grids, notes = layout_grids(spec, ids, meta, len(query.images or ()), n_frames, sizes)
    kinds = ["text"] * len(ids)
    video_modality = "video" if query.video else "image"
    for g in grids:
        for pos in g.positions[g.positions >= 0].tolist():
            kinds[pos] = "video" if g.kind == "frame" else "image"
    for i, t in enumerate(ids):  # media tokens that no grid holds (newline, class token): still media
        if kinds[i] == "text" and t in (spec.image_token_id, spec.video_token_id):
            kinds[i] = video_modality if (t == spec.video_token_id or query.video) else "image"
    scores, source, more = position_scores(state, options, h, kinds, grids, query.modality)
    for g in grids:
        g.scores = np.where(g.positions >= 0, scores[np.clip(g.positions, 0, None)], np.nan)
    layout_notes = list(dict.fromkeys(notes + [g.note for g in grids if not g.exact and g.note]))
    return InputMap(layer=plan(state, options).detect_layer, recenter=options.recenter,
                    tokens=[decode(t) for t in ids], kinds=kinds, scores=scores, grids=grids, offset_source=source,
                    notes=list(dict.fromkeys(layout_notes + more)), modality=query.modality,
                    layout_notes=layout_notes, h=h.detach().float().cpu(), gate_at=gate_at % len(ids))


def rescore(state, m: InputMap, options: SteerOptions, h: torch.Tensor | None = None,
            layer: int | None = None) -> InputMap:
    """The same map scored with other options (re-centring on / off), from its kept residuals: no model call.

    `h` `[T, d]` and `layer`: score residuals the same prefill kept at another layer (the push layer) on the same
    grids. The per-position offsets are measured at the gate's layer only, so there media tokens are re-centred by the
    mean modality offset, and the map says so. That map is scored along the push's own axis (t_post's), whatever
    position the gate reads at.
    """
    if layer is not None:
        options = replace(options, detect_layer=layer, gate_position="post")
    h = m.h if h is None else h
    if h is None:
        raise ValueError("this map kept no residuals: run the input again")
    if layer is None and plan(state, options).detect_layer != m.layer:
        raise ValueError(f"the map was captured at layer {m.layer}: run the input again to map another layer")
    if h.shape[0] != len(m.kinds):
        raise ValueError(f"{h.shape[0]} residuals for {len(m.kinds)} prompt positions")
    scores, source, more = position_scores(state, options, h, m.kinds, m.grids, m.modality)
    grids = [replace(g, scores=np.where(g.positions >= 0, scores[np.clip(g.positions, 0, None)], np.nan))
             for g in m.grids]
    return replace(m, layer=plan(state, options).detect_layer, recenter=options.recenter, scores=scores, grids=grids,
                   offset_source=source, notes=list(dict.fromkeys(m.layout_notes + more)), h=h)


def input_map(backbone, state, options: SteerOptions, query, seq: dict) -> InputMap:
    """`build_input_map` from a `PairUpdate.seq` (or `capture_prompt_positions`) on a loaded backbone."""
    from ..model.inputs import gate_index

    p = plan(state, options)
    tok = backbone.tokenizer
    return build_input_map(layout_spec(backbone), lambda t: tok.decode([t]), state, options, query,
                           seq["input_ids"].tolist(), seq["h"][p.detect_layer], seq["meta"],
                           gate_at=gate_index(backbone, p.gate_position))


# ---- fit-time statistics -------------------------------------------------------------------------------------------

@torch.inference_mode()
def capture_prompt_positions(backbone, query, layers: Sequence[int]) -> dict:
    """One forward of one query, keeping every position at `layers` (the fit-time pass; a Run uses its prefill)."""
    from ..model.hooks import capture_sequence
    from ..model.inputs import build_batch

    batch = build_batch(backbone, [query])
    with capture_sequence(backbone.layers, layers) as cap:
        backbone.model(**batch, use_cache=False, logits_to_keep=1)
    return {"h": {i: cap[i][0] for i in cap.layers}, "input_ids": batch["input_ids"][0].cpu(),
            "meta": {k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()
                     if k not in ("input_ids", "attention_mask") and not k.startswith("pixel_values")}}


def neutral_position_offsets(backbone, queries: dict[str, Sequence], layer: int, mu_minus: torch.Tensor,
                             progress: Callable[[int, int], None] | None = None
                             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-position offsets at `layer` from neutral inputs (`queries`: modality -> neutral-media queries).

    Returns (cells, tokens): `cells["image.patches"]` `[rows, cols, d]` is the mean residual of each grid cell over
    the neutral inputs minus the safe centroid `mu_minus [d]` (so a neutral image scores 0 in every cell after
    re-centring); `tokens["image"]` `[d]` the same over all media tokens (for tokens no grid view matches).
    """
    spec = layout_spec(backbone)
    cells: dict[str, torch.Tensor] = {}
    tokens: dict[str, torch.Tensor] = {}
    mu = mu_minus.double()
    total, done = sum(len(qs) for qs in queries.values()), 0
    for modality, qs in queries.items():
        acc: dict[str, list[torch.Tensor]] = {}
        toks: list[torch.Tensor] = []
        for q in qs:
            seq = capture_prompt_positions(backbone, q, [layer])
            h = seq["h"][layer].double()  # [T, d]
            ids = seq["input_ids"].tolist()
            grids, _ = layout_grids(spec, ids, seq["meta"], len(q.images), len(q.video or ()),
                                    [im.size for im in q.images] or [f.size for f in (q.video or ())])
            media = [i for i, t in enumerate(ids) if t in (spec.image_token_id, spec.video_token_id)]
            toks.append(h[media])
            for g in grids:
                if not g.exact and g.view in ("sequence", "crop"):
                    continue
                pos = torch.as_tensor(g.positions)
                cell = torch.where((pos >= 0)[..., None], h[pos.clamp(min=0)], torch.nan)  # [r, c, d]
                key = f"{modality}.{g.view}"
                if key in acc and tuple(acc[key][0].shape[:2]) != g.shape:
                    cell = _cell_offsets(torch.nan_to_num(cell), tuple(acc[key][0].shape[:2]))
                acc.setdefault(key, []).append(cell)
            done += 1
            if progress:
                progress(done, total)
        if toks:
            tokens[modality] = (torch.cat(toks).mean(0) - mu).float()
        for key, cs in acc.items():
            cells[key] = (torch.stack(cs).nanmean(0) - mu).nan_to_num().float()
    return cells, tokens


# ---- export ----------------------------------------------------------------------------------------------------------

def map_csv(m: InputMap) -> str:
    """One row per prompt position: position, token, kind, score, and the grid cell(s) it sits in."""
    where: dict[int, list[str]] = {}
    for g in m.grids:
        for (r, c), pos in np.ndenumerate(g.positions):
            if pos >= 0:
                where.setdefault(int(pos), []).append(f"{g.label} r{r} c{c}")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["position", "token", "kind", "score", "cell", "layer", "recentred", "offset"])
    for i, (t, k, s) in enumerate(zip(m.tokens, m.kinds, m.scores, strict=True)):
        w.writerow([i, t, k, f"{float(s):.6g}", "; ".join(where.get(i, [])), m.layer, m.recenter, m.offset_source])
    return buf.getvalue()
