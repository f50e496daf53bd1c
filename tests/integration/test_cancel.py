"""Stopping model work from outside (`steer.cancel`): under every pair strategy a set event ends a long generation
at its next decode step, raises `Cancelled`, and leaves no hook or thread behind; so does a consumer that stops
reading the stream (a closed tab); a fit's generations stop the same way."""

from __future__ import annotations

import threading
import time

import pytest

from mars_viz.model.inputs import Query
from mars_viz.steer.cancel import Cancelled, cancellable, raise_if_cancelled, stopping_criteria
from mars_viz.steer.steering import SteerOptions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
LONG = 2000


@pytest.fixture(scope="module")
def endless(tiny_dirs):
    """The tiny qwen2_vl model, loaded for this module alone, with no EOS: every answer runs to max_new_tokens."""
    from mars_viz.model.backbone import load_backbone

    bb = load_backbone(tiny_dirs("qwen2_vl"), device="cpu")
    bb.model.generation_config.eos_token_id = None
    return bb


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_the_criteria_read_the_bound_event():
    assert stopping_criteria() is None  # nothing bound: plain generation
    event = threading.Event()
    with cancellable(event):
        crit = stopping_criteria()
        assert crit is not None
        import torch

        ids = torch.zeros(2, 3, dtype=torch.long)
        assert not crit[0](ids, None).any()
        event.set()
        assert crit[0](ids, None).all()
        with pytest.raises(Cancelled):
            stopping_criteria()  # a new generate under a set event does not start
        with pytest.raises(Cancelled):
            raise_if_cancelled()
    raise_if_cancelled()  # unbound again on exit


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", ["gate_first", "batched", "doubled"])
@pytest.mark.parametrize("tau", [-100.0, 100.0], ids=["gate_open", "gate_closed"])
def test_a_set_event_ends_the_pair_under_every_strategy(endless, fitted, strategy, tau):
    from mars_viz.steer.stream import stream_pair

    state = fitted("qwen2_vl")
    before = _hooks(endless.model)
    stop = threading.Event()
    seen = []
    t0 = time.monotonic()
    with pytest.raises(Cancelled):
        for upd in stream_pair(endless, state, Query("Tell me a long story."), SteerOptions(tau=tau),
                               max_new_tokens=LONG, strategy=strategy, cancel=stop):
            seen.append(upd)
            if len(seen) == 3:  # a few tokens in
                stop.set()
    took = time.monotonic() - t0
    assert 3 <= len(seen) < LONG  # it had started, and it did not run to the end
    assert not any(u.done for u in seen)  # a cut-short pair is not a result
    assert _hooks(endless.model) == before
    assert not any(t.name == "mars_viz-pair" for t in threading.enumerate())
    assert took < 60  # 2000 tokens twice would take minutes on this CPU


@pytest.mark.timeout(300)
def test_a_consumer_that_stops_reading_ends_the_generation(endless, fitted):
    from mars_viz.steer.stream import stream_pair

    stream = stream_pair(endless, fitted("qwen2_vl"), Query("Tell me a long story."), SteerOptions(),
                         max_new_tokens=LONG, strategy="batched")
    next(stream)
    next(stream)
    t0 = time.monotonic()
    stream.close()  # a closed tab: Gradio closes the handler's generator
    assert time.monotonic() - t0 < 1.0
    assert not any(t.name == "mars_viz-pair" for t in threading.enumerate())


@pytest.mark.timeout(300)
def test_a_fit_stops_between_and_inside_its_generations(endless):
    from mars_viz.steer.generate import greedy_texts

    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    t0 = time.monotonic()
    with cancellable(stop), pytest.raises(Cancelled):
        greedy_texts(endless, [Query(f"story {i}") for i in range(16)], LONG, batch_size=4)
    assert time.monotonic() - t0 < 30
