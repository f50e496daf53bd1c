"""The fast fit gives the slow fit's figures. It stops each generation once its judge's verdict cannot change
(`SubstringJudge.settled`), and steerability prefills each prompt's prefix once for every layer
(`refusal_logprob_gain(share_prefix=True)`). The tiny random model never writes a real refusal, so the judge here
calls one of its frequent letters a refusal: some answers settle after a few tokens, others never do."""

from __future__ import annotations

import pytest
import torch

from mars_viz.core.state import MarsConfig
from mars_viz.data.judge import SubstringJudge
from mars_viz.fit.calibrate import calibrate, refusal_logprob_gain

from ..conftest import ARCHS, SMALL_CONFIG

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


@pytest.mark.parametrize("arch", [*ARCHS, "paligemma", "mllama", "qwen3_vl"])
def test_steerability_on_a_shared_prefix_is_steerability(arch, tiny_dirs):
    from mars_viz.data.datasets import builtin_prompts
    from mars_viz.model.backbone import load_backbone
    from mars_viz.model.inputs import Query, build_batch
    from mars_viz.model.media import neutral_images
    from mars_viz.steer.generate import generate_batch

    bb = load_backbone(tiny_dirs(arch), device="cpu")
    # an image answered first, as in a fit: an M-RoPE model keeps that input's `rope_deltas` afterwards
    generate_batch(bb, build_batch(bb, [Query("hi", images=tuple(neutral_images(1, size=40)))]), 2)
    g = torch.Generator().manual_seed(0)
    mu, r = (torch.randn(bb.num_layers, bb.hidden_size, generator=g, dtype=torch.float64) for _ in range(2))
    prompts = builtin_prompts("harmless")[:5]
    calls, handle = _counted(bb)
    try:
        shared = refusal_logprob_gain(bb, prompts, "I'm sorry", mu, r, level=2.0, batch_size=3)
        n_shared = len(calls)
        calls.clear()
        full = refusal_logprob_gain(bb, prompts, "I'm sorry", mu, r, level=2.0, batch_size=3, share_prefix=False)
    finally:
        handle.remove()
    assert full.abs().max() > 0.01  # the pushes change the opening's probability: a comparison with content
    assert torch.allclose(shared, full, atol=1e-5, rtol=0)
    # one more (prefix) call per batch where it is shared; a prefix-LM (PaliGemma) never shares
    assert n_shared == len(calls) + (0 if bb.arch.prefix_lm else 2)


def test_the_fast_fit_gives_the_slow_fits_figures_with_fewer_forwards(tiny_backbones, monkeypatch):
    import functools

    from mars_viz.fit import calibrate as C

    bb = tiny_backbones("qwen2_vl")
    cfg = MarsConfig(**{**SMALL_CONFIG, "filter_tokens": 12, "levels": (1.0, 2.0, 4.0, 8.0)})
    judge = SubstringJudge(PHRASES)
    calls, handle = _counted(bb)
    try:
        fast = calibrate(bb, cfg, judge=judge)
        n_fast = len(calls)
        calls.clear()
        # no `settled`: every generation runs out; every layer's forward is a full one
        monkeypatch.setattr(C, "refusal_logprob_gain", functools.partial(C.refusal_logprob_gain, share_prefix=False))
        slow = calibrate(bb, cfg, judge=lambda texts: judge(texts))
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
