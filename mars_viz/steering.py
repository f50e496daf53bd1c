"""MARS at the first generated token: score the last prompt position, gate, push inside the trust region.

This module turns a fitted `MarsState` + user options into a `Plan` (push layer, detection layer, rule) and an edit
function for `hooks.edit_position`. The maths is `geometry.mars_response`; the hook mechanics are `hooks`; nothing
else happens here.

Conditional MARS: the gate may read its score at another layer than the push (the layer that separates best need
not be the one that steers best; IBM's CAST checks a condition at one layer and adds a behaviour vector at another).
A detection layer before the push layer is read in the same forward; one after it is probed first (`probe_gate`).

Example:
    >>> opts = SteerOptions(strength=1.0, recenter=True)
    >>> with mars_steering(backbone, state, opts, ["image"]) as rec:      # doctest: +SKIP
    ...     backbone.model.generate(**batch, max_new_tokens=32)
    >>> rec.info["s_recentred"], rec.info["gate_open"]                    # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from .backbone import Backbone
from .geometry import MarsRule, mars_response, unsafety_score
from .hooks import EditRecord, edit_position, read_position
from .state import MarsState

__all__ = ["Plan", "SteerOptions", "gate_scores", "mars_edit", "mars_steering", "plan", "probe_gate",
           "push_to_level_edit", "row_steering"]


@dataclass(frozen=True)
class SteerOptions:
    """User controls. `mode='ungated'` drops the ReLU gate (always push to t*): the baseline the gate improves on."""

    steer: bool = True
    strength: float = 1.0  # lambda
    layer: int | None = None  # override the state's push (steering) layer
    tau: float | None = None  # override the gate threshold
    recenter: bool = True  # subtract the modality offset before scoring
    target_level: float | None = None  # override t*, the trust region's outer wall
    mode: Literal["mars", "ungated"] = "mars"
    detect_layer: int | None = None  # override the layer the gate reads

    def __post_init__(self) -> None:
        if not math.isfinite(self.strength) or self.strength < 0:
            raise ValueError(f"strength must be a finite number >= 0, got {self.strength}")
        if self.tau is not None and not math.isfinite(self.tau):
            raise ValueError(f"tau must be a finite number, got {self.tau}")
        if self.target_level is not None and not math.isfinite(self.target_level):
            raise ValueError(f"target_level must be a finite number, got {self.target_level}")


@dataclass(frozen=True)
class Plan:
    """Where and how MARS acts for given options: the push layer, the layer the gate reads, and the rule."""

    layer: int  # push (steering) layer: its r, its t*
    detect_layer: int  # the gate reads the re-centred score here, against this layer's tau
    rule: MarsRule
    t_star_layer: int | None  # the layer t* was calibrated at (None: t* given by the user)

    @property
    def reads_later(self) -> bool:
        """The gate is read after the push layer: it must be known (probed) before the steered forward."""
        return self.detect_layer > self.layer


def _layer_index(state: MarsState, value: int, name: str) -> int:
    if not -state.num_layers <= value < state.num_layers:
        raise ValueError(f"{name} {value} is out of range: the model has {state.num_layers} layers "
                         f"(0..{state.num_layers - 1})")
    return value % state.num_layers


def plan(state: MarsState, options: SteerOptions) -> Plan:
    """The state's fitted layers, threshold and t* with the user's overrides applied.

    A detection-layer override uses that layer's own fitted threshold unless tau is given; a push-layer override
    keeps t* (calibrated at the fitted push layer: `t_star_layer` says so).
    """
    layer = _layer_index(state, state.layer if options.layer is None else options.layer, "layer")
    detect = _layer_index(state, state.detect_layer if options.detect_layer is None else options.detect_layer,
                          "detect_layer")
    if options.tau is not None:
        tau = float(options.tau)
    elif detect == state.detect_layer:
        tau = state.tau
    else:
        tau = float(state.taus[detect])
    t_star = float(state.target_level if options.target_level is None else options.target_level)
    rule = MarsRule(tau=tau, t_star=t_star, margin=float(state.config.margin), strength=options.strength,
                    gated=options.mode == "mars", steer=options.steer)
    return Plan(layer=layer, detect_layer=detect, rule=rule,
                t_star_layer=None if options.target_level is not None else state.layer)


def gate_scores(state: MarsState, p: Plan, h_detect: torch.Tensor, modalities: Sequence[str],
                recenter: bool) -> torch.Tensor:
    """The score the gate reads: `h_detect [B, d]` (residuals at the detection layer) re-centred by each row's
    modality offset at that layer, along that layer's axis -> `[B]` float64."""
    deltas = _row_deltas(state, p.detect_layer, modalities, recenter)
    h = h_detect.double() if deltas is None else h_detect.double() - deltas.to(h_detect.device)
    return unsafety_score(h, state.mu_minus[p.detect_layer].to(h.device), state.r[p.detect_layer].to(h.device))


def mars_edit(state: MarsState, options: SteerOptions, deltas: torch.Tensor | None, gate: dict | None = None):
    """Edit function `(h [B, d], info) -> h'` applying `geometry.mars_response` at the push layer.

    `deltas` `[B, d]` are the per-row modality offsets at the push layer (zeros for text rows), or None for no
    re-centring. `gate["s"]` `[B]`, when the gate is read at another layer, holds the detection layer's scores (set
    by a reading hook earlier in the same forward, or probed beforehand). With `options.steer=False` the scores (and
    `planned_norm`, the displacement it would apply) are recorded and h is returned unchanged.
    """
    p = plan(state, options)
    mu_minus, r = state.mu_minus[p.layer], state.r[p.layer]  # [d], [d]

    def edit(h: torch.Tensor, info: dict) -> torch.Tensor:
        d = None if deltas is None else deltas.to(h.device)
        g = None if gate is None else gate.get("s")
        if p.detect_layer != p.layer and g is None:
            raise RuntimeError(f"the gate (layer {p.detect_layer}) was not read before the push (layer {p.layer})")
        out = mars_response(h, mu_minus.to(h.device), r.to(h.device), p.rule, d,
                            gate_score=None if g is None else g.to(h.device))
        s_raw = unsafety_score(h, mu_minus.to(h.device), r.to(h.device))  # [B]
        planned = out.planned_norm.float().cpu()
        info.update(layer=p.layer, detect_layer=p.detect_layer, tau=p.rule.tau, t_star=p.rule.t_star,
                    s_raw=s_raw.cpu(), s_recentred=out.score.cpu(), s_gate=out.gate_score.cpu(),
                    gate_weight=out.gate_weight.cpu(), gate_open=out.gate_open.cpu(), planned_norm=planned,
                    displacement_norm=planned if p.rule.steer else torch.zeros(h.shape[0]))
        return h + out.displacement if p.rule.steer else h

    return p.layer, edit


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
                  rows: torch.Tensor | None = None, gate: torch.Tensor | None = None) -> Iterator[EditRecord]:
    """Steer the rows selected by `rows` (bool `[batch]`, default all) of the next forward / generate call.

    `modalities` names the modality of each *selected* row, so each is re-centred by its own offset (at the push
    layer, and at the detection layer for the gate). When the gate is read at another layer:

    - detection layer before the push layer: a reading hook there sets the gate in the same forward;
    - after it, with steering on: pass `gate` (`[B']`, e.g. from `probe_gate` or an earlier unsteered pass), since
      the push must know it first; with steering off, both layers are read and nothing is changed.
    """
    state.check_compatible(backbone)
    p = plan(state, options)
    deltas = _row_deltas(state, p.layer, modalities, options.recenter)
    two = p.detect_layer != p.layer
    box: dict = {"s": gate}
    _, edit = mars_edit(state, options, deltas, box if two else None)

    def read_gate(h: torch.Tensor) -> None:  # h [B', d] at the detection layer
        box["s"] = gate_scores(state, p, h, modalities, options.recenter)

    with contextlib.ExitStack() as stack:
        if two and gate is None and p.reads_later:
            if options.steer:
                raise ValueError(f"the gate is read at layer {p.detect_layer}, after the push at layer {p.layer}: "
                                 "read it first (steering.probe_gate) and pass gate=")
            # steering off: keep the push layer's residual, finish when the gate is read later in the forward
            pending: dict = {}
            rec = EditRecord()
            stack.enter_context(read_position(backbone.layers[p.layer], lambda h: pending.update(h=h), rows=rows))

            def finish(h: torch.Tensor) -> None:
                read_gate(h)
                edit(pending["h"], rec.info)
                rec.edited_calls += 1

            stack.enter_context(read_position(backbone.layers[p.detect_layer], finish, rows=rows))
            yield rec
            return
        if two and gate is None:
            stack.enter_context(read_position(backbone.layers[p.detect_layer], read_gate, rows=rows))
        yield stack.enter_context(edit_position(backbone.layers[p.layer], edit, position=-1, rows=rows))


@torch.inference_mode()
def probe_gate(backbone: Backbone, state: MarsState, options: SteerOptions, modalities: Sequence[str],
               run: Callable[[], object]) -> torch.Tensor:
    """The gate's scores `[B]` for the inputs `run()` feeds the model (an unsteered forward or one-token generate):
    what a steered pass needs first when the gate is read after the push layer."""
    with mars_steering(backbone, state, replace(options, steer=False), modalities) as rec:
        run()
    return rec.info["s_gate"]


@contextlib.contextmanager
def row_steering(backbone: Backbone, state: MarsState, specs: Sequence[SteerOptions | None],
                 modalities: Sequence[str], gates: Sequence[float | None] | None = None) -> Iterator[EditRecord]:
    """Each batch row gets its own options (None = untouched), in one generation: the evaluation runs unsteered,
    MARS, MARS without re-centring and the ungated baseline (at several strengths) as rows of one batch.

    All rows must resolve to the same push layer. `gates[i]` is row i's gate score when the gate is read at another
    layer (probed beforehand, as the evaluation does). `rec.info["rows"]` holds one info dict per steered row.
    """
    state.check_compatible(backbone)
    active = [(i, o) for i, o in enumerate(specs) if o is not None]
    if len(modalities) != len(specs):
        raise ValueError("need one modality per row")
    layers = {plan(state, o).layer for _, o in active}
    if len(layers) > 1:
        raise ValueError(f"all steered rows must use the same layer, got {sorted(layers)}")
    layer = layers.pop() if layers else state.layer
    edits = []
    for i, o in active:
        two = plan(state, o).detect_layer != layer
        if two and (gates is None or gates[i] is None):
            raise ValueError("the gate is read at another layer: pass gates= (probed scores per row)")
        box = {"s": torch.tensor([float(gates[i])], dtype=torch.float64)} if two else None
        edits.append((i, mars_edit(state, o, _row_deltas(state, layer, [modalities[i]], o.recenter), box)[1]))
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
