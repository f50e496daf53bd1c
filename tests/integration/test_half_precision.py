"""bf16 and fp16 on this CPU (issue 22): most users steer a GPU model in bf16, or a Mac.

Every tiny architecture (the seven of every test and the eight families of `test_families`) is loaded in bf16 and in
fp16, fitted, run through the dashboard's path with its maps, and through every pair strategy with the gate forced
open and closed. Near the threshold, the hook, the dashboard's
re-scoring and the evaluation's probe must make the same gate decision from the same bits (one numerics path:
`rule.judged_score`). A pretend device without float64 (what Apple's MPS is) must steer without error.
"""

from __future__ import annotations

import math

import pytest
import torch

from mars_viz.analysis.analyze import analyze_stream
from mars_viz.analysis.evaluate import EvalItem, _probe
from mars_viz.core import rule as R
from mars_viz.core.state import MarsConfig
from mars_viz.fit.calibrate import calibrate
from mars_viz.model.backbone import load_backbone
from mars_viz.model.inputs import Query, build_batch
from mars_viz.model.media import neutral_images, neutral_video
from mars_viz.steer.generate import generate_batch
from mars_viz.steer.pair import PAIR_STRATEGIES, run_pairs
from mars_viz.steer.steering import SteerOptions, mars_steering
from mars_viz.views.panels import rescore

from ..conftest import ARCHS, SMALL_CONFIG
from .test_families import FAMILIES
from .test_pair_strategies import CLOSED, N_TOKENS, OPEN, reference_gate

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def half(tiny_dirs):
    """(arch, dtype name) -> (backbone loaded in that dtype, a state fitted on it); cached per module."""
    cache: dict = {}

    def get(arch: str, name: str):
        if (arch, name) not in cache:
            bb = load_backbone(tiny_dirs(arch), device="cpu", dtype=HALF[name])
            cache[arch, name] = (bb, calibrate(bb, MarsConfig(**SMALL_CONFIG)))
        return cache[arch, name]

    return get


def _image_query(seed: int = 4) -> Query:
    return Query("Tell me about the sea", images=tuple(neutral_images(1, seed=seed, size=40)))


def _plain_and_steered(bb, state, q: Query) -> tuple[list[int], list[int]]:
    """Two separate full generations: plain, and inside `mars_steering` with the gate forced open."""
    plain = generate_batch(bb, build_batch(bb, [q]), N_TOKENS)[0][0]
    with mars_steering(bb, state, OPEN, [q.modality], gate=reference_gate(bb, state, OPEN, q)):
        steered = generate_batch(bb, build_batch(bb, [q]), N_TOKENS)[0][0]
    return plain, steered


@pytest.mark.parametrize("name", list(HALF))
@pytest.mark.parametrize("arch", ARCHS + FAMILIES)
def test_fit_run_every_pair_strategy_and_maps_in_half_precision(arch, name, half):
    bb, state = half(arch, name)
    assert bb.dtype == HALF[name]
    # the fit: finite geometry, a threshold and a target level the rule accepts
    assert math.isfinite(state.tau) and math.isfinite(state.target_level)
    assert bool(torch.isfinite(state.r).all() and torch.isfinite(state.mu_minus).all())
    assert all(bool(torch.isfinite(off).all()) for off in state.offsets.values())

    # every pair strategy: the token ids of two separate generations with the gate open; closed, bit-identical
    q = _image_query()
    plain, steered = _plain_and_steered(bb, state, q)
    assert steered != plain, "a push to t* = 50 should change the tiny model's answer"
    for strategy in PAIR_STRATEGIES:
        (opened,) = run_pairs(bb, state, [q], OPEN, max_new_tokens=N_TOKENS, strategy=strategy)
        assert opened.gate_open and opened.displacement_norm > 0, strategy
        assert (opened.unsteered.token_ids, opened.steered.token_ids) == (plain, steered), strategy
        (closed,) = run_pairs(bb, state, [q], CLOSED, max_new_tokens=N_TOKENS, strategy=strategy)
        assert not closed.gate_open and closed.displacement_norm == 0.0, strategy
        assert closed.steered.token_ids == closed.unsteered.token_ids == plain, strategy

    # the dashboard's run, with the fitted options, an image and a video, each with its map
    for query in (q, Query("What happens in this clip?", video=tuple(neutral_video(4, seed=2, size=40)))):
        *_, last = analyze_stream(bb, state, query, SteerOptions(), max_new_tokens=2)
        a = last.analysis
        assert a is not None and a.input_map is not None, a.notes if a else "no analysis"
        m = a.input_map
        assert m.scores.shape == (len(m.tokens),) and bool(torch.isfinite(torch.as_tensor(m.scores)).all())
        # the map's score where the gate reads is the gate's own score (the same residual, the same function)
        assert float(m.scores[m.gate_at]) == pytest.approx(a.result.score_gate, rel=1e-9, abs=1e-12)
        if query.video:
            assert a.frame_scores is not None and all(math.isfinite(s) for s in a.frame_scores)


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava", "gemma3"])
def test_bf16_hook_rescore_and_probe_agree_on_the_gate_at_tau_plus_minus_1e_3(arch, half):
    """τ set to the input's own score ± 1e-3, in bf16: the steering hook, the dashboard's re-scoring of the captured
    residuals and the evaluation's probe all read the same score from the same bits, so they open the gate together."""
    bb, state = half(arch, "bf16")
    q = _image_query(seed=7)
    *_, last = analyze_stream(bb, state, q, SteerOptions(steer=False), max_new_tokens=1, strategy="gate_first",
                              maps=False)
    s = last.analysis.result.score_gate  # the hook's own reading
    item = EvalItem(condition="image/harmless", kind="harmless", prompt=q.prompt, query=q)
    for tau, want_open in ((s - 1e-3, True), (s + 1e-3, False)):
        opts = SteerOptions(tau=tau)
        *_, last = analyze_stream(bb, state, q, opts, max_new_tokens=1, strategy="gate_first", maps=False)
        hook = last.analysis.result
        view = rescore(state, last.analysis.acts, q.modality, opts, acts_inst=last.analysis.acts_inst)
        (probe,) = _probe(bb, state, [item], [("mars", opts)])[0]
        assert hook.score_gate == view.s_gate == probe["s_gate"] == s  # one function, the same bits
        assert hook.gate_open == view.gate_open == bool(probe["gate_open"]) == want_open
        # the probe's "displacement exactly zero" shortcut says what the hook did
        assert (probe["displacement_norm"] == 0.0) == (hook.displacement_norm == 0.0) == (not want_open)


def test_bf16_closed_gate_leaves_the_residual_bit_identical(half):
    bb, state = half("qwen2_vl", "bf16")
    h = (state.mu_minus[state.layer] + 0.2 * state.r[state.layer]).to(torch.bfloat16)[None]  # [1, d]
    out = R.mars_response(h, state.mu_minus[state.layer], state.r[state.layer],
                          R.MarsRule(tau=1e9, t_star=state.target_level))
    assert not bool(out.moved.any()) and out.apply(h) is h
    opened = R.mars_response(h, state.mu_minus[state.layer], state.r[state.layer],
                             R.MarsRule(tau=-1e9, t_star=state.target_level))
    moved = opened.apply(h)
    assert moved.dtype == torch.bfloat16 and not torch.equal(moved, h)
    # rounded once: exactly the float64 sum cast to bf16, not bf16(h) + bf16(c r)
    assert torch.equal(moved, (h.double() + opened.displacement).to(torch.bfloat16))


class _NoFloat64(torch.Tensor):
    """A tensor on a pretend device without float64, as Apple's MPS: an op that makes or mixes in a float64 tensor
    raises MPS's TypeError; moving it (`.cpu()`, `.to(device)`) gives a plain tensor, as a copy to the CPU does."""

    def __deepcopy__(self, memo):  # the KV-cache copy of a probe: a copy on the same (pretend) device
        with torch._C.DisableTorchFunctionSubclass():
            return torch.Tensor.as_subclass(self.clone(), type(self))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        moves = func is torch.Tensor.cpu or (func is torch.Tensor.to and (
            "device" in kwargs or any(isinstance(a, (str, torch.device)) for a in args[1:])))
        if moves:
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
            return torch.Tensor.as_subclass(out, torch.Tensor)
        out = super().__torch_function__(func, types, args, kwargs)
        with torch._C.DisableTorchFunctionSubclass():  # reading .dtype of a subclass would call back in here
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            f64 = any(t.dtype == torch.float64 for t in tensors)
        if f64:
            raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support "
                            "float64. Please use float32 instead.")
        return out


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava"])
def test_steers_on_a_device_without_float64(arch, half, monkeypatch):
    """Every residual of the model is a `_NoFloat64` (from the embeddings on); MARS must do its float64 maths on the
    CPU (as it does for MPS) and give the same answers as on a device with float64."""
    bb, state = half(arch, "bf16")
    q = _image_query(seed=5)
    want = {s: run_pairs(bb, state, [q], OPEN, max_new_tokens=N_TOKENS, strategy=s)[0] for s in PAIR_STRATEGIES}
    with pytest.raises(TypeError, match="float64"):  # the pretend device is live
        torch.ones(2).as_subclass(_NoFloat64).double()
    seen = []

    def to_device_without_float64(_module, _args, output):
        seen.append(1)
        return output.as_subclass(_NoFloat64)

    monkeypatch.setattr(R, "NO_FLOAT64_DEVICES", frozenset({"cpu", "mps"}))
    handle = bb.model.get_input_embeddings().register_forward_hook(to_device_without_float64)
    try:
        for strategy in PAIR_STRATEGIES:
            for opts in (OPEN, CLOSED, SteerOptions()):
                (got,) = run_pairs(bb, state, [q], opts, max_new_tokens=N_TOKENS, strategy=strategy)
                assert got.unsteered.token_ids == want[strategy].unsteered.token_ids
                if opts is OPEN:
                    assert got.steered.token_ids == want[strategy].steered.token_ids and got.displacement_norm > 0
                if opts is CLOSED:
                    assert got.steered.token_ids == got.unsteered.token_ids
        *_, last = analyze_stream(bb, state, q, SteerOptions(), max_new_tokens=2)
        assert last.analysis.input_map is not None
    finally:
        handle.remove()
    assert seen, "the embeddings never ran on the pretend device"
