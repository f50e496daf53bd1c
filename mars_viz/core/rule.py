"""The MARS rule: centroids, direction and modality offset, the score, re-centring, the gate (a one-sided ReLU ramp),
the trust region and the displacement, with `mars_response` as the one answer to "what does MARS do to this h".

Everything here is a plain function of tensors: no model, no hooks, no I/O, no
gradio. That keeps the formulation (see the README, "The formulation"; it is
our own formulation of the MARS paper) testable with planted geometry, and lets the
calibration, the hooks and the dashboard share one implementation. How the layers,
the threshold and the target level are *chosen* is `selection`'s job (it imports
this module, never the reverse).

Shape conventions (written beside the code as ``# [N, L, d]``):

- ``acts``: activations of a prompt set, ``[N, L, d]`` (prompts, layers, hidden size);
- per-layer vectors (centroids, directions, offsets): ``[L, d]``;
- per-layer scalars (thresholds, layer scores): ``[L]``;
- scores of a set: ``[N, L]``.

Most functions also accept a single layer (drop the ``L`` axis everywhere), and
then return scalars (0-d tensors) where they would return ``[L]``.

One numerics path. Means, scores, the gate and the displacement are computed in float64 from ``h.double() - delta``
(``judged_score``): activations of bf16 models have large norms, and the score is a small difference of large dot
products, so nothing is rounded back to ``h``'s dtype on the way. The maths runs on ``float64_device(h.device)``: the
model's device, or the CPU for one without float64 (Apple's MPS), where the ``[B, d]`` vectors are small. The edit is
rounded once, on write (``MarsResponse.apply``), and a row the rule does not move is returned bit for bit.

Example:
    >>> rule = MarsRule(tau=0.5, t_star=3.0)  # doctest: +SKIP
    >>> out = mars_response(h, mu_minus, r, rule, delta)  # doctest: +SKIP
    >>> h_steered = out.apply(h)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "NO_FLOAT64_DEVICES",
    "MarsResponse",
    "MarsRule",
    "as_float64",
    "float64_device",
    "gate_weight",
    "judged_score",
    "mars_response",
    "mean_activation",
    "modality_offset",
    "recentre",
    "refusal_direction",
    "response_curve",
    "steer_displacement",
    "trust_region_coefficient",
    "unsafety_score",
]

_F64 = torch.float64

# Device types without float64 (Apple's MPS raises on it): MARS's maths for their tensors runs on the CPU.
NO_FLOAT64_DEVICES: frozenset[str] = frozenset({"mps"})


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _f64(x: Tensor | float | Sequence[float], device: torch.device | None = None) -> Tensor:
    """``x`` as a float64 tensor (on ``device`` when given)."""
    return torch.as_tensor(x, dtype=_F64, device=device)


def float64_device(device: torch.device | str) -> torch.device:
    """Where float64 maths on tensors from ``device`` runs: ``device`` itself, or the CPU for a device type without
    float64 (``NO_FLOAT64_DEVICES``).

    >>> float64_device("mps"), float64_device("cpu")
    (device(type='cpu'), device(type='cpu'))
    """
    device = torch.device(device)
    return torch.device("cpu") if device.type in NO_FLOAT64_DEVICES else device


def as_float64(x: Tensor) -> Tensor:
    """``x`` in float64 on ``float64_device(x.device)``: moved first (as-is) when its device has no float64, then
    converted, so no float64 tensor is ever made on such a device.

    >>> as_float64(torch.ones(2, dtype=torch.bfloat16)).dtype
    torch.float64
    """
    x = torch.as_tensor(x)
    if x.device.type in NO_FLOAT64_DEVICES:
        x = x.to(float64_device(x.device))
    return x.to(_F64)


def _check_finite(x: Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"{name} contains NaN or inf values; check the activations/scores that produced it "
            "(e.g. a model run in fp16 that overflowed: use bf16 or fp32)"
        )


def _check_non_empty(x: Tensor, name: str) -> None:
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(
            f"{name} is empty (shape {tuple(x.shape)}): it needs at least one row along its "
            "first axis; check that the prompt set / split that produced it is not empty"
        )


def _check_trailing(x: Tensor, ref: Tensor, x_name: str, ref_name: str) -> None:
    """``ref``'s shape must be the trailing part of ``x``'s shape (so they broadcast as meant)."""
    if ref.ndim > x.ndim or tuple(x.shape[x.ndim - ref.ndim :]) != tuple(ref.shape):
        raise ValueError(
            f"{x_name} has shape {tuple(x.shape)} but {ref_name} has shape {tuple(ref.shape)}: "
            f"the trailing dims of {x_name} must equal {ref_name}'s shape "
            "(e.g. h [N, L, d] with r [L, d], or h [N, d] with r [d] for one layer)"
        )


def _norm_nonzero(r: Tensor) -> Tensor:
    """||r|| over the last axis, raising if any is zero (the score would divide by zero)."""
    norm = torch.linalg.vector_norm(r, dim=-1)  # [L] or []
    if bool((norm == 0).any()):
        bad = torch.nonzero(norm.reshape(-1) == 0).flatten().tolist()
        raise ValueError(
            f"the refusal direction r is zero (layer index(es) {bad}): the unsafe and safe "
            "centroids coincide; use more / more distinct calibration prompts or another layer"
        )
    return norm


# ---------------------------------------------------------------------------
# centroids, direction, modality offset
# ---------------------------------------------------------------------------


def mean_activation(acts: Tensor) -> Tensor:
    """Mean over the prompt axis, accumulated in float64.

    Centroids ``mu_plus`` / ``mu_minus`` are means of a few hundred bf16
    residuals whose norms can reach the thousands; summing in float64 keeps the
    small difference between the two centroids exact enough.

    >>> mean_activation(torch.ones(3, 2, 4)).shape  # [N, L, d] -> [L, d]
    torch.Size([2, 4])
    """
    acts = torch.as_tensor(acts)
    _check_non_empty(acts, "acts")
    n = acts.shape[0]
    return torch.sum(acts, dim=0, dtype=_F64) / n  # [L, d]


def refusal_direction(mu_plus: Tensor, mu_minus: Tensor) -> tuple[Tensor, Tensor]:
    """Refusal direction ``r = mu_plus - mu_minus`` and its norm, per layer.

    ``r`` is not normalised: the score divides by ``||r||`` so that the safe
    centroid sits at 0 and the unsafe one at 1, which makes target levels
    (``t* = 3``: "three centroid distances towards refusal") comparable across
    layers and models.

    >>> r, n = refusal_direction(torch.ones(2, 4), torch.zeros(2, 4))
    >>> n
    tensor([2., 2.], dtype=torch.float64)
    """
    mu_plus, mu_minus = _f64(mu_plus), _f64(mu_minus)
    if mu_plus.shape != mu_minus.shape:
        raise ValueError(
            f"mu_plus {tuple(mu_plus.shape)} and mu_minus {tuple(mu_minus.shape)} must have the "
            "same shape ([L, d] or [d]); were they computed from the same layers?"
        )
    r = mu_plus - mu_minus  # [L, d]
    return r, torch.linalg.vector_norm(r, dim=-1)  # [L, d], [L]


def modality_offset(acts_with_media: Tensor, acts_text: Tensor) -> Tensor:
    """Modality offset ``delta = mean(acts_with_media) - mean(acts_text)`` in float64.

    Visual tokens shift the whole residual stream; measured with *neutral*
    media (solid colours) on safe prompts, this shift carries no content, so
    subtracting it (``recentre``) stops benign images from looking unsafe.
    ``acts_with_media`` is ``[M, L, d]`` with M = prompts x K neutral inputs
    flattened; ``acts_text`` is ``[N, L, d]``; they need not be paired.

    >>> modality_offset(torch.full((6, 2, 4), 3.0), torch.ones(2, 2, 4))[0, 0]
    tensor(2., dtype=torch.float64)
    """
    acts_with_media, acts_text = torch.as_tensor(acts_with_media), torch.as_tensor(acts_text)
    if acts_with_media.shape[1:] != acts_text.shape[1:]:
        raise ValueError(
            f"acts_with_media {tuple(acts_with_media.shape)} and acts_text "
            f"{tuple(acts_text.shape)} must agree on every axis but the first ([*, L, d]); "
            "capture both at the same layers of the same model"
        )
    return mean_activation(acts_with_media) - mean_activation(acts_text)  # [L, d]


def recentre(h: Tensor, delta: Tensor) -> Tensor:
    """Re-centred activation ``h~ = h.double() - delta`` in float64, on ``float64_device(h.device)``.

    ``delta`` matches the trailing dims of ``h``: ``h [N, L, d]`` with ``delta [L, d]``,
    or ``h [N, d]`` / ``[d]`` with ``delta [d]`` for one layer. Never rounded back to
    ``h``'s dtype: a bf16 ``h`` keeps every bit of ``h - delta`` for the score.

    >>> recentre(torch.ones(3, 4, dtype=torch.bfloat16), torch.full((4,), 0.001)).dtype
    torch.float64
    """
    h = as_float64(h)
    delta = _f64(delta, device=h.device)
    _check_trailing(h, delta, "h", "delta")
    return h - delta


# ---------------------------------------------------------------------------
# score
# ---------------------------------------------------------------------------


def unsafety_score(h: Tensor, mu_minus: Tensor, r: Tensor) -> Tensor:
    """Unsafety score ``s = <h - mu_minus, r_hat> / ||r|| = <h - mu_minus, r> / ||r||^2`` (float64).

    The position of ``h`` along the refusal axis in units of the centroid
    distance: 0 at the safe centroid, 1 at the unsafe centroid, whatever the
    layer's scale. Pass the *re-centred* activation for multimodal inputs.

    Shapes: ``h [N, L, d]`` with ``mu_minus, r [L, d]`` -> ``[N, L]``; for one
    layer ``h [N, d]`` or ``[d]`` with ``mu_minus, r [d]`` -> ``[N]`` or ``[]``.

    >>> unsafety_score(torch.tensor([2.0, 5.0]), torch.zeros(2), torch.tensor([1.0, 0.0]))
    tensor(2., dtype=torch.float64)
    """
    h = as_float64(h)
    mu_minus = _f64(mu_minus, device=h.device)
    r = _f64(r, device=h.device)
    if mu_minus.shape != r.shape:
        raise ValueError(
            f"mu_minus {tuple(mu_minus.shape)} and r {tuple(r.shape)} must have the same shape"
        )
    _check_trailing(h, r, "h", "r")
    norm = _norm_nonzero(r)  # [L]
    return ((h - mu_minus) * r).sum(dim=-1) / norm.square()  # [N, L]


def judged_score(h: Tensor, mu_minus: Tensor, r: Tensor, delta: Tensor | None = None) -> Tensor:
    """The score MARS judges an input by: ``unsafety_score(h.double() - delta)`` (``delta`` None: no re-centring).

    The one function behind the gate: the steering hook (``mars_response``), the gate read at another site
    (``steering.gate_scores``), the dashboard's re-scoring and the evaluation's probe all call it, so for the same
    residuals they cannot disagree about whether the gate is open.

    >>> judged_score(torch.tensor([2.0, 5.0]), torch.zeros(2), torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.0]))
    tensor(1.5000, dtype=torch.float64)
    """
    return unsafety_score(as_float64(h) if delta is None else recentre(h, delta), mu_minus, r)


# ---------------------------------------------------------------------------
# gate and trust region
# ---------------------------------------------------------------------------


def gate_weight(s: Tensor | float, tau: Tensor | float, margin: float = 0.1) -> Tensor:
    """One-sided ReLU gate ``w = clip(relu(s - tau) / margin, 0, 1)`` (float64).

    0 for inputs judged safe, 1 from ``tau + margin`` on, and a linear ramp in
    between, so the steering does not switch on abruptly at the threshold.

    >>> gate_weight(torch.tensor([0.0, 0.55, 0.7]), 0.5, margin=0.1)
    tensor([0.0000, 0.5000, 1.0000], dtype=torch.float64)
    """
    if not margin > 0:
        raise ValueError(f"margin must be > 0 (the width of the gate ramp), got {margin}")
    s = _f64(s)
    tau = _f64(tau, device=s.device)
    return (torch.relu(s - tau) / margin).clamp(0.0, 1.0)


def trust_region_coefficient(
    s: Tensor | float,
    tau: Tensor | float,
    t_star: Tensor | float,
    strength: float = 1.0,
    margin: float = 0.1,
    gated: bool = True,
    gate: Tensor | float | None = None,
) -> Tensor:
    """Coefficient ``c = strength * w * relu(t* - s)`` of the displacement ``c * r`` (float64).

    Moving by ``c * r`` raises the score by exactly ``c``, so with
    ``strength = 1`` and a fully open gate the input lands at ``t*``; inside
    the ramp it moves a fraction ``w`` of the way, and beyond ``t*`` not at
    all: the trust region is the segment ``[tau, t*]``. ``c`` is exactly
    ``0.0`` (not a tiny number) wherever ``s <= tau``, so benign inputs stay
    bit-identical. ``strength > 1`` deliberately overshoots ``t*``.
    ``gated=False`` drops the gate (``c = strength * relu(t* - s)`` for every
    input): the always-on baseline the gate improves on.

    ``gate`` is the score the gate reads when it is read at another layer than
    the push (conditional MARS: detect where the model separates best, push
    where it steers best); then ``w = w(gate)`` and the gate is open iff
    ``gate > tau``, while ``s`` (the push layer's score) still sets how far to
    go. By default the gate reads ``s`` itself.

    >>> trust_region_coefficient(torch.tensor([0.2, 1.0, 4.0]), 0.5, 3.0)
    tensor([0., 2., 0.], dtype=torch.float64)
    >>> trust_region_coefficient(torch.tensor([0.2, 1.0, 4.0]), 0.5, 3.0, gated=False)
    tensor([2.8000, 2.0000, 0.0000], dtype=torch.float64)
    """
    if not (math.isfinite(strength) and strength >= 0):
        raise ValueError(f"strength must be a finite number >= 0, got {strength}")
    s = _f64(s)
    tau = _f64(tau, device=s.device)
    t_star = _f64(t_star, device=s.device)
    if not gated:
        return strength * torch.relu(t_star - s)
    g = s if gate is None else _f64(gate, device=s.device)
    c = strength * gate_weight(g, tau, margin) * torch.relu(t_star - s)
    return torch.where(g > tau, c, torch.zeros((), dtype=_F64, device=s.device))


@dataclass(frozen=True)
class MarsRule:
    """The controls of one MARS application, resolved: fitted values with the user's overrides applied.

    ``gated=False`` is the ungated baseline (always push to ``t*``); ``steer=False`` reports what MARS would do and
    changes nothing.

    >>> MarsRule(tau=0.5, t_star=3.0, strength=0.5)
    MarsRule(tau=0.5, t_star=3.0, margin=0.1, strength=0.5, gated=True, steer=True)
    """

    tau: float
    t_star: float
    margin: float = 0.1
    strength: float = 1.0
    gated: bool = True
    steer: bool = True

    def __post_init__(self) -> None:
        for name in ("tau", "t_star", "strength"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.strength < 0:
            raise ValueError(f"strength must be >= 0, got {self.strength}")
        if not self.margin > 0:
            raise ValueError(f"margin must be > 0 (the width of the gate ramp), got {self.margin}")


@dataclass(frozen=True)
class MarsResponse:
    """What MARS does to a batch of residuals ``h [..., d]`` (see ``mars_response``)."""

    score: Tensor  # [...] float64: s of the judged (re-centred) activation at the push layer
    gate_score: Tensor  # [...] float64: the score the gate read (== score unless read at another layer)
    gate_weight: Tensor  # [...] float64: w(gate_score)
    gate_open: Tensor  # [...] bool: gate_score > tau
    push: Tensor  # [...] float64: c, how far along r the input is (or would be) moved, in score units
    planned_norm: Tensor  # [...] float64: ||c r||, the displacement these controls plan, even with steering off
    displacement: Tensor  # [..., d] float64: c r, what is added to h (exactly zero when rule.steer is False)
    moved: Tensor  # [...] bool: rows the edit changes (c > 0 and steering on); every other row stays bit for bit

    def apply(self, h: Tensor) -> Tensor:
        """``h`` with the displacement added, in ``h``'s dtype and on its device: ``(h.double() + c r)`` rounded
        once, on write. Rows not ``moved`` are ``h``'s own values, bit for bit (a closed gate changes nothing)."""
        h = torch.as_tensor(h)
        if not bool(self.moved.any()):
            return h
        new = (as_float64(h) + self.displacement).to(h.dtype).to(h.device)  # round on the float64 device, then move
        return torch.where(self.moved.to(h.device)[..., None], new, h)


def _response(h: Tensor, mu_minus: Tensor, r: Tensor, tau: Tensor | float, t_star: Tensor | float,
              strength: float, margin: float, gated: bool, steer: bool, delta: Tensor | None,
              gate: Tensor | None = None) -> MarsResponse:
    s = judged_score(h, mu_minus, r, delta)  # [...] float64, on float64_device(h.device)
    dev = s.device
    g = s if gate is None else _f64(gate, device=dev)  # [...]
    c = trust_region_coefficient(s, tau, t_star, strength, margin, gated, gate=g)  # [...]
    r64 = _f64(r, device=dev)  # [d] or [L, d]
    planned = torch.where((c > 0)[..., None], c[..., None] * r64, torch.zeros((), dtype=_F64, device=dev))
    tau64 = _f64(tau, device=dev)
    return MarsResponse(score=s, gate_score=g, gate_weight=gate_weight(g, tau64, margin), gate_open=g > tau64,
                        push=c, planned_norm=torch.linalg.vector_norm(planned, dim=-1),
                        displacement=planned if steer else torch.zeros_like(planned),
                        moved=(c > 0) & steer)


def mars_response(h: Tensor, mu_minus: Tensor, r: Tensor, rule: MarsRule, delta: Tensor | None = None,
                  gate_score: Tensor | None = None) -> MarsResponse:
    """The one answer to "what does MARS do to this h": score, gate weight, push and displacement.

    The score is read on the re-centred activation ``h.double() - delta`` (``judged_score``; when ``delta`` is given),
    but the displacement is added to the raw ``h`` in the model (``out.apply(h)``, rounded once): the offset is only
    removed for *judging*, the model keeps seeing its input.
    The steering hook, the dashboard's re-scoring and every plot of the push call this function, so they cannot
    drift apart (a plot that ignores ``strength`` while the hook honours it).

    With ``strength = 1`` an input with ``tau + margin < s < t*`` ends exactly at ``t*`` (as measured on the
    re-centred activation), never beyond; inputs with ``s <= tau`` or ``s >= t*`` get an exactly-zero displacement.

    ``gate_score [...]``, when given, is what the gate reads instead of this layer's own score: the re-centred
    score at the detection layer (conditional MARS). ``rule.tau`` is then that layer's threshold, while ``rule.t_star``
    belongs to the push layer (``h``'s).

    Shapes: ``h [..., d]`` with ``mu_minus, r, delta [d]`` (one layer; the usual case inside a hook). Also works on
    all layers at once: ``h [N, L, d]``, ``r [L, d]`` (``rule.tau`` is then shared by every layer).

    >>> rule = MarsRule(tau=0.5, t_star=3.0)
    >>> out = mars_response(torch.tensor([[1.0, 0.0]]), torch.zeros(2), torch.tensor([1.0, 0.0]), rule)
    >>> out.score, out.push, out.apply(torch.tensor([[1.0, 0.0]]))
    (tensor([1.], dtype=torch.float64), tensor([2.], dtype=torch.float64), tensor([[3., 0.]]))
    """
    return _response(h, mu_minus, r, rule.tau, rule.t_star, rule.strength, rule.margin, rule.gated, rule.steer,
                     delta, gate_score)


def response_curve(s: Tensor | Sequence[float], rule: MarsRule, gate_score: float | None = None) -> MarsResponse:
    """``mars_response`` for inputs placed at scores ``s`` on the refusal axis (no model needed): for plots.

    An input's push depends only on its score (and on ``gate_score`` when the gate is read at another layer: then
    every point of the curve shares that gate), so the curve is exact for every ``h``.

    >>> response_curve([0.0, 1.0, 4.0], MarsRule(tau=0.5, t_star=3.0, strength=0.5)).push
    tensor([0., 1., 0.], dtype=torch.float64)
    """
    s = _f64(s).reshape(-1)  # [S]
    gate = None if gate_score is None else torch.full_like(s, float(gate_score))
    return mars_response(s[:, None], torch.zeros(1, dtype=_F64), torch.ones(1, dtype=_F64), rule,
                         gate_score=gate)  # h = s * r


def steer_displacement(
    h: Tensor,
    mu_minus: Tensor,
    r: Tensor,
    tau: Tensor | float,
    t_star: Tensor | float,
    strength: float = 1.0,
    margin: float = 0.1,
    delta: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(displacement, score)`` of the gated MARS push: ``mars_response``'s maths with tensor-valued controls.

    ``tau`` and ``t_star`` may be per-layer tensors ``[L]`` when ``h [N, L, d]`` holds all layers.

    >>> h = torch.tensor([[1.0, 0.0]])
    >>> disp, s = steer_displacement(h, torch.zeros(2), torch.tensor([1.0, 0.0]), 0.5, 3.0)
    >>> disp, s
    (tensor([[2., 0.]]), tensor([1.], dtype=torch.float64))
    """
    out = _response(h, mu_minus, r, tau, t_star, strength, margin, gated=True, steer=True, delta=delta)
    return out.displacement.to(torch.as_tensor(h).dtype), out.score
