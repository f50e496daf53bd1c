"""2-D views of residual-stream activations: PCA / UMAP, and the refusal-axis plane.

This module is the single boundary to numpy / scikit-learn / umap-learn: it
takes torch tensors or numpy arrays ``[N, d]`` and returns numpy ``[N, 2]``
coordinates that the plot builders (``mars_viz.views.figures``) draw. No model, no
gradio.

Two kinds of view:

- ``project`` fits an unsupervised embedding (PCA, or UMAP) of the calibration
  points; the returned ``Projection`` keeps the fitted model so the current
  input (raw / re-centred / steered) lands in the same picture via
  ``Projection.transform``.
- ``pca_basis`` / ``project_onto`` are the same PCA in torch, per layer, fitted once at calibration and stored
  in the state so the layer inspector needs no refit.
- ``plane_basis`` / ``plane_coords`` give the supervised view MARS reasons in: x is the unsafety
  score ``s`` (0 at the safe centroid, 1 at the unsafe one), y is the main
  direction of variation orthogonal to the refusal axis. Gate threshold and
  trust region are vertical lines in it.

Example:
    >>> import numpy as np
    >>> pts = np.random.default_rng(0).normal(size=(20, 8))
    >>> proj = project(pts, "pca")
    >>> proj.coords.shape, proj.transform(pts[:3]).shape
    ((20, 2), (3, 2))
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from . import rule as R

__all__ = ["Projection", "pca_basis", "plane_basis", "plane_coords", "project", "project_onto"]

METHODS = ("pca", "umap")


def _as_f64(x: Any, name: str) -> np.ndarray:
    """``x`` (torch tensor of any dtype incl. bf16, numpy array, nested lists) as a float64 numpy array."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a numeric array or tensor, got {type(x).__name__} ({e})") from None


def _as_points(x: Any, name: str, allow_vector: bool = False) -> np.ndarray:
    """Validate and return ``[N, d]`` float64 points (a single ``[d]`` vector becomes ``[1, d]`` if allowed)."""
    arr = _as_f64(x, name)
    if allow_vector and arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        shape = "[N, d] (or [d] for one point)" if allow_vector else "[N, d]"
        raise ValueError(
            f"{name} must have shape {shape}, got {tuple(arr.shape)}; for activations [N, L, d] "
            "select one layer first, e.g. acts[:, layer]"
        )
    if not np.isfinite(arr).all():
        raise ValueError(
            f"{name} contains NaN or inf values; check the activations that produced it "
            "(e.g. a model run in fp16 that overflowed: use bf16 or fp32)"
        )
    return arr


@dataclass
class Projection:
    """A fitted 2-D embedding of ``N`` points, able to place new points in the same picture.

    ``coords`` are the embedded training points ``[N, 2]``; ``explained`` is
    PCA's explained-variance ratio per component (``None`` for UMAP). PCA's
    ``transform`` of the training points reproduces ``coords``; UMAP's places
    new points by their neighbours (approximate, not exact).

    >>> import numpy as np
    >>> proj = project(np.eye(4), "pca")
    >>> proj.method, proj.coords.shape, len(proj.explained)
    ('pca', (4, 2), 2)
    """

    method: str
    coords: np.ndarray  # [N, 2] float64
    explained: list[float] | None
    _model: Any = field(default=None, repr=False)  # fitted sklearn PCA / umap.UMAP
    _dim: int = field(default=0, repr=False)  # d of the fitted points

    def transform(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Embed new points ``[M, d]`` (or one ``[d]``) into the fitted 2-D space -> ``[M, 2]`` float64."""
        if self._model is None:
            raise ValueError("this Projection has no fitted model: build it with mars_viz.core.projection.project(...)")
        pts = _as_points(x, "x", allow_vector=True)  # [M, d]
        if pts.shape[1] != self._dim:
            raise ValueError(
                f"x has {pts.shape[1]} features but the projection was fitted on {self._dim}: "
                "pass activations of the same model and layer as the fitted points"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self._model.transform(pts)
        return np.asarray(out, dtype=np.float64)  # [M, 2]


def project(
    points: np.ndarray | torch.Tensor,
    method: Literal["pca", "umap"] = "pca",
    seed: int = 0,
    n_neighbors: int = 15,
) -> Projection:
    """Fit a 2-D PCA or UMAP embedding of ``points`` ``[N, d]`` (N >= 3).

    PCA is linear, so centroids and the refusal axis project faithfully (the
    projected centroid is the centroid of the projected points) and it is
    instant; UMAP shows cluster structure PCA can hide but distorts distances
    and takes ~20 s on its first call (numba JIT). ``n_neighbors`` (UMAP only)
    is capped at ``N - 1``; ``seed`` makes both deterministic.

    >>> import numpy as np
    >>> project(np.random.default_rng(0).normal(size=(10, 5))).coords.shape
    (10, 2)
    """
    pts = _as_points(points, "points")  # [N, d]
    n, d = pts.shape
    key = str(method).lower()
    if key not in METHODS:
        raise ValueError(f"unknown projection method {method!r}: use one of {list(METHODS)}")
    if n < 3:
        raise ValueError(
            f"a 2-D projection needs at least 3 points, got {n}: calibrate with more prompts "
            "(or keep more calibration points in the state)"
        )
    if d < 2:
        raise ValueError(f"points have {d} feature(s): a 2-D projection needs d >= 2")
    if key == "pca":
        from sklearn.decomposition import PCA

        model = PCA(n_components=2, random_state=seed)
        coords = model.fit_transform(pts)
        explained = [float(v) for v in model.explained_variance_ratio_]
    else:
        import umap

        if n_neighbors < 2:
            raise ValueError(f"n_neighbors must be >= 2 for UMAP, got {n_neighbors}")
        model = umap.UMAP(n_components=2, n_neighbors=min(int(n_neighbors), n - 1), random_state=seed)
        with warnings.catch_warnings():
            # "n_jobs overridden to 1 by setting random_state", spectral-init fallbacks on tiny sets
            warnings.simplefilter("ignore")
            coords = model.fit_transform(pts)
        explained = None
    return Projection(method=key, coords=np.asarray(coords, dtype=np.float64), explained=explained,
                      _model=model, _dim=d)


# ---------------------------------------------------------------------------
# the refusal-axis plane
# ---------------------------------------------------------------------------


# ---- per-layer bases in torch (fitted at calibration, stored in the state) -----------------------------------

def pca_basis(acts: Tensor) -> tuple[Tensor, Tensor]:
    """Per-layer 2-D PCA of a point cloud: ``acts [N, L, d]`` -> ``(mean [L, d], basis [L, 2, d])`` (float32).

    >>> x = torch.zeros(4, 1, 3); x[:, 0, 0] = torch.tensor([-2., -1., 1., 2.])
    >>> _, b = pca_basis(x); float(b[0, 0, 0].abs())
    1.0
    """
    a = torch.as_tensor(acts).double()
    if a.dim() != 3 or a.shape[0] < 2:
        raise ValueError(f"pca_basis needs [N>=2, L, d] activations, got {tuple(a.shape)}")
    mean = a.mean(0)  # [L, d]
    x = (a - mean).transpose(0, 1)  # [L, N, d]
    _, _, vh = torch.linalg.svd(x, full_matrices=False)  # vh [L, min(N,d), d]
    basis = vh[:, :2, :]
    if basis.shape[1] < 2:  # d == 1: pad with zeros
        basis = torch.cat([basis, torch.zeros_like(basis)], dim=1)
    return mean.float(), basis.float()


def plane_basis(acts: Tensor, mu_minus: Tensor, r: Tensor) -> Tensor:
    """Per layer, the top principal direction of ``h - mu_minus`` after removing its ``r_hat`` component.

    Together with ``r_hat`` it spans the "trust-region plane" the dashboard draws. ``acts [N, L, d]``,
    ``mu_minus, r [L, d]`` -> unit vectors ``[L, d]`` orthogonal to ``r`` (float32).
    """
    a = torch.as_tensor(acts).double()
    r64 = torch.as_tensor(r).double()
    r_hat = r64 / R._norm_nonzero(r64)[..., None]  # [L, d]
    x = a - torch.as_tensor(mu_minus).double()  # [N, L, d]
    x = x - (x * r_hat).sum(-1, keepdim=True) * r_hat
    x = (x - x.mean(0)).transpose(0, 1)  # [L, N, d]
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    return vh[:, 0, :].float()


def project_onto(h: Tensor, mean: Tensor, basis: Tensor) -> Tensor:
    """Coordinates of ``h [..., d]`` in a 2-D basis ``[2, d]`` around ``mean [d]`` -> ``[..., 2]``."""
    return (torch.as_tensor(h).float() - mean.float()) @ basis.float().T


def plane_coords(h: torch.Tensor, mu_minus: torch.Tensor, r: torch.Tensor, plane_pc: torch.Tensor) -> torch.Tensor:
    """``h [..., d]`` -> ``[..., 2]`` in the trust-region plane: (unsafety score along r_hat, coordinate along
    ``plane_pc`` in units of ``||r||``), one layer (``mu_minus, r, plane_pc [d]``); float32.

    >>> plane_coords(torch.tensor([2.0, 3.0]), torch.zeros(2), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    tensor([2., 3.])
    """
    x = torch.as_tensor(h).double() - torch.as_tensor(mu_minus).double()
    r = torch.as_tensor(r).double()
    score = R.unsafety_score(x, torch.zeros_like(r), r)
    return torch.stack([score, (x @ torch.as_tensor(plane_pc).double()) / r.norm()], dim=-1).float()
