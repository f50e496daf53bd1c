"""Steered and unsteered answers for the same inputs, with MARS's diagnostics.

Both answers share the prompt up to its last position, the one MARS edits. How the pair is computed is a
`PairStrategy`, chosen per call; each concrete one is a function of its own (`_PAIRS`):

  gate_first  decode the unsteered answer as one plain generation (reading the gate on the way), and decode the
              steered answer, from the prompt's cache cut back to prompt[:-1], only if MARS moves the input. Wins
              where a 2-row decode step costs about two 1-row steps (a CPU leaving its matrix-vector path): benign
              inputs cost exactly one generation.
  batched     prefill the prompt once (reading every gate, generating the first token); with no gate open, decode
              on from there, one row per query; else cut the cache back to prompt[:-1] and run the last position and
              the decode as [unsteered, steered] rows of one batch. Wins where a 2-row step costs about one row (a
              GPU): every pair costs about one generation, a benign one exactly one.
  doubled     a plain batch of [unsteered..., steered...] rows, no shared prefill: the simplest path, the reference.
  auto        times one 1-row and one 2-row decode step on the loaded model (`timing.measure_pair_cost`, once per
              model, device and dtype) and picks batched when 2 rows cost at most `AUTO_MAX_RATIO` x one row, else
              gate_first. Whether batching is free depends on the machine, not on its device type.

A prefix-LM (`ArchSpec.prefix_lm`: PaliGemma) runs every strategy as doubled (`resolve_strategy`): its prompt
attends both ways, so no prefill of prompt[:-1] can be shared.

Every strategy computes the same two answers: the tests check each against two separate generations on every tiny
architecture, on the CPU. (Batch shape may change the last float bits, so on a real model a near-tie could rarely
pick another token.) With the gate closed the steered answer is bit-identical to the unsteered one, whatever the
strategy: the edit adds exactly +0.0.

Example:
    >>> res = run_pairs(backbone, state, [Query("How do I pick a lock?")], SteerOptions())   # doctest: +SKIP
    >>> res[0].to_json()["steered"]["refused"]                                              # doctest: +SKIP
    >>> resolve_strategy(backbone, "auto"), backbone.describe()["pair_strategy"]["ratio"]   # doctest: +SKIP
    ('batched', 1.04)
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Literal, get_args

import torch

from ..core.state import MarsState
from ..data.judge import RefusalJudge, default_judge
from ..model.backbone import Backbone
from ..model.inputs import Query, build_batch
from .captures import _capturing, _finish_seq, _inst_capturing, _seq_capturing
from .generate import (
    DECODE_KEYS,
    _cache_of,
    _continued,
    _decode_rows,
    _duplicated_rope_deltas,
    _gen_kwargs,
    _kept_rope_deltas,
    _prefill_all_but_last,
    _rewind,
    _RowStreamer,
    generate_batch,
)
from .results import Answer, PairResult
from .steering import Plan, SteerOptions, mars_steering, plan
from .timing import measure_pair_cost

__all__ = ["PAIR_STRATEGIES", "PairStrategy", "resolve_strategy", "run_pairs"]

PairStrategy = Literal["auto", "gate_first", "batched", "doubled"]


@torch.inference_mode()
def _generate_shared(backbone: Backbone, state: MarsState, batch, options: SteerOptions, modalities: list[str],
                     max_new_tokens: int, stream: queue.Queue | None, capture: bool, force_tokens: bool = False,
                     seq: dict | None = None, inst: dict | None = None):
    """Both answers of each row, batched, with the gate read first. The prompt's prefill is run once, unsteered, and
    generates the first token while reading every row's gate (wherever it sits) and the captures.

    - No row moves (every gate closed): the unsteered rows go on decoding from that cache, one row per query, so the
      pair costs one generation; the steered answers are the unsteered ones, bit for bit.
    - Some row moves: the cache is cut back to prompt[:-1] (`_rewind`; a new prefill where it cannot be cut) and the
      rows become [q0, q0', q1, q1', ...] for the last position and the decode, the primed rows steered by the gate
      just read.

    Returns (unsteered rows, steered rows, the edit's info, the unsteered residuals at the last position)."""
    n, n_prompt = batch["input_ids"].shape[0], batch["input_ids"].shape[1]
    dec = {k: batch[k] for k in DECODE_KEYS if k in batch}
    with _kept_rope_deltas(backbone.model):
        with _seq_capturing(backbone, seq), _inst_capturing(backbone, capture, batch, inst), \
                mars_steering(backbone, state, replace(options, steer=False), modalities) as probe, \
                _capturing(backbone, capture) as cap:
            first = backbone.model.generate(**batch, return_dict_in_generate=True,
                                            **_gen_kwargs(backbone, 1, force_tokens))
        acts = None if cap is None else cap.last()
        info = probe.info
        cache = _cache_of(first)
        if float(info["planned_norm"].max()) <= 0 and cache is not None:
            plain = _go_on(backbone, first.sequences, cache, dec, max_new_tokens, force_tokens, stream, n_prompt)
            if stream is not None:  # the steered answer is the unsteered one
                stream.put(("tokens", 1, list(plain[0][0])))
            return plain, plain, info, acts
        if cache is None or not _rewind(backbone, cache, n_prompt - 1):
            cache, _ = _prefill_all_but_last(backbone, batch)
        rows = torch.tensor([False, True] * n)  # [q0, q0', q1, q1', ...]
        cache.batch_repeat_interleave(2)
        dec = {k: v.repeat_interleave(2, dim=0) for k, v in dec.items()}
        streamer = None if stream is None else _RowStreamer(stream, (0, 1))
        with _duplicated_rope_deltas(backbone.model, n, 2), \
                mars_steering(backbone, state, options, modalities, rows=rows, gate=info["s_gate"]) as rec:
            out = backbone.model.generate(**dec, cache=cache, streamer=streamer,
                                          **_gen_kwargs(backbone, max_new_tokens, force_tokens))
    gen = _decode_rows(backbone, out, n_prompt)
    return gen[0::2], gen[1::2], rec.info, acts


def _go_on(backbone: Backbone, sequences: torch.Tensor, cache, dec: dict, max_new_tokens: int, force_tokens: bool,
           stream: queue.Queue | None, n_prompt: int) -> list[tuple[list[int], str]]:
    """Decode on from a generation of one token (`sequences` `[n, P + 1]`, `cache` holding the P prompt positions)
    to `max_new_tokens` in all, as one plain generation would: the same cache, the next positions."""
    streamer = None if stream is None else _RowStreamer(stream, (0,))
    if streamer is not None:
        streamer.put(sequences[:, :n_prompt])  # the prompt (skipped), then the first token
        streamer.put(sequences[:, n_prompt:])
    if max_new_tokens <= 1:
        return _decode_rows(backbone, sequences, n_prompt)
    if streamer is not None:
        streamer.started = False  # the next call pushes its input first
    out = backbone.model.generate(**_continued(dec, sequences, n_prompt), cache=cache, streamer=streamer,
                                  **_gen_kwargs(backbone, max_new_tokens - 1, force_tokens))
    return _decode_rows(backbone, out, n_prompt)


@torch.inference_mode()
def _generate_gate_first(backbone: Backbone, state: MarsState, batch, options: SteerOptions, modality: str,
                         max_new_tokens: int, streamers, capture: bool, force_tokens: bool = False,
                         seq: dict | None = None, inst: dict | None = None):
    """One query: the unsteered answer as one plain generation that reads the gate on the way (wherever it sits),
    then the steered answer only if MARS would actually move the input, decoded from the prompt's cache cut back to
    all but its last position (`_rewind`; a new prefill of it where a cache cannot be cut). A closed gate therefore
    costs exactly one generation, and its steered answer is the unsteered one, bit for bit (the edit adds +0.0)."""
    kw = _gen_kwargs(backbone, max_new_tokens, force_tokens)
    n_prompt = batch["input_ids"].shape[1]
    with _kept_rope_deltas(backbone.model):
        with _seq_capturing(backbone, seq), _inst_capturing(backbone, capture, batch, inst), \
                mars_steering(backbone, state, replace(options, steer=False), [modality]) as probe, \
                _capturing(backbone, capture) as cap:
            out_u = backbone.model.generate(**batch, streamer=streamers[0], return_dict_in_generate=True, **kw)
        acts = None if cap is None else cap.last()
        plain = _decode_rows(backbone, out_u.sequences, n_prompt)[0]
        info = probe.info
        if float(info["planned_norm"].max()) > 0:  # MARS moves the input: decode the steered answer too
            cache = _cache_of(out_u)
            if cache is not None and _rewind(backbone, cache, n_prompt - 1):
                dec = {k: batch[k] for k in DECODE_KEYS if k in batch}
            else:
                cache, dec = _prefill_all_but_last(backbone, batch)
            # the gate read on the unsteered pass is the gate of the steered one (same input up to the push)
            with mars_steering(backbone, state, options, [modality], gate=info["s_gate"]) as rec:
                out_s = backbone.model.generate(**dec, cache=cache, streamer=streamers[1], **kw)
            steered, info = _decode_rows(backbone, out_s, n_prompt)[0], rec.info
        else:
            steered = plain
            if streamers[1] is not None:
                streamers[1].copy_from(streamers[0])
    return [plain, steered], info, acts

# ---- the strategies: each builds its batch and returns (batch, unsteered, steered, info, unsteered residuals) ----

def _pair_gate_first(backbone: Backbone, state: MarsState, chunk: list[Query], options: SteerOptions, p: Plan,
                     modalities: list[str], max_new_tokens: int, stream: queue.Queue | None, capture: bool,
                     force_tokens: bool, seq: dict | None, inst: dict):
    """gate_first (one query): the unsteered answer, then the steered one only if MARS moves the input."""
    streamers = (None, None) if stream is None else (_RowStreamer(stream, (0,)), _RowStreamer(stream, (1,)))
    batch = build_batch(backbone, chunk)
    gen, info, acts = _generate_gate_first(backbone, state, batch, options, modalities[0], max_new_tokens,
                                           streamers, capture, force_tokens, seq, inst)
    plain, steered = gen[:1], gen[1:]
    return batch, plain, steered, info, acts


def _pair_batched(backbone: Backbone, state: MarsState, chunk: list[Query], options: SteerOptions, p: Plan,
                  modalities: list[str], max_new_tokens: int, stream: queue.Queue | None, capture: bool,
                  force_tokens: bool, seq: dict | None, inst: dict):
    """batched: the gate read in the prompt's prefill, then one row per query when no gate opens, else
    [q0, q0', q1, q1', ...] rows on the shared prefix for the last position and the decode."""
    batch = build_batch(backbone, chunk)
    plain, steered, info, acts = _generate_shared(backbone, state, batch, options, modalities, max_new_tokens, stream,
                                                  capture, force_tokens, seq, inst)
    return batch, plain, steered, info, acts


def _pair_doubled(backbone: Backbone, state: MarsState, chunk: list[Query], options: SteerOptions, p: Plan,
                  modalities: list[str], max_new_tokens: int, stream: queue.Queue | None, capture: bool,
                  force_tokens: bool, seq: dict | None, inst: dict):
    """doubled: [q0, q1, ..., q0', q1', ...], or the plain rows alone when not steering."""
    n = len(chunk)
    doubled = chunk + chunk if options.steer else chunk
    rows = torch.tensor([False] * n + [True] * n) if options.steer else None
    streamer = None if stream is None else _RowStreamer(stream, (0, 1) if options.steer else (0,))
    batch = build_batch(backbone, doubled)
    # mars_steering reads the gate wherever it sits (a later layer: an unsteered probe of the first call).
    # Capture is registered after the steering hook: row i (unsteered) sees the raw residual stream.
    with mars_steering(backbone, state, options, modalities, rows=rows) as rec, \
            _capturing(backbone, capture) as cap, _seq_capturing(backbone, seq), \
            _inst_capturing(backbone, capture, batch, inst):
        gen = generate_batch(backbone, batch, max_new_tokens, streamer, force_tokens)
    acts = None if cap is None else cap.last()[:n]  # [n, L, d]
    plain, steered = gen[:n], (gen[n:] if options.steer else gen[:n])
    info = rec.info
    return batch, plain, steered, info, acts


_PAIRS: dict[str, Callable] = {"gate_first": _pair_gate_first, "batched": _pair_batched, "doubled": _pair_doubled}
PAIR_STRATEGIES: tuple[str, ...] = tuple(_PAIRS)  # the concrete ones (auto picks one)


def resolve_strategy(backbone: Backbone, strategy: str = "auto") -> str:
    """The concrete strategy (gate_first, batched or doubled) for `strategy`; `auto` measures (once) and chooses.

    A prefix-LM (`ArchSpec.prefix_lm`: PaliGemma, whose prompt attends both ways) gets `doubled` whatever is asked:
    there a prefill of prompt[:-1] is not the full prompt's prefill (its positions would not see the last one), so
    gate_first and batched could not give the answers of two separate generations."""
    if strategy != "auto" and strategy not in PAIR_STRATEGIES:
        raise ValueError(f"unknown pair strategy {strategy!r}: use one of {', '.join(get_args(PairStrategy))}")
    if backbone.arch.prefix_lm:
        return "doubled"
    if strategy == "auto":
        return measure_pair_cost(backbone)["chosen"]
    return strategy


def _run_chunk(backbone: Backbone, state: MarsState, chunk: list[Query], options: SteerOptions, judge: RefusalJudge,
               max_new_tokens: int, stream: queue.Queue | None = None, capture: bool = False,
               strategy: PairStrategy = "auto", force_tokens: bool = False, seq: dict | None = None
               ) -> tuple[list[PairResult], dict[str, torch.Tensor] | None]:
    """Both answers for a chunk of queries with one strategy. `stream` (one query only) receives the tokens of
    each answer slot as `_RowStreamer` posts them. `options.steer=False` runs one plain batch whatever the strategy.
    With `capture`, the unsteered residuals of every layer at both gate positions come back as `{"post": [n, L, d],
    "inst": [n, L, d]}` (else None).
    `seq` (one query only; `{"layers": [...]}`) receives the prefill's residuals at every position at those layers
    (`seq["h"]`, `[1, T, d]` each), with the input ids and media metadata: the per-position maps."""
    n = len(chunk)
    if seq is not None and n != 1:
        raise ValueError(f"per-position capture takes one query, got {n}")
    capture = capture or seq is not None
    if stream is not None and n != 1:
        raise ValueError(f"streaming takes one query, got {n}")
    modalities = [q.modality for q in chunk]
    strategy = resolve_strategy(backbone, strategy) if options.steer else "doubled"
    if options.steer and strategy == "gate_first" and n > 1:
        # gate_first pays off where rows cost linearly, so batching queries buys nothing: one query at a time.
        parts = [_run_chunk(backbone, state, [q], options, judge, max_new_tokens, None, capture, strategy,
                            force_tokens) for q in chunk]
        sites = {k: torch.cat([a[k] for _, a in parts]) for k in ("post", "inst")} if capture else None
        return [r for res, _ in parts for r in res], sites
    p = plan(state, options)
    inst: dict = {}
    with _kept_rope_deltas(backbone.model):  # not steering: `strategy` is "doubled", which runs the plain rows alone
        batch, plain, steered, info, acts = _PAIRS[strategy](
            backbone, state, chunk, options, p, modalities, max_new_tokens, stream, capture, force_tokens, seq, inst)
    _finish_seq(seq, batch, acts, n)
    verdict = judge([t for _, t in plain] + [t for _, t in steered])
    results = []
    for i, q in enumerate(chunk):
        results.append(PairResult(
            prompt=q.prompt, modality=q.modality, layer=int(info["layer"]), score_raw=float(info["s_raw"][i]),
            score_recentred=float(info["s_recentred"][i]), tau=float(info["tau"]), t_star=float(info["t_star"]),
            gate_open=bool(info["gate_open"][i]), gate_weight=float(info["gate_weight"][i]),
            strength=options.strength, recenter=options.recenter, steer=options.steer,
            displacement_norm=float(info["displacement_norm"][i]),
            unsteered=Answer(plain[i][1], verdict[i], plain[i][0]),
            steered=Answer(steered[i][1], verdict[n + i], steered[i][0]),
            t_star_layer=None if options.target_level is not None else state.layer,
            detect_layer=int(info["detect_layer"]), score_gate=float(info["s_gate"][i]),
            gate_position=str(info["gate_position"])))
    return results, (None if acts is None else {"post": acts, "inst": inst["inst"][:n]})


def run_pairs(backbone: Backbone, state: MarsState, queries: Sequence[Query], options: SteerOptions,
              judge: RefusalJudge | None = None, max_new_tokens: int = 48, batch_size: int = 4,
              progress: Callable[[int, int], None] | None = None, strategy: PairStrategy = "auto"
              ) -> list[PairResult]:
    """Unsteered + steered answers for each query (see module doc for `strategy`). `options.steer=False` skips the
    steered row and reports the unsteered answer for both, with the scores MARS would have used."""
    judge = judge or default_judge()
    state.check_compatible(backbone)
    strategy = resolve_strategy(backbone, strategy) if options.steer else "doubled"
    results: list[PairResult] = []
    for start in range(0, len(queries), batch_size):
        chunk = list(queries[start:start + batch_size])
        results += _run_chunk(backbone, state, chunk, options, judge, max_new_tokens, strategy=strategy)[0]
        if progress:
            progress(min(start + batch_size, len(queries)), len(queries))
    return results
