"""One input, analysed: the narrow interface the dashboard calls (no gradio here).

`analyze_stream` runs the model once (both answers from one batched generation, every layer's residual captured from
the same prefill); everything after that — re-scoring at another layer, the figures, the JSON — is pure and needs no
model call, so the dashboard's toggle and layer slider are instant.

Example:
    >>> for upd in analyze_stream(backbone, state, Query("hi"), SteerOptions()):   # doctest: +SKIP
    ...     print(upd.unsteered, "|", upd.steered)
    >>> view = rescore(state, upd.analysis.acts, "image", SteerOptions(), layer=12)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import plotly.graph_objects as go
import torch

from . import geometry as G
from . import plots as P
from .activations import forward_last
from .backbone import Backbone
from .generate import PairResult, PairStrategy, stream_pair
from .inputs import Query
from .state import MarsState
from .steering import SteerOptions, resolve

__all__ = ["Analysis", "LayerView", "analyze_stream", "build_figures", "frame_scores", "rescore", "state_figures"]


@dataclass
class LayerView:
    """The current input at one layer: raw / re-centred / steered residuals and their scores."""

    layer: int
    tau: float
    t_star: float
    margin: float
    s_raw: float
    s_recentred: float
    s_steered: float  # score (re-centred) after the displacement
    gate_open: bool
    displacement_norm: float
    h_raw: torch.Tensor  # [d]
    h_recentred: torch.Tensor  # [d]
    h_steered: torch.Tensor  # [d] re-centred + displacement: where the gate and trust region see the input land

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in ("layer", "tau", "t_star", "margin", "s_raw", "s_recentred",
                                              "s_steered", "gate_open", "displacement_norm")}


@dataclass
class Analysis:
    query: Query
    options: SteerOptions
    result: PairResult
    acts: torch.Tensor  # [L, d] raw residuals at the last prompt position
    state_fingerprint: str  # `MarsState.fingerprint()` of the state it was computed with
    frame_scores: list[float] | None = None  # video: re-centred score of each sampled frame at the chosen layer
    frame_indices: list[int] | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        out = self.result.to_json()
        if self.frame_scores is not None:
            out["frame_scores"] = self.frame_scores
            out["frame_indices"] = self.frame_indices
        if self.notes:
            out["notes"] = self.notes
        return out

    def check_state(self, state: MarsState | None) -> None:
        """Raise ValueError unless `state` is the one this result was computed with.

        The residuals are re-scored against the loaded state (toggle, layer inspector, export); against another
        model or state that would draw a figure that mixes two fits, so callers ask the user to run again instead.
        """
        if state is None or state.fingerprint() != self.state_fingerprint:
            raise ValueError("this result was computed with another model/state: run it again")


def rescore(state: MarsState, acts: torch.Tensor, modality: str, options: SteerOptions,
            layer: int | None = None) -> LayerView:
    """Score and steer the captured residuals at `layer` (default: the options' / state's layer). Pure maths."""
    opts = options if layer is None else SteerOptions(**{**options.__dict__, "layer": layer})
    layer, tau = resolve(state, opts)
    t_star = float(state.target_level if opts.target_level is None else opts.target_level)
    h = acts[layer].double()  # [d]
    mu_minus, r = state.mu_minus[layer], state.r[layer]
    delta = state.offset(modality, layer) if opts.recenter else None
    s_raw = float(G.unsafety_score(h, mu_minus, r))
    disp, s_rec = G.steer_displacement(h, mu_minus, r, tau, t_star, opts.strength, state.config.margin, delta)
    if not opts.steer:
        disp = torch.zeros_like(disp)
    h_rec = h if delta is None else G.recentre(h, delta)
    s_steered = float(G.unsafety_score(h_rec + disp, mu_minus, r))
    return LayerView(layer=layer, tau=tau, t_star=t_star, margin=float(state.config.margin), s_raw=s_raw,
                     s_recentred=float(s_rec), s_steered=s_steered, gate_open=bool(float(s_rec) > tau),
                     displacement_norm=float(disp.norm()), h_raw=h.float(), h_recentred=h_rec.float(),
                     h_steered=(h_rec + disp).float())


@torch.inference_mode()
def frame_scores(backbone: Backbone, state: MarsState, prompt: str, frames, options: SteerOptions) -> list[float]:
    """Re-centred unsafety score of each video frame shown alone as an image, at the resolved layer."""
    layer, _ = resolve(state, options)
    acts = forward_last(backbone, [Query(prompt, images=(f,)) for f in frames])[:, layer].double()  # [F, d]
    delta = state.offset("image", layer) if options.recenter else None
    h = acts if delta is None else G.recentre(acts, delta)
    return [float(x) for x in G.unsafety_score(h, state.mu_minus[layer], state.r[layer])]


@dataclass
class StreamUpdate:
    unsteered: str
    steered: str
    analysis: Analysis | None = None  # set on the last update


def analyze_stream(backbone: Backbone, state: MarsState, query: Query, options: SteerOptions,
                   max_new_tokens: int = 64, frame_indices: list[int] | None = None,
                   notes: list[str] | None = None, strategy: PairStrategy = "auto") -> Iterator[StreamUpdate]:
    """Stream both answers, then yield the full `Analysis` (with per-frame scores for a video)."""
    for upd in stream_pair(backbone, state, query, options, max_new_tokens=max_new_tokens, strategy=strategy):
        if not upd.done:
            yield StreamUpdate(upd.unsteered, upd.steered)
            continue
        fs = None
        if query.video:
            fs = frame_scores(backbone, state, query.prompt, query.video, options)
        analysis = Analysis(query=query, options=options, result=upd.result, acts=upd.acts,
                            state_fingerprint=state.fingerprint(), frame_scores=fs,
                            frame_indices=frame_indices, notes=list(notes or []))
        yield StreamUpdate(upd.unsteered, upd.steered, analysis)


# ---- figures -------------------------------------------------------------------------------------------------------

def _layer_points(state: MarsState, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    if state.proj_points is None or state.proj_basis is None or state.proj_mean is None:
        return None
    return state.proj_points[:, layer], state.proj_mean[layer], state.proj_basis[layer]


def _centroid_fig(state: MarsState, layer: int, view: LayerView | None, method: str) -> go.Figure:
    if method == "umap" and state.calib_points is not None and layer == state.layer:
        from .projection import project

        proj = project(state.calib_points, method="umap", seed=state.config.seed)
        cents = proj.transform(torch.stack([state.mu_minus[layer], state.mu_plus[layer]]).float())
        cur = None
        if view is not None:
            pts = proj.transform(torch.stack([view.h_raw, view.h_recentred, view.h_steered]))
            cur = dict(zip(("raw", "recentred", "steered"), map(tuple, pts.tolist()), strict=True))
        return P.centroid_figure(proj.coords, state.calib_labels, {"safe": tuple(cents[0]), "unsafe": tuple(cents[1])},
                                 cur, method="UMAP")
    lp = _layer_points(state, layer)
    if lp is None:  # an older state without per-layer projections: PCA of the chosen layer only
        from .projection import project

        proj = project(state.calib_points, method="pca")
        coords, fn = proj.coords, proj.transform
    else:
        pts, mean, basis = lp
        coords, fn = pts.numpy(), (lambda x: G.project_onto(torch.as_tensor(x), mean, basis).numpy())
    cents = fn(torch.stack([state.mu_minus[layer], state.mu_plus[layer]]).float())
    cur = None
    if view is not None:
        p = fn(torch.stack([view.h_raw, view.h_recentred, view.h_steered]))
        cur = {"raw": tuple(p[0]), "recentred": tuple(p[1]), "steered": tuple(p[2])}
    return P.centroid_figure(coords, state.calib_labels, {"safe": tuple(cents[0]), "unsafe": tuple(cents[1])}, cur,
                             method="PCA")


def _plane_fig(state: MarsState, layer: int, view: LayerView | None) -> go.Figure | None:
    if state.plane_points is None:
        return None
    cur = None
    if view is not None:
        pts = state.plane_coords(torch.stack([view.h_raw, view.h_recentred, view.h_steered]), layer).tolist()
        cur = dict(zip(("raw", "recentred", "steered"), map(tuple, pts), strict=True))
    tau = view.tau if view is not None else float(state.taus[layer])
    return P.plane_figure(state.plane_points[:, layer].numpy(), state.calib_labels, cur, tau, state.target_level)


def state_figures(state: MarsState, layer: int | None = None, view: LayerView | None = None,
                  method: str = "pca") -> dict[str, go.Figure]:
    """Every figure that depends only on the fitted state (and optionally the current input's view)."""
    layer = state.layer if layer is None else layer
    ls = state.layer_scores.to_dict()
    r_norm = state.r_norm
    ratio = {m: [float(x) for x in (off.norm(dim=-1) / r_norm)] for m, off in state.offsets.items()}
    before, after = {"image": ls["misalignment_before"]}, {"image": ls["misalignment_after"]}
    if "misalignment_video_before" in state.extra:
        before["video"] = state.extra["misalignment_video_before"]
        after["video"] = state.extra["misalignment_video_after"]
    allowed = tuple(state.extra.get("allowed_layers", (0, state.num_layers)))
    scores = None if view is None else {"raw": view.s_raw, "recentred": view.s_recentred, "steered": view.s_steered}
    tau = view.tau if view is not None else (state.tau if layer == state.layer else float(state.taus[layer]))
    figs = {
        "centroids": _centroid_fig(state, layer, view, method),
        "modality_offset": P.modality_offset_figure(ratio, before, after, layer),
        "trust_region": P.trust_region_figure(tau, float(state.config.margin), state.target_level, scores,
                                              (float(state.spread_safe[layer]), float(state.spread_unsafe[layer]))),
        "target_curve": P.target_curve_figure(state.target_curve, state.target_level),
        "layer_scores": P.layer_scores_figure(ls, layer, allowed),
    }
    plane = _plane_fig(state, layer, view)
    if plane is not None:
        figs["plane"] = plane
    return figs


def build_figures(state: MarsState, analysis: Analysis | None, layer: int | None = None,
                  method: str = "pca") -> tuple[dict[str, go.Figure], LayerView | None]:
    """All dashboard figures for the current analysis at `layer`, plus the layer view used."""
    view = None
    if analysis is not None:
        view = rescore(state, analysis.acts, analysis.query.modality, analysis.options, layer)
        layer = view.layer
    figs = state_figures(state, layer, view, method)
    if analysis is not None and analysis.frame_scores is not None:
        figs["frames"] = P.frame_scores_figure(analysis.frame_scores, view.tau if view else state.tau,
                                               analysis.frame_indices, state.target_level)
    return figs, view
