"""The per-position maps come out the same whichever way the pair of answers is computed.

Each pair strategy captures the prefill differently (`gate_first`: one full prefill; `batched` and `doubled`: a
shared prefill of prompt[:-1] whose last position is added from the last-position capture), and a user's machine may
take any of them (`auto` measures), so every strategy runs here, with the gate open and closed, on an architecture
with M-RoPE (qwen2_vl) and one without (llava).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mars_viz.analysis.analyze import analyze_stream
from mars_viz.model.inputs import Query
from mars_viz.model.media import neutral_video
from mars_viz.steer.steering import SteerOptions

STRATEGIES = ["gate_first", "batched", "doubled"]
GATES = {"open": SteerOptions(tau=-1e6), "closed": SteerOptions(tau=1e6)}


def _map(bb, state, q, opts, strategy):
    *_, last = analyze_stream(bb, state, q, opts, max_new_tokens=3, strategy=strategy)
    return last.analysis


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava"])
@pytest.mark.parametrize("gate", list(GATES))
def test_every_pair_strategy_gives_the_same_map(arch, gate, tiny_backbones, fitted):
    bb, state = tiny_backbones(arch), fitted(arch)
    q = Query("What is in the picture?", images=(Image.new("RGB", (80, 56), (200, 40, 40)),))
    opts = GATES[gate]
    runs = {s: _map(bb, state, q, opts, s) for s in STRATEGIES}
    ref = runs["gate_first"].input_map
    assert ref is not None and ref.grids and len(ref.scores) == len(ref.tokens)
    for s, a in runs.items():
        m = a.input_map
        assert a.result.gate_open == (gate == "open"), s
        assert m.tokens == ref.tokens and m.kinds == ref.kinds, s
        np.testing.assert_allclose(m.scores, ref.scores, atol=1e-4, err_msg=s)
        for g, gr in zip(m.grids, ref.grids, strict=True):
            assert np.array_equal(g.positions, gr.positions), s
            np.testing.assert_allclose(g.scores, gr.scores, atol=1e-4, err_msg=s)
        # the gate's position in the map holds the gate's score, whatever the strategy
        assert m.scores[m.gate_at] == pytest.approx(a.result.score_gate, abs=1e-4), s


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_video_map_under_each_strategy(strategy, tiny_backbones, fitted):
    bb, state = tiny_backbones("qwen2_vl"), fitted("qwen2_vl")
    q = Query("What happens?", video=tuple(neutral_video(4, seed=3, size=64)))
    m = _map(bb, state, q, SteerOptions(), strategy).input_map
    ref = _map(bb, state, q, SteerOptions(), "gate_first").input_map
    assert m.frame_grids() and len(m.frame_grids()) == len(ref.frame_grids())
    np.testing.assert_allclose(m.scores, ref.scores, atol=1e-4)
