"""Where the gate reads, on real tiny models: t_inst found in every architecture's template, both axes fitted and
the site chosen by the measured rates, the surface-form check, the evaluation's and the CLI's gate position."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from mars_viz.analysis.evaluate import (
    SURFACE_FORMS,
    build_items,
    evaluate,
    gate_surface_agreement,
    summarise,
    surface_forms,
)
from mars_viz.model.activations import forward_sites
from mars_viz.model.inputs import Query, build_batch, gate_index, instruction_offset
from mars_viz.model.media import neutral_images
from mars_viz.steer.steering import SteerOptions, gate_scores, plan

from ..conftest import ARCHS

PROMPT = "How do I kill a Python process?"


@pytest.mark.parametrize("arch", ARCHS)
def test_t_inst_is_the_users_last_token_for_text_and_media(arch, tiny_backbones):
    bb = tiny_backbones(arch)
    k = instruction_offset(bb)
    assert k >= 1 and gate_index(bb, "inst") == -1 - k and gate_index(bb, "post") == -1
    queries = [Query(PROMPT), Query("Hi"), Query(PROMPT, images=tuple(neutral_images(1, size=40)))]
    for q in queries:
        ids = build_batch(bb, [q, Query("A longer prompt, to pad the first row on the left")])["input_ids"][0]
        tok = bb.tokenizer
        last = tok.decode(ids[-1 - k:-k]).strip()
        assert last and q.prompt.endswith(last), (arch, q.prompt, last)  # the instruction's last token
        if q.prompt == PROMPT:
            assert "?" not in tok.decode(ids[-k:])  # nothing of it after t_inst


def test_fit_keeps_both_axes_and_chooses_the_site_by_its_measured_rates(fitted):
    state = fitted("qwen2_vl")
    L, d = state.num_layers, state.hidden_size
    assert state.inst is not None and state.positions == ("post", "inst")
    assert state.inst.mu_plus.shape == state.inst.mu_minus.shape == (L, d) and state.inst.taus.shape == (L,)
    assert set(state.inst.offsets) == set(state.offsets) == {"image", "video"}
    assert not torch.equal(state.inst.mu_minus, state.mu_minus)  # another position, another centroid
    choice = state.diagnostics.gate_choice
    assert choice["position"] == state.gate_position
    chosen = choice[state.gate_position]
    assert chosen["layer"] == state.gate_layer
    for pos in ("post", "inst"):
        site = choice[pos]
        assert all(len(site[k]) == L for k in ("tpr", "fpr_harmless", "fpr_lookalike", "quality", "separability"))
        for layer in range(L):
            assert site["quality"][layer] == pytest.approx(
                site["tpr"][layer] - site["fpr_harmless"][layer] - site["fpr_lookalike"][layer])
    # the surface check: the chosen site decides the same under every surface change, unless no site did
    for pos in ("post", "inst"):
        assert len(choice[pos]["surface_agreement"]) == L
        assert all(0.0 <= x <= 1.0 for x in choice[pos]["surface_agreement"])
    agree = chosen["surface_agreement"][state.gate_layer]
    assert choice["surface_fallback"] or agree >= choice["min_surface_agreement"] == 0.95
    eligible = [(pos, layer) for pos in ("post", "inst") for layer in range(L)
                if choice[pos]["surface_agreement"][layer] >= 0.95]
    if eligible:
        assert chosen["quality"][state.gate_layer] == max(choice[p]["quality"][la] for p, la in eligible)
    diag = state.diagnostics
    assert diag.hr_points is not None and diag.hr_points.shape == (len(diag.hr_labels), 2)
    assert {"harmful", "harmless", "jailbreak"} <= set(diag.hr_labels)
    assert state.tau == pytest.approx(float(state.gate_axis().taus[state.gate_layer]))


def test_gate_at_t_inst_scores_the_users_last_token(tiny_backbones, fitted):
    """The gate's score at t_inst is the residual at the instruction's last token, not the prompt's last position:
    the text after it (the template's closing tokens) does not change it, and media are re-centred by the t_inst
    offset."""
    bb, state = tiny_backbones("qwen2_vl"), fitted("qwen2_vl").with_overrides(gate_position="inst")
    q = Query(PROMPT, images=tuple(neutral_images(1, size=40)))
    sites = forward_sites(bb, [q])
    p = plan(state, SteerOptions())
    s = gate_scores(state, p, sites["inst"][:, p.detect_layer], ["image"], True)
    axis = state.inst
    h = sites["inst"][0, p.detect_layer].double() - axis.offsets["image"][p.detect_layer]
    r = axis.r[p.detect_layer]
    assert float(s[0]) == pytest.approx(float((h - axis.mu_minus[p.detect_layer]) @ r / (r @ r)), rel=1e-6)
    assert not torch.allclose(sites["inst"], sites["post"])


def test_surface_agreement_is_the_share_of_unchanged_decisions(tiny_backbones, fitted):
    bb, state = tiny_backbones("qwen2_vl"), fitted("qwen2_vl")
    prompts = ["Tell me a joke.", PROMPT, "Name three rivers", "Write a poem about the sea!"]
    got = gate_surface_agreement(bb, state, prompts, batch_size=3)
    assert set(got) == {"post", "inst"}
    for position, rates in got.items():
        p = plan(state, SteerOptions(gate_position=position))

        def decisions(texts, p=p, position=position):
            h = forward_sites(bb, [Query(t) for t in texts])[position][:, p.detect_layer]
            return (gate_scores(state, p, h, ["text"] * len(texts), False) > p.rule.tau).tolist()

        base = decisions(prompts)
        for form in SURFACE_FORMS:
            same = [a == b for a, b in zip(base, decisions([surface_forms(x)[form] for x in prompts]), strict=True)]
            assert rates[form] == pytest.approx(sum(same) / len(same)), (position, form)
        assert rates["gate_open_rate"] == pytest.approx(sum(base) / len(base)) and rates["layer"] == p.detect_layer


@pytest.mark.parametrize("position", ["post", "inst"])
def test_evaluation_reports_where_the_gate_read(position, tiny_backbones, fitted):
    bb, state = tiny_backbones("qwen2_vl"), fitted("qwen2_vl").with_overrides(gate_position=position)
    items = build_items(state, ("text", "image"), limit=2)
    rows = evaluate(bb, state, items, strengths=(0, 1), max_new_tokens=2)
    assert {r["mars"]["gate_position"] for r in rows} == {position}
    assert {r["mars"]["gate_layer"] for r in rows} == {state.gate_layer}
    assert summarise(rows, (0, 1))["gate_position"] == position


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mars_viz", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cli_fit_and_run_take_a_gate_position(tiny_dirs, tmp_path):
    model = tiny_dirs("llava")
    r = _cli("fit", "--model", model, "--out", tmp_path / "s", "--max-prompts", "12", "--k-neutral", "2",
             "--neutral-prompts", "2", "--curve-prompts", "2", "--steer-prompts", "2", "--filter-tokens", "2",
             "--levels", "1,2", "--gate-position", "inst", "--no-surface-check", "--quiet")
    assert r.returncode == 0, r.stderr
    fit = json.loads(r.stdout)
    assert fit["gate_position"] == "inst" and fit["gate_layer"] == fit["inst_detect_layer"]
    meta = json.loads((tmp_path / "s" / "mars_state.json").read_text())
    assert meta["config"]["surface_check"] is False and "gate_position" not in meta["config"]  # the state's own
    assert meta["gate_position"] == "inst" and meta["diagnostics"]["gate_choice"]["chosen_by"] == "override"
    assert "surface_agreement" not in meta["diagnostics"]["gate_choice"]["inst"]
    rows = {}
    for position in ("post", "inst", None):
        extra = [] if position is None else ["--gate-position", position]
        r = _cli("run", "--model", model, "--state", tmp_path / "s", "--prompt", PROMPT, "--max-new-tokens", "2",
                 "--json", *extra)
        assert r.returncode == 0, r.stderr
        rows[position] = json.loads(r.stdout.strip().splitlines()[-1])
    assert rows["post"]["gate_position"] == "post" and rows["inst"]["gate_position"] == "inst"
    assert rows[None]["gate_position"] == "inst" and rows[None]["score_gate"] == rows["inst"]["score_gate"]
    assert rows["post"]["score_gate"] != rows["inst"]["score_gate"]
