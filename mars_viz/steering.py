"""MARS at the first generated token: score the last prompt position, gate, push inside the trust region.

This module turns a fitted `MarsState` + user options into an edit function for `hooks.edit_position`. The maths is
`geometry.mars_response`; the hook mechanics are `hooks.edit_position`; nothing else happens here.

Example:
    >>> opts = SteerOptions(strength=1.0, recenter=True)
    >>> with mars_steering(backbone, state, opts, ["image"]) as rec:      # doctest: +SKIP
    ...     backbone.model.generate(**batch, max_new_tokens=32)
    >>> rec.info["s_recentred"], rec.info["gate_open"]                    # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .backbone import Backbone
from .geometry import MarsRule, mars_response, unsafety_score
from .hooks import EditRecord, edit_position
from .state import MarsState

__all__ = ["SteerOptions", "mars_edit", "mars_steering", "push_to_level_edit", "resolve", "row_steering", "rule_for"]


@dataclass(frozen=True)
class SteerOptions:
    """User controls. `mode='ungated'` drops the ReLU gate (always push to t*): the baseline the gate improves on."""

    steer: bool = True
    strength: float = 1.0  # lambda
    layer: int | None = None  # override the state's chosen layer
    tau: float | None = None  # override the gate threshold
    recenter: bool = True  # subtract the modality offset before scoring
    target_level: float | None = None  # override t*, the trust region's outer wall
    mode: Literal["mars", "ungated"] = "mars"

    def __post_init__(self) -> None:
        if not math.isfinite(self.strength) or self.strength < 0:
            raise ValueError(f"strength must be a finite number >= 0, got {self.strength}")
        if self.tau is not None and not math.isfinite(self.tau):
            raise ValueError(f"tau must be a finite number, got {self.tau}")
        if self.target_level is not None and not math.isfinite(self.target_level):
            raise ValueError(f"target_level must be a finite number, got {self.target_level}")


def resolve(state: MarsState, options: SteerOptions) -> tuple[int, float]:
    """(layer, tau) after overrides. A layer override uses that layer's own fitted threshold unless tau is given."""
    layer = state.layer if options.layer is None else options.layer
    if not -state.num_layers <= layer < state.num_layers:
        raise ValueError(f"layer {layer} is out of range: the model has {state.num_layers} layers "
                         f"(0..{state.num_layers - 1})")
    layer %= state.num_layers
    if options.tau is not None:
        tau = float(options.tau)
    elif layer == state.layer:
        tau = state.tau
    else:
        tau = float(state.taus[layer])
    return layer, tau


def rule_for(state: MarsState, options: SteerOptions) -> tuple[int, MarsRule]:
    """(layer, rule): the state's fitted values with the user's overrides, as `geometry.mars_response` takes them."""
    layer, tau = resolve(state, options)
    t_star = float(state.target_level if options.target_level is None else options.target_level)
    return layer, MarsRule(tau=tau, t_star=t_star, margin=float(state.config.margin), strength=options.strength,
                           gated=options.mode == "mars", steer=options.steer)


def mars_edit(state: MarsState, options: SteerOptions, deltas: torch.Tensor | None):
    """Edit function `(h [B, d], info) -> h'` applying `geometry.mars_response` at the resolved layer.

    `deltas` `[B, d]` are the per-row modality offsets (zeros for text rows), or None for no re-centring.
    With `options.steer=False` the scores (and `planned_norm`, the displacement it would apply) are recorded and h is
    returned unchanged.
    """
    layer, rule = rule_for(state, options)
    mu_minus, r = state.mu_minus[layer], state.r[layer]  # [d], [d]

    def edit(h: torch.Tensor, info: dict) -> torch.Tensor:
        d = None if deltas is None else deltas.to(h.device)
        out = mars_response(h, mu_minus.to(h.device), r.to(h.device), rule, d)
        s_raw = unsafety_score(h, mu_minus.to(h.device), r.to(h.device))  # [B]
        planned = out.planned_norm.float().cpu()
        info.update(layer=layer, tau=rule.tau, t_star=rule.t_star, s_raw=s_raw.cpu(), s_recentred=out.score.cpu(),
                    gate_weight=out.gate_weight.cpu(), gate_open=out.gate_open.cpu(), planned_norm=planned,
                    displacement_norm=planned if rule.steer else torch.zeros(h.shape[0]))
        return h + out.displacement if rule.steer else h

    return layer, edit


def push_to_level_edit(mu_minus: torch.Tensor, r: torch.Tensor, levels: torch.Tensor):
    """Edit that moves each row to score `levels[i]` along r, ungated: h' = h + (t - s) r. For calibration."""

    def edit(h: torch.Tensor, info: dict) -> torch.Tensor:
        s = unsafety_score(h, mu_minus.to(h.device), r.to(h.device))  # [B] float64
        t = levels.to(device=h.device, dtype=torch.float64)
        info["s"] = s.cpu()
        return (h.double() + (t - s)[:, None] * r.to(h.device).double()).to(h.dtype)

    return edit


def _row_deltas(state: MarsState, layer: int, modalities: Sequence[str], recenter: bool) -> torch.Tensor | None:
    if not recenter:
        return None
    rows = []
    for m in modalities:
        off = state.offset(m, layer)
        rows.append(torch.zeros(state.hidden_size, dtype=torch.float64) if off is None else off.double())
    return torch.stack(rows)  # [B, d]


@contextlib.contextmanager
def mars_steering(backbone: Backbone, state: MarsState, options: SteerOptions, modalities: Sequence[str],
                  rows: torch.Tensor | None = None) -> Iterator[EditRecord]:
    """Steer the rows selected by `rows` (bool `[batch]`, default all) of the next forward / generate call.

    `modalities` names the modality of each *selected* row, so each is re-centred by its own offset.
    """
    state.check_compatible(backbone)
    layer, _ = resolve(state, options)
    deltas = _row_deltas(state, layer, modalities, options.recenter)
    _, edit = mars_edit(state, options, deltas)
    with edit_position(backbone.layers[layer], edit, position=-1, rows=rows) as rec:
        yield rec


@contextlib.contextmanager
def row_steering(backbone: Backbone, state: MarsState, specs: Sequence[SteerOptions | None],
                 modalities: Sequence[str]) -> Iterator[EditRecord]:
    """Each batch row gets its own options (None = untouched), in one generation: the evaluation runs unsteered,
    MARS, MARS without re-centring and the ungated baseline (at several strengths) as rows of one batch.

    All rows must resolve to the same layer. `rec.info["rows"]` holds one info dict per steered row (batch order).
    """
    state.check_compatible(backbone)
    active = [(i, o) for i, o in enumerate(specs) if o is not None]
    if len(modalities) != len(specs):
        raise ValueError("need one modality per row")
    layers = {resolve(state, o)[0] for _, o in active}
    if len(layers) > 1:
        raise ValueError(f"all steered rows must use the same layer, got {sorted(layers)}")
    layer = layers.pop() if layers else state.layer
    edits = [(i, mars_edit(state, o, _row_deltas(state, layer, [modalities[i]], o.recenter))[1]) for i, o in active]
    mask = torch.tensor([o is not None for o in specs])

    def edit(h: torch.Tensor, info: dict) -> torch.Tensor:  # h [B_active, d]
        out, rows = [], []
        for j, (_, fn) in enumerate(edits):
            row_info: dict = {}
            out.append(fn(h[j:j + 1], row_info))
            rows.append({k: (v[0].item() if torch.is_tensor(v) and v.dim() else v) for k, v in row_info.items()})
        info["rows"] = rows
        return torch.cat(out)

    with edit_position(backbone.layers[layer], edit, position=-1, rows=mask) as rec:
        yield rec
