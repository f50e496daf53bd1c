"""Planted-geometry tests for mars_viz.core.rule and mars_viz.core.selection.

Synthetic activations with a known refusal direction, modality offset and
spread; each test asserts that the maths recovers what was planted.
"""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import roc_auc_score

import mars_viz.core.rule as R
from mars_viz.core.rule import (
    gate_weight,
    mean_activation,
    modality_offset,
    recentre,
    refusal_direction,
    steer_displacement,
    trust_region_coefficient,
    unsafety_score,
)
from mars_viz.core.selection import (
    LayerScores,
    allowed_layer_range,
    auroc,
    balanced_accuracy_threshold,
    choose_detect_layer,
    choose_layer,
    choose_target_level,
    combined_score,
    consistency,
    fisher_ratio,
    misalignment,
    normalise_steerability,
    split_half_cosine,
)

N, L, D = 64, 4, 16
F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def _planted(seed: int = 0, sep: float = 4.0, noise: float = 0.3):
    """Safe cloud around `base`, unsafe cloud around `base + sep * direction`, per layer."""
    g = _gen(seed)
    direction = _unit(torch.randn(L, D, generator=g, dtype=F64))  # [L, d]
    base = 3.0 * torch.randn(L, D, generator=g, dtype=F64)  # [L, d]
    safe = base + noise * torch.randn(N, L, D, generator=g, dtype=F64)  # [N, L, d]
    unsafe = base + sep * direction + noise * torch.randn(N, L, D, generator=g, dtype=F64)
    return direction, base, safe, unsafe


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (
        torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
    )


# --- centroids, direction, offset ------------------------------------------------------


def test_mean_activation_is_float64_mean():
    acts = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)  # [N, L, d]
    mu = mean_activation(acts)
    assert mu.dtype == F64
    assert mu.shape == (3, 2)
    assert torch.equal(mu, acts.double().mean(0))


def test_mean_activation_accumulates_in_float64():
    # bf16 values whose float32/bf16 running sum would lose the small ones
    acts = torch.tensor([[[1024.0]], [[0.5]], [[0.5]], [[-1024.0]]], dtype=torch.bfloat16)
    assert mean_activation(acts).item() == pytest.approx(0.25, abs=0)


def test_mean_activation_empty_raises():
    with pytest.raises(ValueError, match="empty"):
        mean_activation(torch.zeros(0, L, D))


def test_refusal_direction_recovers_planted_direction():
    direction, _, safe, unsafe = _planted()
    r, norm = refusal_direction(mean_activation(unsafe), mean_activation(safe))
    assert r.shape == (L, D) and norm.shape == (L,)
    cos = _cos(r, direction)
    assert bool((cos > 0.99).all()), cos
    assert torch.allclose(norm, torch.full((L,), 4.0, dtype=F64), atol=0.3)
    assert torch.allclose(norm, torch.linalg.vector_norm(r, dim=-1))


def test_refusal_direction_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        refusal_direction(torch.zeros(L, D), torch.zeros(L, D + 1))


def test_modality_offset_recovers_planted_offset():
    g = _gen(1)
    _, _, safe, _ = _planted()
    delta = 5.0 * torch.randn(L, D, generator=g, dtype=F64)  # [L, d]
    k = 3
    with_media = (
        safe.repeat(k, 1, 1) + delta + 0.2 * torch.randn(k * N, L, D, generator=g, dtype=F64)
    )
    est = modality_offset(with_media, safe)
    assert est.dtype == F64 and est.shape == (L, D)
    rel = torch.linalg.vector_norm(est - delta, dim=-1) / torch.linalg.vector_norm(delta, dim=-1)
    assert bool((rel < 0.02).all()), rel


def test_modality_offset_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same layers"):
        modality_offset(torch.zeros(4, L, D), torch.zeros(4, L + 1, D))


def test_recentre_broadcasts_in_float64_and_never_rounds_back():
    delta = torch.arange(L * D, dtype=F64).reshape(L, D) * 1e-3
    h = torch.ones(3, L, D, dtype=torch.float32)
    out = recentre(h, delta)
    assert out.dtype == F64
    assert torch.equal(out, (1.0 - delta).expand(3, L, D))
    one = recentre(torch.ones(D, dtype=torch.bfloat16), delta[1])  # single layer, [d]
    assert one.dtype == F64 and one.shape == (D,)
    assert torch.equal(one, 1.0 - delta[1])  # bf16 would have rounded 1 - 0.017 to 0.984375
    assert not torch.equal(one, (1.0 - delta[1]).to(torch.bfloat16).double())
    with pytest.raises(ValueError, match="trailing"):
        recentre(h, torch.zeros(D + 1))


# --- score ------------------------------------------------------------------------------


def test_score_is_zero_at_safe_and_one_at_unsafe_centroid():
    _, _, safe, unsafe = _planted()
    mu_plus, mu_minus = mean_activation(unsafe), mean_activation(safe)
    r, _ = refusal_direction(mu_plus, mu_minus)
    s = unsafety_score(torch.stack([mu_minus, mu_plus]), mu_minus, r)  # [2, L]
    assert s.dtype == F64 and s.shape == (2, L)
    assert torch.allclose(s[0], torch.zeros(L, dtype=F64), rtol=0, atol=1e-9)
    assert torch.allclose(s[1], torch.ones(L, dtype=F64), rtol=0, atol=1e-9)


def test_score_is_linear_along_r_and_blind_to_orthogonal_moves():
    g = _gen(2)
    mu_minus = torch.randn(D, generator=g, dtype=F64)
    r = 2.5 * _unit(torch.randn(D, generator=g, dtype=F64))
    ortho = torch.randn(D, generator=g, dtype=F64)
    ortho = ortho - (ortho @ r) / (r @ r) * r
    ts = torch.tensor([-1.0, 0.0, 0.3, 2.0, 7.0], dtype=F64)
    h = mu_minus + ts[:, None] * r + 10.0 * ortho  # [5, d], one layer
    s = unsafety_score(h, mu_minus, r)
    assert s.shape == (5,)
    assert torch.allclose(s, ts, atol=1e-9)
    assert unsafety_score(h[3], mu_minus, r).shape == ()
    # float32 activations are scored in float64
    assert unsafety_score(h.float(), mu_minus, r).dtype == F64


def test_score_separates_planted_classes_per_layer():
    _, _, safe, unsafe = _planted()
    mu_minus = mean_activation(safe)
    r, _ = refusal_direction(mean_activation(unsafe), mu_minus)
    s_u, s_s = unsafety_score(unsafe, mu_minus, r), unsafety_score(safe, mu_minus, r)
    assert s_u.shape == (N, L)
    assert torch.allclose(s_u.mean(0), torch.ones(L, dtype=F64), atol=1e-9)
    assert torch.allclose(s_s.mean(0), torch.zeros(L, dtype=F64), atol=1e-9)
    assert bool((s_u.min(0).values > s_s.max(0).values).all())


def test_score_zero_direction_raises():
    with pytest.raises(ValueError, match="zero"):
        unsafety_score(torch.ones(3, L, D), torch.zeros(L, D), torch.zeros(L, D))


# --- threshold --------------------------------------------------------------------------


def test_threshold_separates_planted_classes_in_the_middle_of_the_gap():
    _, _, safe, unsafe = _planted()
    mu_minus = mean_activation(safe)
    r, _ = refusal_direction(mean_activation(unsafe), mu_minus)
    s_u, s_s = unsafety_score(unsafe, mu_minus, r), unsafety_score(safe, mu_minus, r)
    tau, acc = balanced_accuracy_threshold(s_u, s_s)
    assert tau.shape == (L,) and acc.shape == (L,)
    assert torch.equal(acc, torch.ones(L, dtype=F64))
    gap_mid = (s_s.max(0).values + s_u.min(0).values) / 2
    assert torch.allclose(tau, gap_mid, rtol=0, atol=1e-12)


def test_threshold_matches_brute_force_on_overlapping_classes():
    g = _gen(3)
    s_u = torch.randn(40, 3, generator=g, dtype=F64) + 0.8  # [N_u, L]
    s_s = torch.randn(25, 3, generator=g, dtype=F64)  # [N_s, L]
    tau, acc = balanced_accuracy_threshold(s_u, s_s)
    for layer in range(3):
        grid = torch.linspace(-5, 6, 4001, dtype=F64)
        ba = (
            (s_u[:, layer, None] > grid).double().mean(0)
            + (s_s[:, layer, None] <= grid).double().mean(0)
        ) / 2
        assert acc[layer].item() == pytest.approx(ba.max().item(), abs=1e-12)
        own = (
            (s_u[:, layer] > tau[layer]).double().mean()
            + (s_s[:, layer] <= tau[layer]).double().mean()
        ) / 2
        assert own.item() == pytest.approx(acc[layer].item(), abs=1e-12)
        assert 0.5 < acc[layer].item() < 1.0


def test_threshold_tie_picks_candidate_nearest_the_middle():
    # best balanced accuracy 2/3 is reached at tau = 0.5, 2.5 and 4.5: pick 2.5
    tau, acc = balanced_accuracy_threshold(
        torch.tensor([1.0, 3.0, 5.0]), torch.tensor([0.0, 2.0, 4.0])
    )
    assert tau.ndim == 0 and acc.ndim == 0
    assert tau.item() == 2.5
    assert acc.item() == pytest.approx(2 / 3, abs=1e-12)


def test_threshold_rejects_mismatched_layers_and_empty():
    with pytest.raises(ValueError, match="layers"):
        balanced_accuracy_threshold(torch.zeros(5, 3), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="empty"):
        balanced_accuracy_threshold(torch.zeros(0, 3), torch.zeros(5, 3))


# --- target level -----------------------------------------------------------------------

LEVELS = [1, 1.5, 2, 3, 4, 6, 8]


def test_choose_target_level_design_curve_picks_3():
    rates = [0.19, 0.25, 0.31, 0.50, 0.44, 0.00, 0.00]
    assert choose_target_level(LEVELS, rates) == 3.0


def test_choose_target_level_within_tol_picks_smaller_level():
    rates = [0.19, 0.25, 0.47, 0.50, 0.44, 0.00, 0.00]  # 0.47 is within 0.05 of 0.50
    assert choose_target_level(LEVELS, rates) == 2.0
    assert choose_target_level(LEVELS, rates, tol=0.01) == 3.0
    # unsorted levels: still the smallest qualifying level
    assert choose_target_level([4, 2, 3], [0.48, 0.47, 0.50]) == 2.0


def test_choose_target_level_validates():
    with pytest.raises(ValueError, match="one refusal rate per level"):
        choose_target_level([1, 2, 3], [0.1, 0.2])
    with pytest.raises(ValueError, match="empty"):
        choose_target_level([], [])


# --- gate and trust region --------------------------------------------------------------

TAU, T_STAR, MARGIN = 0.5, 3.0, 0.1


def test_gate_ramp_is_linear_inside_margin():
    x = torch.tensor([-1.0, 0.0, 0.1, 0.25, 0.5, 0.9, 1.0, 1.5, 10.0], dtype=F64)
    w = gate_weight(TAU + x * MARGIN, TAU, MARGIN)
    expected = x.clamp(0, 1)
    assert torch.allclose(w, expected, rtol=0, atol=1e-12)
    assert w.dtype == F64


def test_gate_margin_must_be_positive():
    for bad in (0.0, -0.1):
        with pytest.raises(ValueError, match="margin"):
            gate_weight(torch.tensor([1.0]), TAU, bad)
        with pytest.raises(ValueError, match="margin"):
            trust_region_coefficient(torch.tensor([1.0]), TAU, T_STAR, margin=bad)


def test_coefficient_is_exactly_zero_at_or_below_tau():
    s = torch.tensor([-5.0, 0.0, 0.49, TAU], dtype=F64)
    c = trust_region_coefficient(s, TAU, T_STAR, strength=3.0)
    assert torch.equal(c, torch.zeros(4, dtype=F64))
    assert not bool(torch.signbit(c).any())  # +0.0, not -0.0


def test_coefficient_values_in_ramp_and_past_t_star():
    s = torch.tensor([TAU + 0.05, 1.0, T_STAR, 4.0], dtype=F64)
    c = trust_region_coefficient(s, TAU, T_STAR, strength=2.0, margin=MARGIN)
    expected = torch.tensor(
        [2.0 * 0.5 * (T_STAR - TAU - 0.05), 2.0 * (T_STAR - 1.0), 0.0, 0.0], dtype=F64
    )
    assert torch.allclose(c, expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="strength"):
        trust_region_coefficient(s, TAU, T_STAR, strength=-1.0)


def _steer_setup(seed: int = 4):
    g = _gen(seed)
    mu_minus = torch.randn(D, generator=g, dtype=F64)  # [d]
    r = 3.0 * _unit(torch.randn(D, generator=g, dtype=F64))  # [d]
    delta = 4.0 * torch.randn(D, generator=g, dtype=F64)  # [d]
    ortho = torch.randn(D, generator=g, dtype=F64)
    ortho = ortho - (ortho @ r) / (r @ r) * r
    return mu_minus, r, delta, ortho


def test_displacement_is_exactly_zero_when_s_le_tau():
    mu_minus, r, delta, ortho = _steer_setup()
    s_true = torch.tensor([-2.0, 0.0, 0.2, 0.45], dtype=F64)
    h = (mu_minus + s_true[:, None] * r + ortho + delta).float()  # [4, d] raw, float32
    disp, s = steer_displacement(
        h, mu_minus, r, TAU, T_STAR, strength=1.0, margin=MARGIN, delta=delta
    )
    assert disp.dtype == torch.float32
    assert torch.equal(disp, torch.zeros_like(h))
    assert torch.equal(h + disp, h)
    assert torch.allclose(s, s_true, atol=1e-5)


def test_steering_lands_at_t_star_and_never_leaves_trust_region():
    mu_minus, r, delta, ortho = _steer_setup()
    s_true = torch.linspace(-1.0, 5.0, 61, dtype=F64)
    h = mu_minus + s_true[:, None] * r + 2.0 * ortho + delta  # [61, d] raw activations
    disp, s = steer_displacement(h, mu_minus, r, TAU, T_STAR, margin=MARGIN, delta=delta)
    assert torch.allclose(s, s_true, atol=1e-9)
    s_after = unsafety_score(recentre(h + disp, delta), mu_minus, r)  # [61]
    below = s_true < T_STAR
    assert bool((s_after[below] <= T_STAR + 1e-6).all()), s_after[below].max()
    assert bool((s_after >= s_true - 1e-9).all())  # only ever pushes toward refusal
    assert torch.allclose(s_after[~below], s_true[~below], atol=1e-9)  # already past t*: untouched
    inside = (s_true > TAU + MARGIN) & (s_true < T_STAR)
    assert int(inside.sum()) > 10
    assert torch.allclose(s_after[inside], torch.full_like(s_after[inside], T_STAR), atol=1e-9)
    beyond = s_true >= T_STAR
    assert torch.equal(disp[beyond], torch.zeros_like(disp[beyond]))
    # the displacement is purely along r
    assert torch.allclose(
        _cos(disp[inside], r.expand_as(disp[inside])), torch.ones(int(inside.sum()), dtype=F64)
    )


def test_steering_inside_ramp_moves_fraction_w():
    mu_minus, r, _, _ = _steer_setup()
    s0 = TAU + 0.25 * MARGIN
    disp, _ = steer_displacement(mu_minus + s0 * r, mu_minus, r, TAU, T_STAR, margin=MARGIN)
    s_after = unsafety_score(mu_minus + s0 * r + disp, mu_minus, r)
    assert s_after.item() == pytest.approx(s0 + 0.25 * (T_STAR - s0), abs=1e-9)


def test_steer_displacement_all_layers_at_once():
    _, _, safe, unsafe = _planted()
    mu_minus = mean_activation(safe)
    r, _ = refusal_direction(mean_activation(unsafe), mu_minus)
    tau = torch.full((L,), 0.5, dtype=F64)  # [L]
    disp, s = steer_displacement(torch.cat([safe, unsafe]), mu_minus, r, tau, T_STAR)
    assert disp.shape == (2 * N, L, D) and s.shape == (2 * N, L)
    assert torch.equal(disp[:N], torch.zeros_like(disp[:N]))
    s_after = unsafety_score(unsafe + disp[N:], mu_minus, r)
    assert torch.allclose(s_after, torch.full_like(s_after, T_STAR), atol=1e-9)


# --- layer scores -----------------------------------------------------------------------


def test_auroc_matches_sklearn_with_ties():
    g = _gen(5)
    s_pos = (torch.randn(30, 3, generator=g, dtype=F64) + 0.5).round(decimals=1)  # ties
    s_neg = torch.randn(20, 3, generator=g, dtype=F64).round(decimals=1)
    ours = auroc(s_pos, s_neg)
    assert ours.shape == (3,)
    for layer in range(3):
        y = [1] * 30 + [0] * 20
        ref = roc_auc_score(y, torch.cat([s_pos[:, layer], s_neg[:, layer]]).numpy())
        assert ours[layer].item() == pytest.approx(ref, abs=1e-12)
    assert 0.5 < ours.mean().item() < 1.0


def test_auroc_one_layer_and_extremes():
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])).item() == 1.0
    assert auroc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])).item() == 0.0
    assert auroc(torch.tensor([1.0, 1.0]), torch.tensor([1.0])).item() == 0.5


def test_fisher_ratio_known_values():
    f = fisher_ratio(torch.tensor([[1.0, 1.0], [3.0, 1.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    assert f[0].item() == pytest.approx(4.0, rel=1e-9)
    assert f[1].item() == 0.0


def test_consistency_is_one_on_the_ray_and_lower_off_it():
    g = _gen(6)
    mu_minus = torch.randn(L, D, generator=g, dtype=F64)
    r = torch.randn(L, D, generator=g, dtype=F64)
    a = torch.rand(N, 1, 1, generator=g, dtype=F64) * 3 + 0.1
    on_ray = mu_minus + a * r  # [N, L, d]
    assert torch.allclose(consistency(on_ray, mu_minus, r), torch.ones(L, dtype=F64), atol=1e-12)
    assert torch.allclose(
        consistency(mu_minus - a * r, mu_minus, r), -torch.ones(L, dtype=F64), atol=1e-12
    )
    noisy = on_ray + 2.0 * torch.randn(N, L, D, generator=g, dtype=F64)
    c = consistency(noisy, mu_minus, r)
    assert bool((c < 0.95).all()) and bool((c > 0.0).all()), c


def test_split_half_cosine_planted_vs_noise():
    _, _, safe, unsafe = _planted()
    planted = split_half_cosine(unsafe, safe, seed=0)
    assert planted.shape == (L,)
    assert bool((planted > 0.98).all()), planted
    g = _gen(7)
    d_big = 64
    noise_u = torch.randn(N, L, d_big, generator=g, dtype=F64)
    noise_s = torch.randn(N, L, d_big, generator=g, dtype=F64)
    noise = split_half_cosine(noise_u, noise_s, seed=0)
    assert bool((noise.abs() < 0.5).all()), noise
    assert torch.equal(noise, split_half_cosine(noise_u, noise_s, seed=0))  # seeded
    assert not torch.equal(noise, split_half_cosine(noise_u, noise_s, seed=1))


def test_misalignment_drops_after_recentring():
    _, _, safe, unsafe = _planted()
    mu_minus = mean_activation(safe)
    r, _ = refusal_direction(mean_activation(unsafe), mu_minus)
    delta = 0.7 * r + 0.5  # offset with a strong component toward "refuse"
    with_media = safe + delta  # [N, L, d]
    before = misalignment(unsafety_score(with_media, mu_minus, r))
    after = misalignment(unsafety_score(recentre(with_media, delta), mu_minus, r))
    assert before.shape == (L,)
    assert bool((before > 0.5).all()), before
    assert torch.allclose(after, torch.zeros(L, dtype=F64), atol=1e-9)


def test_normalise_steerability():
    out = normalise_steerability(torch.tensor([2.0, 4.0, -1.0, 0.0]))
    assert torch.equal(out, torch.tensor([0.5, 1.0, 0.0, 0.0], dtype=F64))
    assert torch.equal(normalise_steerability(torch.tensor([-2.0, 0.0])), torch.zeros(2, dtype=F64))


def test_combined_score_clips_consistency():
    out = combined_score(torch.tensor([-0.5, 0.5, 1.0], dtype=F64), torch.tensor([1.0, 1.0, 0.5], dtype=F64))
    assert torch.allclose(out, torch.tensor([0.0, 0.5, 0.5], dtype=F64), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="same L"):
        combined_score(torch.ones(2), torch.ones(3))


def test_allowed_layer_range_follows_separability():
    # the real 0.5B backbone's held-out separability per layer (24 layers, bench/detectors.py)
    sep = torch.tensor([0.46, 0.40, 0.40, 0.45, 0.59, 0.61, 0.54, 0.50, 0.49, 0.53, 0.57, 0.57, 0.73, 0.72, 0.86,
                        0.91, 0.90, 0.90, 0.91, 0.92, 0.95, 0.97, 0.97, 0.97])
    assert allowed_layer_range(sep) == range(15, 24)  # >= 0.9 * 0.97: the layers 20-23 are no longer excluded
    assert allowed_layer_range(sep, min_frac=0.0) == range(24)
    assert allowed_layer_range(torch.tensor([0.3, math.nan, 0.9])) == range(2, 3)  # NaN never qualifies
    with pytest.raises(ValueError, match="min_frac"):
        allowed_layer_range(sep, min_frac=1.5)
    with pytest.raises(ValueError, match="empty"):
        allowed_layer_range(torch.zeros(0))


def test_choose_detect_layer_takes_the_earliest_near_best():
    assert choose_detect_layer(torch.tensor([0.5, 0.9, 0.97, 0.972, 0.95])) == 2  # 0.97 is within 0.005 of 0.972
    assert choose_detect_layer(torch.tensor([0.5, 0.9, 0.96, 0.972, 0.95])) == 3
    assert choose_detect_layer(torch.tensor([0.5, 0.9, 0.96, 0.972]), tol=0.02) == 2
    assert choose_detect_layer(torch.tensor([math.nan, 0.6, 0.5])) == 1


def test_choose_layer_respects_allowed_range():
    combined = torch.tensor([9.0, 0.2, 0.5, 0.1, 7.0, 0.3])
    assert choose_layer(combined) == 0
    assert choose_layer(combined, allowed=range(1, 4)) == 2
    assert choose_layer(combined, allowed=range(3, 6)) == 4
    assert choose_layer(torch.tensor([math.nan, 0.1, 0.3])) == 2
    with pytest.raises(ValueError, match="allowed"):
        choose_layer(combined, allowed=range(10, 12))


def test_layer_scores_round_trip():
    g = _gen(8)
    names = [
        "separability",
        "fisher",
        "consistency",
        "split_half",
        "steerability",
        "misalignment_before",
        "misalignment_after",
        "combined",
    ]
    values = {n: torch.rand(L, generator=g, dtype=F64) for n in names}
    ls = LayerScores(**values)
    d = ls.to_dict()
    assert set(d) == set(names)
    assert all(isinstance(v, list) and len(v) == L and isinstance(v[0], float) for v in d.values())
    back = LayerScores.from_dict(d)
    for n in names:
        assert torch.equal(getattr(back, n), values[n])
    assert back.num_layers == L
    with pytest.raises(ValueError, match="missing"):
        LayerScores.from_dict({k: v for k, v in d.items() if k != "fisher"})
    with pytest.raises(ValueError, match="same length"):
        LayerScores(**{**values, "fisher": torch.zeros(L + 1)})


# ---- mars_response: the one answer to "what does MARS do to this h" -------------------------------------------------


def _planted_axis(d: int = 6):
    g = torch.Generator().manual_seed(3)
    mu_minus = torch.randn(d, generator=g, dtype=torch.float64)
    r = torch.randn(d, generator=g, dtype=torch.float64)
    levels = torch.tensor([-1.0, TAU, TAU + MARGIN / 2, 1.0, T_STAR, T_STAR + 1])
    ortho = torch.randn(len(levels), d, generator=g, dtype=torch.float64)
    ortho -= (ortho @ r)[:, None] * r / (r @ r)  # no component along r: the score is exactly the level
    return mu_minus, r, mu_minus + levels[:, None] * r + ortho, levels


def test_mars_response_places_inputs_and_reports_the_push():
    mu_minus, r, h, levels = _planted_axis()
    out = R.mars_response(h, mu_minus, r, R.MarsRule(TAU, T_STAR, MARGIN))
    assert torch.allclose(out.score, levels.double())
    assert out.gate_open.tolist() == [False, False, True, True, True, True]
    assert torch.equal(out.displacement[:2], torch.zeros(2, h.shape[1], dtype=h.dtype))  # gate closed: exactly 0
    after = R.unsafety_score(h + out.displacement, mu_minus, r)
    assert after[3] == pytest.approx(T_STAR)  # fully open gate inside the trust region: lands on t*
    assert torch.allclose(out.planned_norm, out.push * r.norm())
    disp, s = R.steer_displacement(h, mu_minus, r, TAU, T_STAR, margin=MARGIN)
    assert torch.equal(disp, out.displacement) and torch.equal(s, out.score)


def test_mars_response_strength_mode_and_steer_off():
    mu_minus, r, h, _ = _planted_axis()
    full = R.mars_response(h, mu_minus, r, R.MarsRule(TAU, T_STAR, MARGIN))
    half = R.mars_response(h, mu_minus, r, R.MarsRule(TAU, T_STAR, MARGIN, strength=0.5))
    assert torch.allclose(half.displacement, 0.5 * full.displacement)
    ungated = R.mars_response(h, mu_minus, r, R.MarsRule(TAU, T_STAR, MARGIN, gated=False))
    assert torch.allclose(R.unsafety_score(h + ungated.displacement, mu_minus, r)[:4], torch.full((4,), T_STAR,
                                                                                                  dtype=torch.float64))
    off = R.mars_response(h, mu_minus, r, R.MarsRule(TAU, T_STAR, MARGIN, steer=False))
    assert torch.equal(off.displacement, torch.zeros_like(h)) and torch.equal(off.planned_norm, full.planned_norm)


def test_response_curve_matches_mars_response_on_real_vectors():
    mu_minus, r, h, levels = _planted_axis()
    rule = R.MarsRule(TAU, T_STAR, MARGIN, strength=0.7)
    curve = R.response_curve(levels, rule)
    out = R.mars_response(h, mu_minus, r, rule)
    assert torch.allclose(curve.push, out.push) and torch.equal(curve.gate_open, out.gate_open)


def test_mars_rule_rejects_bad_controls():
    for bad in (dict(strength=-1.0), dict(margin=0.0), dict(tau=float("nan"))):
        with pytest.raises(ValueError):
            R.MarsRule(**{"tau": TAU, "t_star": T_STAR, **bad})
