"""Plotly figure builders. Pure: data in, `go.Figure` out; no model, no gradio. Tested on fixed data.

Example:
    >>> fig = residual_norm_figure([1.0, 2.5, 3.0])
    >>> fig.data[0].name
    'residual norm'
"""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go

__all__ = ["residual_norm_figure"]

TEMPLATE = "plotly_white"


def residual_norm_figure(norms: Sequence[float], title: str = "Residual-stream norm at the first generated token",
                         chosen_layer: int | None = None) -> go.Figure:
    """Line of ||h_l|| over decoder layers l, with an optional marker on the chosen layer."""
    layers = list(range(len(norms)))
    fig = go.Figure(go.Scatter(x=layers, y=list(norms), mode="lines+markers", name="residual norm"))
    if chosen_layer is not None:
        fig.add_vline(x=chosen_layer, line_dash="dash", annotation_text=f"layer {chosen_layer}")
    fig.update_layout(template=TEMPLATE, title=title, xaxis_title="decoder layer", yaxis_title="||h_l||",
                      margin=dict(l=50, r=20, t=50, b=40), height=320)
    return fig
