"""What a pair costs on the loaded model: one 1-row against one 2-row decode step, timed once per model, device and
dtype (`measure_pair_cost`). `auto` picks batched when 2 rows cost at most `AUTO_MAX_RATIO` x one row, else gate_first
(`pair.resolve_strategy`).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Iterator

import torch

from ..model.backbone import Backbone
from ..model.inputs import Query, build_batch
from .generate import _gen_kwargs, _kept_rope_deltas

__all__ = ["AUTO_MAX_RATIO", "measure_pair_cost"]

AUTO_MAX_RATIO = 1.25  # auto picks batched when a 2-row decode step costs at most this many 1-row steps

_MEASURE_PROMPT = "Describe a quiet morning in a small harbour town, in a few sentences."


@contextlib.contextmanager
def _forward_times(backbone: Backbone) -> Iterator[list[float]]:
    """Wall time of each top-level forward call (under `generate`: the prefill, then one per decode step). The
    device is synchronised around each call so GPU times are real; the two hooks go in `finally`."""
    model, dev = backbone.model, backbone.input_device
    sync = (torch.cuda.synchronize if dev.type == "cuda" else
            torch.mps.synchronize if dev.type == "mps" else (lambda: None))
    times: list[float] = []
    start: list[float] = []

    def pre(*_):
        sync()
        start.append(time.perf_counter())

    def post(*_):
        sync()
        times.append(time.perf_counter() - start.pop())

    handles = [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]
    try:
        yield times
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def _time_decode_steps(backbone: Backbone, steps: int = 4, repeats: int = 3) -> tuple[float, float]:
    """Median seconds of one decode step with 1 row and with 2 rows (a short text prompt; the prefill call of each
    generation is left out), after one warm-up each, the two sizes interleaved so load drift hits both alike."""
    q = Query(_MEASURE_PROMPT)
    batches = {1: build_batch(backbone, [q]), 2: build_batch(backbone, [q, q])}
    kw = _gen_kwargs(backbone, steps + 1, force=True)
    steps_s: dict[int, list[float]] = {1: [], 2: []}
    with _kept_rope_deltas(backbone.model):
        for rep in range(repeats + 1):
            for rows, batch in batches.items():
                with _forward_times(backbone) as times:
                    backbone.model.generate(**batch, **kw)
                if rep:  # rep 0 is the warm-up
                    steps_s[rows] += times[1:]
    return statistics.median(steps_s[1]), statistics.median(steps_s[2])


def _choose(ratio: float) -> str:
    return "batched" if ratio <= AUTO_MAX_RATIO else "gate_first"


def measure_pair_cost(backbone: Backbone, refresh: bool = False) -> dict:
    """What a 2-row decode step costs against a 1-row one on this model, device and dtype, and the strategy `auto`
    picks from it. Measured once (a few short generations) and kept on the backbone, where `describe()` shows it.

    Example:
        >>> measure_pair_cost(backbone)    # doctest: +SKIP
        {'chosen': 'gate_first', 'decode_1row_s': 0.021, 'decode_2row_s': 0.041, 'ratio': 1.95, 'threshold': 1.25}
    """
    key = backbone.placement
    if refresh or key not in backbone.pair_costs:
        t1, t2 = _time_decode_steps(backbone)
        if not (math.isfinite(t1) and math.isfinite(t2) and t1 > 0 and t2 > 0):
            raise RuntimeError(f"decode-step timing failed ({t1}, {t2} s): pass an explicit pair strategy")
        ratio = t2 / t1
        backbone.pair_costs[key] = {"chosen": _choose(ratio), "decode_1row_s": t1, "decode_2row_s": t2,
                                    "ratio": ratio, "threshold": AUTO_MAX_RATIO}
    return backbone.pair_costs[key]

