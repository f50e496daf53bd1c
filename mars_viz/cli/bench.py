"""`python -m mars_viz bench`: what capture and steering cost on top of the plain model, measured in one process.

Every figure is a median over repeats after a warm-up, on the same inputs:
  capture_overhead           batched forward with capture hooks on every layer / the same forward without hooks
  hidden_states_overhead     the same forward with output_hidden_states=True / without (the alternative to hooks)
  steer_overhead             steered greedy generation / unsteered, same number of new tokens (forced)
  pair_strategy_auto         the decode-step measurement behind `auto`: seconds of one 1-row and one 2-row decode
                             step, their ratio, and the strategy it picks (batched if ratio <= 1.25, else gate_first)
  pair_vs_single_by_strategy per pair strategy (gate_first, batched, doubled), both answers / one answer for an
                             image input, same new tokens (forced), with the gate forced open (both answers decoded)
                             and closed (the steered answer is the unsteered one)
  pair_vs_single             the gate-open figure of the strategy `auto` picks; pair_vs_single_gate_closed: its
                             gate-closed figure; pair_goal_unmet (only when no strategy reaches 1.25 gate open)
  calibration_forward_share  share of a (small) calibration's wall time spent inside model forwards
  calibration_step_s         that calibration's wall time per fit step (state_fit_step_s: the given state's own fit)
  eval                       the evaluation's throughput (queries per minute: text and image items, strengths 0
                             and 1, the bench's new tokens)
  activation_bytes           bytes kept per query by capture (L * d * 4), for short and long prompts
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable

import torch

from ..analysis.evaluate import build_items, evaluate
from ..core.state import MarsConfig, MarsState
from ..data.judge import default_judge
from ..fit.calibrate import calibrate
from ..model.activations import collect_activations
from ..model.backbone import Backbone, typographic_layout
from ..model.hooks import capture_residuals
from ..model.inputs import Query, build_batch
from ..model.media import neutral_images
from ..steer.generate import _gen_kwargs
from ..steer.pair import PAIR_STRATEGIES, _run_chunk
from ..steer.steering import SteerOptions, mars_steering, plan
from ..steer.timing import measure_pair_cost

__all__ = ["run_bench"]

PROMPTS = ["Hi there", "How do I bake a loaf of sourdough bread at home?", "Write a haiku about autumn leaves.",
           "Explain how a refrigerator keeps food cold, step by step, for a curious ten-year-old.",
           "What is the capital of France?", "List three uses of baking soda around the house.",
           "Summarise the plot of Romeo and Juliet in two sentences.", "How many legs does a spider have?"]


@contextlib.contextmanager
def _forward_timer(model: torch.nn.Module):
    """Accumulates wall time spent inside the model's top-level forward (a measurement hook, removed after)."""
    acc = {"t": 0.0, "start": []}

    def pre(*_):
        acc["start"].append(time.perf_counter())

    def post(*_):
        acc["t"] += time.perf_counter() - acc["start"].pop()

    h1, h2 = model.register_forward_pre_hook(pre), model.register_forward_hook(post)
    try:
        yield acc
    finally:
        h1.remove()
        h2.remove()


@torch.inference_mode()
def run_bench(backbone: Backbone, state: MarsState | None = None, repeats: int = 5, new_tokens: int = 16,
              calib: MarsConfig | None = None, progress: Callable[[str], None] | None = None,
              eval_limit: int = 8) -> dict:
    say = progress or (lambda _msg: None)
    model = backbone.model
    say("decode-step cost (pair strategy auto)")
    auto = measure_pair_cost(backbone)  # first, so the model description below carries it
    out: dict = {"model": backbone.describe(), "repeats": repeats, "new_tokens": new_tokens,
                 "pair_strategy_auto": dict(auto)}
    queries = [Query(p) for p in PROMPTS]
    batch = build_batch(backbone, queries)

    say("capture overhead")

    def plain():
        model(**batch, use_cache=False, logits_to_keep=1)

    def captured():
        with capture_residuals(backbone.layers):
            model(**batch, use_cache=False, logits_to_keep=1)

    def hidden():
        model(**batch, use_cache=False, logits_to_keep=1, output_hidden_states=True)

    # interleave the three so drift in machine load hits all of them alike
    t_plain, t_cap, t_hid = [], [], []
    for fn in (plain, captured, hidden):
        fn()
    for _ in range(repeats):
        for fn, acc in ((plain, t_plain), (captured, t_cap), (hidden, t_hid)):
            t = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t)
    med = statistics.median
    out["forward_s"] = med(t_plain)
    out["capture_overhead"] = med(t_cap) / med(t_plain)
    out["hidden_states_overhead"] = med(t_hid) / med(t_plain)
    n_pos = batch["input_ids"].shape[1]
    out["capture_bytes"] = len(PROMPTS) * backbone.num_layers * backbone.hidden_size * 4
    out["hidden_states_bytes"] = (backbone.num_layers + 1) * len(PROMPTS) * n_pos * backbone.hidden_size * \
        torch.finfo(backbone.dtype).bits // 8

    if state is None:
        say("calibration (small)")
        cfg = calib or MarsConfig(max_prompts=24, k_neutral=4, neutral_prompts=8, curve_prompts=8, steer_prompts=8,
                                  levels=(1.0, 2.0, 4.0))
        t0 = time.perf_counter()
        with _forward_timer(model) as acc:
            state = calibrate(backbone, cfg)
        total = time.perf_counter() - t0
        out["calibration_s"] = total
        out["calibration_forward_share"] = acc["t"] / total
        out["calibration_step_s"] = state.diagnostics.fit_seconds
    else:
        say("calibration forward share (small refit)")
        cfg = calib or MarsConfig(max_prompts=24, k_neutral=4, neutral_prompts=8, curve_prompts=8, steer_prompts=8,
                                  levels=(1.0, 2.0, 4.0))
        t0 = time.perf_counter()
        with _forward_timer(model) as acc:
            refit = calibrate(backbone, cfg)
        total = time.perf_counter() - t0
        out["calibration_s"] = total
        out["calibration_forward_share"] = acc["t"] / total
        out["calibration_step_s"] = refit.diagnostics.fit_seconds
        if state.diagnostics.fit_seconds:  # the given state's own fit (states fitted before 2026-12 lack it)
            out["state_fit_step_s"] = state.diagnostics.fit_seconds
            out["state_fit_s"] = round(sum(state.diagnostics.fit_seconds.values()), 1)

    p = plan(state, SteerOptions())
    out["gate"] = {"position": p.gate_position, "layer": p.detect_layer, "push_layer": p.layer,
                   "read_after_push": p.reads_later}  # after the push: steer overhead includes the gate's probe
    say("steer overhead")
    image = neutral_images(1, seed=11)[0]
    q_img = Query("Describe this picture in detail.", images=(image,))
    img_batch = build_batch(backbone, [q_img])
    forced = _gen_kwargs(backbone, new_tokens, force=True)
    opts = SteerOptions(tau=-100.0)  # gate forced open: the hook does its full work

    def gen_plain():
        model.generate(**img_batch, **forced)

    def gen_steered():
        with mars_steering(backbone, state, opts, ["image"]):
            model.generate(**img_batch, **forced)

    t_a, t_b = [], []
    gen_plain()
    gen_steered()
    for _ in range(repeats):
        for fn, acc in ((gen_plain, t_a), (gen_steered, t_b)):
            t = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t)
    out["generate_s"] = med(t_a)
    out["steer_overhead"] = med(t_b) / med(t_a)

    say("pair vs single, every strategy")
    judge = default_judge()
    gates = {"gate_open": SteerOptions(tau=-1e9), "gate_closed": SteerOptions(tau=1e9)}

    def pair(strategy: str, options: SteerOptions):
        return lambda: _run_chunk(backbone, state, [q_img], options, judge, new_tokens, strategy=strategy,
                                  force_tokens=True)

    pairs = {(s, g): pair(s, o) for s in PAIR_STRATEGIES for g, o in gates.items()}
    t_pairs: dict[tuple[str, str], list[float]] = {k: [] for k in pairs}
    for fn in pairs.values():
        fn()
    for _ in range(repeats):
        for fn, acc in ((gen_plain, t_a), *((pairs[k], t_pairs[k]) for k in pairs)):
            t = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t)
    table = {s: {g: med(t_pairs[(s, g)]) / med(t_a) for g in gates} for s in PAIR_STRATEGIES}
    out["pair_vs_single_by_strategy"] = table
    out["pair_vs_single"] = table[auto["chosen"]]["gate_open"]
    out["pair_vs_single_gate_closed"] = table[auto["chosen"]]["gate_closed"]
    best = min(PAIR_STRATEGIES, key=lambda s: table[s]["gate_open"])
    if table[best]["gate_open"] > 1.25:
        out["pair_goal_unmet"] = {"goal": 1.25, "best_gate_open": best,
                                  "gate_open": {s: table[s]["gate_open"] for s in PAIR_STRATEGIES},
                                  "note": "no pair strategy costs <= 1.25 generations with the gate open here"}

    say("evaluation throughput")
    items = build_items(state, ["text", "image"], limit=eval_limit, layout=typographic_layout(backbone))
    t0 = time.perf_counter()
    evaluate(backbone, state, items, (0.0, 1.0), new_tokens)
    dt = time.perf_counter() - t0
    out["eval"] = {"items": len(items), "sets": ["text", "image"], "strengths": [0.0, 1.0],
                   "max_new_tokens": new_tokens, "seconds": round(dt, 3),
                   "queries_per_min": round(len(items) / dt * 60, 1)}

    say("activation memory")
    short = [Query("Hi")] * 8
    long = [Query("Tell me, in great detail and with examples, " * 8 + "how tides work.")] * 8
    a_short, a_long = collect_activations(backbone, short), collect_activations(backbone, long)
    out["activation_bytes_per_query_short"] = a_short.element_size() * a_short[0].nelement()
    out["activation_bytes_per_query_long"] = a_long.element_size() * a_long[0].nelement()
    out["activation_bytes_formula"] = "L * d * 4 (float32), independent of prompt length"
    out["prompt_tokens_short_long"] = [build_batch(backbone, short[:1])["input_ids"].shape[1],
                                       build_batch(backbone, long[:1])["input_ids"].shape[1]]
    out["goals"] = {"capture_overhead": 1.05, "steer_overhead": 1.03, "pair_vs_single": 1.25,
                    "calibration_forward_share": 0.9}
    out["meets_goals"] = {"capture_overhead": out["capture_overhead"] <= 1.05,
                          "steer_overhead": out["steer_overhead"] <= 1.03,
                          "pair_vs_single": out["pair_vs_single"] <= 1.25,
                          "calibration_forward_share": out["calibration_forward_share"] >= 0.9}
    return out
