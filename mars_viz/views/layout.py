"""Where the text goes on a figure: the label-layout engine and the named reference lines and bands.

``_label_rows`` packs text labels into rows so that no two in a row overlap
(widths estimated from the text length on the narrowest plot the dashboard
draws), and ``_place_labels`` draws them as annotations from the top (or the
bottom) of the plot; ``_vline`` / ``_hline`` / ``_vrect`` add named threshold
lines and shaded bands (``fig.layout.shapes``) for the figures in `figures`;
``wrap_text`` breaks a long title or message into lines that fit a figure of a
given width (plotly never wraps text itself: a long title is cut at the edge).
Pure plotly: no model, no gradio.

Example:
    >>> import plotly.graph_objects as go  # doctest: +SKIP
    >>> fig = go.Figure()  # doctest: +SKIP
    >>> _vline(fig, 0.5, "tau")  # doctest: +SKIP
    >>> _place_labels(fig, [_Label(0.5, "τ = 0.50", "tau")], (0.0, 1.0))  # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import plotly.graph_objects as go

_LINE_GREY = "#6c757d"

# Figure widths at 1280 px, the narrowest window the dashboard is laid out for (measured in chromium): the Explore
# plots' column, a plot beside another in it (Trust region's plane and t* curve), and Evaluate's two charts.
WIDE_FIG_PX = 800
NARROW_FIG_PX = 400
HALF_FIG_PX = 580
_EM = 0.5  # average width of a character in em (plotly's Open Sans measures ~0.45), with room to spare
TITLE_FONT_PX = 16.8  # plotly's default title size (1.4 x the 12 px base font)
_LINE_PX = 1.3  # one line of text, in em (plotly: ~1.25)


def wrap_text(text: str, width_px: float, font_px: float = TITLE_FONT_PX) -> str:
    """``text`` with ``<br>`` between words wherever a line would run wider than ``width_px`` (estimated from the
    character count, an overestimate: a line breaks early rather than runs off the figure). Breaks already in the
    text (``<br>``) are kept; a single word longer than a line stays whole, and so does a line with markup (``<sup>``,
    ``<b>``...), which its author laid out.

    >>> wrap_text("Occlusion: the gate's score minus the covered score", 200, 14)
    "Occlusion: the gate's score<br>minus the covered score"
    >>> wrap_text("short", 200)
    'short'
    """
    per_line = max(8, int(width_px / (font_px * _EM)))
    lines: list[str] = []
    for part in re.split(r"<br\s*/?>", text):
        if "<" in part:
            lines.append(part)
            continue
        line = ""
        for word in part.split():
            if line and len(line) + 1 + len(word) > per_line:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        lines.append(line)
    return "<br>".join(lines)


def text_lines(text: str) -> int:
    """How many lines ``text`` takes (``<br>`` breaks)."""
    return 1 + len(re.findall(r"<br\s*/?>", text)) if text else 0


def title_layout(title: str, width_px: float = WIDE_FIG_PX, font_px: float = TITLE_FONT_PX, top: int = 50
                 ) -> tuple[dict, int]:
    """A figure title wrapped to fit a figure ``width_px`` wide, and the top margin it needs (``top``, plus one
    line's height for each line the wrapping adds): ``(title dict, margin top)``. A one-line title keeps plotly's
    place; a wrapped one sits on the plot's top edge and may push the margin further (``automargin``): placed in
    the margin as usual, plotly grows a multi-line title downward from its first line, over the plot, or (anchored
    at its top) up past the figure's edge.

    >>> title_layout("A short title")[1]
    50
    >>> t, top = title_layout("a " * 80, 400)
    >>> top > 50 and t["text"].count("<br>") >= 2 and t["yref"] == "paper"
    True
    """
    # the title starts 5% in from the left (the template's title x) and must end before the right margin
    text = wrap_text(title, width_px * 0.95 - 25, font_px)
    extra = (text_lines(text) - text_lines(title)) * round(font_px * _LINE_PX)
    out: dict = {"text": text}
    if extra:  # only a title this wrapped: one broken by its author keeps its author's layout
        out.update(y=1.0, yref="paper", yanchor="bottom", automargin=True, pad=dict(b=12))
    return out, top + extra


def _vline(fig: go.Figure, x: float, name: str, *, text: str | None = None, color: str = _LINE_GREY,
           dash: str = "dash", xref: str = "x", yref: str = "y domain") -> None:
    """A named vertical line across the plot height (plus a label at the top when ``text`` is given)."""
    fig.add_shape(type="line", x0=x, x1=x, y0=0, y1=1, xref=xref, yref=yref, name=name,
                  line=dict(color=color, dash=dash, width=1.5))
    if text:
        fig.add_annotation(x=x, y=1, xref=xref, yref=yref, text=text, name=name, showarrow=False,
                           xanchor="left", yanchor="top", xshift=3, font=dict(size=11, color=color))


def _hline(fig: go.Figure, y: float, name: str, *, text: str | None = None, color: str = _LINE_GREY,
           dash: str = "dash", xref: str = "x domain", yref: str = "y") -> None:
    """A named horizontal line across the plot width (plus a label at the right when ``text`` is given)."""
    fig.add_shape(type="line", x0=0, x1=1, y0=y, y1=y, xref=xref, yref=yref, name=name,
                  line=dict(color=color, dash=dash, width=1.5))
    if text:
        fig.add_annotation(x=1, y=y, xref=xref, yref=yref, text=text, name=name, showarrow=False,
                           xanchor="right", yanchor="bottom", font=dict(size=11, color=color))


def _vrect(fig: go.Figure, x0: float, x1: float, name: str, color: str, opacity: float, *,
           xref: str = "x", yref: str = "y domain") -> None:
    """A named shaded band ``x0..x1`` across the plot height, drawn below the data (its label, if any, goes
    through ``_place_labels`` so it cannot collide with another)."""
    fig.add_shape(type="rect", x0=x0, x1=x1, y0=0, y1=1, xref=xref, yref=yref, name=name, fillcolor=color,
                  opacity=opacity, line_width=0, layer="below")


@dataclass(frozen=True)
class _Label:
    """A text label at data ``x`` (``anchor`` "left": the text starts there; "center": it is centred there)."""

    x: float
    text: str
    name: str
    color: str = _LINE_GREY
    anchor: str = "left"


_CHAR_PX = 7.0  # width of one character at font size 11, with room to spare
_MIN_PLOT_PX = 380  # the narrowest plot area the dashboard draws (1280 px wide, two plots side by side)
_ROW = 0.085  # one row of labels, as a fraction of the plot height


def _label_rows(labels: Sequence[_Label], x_range: tuple[float, float], plot_px: float = _MIN_PLOT_PX
                ) -> list[tuple[_Label, int, str]]:
    """Give each label a row so that no two labels in a row overlap: ``(label, row, xanchor)``.

    Greedy interval packing in data units, with widths estimated from the text length on a plot ``plot_px``
    wide (an overestimate makes more rows, never a collision). A left-anchored label that would run past the
    right edge of ``x_range`` is anchored on its right instead, unless that would run past the left edge.

    >>> rows = _label_rows([_Label(0.0, "safe", "a"), _Label(0.05, "tau", "b"), _Label(5.0, "far", "c")], (0, 10))
    >>> [(lab.text, row) for lab, row, _ in rows]
    [('safe', 0), ('tau', 1), ('far', 0)]
    """
    lo, hi = x_range
    per_px = (hi - lo) / plot_px
    rows: list[list[tuple[float, float]]] = []
    out = []
    for lab in sorted(labels, key=lambda item: item.x):
        w = (len(lab.text) * _CHAR_PX + 10) * per_px
        anchor = lab.anchor
        if anchor == "left" and lab.x + w > hi and lab.x - w >= lo:
            anchor = "right"
        x0 = {"left": lab.x, "right": lab.x - w, "center": lab.x - w / 2}[anchor]
        iv = (x0, x0 + w)
        free = [i for i, row in enumerate(rows) if all(iv[0] >= b or iv[1] <= a for a, b in row)]
        if not free:
            rows.append([])
        i = free[0] if free else len(rows) - 1
        rows[i].append(iv)
        out.append((lab, i, anchor))
    return out


def _place_labels(fig: go.Figure, labels: Sequence[_Label], x_range: tuple[float, float], *, top: bool = True,
                  xref: str = "x", yref: str = "y domain", plot_px: float = _MIN_PLOT_PX) -> None:
    """Draw ``labels`` as annotations in rows from the top (or bottom) of the plot, none overlapping another."""
    for lab, row, anchor in _label_rows(labels, x_range, plot_px):
        fig.add_annotation(x=lab.x, y=1 - row * _ROW if top else row * _ROW, xref=xref, yref=yref, text=lab.text,
                           name=lab.name, showarrow=False, xanchor=anchor, yanchor="top" if top else "bottom",
                           xshift={"left": 3, "right": -3, "center": 0}[anchor],
                           font=dict(size=11, color=lab.color), bgcolor="rgba(255,255,255,0.75)")
