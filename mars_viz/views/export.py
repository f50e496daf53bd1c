"""Writing a figure out: a standalone HTML page that opens offline (``figure_html``, with the plotly.js bundle
``plotly_js`` for pages that share it) and the traces' data as CSV (``figure_csv``). Pure: no model, no gradio.

Example:
    >>> html = figure_html(fig)  # doctest: +SKIP
    >>> csv_text = figure_csv(fig)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
from typing import Any

import numpy as np
import plotly.graph_objects as go

__all__ = ["PLOTLY_JS", "PLOT_CONFIG", "figure_csv", "figure_html", "plotly_js"]

# Browser modebar config: the camera button exports a 2x PNG client-side (no server dependency).
# Server-side PNG (fig.write_image) would need kaleido plus a Chrome/Chromium install, which the
# offline app does not assume; pass this as `config=` to `fig.show`/`to_html` (figure_html does).
PLOT_CONFIG: dict[str, Any] = {
    "displaylogo": False,
    "responsive": True,
    "toImageButtonOptions": {"format": "png", "scale": 2, "filename": "mars_viz"},
}


PLOTLY_JS = "plotly.min.js"


def figure_html(fig: go.Figure, shared_js: bool = False) -> str:
    """A standalone HTML page of ``fig`` that opens offline: plotly.js inlined (~4.6 MB), or with ``shared_js``
    loaded from ``plotly.min.js`` beside it (for a bundle of several figures: write it once, see ``plotly_js``)."""
    return fig.to_html(full_html=True, include_plotlyjs="directory" if shared_js else True, config=PLOT_CONFIG)


def plotly_js() -> str:
    """The plotly.js bundle that ``figure_html(..., shared_js=True)`` pages load from ``plotly.min.js``."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    return str(v)


def figure_csv(fig: go.Figure) -> str:
    """Every trace's data as long-format CSV: columns ``trace,x,y`` (plus ``text`` if any trace has text).

    One row per point, so a spreadsheet or pandas can pivot it back
    (``pd.read_csv(io.StringIO(s)).pivot(...)``). Layout shapes (threshold
    lines, shaded regions) are not data and are not exported.

    >>> import plotly.graph_objects as go
    >>> print(figure_csv(go.Figure(go.Scatter(x=[0, 1], y=[0.5, 2.0], name="a"))).strip())
    trace,x,y
    a,0,0.5
    a,1,2.0
    """
    rows: list[list[str]] = []
    any_text = False
    for i, trace in enumerate(fig.data):
        name = trace.name if trace.name is not None else f"trace {i}"
        xs = list(trace.x) if getattr(trace, "x", None) is not None else None
        ys = list(trace.y) if getattr(trace, "y", None) is not None else None
        n = max(len(xs) if xs is not None else 0, len(ys) if ys is not None else 0)
        if xs is None:
            xs = list(range(n))
        if ys is None:
            ys = [None] * n
        text = getattr(trace, "text", None)
        if text is not None and not isinstance(text, str):
            text = list(text)
        any_text = any_text or text is not None
        for j in range(n):
            t = text if isinstance(text, str) else (text[j] if text is not None and j < len(text) else None)
            rows.append([name, _cell(xs[j] if j < len(xs) else None), _cell(ys[j] if j < len(ys) else None),
                         _cell(t)])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["trace", "x", "y", "text"] if any_text else ["trace", "x", "y"])
    for row in rows:
        writer.writerow(row if any_text else row[:3])
    return out.getvalue()
