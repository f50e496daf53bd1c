"""A planted MarsState (no model): equality, .to(), round-trip, old formats, and one source for the push.

The hook's edit function (`steering.mars_edit`), the dashboard's re-scoring (`views.rescore`) and the trust-region
figure all go through `rule.mars_response`; these tests check that they agree on planted geometry.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mars_viz.analysis.analyze import Analysis
from mars_viz.core import rule as R
from mars_viz.core import selection as S
from mars_viz.core.state import STATE_JSON, Diagnostics, GateAxis, MarsConfig, MarsState
from mars_viz.model.inputs import Query
from mars_viz.steer.results import Answer, PairResult
from mars_viz.steer.steering import SteerOptions, gate_scores, mars_edit, plan
from mars_viz.views.panels import build_figures, hr_current, rescore, state_figures

L, D = 4, 8


def planted_state(seed: int = 0) -> MarsState:
    g = torch.Generator().manual_seed(seed)
    mu_minus = torch.randn(L, D, generator=g, dtype=torch.float64)
    r = torch.randn(L, D, generator=g, dtype=torch.float64)
    ls = S.LayerScores(**{n: torch.linspace(0.1, 0.9, L, dtype=torch.float64) for n in (
        "separability", "fisher", "consistency", "split_half", "steerability", "misalignment_before",
        "misalignment_after", "combined")})
    diag = Diagnostics(layer_scores=ls, target_curve={1.0: 0.2, 3.0: 0.6}, spread_unsafe=torch.full((L,), 0.2),
                       spread_safe=torch.full((L,), 0.1), allowed_layers=(0, L),
                       calib_points=torch.randn(6, D, generator=g), calib_labels=["safe", "unsafe"] * 3)
    return MarsState(model_id="planted", model_type="toy", num_layers=L, hidden_size=D, mu_plus=mu_minus + r,
                     mu_minus=mu_minus, offsets={"image": 0.3 * r}, taus=torch.full((L,), 0.5, dtype=torch.float64),
                     layer=2, target_level=3.0, config=MarsConfig(margin=0.1), diagnostics=diag)


def at_score(state: MarsState, layer: int, s: float) -> torch.Tensor:
    return state.mu_minus[layer] + s * state.r[layer]  # [d], a raw (text) residual with score s


def test_push_curve_at_half_strength_is_half_and_matches_the_hook():
    state = planted_state()
    layer = state.layer
    curves = {}
    for lam in (1.0, 0.5):
        fig = state_figures(state, layer, rescore(state, torch.zeros(L, D), "text", SteerOptions(strength=lam)))
        (push,) = [t for t in fig["trust_region"].data if t.name and t.name.startswith("push")]
        curves[lam] = (np.array(push.x), np.array(push.y))
        # the hook, on residuals placed along the axis, moves each by exactly the plotted push (in units of ||r||)
        s_grid = torch.tensor([0.2, 0.55, 0.8, 1.5, 2.9, 3.5], dtype=torch.float64)
        h = torch.stack([at_score(state, layer, float(s)) for s in s_grid])  # [6, d]
        _, edit = mars_edit(state, SteerOptions(strength=lam, recenter=False), None)
        moved = (edit(h.clone(), {}) - h).norm(dim=-1) / state.r[layer].norm()  # [6]
        x, y = curves[lam]
        assert np.allclose(moved.numpy(), np.interp(s_grid.numpy(), x, y), atol=2e-3)
    assert np.array_equal(curves[1.0][0], curves[0.5][0])
    assert np.allclose(curves[0.5][1], 0.5 * curves[1.0][1]) and curves[1.0][1].max() > 0


def test_rescore_and_hook_agree_for_every_mode():
    state = planted_state()
    acts = torch.stack([at_score(state, i, 1.2) for i in range(L)]).float() + 0.3 * state.r.float()  # [L, d]
    for opts in (SteerOptions(), SteerOptions(strength=0.5), SteerOptions(mode="ungated"), SteerOptions(steer=False),
                 SteerOptions(recenter=False), SteerOptions(layer=1), SteerOptions(layer=3, detect_layer=0)):
        view = rescore(state, acts, "image", opts)
        deltas = state.offsets["image"][view.layer][None] if opts.recenter else None
        p = plan(state, opts)
        gate = {"s": gate_scores(state, p, acts[p.detect_layer][None], ["image"], opts.recenter)}
        info: dict = {}
        _, edit = mars_edit(state, opts, deltas, gate)
        h = acts[view.layer][None].double()
        moved = edit(h.clone(), info) - h
        assert float(moved.norm()) == pytest.approx(view.displacement_norm, rel=1e-9, abs=1e-12)
        assert float(info["s_recentred"][0]) == pytest.approx(view.s_recentred)
        assert bool(info["gate_open"][0]) == view.gate_open
        assert float(info["s_gate"][0]) == pytest.approx(view.s_gate) and view.detect_layer == p.detect_layer


def test_ungated_moves_a_safe_input_the_gate_leaves_alone():
    state = planted_state()
    acts = torch.stack([at_score(state, i, 0.0) for i in range(L)]).float()
    assert rescore(state, acts, "text", SteerOptions()).displacement_norm == 0.0
    assert rescore(state, acts, "text", SteerOptions(mode="ungated")).s_steered == pytest.approx(3.0)


def test_equality_to_and_round_trip(tmp_path):
    a, b = planted_state(), planted_state()
    assert a == b and a.fingerprint() == b.fingerprint()
    b.taus = b.taus.clone()
    b.taus[0] += 1e-6
    assert a != b and a.fingerprint() != b.fingerprint()
    moved = a.to("cpu")
    assert moved == a and moved is not a
    a.save(tmp_path)
    again = MarsState.load(tmp_path)
    assert again == a
    assert again.diagnostics.allowed_layers == (0, L)


def test_old_state_with_untyped_extra_loads(tmp_path):
    state = planted_state()
    state.diagnostics.misalignment_video_before = [0.1] * L
    state.save(tmp_path)
    meta = json.loads((tmp_path / STATE_JSON).read_text())
    meta["extra"] = meta.pop("diagnostics")  # how format 1 stored them before the split (shape 1a, core/migrate.py)
    meta["format_version"] = 1
    meta["extra"]["allowed_layers"] = [1, 3]
    (tmp_path / STATE_JSON).write_text(json.dumps(meta))
    again = MarsState.load(tmp_path)
    assert again.diagnostics.allowed_layers == (1, 3)
    assert again.diagnostics.misalignment_video_before == [0.1] * L
    assert torch.equal(again.mu_plus, state.mu_plus)


def test_two_layer_gate_reads_the_detection_layer_and_pushes_at_the_other():
    state = planted_state()
    state.detect_layer = 3
    # at the detection layer the input is clearly unsafe; at the push layer it sits at the safe centroid
    acts = torch.stack([at_score(state, i, 2.0 if i == 3 else 0.0) for i in range(L)]).float()
    view = rescore(state, acts, "text", SteerOptions(recenter=False))
    assert view.layer == 2 and view.detect_layer == 3 and view.gate_open
    assert view.s_gate == pytest.approx(2.0) and view.s_recentred == pytest.approx(0.0, abs=1e-6)
    assert view.s_steered == pytest.approx(3.0)  # pushed to t* along the push layer's own axis
    assert view.rule.tau == float(state.taus[3])
    # the same input, gate read at the push layer (single-layer MARS): closed, no push
    assert not rescore(state, acts, "text", SteerOptions(recenter=False, detect_layer=2)).gate_open
    fig = state_figures(state, 2, view)["trust_region"]
    assert "gate read at layer 3" in fig.layout.title.text
    assert any("s = 2.00 > τ" in (a.text or "") for a in fig.layout.annotations)


def test_credibility_warnings_name_what_is_wrong():
    state = planted_state()
    state.diagnostics.behaviour = {"harmful_refused": 30, "fallback": False}
    state.diagnostics.layer_scores.separability[state.detect_layer] = 0.97
    assert state.credibility_warnings() == []
    state.diagnostics.behaviour = {"harmful_refused": 0, "fallback": True}
    state.diagnostics.layer_scores.separability[state.detect_layer] = 0.35
    warnings = state.credibility_warnings()
    assert len(warnings) == 2 and "refused none" in warnings[0] and "0.35" in warnings[1]


def test_centroid_plot_says_its_layer_and_when_umap_falls_back_to_pca():
    state = planted_state()
    state.diagnostics.calib_points = None  # no UMAP points: the fallback must say so, not pretend
    state.diagnostics.proj_mean = torch.zeros(L, D)
    state.diagnostics.proj_basis = torch.eye(D)[:2].repeat(L, 1, 1)
    state.diagnostics.proj_points = torch.zeros(6, L, 2)
    title = state_figures(state, 1, None, method="umap")["centroids"].layout.title.text
    assert "layer 1 (PCA)" in title and "UMAP is fitted at layer 2 only" in title
    assert state_figures(state, 1, None, method="pca")["centroids"].layout.title.text.endswith("layer 1 (PCA)")


def with_inst(state: MarsState, li: int = 1) -> MarsState:
    """`state` with a planted t_inst axis (its own centroids, tau 0.4, an image offset) read at layer `li`, and the
    harmfulness x refusal points of four prompts."""
    from dataclasses import replace

    g = torch.Generator().manual_seed(7)
    mu_minus = torch.randn(L, D, generator=g, dtype=torch.float64)
    r = torch.randn(L, D, generator=g, dtype=torch.float64)
    inst = GateAxis("inst", mu_minus + r, mu_minus, torch.full((L,), 0.4, dtype=torch.float64), {"image": 0.5 * r}, li)
    diag = replace(state.diagnostics, hr_points=torch.tensor([[0.9, 0.8], [0.1, 0.1], [0.2, 0.7], [0.8, 0.1]]),
                   hr_labels=["harmful", "harmless", "look-alike", "jailbreak"])
    return replace(state, inst=inst, diagnostics=diag)


def planted_analysis(state: MarsState, s_post: float, s_inst: float, options: SteerOptions) -> Analysis:
    """An image input whose re-centred scores are `s_post` at t_post and `s_inst` at t_inst, at every layer."""
    acts = torch.stack([at_score(state, i, s_post) + state.offsets["image"][i] for i in range(L)]).float()
    inst = state.inst
    acts_inst = torch.stack([inst.mu_minus[i] + s_inst * inst.r[i] + inst.offsets["image"][i] for i in range(L)])
    answer = Answer("ok", False, [1])
    result = PairResult(prompt="p", modality="image", layer=state.layer, score_raw=0.0, score_recentred=0.0, tau=0.5,
                        t_star=3.0, gate_open=False, gate_weight=0.0, strength=1.0, recenter=True, steer=True,
                        displacement_norm=0.0, unsteered=answer, steered=answer)
    return Analysis(query=Query("p", images=(np.zeros((8, 8, 3), dtype=np.uint8),)), options=options,
                    result=result, acts=acts, state_fingerprint=state.fingerprint(), acts_inst=acts_inst.float())


def test_hr_plane_is_a_placeholder_without_the_t_inst_fit_or_its_points():
    state = planted_state()
    fig = state_figures(state)["hr_plane"]
    (note,) = [a.text for a in fig.layout.annotations]
    assert "no t_inst fit" in note and "refit" in note and not fig.data
    fitted = with_inst(state)
    fitted.diagnostics.hr_points, fitted.diagnostics.hr_labels = None, []
    (note,) = [a.text for a in state_figures(fitted)["hr_plane"].layout.annotations]
    assert "no harmfulness × refusal points" in note and "refit" in note


def test_hr_plane_draws_the_points_the_thresholds_and_the_input_moving_up():
    state = with_inst(planted_state(), li=1)
    state.inst.taus[1] = 0.35  # the x threshold is the inst axis' tau at its layer, not another one
    fig = state_figures(state)["hr_plane"]
    assert [t.name for t in fig.data] == ["harmful prompts", "harmless prompts", "look-alike prompts (harmless)",
                                          "jailbreak prompts"]
    (vx,) = [s for s in fig.layout.shapes if s.name == "harmfulness threshold"]
    (hy,) = [s for s in fig.layout.shapes if s.name == "refusal threshold"]
    assert vx.x0 == pytest.approx(0.35) and hy.y0 == pytest.approx(float(state.taus[state.layer]))
    assert "t_inst, layer 1" in fig.layout.title.text and f"t_post, layer {state.layer}" in fig.layout.title.text
    # an image input: harmful at t_inst (0.9 > 0.35), at the safe side at t_post: a gate at t_inst opens, pushes up
    a = planted_analysis(state, s_post=0.1, s_inst=0.9, options=SteerOptions(gate_position="inst"))
    cur = hr_current(state, a)
    x_raw = float(R.unsafety_score(a.acts_inst[1].double(), state.inst.mu_minus[1], state.inst.r[1]))
    assert cur["raw"][0] == pytest.approx(x_raw) and cur["raw"][0] == pytest.approx(0.9 + 0.5)  # offset 0.5 r
    assert cur["recentred"][0] == pytest.approx(0.9) and cur["steered"][0] == cur["recentred"][0]
    assert cur["raw"][1] == pytest.approx(0.1 + 0.3) and cur["recentred"][1] == pytest.approx(0.1)
    assert cur["steered"][1] == pytest.approx(3.0)  # pushed to t* along r at t_post
    figs, view = build_figures(state, a)
    assert view.gate_position == "inst" and view.gate_open
    path = [t for t in figs["hr_plane"].data if t.name == "input path"][0]
    assert list(path.x) == pytest.approx([1.4, 0.9, 0.9]) and list(path.y) == pytest.approx([0.4, 0.1, 3.0])
    # the same input with the gate at t_post: closed there, the point does not move
    cur = hr_current(state, planted_analysis(state, s_post=0.1, s_inst=0.9, options=SteerOptions(gate_position="post")))
    assert cur["steered"] == pytest.approx(cur["recentred"])
    # the layer inspector elsewhere: the plane stays at the push layer, where the calibration points are
    figs, view = build_figures(state, a, layer=0)
    path = [t for t in figs["hr_plane"].data if t.name == "input path"][0]
    assert view.layer == 0 and list(path.y) == pytest.approx([0.4, 0.1, 3.0])


def test_a_gate_at_t_inst_is_named_in_the_trust_region_and_layer_scores():
    state = with_inst(planted_state(), li=2)
    a = planted_analysis(state, s_post=0.1, s_inst=0.9, options=SteerOptions(gate_position="inst"))
    figs, view = build_figures(state, a)
    assert (view.detect_layer, view.gate_position, view.to_json()["gate_position"]) == (2, "inst", "inst")
    assert figs["trust_region"].layout.title.text == "Push at layer 2, gate read at layer 2 at t_inst"
    state.gate_position = "inst"
    texts = [x.text for x in state_figures(state)["layer_scores"].layout.annotations]
    assert "gate 2 (t_inst)" in texts
