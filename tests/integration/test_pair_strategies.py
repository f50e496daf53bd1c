"""Every pair strategy (gate_first, batched, doubled) on every tiny architecture, on this CPU: each streams both
answers, gives exactly the token ids of two separate generations, leaves no hook and no changed model state behind,
and keeps the closed-gate guarantee. `auto` resolves from a decode-step measurement, taken once per backbone."""

from __future__ import annotations

import math

import pytest
import torch

from mars_viz.model.activations import forward_sites
from mars_viz.model.hooks import count_hooks
from mars_viz.model.inputs import Query, build_batch
from mars_viz.model.media import neutral_images
from mars_viz.steer import generate as G
from mars_viz.steer import timing
from mars_viz.steer.generate import generate_batch
from mars_viz.steer.pair import PAIR_STRATEGIES, resolve_strategy, run_pairs
from mars_viz.steer.steering import SteerOptions, gate_scores, mars_steering, plan
from mars_viz.steer.stream import stream_pair
from mars_viz.steer.timing import measure_pair_cost

from ..conftest import ARCHS

N_TOKENS = 6
OPEN = SteerOptions(tau=-1e9, target_level=50.0)  # gate forced open, t* far out: every input is moved
CLOSED = SteerOptions(tau=1e9)


def _image_query(seed: int = 4, prompt: str = "Tell me about the sea") -> Query:
    return Query(prompt, images=tuple(neutral_images(1, seed=seed, size=40)))


def _rope_state(bb) -> list:
    return [o.rope_deltas for o in G._rope_owners(bb.model)]


def reference_gate(bb, state, options: SteerOptions, q: Query):
    """The gate's score from an independent plain forward: the residuals at both positions (`forward_sites`), scored
    at the plan's layer and position."""
    p = plan(state, options)
    h = forward_sites(bb, [q])[p.gate_position][:, p.detect_layer]  # [1, d]
    return gate_scores(state, p, h, [q.modality], options.recenter)


def steered_reference(bb, state, options: SteerOptions, q: Query) -> list[int]:
    """One full steered generation, on its own, with the gate given from `reference_gate` (what every strategy must
    reproduce token for token)."""
    with mars_steering(bb, state, options, [q.modality], gate=reference_gate(bb, state, options, q)):
        return generate_batch(bb, build_batch(bb, [q]), N_TOKENS)[0][0]


@pytest.fixture(scope="module")
def separate(tiny_backbones, fitted):
    """(arch, prompt, seed) -> token ids of two independent full generations: plain, and inside `mars_steering`."""
    cache: dict = {}

    def get(arch: str, q: Query) -> tuple[list[int], list[int]]:
        key = (arch, q.prompt, q.images[0].tobytes())
        if key not in cache:
            bb, state = tiny_backbones(arch), fitted(arch)
            plain = generate_batch(bb, build_batch(bb, [q]), N_TOKENS)[0][0]
            cache[key] = (plain, steered_reference(bb, state, OPEN, q))
        return cache[key]

    return get


def _ours(module) -> int:
    """Hooks under `module` that are not transformers' own lazily installed output-capturing hooks (those appear on
    the vision tower and, once any test asked for hidden states, on the decoder layers too)."""
    return sum(1 for m in module.modules() for d in (m._forward_hooks, m._forward_pre_hooks) for fn in d.values()
               if "output_capturing" not in getattr(fn, "__qualname__", ""))


def _no_hook_of_ours(bb, before: int) -> bool:
    """Compare with a count taken before (transformers may add its own hooks meanwhile); the decoder layers, where
    ours go, must hold none of ours at all."""
    return count_hooks(bb.model) == before and sum(_ours(layer) for layer in bb.layers) == 0


def _stream(bb, state, q, options, strategy):
    rope_before, hooks_before = _rope_state(bb), count_hooks(bb.model)
    updates = list(stream_pair(bb, state, q, options, max_new_tokens=N_TOKENS, strategy=strategy))
    assert _no_hook_of_ours(bb, hooks_before)
    rope_after = _rope_state(bb)
    assert len(rope_after) == len(rope_before)
    assert all(a is b for a, b in zip(rope_after, rope_before, strict=True)), "rope_deltas not restored"
    return updates


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("strategy", PAIR_STRATEGIES)
def test_strategy_streams_the_answers_of_two_separate_generations(strategy, arch, tiny_backbones, fitted, separate):
    bb, state = tiny_backbones(arch), fitted(arch)
    q = _image_query()
    plain, steered = separate(arch, q)
    updates = _stream(bb, state, q, OPEN, strategy)
    final, partial = updates[-1], updates[:-1]
    assert final.done and not any(u.done for u in partial)
    res = final.result
    assert res.gate_open and res.displacement_norm > 0
    assert res.unsteered.token_ids == plain and res.steered.token_ids == steered
    assert steered != plain  # the tiny models all answer differently when pushed: the slots can't be swapped unseen
    assert final.acts is not None and final.acts.shape == (bb.num_layers, bb.hidden_size)
    # partial texts reached both slots, each ending on its own final answer (rows map to the right slot)
    assert len(partial) >= N_TOKENS
    assert partial[-1].unsteered == res.unsteered.text and partial[-1].steered == res.steered.text
    assert any(u.steered != u.unsteered for u in partial) == (res.steered.text != res.unsteered.text)
    if arch in ("qwen2_vl", "qwen2_5_vl", "mars_reader"):
        assert _rope_state(bb), "the M-RoPE model should keep rope_deltas"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("strategy", PAIR_STRATEGIES)
def test_gate_closed_steered_is_the_unsteered_answer(strategy, arch, tiny_backbones, fitted, separate):
    bb, state = tiny_backbones(arch), fitted(arch)
    q = _image_query()
    updates = _stream(bb, state, q, CLOSED, strategy)
    res = updates[-1].result
    assert not res.gate_open and res.displacement_norm == 0.0
    assert res.steered.token_ids == res.unsteered.token_ids == separate(arch, q)[0]
    assert updates[-2].steered == updates[-2].unsteered == res.unsteered.text


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("strategy", PAIR_STRATEGIES)
def test_strategy_over_several_queries(strategy, arch, tiny_backbones, fitted, separate):
    """Two queries of different lengths (left padding) in one chunk; gate_first runs them one at a time."""
    bb, state = tiny_backbones(arch), fitted(arch)
    queries = [_image_query(4), _image_query(5, "Name three birds, please, and say why")]
    before, hooks_before = _rope_state(bb), count_hooks(bb.model)
    res = run_pairs(bb, state, queries, OPEN, max_new_tokens=N_TOKENS, strategy=strategy)
    assert all(a is b for a, b in zip(_rope_state(bb), before, strict=True)) and _no_hook_of_ours(bb, hooks_before)
    for q, r in zip(queries, res, strict=True):
        assert (r.unsteered.token_ids, r.steered.token_ids) == separate(arch, q)


def test_auto_follows_the_measured_ratio(tiny_backbones, monkeypatch):
    bb = tiny_backbones("qwen2_vl")
    for (t1, t2), chosen in (((0.010, 0.010), "batched"), ((0.010, 0.030), "gate_first")):
        monkeypatch.setattr(bb, "pair_costs", {})
        monkeypatch.setattr(timing, "_time_decode_steps", lambda _bb, t1=t1, t2=t2: (t1, t2))
        assert resolve_strategy(bb, "auto") == chosen
        info = bb.describe()["pair_strategy"]
        assert info["chosen"] == chosen and info["ratio"] == pytest.approx(t2 / t1)
        assert info["decode_1row_s"] == t1 and info["decode_2row_s"] == t2


def test_real_measurement_is_taken_once(tiny_backbones, fitted, monkeypatch):
    bb, state = tiny_backbones("llava"), fitted("llava")
    monkeypatch.setattr(bb, "pair_costs", {})
    calls, hooks_before = [], count_hooks(bb.model)
    real = timing._time_decode_steps
    monkeypatch.setattr(timing, "_time_decode_steps", lambda b: calls.append(1) or real(b))
    cost = measure_pair_cost(bb)
    assert len(calls) == 1 and _no_hook_of_ours(bb, hooks_before)
    for key in ("decode_1row_s", "decode_2row_s", "ratio"):
        assert math.isfinite(cost[key]) and cost[key] > 0
    assert cost["chosen"] in PAIR_STRATEGIES and bb.describe()["pair_strategy"] == cost
    assert resolve_strategy(bb, "auto") == cost["chosen"] and measure_pair_cost(bb) is cost
    list(stream_pair(bb, state, Query("hi"), OPEN, max_new_tokens=2))  # strategy="auto"
    run_pairs(bb, state, [Query("hi"), Query("ho")], OPEN, max_new_tokens=2)
    assert len(calls) == 1  # cached on the backbone: no second measurement


def test_unknown_strategy_is_refused_clearly(tiny_backbones, fitted):
    bb, state = tiny_backbones("llava"), fitted("llava")
    hooks_before = count_hooks(bb.model)
    with pytest.raises(ValueError, match="unknown pair strategy 'fast': use one of auto, gate_first"):
        resolve_strategy(bb, "fast")
    with pytest.raises(ValueError, match="unknown pair strategy"):
        list(stream_pair(bb, state, Query("hi"), OPEN, max_new_tokens=2, strategy="fast"))
    assert _no_hook_of_ours(bb, hooks_before)


RELATIONS = {"detect<push": 1, "detect=push": 2, "detect>push": 3}  # push at layer 2 of the tiny models' 4


@pytest.mark.parametrize("position", ["post", "inst"])
@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("strategy", PAIR_STRATEGIES)
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_layer_gate_on_every_strategy(strategy, arch, relation, position, tiny_backbones, fitted, separate):
    """Conditional MARS: the gate read before, at or after the push layer, at t_post or t_inst. Closed:
    bit-identical answers. Open: exactly the tokens of a separate steered generation given the gate of a plain
    forward, and the gate's score is that of the unsteered input at its own layer and position."""
    bb = tiny_backbones(arch)
    state = fitted(arch).with_overrides(layer=2, detect_layer=RELATIONS[relation], gate_position=position)
    q = _image_query()
    plain = separate(arch, q)[0]
    closed = _stream(bb, state, q, CLOSED, strategy)[-1].result
    assert not closed.gate_open and closed.steered.token_ids == closed.unsteered.token_ids == plain
    assert (closed.layer, closed.gate_layer) == (2, RELATIONS[relation])
    final = _stream(bb, state, q, OPEN, strategy)[-1]
    opened = final.result
    assert opened.gate_open and opened.unsteered.token_ids == plain
    # the gate's score is the detection layer's, read from the unsteered input (captured in the same run)
    p = plan(state, OPEN)
    at_gate = final.acts if position == "post" else final.acts_inst
    expect = gate_scores(state, p, at_gate[p.detect_layer][None], [q.modality], True)
    assert opened.gate_score == pytest.approx(float(expect[0]), rel=1e-4, abs=1e-4)
    assert opened.gate_score == pytest.approx(float(reference_gate(bb, state, OPEN, q)[0]), rel=1e-4, abs=1e-4)
    assert opened.steered.token_ids == steered_reference(bb, state, OPEN, q)
    assert (opened.to_json()["detect_layer"], opened.to_json()["gate_position"]) == (RELATIONS[relation], position)


@pytest.mark.parametrize("call", ["generate", "forward"])
@pytest.mark.parametrize("position", ["post", "inst"])
@pytest.mark.parametrize("relation", RELATIONS)
def test_mars_steering_reads_the_gate_wherever_it_sits(relation, position, call, tiny_backbones, fitted):
    """The context manager alone, as a library user calls it (no gate given): before, at or after the push layer,
    at either position, under `generate` and a plain forward. It reads the same score as an independent forward,
    edits exactly once, and steers exactly as when that score is handed to it; no hook stays behind."""
    bb = tiny_backbones("qwen2_vl")
    state = fitted("qwen2_vl").with_overrides(layer=2, detect_layer=RELATIONS[relation], gate_position=position)
    q = _image_query()
    expect = reference_gate(bb, state, OPEN, q)
    hooks_before = count_hooks(bb.model)

    def go(**kw):
        batch = build_batch(bb, [q])
        with mars_steering(bb, state, OPEN, [q.modality], **kw) as rec:
            if call == "generate":
                out = generate_batch(bb, batch, N_TOKENS)[0][0]
            else:
                out = bb.model(**batch).logits[0, -1]
        return rec, out

    rec, got = go()
    assert rec.edited_calls == 1 and rec.change_norm[0] > 0
    assert float(rec.info["s_gate"][0]) == pytest.approx(float(expect[0]), rel=1e-5, abs=1e-5)
    assert (rec.info["detect_layer"], rec.info["gate_position"]) == (RELATIONS[relation], position)
    _, ref = go(gate=expect)
    assert got == ref if call == "generate" else torch.equal(got, ref)
    assert _no_hook_of_ours(bb, hooks_before)
