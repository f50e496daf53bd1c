"""Greedy decoding, and the plumbing every pair strategy shares.

`generate_batch` and `greedy_texts` decode unsteered answers (batched, cut at EOS; with a judge's `settled`, a row
leaves the batch once its verdict cannot change, `_settling`). `_prefill_all_but_last` runs the prompt up to the
position MARS edits once, for both answers; `_kept_rope_deltas` / `_duplicated_rope_deltas` give M-RoPE models
(Qwen2-VL family) their per-call state back; `_RowStreamer` posts each answer's tokens as they come.
The pair itself is in `pair`, what it costs in `timing`, its streaming entry point in `stream`.
"""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Callable, Iterator, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..model.archs import arch_spec, at_path
from ..model.backbone import Backbone
from ..model.inputs import Query, build_batch
from .cancel import raise_if_cancelled, stopping_criteria

__all__ = ["DECODE_KEYS", "PER_TOKEN_KEYS", "generate_batch", "greedy_texts"]

# The batch entries with one value per prompt position ([batch, positions]), which a prefill of prompt[:-1] cuts. By
# name, never by shape: Qwen2-VL's `pixel_values` is [patches, 1176] and would look like a 1176-token prompt's mask.
# PaliGemma's processor also returns `labels`; Mllama's `cross_attention_mask` is [batch, positions, images, tiles].
PER_TOKEN_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "labels",
                            "cross_attention_mask"})
# What the decode after a shared prefill takes: the whole prompt's ids and mask (the cache holds all but the last
# position), and Mllama's `cross_attention_mask`, which says which image tiles each position may attend to: without
# it the last position and every generated token would attend to the padded (empty) tiles too. `generate` slices it
# to the positions being run, and extends it by its last row for each generated token, as in a full generation.
DECODE_KEYS = ("input_ids", "attention_mask", "cross_attention_mask")


def _gen_kwargs(backbone: Backbone, max_new_tokens: int, force: bool = False) -> dict:
    """Greedy decoding; `force` makes every row produce exactly max_new_tokens (benchmarks compare equal work)."""
    tok = backbone.tokenizer
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, temperature=None, top_p=None,
              top_k=None, pad_token_id=tok.pad_token_id)
    if force:
        kw["min_new_tokens"] = max_new_tokens
    if (stop := stopping_criteria()) is not None:  # cancellable work (`cancel`): ends at the next decode step
        kw["stopping_criteria"] = stop
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


@torch.inference_mode()
def generate_batch(backbone: Backbone, batch, max_new_tokens: int, streamer: BaseStreamer | None = None,
                   force_tokens: bool = False, settled: Callable[[list[str]], list[bool]] | None = None,
                   min_tokens: int = 1, prefix=None) -> list[tuple[list[int], str]]:
    """Greedy-decode a built batch; per row, the new token ids (cut at EOS) and their text.

    With `settled` (a judge's `settled`), a row stops once its verdict cannot change, after at least `min_tokens`
    tokens, and leaves the batch (`_settling`). With `prefix` (the KV cache of every row's prompt but its last
    position, `_prefill_all_but_last`), only the last prompt position is run before the decode; the cache grows."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if prefix is not None:
        batch = {k: batch[k] for k in DECODE_KEYS if k in batch}
    if settled is not None:
        if streamer is not None or force_tokens:
            raise ValueError("a settling generation neither streams nor forces its length")
        return _settling(backbone, batch, max_new_tokens, settled, min_tokens, prefix)
    out = backbone.model.generate(**batch, **_gen_kwargs(backbone, max_new_tokens, force_tokens), streamer=streamer,
                                  **({} if prefix is None else {"cache": prefix}))
    raise_if_cancelled()  # a cut-short answer is not an answer
    return _decode_rows(backbone, out, batch["input_ids"].shape[1])


def _settling(backbone: Backbone, batch, max_new_tokens: int, settled: Callable[[list[str]], list[bool]],
              min_tokens: int, prefix=None) -> list[tuple[list[int], str]]:
    """`generate_batch` with rows that leave once done: the first `min_tokens` tokens for all rows, then one token
    at a time for the rows whose answer has not ended (EOS, `max_new_tokens`) and whose verdict is not `settled`.
    Each step goes on from the last one's cache (`_continued`, as the pair's `_go_on` does) with the finished rows
    taken out of it, so a batch costs what its unfinished rows cost. Each row's tokens are those of one plain
    generation. A prefix-LM's decode is not continued from a cut batch; its rows stop together, when all are
    done."""
    model, n_prompt = backbone.model, batch["input_ids"].shape[1]
    eos = torch.tensor(sorted(_eos_ids(backbone)), dtype=torch.long)
    if backbone.arch.prefix_lm:
        stop = _Settled(backbone, n_prompt, settled, min_tokens)
        kw = _gen_kwargs(backbone, max_new_tokens)
        kw["stopping_criteria"] = StoppingCriteriaList([*kw.get("stopping_criteria", []), stop])
        out = model.generate(**batch, **kw, **({} if prefix is None else {"cache": prefix}))
        raise_if_cancelled()
        return _decode_rows(backbone, out, n_prompt)
    rows: list[tuple[list[int], str] | None] = [None] * batch["input_ids"].shape[0]
    alive = torch.arange(len(rows))
    dec = {k: batch[k] for k in DECODE_KEYS if k in batch}
    with _kept_rope_deltas(model):
        out = model.generate(**batch, **_gen_kwargs(backbone, min(max(min_tokens, 1), max_new_tokens)),
                             return_dict_in_generate=True, **({} if prefix is None else {"cache": prefix}))
        while True:
            raise_if_cancelled()
            seqs, cache = out.sequences, _cache_of(out)
            new = seqs[:, n_prompt:]
            answers = _decode_rows(backbone, seqs, n_prompt)
            done = torch.isin(new.cpu(), eos).any(dim=1) | torch.tensor(settled([t for _, t in answers]))
            if new.shape[1] >= max_new_tokens or cache is None:
                done[:] = True
            for j in done.nonzero().flatten().tolist():
                rows[int(alive[j])] = answers[j]
            keep = (~done).nonzero().flatten()
            if keep.numel() == 0:
                break
            alive = alive[keep]
            cache.batch_select_indices(keep.to(seqs.device))
            for owner in _rope_owners(model):  # M-RoPE: each row keeps its own position offset
                if torch.is_tensor(owner.rope_deltas) and owner.rope_deltas.shape[0] == len(done):
                    owner.rope_deltas = owner.rope_deltas[keep.to(owner.rope_deltas.device)]
            dec = {k: v[keep.to(v.device)] for k, v in dec.items()}  # the prompt's entries of the rows left
            step = _continued(dec, seqs[keep.to(seqs.device)], n_prompt)
            out = model.generate(**step, cache=cache, return_dict_in_generate=True, **_gen_kwargs(backbone, 1))
    return rows  # type: ignore[return-value]


def _continued(dec: dict, sequences: torch.Tensor, n_prompt: int) -> dict:
    """The decode inputs (`DECODE_KEYS` of the prompt) for going on from `sequences` (prompt + the tokens generated
    so far): those ids, the mask grown by one column per generated token, and Mllama's `cross_attention_mask` grown
    by its last row as many times (the new positions attend to the tiles the last one did), as `generate` does."""
    grown = sequences.shape[1] - n_prompt
    out = {**dec, "input_ids": sequences}
    for key in ("attention_mask", "cross_attention_mask"):
        if key in dec:
            last = dec[key][:, -1:]
            out[key] = torch.cat([dec[key], last.expand(-1, grown, *last.shape[2:])], dim=1)
    return out


class _Settled(StoppingCriteria):
    """A batch is done once `settled(texts so far)` says every row's verdict cannot change (after `min_tokens` new
    tokens): the stop of a prefix-LM's settling generation, whose rows are not taken out one by one."""

    def __init__(self, backbone: Backbone, n_prompt: int, settled: Callable[[list[str]], list[bool]],
                 min_tokens: int):
        self.backbone, self.n_prompt, self.settled, self.min_tokens = backbone, n_prompt, settled, min_tokens

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.n_prompt:]
        if new.shape[1] < self.min_tokens:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        texts = [self.backbone.tokenizer.decode(_cut(self.backbone, ids), skip_special_tokens=True).strip()
                 for ids in new.tolist()]
        return torch.tensor(self.settled(texts), dtype=torch.bool, device=input_ids.device)


def greedy_texts(backbone: Backbone, queries: Sequence[Query], max_new_tokens: int, batch_size: int = 8,
                 progress: Callable[[int, int], None] | None = None,
                 settled: Callable[[list[str]], list[bool]] | None = None,
                 min_tokens: int = 1) -> list[tuple[list[int], str]]:
    """Unsteered greedy answers for many queries, batched (`settled`, `min_tokens`: see `generate_batch`)."""
    out: list[tuple[list[int], str]] = []
    for i in range(0, len(queries), batch_size):
        out += generate_batch(backbone, build_batch(backbone, list(queries[i:i + batch_size])), max_new_tokens,
                              settled=settled, min_tokens=min_tokens)
        if progress:
            progress(min(i + batch_size, len(queries)), len(queries))
    return out


def _prefill_all_but_last(backbone: Backbone, batch) -> tuple[object, dict]:
    """Run the prompt minus its last position once (media included); return the KV cache and the decode inputs.

    The last prompt position is the one MARS edits, so everything before it is shared by both answers. Only the
    per-token entries (`PER_TOKEN_KEYS`) are cut; the media tensors go in whole. The decode inputs are the full
    per-token entries that the decode needs (`DECODE_KEYS`); `generate` itself cuts them to the positions the cache
    lacks (the last prompt position first), as in a full generation.
    """
    pre = {k: (v[:, :-1] if k in PER_TOKEN_KEYS else v) for k, v in batch.items()}
    # Prefill through `generate` (one token, discarded) so positions follow generate's own conventions for padded
    # rows; the cache then holds exactly the P-1 prompt positions.
    out = backbone.model.generate(**pre, **_gen_kwargs(backbone, 1), return_dict_in_generate=True)
    cache = _cache_of(out)
    if cache is None:
        raise RuntimeError(f"{type(backbone.model).__name__} returned no KV cache")
    return cache, {k: batch[k] for k in DECODE_KEYS if k in batch}


def _cache_of(out) -> object | None:
    """The KV cache of a `generate(..., return_dict_in_generate=True)` output (`cache`; older: `past_key_values`)."""
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def _rewind(backbone: Backbone, cache, length: int) -> bool:
    """Cut `cache` back to its first `length` positions, in place, and say whether it could: only when every layer
    is a plain `DynamicLayer` (a sliding-window layer past its window has lost what it would need, a static one is
    cut differently) and no decoder layer is skipped by text (Mllama's cross-attention layers cache the image, not
    the prompt). Positions before `length` are untouched by what came after them (causal attention), so the cut
    cache is the prefill of prompt[:length]."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or backbone.arch.skip_layers or any(type(layer) is not DynamicLayer for layer in layers):
        return False
    extra = [layer.get_seq_length() - length for layer in layers]
    if min(extra) < 0:
        return False
    for layer, n in zip(layers, extra, strict=True):
        if n:
            layer.crop(-n)
    return True


def _rope_owners(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules where an M-RoPE model (Qwen2-VL family) keeps `rope_deltas` between calls: the registry's
    `ArchSpec.rope_deltas` paths (transformers 5.24: the inner `model`); none for other architectures."""
    return [at_path(model, path) for path in arch_spec(model.config.model_type).rope_deltas]


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
def _no_rope_deltas(model: torch.nn.Module) -> Iterator[None]:
    """Text-only forwards on a cache of their own: no `rope_deltas` left from an earlier call (with a cache, an M-RoPE
    model would add them to positions built from the whole attention mask); the ones found come back on exit."""
    with _kept_rope_deltas(model):
        for owner in _rope_owners(model):
            owner.rope_deltas = None
        yield


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

