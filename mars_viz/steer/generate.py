"""Steered and unsteered answers for the same inputs, with MARS's diagnostics.

Both answers share the prompt up to its last position, the one MARS edits. How the pair is computed is a
`PairStrategy`, chosen per call:

  gate_first  prefill prompt[:-1] once, decode the unsteered answer (reading the gate on the way), and decode the
              steered answer from a copy of the cache only if MARS moves the input. Wins where a 2-row decode step
              costs about two 1-row steps (a CPU leaving its matrix-vector path): benign inputs cost one generation.
  batched     prefill prompt[:-1] once, then run the last position and the decode as [unsteered, steered] rows of
              one batch. Wins where a 2-row step costs about one row (a GPU): every pair costs about one generation.
  doubled     a plain batch of [unsteered..., steered...] rows, no shared prefill: the simplest path, the reference.
  auto        times one 1-row and one 2-row decode step on the loaded model (`measure_pair_cost`, once per model,
              device and dtype) and picks batched when 2 rows cost at most `AUTO_MAX_RATIO` x one row, else
              gate_first. Whether batching is free depends on the machine, not on its device type.

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

import contextlib
import copy
import math
import queue
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch
from transformers.generation.streamers import BaseStreamer

from ..core.state import MarsState
from ..data.judge import RefusalJudge, default_judge
from ..model.backbone import Backbone
from ..model.hooks import ResidualCapture, capture_residuals, capture_sequence, read_position
from ..model.inputs import Query, build_batch, gate_index, inst_positions
from .steering import SteerOptions, gate_scores, mars_steering, plan, probe_gate

__all__ = ["AUTO_MAX_RATIO", "PAIR_STRATEGIES", "Answer", "PairResult", "PairStrategy", "PairUpdate", "generate_batch",
           "greedy_texts", "measure_pair_cost", "resolve_strategy", "run_pairs", "stream_pair"]

PairStrategy = Literal["auto", "gate_first", "batched", "doubled"]
PAIR_STRATEGIES: tuple[str, ...] = ("gate_first", "batched", "doubled")  # the concrete ones (auto picks one)
AUTO_MAX_RATIO = 1.25  # auto picks batched when a 2-row decode step costs at most this many 1-row steps


@dataclass
class Answer:
    text: str
    refused: bool
    token_ids: list[int]

    def to_json(self) -> dict:
        return {"text": self.text, "refused": self.refused, "num_tokens": len(self.token_ids)}


@dataclass
class PairResult:
    """One query's unsteered and steered answers, and why MARS did what it did."""

    prompt: str
    modality: str
    layer: int  # the push layer
    score_raw: float  # s of the raw activation at the push layer
    score_recentred: float  # s at the push layer after subtracting the modality offset (sets how far to push)
    tau: float  # the gate's threshold, at detect_layer
    t_star: float
    gate_open: bool
    gate_weight: float
    strength: float
    recenter: bool
    steer: bool
    displacement_norm: float
    unsteered: Answer
    steered: Answer
    t_star_layer: int | None = None  # the layer t* was calibrated at (None: t* was given by the user)
    detect_layer: int | None = None  # where the gate read its score (None: the push layer)
    score_gate: float | None = None  # the re-centred score the gate read there
    gate_position: str = "post"  # the position the gate read at: "post" (t_post) or "inst" (t_inst)

    @property
    def gate_layer(self) -> int:
        return self.layer if self.detect_layer is None else self.detect_layer

    @property
    def gate_score(self) -> float:
        return self.score_recentred if self.score_gate is None else self.score_gate

    @property
    def t_star_note(self) -> str | None:
        """Says so when a layer override pushes with a t* that was calibrated at another layer."""
        if self.t_star_layer is None or self.t_star_layer == self.layer:
            return None
        return (f"t* = {self.t_star:g} was calibrated at layer {self.t_star_layer}; this run pushes at layer "
                f"{self.layer} with it (refusal at that level is not measured there)")

    def to_json(self) -> dict:
        out = {"prompt": self.prompt, "modality": self.modality, "layer": self.layer,
               "detect_layer": self.gate_layer, "gate_position": self.gate_position, "score_gate": self.gate_score,
               "score_raw": self.score_raw, "score_recentred": self.score_recentred, "tau": self.tau,
               "target_level": self.t_star, "target_level_layer": self.t_star_layer, "gate_open": self.gate_open,
               "gate_weight": self.gate_weight, "strength": self.strength, "recenter": self.recenter,
               "steer": self.steer, "displacement_norm": self.displacement_norm,
               "unchanged": self.unsteered.text == self.steered.text,
               "unsteered": self.unsteered.to_json(), "steered": self.steered.to_json()}
        if self.t_star_note:
            out["t_star_note"] = self.t_star_note
        return out


def _gen_kwargs(backbone: Backbone, max_new_tokens: int, force: bool = False) -> dict:
    """Greedy decoding; `force` makes every row produce exactly max_new_tokens (benchmarks compare equal work)."""
    tok = backbone.tokenizer
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, temperature=None, top_p=None,
              top_k=None, pad_token_id=tok.pad_token_id)
    if force:
        kw["min_new_tokens"] = max_new_tokens
    return kw


def _eos_ids(backbone: Backbone) -> set[int]:
    ids = backbone.model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if backbone.tokenizer.eos_token_id is not None:
        ids.add(backbone.tokenizer.eos_token_id)
    return ids


def _cut(backbone: Backbone, seq: list[int]) -> list[int]:
    eos, pad = _eos_ids(backbone), backbone.tokenizer.pad_token_id
    cut = []
    for t in seq:
        if t in eos:
            break
        cut.append(t)
    while cut and cut[-1] == pad:
        cut.pop()
    return cut


def _decode_rows(backbone: Backbone, out: torch.Tensor, n_prompt: int) -> list[tuple[list[int], str]]:
    """Per row of `generate`'s output: the new token ids (cut at EOS / padding) and their text."""
    rows = []
    for seq in out[:, n_prompt:].cpu().tolist():
        cut = _cut(backbone, seq)
        rows.append((cut, backbone.tokenizer.decode(cut, skip_special_tokens=True).strip()))
    return rows


@contextlib.contextmanager
def _capturing(backbone: Backbone, capture: bool) -> Iterator[ResidualCapture | None]:
    """`capture_residuals` on every layer when asked, else nothing (yields None)."""
    if not capture:
        yield None
        return
    with capture_residuals(backbone.layers) as cap:
        yield cap


@contextlib.contextmanager
def _inst_capturing(backbone: Backbone, capture: bool, batch, out: dict) -> Iterator[None]:
    """The residual of every layer at t_inst (the last token of the user's text) in the first forward call that
    holds the whole prompt (a shared prefill of prompt[:-1] holds it too: t_inst comes before the last position),
    written to `out["inst"]` (`[B, L, d]`); nothing when `capture` is off."""
    if not capture:
        yield
        return
    with capture_residuals(backbone.layers, positions=inst_positions(backbone, batch["input_ids"])) as cap:
        yield
    out["inst"] = cap.at_positions()[:, :, 0]


@contextlib.contextmanager
def _prefix_gate(backbone: Backbone, state: MarsState, options: SteerOptions, modalities: Sequence[str],
                 box: dict) -> Iterator[None]:
    """A gate read at t_inst is read during the shared prefill of prompt[:-1] (which holds t_inst, not t_post):
    its scores go to `box["s"]` and the steered pass gets them as `gate=`. Nothing for a gate at t_post."""
    p = plan(state, options)
    if not options.steer or p.gate_position != "inst":
        yield
        return

    def read(h: torch.Tensor) -> None:
        box["s"] = gate_scores(state, p, h, modalities, options.recenter)

    # index from the end of the prefix, which lacks the prompt's last position
    with read_position(backbone.layers[p.detect_layer], read, position=gate_index(backbone, "inst") + 1):
        yield


@contextlib.contextmanager
def _seq_capturing(backbone: Backbone, seq: dict | None, rows: torch.Tensor | None = None) -> Iterator[None]:
    """Every position of the first forward call at the layers `seq["layers"]` (the per-position maps), written to
    `seq["h"]` (layer -> `[B, T, d]`); nothing when `seq` is None. Costs T x d floats per layer, no extra forward."""
    if seq is None:
        yield
        return
    with capture_sequence(backbone.layers, seq["layers"], rows=rows) as cap:
        yield
    seq["h"] = {i: cap[i] for i in cap.layers}


def _finish_seq(seq: dict | None, batch, acts: torch.Tensor | None, n: int) -> None:
    """Complete a sequence capture: a shared prefill saw prompt[:-1], so the last position comes from `acts`
    (`[n, L, d]`, the unsteered rows' residuals there); keep the unsteered rows' ids, mask and media metadata."""
    if seq is None:
        return
    ids = batch["input_ids"][:n]
    for i, h in seq["h"].items():
        if h.shape[1] == ids.shape[1] - 1:
            seq["h"][i] = torch.cat([h[:n], acts[:, i][:, None]], dim=1)
        else:
            seq["h"][i] = h[:n]
    seq["input_ids"], seq["attention_mask"] = ids.cpu(), batch["attention_mask"][:n].cpu()
    seq["meta"] = {k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()
                   if k not in ("input_ids", "attention_mask") and not k.startswith("pixel_values")}


@torch.inference_mode()
def generate_batch(backbone: Backbone, batch, max_new_tokens: int, streamer: BaseStreamer | None = None,
                   force_tokens: bool = False) -> list[tuple[list[int], str]]:
    """Greedy-decode a built batch; per row, the new token ids (cut at EOS) and their text."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    out = backbone.model.generate(**batch, **_gen_kwargs(backbone, max_new_tokens, force_tokens), streamer=streamer)
    return _decode_rows(backbone, out, batch["input_ids"].shape[1])


def greedy_texts(backbone: Backbone, queries: Sequence[Query], max_new_tokens: int, batch_size: int = 8,
                 progress: Callable[[int, int], None] | None = None) -> list[tuple[list[int], str]]:
    """Unsteered greedy answers for many queries, batched."""
    out: list[tuple[list[int], str]] = []
    for i in range(0, len(queries), batch_size):
        out += generate_batch(backbone, build_batch(backbone, list(queries[i:i + batch_size])), max_new_tokens)
        if progress:
            progress(min(i + batch_size, len(queries)), len(queries))
    return out


def _prefill_all_but_last(backbone: Backbone, batch) -> tuple[object, dict]:
    """Run the prompt minus its last position once (media included); return the KV cache and the decode inputs.

    The last prompt position is the one MARS edits, so everything before it is shared by both answers.
    """
    n_pos = batch["input_ids"].shape[1]
    pre = {k: (v[:, :-1] if torch.is_tensor(v) and v.dim() == 2 and v.shape[1] == n_pos else v)
           for k, v in batch.items()}
    # Prefill through `generate` (one token, discarded) so positions follow generate's own conventions for padded
    # rows; the cache then holds exactly the P-1 prompt positions.
    out = backbone.model.generate(**pre, **_gen_kwargs(backbone, 1), return_dict_in_generate=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None:
        raise RuntimeError(f"{type(backbone.model).__name__} returned no KV cache")
    return cache, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _rope_owners(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model and its inner model, where M-RoPE models (Qwen2-VL family) keep `rope_deltas` between calls."""
    return [o for o in (model, getattr(model, "model", None)) if o is not None and hasattr(o, "rope_deltas")]


@contextlib.contextmanager
def _kept_rope_deltas(model: torch.nn.Module) -> Iterator[None]:
    """Give back the `rope_deltas` found on entry, whatever the pair did to them (a prefill sets them, the batched
    pair duplicates them with the rows), so the model leaves the pair as it came in."""
    saved = [(o, o.rope_deltas) for o in _rope_owners(model)]
    try:
        yield
    finally:
        for owner, deltas in saved:
            owner.rope_deltas = deltas


@contextlib.contextmanager
def _duplicated_rope_deltas(model: torch.nn.Module, rows: int, n: int) -> Iterator[None]:
    """Per-row position offsets `[rows, 1]` left by a prefill of `rows` rows, each repeated `n` times (rows
    [q0, q0, q1, q1, ...]) for the decode that follows; the prefill's values come back in `finally`."""
    with _kept_rope_deltas(model):
        for owner in _rope_owners(model):
            deltas = owner.rope_deltas
            if torch.is_tensor(deltas) and deltas.shape[0] == rows:
                owner.rope_deltas = deltas.repeat_interleave(n, dim=0)
        yield


@torch.inference_mode()
def _generate_shared(backbone: Backbone, batch, max_new_tokens: int, streamer, steering_ctx, capture: bool,
                     force_tokens: bool = False, probe=None, seq: dict | None = None, prefix_gate=None,
                     inst: dict | None = None):
    """Both answers of each row from one shared prefill: rows become [q0, q0', q1, q1', ...] for the last position
    and the decode; `steering_ctx(gate)` (opened only around the decode) edits the primed rows. `prefix_gate(box)`
    reads a t_inst gate during the prefill; `probe(cache, dec)`, when a t_post gate is read after the push layer,
    runs the last prompt position unsteered first (on a copy of the prefix cache) and returns the gate's scores."""
    rows = batch["input_ids"].shape[0]
    box: dict = {"s": None}
    with _kept_rope_deltas(backbone.model):
        with _seq_capturing(backbone, seq), prefix_gate(box), _inst_capturing(backbone, capture, batch, inst):
            cache, dec = _prefill_all_but_last(backbone, batch)
        gate = box["s"] if probe is None else probe(cache, dec)
        cache.batch_repeat_interleave(2)
        dec = {k: v.repeat_interleave(2, dim=0) for k, v in dec.items()}
        with _duplicated_rope_deltas(backbone.model, rows, 2), steering_ctx(gate) as rec, \
                _capturing(backbone, capture) as cap:
            out = backbone.model.generate(**dec, cache=cache, streamer=streamer,
                                          **_gen_kwargs(backbone, max_new_tokens, force_tokens))
    acts = None if cap is None else cap.last()[0::2]  # unsteered rows: the raw residual stream
    return _decode_rows(backbone, out, dec["input_ids"].shape[1]), rec, acts


@torch.inference_mode()
def _generate_gate_first(backbone: Backbone, state: MarsState, batch, options: SteerOptions, modality: str,
                         max_new_tokens: int, streamers, capture: bool, force_tokens: bool = False,
                         seq: dict | None = None, inst: dict | None = None):
    """One query: shared prefill, the unsteered answer (reading the gate on the way), then the steered answer only
    if MARS would actually move the input; otherwise it is the unsteered answer, bit for bit (the edit adds +0.0)."""
    box: dict = {"s": None}
    with _kept_rope_deltas(backbone.model):
        with _seq_capturing(backbone, seq), _prefix_gate(backbone, state, options, [modality], box), \
                _inst_capturing(backbone, capture, batch, inst):
            cache, dec = _prefill_all_but_last(backbone, batch)
        spare = copy.deepcopy(cache)
        kw = _gen_kwargs(backbone, max_new_tokens, force_tokens)
        n_prompt = dec["input_ids"].shape[1]
        with mars_steering(backbone, state, replace(options, steer=False), [modality], gate=box["s"]) as probe, \
                _capturing(backbone, capture) as cap:
            out_u = backbone.model.generate(**dec, cache=cache, streamer=streamers[0], **kw)
        acts = None if cap is None else cap.last()
        plain = _decode_rows(backbone, out_u, n_prompt)[0]
        info = probe.info
        if float(info["planned_norm"].max()) > 0:  # MARS moves the input: decode the steered answer too
            # the gate read on the unsteered pass is the gate of the steered one (same input up to the push)
            with mars_steering(backbone, state, options, [modality], gate=info["s_gate"]) as rec:
                out_s = backbone.model.generate(**dec, cache=spare, streamer=streamers[1], **kw)
            steered, info = _decode_rows(backbone, out_s, n_prompt)[0], rec.info
        else:
            steered = plain
            if streamers[1] is not None:
                streamers[1].copy_from(streamers[0])
    return [plain, steered], info, acts


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


def resolve_strategy(backbone: Backbone, strategy: str = "auto") -> str:
    """The concrete strategy (gate_first, batched or doubled) for `strategy`; `auto` measures (once) and chooses."""
    if strategy == "auto":
        return measure_pair_cost(backbone)["chosen"]
    if strategy not in PAIR_STRATEGIES:
        raise ValueError(f"unknown pair strategy {strategy!r}: use one of {', '.join(get_args(PairStrategy))}")
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
    with _kept_rope_deltas(backbone.model):
        if options.steer and strategy == "gate_first":
            streamers = (None, None) if stream is None else (_RowStreamer(stream, (0,)), _RowStreamer(stream, (1,)))
            batch = build_batch(backbone, chunk)
            gen, info, acts = _generate_gate_first(backbone, state, batch, options, modalities[0], max_new_tokens,
                                                   streamers, capture, force_tokens, seq, inst)
            plain, steered = gen[:1], gen[1:]
        elif options.steer and strategy == "batched":
            rows = torch.tensor([False, True] * n)  # [q0, q0', q1, q1', ...]
            streamer = None if stream is None else _RowStreamer(stream, (0, 1))
            probe = None
            if p.reads_later and p.gate_position == "post":
                def probe(cache, dec):  # the last prompt position, unsteered, on a copy of the prefix cache
                    spare = copy.deepcopy(cache)
                    return probe_gate(backbone, state, options, modalities, lambda: backbone.model.generate(
                        **dec, cache=spare, **_gen_kwargs(backbone, 1)))
            batch = build_batch(backbone, chunk)
            gen, rec, acts = _generate_shared(
                backbone, batch, max_new_tokens, streamer,
                lambda gate: mars_steering(backbone, state, options, modalities, rows=rows, gate=gate), capture,
                force_tokens, probe, seq, lambda box: _prefix_gate(backbone, state, options, modalities, box), inst)
            plain, steered, info = gen[0::2], gen[1::2], rec.info
        else:  # doubled: [q0, q1, ..., q0', q1', ...], or the plain rows alone when not steering
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


class _RowStreamer(BaseStreamer):
    """Posts generated token ids to a queue, per answer slot (0 unsteered, 1 steered); skips the prompt push.

    `slots` maps batch rows to slots: (0, 1) for a 2-row [unsteered, steered] batch (batched and doubled), (k,) for
    a one-row generation (gate_first's two decodes, or the unsteered answer alone).
    """

    def __init__(self, q: queue.Queue, slots: tuple[int, ...]):
        self.q, self.slots, self.started = q, slots, False
        self.rows: list[list[int]] = [[] for _ in slots]

    def put(self, value: torch.Tensor) -> None:
        if not self.started:  # the first push is the prompt
            self.started = True
            return
        for row, t in zip(self.rows, value.reshape(-1).tolist(), strict=True):
            row.append(t)
        for slot, row in zip(self.slots, self.rows, strict=True):
            self.q.put(("tokens", slot, list(row)))

    def copy_from(self, other: _RowStreamer) -> None:
        """The steered answer equals the unsteered one (gate closed): publish it as such."""
        self.q.put(("tokens", self.slots[0], list(other.rows[0])))

    def end(self) -> None:
        pass


@dataclass
class PairUpdate:
    """A streaming snapshot: partial texts, then (done=True) the full result and the input's residuals."""

    unsteered: str
    steered: str
    done: bool = False
    result: PairResult | None = None
    acts: torch.Tensor | None = None  # [L, d] raw residuals of the input at the last prompt position (t_post)
    acts_inst: torch.Tensor | None = None  # [L, d] the same at the last token of the user's text (t_inst)
    seq: dict | None = None  # with `seq_layers`: {"h": {layer: [T, d]}, "input_ids": [T], "meta": {...}}


def stream_pair(backbone: Backbone, state: MarsState, query: Query, options: SteerOptions,
                judge: RefusalJudge | None = None, max_new_tokens: int = 64, strategy: PairStrategy = "auto",
                seq_layers: Sequence[int] | None = None) -> Iterator[PairUpdate]:
    """Stream both answers for one query as they are generated (by `strategy`, see module doc), then the result.

    The residuals of every layer are captured from the same prefill, so the dashboard needs no extra forward; with
    `seq_layers`, every prompt position at those layers too (the per-position maps, `PairUpdate.seq`).
    Errors inside generation (and an unknown strategy) are re-raised in the caller's thread.
    """
    judge = judge or default_judge()
    state.check_compatible(backbone)
    q: queue.Queue = queue.Queue()

    def work() -> None:
        try:
            seq = None if not seq_layers else {"layers": list(seq_layers)}
            res, acts = _run_chunk(backbone, state, [query], options, judge, max_new_tokens, q, capture=True,
                                   strategy=strategy, seq=seq)
            if seq is not None:  # one query: drop the batch dimension and the (absent) left padding
                keep = seq["attention_mask"][0].bool()
                seq = {"h": {i: h[0][keep] for i, h in seq["h"].items()}, "input_ids": seq["input_ids"][0][keep],
                       "meta": seq["meta"]}
            q.put(("done", (res[0], acts["post"][0], acts["inst"][0], seq)))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            q.put(("error", e))

    thread = threading.Thread(target=work, daemon=True)
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
        # Even when the consumer stops early (a closed browser tab), the generation and its hooks must finish
        # before the caller releases the model lock.
        thread.join()
