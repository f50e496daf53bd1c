"""What the dashboard draws for one analysed input: re-scoring at any layer, and every figure (pure; no model).

`analysis.analyze_stream` runs the model once and keeps the residuals of every layer; this module turns those and the
fitted state into a `LayerView` (scores and where MARS moves the input, from `rule.mars_response`, the same
function the steering hook calls) and into plotly figures, so the toggle and the layer inspector never touch the model.

Example:
    >>> view = rescore(state, analysis.acts, "image", SteerOptions(), layer=12)      # doctest: +SKIP
    >>> figs, view = build_figures(state, analysis, layer=12)                          # doctest: +SKIP
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace

import plotly.graph_objects as go
import torch

from ..analysis.analyze import Analysis
from ..core import rule as R
from ..core.projection import plane_coords, project, project_onto
from ..core.state import MarsState
from ..steer.steering import SteerOptions, gate_scores, plan
from . import figures as F
from . import map_plots as MP

__all__ = ["DEFAULT_PROJECTION", "LayerView", "PROJECTIONS", "build_figures", "hr_current", "hr_figure",
           "map_figures", "map_files", "occlusion_figure", "projection_key", "rescore", "state_figures"]


@dataclass
class LayerView:
    """The current input at one layer: raw / re-centred / steered residuals and their scores."""

    layer: int  # the push layer this view shows
    detect_layer: int  # where the gate read its score
    rule: R.MarsRule  # tau (of the detection layer), t*, margin, strength, gated, steer
    s_gate: float  # the score the gate read (re-centred, at detect_layer)
    s_gate_raw: float  # the same site's score before re-centring (s_gate_raw - s_gate: the offset's share)
    s_raw: float
    s_recentred: float
    s_steered: float  # score (re-centred) after the displacement
    gate_open: bool
    displacement_norm: float
    h_raw: torch.Tensor  # [d]
    h_recentred: torch.Tensor  # [d]
    h_steered: torch.Tensor  # [d] re-centred + displacement: where the gate and trust region see the input land
    gate_position: str = "post"  # where the gate read: "post" (t_post) or "inst" (t_inst)

    @property
    def tau(self) -> float:
        return self.rule.tau

    @property
    def t_star(self) -> float:
        return self.rule.t_star

    def to_json(self) -> dict:
        return {"layer": self.layer, "detect_layer": self.detect_layer, "gate_position": self.gate_position,
                **asdict(self.rule), **{
            k: getattr(self, k) for k in ("s_gate", "s_gate_raw", "s_raw", "s_recentred", "s_steered", "gate_open",
                                          "displacement_norm")}}


def rescore(state: MarsState, acts: torch.Tensor, modality: str, options: SteerOptions,
            layer: int | None = None, acts_inst: torch.Tensor | None = None) -> LayerView:
    """Score and steer the captured (unsteered) residuals `acts [L, d]` (t_post) with the push at `layer` (default:
    the options' / state's) and the gate read at its layer and position (`acts_inst [L, d]` for t_inst), as the
    hook does.

    Pure maths through `rule.mars_response`, so it honours strength, mode and steer exactly as the hook does.
    """
    opts = options if layer is None else replace(options, layer=layer)
    p = plan(state, opts)
    layer, rule = p.layer, p.rule
    h = R.as_float64(acts[layer])  # [d]
    mu_minus, r = state.mu_minus[layer], state.r[layer]  # [d], [d]
    delta = state.offset(modality, layer) if opts.recenter else None
    at_gate = acts if p.gate_position == "post" else acts_inst
    if at_gate is None:
        raise ValueError("the gate reads t_inst but this result holds no residuals there: run it again")
    s_gate = gate_scores(state, p, at_gate[p.detect_layer][None], [modality], opts.recenter)  # [1]
    s_gate_raw = gate_scores(state, p, at_gate[p.detect_layer][None], [modality], False)  # [1]
    out = R.mars_response(h, mu_minus, r, rule, delta, gate_score=s_gate[0])
    h_rec = h if delta is None else R.recentre(h, delta)  # [d]
    h_steered = h_rec + out.displacement  # [d]
    return LayerView(layer=layer, detect_layer=p.detect_layer, rule=rule, s_gate=float(s_gate[0]),
                     s_gate_raw=float(s_gate_raw[0]),
                     s_raw=float(R.unsafety_score(h, mu_minus, r)),
                     s_recentred=float(out.score), s_steered=float(R.unsafety_score(h_steered, mu_minus, r)),
                     gate_open=bool(out.gate_open), displacement_norm=float(out.displacement.norm()),
                     h_raw=h.float(), h_recentred=h_rec.float(), h_steered=h_steered.float(),
                     gate_position=p.gate_position)


# The Centroids tab's projections: label on the page -> key. The r̂ view comes first: the axis MARS reads is x, so
# the two centroids are always apart along it (PCA's top two directions need not contain r̂ at all).
PROJECTIONS = {"r̂ × top PC": "rhat", "PCA": "pca", "UMAP": "umap"}
DEFAULT_PROJECTION = "r̂ × top PC"


def projection_key(method: str) -> str:
    """A projection's label or key (any case) -> "rhat", "pca" or "umap".

    >>> projection_key("r̂ × top PC"), projection_key("pca"), projection_key("UMAP")
    ('rhat', 'pca', 'umap')
    """
    keys = {k.lower(): v for k, v in PROJECTIONS.items()} | {v: v for v in PROJECTIONS.values()}
    try:
        return keys[method.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown projection {method!r}: use one of {list(PROJECTIONS)}") from None


# UMAP fits (seconds each) are kept per (state, layer): a layer-inspect or a projection switch on any page reuses
# them. A few only: one state is loaded at a time, and a swap leaves the old one's to be pushed out.
_UMAP_KEEP = 4
_umaps: OrderedDict[tuple, object] = OrderedDict()
_umaps_lock = threading.Lock()


def _umap(state: MarsState, layer: int):
    """The UMAP embedding of `state`'s calibration points at `layer`, fitted once per (state, layer)."""
    key = (state.fingerprint(), layer, state.config.seed)
    with _umaps_lock:
        if key in _umaps:
            _umaps.move_to_end(key)
            return _umaps[key]
    proj = project(state.diagnostics.calib_points, method="umap", seed=state.config.seed)
    with _umaps_lock:
        _umaps[key] = proj
        while len(_umaps) > _UMAP_KEEP:
            _umaps.popitem(last=False)
    return proj


def _centroid_fig(state: MarsState, layer: int, view: LayerView | None, method: str) -> go.Figure:
    diag = state.diagnostics
    method = projection_key(method)
    axes = None
    if method == "rhat" and diag.plane_points is not None and diag.plane_pc is not None:
        mu_minus, r, pc = state.mu_minus[layer], state.r[layer], diag.plane_pc[layer]
        coords, name = diag.plane_points[:, layer].numpy(), "r̂ × top PC"
        fn = lambda x: plane_coords(torch.as_tensor(x), mu_minus, r, pc).numpy()  # noqa: E731
        axes = ("unsafety score s along r̂ (0 = safe centroid, 1 = unsafe)", "top PC of the residual (units of ||r||)")
    elif method == "umap" and diag.calib_points is not None and layer == state.layer:
        proj = _umap(state, layer)
        coords, fn, name = proj.coords, proj.transform, "UMAP"
    elif diag.proj_points is None or diag.proj_basis is None or diag.proj_mean is None:
        # an older state without per-layer projections: PCA of the chosen layer only
        proj = project(diag.calib_points, method="pca")
        coords, fn, name = proj.coords, proj.transform, "PCA"
    else:
        mean, basis = diag.proj_mean[layer], diag.proj_basis[layer]  # [d], [2, d]
        coords, name = diag.proj_points[:, layer].numpy(), "PCA"
        fn = lambda x: project_onto(torch.as_tensor(x), mean, basis).numpy()  # noqa: E731
    cents = fn(torch.stack([state.mu_minus[layer], state.mu_plus[layer]]).float())
    cur = None
    if view is not None:
        p = fn(torch.stack([view.h_raw, view.h_recentred, view.h_steered]))
        cur = {"raw": tuple(p[0]), "recentred": tuple(p[1]), "steered": tuple(p[2])}
    fig = F.centroid_figure(coords, diag.calib_labels, {"safe": tuple(cents[0]), "unsafe": tuple(cents[1])}, cur,
                            method=name, axes=axes)
    note = ""
    if method == "umap" and name != "UMAP":
        note = f" — UMAP is fitted at layer {state.layer} only"
    elif method == "rhat" and name != "r̂ × top PC":
        note = " — this state keeps no r̂ plane: refit it for the r̂ view"
    return fig.update_layout(title_text=f"Calibration activations at layer {layer} ({name}){note}")


def _plane_fig(state: MarsState, layer: int, view: LayerView | None) -> go.Figure | None:
    diag = state.diagnostics
    if diag.plane_points is None or diag.plane_pc is None:
        return None
    cur = None
    if view is not None:
        h = torch.stack([view.h_raw, view.h_recentred, view.h_steered])  # [3, d]
        pts = plane_coords(h, state.mu_minus[layer], state.r[layer], diag.plane_pc[layer]).tolist()
        cur = dict(zip(("raw", "recentred", "steered"), map(tuple, pts), strict=True))
    tau = view.tau if view is not None else float(state.taus[layer])
    return F.plane_figure(diag.plane_points[:, layer].numpy(), diag.calib_labels, cur, tau, state.target_level,
                          layer)


HR_TITLE = "Harmfulness × refusal"
NO_INST = ("This state has no t_inst fit (it was fitted before gate positions):<br>refit it to plot harmfulness at "
           "the instruction's last token against refusal at t_post.")
NO_HR = ("This state keeps no harmfulness × refusal points (it was fitted before they were kept):<br>refit it to "
         "plot them.")


def hr_current(state: MarsState, analysis: Analysis, view: LayerView | None = None
               ) -> dict[str, tuple[float, float]] | None:
    """The input in the harmfulness x refusal plane, raw / re-centred / steered -> (x, y): x its harmfulness at t_inst
    (the inst axis at its layer, re-centred by that axis' offset), y its refusal score at t_post at the state's push
    layer (`rescore`; `view` is reused when it is that layer's). The push never reaches t_inst: x stays put from
    re-centred to steered. None without a t_inst fit or t_inst residuals."""
    if state.inst is None or analysis.acts_inst is None:
        return None
    modality, opts = analysis.query.modality, analysis.options
    if view is None or view.layer != state.layer:
        view = rescore(state, analysis.acts, modality, opts, state.layer, analysis.acts_inst)
    p = plan(state, SteerOptions(gate_position="inst", detect_layer=_hr_inst_layer(state)))
    h = analysis.acts_inst[p.detect_layer][None].double()  # [1, d]
    x_raw = float(gate_scores(state, p, h, [modality], False)[0])
    x_rec = float(gate_scores(state, p, h, [modality], opts.recenter)[0])
    return {"raw": (x_raw, view.s_raw), "recentred": (x_rec, view.s_recentred), "steered": (x_rec, view.s_steered)}


def _hr_inst_layer(state: MarsState) -> int:
    """The t_inst layer the plane's points were scored at: the fitted one (an override of the gate's layer moves the
    gate, not the calibration points)."""
    return int(state.diagnostics.gate_choice.get("inst", {}).get("layer", state.inst.detect_layer))


def hr_figure(state: MarsState, current: dict[str, tuple[float, float]] | None = None) -> go.Figure:
    """The harmfulness x refusal plane of the calibration prompts (and `current`, from `hr_current`), with the
    t_inst threshold at the inst axis' layer and the t_post one at the push layer; a placeholder saying to refit for
    a state without the t_inst fit or its points."""
    diag = state.diagnostics
    if state.inst is None:
        return F.placeholder_figure(NO_INST, HR_TITLE)
    if diag.hr_points is None or not diag.hr_labels:
        return F.placeholder_figure(NO_HR, HR_TITLE)
    li = _hr_inst_layer(state)
    return F.harm_refusal_figure(diag.hr_points.numpy(), diag.hr_labels, current, float(state.inst.taus[li]),
                                 float(state.taus[state.layer]), li, state.layer)


def state_figures(state: MarsState, layer: int | None = None, view: LayerView | None = None,
                  method: str = "rhat") -> dict[str, go.Figure]:
    """Every figure that depends only on the fitted state (and optionally the current input's view)."""
    layer = state.layer if layer is None else layer
    diag = state.diagnostics
    ls = diag.layer_scores.to_dict()
    r_norm = state.r_norm
    ratio = {m: [float(x) for x in (off.norm(dim=-1) / r_norm)] for m, off in state.offsets.items()}
    before, after = {"image": ls["misalignment_before"]}, {"image": ls["misalignment_after"]}
    if diag.misalignment_video_before is not None and diag.misalignment_video_after is not None:
        before["video"], after["video"] = diag.misalignment_video_before, diag.misalignment_video_after
    allowed = diag.allowed_layers or (0, state.num_layers)
    scores = None if view is None else {"raw": view.s_raw, "recentred": view.s_recentred, "steered": view.s_steered}
    p = plan(state, SteerOptions(layer=layer))
    rule = view.rule if view is not None else p.rule
    detect, position = (p.detect_layer, p.gate_position) if view is None else (view.detect_layer, view.gate_position)
    gate = None
    if detect != layer or position != "post":
        gate = F.GateRead(layer=detect, tau=rule.tau, score=None if view is None else view.s_gate, position=position)
    figs = {
        "centroids": _centroid_fig(state, layer, view, method),
        "modality_offset": F.modality_offset_figure(ratio, before, after, layer),
        "trust_region": F.trust_region_figure(rule, scores, (float(diag.spread_safe[layer]),
                                                             float(diag.spread_unsafe[layer])), layer, gate),
        "target_curve": F.target_curve_figure(diag.target_curve, state.target_level, state.layer),
        "layer_scores": F.layer_scores_figure(ls, state.layer, allowed, detect_layer=state.gate_layer,
                                              inspected=layer,
                                              gate_position=state.gate_position),
        "hr_plane": hr_figure(state),
    }
    plane = _plane_fig(state, layer, view)
    if plane is not None:
        figs["plane"] = plane
    return figs


def build_figures(state: MarsState, analysis: Analysis | None, layer: int | None = None,
                  method: str = "rhat") -> tuple[dict[str, go.Figure], LayerView | None]:
    """All dashboard figures for the current analysis at `layer`, plus the layer view used."""
    view = None
    if analysis is not None:
        view = rescore(state, analysis.acts, analysis.query.modality, analysis.options, layer, analysis.acts_inst)
        layer = view.layer
    figs = state_figures(state, layer, view, method)
    if analysis is not None:
        figs["hr_plane"] = hr_figure(state, hr_current(state, analysis, view))
    if analysis is not None and analysis.frame_scores is not None:
        figs["frames"] = F.frame_scores_figure(analysis.frame_scores, view.tau, analysis.frame_indices, None,
                                               view.detect_layer, clip_score=view.s_gate,
                                               position=view.gate_position, recenter=analysis.options.recenter)
    return figs, view


def _map_title(analysis: Analysis, m) -> str:
    q = analysis.query
    where = "image" + ("s" if len(q.images) > 1 else "") if q.images else "video's sampled frames"
    src = {"per-position": "per-position offsets", "mean modality offset": "the mean modality offset"}.get(
        m.offset_source, "no offset")
    how = f"re-centred ({src})" if m.recenter else "raw, not re-centred"
    which = "the gate's layer" if m.layer == analysis.result.gate_layer else "the push layer"
    return f"Where in the {where}: each token's unsafety score at layer {m.layer} ({which}), {how}"


def map_figures(analysis: Analysis | None, state: MarsState | None = None, recenter: bool | None = None,
                at_push: bool = False) -> dict[str, go.Figure]:
    """"Where in the input" for the current analysis: `map_image` (the heatmap over the image, or over each sampled
    frame of a video) and `map_tokens` (the prompt's tokens coloured by score); {} when it has no map.

    `recenter` (with `state`) re-scores the map from its kept residuals with re-centring on or off, and `at_push`
    scores the push layer's residuals from the same prefill instead of the gate's layer (no model call); the
    defaults show the map as the Run computed it."""
    if analysis is None or analysis.input_map is None:
        return {}
    m, q = analysis.input_map, analysis.query
    from ..maps.scoring import rescore as rescore_map

    opts = analysis.options if recenter is None else replace(analysis.options, recenter=recenter)
    if at_push:
        if analysis.push_residuals is None:
            raise ValueError(f"the gate reads and the push acts at the same layer ({m.layer}): this is its map")
        m = rescore_map(state, m, opts, h=analysis.push_residuals, layer=analysis.result.layer)
    elif recenter is not None and recenter != m.recenter:
        m = rescore_map(state, m, opts)
    how = "re-centred" if m.recenter else "raw"
    half = MP.score_range(m.scores)  # one colour range for the image map and the token strip: one colour, one score
    out = {"map_tokens": MP.token_strip_figure(m, f"The prompt, token by token: {how} score at layer {m.layer} "
                                                  "(media runs collapsed to their mean)", half=half)}
    panels = MP.map_panels(m, q.images, q.video or (), analysis.frame_indices)
    if panels:
        out["map_image"] = MP.overlay_figure(panels, _map_title(analysis, m), half=half, notes=m.notes)
    return out


def map_files(analysis: Analysis | None) -> dict[str, bytes]:
    """The maps' files for the Export zip (PNG per panel and of the token strip, per-position CSV, HTML)."""
    if analysis is None or analysis.input_map is None:
        return {}
    q = analysis.query
    return MP.export_files(analysis.input_map, q.images, q.video or (), analysis.frame_indices)


def occlusion_figure(analysis: Analysis, res) -> go.Figure:
    """The occlusion check (`occlusion.occlusion`'s result) as heatmaps over the input: s(input) - s(covered)."""
    from ..analysis.occlusion import occlusion_grids

    q = analysis.query
    panels = []
    for g in occlusion_grids(res):
        src = q.images[g.index] if g.kind == "image" else (q.video or ())[g.index]
        label = (f"image {g.index + 1}" if g.kind == "image" else
                 f"frame {g.index}" + ("" if analysis.frame_indices is None else
                                       f" (video frame #{analysis.frame_indices[g.index]})"))
        panels.append(MP.Panel(label, src, g))
    title = (f"Occlusion: the gate's score {res.base:.3f} minus the score with each region covered in the neutral "
             "colour (positive = the region pushes toward refusal)")
    return MP.overlay_figure(panels, F.wrap_title(title, font_px=14),
                             colorbar="Δ score", half=MP.score_range(res.contribution, floor=1e-6),
                             notes=res.notes)
