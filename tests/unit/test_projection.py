"""Projection boundary: PCA / UMAP embeddings and the r_hat x top-PC plane, on planted geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mars_viz.core import projection as P
from mars_viz.core.projection import Projection, project

D = 32
N_PER = 40


@pytest.fixture(scope="module")
def clusters():
    """Two Gaussian clusters in d=32, separated by 10 along a known unit axis (noise std 0.5 per dim)."""
    rng = np.random.default_rng(0)
    axis = rng.normal(size=D)
    axis /= np.linalg.norm(axis)
    mu_minus = rng.normal(size=D)
    mu_plus = mu_minus + 10.0 * axis
    safe = mu_minus + 0.5 * rng.normal(size=(N_PER, D))
    unsafe = mu_plus + 0.5 * rng.normal(size=(N_PER, D))
    points = np.vstack([safe, unsafe])  # [80, 32]
    labels = np.array([0] * N_PER + [1] * N_PER)
    return points, labels, axis, mu_minus, mu_plus


def test_pca_first_component_separates_clusters(clusters):
    points, labels, axis, *_ = clusters
    proj = project(points, "pca")
    assert isinstance(proj, Projection)
    assert proj.method == "pca"
    assert proj.coords.shape == (2 * N_PER, 2)
    assert proj.coords.dtype == np.float64
    pc1 = proj.coords[:, 0]
    a, b = pc1[labels == 0], pc1[labels == 1]
    # perfectly separated along PC1, and by roughly the planted distance 10
    assert max(a.max(), b.max()) > 0 and (a.max() < b.min() or b.max() < a.min())
    assert abs(abs(a.mean() - b.mean()) - 10.0) < 0.5
    # the fitted component is the planted axis
    assert abs(float(proj._model.components_[0] @ axis)) > 0.99
    # PC1 explains the between-cluster variance 5^2 of the total 5^2 + 32 * 0.5^2 (noise)
    assert proj.explained is not None and len(proj.explained) == 2
    assert abs(proj.explained[0] - 25 / 33) < 0.03 and proj.explained[1] < 0.05


def test_pca_transform_reproduces_coords_and_accepts_torch(clusters):
    points, *_ = clusters
    proj = project(torch.tensor(points, dtype=torch.float32), "pca")
    assert np.allclose(proj.transform(torch.tensor(points, dtype=torch.float32)), proj.coords, atol=1e-5)
    proj64 = project(points, "PCA")
    assert np.allclose(proj64.transform(points), proj64.coords, atol=1e-10)
    # one [d] vector -> [1, 2]; bf16 tensors are accepted
    one = proj64.transform(points[3])
    assert one.shape == (1, 2) and np.allclose(one[0], proj64.coords[3], atol=1e-10)
    assert proj64.transform(torch.tensor(points[:2]).to(torch.bfloat16)).shape == (2, 2)
    # the projected centroid is the centroid of the projected points (PCA is affine)
    assert np.allclose(proj64.transform(points.mean(axis=0))[0], proj64.coords.mean(axis=0), atol=1e-10)


def test_pca_is_deterministic(clusters):
    points, *_ = clusters
    assert np.array_equal(project(points, seed=3).coords, project(points, seed=3).coords)


def test_transform_rejects_wrong_width(clusters):
    points, *_ = clusters
    proj = project(points)
    with pytest.raises(ValueError, match="32"):
        proj.transform(np.zeros((2, D + 1)))


@pytest.mark.parametrize(
    ("points", "kwargs", "match"),
    [
        (np.zeros((2, 5)), {}, "at least 3 points"),
        (np.ones((5, 4)), {"method": "tsne"}, "unknown projection method"),
        (np.ones((5,)), {}, r"\[N, d\]"),
        (np.ones((5, 3, 4)), {}, "select one layer"),
        (np.full((5, 4), np.nan), {}, "NaN"),
        (np.ones((5, 1)), {}, "d >= 2"),
    ],
)
def test_project_value_errors(points, kwargs, match):
    with pytest.raises(ValueError, match=match):
        project(points, **kwargs)


@pytest.fixture(scope="module")
def umap_proj(clusters):
    """The single UMAP fit of the suite (its first call JIT-compiles for ~20 s)."""
    points, *_ = clusters
    return project(points, "umap", seed=0, n_neighbors=500)  # n_neighbors capped at N - 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_umap_coords_and_transform(umap_proj, clusters):
    points, labels, *_ = clusters
    assert umap_proj.method == "umap"
    assert umap_proj.explained is None
    assert umap_proj.coords.shape == (2 * N_PER, 2)
    assert np.isfinite(umap_proj.coords).all()
    assert umap_proj._model.n_neighbors == 2 * N_PER - 1
    new = umap_proj.transform(points[:3] + 0.01)
    assert new.shape == (3, 2) and np.isfinite(new).all()
    # well-separated clusters stay separated: each cluster's centre is far from the other's
    ca = umap_proj.coords[labels == 0].mean(axis=0)
    cb = umap_proj.coords[labels == 1].mean(axis=0)
    spread = umap_proj.coords[labels == 0].std(axis=0).max()
    assert np.linalg.norm(ca - cb) > 2 * spread


# ---------------------------------------------------------------------------
# axis plane
# ---------------------------------------------------------------------------


def test_plane_basis_is_unit_orthogonal_and_finds_planted_spread():
    g = torch.Generator().manual_seed(7)
    n, d = 64, 16
    r = torch.zeros(1, d, dtype=torch.float64)
    r[0, 0] = 2.0
    mu_minus = torch.zeros(1, d, dtype=torch.float64)
    acts = torch.randn(n, 1, d, generator=g, dtype=torch.float64) * 0.05
    acts[:, 0, 3] += torch.randn(n, generator=g, dtype=torch.float64) * 3.0  # planted spread along axis 3
    acts[:, 0, 0] += torch.randn(n, generator=g, dtype=torch.float64) * 5.0  # along r: must be ignored
    pc = P.plane_basis(acts, mu_minus, r)[0].double()
    assert abs(float(pc.norm()) - 1.0) < 1e-5 and abs(float(pc @ r[0])) < 1e-5
    assert abs(float(pc[3])) > 0.99


def test_pca_basis_and_projection_recover_planted_axis():
    g = torch.Generator().manual_seed(8)
    acts = torch.randn(50, 2, 8, generator=g) * 0.01
    acts[:, :, 5] += torch.linspace(-3, 3, 50)[:, None]
    mean, basis = P.pca_basis(acts)
    assert mean.shape == (2, 8) and basis.shape == (2, 2, 8)
    assert float(basis[0, 0, 5].abs()) > 0.99 and float(basis[1, 0, 5].abs()) > 0.99
    coords = P.project_onto(acts[:, 0], mean[0], basis[0])  # [N, 2]
    assert torch.allclose(coords[:, 0].abs(), (acts[:, 0, 5] - mean[0, 5]).abs(), atol=0.05)
