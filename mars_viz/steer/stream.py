"""Both answers of one query streamed as they are generated (`stream_pair`): the pair runs on a worker thread and
its tokens come back through a queue, then the result and the input's residuals (`PairUpdate`).
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Iterator, Sequence

from ..core.state import MarsState
from ..data.judge import RefusalJudge, default_judge
from ..model.backbone import Backbone
from ..model.inputs import Query
from .cancel import cancellable, current_event, raise_if_cancelled
from .generate import _cut
from .pair import PairStrategy, _run_chunk
from .results import PairUpdate
from .steering import SteerOptions

__all__ = ["stream_pair"]


def stream_pair(backbone: Backbone, state: MarsState, query: Query, options: SteerOptions,
                judge: RefusalJudge | None = None, max_new_tokens: int = 64, strategy: PairStrategy = "auto",
                seq_layers: Sequence[int] | None = None, cancel: threading.Event | None = None
                ) -> Iterator[PairUpdate]:
    """Stream both answers for one query as they are generated (by `strategy`, see module doc), then the result.

    The residuals of every layer are captured from the same prefill, so the dashboard needs no extra forward; with
    `seq_layers`, every prompt position at those layers too (the per-position maps, `PairUpdate.seq`).
    Errors inside generation (and an unknown strategy) are re-raised in the caller's thread. Setting `cancel`
    (default: the event bound by `cancellable` where this generator starts) ends the generation at the next decode
    step and raises `Cancelled` here; a consumer that stops early (a closed browser tab) ends it the same way, and
    its hooks are gone before this generator closes.
    """
    judge = judge or default_judge()
    state.check_compatible(backbone)
    q: queue.Queue = queue.Queue()

    def work() -> None:
        try:
            seq = None if not seq_layers else {"layers": list(seq_layers)}
            res, acts = _run_chunk(backbone, state, [query], options, judge, max_new_tokens, q, capture=True,
                                   strategy=strategy, seq=seq)
            raise_if_cancelled()  # the answers were cut short: not a result
            if seq is not None:  # one query: drop the batch dimension and the (absent) left padding
                keep = seq["attention_mask"][0].bool()
                seq = {"h": {i: h[0][keep] for i, h in seq["h"].items()}, "input_ids": seq["input_ids"][0][keep],
                       "meta": seq["meta"]}
            q.put(("done", (res[0], acts["post"][0], acts["inst"][0], seq)))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            q.put(("error", e))

    stop = cancel or current_event() or threading.Event()  # else one for an early close of this generator
    context = contextvars.copy_context()  # the worker runs under the caller's context, with `stop` bound

    def run() -> None:
        with cancellable(stop):
            work()

    thread = threading.Thread(target=context.run, args=(run,), daemon=True, name="mars_viz-pair")
    thread.start()
    tok = backbone.tokenizer
    texts = ["", "" if options.steer else None]
    try:
        while True:
            kind, *payload = q.get()
            if kind == "tokens":
                slot, ids = payload
                texts[slot] = tok.decode(_cut(backbone, ids), skip_special_tokens=True).strip()
                yield PairUpdate(unsteered=texts[0], steered=texts[0] if texts[1] is None else texts[1])
            elif kind == "error":
                raise payload[0]
            else:
                res, acts, acts_inst, seq = payload[0]
                yield PairUpdate(res.unsteered.text, res.steered.text, done=True, result=res, acts=acts,
                                 acts_inst=acts_inst, seq=seq)
                return
    finally:
        # When the consumer stops early (a closed browser tab), the generation ends at its next decode step; its
        # hooks are removed before the caller releases the model lock.
        if thread.is_alive():
            stop.set()
        thread.join()
