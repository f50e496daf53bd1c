"""The fast fit gives the slow fit's figures. A generation's rows leave the batch once their judge's verdict cannot
change (`SubstringJudge.settled`), and steerability and the target curve prefill each prompt's prefix once for every
layer and every level (`refusal_logprob_gain(share_prefix=True)`, `_target_curve(share_prefix=True)`). The tiny
random model never writes a real refusal, so the judge here calls one of its frequent letters a refusal: some answers
settle after a few tokens, others never do."""

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


def _rows_and_positions(bb):
    """Per call of the first decoder layer: (rows, positions) of its input."""
    shapes: list[tuple[int, int]] = []

    def hook(_m, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        shapes.append((h.shape[0], h.shape[1]))

    return shapes, bb.layers[0].register_forward_pre_hook(hook, with_kwargs=True)


ALL = [*ARCHS, "paligemma", "mllama", "qwen3_vl"]


@pytest.mark.parametrize("arch", ALL)
def test_a_settling_generation_gives_each_row_its_own_tokens_and_lets_finished_rows_go(arch, tiny_dirs):
    import copy

    from mars_viz.data.datasets import builtin_prompts
    from mars_viz.model.backbone import load_backbone
    from mars_viz.model.inputs import Query, build_batch
    from mars_viz.steer.generate import _prefill_all_but_last, generate_batch

    bb = load_backbone(tiny_dirs(arch), device="cpu")
    batch = build_batch(bb, [Query(p) for p in builtin_prompts("harmless")[:6]])
    judge = SubstringJudge(PHRASES)
    shapes, handle = _rows_and_positions(bb)
    try:
        plain = generate_batch(bb, batch, 12)
        plain_rows = sum(r for r, _ in shapes)
        shapes.clear()
        fast = generate_batch(bb, batch, 12, settled=judge.settled, min_tokens=3)
    finally:
        handle.remove()
    assert any(len(ids) < 12 for ids, _ in fast)  # some answers settled early: a comparison with content
    for (ids, _), (fast_ids, _) in zip(plain, fast, strict=True):
        assert len(fast_ids) >= min(3, len(ids)) and ids[:len(fast_ids)] == fast_ids  # one generation, cut short
    assert judge([t for _, t in fast]) == judge([t for _, t in plain])
    rows = [r for r, _ in shapes]
    assert sum(rows) < plain_rows  # fewer row-steps than the plain generation
    if bb.arch.prefix_lm:  # the rows of a prefix-LM stop together, when all are settled
        assert set(rows) == {6}
    else:  # the first 3 tokens for all rows, then only the unsettled ones, fewer as they settle
        assert rows[:3] == [6, 6, 6] and rows == sorted(rows, reverse=True)
    prefix, _ = _prefill_all_but_last(bb, batch)  # on a prompt's prefix cache: the same answers
    assert generate_batch(bb, batch, 12, settled=judge.settled, min_tokens=3, prefix=copy.deepcopy(prefix)) == fast
    assert generate_batch(bb, batch, 12, prefix=prefix) == plain


@pytest.mark.parametrize("arch", ALL)
def test_the_target_curve_on_a_shared_prefix_is_the_target_curve(arch, tiny_dirs):
    from mars_viz.data.datasets import builtin_prompts
    from mars_viz.fit.calibrate import _target_curve
    from mars_viz.model.backbone import load_backbone

    bb = load_backbone(tiny_dirs(arch), device="cpu")
    g = torch.Generator().manual_seed(1)
    mu, r = (torch.randn(bb.hidden_size, generator=g, dtype=torch.float64) for _ in range(2))
    prompts, levels, layer = builtin_prompts("harmless")[:5], (0.0, 16.0, 1024.0), 0
    texts: dict[bool, list[str]] = {True: [], False: []}
    positions = {}
    for share in (True, False):
        def judge(ts, share=share):  # no `settled`: every answer runs out, and its whole text is compared
            texts[share].extend(ts)
            return SubstringJudge(PHRASES)(ts)

        shapes, handle = _rows_and_positions(bb)
        try:
            curve = _target_curve(bb, prompts, layer, mu, r, levels, judge, 6, 3, None, share_prefix=share)
        finally:
            handle.remove()
        positions[share] = sum(rows * n for rows, n in shapes)
        assert list(curve) == list(levels) and all(0.0 <= v <= 1.0 for v in curve.values())
    assert texts[False][:len(prompts)] != texts[False][-len(prompts):]  # the push changes answers: a comparison
    assert texts[True] == texts[False]
    if bb.arch.prefix_lm:  # its prompt attends both ways: never shared
        assert positions[True] == positions[False]
    else:  # each batch's prefix runs once, not once per level
        assert positions[True] < positions[False]


def test_settled_is_refused_so_far():
    j = SubstringJudge(["house"])
    assert j.settled(["a house", "no", ""]) == [True, False, False]
    assert j.settled(["x" * 200 + "house"]) == [False]  # past the window: the verdict is "answered", not settled


@pytest.mark.parametrize("arch", ALL)
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
        # no `settled`: every generation runs out; every layer's and level's forward is a full one
        monkeypatch.setattr(C, "refusal_logprob_gain", functools.partial(C.refusal_logprob_gain, share_prefix=False))
        monkeypatch.setattr(C, "_target_curve", functools.partial(C._target_curve, share_prefix=False))
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
