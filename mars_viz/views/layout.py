"""Where the text goes on a figure: the label-layout engine and the named reference lines and bands.

``_label_rows`` packs text labels into rows so that no two in a row overlap
(widths estimated from the text length on the narrowest plot the dashboard
draws), and ``_place_labels`` draws them as annotations from the top (or the
bottom) of the plot; ``_vline`` / ``_hline`` / ``_vrect`` add named threshold
lines and shaded bands (``fig.layout.shapes``) for the figures in `figures`.
Pure plotly: no model, no gradio.

Example:
    >>> import plotly.graph_objects as go  # doctest: +SKIP
    >>> fig = go.Figure()  # doctest: +SKIP
    >>> _vline(fig, 0.5, "tau")  # doctest: +SKIP
    >>> _place_labels(fig, [_Label(0.5, "τ = 0.50", "tau")], (0.0, 1.0))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import plotly.graph_objects as go

_LINE_GREY = "#6c757d"


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
