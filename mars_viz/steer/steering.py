"""MARS at the first generated token: score the last prompt position, gate, push inside the trust region.

This module turns a fitted `MarsState` + user options into a `Plan` (push layer, detection layer, rule) and an edit
function for `hooks.edit_position`. The maths is `rule.mars_response`; the hook mechanics are `hooks`; nothing
else happens here.

Conditional MARS: the gate may read its score at another layer than the push (the layer that separates best need
not be the one that steers best; IBM's CAST checks a condition at one layer and adds a behaviour vector at another),
and at another position: t_post (the prompt's last position, where the model decides to refuse) or t_inst (the last
token of the user's text, where it encodes whether the request is harmful; Zhao et al. 2025). The push is always at
t_post. A gate at a layer up to the push layer is read in the same forward (t_inst never sees the push); one after
it is read first, by an unsteered probe of the same call up to the gate's layer (`mars_steering` does it itself).

Example:
    >>> opts = SteerOptions(strength=1.0, recenter=True)
    >>> with mars_steering(backbone, state, opts, ["image"]) as rec:      # doctest: +SKIP
    ...     backbone.model.generate(**batch, max_new_tokens=32)
    >>> rec.info["s_recentred"], rec.info["gate_open"]                    # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from ..core.rule import MarsRule, as_float64, judged_score, mars_response, unsafety_score
from ..core.state import MarsState
from ..model.backbone import Backbone
from ..model.hooks import EditRecord, edit_position, read_position
from ..model.inputs import GATE_POSITIONS, gate_index

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
    gate_position: str | None = None  # override where the gate reads: "post" or "inst" (None: the state's choice)

    def __post_init__(self) -> None:
        if self.gate_position is not None and self.gate_position not in GATE_POSITIONS:
            raise ValueError(f"gate_position must be one of {', '.join(GATE_POSITIONS)}, got {self.gate_position!r}")
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
    gate_position: str = "post"  # where the gate reads: "post" (t_post) or "inst" (t_inst); the push is at t_post

    @property
    def separate_gate(self) -> bool:
        """The gate reads another site (layer or position) than the one the push edits."""
        return self.detect_layer != self.layer or self.gate_position != "post"

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

    A gate position or detection-layer override uses that site's own fitted threshold unless tau is given; a
    push-layer override keeps t* (calibrated at the fitted push layer: `t_star_layer` says so).
    """
    position = state.gate_position if options.gate_position is None else options.gate_position
    axis = state.gate_axis(position)
    layer = _layer_index(state, state.layer if options.layer is None else options.layer, "layer")
    detect = _layer_index(state, axis.detect_layer if options.detect_layer is None else options.detect_layer,
                          "detect_layer")
    if options.tau is not None:
        tau = float(options.tau)
    elif position == state.gate_position and detect == axis.detect_layer:
        tau = state.tau
    else:
        tau = float(axis.taus[detect])
    t_star = float(state.target_level if options.target_level is None else options.target_level)
    rule = MarsRule(tau=tau, t_star=t_star, margin=float(state.config.margin), strength=options.strength,
                    gated=options.mode == "mars", steer=options.steer)
    return Plan(layer=layer, detect_layer=detect, rule=rule,
                t_star_layer=None if options.target_level is not None else state.layer, gate_position=position)


def gate_scores(state: MarsState, p: Plan, h_detect: torch.Tensor, modalities: Sequence[str],
                recenter: bool) -> torch.Tensor:
    """The score the gate reads: `h_detect [B, d]` (residuals at the gate's layer and position) re-centred by each
    row's modality offset there, along that site's axis -> `[B]` float64 (`rule.judged_score`, as the push's own
    gate reads it)."""
    axis = state.gate_axis(p.gate_position)
    deltas = _row_deltas(state, p.detect_layer, modalities, recenter, p.gate_position)
    return judged_score(h_detect, axis.mu_minus[p.detect_layer], axis.r[p.detect_layer], deltas)


def mars_edit(state: MarsState, options: SteerOptions, deltas: torch.Tensor | None, gate: dict | None = None):
    """Edit function `(h [B, d], info) -> h'` applying `rule.mars_response` at the push layer.

    `deltas` `[B, d]` are the per-row modality offsets at the push layer (zeros for text rows), or None for no
    re-centring. `gate["s"]` `[B]`, when the gate is read at another layer, holds the detection layer's scores (set
    by a reading hook earlier in the same forward, or probed beforehand). With `options.steer=False` the scores (and
    `planned_norm`, the displacement it would apply) are recorded and h is returned unchanged.
    """
    p = plan(state, options)
    mu_minus, r = state.mu_minus[p.layer], state.r[p.layer]  # [d], [d]

    def edit(h: torch.Tensor, info: dict) -> torch.Tensor:
        g = None if gate is None else gate.get("s")
        if p.separate_gate and g is None:
            raise RuntimeError(f"the gate (layer {p.detect_layer}, {p.gate_position}) was not read before the push "
                               f"(layer {p.layer})")
        out = mars_response(h, mu_minus, r, p.rule, deltas, gate_score=g)  # float64, on float64_device(h.device)
        s_raw = unsafety_score(h, mu_minus, r)  # [B]
        planned = out.planned_norm.float().cpu()
        info.update(layer=p.layer, detect_layer=p.detect_layer, gate_position=p.gate_position, tau=p.rule.tau,
                    t_star=p.rule.t_star,
                    s_raw=s_raw.cpu(), s_recentred=out.score.cpu(), s_gate=out.gate_score.cpu(),
                    gate_weight=out.gate_weight.cpu(), gate_open=out.gate_open.cpu(), planned_norm=planned,
                    displacement_norm=planned if p.rule.steer else torch.zeros(h.shape[0]))
        return out.apply(h)

    return p.layer, edit


def push_to_level_edit(mu_minus: torch.Tensor, r: torch.Tensor, levels: torch.Tensor):
    """Edit that moves each row to score `levels[i]` along r, ungated: h' = h + (t - s) r. For calibration."""

    def edit(h: torch.Tensor, info: dict) -> torch.Tensor:
        h64 = as_float64(h)  # on float64_device(h.device)
        s = unsafety_score(h64, mu_minus, r)  # [B] float64
        t = levels.to(device=h64.device, dtype=torch.float64)
        info["s"] = s.cpu()
        return (h64 + (t - s)[:, None] * r.to(h64.device, torch.float64)).to(h.dtype).to(h.device)  # rounded once

    return edit


def _row_deltas(state: MarsState, layer: int, modalities: Sequence[str], recenter: bool,
                position: str = "post") -> torch.Tensor | None:
    """Per-row modality offsets `[B, d]` at `layer` and `position` (zeros for text rows); None without re-centring."""
    if not recenter:
        return None
    axis = state.gate_axis(position)
    rows = []
    for m in modalities:
        off = axis.offset(m, layer)
        rows.append(torch.zeros(state.hidden_size, dtype=torch.float64) if off is None else off.double())
    return torch.stack(rows)  # [B, d]


class _GateRead(Exception):
    """Ends a probe forward once the gate's layer has been read (the rest of the model is not needed)."""


@contextlib.contextmanager
def _probe_first_call(backbone: Backbone, layer: int, position: int, read: Callable[[torch.Tensor], None],
                      rows: torch.Tensor | None, probing: dict) -> Iterator[None]:
    """Before the first forward call inside the context, run that same call once, unsteered, up to `layer`, and give
    `read` the residual at `position` there. The probe works on a copy of the call's KV cache, so the real call
    finds the cache as it was; `probing["on"]` is true while it runs (the push's hook pauses meanwhile)."""
    done = False

    def stop(h: torch.Tensor) -> None:
        read(h)
        raise _GateRead

    def pre(module, args, kwargs):
        nonlocal done
        if done or probing["on"]:
            return None
        done, probing["on"] = True, True
        try:
            kw = dict(kwargs)
            for key in ("past_key_values", "cache"):
                if kw.get(key) is not None:
                    kw[key] = copy.deepcopy(kw[key])
            with read_position(backbone.layers[layer], stop, position=position, rows=rows):
                try:
                    module(*args, **kw)
                except _GateRead:
                    pass
        finally:
            probing["on"] = False
        return None

    handle = backbone.model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def mars_steering(backbone: Backbone, state: MarsState, options: SteerOptions, modalities: Sequence[str],
                  rows: torch.Tensor | None = None, gate: torch.Tensor | None = None) -> Iterator[EditRecord]:
    """Steer the rows selected by `rows` (bool `[batch]`, default all) of the next forward / generate call, whose
    first forward must see the whole prompt (a plain `generate` or forward).

    `modalities` names the modality of each *selected* row, so each is re-centred by its own offset (at the push
    layer, and at the gate's site). The gate is read wherever it sits, with no help from the caller:

    - at the push layer and t_post: in the push's own hook;
    - at a layer up to the push layer (either position), or at t_inst of any layer up to it: a reading hook there
      sets the gate earlier in the same forward;
    - at a layer after the push layer, with steering on: the first call is first run once unsteered up to the
      gate's layer (`_probe_first_call`, on a copy of its KV cache), then steered; with steering off, both sites are
      read in one forward and nothing is changed.

    `gate` (`[B']`, e.g. read from a shared prefill) skips the reading.
    """
    state.check_compatible(backbone)
    p = plan(state, options)
    deltas = _row_deltas(state, p.layer, modalities, options.recenter)
    box: dict = {"s": gate}
    _, edit = mars_edit(state, options, deltas, box if p.separate_gate else None)
    where = gate_index(backbone, p.gate_position)
    probing = {"on": False}

    def read_gate(h: torch.Tensor) -> None:  # h [B', d] at the gate's layer and position
        box["s"] = gate_scores(state, p, h, modalities, options.recenter)

    with contextlib.ExitStack() as stack:
        if p.separate_gate and gate is None and p.reads_later:
            if options.steer:
                stack.enter_context(_probe_first_call(backbone, p.detect_layer, where, read_gate, rows, probing))
            else:
                # steering off: keep the push layer's residual, finish when the gate is read later in the forward
                pending: dict = {}
                rec = EditRecord()
                stack.enter_context(read_position(backbone.layers[p.layer], lambda h: pending.update(h=h), rows=rows))

                def finish(h: torch.Tensor) -> None:
                    read_gate(h)
                    edit(pending["h"], rec.info)
                    rec.edited_calls += 1

                stack.enter_context(read_position(backbone.layers[p.detect_layer], finish, position=where, rows=rows))
                yield rec
                return
        elif p.separate_gate and gate is None:
            stack.enter_context(read_position(backbone.layers[p.detect_layer], read_gate, position=where, rows=rows))
        yield stack.enter_context(edit_position(backbone.layers[p.layer], edit, position=-1, rows=rows,
                                                paused=lambda: probing["on"]))


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
    site (layer or position; probed beforehand, as the evaluation does). `rec.info["rows"]` holds one info dict per
    steered row.
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
        two = plan(state, o).separate_gate
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
