"""The bench command's contract (figures are reported, not asserted: speed targets live in benchmarks)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_bench_json_has_the_ratios(tiny_dirs, tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "mars_viz", "bench", "--model", str(tiny_dirs("llava")), "--repeats",
                        "1", "--new-tokens", "4", "--out", str(out), "--quiet"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    for key in ("capture_overhead", "steer_overhead", "pair_vs_single", "calibration_forward_share"):
        assert isinstance(data[key], float) and data[key] > 0
    assert 0 < data["calibration_forward_share"] <= 1
    steps = data["calibration_step_s"]  # the fit's wall time per step, in the fit's order
    assert list(steps)[:2] == ["text activations", "behaviour filter"] and "target level" in steps
    assert all(v >= 0 for v in steps.values()) and sum(steps.values()) <= data["calibration_s"]
    ev = data["eval"]
    assert ev["items"] > 0 and ev["queries_per_min"] == pytest.approx(ev["items"] / ev["seconds"] * 60, rel=0.05)
    # every pair strategy, gate open and closed; `auto`'s pick (from the decode-step measurement) is the headline
    auto = data["pair_strategy_auto"]
    assert auto["chosen"] in ("gate_first", "batched") and auto["ratio"] == data["model"]["pair_strategy"]["ratio"]
    assert auto["decode_1row_s"] > 0 and auto["decode_2row_s"] > 0
    table = data["pair_vs_single_by_strategy"]
    assert set(table) == {"gate_first", "batched", "doubled"}
    assert all(isinstance(v, float) and v > 0 for row in table.values() for v in row.values())
    assert all(set(row) == {"gate_open", "gate_closed"} for row in table.values())
    assert data["pair_vs_single"] == table[auto["chosen"]]["gate_open"]
    assert data["pair_vs_single_gate_closed"] == table[auto["chosen"]]["gate_closed"]
    assert ("pair_goal_unmet" in data) == (min(row["gate_open"] for row in table.values()) > 1.25)
    # capture keeps L * d float32 per query, whatever the prompt length
    assert data["activation_bytes_per_query_short"] == data["activation_bytes_per_query_long"] == 4 * 64 * 4
    assert data["prompt_tokens_short_long"][1] > 5 * data["prompt_tokens_short_long"][0]


def test_bench_runs_to_the_end_with_the_gate_read_after_the_push(tiny_dirs, fitted, tmp_path):
    """The LLaVA graft's fitted state reads its gate at layer 23, after the push at 21: `bench` stopped at "steer
    overhead" with "read it first". A state with the gate after the push, at t_inst, must run every stage."""
    state = fitted("llava").with_overrides(layer=1, detect_layer=3, gate_position="inst")
    folder = state.save(tmp_path / "late-gate")
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "mars_viz", "bench", "--model", str(tiny_dirs("llava")), "--state",
                        str(folder), "--repeats", "1", "--new-tokens", "3", "--out", str(out), "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["gate"] == {"position": "inst", "layer": 3, "push_layer": 1, "read_after_push": True}
    assert data["steer_overhead"] > 0 and set(data["pair_vs_single_by_strategy"]) == {"gate_first", "batched",
                                                                                       "doubled"}
