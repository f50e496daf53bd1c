"""Batched activation collection: queries in, `[N, layers, d]` float32 residuals at the last prompt position out.

Queries are grouped by modality and sorted by prompt length so each left-padded batch wastes little padding; the
output keeps the input order. Memory grows as N * L * d (one vector per layer per query), never with sequence length.

Example:
    >>> acts = collect_activations(backbone, [Query("hi"), Query("how are you?")], batch_size=8)  # doctest: +SKIP
    >>> acts.shape                                                                                 # doctest: +SKIP
    torch.Size([2, 24, 896])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .backbone import Backbone
from .hooks import capture_residuals
from .inputs import Query, build_batch, inst_positions

__all__ = ["Progress", "collect_activations", "collect_sites", "forward_last", "forward_sites"]

Progress = Callable[[int, int], None]  # (done, total)


@torch.inference_mode()
def forward_sites(backbone: Backbone, queries: Sequence[Query], inst: bool = True) -> dict[str, torch.Tensor]:
    """One forward pass over one left-padded batch: float32 `[B, L, d]` at the gate's positions, `{"post": ...,
    "inst": ...}` (t_post, the last prompt position; t_inst, the last token of the user's text; `inputs.gate_index`).
    """
    batch = build_batch(backbone, list(queries))
    positions = inst_positions(backbone, batch["input_ids"]) if inst else None
    with capture_residuals(backbone.layers, positions=positions) as cap:
        # logits_to_keep=1: only the last position's logits are computed (capture never needs the rest).
        backbone.model(**batch, use_cache=False, logits_to_keep=1)
    out = {"post": cap.last()}
    if inst:
        out["inst"] = cap.at_positions()[:, :, 0]
    return out


def forward_last(backbone: Backbone, queries: Sequence[Query]) -> torch.Tensor:
    """One forward pass over one left-padded batch; float32 `[B, L, d]` at the last prompt position."""
    return forward_sites(backbone, queries, inst=False)["post"]


def _order(queries: Sequence[Query]) -> list[int]:
    return sorted(range(len(queries)), key=lambda i: (queries[i].modality, len(queries[i].prompt)))


def collect_activations(backbone: Backbone, queries: Sequence[Query], batch_size: int = 8,
                        progress: Progress | None = None) -> torch.Tensor:
    """Residuals of every decoder layer at the last prompt position for each query: float32 `[N, L, d]` on CPU."""
    return collect_sites(backbone, queries, batch_size, progress, inst=False)["post"]


def collect_sites(backbone: Backbone, queries: Sequence[Query], batch_size: int = 8,
                  progress: Progress | None = None, inst: bool = True) -> dict[str, torch.Tensor]:
    """Residuals of every decoder layer at the gate's positions for each query: `{"post": [N, L, d], "inst":
    [N, L, d]}` float32 on CPU (`forward_sites`), in the input order."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    n = len(queries)
    out = {site: torch.empty(n, backbone.num_layers, backbone.hidden_size, dtype=torch.float32)
           for site in (("post", "inst") if inst else ("post",))}
    order = _order(queries)
    done = 0
    if progress:
        progress(0, n)
    i = 0
    while i < n:
        # A batch never mixes modalities: processors handle homogeneous batches most reliably.
        idx = [order[i]]
        while len(idx) < batch_size and i + len(idx) < n and \
                queries[order[i + len(idx)]].modality == queries[idx[0]].modality:
            idx.append(order[i + len(idx)])
        got = forward_sites(backbone, [queries[j] for j in idx], inst=inst)
        for site, acts in got.items():
            out[site][idx] = acts
        i += len(idx)
        done += len(idx)
        if progress:
            progress(done, n)
    return out
