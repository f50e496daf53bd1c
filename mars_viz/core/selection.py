"""Layer-selection statistics: how a calibration chooses where MARS reads and pushes, and with what threshold.

Separability (``auroc``, ``fisher_ratio``), ``consistency``, the split-half
check, misalignment, steerability and the combined steer score, the allowed
layer range and the layer choices (``choose_layer``, ``choose_detect_layer``,
``choose_gate_site`` with ``gate_rates`` / ``surface_agreement``), the gate
threshold ``tau`` (``balanced_accuracy_threshold``) and the target level
``t*`` (``choose_target_level``), and ``LayerScores``, the per-layer
diagnostics a fit saves. The rule these choices feed is `rule` (imported
here, never the reverse); shapes and float64 as there: sets of scores are
``[N, L]``, per-layer results ``[L]``.

Example:
    >>> s_u, s_s = unsafety_score(acts_u, mu_minus, r), unsafety_score(acts_s, mu_minus, r)  # doctest: +SKIP
    >>> tau, acc = balanced_accuracy_threshold(s_u, s_s)  # doctest: +SKIP
    >>> detect = choose_detect_layer(auroc(s_u, s_s))  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .rule import _F64, _check_finite, _check_non_empty, _check_trailing, _f64, _norm_nonzero, mean_activation

__all__ = [
    "LayerScores",
    "allowed_layer_range",
    "auroc",
    "balanced_accuracy_threshold",
    "choose_detect_layer",
    "choose_gate_site",
    "choose_layer",
    "choose_target_level",
    "combined_score",
    "consistency",
    "fisher_ratio",
    "gate_rates",
    "misalignment",
    "normalise_steerability",
    "split_half_cosine",
    "surface_agreement",
]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _as_scores(s_a: Tensor, s_b: Tensor, name_a: str, name_b: str) -> tuple[Tensor, Tensor]:
    """Validate two score sets ``[N_a, L]`` / ``[N_b, L]`` (or 1-D) and return them as float64."""
    s_a, s_b = _f64(s_a), _f64(s_b)
    for s, name in ((s_a, name_a), (s_b, name_b)):
        if s.ndim not in (1, 2):
            raise ValueError(
                f"{name} must be [N, L] or [N] (one layer); got shape {tuple(s.shape)}"
            )
        _check_non_empty(s, name)
        _check_finite(s, name)
    if s_a.ndim != s_b.ndim or s_a.shape[1:] != s_b.shape[1:]:
        raise ValueError(
            f"{name_a} {tuple(s_a.shape)} and {name_b} {tuple(s_b.shape)} must have the same "
            "number of layers (same trailing shape)"
        )
    return s_a, s_b


# ---------------------------------------------------------------------------
# threshold, target level
# ---------------------------------------------------------------------------


def balanced_accuracy_threshold(s_unsafe: Tensor, s_safe: Tensor) -> tuple[Tensor, Tensor]:
    """Per-layer gate threshold ``tau`` maximising balanced accuracy of "unsafe iff s > tau".

    Balanced accuracy ``(TPR + TNR) / 2`` does not reward a threshold for the
    class sizes of the held-out split. Candidates are the midpoints between
    consecutive sorted unique scores of both sets, plus one value below the
    minimum (everything unsafe) and one above the maximum (everything safe).

    Ties: when several candidates reach the best accuracy, take the one
    closest to the midpoint between the lowest and the highest best candidate
    (the lower one if two are equally close). For separated classes this puts
    ``tau`` in the middle of the gap, the most robust choice.

    Inputs ``[N_u, L]`` and ``[N_s, L]`` -> ``(tau [L], accuracy [L])``, float64;
    1-D inputs (one layer) -> two scalars.

    >>> tau, acc = balanced_accuracy_threshold(torch.tensor([0.75, 1.0]), torch.tensor([0.0, 0.25]))
    >>> float(tau), float(acc)
    (0.5, 1.0)
    """
    s_u, s_s = _as_scores(s_unsafe, s_safe, "s_unsafe", "s_safe")
    one_layer = s_u.ndim == 1
    if one_layer:
        s_u, s_s = s_u[:, None], s_s[:, None]  # [N, 1]
    num_layers = s_u.shape[1]
    n_u, n_s = s_u.shape[0], s_s.shape[0]
    taus = torch.empty(num_layers, dtype=_F64)
    accs = torch.empty(num_layers, dtype=_F64)
    u_sorted = s_u.sort(dim=0).values.T.contiguous()  # [L, N_u]
    s_sorted = s_s.sort(dim=0).values.T.contiguous()  # [L, N_s]
    for layer in range(num_layers):
        uniq = torch.unique(torch.cat([u_sorted[layer], s_sorted[layer]]))  # [K] sorted
        span = float(uniq[-1] - uniq[0])
        pad = 0.5 * span if span > 0 else 0.5
        cands = torch.cat([uniq[:1] - pad, (uniq[1:] + uniq[:-1]) / 2, uniq[-1:] + pad])  # [K+1]
        # counts of unsafe scores > c and of safe scores <= c, via binary search
        n_u_le = torch.searchsorted(u_sorted[layer], cands, right=True)  # [K+1]
        n_s_le = torch.searchsorted(s_sorted[layer], cands, right=True)  # [K+1]
        tpr = (n_u - n_u_le).to(_F64) / n_u
        tnr = n_s_le.to(_F64) / n_s
        bal = (tpr + tnr) / 2  # [K+1]
        best = bal.max()
        best_idx = torch.nonzero(bal >= best - 1e-12).flatten()
        centre = (cands[best_idx[0]] + cands[best_idx[-1]]) / 2
        pick = best_idx[torch.argmin((cands[best_idx] - centre).abs())]  # first on ties
        taus[layer] = cands[pick]
        accs[layer] = bal[pick]
    if one_layer:
        return taus[0], accs[0]
    return taus, accs  # [L], [L]


def choose_target_level(
    levels: Sequence[float] | Tensor, rates: Sequence[float] | Tensor, tol: float = 0.05
) -> float:
    """Target level ``t*``: the smallest level whose refusal rate is within ``tol`` of the best.

    Pushing further than needed leaves the model's manifold (answers degrade
    and refusal falls again), so among near-best levels the gentlest wins.
    ``levels`` need not be sorted.

    >>> choose_target_level([1, 2, 3, 4, 6], [0.19, 0.31, 0.50, 0.44, 0.0])
    3.0
    >>> choose_target_level([1, 2, 3], [0.2, 0.47, 0.50])
    2.0
    """
    lv, rt = _f64(levels).reshape(-1), _f64(rates).reshape(-1)
    if lv.numel() == 0:
        raise ValueError("levels is empty: pass the grid of target levels that was measured")
    if lv.numel() != rt.numel():
        raise ValueError(
            f"levels has {lv.numel()} entries but rates has {rt.numel()}: pass one refusal "
            "rate per level"
        )
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    _check_finite(lv, "levels")
    _check_finite(rt, "rates")
    best = rt.max()
    ok = rt >= best - tol - 1e-12
    return float(lv[ok].min())


# ---------------------------------------------------------------------------
# layer scores
# ---------------------------------------------------------------------------


def auroc(s_pos: Tensor, s_neg: Tensor) -> Tensor:
    """Per-layer AUROC of ``s_pos`` (e.g. unsafe) against ``s_neg`` (Mann-Whitney, ties = 0.5).

    The probability that a random positive scores above a random negative:
    threshold-free separability of the two classes along ``r``. Inputs
    ``[N_p, L]`` and ``[N_n, L]`` -> ``[L]`` float64; 1-D -> scalar.

    >>> auroc(torch.tensor([2.0, 3.0]), torch.tensor([1.0, 2.0]))
    tensor(0.8750, dtype=torch.float64)
    """
    s_p, s_n = _as_scores(s_pos, s_neg, "s_pos", "s_neg")
    one_layer = s_p.ndim == 1
    if one_layer:
        s_p, s_n = s_p[:, None], s_n[:, None]
    neg_sorted = s_n.sort(dim=0).values.T.contiguous()  # [L, N_n]
    pos = s_p.T.contiguous()  # [L, N_p]
    n_less = torch.searchsorted(neg_sorted, pos, right=False)  # [L, N_p]
    n_leq = torch.searchsorted(neg_sorted, pos, right=True)  # [L, N_p]
    wins = (n_less + n_leq).to(_F64) / 2  # less + 0.5 * equal
    out = wins.mean(dim=1) / s_n.shape[0]  # [L]
    return out[0] if one_layer else out


def fisher_ratio(s_pos: Tensor, s_neg: Tensor, eps: float = 1e-12) -> Tensor:
    """Per-layer Fisher ratio ``(mean_pos - mean_neg)^2 / (var_pos + var_neg + eps)``.

    Unlike AUROC it keeps growing with the margin between the classes, so it
    still ranks layers whose AUROC is saturated at 1. Variances are population
    variances (no Bessel correction), so a one-element set is allowed.

    >>> fisher_ratio(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0]))
    tensor(4.0000, dtype=torch.float64)
    """
    s_p, s_n = _as_scores(s_pos, s_neg, "s_pos", "s_neg")
    gap = s_p.mean(dim=0) - s_n.mean(dim=0)  # [L]
    var = s_p.var(dim=0, correction=0) + s_n.var(dim=0, correction=0)  # [L]
    return gap.square() / (var + eps)


def consistency(acts_unsafe: Tensor, mu_minus: Tensor, r: Tensor, eps: float = 1e-12) -> Tensor:
    """Per-layer mean cosine between ``h - mu_minus`` and ``r_hat`` over the unsafe set.

    1 when every unsafe activation sits on the ray from the safe centroid
    along ``r``; near 0 when ``r`` is only the mean of unrelated directions,
    in which case steering along it is a poor summary of "unsafe".
    ``acts_unsafe [N, L, d]``, ``mu_minus, r [L, d]`` -> ``[L]`` float64.

    >>> consistency(torch.tensor([[[2.0, 0.0]]]), torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]))
    tensor([1.], dtype=torch.float64)
    """
    acts_unsafe = torch.as_tensor(acts_unsafe)
    _check_non_empty(acts_unsafe, "acts_unsafe")
    mu_minus = _f64(mu_minus, device=acts_unsafe.device)
    r = _f64(r, device=acts_unsafe.device)
    _check_trailing(acts_unsafe, r, "acts_unsafe", "r")
    if mu_minus.shape != r.shape:
        raise ValueError(
            f"mu_minus {tuple(mu_minus.shape)} and r {tuple(r.shape)} must have the same shape"
        )
    r_norm = _norm_nonzero(r)  # [L]
    diff = acts_unsafe.to(_F64) - mu_minus  # [N, L, d]
    diff_norm = torch.linalg.vector_norm(diff, dim=-1).clamp_min(eps)  # [N, L]
    cos = (diff * r).sum(dim=-1) / (diff_norm * r_norm)  # [N, L]
    return cos.mean(dim=0)  # [L]


def split_half_cosine(acts_unsafe: Tensor, acts_safe: Tensor, seed: int = 0) -> Tensor:
    """Per-layer cosine between refusal directions fitted on two random halves of the data.

    A reliability check: if ``r`` is a real property of the layer it barely
    changes when half the prompts are swapped out (cosine near 1); if it is
    noise, the two halves disagree. Each set is split by a seeded permutation.
    ``acts_unsafe [N_u, L, d]``, ``acts_safe [N_s, L, d]`` (each N >= 2) -> ``[L]``.

    >>> g = torch.Generator().manual_seed(0)
    >>> u, s = torch.randn(8, 2, 4, generator=g) + 5, torch.randn(8, 2, 4, generator=g)
    >>> bool((split_half_cosine(u, s) > 0.9).all())
    True
    """
    acts_unsafe, acts_safe = torch.as_tensor(acts_unsafe), torch.as_tensor(acts_safe)
    for acts, name in ((acts_unsafe, "acts_unsafe"), (acts_safe, "acts_safe")):
        if acts.ndim < 2 or acts.shape[0] < 2:
            raise ValueError(
                f"{name} needs at least 2 prompts to split in halves; got shape {tuple(acts.shape)}"
            )
    if acts_unsafe.shape[1:] != acts_safe.shape[1:]:
        raise ValueError(
            f"acts_unsafe {tuple(acts_unsafe.shape)} and acts_safe {tuple(acts_safe.shape)} "
            "must agree on every axis but the first"
        )
    gen = torch.Generator().manual_seed(seed)
    halves = []
    for acts in (acts_unsafe, acts_safe):
        perm = torch.randperm(acts.shape[0], generator=gen).to(acts.device)
        half = acts.shape[0] // 2
        halves.append((acts[perm[:half]], acts[perm[half:]]))  # [N/2, L, d] x 2
    (u_a, u_b), (s_a, s_b) = halves
    r_a = mean_activation(u_a) - mean_activation(s_a)  # [L, d]
    r_b = mean_activation(u_b) - mean_activation(s_b)  # [L, d]
    denom = torch.linalg.vector_norm(r_a, dim=-1) * torch.linalg.vector_norm(r_b, dim=-1)  # [L]
    return (r_a * r_b).sum(dim=-1) / denom.clamp_min(1e-300)


def misalignment(s: Tensor) -> Tensor:
    """Per-layer mean score of a set: ``[N, L]`` -> ``[L]`` (``[N]`` -> scalar), float64.

    Used on neutral-image + safe-text inputs: before re-centring their mean
    score shows how far the modality offset alone pushes benign inputs toward
    "unsafe"; after re-centring it should be back near 0.

    >>> misalignment(torch.tensor([[0.5, 1.0], [0.7, 0.0]]))
    tensor([0.6000, 0.5000], dtype=torch.float64)
    """
    s = _f64(s)
    _check_non_empty(s, "s")
    return s.mean(dim=0)


def normalise_steerability(gains: Tensor) -> Tensor:
    """Steerability in ``[0, 1]``: ``gains / max(gains)``, negatives clipped to 0.

    Raw gains (log-probability of the refusal opening) are in nats and only
    their ranking across layers matters; layers where steering lowers the
    refusal probability count as not steerable. All gains ``<= 0`` -> zeros.

    >>> normalise_steerability(torch.tensor([2.0, 4.0, -1.0]))
    tensor([0.5000, 1.0000, 0.0000], dtype=torch.float64)
    """
    gains = _f64(gains)
    _check_non_empty(gains, "gains")
    _check_finite(gains, "gains")
    top = gains.max()
    if top <= 0:
        return torch.zeros_like(gains)
    return (gains / top).clamp_min(0.0)


def combined_score(consistency: Tensor, steerability: Tensor) -> Tensor:
    """Steering-layer score ``max(consistency, 0) * steerability`` per layer (float64).

    Where the push should go: the refusal opening must gain the most (steerability) along a direction the unsafe
    inputs actually point in (consistency). Separability is the detection layer's criterion, not this one's: it
    only bounds the range (``allowed_layer_range``). Negative consistency counts as 0.

    >>> combined_score(torch.tensor([-0.5, 0.5]), torch.tensor([1.0, 0.9]))
    tensor([0.0000, 0.4500], dtype=torch.float64)
    """
    con, steer = _f64(consistency), _f64(steerability)
    if con.shape != steer.shape:
        raise ValueError(
            f"consistency {tuple(con.shape)} and steerability {tuple(steer.shape)} must both be [L] with the same L"
        )
    return con.clamp_min(0.0) * steer


# ---------------------------------------------------------------------------
# layer choice
# ---------------------------------------------------------------------------


def allowed_layer_range(separability: Tensor, min_frac: float = 0.9) -> range:
    """Layers eligible for the push: from the first layer whose held-out separability reaches ``min_frac`` of the
    best layer's, to the last layer.

    Why this rule (measured on the real 0.5B backbone, 24 layers): up to layer 11 separability is near chance
    (0.4-0.6) and so is steerability: r is not yet a feature of the input there, and pushing along it does nothing
    useful. From the layer where r separates almost as well as anywhere, it is a real refusal feature, and the best
    steering layer (steerability 1.0 at layer 21) lies inside. The rule follows the data of each model instead of
    a fixed share of layers (an earlier "skip the last 20%" rule kept the best layers out). Never empty: the best
    layer itself qualifies.

    >>> allowed_layer_range(torch.tensor([0.5, 0.6, 0.9, 0.95, 0.97]))
    range(2, 5)
    """
    sep = _f64(separability).reshape(-1)  # [L]
    if sep.numel() == 0:
        raise ValueError("separability is empty: compute layer scores first")
    if not 0 <= min_frac <= 1:
        raise ValueError(f"min_frac is a fraction of the best separability in [0, 1], got {min_frac}")
    finite = torch.where(torch.isfinite(sep), sep, torch.full_like(sep, -math.inf))
    first = int(torch.nonzero(finite >= min_frac * float(finite.max())).flatten()[0])
    return range(first, sep.numel())


def choose_detect_layer(separability: Tensor, tol: float = 0.005) -> int:
    """The layer the gate reads: the best held-out separability over all layers.

    Tie rule: among layers within ``tol`` of the best AUROC (a difference of one pair in ~40x40 held-out prompts is
    0.0006; 0.005 is noise at these sizes), take the earliest, because a gate known earlier can be read in the
    same forward pass as a later push, with no extra probe.

    >>> choose_detect_layer(torch.tensor([0.5, 0.96, 0.972, 0.97]))
    2
    >>> choose_detect_layer(torch.tensor([0.5, 0.968, 0.972, 0.97]))
    1
    """
    sep = _f64(separability).reshape(-1)  # [L]
    if sep.numel() == 0:
        raise ValueError("separability is empty: compute layer scores first")
    finite = torch.where(torch.isfinite(sep), sep, torch.full_like(sep, -math.inf))
    return int(torch.nonzero(finite >= float(finite.max()) - tol).flatten()[0])


def gate_rates(s_unsafe: Tensor, s_safe: Tensor, s_lookalike: Tensor | None, taus: Tensor) -> dict[str, Tensor]:
    """How a gate with thresholds ``taus [L]`` does on held-out scores ``[N, L]``: ``tpr`` (opens on harmful),
    ``fpr_harmless``, ``fpr_lookalike`` (zeros when there are none) and ``quality = tpr - fpr_harmless -
    fpr_lookalike`` (Youden's J with both kinds of false positive counted), all ``[L]``.

    >>> r = gate_rates(torch.tensor([[1.0], [0.9]]), torch.tensor([[0.0], [0.6]]), torch.tensor([[0.7]]),
    ...                torch.tensor([0.5]))
    >>> [round(float(r[k][0]), 2) for k in ("tpr", "fpr_harmless", "fpr_lookalike", "quality")]
    [1.0, 0.5, 1.0, -0.5]
    """
    su, ss, t = _f64(s_unsafe), _f64(s_safe), _f64(taus)
    _check_non_empty(su, "s_unsafe")
    _check_non_empty(ss, "s_safe")
    tpr = (su > t).double().mean(0)
    fpr_s = (ss > t).double().mean(0)
    fpr_la = torch.zeros_like(fpr_s) if s_lookalike is None or s_lookalike.numel() == 0 else \
        (_f64(s_lookalike) > t).double().mean(0)
    return {"tpr": tpr, "fpr_harmless": fpr_s, "fpr_lookalike": fpr_la, "quality": tpr - fpr_s - fpr_la}


def surface_agreement(s_orig: Tensor, s_forms: Tensor, taus: Tensor) -> Tensor:
    """Per layer, the smallest share (over surface forms) of prompts whose gate decision ``s > tau`` stays the same:
    ``s_orig [N, L]``, ``s_forms [F, N, L]`` (the same prompts under F surface changes), ``taus [L]`` -> ``[L]``.

    >>> surface_agreement(torch.tensor([[1.0], [0.0]]), torch.tensor([[[1.0], [0.0]], [[0.0], [0.0]]]),
    ...                   torch.tensor([0.5])).tolist()
    [0.5]
    """
    t = _f64(taus)
    same = (_f64(s_forms) > t) == (_f64(s_orig) > t)  # [F, N, L]
    return same.double().mean(1).min(0).values


def choose_gate_site(quality: dict[str, Tensor], separability: dict[str, Tensor],
                     order: Sequence[str] = ("post", "inst"), eligible: dict[str, Tensor] | None = None
                     ) -> tuple[str, int]:
    """The gate's (position, layer): the best held-out ``quality`` (``gate_rates``) over positions and layers, among
    the ``eligible`` ones (bool ``[L]`` per position, e.g. a surface-form check passed; all when None, or when none
    is eligible).

    Ties (within 1e-9) go to the higher separability, then to the earlier position in ``order`` (t_post first: the
    established reading), then to the earlier layer.

    >>> choose_gate_site({"post": torch.tensor([0.5, 0.8]), "inst": torch.tensor([0.9, 0.7])},
    ...                  {"post": torch.tensor([0.9, 0.9]), "inst": torch.tensor([0.9, 0.9])})
    ('inst', 0)
    >>> choose_gate_site({"post": torch.tensor([0.5, 0.9]), "inst": torch.tensor([0.9, 0.7])},
    ...                  {"post": torch.tensor([0.9, 0.99]), "inst": torch.tensor([0.9, 0.9])})
    ('post', 1)
    """
    if eligible is not None and not any(bool(eligible[p].any()) for p in order if p in quality and p in eligible):
        eligible = None
    best: tuple[float, float, int, int] | None = None
    site = ("", -1)
    for rank, pos in enumerate(order):
        if pos not in quality:
            continue
        q, sep = _f64(quality[pos]).reshape(-1), _f64(separability[pos]).reshape(-1)
        ok = None if eligible is None or pos not in eligible else eligible[pos].reshape(-1)
        for layer in range(q.numel()):
            if not math.isfinite(float(q[layer])) or (ok is not None and not bool(ok[layer])):
                continue
            key = (round(float(q[layer]), 9), float(sep[layer]) if math.isfinite(float(sep[layer])) else -1.0,
                   -rank, -layer)
            if best is None or key > best:
                best, site = key, (pos, layer)
    if best is None:
        raise ValueError("no finite gate quality at any position and layer")
    return site


def choose_layer(combined: Tensor, allowed: range | None = None) -> int:
    """Index of the best layer by ``combined`` within ``allowed`` (all layers when ``None``).

    NaN scores never win; ties go to the earliest layer.

    >>> choose_layer(torch.tensor([9.0, 0.2, 0.5, 0.1]), allowed=range(1, 4))
    2
    """
    combined = _f64(combined).reshape(-1)  # [L]
    num_layers = combined.numel()
    if num_layers == 0:
        raise ValueError("combined is empty: compute layer scores first")
    idx = (
        list(range(num_layers)) if allowed is None else [i for i in allowed if 0 <= i < num_layers]
    )
    if not idx:
        raise ValueError(
            f"allowed={allowed!r} contains no layer index in [0, {num_layers}); "
            "use allowed_layer_range(num_layers) or pass allowed=None"
        )
    vals = combined[idx]
    vals = torch.where(torch.isnan(vals), torch.full_like(vals, -math.inf), vals)
    return idx[int(torch.argmax(vals))]


@dataclass(frozen=True, eq=False)
class LayerScores:
    """All per-layer diagnostics of one calibration, each ``[L]`` float64.

    ``eq=False``: tensors have no single truth value, so equality is identity;
    compare ``to_dict()`` outputs instead.

    A value object for plots and the saved state: ``to_dict`` gives plain
    lists of floats (JSON-ready), ``from_dict`` restores it.

    >>> z = torch.zeros(2)
    >>> ls = LayerScores(z, z, z, z, z, z, z, z)
    >>> LayerScores.from_dict(ls.to_dict()).to_dict() == ls.to_dict()
    True
    """

    separability: Tensor  # [L] AUROC of s on held-out unsafe vs safe
    fisher: Tensor  # [L] Fisher ratio along r_hat
    consistency: Tensor  # [L] mean cos(h - mu_minus, r_hat) over unsafe fit
    split_half: Tensor  # [L] cosine of r between two halves
    steerability: Tensor  # [L] normalised refusal log-prob gain
    misalignment_before: Tensor  # [L] mean s of neutral media + safe text, raw
    misalignment_after: Tensor  # [L] same, after re-centring
    combined: Tensor  # [L] consistency+ * steerability: the steering-layer score

    def __post_init__(self) -> None:
        lengths = {}
        for f in fields(self):
            value = _f64(getattr(self, f.name)).reshape(-1).cpu()
            object.__setattr__(self, f.name, value)
            lengths[f.name] = value.numel()
        if len(set(lengths.values())) > 1:
            raise ValueError(f"all LayerScores fields must have the same length L; got {lengths}")

    @property
    def num_layers(self) -> int:
        return self.combined.numel()

    def to_dict(self) -> dict[str, list[float]]:
        """Plain ``{field: [float, ...]}`` for JSON sidecars and plots."""
        return {f.name: [float(v) for v in getattr(self, f.name)] for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Sequence[float]]) -> LayerScores:
        """Inverse of ``to_dict``; raises ``ValueError`` naming any missing field."""
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"LayerScores dict is missing field(s) {missing}; expected {names}")
        return cls(**{n: _f64(list(data[n])) for n in names})
