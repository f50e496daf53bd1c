"""Plotly figure builders: the dashboard's nine figures. Pure: data in, `go.Figure` out; no model, no gradio.
Tested on fixed data.

Every builder shares one look: the ``plotly_white`` template, ``HEIGHT`` pixels,
the colour map ``COLORS`` (safe / unsafe / neutral image / neutral video /
current input raw, re-centred, steered) and named traces, so the dashboard,
the tests and the CSV export can find each series by name. Reference lines
and shaded regions are layout shapes with a ``name`` too (``fig.layout.shapes``);
they and their text labels are placed by `layout`, and `export` writes a figure
as HTML or CSV.

Inputs are plain Python / numpy data (lists of floats, ``[N, 2]`` coordinates
from ``mars_viz.core.projection``), never tensors or a ``MarsState``, so a figure
can be rebuilt from a saved JSON sidecar.

Example:
    >>> fig = target_curve_figure({1.0: 0.2, 2.0: 0.7, 3.0: 0.6}, t_star=2.0)
    >>> [t.name for t in fig.data]
    ['refusal rate (held-out harmless, text)', 't*']
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..core.rule import MarsRule, response_curve
from .layout import (
    _LINE_GREY,
    _ROW,
    HALF_FIG_PX,
    NARROW_FIG_PX,
    TITLE_FONT_PX,
    WIDE_FIG_PX,
    _hline,
    _Label,
    _label_rows,
    _place_labels,
    _vline,
    _vrect,
    title_layout,
    wrap_text,
)

__all__ = [
    "COLORS",
    "CURRENT_NAMES",
    "GROUP_NAMES",
    "HEIGHT",
    "HR_GROUPS",
    "HR_QUADRANTS",
    "TEMPLATE",
    "centroid_figure",
    "eval_conditions_figure",
    "strength_sweep_figure",
    "placeholder_figure",
    "frame_scores_figure",
    "harm_refusal_figure",
    "layer_scores_figure",
    "modality_offset_figure",
    "plane_figure",
    "target_curve_figure",
    "trust_region_figure",
    "wrap_title",
]

TEMPLATE = "plotly_white"
HEIGHT = 360

COLORS: dict[str, str] = {
    "safe": "#2a9d8f",
    "unsafe": "#e76f51",
    "image": "#8d99ae",
    "video": "#6d597a",
    "raw": "#264653",
    "recentred": "#f4a261",
    "steered": "#e63946",
}
# label of a calibration point (MarsState.calib_labels) -> trace name
GROUP_NAMES: dict[str, str] = {
    "safe": "safe prompts",
    "unsafe": "unsafe prompts",
    "image": "neutral image + safe",
    "video": "neutral video + safe",
}
# stage of the current input -> trace name; the path is drawn in this order
CURRENT_NAMES: dict[str, str] = {
    "raw": "input (raw)",
    "recentred": "input (re-centred)",
    "steered": "input (steered)",
}
_CURRENT_SYMBOLS = {"raw": "circle", "recentred": "diamond", "steered": "square"}
_SCORE_NAMES = {"raw": "score (raw)", "recentred": "score (re-centred)", "steered": "score (steered)"}
_STEERED_ROW, _GATE_ROW = 0.95, 1.9  # trust region: the y rows of the steered marker and of the gate's own reading
# Scatter plots with many legend entries keep the legend under the plot, so it never takes the plot's width.
_LEGEND_BELOW: dict[str, Any] = dict(legend=dict(orientation="h", x=0, xanchor="left", y=-0.2, yanchor="top",
                                                 font=dict(size=10)),
                                     height=HEIGHT + 80, margin=dict(l=55, r=20, t=50, b=110))


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def wrap_title(title: str, width_px: float = WIDE_FIG_PX, font_px: float = TITLE_FONT_PX) -> str:
    """``title`` broken into lines (``<br>``) that fit a figure ``width_px`` wide, for a figure whose layout is set
    elsewhere (``_layout`` wraps its own titles): plotly cuts a long title at the figure's edge.

    >>> wrap_title("Occlusion: the gate's score minus the score with each region covered", 400, 14)
    "Occlusion: the gate's score minus the score with<br>each region covered"
    """
    return wrap_text(title, width_px * 0.95 - 25, font_px)


def _layout(fig: go.Figure, title: str, xaxis_title: str, yaxis_title: str, *, title_px: float = WIDE_FIG_PX,
            **kwargs: Any) -> go.Figure:
    """The shared look; the title is wrapped to fit a figure ``title_px`` wide (the narrowest slot the figure is
    drawn in at 1280 px), its extra lines added to the top margin and the height, so the plot keeps its size."""
    margin = {**dict(l=55, r=20, t=50, b=45), **kwargs.pop("margin", {})}
    top = margin["t"]
    wrapped, margin["t"] = title_layout(title, title_px, top=top)
    height = kwargs.pop("height", HEIGHT) + margin["t"] - top
    fig.update_layout(**{**dict(template=TEMPLATE, legend=dict(font=dict(size=10))), **kwargs,
                         "title": wrapped, "height": height, "margin": margin})
    fig.layout.xaxis.title.text = xaxis_title
    fig.layout.yaxis.title.text = yaxis_title  # the primary y axis, also in secondary-y figures
    return fig


def _floats(values: Sequence[float] | np.ndarray, name: str) -> list[float]:
    try:
        out = [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a sequence of numbers ({e})") from None
    return out


def _check_coords(coords: Any, labels: Sequence[str], groups: Sequence[str] = tuple(GROUP_NAMES),
                  name: str = "coords", origin: str = "e.g. Projection.coords",
                  source: str = "MarsState.calib_labels") -> np.ndarray:
    """`coords` as a float `[N, 2]` array with one label from `groups` per point, or a ValueError naming the
    argument (`name`, usually `origin`) and where valid labels come from (`source`)."""
    arr = np.asarray(coords, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must be [N, 2] ({origin}), got shape {arr.shape}")
    if len(labels) != arr.shape[0]:
        raise ValueError(f"got {arr.shape[0]} points but {len(labels)} labels: pass one label per point")
    unknown = sorted(set(labels) - set(groups))
    if unknown:
        raise ValueError(f"unknown point label(s) {unknown}: use {list(groups)} (as in {source})")
    return arr


def _add_groups(fig: go.Figure, coords: np.ndarray, labels: Sequence[str]) -> None:
    """One marker trace per label group, in the fixed order of ``GROUP_NAMES``."""
    lab = np.asarray(labels, dtype=object)
    for key, name in GROUP_NAMES.items():
        idx = np.flatnonzero(lab == key)
        if idx.size == 0:
            continue
        fig.add_trace(go.Scatter(
            x=[float(v) for v in coords[idx, 0]], y=[float(v) for v in coords[idx, 1]], mode="markers", name=name,
            marker=dict(color=COLORS[key], size=7, opacity=0.7, line=dict(width=0.5, color="white")),
            customdata=[int(i) for i in idx],
            hovertemplate=f"{name} #%{{customdata}}<br>(%{{x:.3f}}, %{{y:.3f}})<extra></extra>",
        ))


def _add_centroids(fig: go.Figure, centroids: Mapping[str, Sequence[float]]) -> None:
    for key in ("safe", "unsafe"):
        if key not in centroids:
            continue
        cx, cy = (float(v) for v in centroids[key])
        fig.add_trace(go.Scatter(
            x=[cx], y=[cy], mode="markers", name=f"{key} centroid",
            marker=dict(symbol="star", size=20, color=COLORS[key], line=dict(width=1.5, color="black")),
            hovertemplate=f"{key} centroid<br>(%{{x:.3f}}, %{{y:.3f}})<extra></extra>",
        ))


def _add_current(fig: go.Figure, current: Mapping[str, Sequence[float]] | None) -> None:
    """The current input's stages as distinct markers, joined raw -> re-centred -> steered by arrows."""
    if not current:
        return
    unknown = sorted(set(current) - set(CURRENT_NAMES))
    if unknown:
        raise ValueError(f"unknown current-input key(s) {unknown}: use {list(CURRENT_NAMES)}")
    keys = [k for k in CURRENT_NAMES if k in current]
    pts = [tuple(float(v) for v in current[k]) for k in keys]
    if len(pts) >= 2:
        fig.add_trace(go.Scatter(
            x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name="input path",
            line=dict(color=COLORS["raw"], width=2, dash="dot"),
            # arrowheads pointing along the path; none on the first point
            marker=dict(symbol="arrow", angleref="previous", size=[0] + [14] * (len(pts) - 1), color=COLORS["raw"]),
            hoverinfo="skip",
        ))
    for key, (x, y) in zip(keys, pts, strict=True):
        name = CURRENT_NAMES[key]
        fig.add_trace(go.Scatter(
            x=[x], y=[y], mode="markers", name=name,
            marker=dict(symbol=_CURRENT_SYMBOLS[key], size=14, color=COLORS[key], line=dict(width=1.5, color="black")),
            hovertemplate=f"{name}<br>(%{{x:.3f}}, %{{y:.3f}})<extra></extra>",
        ))


# ---------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------


def centroid_figure(
    coords: np.ndarray,
    labels: Sequence[str],
    centroids: Mapping[str, Sequence[float]],
    current: Mapping[str, Sequence[float]] | None = None,
    method: str = "PCA",
    axes: tuple[str, str] | None = None,
) -> go.Figure:
    """Calibration activations in a 2-D projection, with both centroids and the current input's path.

    Shows why MARS works and why it needs re-centring: safe and unsafe text
    prompts form two clusters (stars: their centroids; the dashed "centroid
    axis" joins them), while neutral image / video + safe prompts sit apart,
    shifted by the modality offset. The current input is drawn raw,
    re-centred (offset removed) and steered, joined by an arrowed path.

    ``coords [N, 2]`` and ``centroids`` come from one ``Projection`` (fit on
    the calibration points, ``transform`` for the centroids and the input);
    ``labels`` are ``MarsState.calib_labels`` ("safe", "unsafe", "image",
    "video"); ``current`` keys are among "raw", "recentred", "steered".

    >>> import numpy as np
    >>> fig = centroid_figure(np.zeros((2, 2)), ["safe", "unsafe"], {"safe": (0, 0), "unsafe": (1, 0)})
    >>> [t.name for t in fig.data]
    ['safe prompts', 'unsafe prompts', 'centroid axis', 'safe centroid', 'unsafe centroid']
    """
    arr = _check_coords(coords, labels)
    unknown = sorted(set(centroids) - {"safe", "unsafe"})
    if unknown:
        raise ValueError(f"unknown centroid key(s) {unknown}: use 'safe' and 'unsafe'")
    fig = go.Figure()
    _add_groups(fig, arr, labels)
    if "safe" in centroids and "unsafe" in centroids:
        (sx, sy), (ux, uy) = ((float(v) for v in centroids[k]) for k in ("safe", "unsafe"))
        fig.add_trace(go.Scatter(x=[sx, ux], y=[sy, uy], mode="lines", name="centroid axis",
                                 line=dict(color=_LINE_GREY, dash="dash", width=1.5), hoverinfo="skip"))
    _add_centroids(fig, centroids)
    _add_current(fig, current)
    x_title, y_title = axes or (f"{method} 1", f"{method} 2")  # `axes`: the two axes' titles, when they have meaning
    return _layout(fig, f"Calibration activations ({method})", x_title, y_title, **_LEGEND_BELOW)


def modality_offset_figure(
    offset_ratio: Mapping[str, Sequence[float]],
    shift_before: Mapping[str, Sequence[float]],
    shift_after: Mapping[str, Sequence[float]],
    chosen_layer: int | None = None,
) -> go.Figure:
    """Per-layer size of the modality offset and the spurious score shift it causes, before/after re-centring.

    Left: ``||delta_m,l|| / ||r_l||``, the offset of each modality in units of
    the refusal direction's length (above ~1 it is larger than the whole
    safe-to-unsafe distance). Right: the unsafety score that neutral media
    (solid colours) add to safe prompts (misalignment), before re-centring
    (dashed, often > 0: benign images look unsafe) and after (solid). "After"
    is measured on held-out prompts, not the ones the offset was fitted on, so
    it is near 0 but not exactly 0: an honest estimate of what re-centring
    leaves. The offset norms use a log axis (layer 0 often spikes far above
    the rest) and a dotted line, so they are not mistaken for the shifts.
    A dashed vertical line marks the chosen layer.

    Each dict maps a modality ("image", "video") to one value per layer.

    >>> fig = modality_offset_figure({"image": [0.5, 1.2]}, {"image": [0.3, 0.6]}, {"image": [0.0, 0.01]}, 1)
    >>> [t.name for t in fig.data]
    ['image offset', 'image before re-centring', 'image after re-centring']
    """
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=("offset norm / ||r_l|| (log)", "spurious score shift (held-out)"))
    for m, values in offset_ratio.items():
        ys = _floats(values, f"offset_ratio[{m!r}]")
        fig.add_trace(go.Scatter(
            x=list(range(len(ys))), y=ys, mode="lines+markers", name=f"{m} offset",
            line=dict(color=COLORS.get(m, _LINE_GREY), dash="dot"), marker=dict(symbol="diamond"),
            hovertemplate="layer %{x}: %{y:.3f}",
        ), row=1, col=1)
    for stage, data, dash in (("before", shift_before, "dash"), ("after", shift_after, "solid")):
        for m, values in data.items():
            ys = _floats(values, f"shift_{stage}[{m!r}]")
            fig.add_trace(go.Scatter(
                x=list(range(len(ys))), y=ys, mode="lines+markers", name=f"{m} {stage} re-centring",
                line=dict(color=COLORS.get(m, _LINE_GREY), dash=dash), hovertemplate="layer %{x}: %{y:.3f}",
            ), row=1, col=2)
    _hline(fig, 0.0, "zero", xref="x2 domain", yref="y2", dash="solid", color="#adb5bd")
    if chosen_layer is not None:
        for xref, yref in (("x", "y domain"), ("x2", "y2 domain")):
            _vline(fig, chosen_layer, "chosen layer", text=f"layer {chosen_layer}", xref=xref, yref=yref)
    fig.update_layout(template=TEMPLATE, title="Modality offset per layer", height=HEIGHT,
                      margin=dict(l=55, r=20, t=60, b=45), legend=dict(font=dict(size=10)))
    fig.update_xaxes(title_text="decoder layer")
    positive = all(v > 0 for vals in offset_ratio.values() for v in _floats(vals, "offset_ratio"))
    fig.update_yaxes(title_text="||δ_m|| / ||r||", row=1, col=1, type="log" if positive and offset_ratio else None)
    fig.update_yaxes(title_text="Δ unsafety score s", row=1, col=2)
    return fig


@dataclass(frozen=True)
class GateRead:
    """Where the gate read its score when that is another layer than the plotted push layer (conditional MARS)."""

    layer: int
    tau: float  # that layer's threshold
    score: float | None = None  # the current input's gate score there, if any
    position: str = "post"  # where along the prompt: "post" (t_post) or "inst" (t_inst)

    @property
    def site(self) -> str:
        """"layer 3", or "layer 3 at t_inst" when it reads the instruction's last token."""
        return f"layer {self.layer}" + (" at t_inst" if self.position == "inst" else "")


def trust_region_figure(
    rule: MarsRule,
    scores: Mapping[str, float] | None = None,
    spreads: tuple[float, float] | None = None,
    layer: int | None = None,
    gate: GateRead | None = None,
) -> go.Figure:
    """The unsafety axis s with the gate, the trust region and where the current input lands.

    Shaded: the safe side ``s <= tau`` (gate closed: no change at all), the
    ramp ``tau..tau+margin``, the trust region ``tau..t*`` and "beyond t*".
    Stars mark the centroids at s = 0 and 1 (with +-1 std error bars when
    ``spreads = (std of safe fit scores, std of unsafe fit scores)``). On a
    secondary y axis: the gate weight ``w(s)`` and the push (how far along r an
    input at s is moved), both from ``rule.response_curve``, the same
    maths as the steering hook, so the curve honours ``rule.strength`` and
    ``rule.gated`` (zero on the safe side, largest just past the ramp, zero
    again at t*). The axis is in re-centred coordinates: the gate reads the
    score after the modality offset is removed. ``scores`` keys are among
    "raw", "recentred", "steered"; an arrow shows re-centred -> steered.

    ``gate`` (conditional MARS): the gate is read at another layer, on another
    axis, so its threshold is not drawn on this one. The push curve then uses
    the input's gate weight (or an open gate before any input), and a note says
    where the gate read its score and what it decided.

    >>> from mars_viz.core.rule import MarsRule
    >>> fig = trust_region_figure(MarsRule(tau=0.5, t_star=3.0), {"recentred": 1.0, "steered": 3.0})
    >>> sorted(s.name for s in fig.layout.shapes if s.type == "line")
    ['t*', 'tau']
    """
    tau, margin, t_star, strength = rule.tau, rule.margin, rule.t_star, rule.strength
    scores = {k: float(v) for k, v in (scores or {}).items() if v is not None}
    unknown = sorted(set(scores) - set(_SCORE_NAMES))
    if unknown:
        raise ValueError(f"unknown score key(s) {unknown}: use {list(_SCORE_NAMES)}")
    vals = [v for v in scores.values() if math.isfinite(v)]
    if gate is not None and gate.score is not None and math.isfinite(gate.score):
        vals.append(float(gate.score))
    sd_safe, sd_unsafe = (float(spreads[0]), float(spreads[1])) if spreads is not None else (0.0, 0.0)
    lo = min([-0.5, tau - 0.25, -2 * sd_safe] + [v - 0.25 for v in vals])
    hi = max([t_star + 1.0, tau + margin + 0.25, 1 + 2 * sd_unsafe] + [v + 0.25 for v in vals])

    fig = make_subplots(specs=[[{"secondary_y": True}]])
    bands: list[_Label] = []  # band names, along the bottom
    lines: list[_Label] = []  # threshold values, along the top
    if gate is None:
        _vrect(fig, lo, tau, "safe side (gate closed)", COLORS["safe"], 0.12)
        bands.append(_Label(lo, "gate closed", "safe side (gate closed)", "#495057"))
        if t_star > tau:
            _vrect(fig, tau, t_star, "trust region", COLORS["recentred"], 0.15)
            bands.append(_Label((tau + margin + t_star) / 2, "trust region", "trust region", "#495057", "center"))
        _vrect(fig, tau, tau + margin, "ramp", "#e9c46a", 0.45)
        bands.append(_Label(tau, "ramp", "ramp", "#495057"))
        _vline(fig, tau, "tau", color=COLORS["safe"])
        lines.append(_Label(tau, f"τ = {tau:.2f}", "tau", COLORS["safe"]))
    else:
        _vrect(fig, lo, t_star, "trust region", COLORS["recentred"], 0.15)
        bands.append(_Label((lo + t_star) / 2, "pushed up to t*", "trust region", "#495057", "center"))
        if gate.score is None:
            note = f"gate read at {gate.site} (τ = {tau:.2f} there)"
        else:
            state = "open" if gate.score > tau else "closed"
            note = (f"gate read at {gate.site}: s = {gate.score:.2f} "
                    f"{'>' if gate.score > tau else '≤'} τ = {tau:.2f} → {state}")
        lines.append(_Label(lo, note, "gate", COLORS["safe"]))
    if t_star < hi:
        _vrect(fig, t_star, hi, "beyond t*", "#adb5bd", 0.2)
        bands.append(_Label(hi, "beyond t*", "beyond t*", "#495057", "right"))
    _vline(fig, t_star, "t*", color=COLORS["steered"])
    lines.append(_Label(t_star, f"t* = {t_star:g}", "t*", COLORS["steered"]))
    _place_labels(fig, lines, (lo, hi))
    _place_labels(fig, bands, (lo, hi), top=False)

    # gate weight and push on the secondary axis; the kinks (tau, tau + m, t*) are exact grid points
    s = np.unique(np.concatenate([np.linspace(lo, hi, 401), [tau, tau + margin, t_star]]))
    gate_at = None if gate is None else (math.inf if gate.score is None else gate.score)
    curve = response_curve(s, rule, gate_score=gate_at)
    w = curve.gate_weight.numpy() if rule.gated else np.ones_like(s)
    push = curve.push.numpy()
    if gate is None:
        fig.add_trace(go.Scatter(x=s.tolist(), y=w.tolist(), mode="lines", name="gate weight w(s)",
                                 line=dict(color=_LINE_GREY, width=2), hovertemplate="s=%{x:.3f}: w=%{y:.3f}"),
                      secondary_y=True)
    formula = "λ·w(s)·ReLU(t*−s)" if rule.gated else "λ·ReLU(t*−s), ungated"
    fig.add_trace(go.Scatter(x=s.tolist(), y=push.tolist(), mode="lines", name=f"push {formula}",
                             line=dict(color=COLORS["steered"], width=2, dash="dot"),
                             hovertemplate=f"s=%{{x:.3f}}: push = {formula} = %{{y:.3f}} (λ = {strength:g})"),
                  secondary_y=True)

    for key, x0 in (("safe", 0.0), ("unsafe", 1.0)):
        sd = sd_safe if key == "safe" else sd_unsafe
        fig.add_trace(go.Scatter(
            x=[x0], y=[0.0], mode="markers", name=f"{key} centroid",
            marker=dict(symbol="star", size=18, color=COLORS[key], line=dict(width=1.5, color="black")),
            error_x=dict(type="data", array=[sd], visible=spreads is not None, color=COLORS[key]),
            hovertemplate=f"{key} centroid: s = %{{x}}" + (f" (std {sd:.3f})" if spreads is not None else "")
            + "<extra></extra>",
        ), secondary_y=False)
    # the steered marker sits a row above the others, so it never hides the re-centred one (a closed gate leaves
    # the input where it was); the arrow goes from re-centred up to steered
    rows = {"raw": 0.5, "recentred": 0.5, "steered": _STEERED_ROW}
    for key in CURRENT_NAMES:
        if key in scores:
            name = _SCORE_NAMES[key] + (" = the gate's score" if key == "recentred" and gate is None else "")
            fig.add_trace(go.Scatter(
                x=[scores[key]], y=[rows[key]], mode="markers", name=name,
                marker=dict(symbol=_CURRENT_SYMBOLS[key], size=14, color=COLORS[key],
                            line=dict(width=1.5, color="black")),
                hovertemplate=f"{name}: s = %{{x:.3f}}<extra></extra>",
            ), secondary_y=False)
    if gate is not None and gate.score is not None:
        # the gate's own reading, on its own row: its layer's axis, in the same units (0 = safe, 1 = unsafe centroid)
        fig.add_shape(type="line", x0=tau, x1=tau, y0=_GATE_ROW - 0.22, y1=_GATE_ROW + 0.22, xref="x", yref="y",
                      line=dict(color=COLORS["safe"], width=2), name="gate tau")
        fig.add_trace(go.Scatter(
            x=[float(gate.score)], y=[_GATE_ROW], mode="markers+text", name=f"gate score ({gate.site})",
            text=[f"gate s = {gate.score:.3f}"], textposition="top center", textfont=dict(size=11),
            marker=dict(symbol="triangle-up", size=15, color=COLORS["recentred"], line=dict(width=1.5, color="black")),
            hovertemplate=f"gate score at {gate.site}: s = %{{x:.3f}} (τ = {tau:.3f} there)<extra></extra>",
        ), secondary_y=False)
    if "recentred" in scores and "steered" in scores and scores["steered"] != scores["recentred"]:
        fig.add_annotation(x=scores["steered"], y=_STEERED_ROW, ax=scores["recentred"], ay=0.5, xref="x", yref="y",
                           axref="x", ayref="y", showarrow=True, arrowhead=3, arrowsize=1.3, arrowwidth=2,
                           arrowcolor=COLORS["steered"], text="", name="steering push")
    if gate is None:
        title = "Gate and trust region on the unsafety axis" + ("" if layer is None else f" (layer {layer})")
    else:
        title = f"Push at layer {'?' if layer is None else layer}, gate read at {gate.site}"
    _layout(fig, title, "re-centred unsafety score s (0 = safe centroid, 1 = unsafe)", "", **_LEGEND_BELOW)
    fig.update_xaxes(range=[lo, hi])
    fig.update_yaxes(range=[-0.4, 2.6], showticklabels=False, showgrid=False, zeroline=False, secondary_y=False)
    fig.update_yaxes(title_text="w(s) / push (units of ||r||)", rangemode="tozero", secondary_y=True,
                     tickmode="auto", nticks=6, showgrid=False)
    return fig


def target_curve_figure(curve: Mapping[float, float], t_star: float, layer: int | None = None) -> go.Figure:
    """Refusal rate of held-out harmless text prompts steered to each target level t, with t* marked.

    This is how ``t*`` was chosen: refusal rises with t, then falls again once
    the push leaves the model's manifold (answers degrade); ``t*`` is the
    smallest level within tolerance of the best rate, the outer wall of the
    trust region. If ``t_star`` is not one of the measured levels, its marker
    is placed on the interpolated curve.

    >>> fig = target_curve_figure({1: 0.2, 3: 0.5, 6: 0.0}, 3)
    >>> fig.data[1].x, fig.data[1].y
    ((3.0,), (0.5,))
    """
    if not curve:
        raise ValueError("the target curve is empty: calibrate t* first (python -m mars_viz fit ...)")
    levels = sorted(float(k) for k in curve)
    rates = [float(curve[k]) for k in sorted(curve, key=float)]
    t = float(t_star)
    near = [i for i, lv in enumerate(levels) if math.isclose(lv, t, rel_tol=1e-9, abs_tol=1e-9)]
    y_star = rates[near[0]] if near else float(np.interp(t, levels, rates))
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=levels, y=rates, mode="lines+markers", name="refusal rate (held-out harmless, text)",
                             line=dict(color=COLORS["unsafe"], width=2),
                             hovertemplate="t = %{x:g}: refusal %{y:.2f}<extra></extra>", cliponaxis=False))
    fig.add_trace(go.Scatter(x=[t], y=[y_star], mode="markers+text", name="t*", text=[f"t* = {t:g}"],
                             textposition="top right", cliponaxis=False,
                             marker=dict(symbol="star", size=20, color=COLORS["steered"],
                                         line=dict(width=1.5, color="black")),
                             hovertemplate="t* = %{x:g}: refusal %{y:.2f}<extra></extra>"))
    where = "" if layer is None else f", layer {layer}"
    _layout(fig, f"t*: refusal vs push level{where}", "target level t (multiples of ||r||)", "refusal rate",
            **_LEGEND_BELOW)
    fig.update_yaxes(range=[0, 1])
    return fig


def plane_figure(
    coords: np.ndarray,
    labels: Sequence[str],
    current: Mapping[str, Sequence[float]] | None,
    tau: float,
    t_star: float,
    layer: int | None = None,
) -> go.Figure:
    """Calibration activations in the refusal plane (x: unsafety score along r_hat, y: top residual PC) at
    ``layer`` (named in the title).

    Unlike PCA/UMAP this view is in MARS's own units: the safe centroid is at
    (0, 0), the unsafe one at (1, 0), and the gate threshold tau and target
    level t* are vertical lines, so one sees which points the gate would
    steer (right of tau), how far the modality offset moves neutral media
    along s, and that steering only moves the input horizontally (along r)
    up to t*. ``coords`` come from ``MarsState.plane_coords``; ``current``
    from the same map (keys "raw", "recentred", "steered").

    The plot sits beside another, so its legend is kept short: the centroids
    (the stars on the "safe" / "unsafe" lines) and the input's path have no
    entry of their own, and every symbol is drawn at one size.

    >>> import numpy as np
    >>> fig = plane_figure(np.array([[0.1, 0.0], [0.9, 0.2]]), ["safe", "unsafe"], None, 0.5, 3.0)
    >>> sorted(s.name for s in fig.layout.shapes if s.type == "line")
    ['s = 0', 's = 1', 't*', 'tau']
    """
    arr = _check_coords(coords, labels)
    fig = go.Figure()
    xs = [0.0, 1.0, tau, t_star, *arr[:, 0].tolist(), *(float(p[0]) for p in (current or {}).values())]
    xs = [x for x in xs if math.isfinite(x)]
    pad = 0.06 * (max(xs) - min(xs) or 1.0)
    x_range = (min(xs) - pad, max(xs) + pad)
    if t_star > tau:
        _vrect(fig, tau, t_star, "trust region", COLORS["recentred"], 0.10)
    _vline(fig, 0.0, "s = 0", color=COLORS["safe"], dash="dot")
    _vline(fig, 1.0, "s = 1", color=COLORS["unsafe"], dash="dot")
    _vline(fig, tau, "tau", color=_LINE_GREY)
    _vline(fig, t_star, "t*", color=COLORS["steered"])
    _place_labels(fig, [_Label(0.0, "safe", "s = 0", COLORS["safe"]),
                        _Label(1.0, "unsafe", "s = 1", COLORS["unsafe"]), _Label(tau, f"τ = {tau:.2f}", "tau"),
                        _Label(t_star, f"t* = {t_star:g}", "t*", COLORS["steered"])], x_range)
    if t_star > tau:
        _place_labels(fig, [_Label((tau + t_star) / 2, "trust region", "trust region", "#495057", "center")], x_range,
                      top=False)
    _add_groups(fig, arr, labels)
    _add_centroids(fig, {"safe": (0.0, 0.0), "unsafe": (1.0, 0.0)})
    _add_current(fig, current)
    # named by the lines they sit on (the stars) or drawn between named markers (the path): no legend entry
    fig.update_traces(showlegend=False, selector=lambda t: t.name in ("safe centroid", "unsafe centroid",
                                                                       "input path"))
    title = "Refusal plane: r̂ × top residual PC" if layer is None else f"Refusal plane at layer {layer}: r̂ × top PC"
    # under the plot, symbols at one size (the 14 px input markers made every row of it tall)
    _layout(fig, title, "unsafety score s (along r̂)", "top PC of residual (units of ||r||)", title_px=NARROW_FIG_PX,
            **{**_LEGEND_BELOW, "legend": {**_LEGEND_BELOW["legend"], "itemsizing": "constant", "y": -0.22}})
    fig.update_xaxes(range=list(x_range))
    return fig


# label of a point in the harmfulness x refusal plane (Diagnostics.hr_labels) -> (trace name, colour)
HR_GROUPS: dict[str, tuple[str, str]] = {
    "harmful": ("harmful prompts", COLORS["unsafe"]),
    "harmless": ("harmless prompts", COLORS["safe"]),
    "look-alike": ("look-alike prompts (harmless)", "#e9c46a"),
    "jailbreak": ("jailbreak prompts", COLORS["video"]),
}
# (refused, harmful) -> the quadrant's label in `harm_refusal_figure`
HR_QUADRANTS: dict[tuple[bool, bool], str] = {
    (True, True): "refused · harmful",
    (False, True): "answered · harmful (jailbreaks sit here)",
    (True, False): "refused · harmless (over-refusal)",
    (False, False): "answered · harmless",
}
_HR_PLOT_PX = 560  # the plane has an Explore tab to itself: its plot is at least this wide at 1280 px
_HR_HEIGHT = HEIGHT + 160  # taller than the rest: a 2-D scatter with label bands above and below


def harm_refusal_figure(
    points: np.ndarray,
    labels: Sequence[str],
    current: Mapping[str, Sequence[float]] | None = None,
    x_threshold: float = 0.5,
    y_threshold: float = 0.5,
    inst_layer: int | None = None,
    push_layer: int | None = None,
) -> go.Figure:
    """The harmfulness x refusal plane (Zhao et al. 2025): x = harmfulness score at t_inst (the instruction's last
    token), y = refusal score at t_post (the prompt's last position, where MARS pushes).

    One marker trace per label of ``HR_GROUPS`` (``Diagnostics.hr_labels``);
    dashed lines at ``x_threshold`` (the t_inst gate's tau) and
    ``y_threshold`` (the t_post tau at the push layer) cut the plane into the
    four ``HR_QUADRANTS``, named in bands above and below the points so no
    label covers one. Jailbreaks sit answered-but-harmful (bottom right),
    over-refusal refused-but-harmless (top left). ``current`` ("raw",
    "recentred", "steered" -> (x, y)) is the input's path: the push at t_post
    moves it up only, t_inst never sees it.

    >>> fig = harm_refusal_figure(np.array([[0.9, 0.8], [0.1, 0.2]]), ["harmful", "harmless"], None, 0.5, 0.4)
    >>> [t.name for t in fig.data]
    ['harmful prompts', 'harmless prompts']
    """
    arr = np.asarray(points, dtype=np.float64)
    arr = _check_coords(arr.reshape(0, 2) if arr.size == 0 else arr, labels, tuple(HR_GROUPS),
                        "points", "Diagnostics.hr_points", "Diagnostics.hr_labels")
    xt, yt = float(x_threshold), float(y_threshold)
    cur = [tuple(float(v) for v in p) for p in (current or {}).values()]
    xs = [x for x in (xt, *arr[:, 0].tolist(), *(p[0] for p in cur)) if math.isfinite(x)]
    ys = [y for y in (yt, *arr[:, 1].tolist(), *(p[1] for p in cur)) if math.isfinite(y)]
    pad = 0.06 * (max(xs) - min(xs) or 1.0)
    x_range = (min(xs) - pad, max(xs) + pad)

    # quadrant names in a band above the points (refused) and one below (answered), the x threshold's value with
    # the upper ones; the bands' height is reserved in the y range, so labels never sit on a point
    grey = "#495057"
    upper = [_Label(x_range[0], HR_QUADRANTS[True, False], "quadrant: refused, harmless", grey),
             _Label(x_range[1], HR_QUADRANTS[True, True], "quadrant: refused, harmful", grey, "right"),
             _Label(xt, f"τ = {xt:.2f}", "harmfulness threshold", COLORS["unsafe"])]
    lower = [_Label(x_range[0], HR_QUADRANTS[False, False], "quadrant: answered, harmless", grey),
             _Label(x_range[1], HR_QUADRANTS[False, True], "quadrant: answered, harmful", grey, "right")]
    rows_up = 1 + max(row for _, row, _ in _label_rows(upper, x_range, _HR_PLOT_PX))
    rows_down = 1 + max(row for _, row, _ in _label_rows(lower, x_range, _HR_PLOT_PX))
    y_lo, y_hi = min(ys), max(ys)
    span = y_hi - y_lo or 1.0
    y_lo, y_hi = y_lo - 0.1 * span, y_hi + 0.1 * span
    up, down = rows_up * _ROW + 0.02, rows_down * _ROW + 0.02
    total = (y_hi - y_lo) / (1 - up - down)
    y_range = (y_lo - down * total, y_hi + up * total)

    fig = go.Figure()
    for (x0, x1), (y0, y1), name in (((xt, x_range[1]), (y_range[0], yt), "jailbreak quadrant"),
                                     ((x_range[0], xt), (yt, y_range[1]), "over-refusal quadrant")):
        if x1 > x0 and y1 > y0:
            fig.add_shape(type="rect", x0=x0, x1=x1, y0=y0, y1=y1, xref="x", yref="y", name=name,
                          fillcolor=COLORS["steered"], opacity=0.045, line_width=0, layer="below")
    _vline(fig, xt, "harmfulness threshold", color=COLORS["unsafe"])
    _hline(fig, yt, "refusal threshold", text=f"τ = {yt:.2f}", color=COLORS["steered"])
    _place_labels(fig, upper, x_range, plot_px=_HR_PLOT_PX)
    _place_labels(fig, lower, x_range, top=False, plot_px=_HR_PLOT_PX)
    lab = np.asarray(labels, dtype=object)
    for key, (name, color) in HR_GROUPS.items():
        idx = np.flatnonzero(lab == key)
        if idx.size == 0:
            continue
        fig.add_trace(go.Scatter(
            x=[float(v) for v in arr[idx, 0]], y=[float(v) for v in arr[idx, 1]], mode="markers", name=name,
            marker=dict(color=color, size=7, opacity=0.7, line=dict(width=0.5, color="white")),
            hovertemplate=f"{name}<br>harmfulness %{{x:.3f}}, refusal %{{y:.3f}}<extra></extra>"))
    _add_current(fig, current)
    at_inst = "t_inst" if inst_layer is None else f"t_inst, layer {inst_layer}"
    at_post = "t_post" if push_layer is None else f"t_post, layer {push_layer}"
    _layout(fig, f"Harmfulness ({at_inst}) × refusal ({at_post})",
            "harmfulness score at t_inst (the instruction's last token)", "refusal score at t_post",
            **{**_LEGEND_BELOW, "height": _HR_HEIGHT, "legend": {**_LEGEND_BELOW["legend"], "y": -0.15}})
    fig.update_xaxes(range=list(x_range), zeroline=False)
    fig.update_yaxes(range=list(y_range), zeroline=False)
    return fig


_MAIN_SCORES = {  # key in LayerScores.to_dict() -> (trace name, colour, width, dash)
    "separability": ("separability", "#457b9d", 1.5, "solid"),
    "consistency": ("consistency", "#2a9d8f", 1.5, "solid"),
    "steerability": ("steerability", "#e9c46a", 2.5, "dash"),
    "combined": ("steer score (consistency × steerability)", "#1d3557", 4.0, "solid"),
}
_MISALIGNMENT = {
    "misalignment_before": ("misalignment before re-centring", "dash"),
    "misalignment_after": ("misalignment after re-centring", "solid"),
}


def layer_scores_figure(
    scores: Mapping[str, Sequence[float]],
    chosen_layer: int,
    allowed: tuple[int, int] | range | None = None,
    detect_layer: int | None = None,
    inspected: int | None = None,
    gate_position: str = "post",
) -> go.Figure:
    """Per-layer diagnostics that choose the two layers (defined in the README, "The formulation").

    Lines: separability (held-out AUROC of s), consistency (mean cosine of
    unsafe prompts with r_hat), steerability (normalised refusal log-prob gain)
    and the steer score ``combined`` (consistency x steerability), whose argmax
    within the allowed layers is the push layer ``chosen_layer`` (dashed line).
    ``detect_layer`` (the best separability: where the gate reads) gets its own
    line ("gate 5", or "gate 5 (t_inst)" for a gate at ``gate_position``
    "inst", whose separability is not the one drawn), and ``inspected`` (the
    layer inspector's) a dotted one, or, on the push or gate layer, a mark in
    that layer's label ("push 3 · inspecting"). The steer score is drawn under
    the other lines and steerability dashed, so both show where they coincide. Layers outside
    ``allowed = (start, stop)`` (range semantics, as
    ``selection.allowed_layer_range``: separability below 90% of the best) are
    shaded "excluded layers". If present, misalignment (mean s of neutral
    media + safe text) before/after re-centring is drawn on a secondary axis.
    Accepts ``LayerScores.to_dict()`` directly; other keys (fisher, split_half)
    are ignored.

    >>> fig = layer_scores_figure({"combined": [0.1, 0.5, 0.2]}, chosen_layer=1, allowed=(1, 3))
    >>> [(s.name, s.x0, s.x1) for s in fig.layout.shapes]
    [('excluded layers', -0.5, 0.5), ('push layer', 1, 1)]
    """
    main = {k: _floats(scores[k], k) for k in _MAIN_SCORES if k in scores}
    mis = {k: _floats(scores[k], k) for k in _MISALIGNMENT if k in scores}
    if not main and not mis:
        raise ValueError(f"no layer scores to plot: pass at least one of {list(_MAIN_SCORES) + list(_MISALIGNMENT)} "
                         "(e.g. state.layer_scores.to_dict())")
    num_layers = max(len(v) for v in (*main.values(), *mis.values()))
    for name, value in (("chosen_layer", chosen_layer), ("detect_layer", detect_layer), ("inspected", inspected)):
        if value is not None and not 0 <= value < num_layers:
            raise ValueError(f"{name} {value} is outside the {num_layers} plotted layers (0..{num_layers - 1})")
    fig = make_subplots(specs=[[{"secondary_y": True}]]) if mis else go.Figure()
    if allowed is not None:
        start, stop = (allowed.start, allowed.stop) if isinstance(allowed, range) else (int(allowed[0]),
                                                                                         int(allowed[1]))
        for x0, x1 in ((-0.5, min(start, num_layers) - 0.5), (max(stop, 0) - 0.5, num_layers - 0.5)):
            if x1 > x0:
                _vrect(fig, x0, x1, "excluded layers", "#adb5bd", 0.3)
                if x1 - x0 >= 8:  # label only bands wide enough to hold it
                    _place_labels(fig, [_Label((x0 + x1) / 2, "push excluded: separability < 90% of best",
                                               "excluded layers", "#495057", "center")],
                                  (-0.5, num_layers - 0.5), top=False)
    # the thick steer score is drawn first, under the others: where steerability is 0 the steer score is too, and
    # the dashed steerability line stays visible on top of it (the legend keeps the listed order)
    for key in sorted(main, key=lambda k: k != "combined"):
        ys = main[key]
        name, color, width, dash = _MAIN_SCORES[key]
        trace = go.Scatter(x=list(range(len(ys))), y=ys, mode="lines+markers", name=name,
                           legendrank=1 + list(_MAIN_SCORES).index(key),
                           line=dict(color=color, width=width, dash=dash), marker=dict(size=5),
                           opacity=0.75 if key == "combined" else 1.0, hovertemplate="%{y:.3f}")
        fig.add_trace(trace, **({"secondary_y": False} if mis else {}))
    for key, ys in mis.items():
        name, dash = _MISALIGNMENT[key]
        fig.add_trace(go.Scatter(x=list(range(len(ys))), y=ys, mode="lines", name=name,
                                 line=dict(color=COLORS["image"], dash=dash, width=1.5), hovertemplate="%{y:.3f}"),
                      secondary_y=True)
    _vline(fig, chosen_layer, "push layer", color=COLORS["steered"])
    marks = [_Label(chosen_layer, f"push {chosen_layer}", "push layer", COLORS["steered"])]
    inst = gate_position == "inst"
    if detect_layer is not None and (detect_layer != chosen_layer or inst):
        _vline(fig, detect_layer, "detect layer", color="#457b9d")
        marks.append(_Label(detect_layer, f"gate {detect_layer}" + (" (t_inst)" if inst else ""), "detect layer",
                            "#457b9d"))
    if inspected is not None:
        # on a marked layer (push or gate) the inspector joins that layer's label rather than vanish under it
        at = next((i for i, m in enumerate(marks) if m.x == inspected), None)
        if at is None:
            _vline(fig, inspected, "inspected layer", color=_LINE_GREY, dash="dot")
            marks.append(_Label(inspected, f"inspecting {inspected}", "inspected layer"))
        else:
            marks[at] = replace(marks[at], text=f"{marks[at].text} · inspecting")
    _place_labels(fig, marks, (-0.5, num_layers - 0.5))
    fig.update_xaxes(tick0=0, dtick=max(1, math.ceil(num_layers / 16)))  # whole layers only
    _layout(fig, "Layer scores", "decoder layer", "score", hovermode="x unified")
    fig.update_xaxes(range=[-0.5, num_layers - 0.5])
    if mis:
        fig.update_yaxes(title_text="misalignment (mean s)", secondary_y=True, showgrid=False, tickmode="auto",
                         nticks=6)
        fig.update_layout(legend=dict(x=1.1))  # clear of the secondary axis title
    return fig


def frame_scores_figure(
    scores: Sequence[float],
    tau: float,
    frame_indices: Sequence[int] | None = None,
    t_star: float | None = None,
    layer: int | None = None,
    clip_score: float | None = None,
    position: str = "post",
    recenter: bool = True,
) -> go.Figure:
    """The gate's score of each sampled video frame *shown alone as an image* (re-centred by the image offset when
    ``recenter``), at the gate's ``layer`` and ``position``, with the gate threshold ``tau`` and, when given, the
    whole clip's own gate score ``clip_score`` (the video, re-centred by the video offset: what the gate decided on).
    The two can disagree: a frame alone is not the clip, and the offsets differ; the title says which is which.

    Bars are numbered as the maps and "What the model sees" number the frames (0, 1, ...: sampling order); the hover
    gives each frame's index in the file (``frame_indices``). Bars above ``tau`` are drawn in the unsafe colour.

    >>> fig = frame_scores_figure([0.1, 0.9], tau=0.5, frame_indices=[0, 30])
    >>> list(fig.data[0].marker.color), list(fig.data[0].x)
    (['#2a9d8f', '#e76f51'], ['frame 0', 'frame 1'])
    """
    ys = _floats(scores, "scores")
    files = list(range(len(ys))) if frame_indices is None else [int(i) for i in frame_indices]
    if len(files) != len(ys):
        raise ValueError(f"got {len(ys)} scores but {len(files)} frame indices: pass one index per sampled frame")
    xs = [f"frame {k}" for k in range(len(ys))]
    colors = [COLORS["unsafe"] if y > tau else COLORS["safe"] for y in ys]
    hover = [[f, "above τ" if y > tau else "at or below τ"] for f, y in zip(files, ys, strict=True)]
    how = "re-centred by the image offset" if recenter else "raw (re-centring off)"
    fig = go.Figure(go.Bar(x=xs, y=ys, name=f"each frame alone ({how})", marker=dict(color=colors),
                           customdata=hover,
                           hovertemplate="%{x} (file frame #%{customdata[0]}): s = %{y:.3f}, %{customdata[1]}"
                                         "<extra></extra>"))
    _hline(fig, tau, "tau", text=f"τ = {tau:.2f}", color=_LINE_GREY)
    if clip_score is not None:
        _hline(fig, clip_score, "clip", color=COLORS["video"], dash="dot")  # labelled at the left, τ at the right
        fig.add_annotation(x=0, y=clip_score, xref="x domain", yref="y", text=f"whole clip: s = {clip_score:.3f}",
                           name="clip", showarrow=False, xanchor="left", yanchor="bottom",
                           font=dict(size=11, color=COLORS["video"]))
    if t_star is not None:
        _hline(fig, t_star, "t*", text=f"t* = {t_star:g}", color=COLORS["steered"])
    site = ("" if layer is None else f"layer {layer}, ") + ("t_inst" if position == "inst" else "t_post")
    title = (f"Each sampled frame alone, as an image ({site}, {how})"
             + ("<br><sup>the gate decided on the whole clip (video offset): the dotted line</sup>"
                if clip_score is not None else ""))
    _layout(fig, title, "sampled frame (hover: its index in the file)", "gate score s")
    fig.update_xaxes(type="category")
    return fig


EVAL_MODES = [("refusal_unsteered", "unsteered", "#adb5bd"), ("refusal_steered", "MARS", COLORS["steered"]),
              ("refusal_no_recenter", "MARS without re-centring", COLORS["recentred"]),
              ("refusal_ungated", "ungated (always push to t*)", COLORS["video"])]


def eval_conditions_figure(conditions: Mapping[str, Mapping[str, Any]]) -> go.Figure:
    """Refusal rate per evaluation condition (grouped bars: unsteered, MARS, no re-centring, ungated).

    On harmful conditions higher is safer; on harmless ones every bar above 'unsteered' is over-refusal.
    """
    names = list(conditions)
    fig = go.Figure()
    # horizontal bars: the condition names stay level and legible however many there are
    for key, label, color in EVAL_MODES:
        fig.add_trace(go.Bar(y=names, x=[conditions[c].get(key) for c in names], name=label, marker_color=color,
                             orientation="h", hovertemplate="%{y}: %{x:.2f}<extra>" + label + "</extra>"))
    fig.update_layout(barmode="group")
    # the legend sits at the figure's foot (container coordinates), below the x axis title with room to spare:
    # placed in plot coordinates it landed on "refusal rate" whenever the plot was short
    _layout(fig, "Refusal rate by condition", "refusal rate", "", height=max(HEIGHT, 140 + 34 * len(names)),
            legend=dict(orientation="h", x=0, xanchor="left", yref="container", y=0, yanchor="bottom",
                        font=dict(size=10), itemsizing="constant"),
            margin=dict(l=55, r=20, t=50, b=115), title_px=HALF_FIG_PX)
    fig.update_xaxes(range=[0, 1.05])
    fig.update_yaxes(autorange="reversed", automargin=True)
    values = [conditions[c].get(key) for c in names for key, _, _ in EVAL_MODES]
    if values and all(v == 0 for v in values if v is not None):  # zero-height bars look like a broken chart
        fig.add_annotation(text="every refusal rate is 0:<br>the model refused nothing, steered or not",
                           x=0.6, y=0.5, xref="paper", yref="paper", showarrow=False, name="all zero",
                           font=dict(size=13, color="#495057"), bgcolor="rgba(255,255,255,0.85)")
    return fig


def placeholder_figure(message: str, title: str = "") -> go.Figure:
    """An empty figure that says why it is empty (before the first run, or for an input without that view). A long
    ``message`` is broken into lines (``<br>``) that fit the narrowest plot.

    >>> placeholder_figure("Run an input first").layout.annotations[0].text
    'Run an input first'
    """
    fig = go.Figure()
    # wrapped to the narrowest slot a placeholder stands in (one plot of two side by side): plotly never wraps
    fig.add_annotation(text=wrap_text(message, NARROW_FIG_PX - 40, 14), x=0.5, y=0.5, xref="paper", yref="paper",
                       showarrow=False, name="placeholder", font=dict(size=14, color="#495057"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, title, "", "", title_px=NARROW_FIG_PX)


def strength_sweep_figure(sweep: Mapping[str, Mapping[str, Any]]) -> go.Figure:
    """Safety against over-refusal as the strength lambda grows: one point per lambda (0 = unsteered)."""
    keys = list(sweep)
    x = [sweep[k]["refusal_harmless"] for k in keys]
    y = [sweep[k]["refusal_harmful"] for k in keys]
    # strengths that land on the same point share one label ("λ=0, 0.5"); nearby points alternate above/below
    groups: dict[tuple, list[str]] = {}
    for k, xi, yi in zip(keys, x, y, strict=True):
        groups.setdefault((round(float(xi), 3), round(float(yi), 3)), []).append(k)
    # a label runs inward from its point (rightward in the left half, leftward in the right half; below a point near
    # the top), so "λ=" at x = 0 is never cut by the plot's edge
    text, position, placed = [], [], []
    for k, xi, yi in zip(keys, x, y, strict=True):
        g = groups[(round(float(xi), 3), round(float(yi), 3))]
        text.append(f"λ={', '.join(g)}" if g[0] == k else "")
        near = sum(1 for px, py in placed if abs(px - xi) < 0.15 and abs(py - yi) < 0.08)
        side = "right" if float(xi) < 0.5 else "left"
        up, down = ("bottom", "top") if float(yi) > 0.85 else ("top", "bottom")
        position.append((f"{up} {side}", f"{down} {side}", f"middle {side}")[near % 3])
        if g[0] == k:
            placed.append((float(xi), float(yi)))
    fig = go.Figure(go.Scatter(x=x, y=y, mode="lines+markers+text", text=text, textposition=position,
                               cliponaxis=False, textfont=dict(size=11),
                               name="MARS strength sweep", marker=dict(color=COLORS["steered"], size=10),
                               customdata=[f"λ={k}" for k in keys],
                               hovertemplate="%{customdata}: over-refusal %{x:.2f}, refusal %{y:.2f}<extra></extra>"))
    _layout(fig, "Strength sweep: refusal of harmful vs over-refusal", "over-refusal (harmless refused)",
            "refusal of harmful inputs", title_px=HALF_FIG_PX)
    fig.update_xaxes(range=[-0.05, 1.05])
    fig.update_yaxes(range=[-0.05, 1.05])
    return fig
