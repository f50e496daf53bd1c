"""Where the media tokens sit: the per-family position layouts that place a prompt's image and video tokens on
2-D grids (`Grid`) over the image's patches and the video's frames. Which family a model type follows is the
architecture registry's (`model.archs.ArchSpec.maps`); the families, by the model types that use them today:

  qwen       (qwen2_vl, qwen2_5_vl, mars_reader, qwen3_vl) `image_grid_thw` / `video_grid_thw` /
             `spatial_merge_size`: one token per merged 2x2 patch, a video token covers `temporal_patch_size`
             consecutive frames (flagged: not per frame)
  llava      (llava, paligemma) the patch grid of each image (LLaVA-1.5: of the centre crop; the class token, if
             kept, is not placed)
  onevision  (llava_onevision, llava_next, llava_next_video) the base grid, then the anyres tiles stitched and
             unpadded (traced through the model's own `pack_image_features`; downsampled tiles are flagged); video:
             frames x pooled grid (OneVision: bilinear to half the side, one closing newline; LLaVA-NeXT-Video: the
             config's `spatial_pool_stride`, no newline)
  idefics3   (idefics3, smolvlm) `<row_r_col_c>` tiles stitched into one grid, plus the `<global-img>` grid;
             SmolVLM's video is one `<global-img>` grid per frame, in image tokens
  gemma3     (gemma3) the pooled `mm_tokens_per_image` grid (pan-and-scan crops: region unknown, flagged)
  internvl   (internvl) `<img> ... </img>` per image: its tiles (the image processor's tiled canvas) stitched into
             one grid, then the thumbnail; a video is one such single-tile image per frame, in image tokens
  pixtral    (mistral3) rows of merged patches separated by `[IMG_BREAK]`, each image closed by `[IMG_END]`

A native video whose tokens are image tokens (no video token in the prompt: SmolVLM, InternVL) is placed as frames,
as for a model that takes a video's frames as images.

Everything except `layout_spec` (which reads the processor, config and model) is pure: ids and metadata in, grids
out. Where a mapping is not exact, the grid says so (`exact=False` and a note) instead of guessing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..model.archs import arch_spec
from ..model.inputs import media_token_ids

__all__ = ["Grid", "LayoutSpec", "layout_grids", "layout_spec"]

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


# ---- the layout table -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayoutSpec:
    """What the layout needs to know about one model (read once by `layout_spec`; everything after is pure)."""

    family: str  # an `archs.MapsFamily`: "qwen", "llava", "onevision", ... or "" (unknown: in sequence order)
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
    video_newline: bool = True  # onevision: a newline token closes the video (OneVision; not LLaVA-NeXT-Video)
    trace: Callable[[dict, int], list[np.ndarray]] | None = None  # onevision: per image, the packed order codes
    # internvl: (width, height) of an image -> (columns, rows) of its tiles (the image processor's canvas)
    tiling: Callable[[tuple[int, int]], tuple[int, int]] | None = None
    start_id: int | None = None  # internvl: <img>
    end_id: int | None = None  # internvl: </img>; pixtral: [IMG_END]
    break_id: int | None = None  # pixtral: [IMG_BREAK]


def _tok(tokenizer, token: str) -> int | None:
    i = tokenizer.convert_tokens_to_ids(token)
    return None if i is None or i == tokenizer.unk_token_id else int(i)


def _onevision_trace(model) -> Callable[[dict, int], list[np.ndarray]]:
    """Run the model's own `pack_image_features` on index codes instead of features: code k + 1 is patch k // (h*w)
    (0 = base, then the anyres tiles), cell k % (h*w); -1 is a newline token; a non-integer code was resampled.
    The model's own module gives `image_size_to_num_patches` (LLaVA-NeXT, -NeXT-Video and OneVision each have one),
    and `pack_image_features` gets the keywords its signature takes."""
    import inspect
    import sys

    cfg, inner = model.config, model.model
    image_size_to_num_patches = getattr(sys.modules[type(inner).__module__], "image_size_to_num_patches", None)
    if image_size_to_num_patches is None:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
    takes = inspect.signature(inner.pack_image_features).parameters
    extra = {}
    if "vision_aspect_ratio" in takes:
        extra["vision_aspect_ratio"] = getattr(cfg, "vision_aspect_ratio", "anyres_max_9")
    if "vision_feature_select_strategy" in takes:
        extra["vision_feature_select_strategy"] = getattr(cfg, "vision_feature_select_strategy", "default")
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
                                              **extra)
        return [p[:, 0].numpy() for p in packed]

    return trace


def _size(d, key: str):
    """A processor size field (`dict` or transformers' `SizeDict`), None when absent."""
    if d is None:
        return None
    return d.get(key) if isinstance(d, dict) else getattr(d, key, None)


def _qwen_spec(backbone, base: dict) -> LayoutSpec:
    vc = backbone.model.config.vision_config
    return LayoutSpec("qwen", merge=int(vc.spatial_merge_size), temporal_patch=int(vc.temporal_patch_size), **base)


def _llava_spec(backbone, base: dict) -> LayoutSpec:
    ip = backbone.processor.image_processor
    crop = None
    edge = _size(getattr(ip, "size", None), "shortest_edge")
    cw, ch = (_size(getattr(ip, "crop_size", None), k) for k in ("width", "height"))
    if getattr(ip, "do_center_crop", False) and edge and cw and ch:
        crop = (int(edge), int(cw), int(ch))
    return LayoutSpec("llava", crop=crop, **base)


def _onevision_spec(backbone, base: dict) -> LayoutSpec:
    cfg = backbone.model.config
    vc = cfg.vision_config
    side = vc.image_size // vc.patch_size
    stride = getattr(cfg, "spatial_pool_stride", None)  # LLaVA-NeXT-Video's resampler: pooled by the stride
    grid = side // int(stride) if stride else math.ceil(side / 2)  # OneVision: bilinear to half the side
    return LayoutSpec("onevision", base_side=side, video_grid=(grid, grid), video_newline=not stride,
                      trace=_onevision_trace(backbone.model), **base)


def _idefics3_spec(backbone, base: dict) -> LayoutSpec:
    proc, tok = backbone.processor, backbone.tokenizer
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


def _gemma3_spec(backbone, base: dict) -> LayoutSpec:
    return LayoutSpec("gemma3", **base)


def _internvl_spec(backbone, base: dict) -> LayoutSpec:
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    proc, ip = backbone.processor, backbone.processor.image_processor
    size = getattr(ip, "size", None)
    th, tw = int(_size(size, "height") or 0), int(_size(size, "width") or 0)
    lo, hi = int(getattr(ip, "min_patches", 1) or 1), int(getattr(ip, "max_patches", 1) or 1)
    crop = bool(getattr(ip, "crop_to_patches", False)) and hi > 1 and th > 0 and tw > 0

    def tiling(wh: tuple[int, int]) -> tuple[int, int]:
        if not crop:
            return 1, 1
        return tuple(get_optimal_tiled_canvas((wh[1], wh[0]), (th, tw), lo, hi))

    return LayoutSpec("internvl", seq_len=int(proc.image_seq_length), tiling=tiling,
                      start_id=getattr(proc, "start_image_token_id", None),
                      end_id=getattr(proc, "end_image_token_id", None), **base)


def _pixtral_spec(backbone, base: dict) -> LayoutSpec:
    proc, tok = backbone.processor, backbone.tokenizer
    return LayoutSpec("pixtral", break_id=_tok(tok, getattr(proc, "image_break_token", "[IMG_BREAK]")),
                      end_id=_tok(tok, getattr(proc, "image_end_token", "[IMG_END]")), **base)


# layout family (`ArchSpec.maps`) -> what reads that family's facts off the loaded model and processor
_FAMILY_SPECS: dict[str, Callable[[object, dict], LayoutSpec]] = {
    "qwen": _qwen_spec, "llava": _llava_spec, "onevision": _onevision_spec, "idefics3": _idefics3_spec,
    "gemma3": _gemma3_spec, "internvl": _internvl_spec, "pixtral": _pixtral_spec,
}


def layout_spec(backbone) -> LayoutSpec:
    """The layout facts of a loaded `Backbone` (the only transformers-specific part of the maps). Its family is the
    architecture registry's (`archs.ArchSpec.maps`); a type without one gets its media tokens in sequence order."""
    img, vid = media_token_ids(backbone)
    base = dict(model_type=backbone.model_type, image_token_id=img, video_token_id=vid,
                video_mode=backbone.video_mode)
    build = _FAMILY_SPECS.get(arch_spec(backbone.model_type).maps)
    return LayoutSpec("", **base) if build is None else build(backbone, base)


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


def _onevision(spec: LayoutSpec, img: list[int], vid: list[int], meta: dict, n_images: int, n_frames: int,
               kind: str = "image"):
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
                grids.append(Grid(kind, i, "base", _grid(pos[:nb], spec.base_side, spec.base_side),
                                  note="the newline token after the grid is not placed"))
                continue
            grids.append(Grid(kind, i, "base", _grid(pos[:nb], spec.base_side, spec.base_side)))
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
            grids.append(Grid(kind, i, "tiles", np.asarray(rows, dtype=np.int64), exact=exact,
                              note="anyres tiles, stitched and unpadded; the newline token ending each row is not "
                                   "placed" + ("" if exact else "; the tiles were downsampled (bilinear), so each "
                                               "cell mixes neighbouring patches")))
    if vid:
        gh, gw = spec.video_grid
        per, closing = gh * gw, int(spec.video_newline)
        fed = (len(vid) - closing) // per  # frames the processor got (n_frames, or one more where made even)
        if per < 1 or fed * per + closing != len(vid) or fed not in (n_frames, n_frames + 1):
            return None
        for f in range(fed):
            dup = f >= n_frames
            grids.append(Grid("frame", min(f, n_frames - 1), "frames", _grid(vid[f * per:(f + 1) * per], gh, gw),
                              frames=(min(f, n_frames - 1),),
                              note=("a repeat of the last frame (the frame count is made even); " if dup else "")
                              + ("2x2 bilinear pooling of the frame's patches; the closing newline token is not "
                                 "placed" if closing else "the frame's patches, pooled")))
    return grids


def _internvl(spec: LayoutSpec, ids: Sequence[int], img: list[int], n_images: int, sizes: list[tuple[int, int]],
              kind: str):
    """`<img>` + tiles x `seq_len` tokens (+ the thumbnail, when there is more than one tile) + `</img>` per image."""
    s = _square(spec.seq_len)
    if s is None or spec.tiling is None:
        return None
    runs = _runs(img)
    if len(runs) != n_images or any(len(r) % spec.seq_len for r in runs):
        return None
    grids = []
    for i, run in enumerate(runs):
        if spec.start_id is not None and (run[0] == 0 or ids[run[0] - 1] != spec.start_id):
            return None
        if spec.end_id is not None and (run[-1] + 1 >= len(ids) or ids[run[-1] + 1] != spec.end_id):
            return None
        n = len(run) // spec.seq_len
        tiles = [run[k * spec.seq_len:(k + 1) * spec.seq_len] for k in range(n)]
        if n == 1:
            grids.append(Grid(kind, i, "patches", _grid(tiles[0], s, s)))
            continue
        if i >= len(sizes):
            return None
        cols, rows = spec.tiling(sizes[i])
        if cols * rows != n - 1:
            return None
        pos = np.full((rows * s, cols * s), -1, dtype=np.int64)
        for k, tile in enumerate(tiles[:-1]):  # row-major tiles of the canvas, then the thumbnail
            r, c = divmod(k, cols)
            pos[r * s:(r + 1) * s, c * s:(c + 1) * s] = _grid(tile, s, s)
        grids.append(Grid(kind, i, "tiles", pos, note="the image resized to the tiled canvas (aspect ratio changed)"))
        grids.append(Grid(kind, i, "global", _grid(tiles[-1], s, s), note="the thumbnail: the whole image, resized"))
    return grids


def _pixtral(spec: LayoutSpec, ids: Sequence[int], n_images: int, kind: str):
    """Rows of image tokens, each row ended by `[IMG_BREAK]` and the image by `[IMG_END]`."""
    if spec.end_id is None or spec.break_id is None:
        return None
    grids: list[Grid] = []
    rows: list[list[int]] = []
    row: list[int] = []
    for i, t in enumerate(ids):
        if t == spec.image_token_id:
            row.append(i)
        elif t in (spec.break_id, spec.end_id) and (row or rows):
            rows.append(row)
            row = []
            if t == spec.end_id:
                if len({len(r) for r in rows}) != 1 or not rows[0]:
                    return None
                grids.append(Grid(kind, len(grids), "patches", np.asarray(rows, dtype=np.int64),
                                  note="the [IMG_BREAK] token ending each row and the closing [IMG_END] are not "
                                       "placed"))
                rows = []
        elif row:  # an image token run not closed by a break or an end: not this layout
            return None
    if row or rows or len(grids) != n_images:
        return None
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
    # frames given as images, or a native video whose tokens are image tokens (SmolVLM, InternVL): frames either way
    frames_as_images = n_frames > 0 and (spec.video_mode != "native" or not vid)
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
        grids = _onevision(spec, img, vid, meta, n_img, n_frames, kind)
    elif spec.family == "internvl":
        grids = _internvl(spec, ids, img, n_img, list(sizes), kind)
    elif spec.family == "pixtral":
        grids = _pixtral(spec, ids, n_img, kind)
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
