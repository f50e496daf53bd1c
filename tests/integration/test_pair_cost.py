"""What a pair costs, counted in forwards and rows (not timed): with the gate closed, every strategy `auto` can pick
(gate_first, batched) runs exactly the forwards of one plain generation, one row each; with it open, batched decodes
both rows in one batch, and gate_first decodes the steered answer from the prompt's cache cut back, without a
second prefill where the cache can be cut."""

from __future__ import annotations

import contextlib

import pytest

from mars_viz.data.judge import default_judge
from mars_viz.model.inputs import Query, build_batch
from mars_viz.model.media import neutral_images
from mars_viz.steer import pair as P
from mars_viz.steer.generate import generate_batch
from mars_viz.steer.steering import SteerOptions

from ..conftest import ARCHS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
N = 5
OPEN = SteerOptions(tau=-1e9, target_level=50.0)
CLOSED = SteerOptions(tau=1e9)


@contextlib.contextmanager
def _forwards(bb):
    """The batch size of every call of the first decoder layer, in order."""
    sizes: list[int] = []
    handle = bb.layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: sizes.append(int((args[0] if args else kwargs["hidden_states"]).shape[0])),
        with_kwargs=True)
    try:
        yield sizes
    finally:
        handle.remove()


def _query(bb) -> Query:
    return Query("Tell me about the sea", images=tuple(neutral_images(1, seed=4, size=40))) \
        if "image" in bb.modalities else Query("Tell me about the sea")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("strategy", ["gate_first", "batched"])
def test_a_closed_gate_costs_one_generation(strategy, arch, tiny_backbones, fitted):
    bb, state = tiny_backbones(arch), fitted(arch)
    q = _query(bb)
    if bb.arch.prefix_lm:
        pytest.skip("a prefix-LM runs every strategy as doubled")
    with _forwards(bb) as plain:
        generate_batch(bb, build_batch(bb, [q]), N, force_tokens=True)
    with _forwards(bb) as pair:
        res, _ = P._run_chunk(bb, state, [q], CLOSED, default_judge(), N, strategy=strategy, force_tokens=True)
    assert not res[0].gate_open and res[0].steered.token_ids == res[0].unsteered.token_ids
    assert pair == plain == [1] * N  # the prefill and N - 1 decode steps, one row each: one generation


@pytest.mark.parametrize("arch", ARCHS)
def test_an_open_gate_decodes_both_rows_in_one_batch(arch, tiny_backbones, fitted):
    bb, state = tiny_backbones(arch), fitted(arch)
    if bb.arch.prefix_lm:
        pytest.skip("a prefix-LM runs every strategy as doubled")
    with _forwards(bb) as pair:
        res, _ = P._run_chunk(bb, state, [_query(bb)], OPEN, default_judge(), N, strategy="batched",
                              force_tokens=True)
    assert res[0].gate_open
    # the prompt's prefill with the gate read (one row), [a prefill of prompt[:-1] where its cache cannot be cut],
    # then the last position and the decode on two rows
    assert pair[0] == 1 and pair[-N:] == [2] * N and len(pair) in (N + 1, N + 2)


@pytest.mark.parametrize("arch", ARCHS)
def test_gate_first_decodes_the_steered_answer_from_the_cut_cache(arch, tiny_backbones, fitted, monkeypatch):
    bb, state = tiny_backbones(arch), fitted(arch)
    if bb.arch.prefix_lm:
        pytest.skip("a prefix-LM runs every strategy as doubled")
    prefills = []
    real = P._prefill_all_but_last
    monkeypatch.setattr(P, "_prefill_all_but_last", lambda *a: prefills.append(1) or real(*a))
    with _forwards(bb) as pair:
        res, _ = P._run_chunk(bb, state, [_query(bb)], OPEN, default_judge(), N, strategy="gate_first",
                              force_tokens=True)
    assert res[0].gate_open
    if arch != "gemma3":  # Gemma 3's layers keep sliding-window caches, which are not cut: the rest are cut
        assert prefills == [] and pair == [1] * N + [1] * N  # one generation, then N steps from the cut cache
    else:
        assert prefills == [1] and len(pair) == 2 * N + 1  # the prefix prefilled again
