"""Steered and unsteered answers for the same inputs, with MARS's diagnostics.

Both answers come from one shared prefill: the prompt minus its last position runs once (images and video included),
its KV cache is duplicated, and the last prompt position plus the decode run as a batch of two rows, one of them
steered. The pair therefore costs about one generation. The steering hook edits only the steered row at the last
prompt position. With the gate closed the displacement is exactly zero, so both rows give bit-identical answers.

Example:
    >>> res = run_pairs(backbone, state, [Query("How do I pick a lock?")], SteerOptions())   # doctest: +SKIP
    >>> res[0].to_json()["steered"]["refused"]                                              # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers.generation.streamers import BaseStreamer

from .backbone import Backbone
from .hooks import ResidualCapture, capture_residuals
from .inputs import Query, build_batch
from .judge import RefusalJudge, default_judge
from .state import MarsState
from .steering import SteerOptions, mars_steering

__all__ = ["Answer", "PairResult", "PairUpdate", "generate_batch", "greedy_texts", "run_pairs", "stream_pair"]


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
    layer: int
    score_raw: float  # s of the raw activation
    score_recentred: float  # s after subtracting the modality offset (what the gate sees)
    tau: float
    t_star: float
    gate_open: bool
    gate_weight: float
    strength: float
    recenter: bool
    steer: bool
    displacement_norm: float
    unsteered: Answer
    steered: Answer

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "modality": self.modality, "layer": self.layer,
                "score_raw": self.score_raw, "score_recentred": self.score_recentred, "tau": self.tau,
                "target_level": self.t_star, "gate_open": self.gate_open, "gate_weight": self.gate_weight,
                "strength": self.strength, "recenter": self.recenter, "steer": self.steer,
                "displacement_norm": self.displacement_norm, "unchanged": self.unsteered.text == self.steered.text,
                "unsteered": self.unsteered.to_json(), "steered": self.steered.to_json()}


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


@torch.inference_mode()
def _generate_shared(backbone: Backbone, batch, max_new_tokens: int, streamer, steering_ctx, capture: bool,
                     force_tokens: bool = False):
    """Both answers of each row from one shared prefill: rows become [q0, q0', q1, q1', ...] for the last position
    and the decode; `steering_ctx()` (opened only around the decode) edits the primed rows."""
    cache, dec = _prefill_all_but_last(backbone, batch)
    cache.batch_repeat_interleave(2)
    dec = {k: v.repeat_interleave(2, dim=0) for k, v in dec.items()}
    # M-RoPE models (Qwen2-VL family) keep per-row position offsets from the prefill: duplicate them with the rows.
    for owner in (backbone.model, getattr(backbone.model, "model", None)):
        deltas = getattr(owner, "rope_deltas", None)
        if torch.is_tensor(deltas) and deltas.shape[0] == batch["input_ids"].shape[0]:
            owner.rope_deltas = deltas.repeat_interleave(2, dim=0)
    with steering_ctx() as rec, _capturing(backbone, capture) as cap:
        out = backbone.model.generate(**dec, cache=cache, streamer=streamer,
                                      **_gen_kwargs(backbone, max_new_tokens, force_tokens))
    acts = None if cap is None else cap.last()[0::2]  # unsteered rows: the raw residual stream
    return _decode_rows(backbone, out, dec["input_ids"].shape[1]), rec, acts


@torch.inference_mode()
def _generate_gate_first(backbone: Backbone, state: MarsState, batch, options: SteerOptions, modality: str,
                         max_new_tokens: int, streamers, capture: bool, force_tokens: bool = False):
    """One query: shared prefill, the unsteered answer (reading the gate on the way), then the steered answer only
    if MARS would actually move the input; otherwise it is the unsteered answer, bit for bit (the edit adds +0.0).

    On a CPU, decoding two rows costs about twice one row (a batch of 2 leaves the fast matrix-vector path), so
    skipping the second decode when the gate is closed is what makes benign inputs cost one generation.
    """
    import copy
    from dataclasses import replace

    cache, dec = _prefill_all_but_last(backbone, batch)
    spare = copy.deepcopy(cache)
    kw = _gen_kwargs(backbone, max_new_tokens, force_tokens)
    n_prompt = dec["input_ids"].shape[1]
    with mars_steering(backbone, state, replace(options, steer=False), [modality]) as probe, \
            _capturing(backbone, capture) as cap:
        out_u = backbone.model.generate(**dec, cache=cache, streamer=streamers[0], **kw)
    acts = None if cap is None else cap.last()
    plain = _decode_rows(backbone, out_u, n_prompt)[0]
    info = probe.info
    if float(info["planned_norm"].max()) > 0:  # MARS moves the input: decode the steered answer too
        with mars_steering(backbone, state, options, [modality]) as rec:
            out_s = backbone.model.generate(**dec, cache=spare, streamer=streamers[1], **kw)
        steered, info = _decode_rows(backbone, out_s, n_prompt)[0], rec.info
    else:
        steered = plain
        if streamers[1] is not None:
            streamers[1].copy_from(streamers[0])
    return [plain, steered], info, acts


def _run_chunk(backbone: Backbone, state: MarsState, chunk: list[Query], options: SteerOptions, judge: RefusalJudge,
               max_new_tokens: int, streamer: BaseStreamer | None = None, capture: bool = False,
               shared_prefill: bool = True, force_tokens: bool = False
               ) -> tuple[list[PairResult], torch.Tensor | None]:
    n = len(chunk)
    modalities = [q.modality for q in chunk]
    streamers = streamer if isinstance(streamer, tuple) else (streamer, streamer)
    # One query on a CPU: decode the steered answer only when MARS moves the input (a 2-row decode costs ~2x there).
    # On a GPU a 2-row decode costs about one row, so the batched pair below is used for every n.
    if options.steer and shared_prefill and n == 1 and backbone.input_device.type != "cuda":
        gen, info, acts = _generate_gate_first(backbone, state, build_batch(backbone, chunk), options, modalities[0],
                                               max_new_tokens, streamers, capture, force_tokens)
        plain, steered = gen[:1], gen[1:]
    elif options.steer and shared_prefill:
        rows = torch.tensor([False, True] * n)
        gen, rec, acts = _generate_shared(
            backbone, build_batch(backbone, chunk), max_new_tokens, streamer,
            lambda: mars_steering(backbone, state, options, modalities, rows=rows), capture, force_tokens)
        streamer = streamers[0]
        plain, steered = gen[0::2], gen[1::2]
        info = rec.info
    else:
        doubled = chunk + chunk if options.steer else chunk
        rows = torch.tensor([False] * n + [True] * n) if options.steer else None
        batch = build_batch(backbone, doubled)
        # capture is registered after the steering hook: row i (unsteered) sees the raw residual stream
        with mars_steering(backbone, state, options, modalities, rows=rows) as rec, \
                _capturing(backbone, capture) as cap:
            gen = generate_batch(backbone, batch, max_new_tokens, streamer, force_tokens)
        acts = None if cap is None else cap.last()[:n]  # [n, L, d]
        plain, steered = gen[:n], (gen[n:] if options.steer else gen[:n])
        info = rec.info
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
            steered=Answer(steered[i][1], verdict[n + i], steered[i][0])))
    return results, acts


def run_pairs(backbone: Backbone, state: MarsState, queries: Sequence[Query], options: SteerOptions,
              judge: RefusalJudge | None = None, max_new_tokens: int = 48, batch_size: int = 4,
              progress: Callable[[int, int], None] | None = None) -> list[PairResult]:
    """Unsteered + steered answers for each query (see module doc). `options.steer=False` skips the steered row and
    reports the unsteered answer for both, with the scores MARS would have used."""
    judge = judge or default_judge()
    state.check_compatible(backbone)
    results: list[PairResult] = []
    for start in range(0, len(queries), batch_size):
        chunk = list(queries[start:start + batch_size])
        results += _run_chunk(backbone, state, chunk, options, judge, max_new_tokens)[0]
        if progress:
            progress(min(start + batch_size, len(queries)), len(queries))
    return results


class _RowStreamer(BaseStreamer):
    """Posts generated token ids to a queue, per answer slot (0 unsteered, 1 steered); skips the prompt push.

    `slots` maps batch rows to slots: (0, 1) for the [unsteered, steered] batch, (k,) for a one-row generation.
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
    acts: torch.Tensor | None = None  # [L, d] raw residuals of the input at the last prompt position


def stream_pair(backbone: Backbone, state: MarsState, query: Query, options: SteerOptions,
                judge: RefusalJudge | None = None, max_new_tokens: int = 64) -> Iterator[PairUpdate]:
    """Stream both answers for one query as they are generated (one batched generation), then the final result.

    The residuals of every layer are captured from the same prefill, so the dashboard needs no extra forward.
    Errors inside generation are re-raised in the caller's thread.
    """
    judge = judge or default_judge()
    state.check_compatible(backbone)
    q: queue.Queue = queue.Queue()
    streamer = (_RowStreamer(q, (0,)), _RowStreamer(q, (1,))) if options.steer else _RowStreamer(q, (0,))

    def work() -> None:
        try:
            res, acts = _run_chunk(backbone, state, [query], options, judge, max_new_tokens, streamer, capture=True)
            q.put(("done", (res[0], acts[0])))
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
                res, acts = payload[0]
                yield PairUpdate(res.unsteered.text, res.steered.text, done=True, result=res, acts=acts)
                return
    finally:
        # Even when the consumer stops early (a closed browser tab), the generation and its hooks must finish
        # before the caller releases the model lock.
        thread.join()
