""""What the model sees": the input's images, or a video's sampled frames, as one HTML block (pure; no model).

Each picture is an `<img>` sized by the browser to fit its box while keeping its aspect ratio (never cropped), with
its caption *below* it, never over it. A video's frames are numbered as the maps number them (frame 0, 1, ...: the
order they were sampled in), and each caption also gives the frame's index in the file, so the "Video frames" bars,
the maps and this strip name a frame the same way.

Example:
    >>> from PIL import Image
    >>> html = seen_html(frames=[Image.new("RGB", (64, 32))] * 2, frame_indices=[0, 12])
    >>> html.count("<img"), "frame 1 · file #12" in html
    (2, True)
"""

from __future__ import annotations

import base64
import html as _html
import io
from collections.abc import Sequence

from PIL import Image

__all__ = ["CSS", "frame_caption", "seen_html"]

MAX_PX = 960  # longest side sent to the page (a screen's worth; the model itself got the full image)
IMAGE_MAX_H = 340  # px: one image's height limit in the page
FRAMES_PER_ROW = 4  # a video's frames, four to a row: big enough to read words drawn on them

# the page's style for the block (the app adds it to its CSS)
CSS = (
          ".mv-seen{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start;margin:0;padding:4px 0}"
          ".mv-seen figure{margin:0;display:flex;flex-direction:column;align-items:center;min-width:0}"
          ".mv-seen img{display:block;max-width:100%;height:auto;width:auto;border:1px solid #dee2e6;"
          "border-radius:4px;background:#f8f9fa}"
          f".mv-seen .mv-image img{{max-height:{IMAGE_MAX_H}px}}"
          f".mv-seen .mv-frame{{flex:0 0 calc((100% - {10 * (FRAMES_PER_ROW - 1)}px) / {FRAMES_PER_ROW})}}"
          ".mv-seen .mv-frame img{width:100%}"
          ".mv-seen figcaption{font-size:13px;color:#495057;margin-top:3px;text-align:center}")


def _data_uri(image: Image.Image) -> str:
    im = image.convert("RGBA" if image.mode in ("RGBA", "LA", "P") else "RGB")
    if max(im.size) > MAX_PX:
        im = im.copy()
        im.thumbnail((MAX_PX, MAX_PX))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def frame_caption(k: int, frame_indices: Sequence[int] | None = None) -> str:
    """A sampled frame's name on the page: "frame k", plus its index in the file when that differs.

    >>> frame_caption(3, [0, 4, 8, 12]), frame_caption(2)
    ('frame 3 · file #12', 'frame 2')
    """
    if frame_indices is None or int(frame_indices[k]) == k:
        return f"frame {k}"
    return f"frame {k} · file #{int(frame_indices[k])}"


def _figure(image: Image.Image, caption: str, kind: str) -> str:
    w, h = image.size
    return (f'<figure class="mv-{kind}"><img src="{_data_uri(image)}" alt="{_html.escape(caption)}" '
            f'data-width="{w}" data-height="{h}"><figcaption>{_html.escape(caption)} ({w}×{h})</figcaption></figure>')


def seen_html(images: Sequence[Image.Image] = (), frames: Sequence[Image.Image] = (),
              frame_indices: Sequence[int] | None = None) -> str:
    """The HTML of "What the model sees": each image whole (at most `IMAGE_MAX_H` px high), or a video's sampled
    frames `FRAMES_PER_ROW` to a row, each with its caption below it. Empty input: a one-line hint."""
    if frame_indices is not None and len(frame_indices) != len(frames):
        raise ValueError(f"{len(frames)} frames but {len(frame_indices)} frame indices")
    parts = [_figure(im, f"image {i + 1}" if len(images) > 1 else "image", "image") for i, im in enumerate(images)]
    parts += [_figure(f, frame_caption(k, frame_indices), "frame") for k, f in enumerate(frames)]
    if not parts:
        return '<div class="mv-seen"><p>Text only: no image or video in this input.</p></div>'
    return '<div class="mv-seen">' + "".join(parts) + "</div>"
