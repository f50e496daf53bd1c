"""Stopping model work from outside it: a `threading.Event` that, once set, ends the running generation at its next
decode step and refuses to start another.

The event is bound to the calling context (`cancellable`), not passed through every call: `_gen_kwargs` adds a
`StoppingCriteria` that reads it to every `generate`, and a new `generate` (or a fit step, via `raise_if_cancelled`)
under a set event raises `Cancelled`. Worker threads inherit it by running in a copy of the caller's context
(`contextvars.copy_context().run`), as `stream_pair`'s does; a streaming caller passes it explicitly (`cancel=`).

Example:
    >>> stop = threading.Event()
    >>> with cancellable(stop):                       # doctest: +SKIP
    ...     greedy_texts(backbone, queries, 2000)     # another thread calls stop.set(): Cancelled within one step
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

__all__ = ["Cancelled", "cancellable", "current_event", "raise_if_cancelled", "stopping_criteria"]

_EVENT: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("mars_viz_cancel", default=None)


class Cancelled(Exception):  # noqa: N818 - reads as what happened, like asyncio.CancelledError
    """The work was stopped by its user (a Stop button, a closed tab, a disconnected client)."""

    def __init__(self, message: str = "stopped before the end: the model is free for the next request"):
        super().__init__(message)


@contextlib.contextmanager
def cancellable(event: threading.Event | None) -> Iterator[threading.Event | None]:
    """Bind `event` to model work started in this context (None: not cancellable).

    A context does not survive a `yield` to a caller that resumes the generator elsewhere (Gradio runs each step of
    a streaming handler in a worker thread, under a fresh copy of its context): a generator passes the event on
    explicitly (`stream_pair(cancel=...)`) instead of relying on a binding made before it yielded."""
    previous = _EVENT.get()
    _EVENT.set(event)
    try:
        yield event
    finally:
        _EVENT.set(previous)  # not `reset(token)`: the generator may be closed from another context


def current_event() -> threading.Event | None:
    return _EVENT.get()


def raise_if_cancelled() -> None:
    """Raise `Cancelled` if this context's event is set."""
    event = _EVENT.get()
    if event is not None and event.is_set():
        raise Cancelled()


class _EventStop(StoppingCriteria):
    """Every row is done once the event is set (checked after each decode step)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stopping_criteria() -> StoppingCriteriaList | None:
    """The criteria for a `generate` started now: None when not cancellable; raises `Cancelled` when already set."""
    event = _EVENT.get()
    if event is None:
        return None
    if event.is_set():
        raise Cancelled()
    return StoppingCriteriaList([_EventStop(event)])
