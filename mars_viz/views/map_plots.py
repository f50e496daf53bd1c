"""Figures for "Where in the input": score heatmaps over the image and each sampled video frame, the prompt's tokens
coloured by score, and the occlusion check; Pillow PNGs and CSV for the export. Pure: data in, figure out.

Same look as `plots.py` (its template, height and colours). One diverging colour scale for every map, centred on
0: a score of 0 is the safe centroid (after re-centring, what a neutral solid-colour image gives in that cell), 1 the
unsafe centroid. The scale is symmetric, so the colours of two panels of one figure compare directly.

Example:
    >>> panels = map_panels(imap, images=query.images)                  # doctest: +SKIP
    >>> overlay_figure(panels, "Where in the image")                    # doctest: +SKIP
    >>> sorted(export_files(imap, images=query.images))[:2]             # doctest: +SKIP
    ['map_00_image_1_patches.png', 'map_overlay.html']
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
from PIL import Image, ImageDraw, ImageFont
from plotly.subplots import make_subplots

from ..maps.export import map_csv
from ..maps.layout import Grid
from ..maps.scoring import InputMap
from .export import figure_html
from .figures import COLORS, HEIGHT, TEMPLATE

__all__ = ["MAP_SCALE", "Panel", "export_files", "map_panels", "overlay_figure", "overlay_png", "score_range",
           "token_strip_figure", "token_strip_png"]

MAP_SCALE = [[0.0, COLORS["safe"]], [0.5, "#f8f9fa"], [1.0, COLORS["steered"]]]  # negative, 0, positive
_PANEL_PX = 240  # longest side of an image embedded in a figure (keeps the HTML small)
_PER_ROW = 4
_TOKENS_PER_ROW = 14


@dataclass
class Panel:
    """One image or frame with the grid drawn over it."""

    title: str
    image: Image.Image
    grid: Grid  # its `scores` are what is drawn ([rows, cols], NaN: no token)
    short: str = ""  # the subplot's title, short enough for four panels side by side (the hover has `title`)


def score_range(values: Sequence[float] | np.ndarray, floor: float = 1.0) -> float:
    """Half-width of the symmetric colour range: the largest |score| shown, at least `floor` (the unsafe centroid's
    score), so a map of small scores does not look saturated."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(max(floor, np.abs(v).max() if v.size else 0.0))


def map_panels(m: InputMap, images: Sequence[Image.Image] = (), frames: Sequence[Image.Image] = (),
               frame_labels: Sequence[int] | None = None) -> list[Panel]:
    """One panel per spatial grid: each image's grids, then each sampled frame with the grid covering it (a Qwen
    video token covers two frames: both show it). Grids of unknown region (crops, sequence order) are left out."""
    out = []
    for g in m.grids:
        if g.box is None:
            continue
        if g.kind == "image" and g.index < len(images):
            out.append(Panel(g.label, images[g.index], g))
    for f, frame in enumerate(frames):
        label = f if frame_labels is None or f >= len(frame_labels) else frame_labels[f]
        for g in m.frame_grids():
            if g.box is not None and f in g.frames:
                shared = "" if len(g.frames) == 1 else f" (token shared with frames {g.frames[0]}-{g.frames[-1]})"
                brief = f"frame {f}" + ("" if len(g.frames) == 1 else f" · pair {g.frames[0]}-{g.frames[-1]}")
                out.append(Panel(f"frame {f} (video frame #{label}), {g.view}{shared}", frame, g, brief))
    return out


def _thumb(image: Image.Image, px: int = _PANEL_PX) -> Image.Image:
    im = image.convert("RGB")
    scale = px / max(im.size)
    return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))))


def _data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def overlay_figure(panels: Sequence[Panel], title: str, colorbar: str = "unsafety score", half: float | None = None,
                   notes: Sequence[str] = ()) -> go.Figure:
    """The grids' scores as translucent heatmaps over their images, one subplot per panel, one shared colour scale.

    Hovering a cell gives its score, its row and column and the prompt position of its token.
    """
    n = max(1, len(panels))
    cols = min(_PER_ROW, n)
    rows = math.ceil(n / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[p.short or p.title for p in panels] or None,
                        horizontal_spacing=0.04, vertical_spacing=0.12 / rows)
    every = np.concatenate([p.grid.scores.ravel() for p in panels]) if panels else np.zeros(0)
    h = score_range(every) if half is None else half
    for k, p in enumerate(panels):
        r, c = divmod(k, cols)
        thumb = _thumb(p.image)
        w, ht = thumb.size
        x0, y0, x1, y1 = p.grid.box
        gr, gc = p.grid.shape
        xs = [w * (x0 + (x1 - x0) * (j + 0.5) / gc) for j in range(gc)]
        ys = [ht * (y0 + (y1 - y0) * (i + 0.5) / gr) for i in range(gr)]
        axis = "" if k == 0 else str(k + 1)
        fig.add_layout_image(source=_data_uri(thumb), xref=f"x{axis}", yref=f"y{axis}", x=0, y=0, sizex=w, sizey=ht,
                             xanchor="left", yanchor="top", sizing="stretch", layer="below")
        ii, jj = np.indices((gr, gc))
        custom = np.dstack([p.grid.positions, ii, jj])  # [rows, cols, 3]: prompt position, row, col
        fig.add_trace(go.Heatmap(
            z=p.grid.scores, x=xs, y=ys, customdata=custom, zmid=0, zmin=-h, zmax=h, colorscale=MAP_SCALE,
            opacity=0.6, name=p.title, showscale=k == 0, xgap=1, ygap=1,
            colorbar=dict(title=dict(text=colorbar, side="right"), thickness=12, len=0.8),
            hovertemplate="row %{customdata[1]}, col %{customdata[2]}<br>" + colorbar + " %{z:.3f}<br>prompt "
                          "position %{customdata[0]}<extra>" + p.title + "</extra>"), row=r + 1, col=c + 1)
        fig.update_xaxes(range=[0, w], visible=False, row=r + 1, col=c + 1, constrain="domain")
        fig.update_yaxes(range=[ht, 0], visible=False, row=r + 1, col=c + 1, scaleanchor=f"x{axis}")
    fig.update_layout(template=TEMPLATE, title=dict(text=title, x=0, xanchor="left", font=dict(size=14)),
                      height=max(HEIGHT, 60 + 250 * rows + 22 * len(notes)),
                      margin=dict(l=10, r=10, t=60, b=20 + 22 * len(notes)))
    for i, note in enumerate(notes):
        fig.add_annotation(text=note, x=0, y=-0.02 - 0.06 * i, xref="paper", yref="paper", showarrow=False,
                           xanchor="left", yanchor="top", font=dict(size=11, color="#495057"), name="note")
    if not panels:
        fig.add_annotation(text="no spatial grid for this input", x=0.5, y=0.5, xref="paper", yref="paper",
                           showarrow=False, name="placeholder")
    return fig


def _runs(m: InputMap) -> list[tuple[str, list[int]]]:
    """Text positions one by one; each run of media tokens collapsed into one cell (its mean score)."""
    out: list[tuple[str, list[int]]] = []
    for i, k in enumerate(m.kinds):
        if k != "text" and out and out[-1][0] == k and out[-1][1][-1] == i - 1:
            out[-1][1].append(i)
        else:
            out.append((k, [i]))
    return out


def _token_cells(m: InputMap, newline: str = "⏎") -> list[tuple[str, float, str]]:
    cells = []
    for kind, pos in _runs(m):
        if kind == "text":
            tok = m.tokens[pos[0]]
            shown = tok.replace("\n", newline).replace(" ", "·") or "∅"
            cells.append((shown, float(m.scores[pos[0]]), f"position {pos[0]}: {tok!r}"))
        else:
            cells.append((f"{_MEDIA_TAG.get(kind, kind)}×{len(pos)}", float(np.mean(m.scores[pos])),
                          f"positions {pos[0]}-{pos[-1]}: {len(pos)} {kind} tokens (mean score)"))
    return cells


_MEDIA_TAG = {"image": "img", "video": "vid"}  # a media run's cell: "img×16"
_CELL_CHARS = 7  # what fits in a strip cell at 1280 px (14 per row); the hover has the whole token


def _short(token: str) -> str:
    """A token's label in the strip: cut to `_CELL_CHARS` with an ellipsis, so neighbours never overlap.

    >>> _short("<|vision_start|>"), _short("·bomb")
    ('<|visi…', '·bomb')
    """
    return token if len(token) <= _CELL_CHARS else token[:_CELL_CHARS - 1] + "…"


def token_strip_figure(m: InputMap, title: str = "The prompt, token by token", half: float | None = None
                       ) -> go.Figure:
    """The prompt's tokens in reading order, each coloured by its score (media runs collapsed into one cell with
    their mean); hovering gives the position and the exact score. `half`: the colour range's half-width (default:
    every score of the map, `score_range(m.scores)`, the range the image map uses too, so one colour is one score)."""
    cells = _token_cells(m)
    rows = max(1, math.ceil(len(cells) / _TOKENS_PER_ROW))
    z = np.full((rows, _TOKENS_PER_ROW), np.nan)
    text = np.full((rows, _TOKENS_PER_ROW), "", dtype=object)
    hover = np.full((rows, _TOKENS_PER_ROW), "", dtype=object)
    for k, (shown, s, h) in enumerate(cells):
        r, c = divmod(k, _TOKENS_PER_ROW)
        z[r, c], text[r, c], hover[r, c] = s, _short(shown), h
    half = score_range(m.scores) if half is None else half
    fig = go.Figure(go.Heatmap(z=z, text=text, customdata=hover, texttemplate="%{text}", textfont=dict(size=11),
                               zmid=0, zmin=-half, zmax=half, colorscale=MAP_SCALE, xgap=2, ygap=2, name="tokens",
                               colorbar=dict(title=dict(text="unsafety score", side="right"), thickness=10,
                                             orientation="h", x=0, xanchor="left", y=-0.04, yanchor="top",
                                             len=0.5, nticks=5),
                               hovertemplate="%{customdata}<br>score %{z:.3f}<extra></extra>"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed")
    fig.update_layout(template=TEMPLATE, title=dict(text=title, x=0, xanchor="left", font=dict(size=14)),
                      height=max(170, 130 + 34 * rows), margin=dict(l=10, r=10, t=50, b=60))
    return fig


# ---- Pillow renders for the export (no kaleido) ----------------------------------------------------------------------

def _rgb(hex_colour: str) -> tuple[int, int, int]:
    h = hex_colour.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def _colour(v: float, half: float) -> tuple[int, int, int]:
    """MAP_SCALE at score `v` (symmetric range +-half)."""
    t = min(1.0, max(0.0, 0.5 + 0.5 * v / half)) if half > 0 else 0.5
    (a, ca), (b, cb) = (MAP_SCALE[0], MAP_SCALE[1]) if t <= 0.5 else (MAP_SCALE[1], MAP_SCALE[2])
    u = (t - a) / (b - a)
    x, y = _rgb(ca), _rgb(cb)
    return tuple(round(x[i] + (y[i] - x[i]) * u) for i in range(3))


def _scale_bar(draw: ImageDraw.ImageDraw, x: int, y: int, width: int, half: float, label: str) -> None:
    font = ImageFont.load_default()
    for i in range(width):
        draw.line([(x + i, y), (x + i, y + 10)], fill=_colour(-half + 2 * half * i / max(width - 1, 1), half))
    draw.text((x, y + 12), f"{-half:.2f}", fill=(33, 37, 41), font=font)
    draw.text((x + width // 2 - 3, y + 12), "0", fill=(33, 37, 41), font=font)
    draw.text((x + width - 30, y + 12), f"{half:.2f}", fill=(33, 37, 41), font=font)
    draw.text((x + width + 8, y), label, fill=(33, 37, 41), font=font)


def overlay_png(panel: Panel, half: float | None = None, px: int = 448, label: str = "unsafety score") -> bytes:
    """PNG of one panel: the image, each cell's colour at 55% over it, a thin cell outline, the scale below."""
    img = _thumb(panel.image, px)
    w, h = img.size
    half = score_range(panel.grid.scores) if half is None else half
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    x0, y0, x1, y1 = panel.grid.box
    gr, gc = panel.grid.shape
    for (r, c), s in np.ndenumerate(panel.grid.scores):
        if not math.isfinite(s):
            continue
        box = [w * (x0 + (x1 - x0) * c / gc), h * (y0 + (y1 - y0) * r / gr),
               w * (x0 + (x1 - x0) * (c + 1) / gc) - 1, h * (y0 + (y1 - y0) * (r + 1) / gr) - 1]
        draw.rectangle(box, fill=(*_colour(float(s), half), 140), outline=(255, 255, 255, 90))
    canvas = Image.new("RGB", (w, h + 48), "white")
    canvas.paste(Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB"), (0, 0))
    d = ImageDraw.Draw(canvas)
    _scale_bar(d, 6, h + 8, min(200, w - 120) if w > 160 else w - 12, half, label)
    d.text((6, h + 34), panel.title[:80], fill=(73, 80, 87), font=ImageFont.load_default())
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def token_strip_png(m: InputMap, width: int = 900) -> bytes:
    """PNG of the token strip: tokens in reading order on their score colour, wrapped, with the scale below."""
    font = ImageFont.load_default()
    half = score_range(m.scores)
    cells = _token_cells(m, newline="\\n")  # Pillow's default font has no "⏎"
    x, y, line = 6, 6, 18
    placed = []
    for shown, s, _ in cells:
        tw = int(font.getlength(shown)) + 8
        if x + tw > width - 6:
            x, y = 6, y + line + 4
        placed.append((x, y, tw, shown, s))
        x += tw + 3
    canvas = Image.new("RGB", (width, y + line + 44), "white")
    d = ImageDraw.Draw(canvas)
    for x, y, tw, shown, s in placed:
        d.rectangle([x, y, x + tw, y + line], fill=_colour(s, half))
        d.text((x + 4, y + 3), shown, fill=(33, 37, 41), font=font)
    _scale_bar(d, 6, canvas.height - 34, 200, half, f"unsafety score at layer {m.layer}")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def export_files(m: InputMap, images: Sequence[Image.Image] = (), frames: Sequence[Image.Image] = (),
                 frame_labels: Sequence[int] | None = None) -> dict[str, bytes]:
    """Everything the Export zip holds for the maps: the per-position CSV, a PNG per panel and of the token strip,
    and the two interactive figures (HTML, loading plotly.js from beside them)."""
    panels = map_panels(m, images, frames, frame_labels)
    half = score_range(np.concatenate([p.grid.scores.ravel() for p in panels])) if panels else None
    out = {"map_positions.csv": map_csv(m).encode(), "map_tokens.png": token_strip_png(m),
           "map_tokens.html": figure_html(token_strip_figure(m), shared_js=True).encode()}
    if panels:
        out["map_overlay.html"] = figure_html(overlay_figure(panels, "Where in the input", notes=m.notes),
                                              shared_js=True).encode()
    for k, p in enumerate(panels):
        slug = "".join(ch if ch.isalnum() else "_" for ch in p.title.split(",")[0].split(" (")[0]).strip("_")
        out[f"map_{k:02d}_{slug}_{p.grid.view}.png"] = overlay_png(p, half)
    return out
