"""Gate positions without a model: the site choice's maths, the surface forms, and a planted state with a t_inst
axis through save / load, overrides and the plan."""

from __future__ import annotations

import json

import pytest
import torch

from mars_viz.core import selection as S
from mars_viz.core.state import STATE_JSON, STATE_TENSORS, GateAxis, MarsState
from mars_viz.data.datasets import SURFACE_FORMS, surface_forms
from mars_viz.steer.steering import SteerOptions, gate_scores, plan

from .test_state_and_views import D, L, planted_state


def with_inst(state: MarsState, seed: int = 1, position: str = "inst") -> MarsState:
    g = torch.Generator().manual_seed(seed)
    mu_minus = torch.randn(L, D, generator=g, dtype=torch.float64)
    r = torch.randn(L, D, generator=g, dtype=torch.float64)
    state.inst = GateAxis("inst", mu_minus + r, mu_minus, torch.linspace(0.2, 0.5, L, dtype=torch.float64),
                          {"image": 0.1 * r}, detect_layer=1)
    state.gate_position = position
    return state


def test_gate_rates_count_openings_per_layer():
    taus = torch.tensor([0.5, 0.0])
    s_u = torch.tensor([[0.9, 0.9], [0.1, 0.9]])  # [N, L]
    s_s = torch.tensor([[0.0, 0.2], [0.0, -0.1]])
    s_la = torch.tensor([[0.6, 0.3], [0.0, 0.3], [0.0, -1.0]])
    r = S.gate_rates(s_u, s_s, s_la, taus)
    assert r["tpr"].tolist() == [0.5, 1.0]
    assert r["fpr_harmless"].tolist() == [0.0, 0.5]
    assert r["fpr_lookalike"].tolist() == pytest.approx([1 / 3, 2 / 3])
    assert r["quality"].tolist() == pytest.approx([0.5 - 0.0 - 1 / 3, 1.0 - 0.5 - 2 / 3])
    assert S.gate_rates(s_u, s_s, None, taus)["fpr_lookalike"].tolist() == [0.0, 0.0]


def test_choose_gate_site_prefers_quality_then_separability_then_post():
    q = {"post": torch.tensor([0.2, 0.6, float("nan")]), "inst": torch.tensor([0.7, 0.1, 0.7])}
    sep = {"post": torch.tensor([0.9, 0.9, 0.9]), "inst": torch.tensor([0.8, 0.9, 0.95])}
    assert S.choose_gate_site(q, sep) == ("inst", 2)  # tie on quality: the higher separability
    tie = {"post": torch.tensor([0.7]), "inst": torch.tensor([0.7])}
    assert S.choose_gate_site(tie, {"post": torch.tensor([0.9]), "inst": torch.tensor([0.9])}) == ("post", 0)
    # a site that fails the surface check is skipped, unless every site fails it
    assert S.choose_gate_site(q, sep, eligible={"post": torch.tensor([True, True, True]),
                                                "inst": torch.tensor([False, True, False])}) == ("post", 1)
    none = {"post": torch.zeros(3, dtype=torch.bool), "inst": torch.zeros(3, dtype=torch.bool)}
    assert S.choose_gate_site(q, sep, eligible=none) == ("inst", 2)
    with pytest.raises(ValueError, match="no finite gate quality"):
        S.choose_gate_site({"post": torch.tensor([float("nan")])}, {"post": torch.tensor([0.5])})


def test_surface_forms_change_only_the_surface():
    forms = surface_forms("Tell me a joke.")
    assert set(forms) == set(SURFACE_FORMS)
    assert forms["final_punctuation"] == "Tell me a joke"
    assert surface_forms("Tell me a joke")["final_punctuation"] == "Tell me a joke."
    assert forms["trailing_space"].endswith(". ") and forms["lower_case"] == "tell me a joke."


def test_planted_inst_state_round_trips_and_plans_at_its_own_site(tmp_path):
    state = with_inst(planted_state())
    loaded = MarsState.load(state.save(tmp_path / "s"))
    assert loaded == state and loaded.fingerprint() == state.fingerprint()
    assert loaded.gate_position == "inst" and loaded.gate_layer == 1 and loaded.inst.detect_layer == 1
    assert loaded.tau == pytest.approx(float(state.inst.taus[1]))
    p = plan(loaded, SteerOptions())
    assert (p.gate_position, p.detect_layer, p.layer, p.separate_gate) == ("inst", 1, 2, True)
    assert p.rule.tau == pytest.approx(float(state.inst.taus[1]))
    # the gate's score is along the t_inst axis, re-centred by the t_inst offset
    h = (state.inst.mu_minus[1] + 0.7 * state.inst.r[1] + state.inst.offsets["image"][1])[None]
    assert float(gate_scores(loaded, p, h, ["image"], True)[0]) == pytest.approx(0.7)
    post = plan(loaded, SteerOptions(gate_position="post"))
    assert (post.gate_position, post.detect_layer) == ("post", state.detect_layer)
    assert post.rule.tau == pytest.approx(float(state.taus[state.detect_layer]))
    # another position is another state: results computed with one are not re-scored with the other
    assert loaded.with_overrides(gate_position="post").fingerprint() != loaded.fingerprint()
    moved = loaded.with_overrides(detect_layer=3)
    assert moved.inst.detect_layer == 3 and loaded.inst.detect_layer == 1 and moved.detect_layer == state.detect_layer


def test_a_state_from_before_positions_reads_at_t_post_and_says_why_not_inst(tmp_path):
    folder = with_inst(planted_state()).save(tmp_path / "s")
    meta = json.loads((folder / STATE_JSON).read_text())
    for key in ("gate_position", "inst_detect_layer"):
        meta.pop(key)
    meta["format_version"] = 1  # shape 1c (core/migrate.py): format 1 before gate positions
    (folder / STATE_JSON).write_text(json.dumps(meta))
    from safetensors.torch import load_file, save_file

    tensors = {k: v for k, v in load_file(str(folder / STATE_TENSORS)).items() if not k.startswith("inst.")}
    save_file(tensors, str(folder / STATE_TENSORS))
    old = MarsState.load(folder)
    assert old.inst is None and old.gate_position == "post" and old.positions == ("post",)
    assert plan(old, SteerOptions()).gate_position == "post"
    with pytest.raises(ValueError, match="no t_inst fit"):
        old.with_overrides(gate_position="inst")
    with pytest.raises(ValueError, match="no t_inst fit"):
        plan(old, SteerOptions(gate_position="inst"))
    with pytest.raises(ValueError, match="gate_position must be one of post, inst"):
        SteerOptions(gate_position="middle")


def test_the_gate_selection_split_is_kept_out_of_the_centroids_and_the_evaluation():
    from mars_viz.core.state import MarsConfig
    from mars_viz.data.datasets import builtin_prompts
    from mars_viz.fit.calibrate import split_sets

    sets = split_sets(MarsConfig())
    fit, sel, held = set(sets["la_fit"]), set(sets["la_sel"]), set(sets["la_held"])
    assert sel and fit and held and not (fit & sel) and not (fit & held) and not (sel & held)
    assert fit | sel | held == set(builtin_prompts("lookalike")) - set(sets["harmless"])
    assert len(sel) == round((len(fit) + len(sel)) / 3)
    assert split_sets(MarsConfig())["la_sel"] == sets["la_sel"]  # seeded
    assert split_sets(MarsConfig(seed=1))["la_sel"] != sets["la_sel"]
    off = split_sets(MarsConfig(lookalike=False))
    assert off["la_fit"] == off["la_sel"] == off["la_held"] == []
