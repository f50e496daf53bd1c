"""Images and videos in, clean RGB frames out; plus the neutral inputs MARS uses to measure the modality offset.

Everything a user uploads passes through here first, so every failure becomes a `ValueError` that says what was
wrong and what to do. Nothing here knows about models.

Example:
    >>> from mars_viz.model.media import neutral_images
    >>> [im.size for im in neutral_images(2, size=32)]
    [(32, 32), (32, 32)]
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, ImageSequence, UnidentifiedImageError

__all__ = [
    "wrap_words",
    "MAX_IMAGE_SIDE",
    "MAX_IMAGE_PIXELS",
    "MAX_VIDEO_SECONDS",
    "Video",
    "load_image",
    "prepare_image",
    "read_video",
    "neutral_images",
    "neutral_video",
    "typographic_image",
    "typographic_rows",
]

MAX_IMAGE_SIDE = 1024  # longest side after loading; processors downsize further
MAX_IMAGE_PIXELS = 64_000_000  # decompression-bomb guard (PIL's own default warns at 89M)
MAX_VIDEO_SECONDS = 600.0  # only the first 10 minutes of a video are sampled
MAX_VIDEO_FRAMES = 64  # frames per clip fed to a model
MAX_ASPECT = 20.0  # longer/shorter side; extreme strips are letterboxed (some processors reject ratios > 200)


def prepare_image(image: Image.Image, max_side: int = MAX_IMAGE_SIDE) -> Image.Image:
    """Any PIL image -> an RGB image no larger than `max_side`, upright (EXIF orientation applied).

    Handles palette, RGBA/LA (composited on white), CMYK, 16/32-bit greyscale (rescaled to 8 bits), float images
    and animated images (first frame).
    """
    if getattr(image, "is_animated", False):
        image = next(iter(ImageSequence.Iterator(image))).copy()
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # broken EXIF must not lose the picture
        pass
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        image = Image.fromarray(np.nan_to_num(arr).astype(np.uint8), mode="L")
    elif mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    if min(image.size) < 1:
        raise ValueError("the image has no pixels")
    w, h = image.size
    if max(w, h) / min(w, h) > MAX_ASPECT:  # letterbox onto white so the ratio is at most MAX_ASPECT
        size = (w, max(h, int(w / MAX_ASPECT) + 1)) if w > h else (max(w, int(h / MAX_ASPECT) + 1), h)
        canvas = Image.new("RGB", size, "white")
        canvas.paste(image, ((size[0] - w) // 2, (size[1] - h) // 2))
        image = canvas
    return image


def load_image(source: str | os.PathLike | bytes | Image.Image, max_side: int = MAX_IMAGE_SIDE) -> Image.Image:
    """Open an image file (or bytes, or a PIL image) safely and return it via `prepare_image`.

    Raises ValueError for empty, corrupt, truncated, non-image files and decompression bombs.
    """
    if isinstance(source, Image.Image):
        return prepare_image(source, max_side)
    name = "the uploaded bytes" if isinstance(source, bytes) else f"{Path(source).name!r}"
    data = source if isinstance(source, bytes) else None
    if data is None:
        p = Path(source)
        if not p.is_file():
            raise ValueError(f"image file {str(p)!r} does not exist")
        if p.stat().st_size == 0:
            raise ValueError(f"image {name} is empty (0 bytes): upload a PNG, JPEG, WebP, GIF or BMP file")
        data = p.read_bytes()
    elif len(data) == 0:
        raise ValueError("the image is empty (0 bytes)")
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return prepare_image(im, max_side)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"image {name} is too large to decode safely ({e}); the limit is "
                         f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels") from None
    except UnidentifiedImageError:
        raise ValueError(f"{name} is not an image PIL can read (corrupt, or another file type with an image "
                         "extension): upload a PNG, JPEG, WebP, GIF or BMP file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ValueError(f"image {name} is corrupt or truncated ({e})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old


@dataclass
class Video:
    """Frames sampled uniformly from a video file, with what was done to get them."""

    frames: list[Image.Image]  # RGB, already capped by prepare_image
    indices: list[int]  # frame indices in the file
    fps: float
    total_frames: int
    notes: list[str] = field(default_factory=list)  # caps applied, say so in the UI

    @property
    def duration_s(self) -> float:
        return self.total_frames / self.fps if self.fps > 0 else 0.0


def read_video(path: str | os.PathLike, num_frames: int = 8, max_seconds: float = MAX_VIDEO_SECONDS,
               max_side: int = MAX_IMAGE_SIDE) -> Video:
    """Sample `num_frames` frames uniformly (segment centres) with decord.

    Only the first `max_seconds` are sampled; a clip shorter than `num_frames` gives every frame it has.
    Raises ValueError for a missing, empty or undecodable file, or one with no frames.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if num_frames > MAX_VIDEO_FRAMES:
        raise ValueError(f"num_frames={num_frames} is more than the cap of {MAX_VIDEO_FRAMES}")
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"video file {str(p)!r} does not exist")
    if p.stat().st_size == 0:
        raise ValueError(f"video {p.name!r} is empty (0 bytes): upload an MP4, WebM, AVI or MKV file")
    import decord

    try:
        reader = decord.VideoReader(str(p), ctx=decord.cpu(0), num_threads=1)
        total = len(reader)
        fps = float(reader.get_avg_fps() or 0.0)
    except Exception as e:  # decord raises DECORDError / RuntimeError with C++ text
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValueError(f"{p.name!r} is not a video decord can read (corrupt, truncated or not a video): "
                         f"{first}") from None
    if total <= 0:
        raise ValueError(f"video {p.name!r} has no frames")
    notes: list[str] = []
    usable = total
    if fps > 0 and total / fps > max_seconds:
        usable = max(1, int(max_seconds * fps))
        notes.append(f"video is {total / fps:.0f}s long; only the first {max_seconds:.0f}s were sampled")
    n = min(num_frames, usable)
    if n < num_frames:
        notes.append(f"video has only {usable} frames; using all of them instead of {num_frames}")
    indices = [int((i + 0.5) * usable / n) for i in range(n)]
    try:
        arr = list(reader.get_batch(indices).asnumpy())  # [n, H, W, 3] uint8
    except Exception as e:
        # decord 0.6 fails to convert some frame sizes whose rows are padded (an MP4 48 px wide: "from_size ==
        # to_size (9216 vs. 6912)"); PyAV decodes the same file, so it gets a second try before we give up
        arr = _frames_pyav(p, indices)
        if arr is None:
            raise ValueError(f"could not decode frames of {p.name!r} (truncated file?): {str(e)[:200]}") from None
    frames = [prepare_image(Image.fromarray(a), max_side) for a in arr]
    return Video(frames=frames, indices=indices, fps=fps, total_frames=total, notes=notes)


def _frames_pyav(p: Path, indices: list[int]) -> list[np.ndarray] | None:
    """The frames at `indices` (ascending) of the file's first video stream, decoded with PyAV as RGB arrays; None
    when PyAV cannot read them all."""
    try:
        import av

        wanted, out = set(indices), {}
        with av.open(str(p)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    out[i] = frame.to_ndarray(format="rgb24")
                if i >= indices[-1]:
                    break
        return [out[i] for i in indices] if len(out) == len(wanted) else None
    except Exception:  # noqa: BLE001 - whatever PyAV says, decord's error is the one reported
        return None


def _colours(k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(k, 3), dtype=np.int64)


def neutral_images(k: int = 16, seed: int = 0, size: int = 224) -> list[Image.Image]:
    """K random solid-colour images: inputs that carry 'image-ness' and nothing else."""
    if k < 1:
        raise ValueError("need at least one neutral image (k >= 1)")
    return [Image.new("RGB", (size, size), tuple(int(c) for c in col)) for col in _colours(k, seed)]


def neutral_video(num_frames: int = 8, seed: int = 0, size: int = 224) -> list[Image.Image]:
    """A neutral 'video': `num_frames` random solid-colour frames (seeded)."""
    return neutral_images(num_frames, seed=seed, size=size)


def wrap_words(draw: ImageDraw.ImageDraw, words: Sequence[str], font, max_width: float) -> list[str]:
    """Greedy line breaking: `words` into lines no wider than `max_width` px in `font` (a longer word gets its own
    line).

    >>> from PIL import Image, ImageDraw, ImageFont
    >>> wrap_words(ImageDraw.Draw(Image.new("RGB", (1, 1))), ["a", "b"], ImageFont.load_default(), 1000)
    ['a b']
    """
    lines, line = [], ""
    for w in words:
        trial = f"{line} {w}".strip()
        if line and draw.textlength(trial, font=font) > max_width:
            lines.append(line)
            line = w
        else:
            line = trial
    if line:
        lines.append(line)
    return lines


ROW = 28  # one merged Qwen2-VL token: the rows layout puts each line of text on one row of tokens


def typographic_rows(text: str, size: int = 448, font_size: int = 18, numbered_steps: int = 0
                     ) -> tuple[Image.Image, list[tuple[str, float, float, float]]]:
    """Text laid out on the 28-px token rows (the reading graft reads each row of merged tokens as a line): one line
    per row band, its glyphs centred in the band, one row of margin above and one cell at either side; `size` is
    rounded to a multiple of 28. Returns the image and every word's box (word, x0, x1, vertical centre), in reading
    order.

    >>> im, boxes = typographic_rows("red boat", size=112)
    >>> im.size, [b[0] for b in boxes], boxes[0][3] == 28 + 14
    ((112, 112), ['red', 'boat'], True)
    """
    size = max(4 * ROW, round(size / ROW) * ROW)
    im = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default(size=font_size)
    lines = wrap_words(draw, text.split(), font, size - 2 * ROW)
    lines += [f"{i}." for i in range(1, numbered_steps + 1)]
    boxes: list[tuple[str, float, float, float]] = []
    for k, line in enumerate(lines[:size // ROW - 1]):
        _, top, _, bottom = font.getbbox(line)
        yc = ROW * (k + 1) + ROW / 2
        draw.text((ROW, yc - (top + bottom) / 2), line, fill="black", font=font)
        words = line.split(" ")
        for j, w in enumerate(words):
            x0 = ROW + (draw.textlength(" ".join(words[:j]) + " ", font=font) if j else 0.0)
            boxes.append((w, x0, x0 + draw.textlength(w, font=font), yc))
    return im, boxes


def typographic_image(text: str, size: int = 448, margin: int = 16, numbered_steps: int = 0,
                      layout: str = "free") -> Image.Image:
    """Render `text` as black-on-white typography (FigStep-style when `numbered_steps` > 0 adds empty items 1..n).

    `layout="rows"` puts the lines on the 28-px token rows (`typographic_rows`), which the reading graft reads
    best; "free" is plain typesetting."""
    if layout == "rows":
        return typographic_rows(text, size=size, numbered_steps=numbered_steps)[0]
    if layout != "free":
        raise ValueError(f"layout must be 'free' or 'rows', not {layout!r}")
    im = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(im)
    try:
        font = ImageFont.load_default(size=max(12, size // 18))
    except TypeError:  # very old Pillow
        font = ImageFont.load_default()
    lines = wrap_words(draw, text.split(), font, size - 2 * margin)
    lines += [f"{i}." for i in range(1, numbered_steps + 1)]
    step = int(font.size * 1.35) if hasattr(font, "size") else 16
    for i, ln in enumerate(lines):
        draw.text((margin, margin + i * step), ln, fill="black", font=font)
    return im
