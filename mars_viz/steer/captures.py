"""What a pair reads on the way, as context managers around its forwards: the residuals of every layer at t_post
(`_capturing`) and at t_inst (`_inst_capturing`),
and every prompt position at the maps' layers (`_seq_capturing`, completed by `_finish_seq`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..model.backbone import Backbone
from ..model.hooks import ResidualCapture, capture_residuals, capture_sequence
from ..model.inputs import inst_positions


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

