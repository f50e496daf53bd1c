"""The fit stops each generation once its judge's verdict cannot change (`SubstringJudge.settled`): fewer forwards,
the same fit. The tiny random model never writes a real refusal, so the judge here calls its own frequent words
refusals: some answers settle after a few tokens, others never do."""

from __future__ import annotations

import pytest

from mars_viz.core.state import MarsConfig
from mars_viz.data.judge import SubstringJudge
from mars_viz.fit.calibrate import calibrate

from ..conftest import SMALL_CONFIG

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
# "e": the tiny qwen2_vl model writes it early in most answers, late or never in some; whole batches then settle
# early (a batch stops when every row has), and the curve still differs between levels
PHRASES = ["e"]


def _counted(bb):
    calls = []
    handle = bb.layers[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls, handle


def test_settled_is_refused_so_far():
    j = SubstringJudge(["house"])
    assert j.settled(["a house", "no", ""]) == [True, False, False]
    assert j.settled(["x" * 200 + "house"]) == [False]  # past the window: the verdict is "answered", not settled


def test_the_fast_fit_gives_the_slow_fits_figures_with_fewer_forwards(tiny_backbones):
    bb = tiny_backbones("qwen2_vl")
    cfg = MarsConfig(**{**SMALL_CONFIG, "filter_tokens": 12, "levels": (1.0, 2.0, 4.0, 8.0)})
    judge = SubstringJudge(PHRASES)
    calls, handle = _counted(bb)
    try:
        fast = calibrate(bb, cfg, judge=judge)
        n_fast = len(calls)
        calls.clear()
        slow = calibrate(bb, cfg, judge=lambda texts: judge(texts))  # no `settled`: every generation runs out
        n_slow = len(calls)
    finally:
        handle.remove()
    assert n_fast < n_slow  # some generations stopped early
    assert fast.diagnostics.behaviour == slow.diagnostics.behaviour  # the same prompts kept, the same opening
    assert fast.diagnostics.target_curve == slow.diagnostics.target_curve
    assert len(set(slow.diagnostics.target_curve.values())) > 1  # a curve that depends on the level
    assert (fast.layer, fast.detect_layer, fast.gate_position, fast.target_level) == \
        (slow.layer, slow.detect_layer, slow.gate_position, slow.target_level)
    assert fast.tau == pytest.approx(slow.tau, abs=1e-9) and fast.fingerprint() == slow.fingerprint()
