"""`MarsState`: everything a calibration fitted, saved as safetensors + a JSON sidecar (never pickle).

Example:
    >>> state.save("runs/qwen2vl")                      # doctest: +SKIP
    >>> state = MarsState.load("runs/qwen2vl")          # doctest: +SKIP
    >>> state.check_compatible(backbone)                # ValueError if fitted on another model   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .geometry import LayerScores

__all__ = ["FORMAT_VERSION", "MarsConfig", "MarsState", "STATE_JSON", "STATE_TENSORS"]

FORMAT_VERSION = 1
STATE_TENSORS = "mars_state.safetensors"
STATE_JSON = "mars_state.json"


@dataclass(frozen=True)
class MarsConfig:
    """Formulation and calibration parameters (DESIGN.md 'Definitions'); every one is recorded in the state."""

    seed: int = 0
    heldout_frac: float = 0.3
    max_prompts: int | None = 128  # per set (harmful / harmless), after loading; None = all
    behaviour_filter: bool = True
    filter_tokens: int = 12  # greedy tokens to judge refusal in the behaviour filter and the target curve
    min_refused: int = 8  # fewer refused harmful fit prompts -> fall back to all of them
    k_neutral: int = 16  # random solid-colour neutral images (and videos)
    neutral_prompts: int = 32  # safe fit prompts paired with neutral inputs (cycling through the K colours)
    neutral_video_frames: int = 4
    neutral_size: int = 224
    margin: float = 0.1  # ReLU gate ramp m
    levels: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
    level_tol: float = 0.05
    curve_prompts: int = 32  # held-out harmless prompts steered per level for t*
    steer_prompts: int = 16  # held-out harmless prompts for steerability
    skip_first: float = 0.1
    skip_last: float = 0.2
    layer: int | None = None  # override the chosen layer
    tau: float | None = None  # override the gate threshold
    batch_size: int = 8

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["levels"] = list(self.levels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MarsConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "levels" in known:
            known["levels"] = tuple(float(x) for x in known["levels"])
        return cls(**known)


@dataclass
class MarsState:
    """Fitted MARS quantities. Per-layer tensors are float64 `[L, d]` or `[L]`."""

    model_id: str
    model_type: str
    num_layers: int
    hidden_size: int
    mu_plus: torch.Tensor  # [L, d] unsafe centroid
    mu_minus: torch.Tensor  # [L, d] safe centroid
    spread_unsafe: torch.Tensor  # [L] std of s over the unsafe fit set
    spread_safe: torch.Tensor  # [L] std of s over the safe fit set
    offsets: dict[str, torch.Tensor]  # modality -> [L, d] modality offset delta_m
    taus: torch.Tensor  # [L] balanced-accuracy thresholds
    layer: int  # chosen intervention layer
    target_level: float  # t*
    target_curve: dict[float, float]  # level -> refusal rate of held-out harmless text at `layer`
    layer_scores: LayerScores
    config: MarsConfig
    refusal_opening: str = ""
    behaviour: dict[str, Any] = field(default_factory=dict)  # behaviour-filter counts and notes
    prompt_hashes: dict[str, str] = field(default_factory=dict)
    calib_points: torch.Tensor | None = None  # [N, d] float32 activations at `layer`, for plots
    calib_labels: list[str] = field(default_factory=list)  # per calib point: unsafe / safe / image / video
    proj_mean: torch.Tensor | None = None  # [L, d] per-layer PCA centre of the calibration points
    proj_basis: torch.Tensor | None = None  # [L, 2, d] per-layer top-2 PCA directions
    proj_points: torch.Tensor | None = None  # [N, L, 2] calibration points in that PCA plane
    plane_pc: torch.Tensor | None = None  # [L, d] top PC of residuals orthogonal to r (trust-region plane)
    plane_points: torch.Tensor | None = None  # [N, L, 2] calibration points in (score along r_hat, plane PC) coords
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- derived --------------------------------------------------------------------------------------------------
    @property
    def r(self) -> torch.Tensor:
        """Refusal directions `[L, d]` (mu_plus - mu_minus)."""
        return self.mu_plus - self.mu_minus

    @property
    def r_norm(self) -> torch.Tensor:
        return self.r.norm(dim=-1)

    @property
    def tau(self) -> float:
        """Gate threshold at the chosen layer (the config override wins)."""
        return float(self.config.tau) if self.config.tau is not None else float(self.taus[self.layer])

    def fingerprint(self) -> str:
        """A short hash of what steers (model identity, centroids, offsets, thresholds, layers, t*).

        Results computed with one state carry it, so a result from another model or state is recognised instead of
        being re-scored against whatever is loaded now.
        """
        h = hashlib.sha256(json.dumps([self.model_id, self.model_type, self.num_layers, self.hidden_size, self.layer,
                                       self.tau, self.target_level, sorted(self.offsets)]).encode())
        for t in (self.mu_plus, self.mu_minus, self.taus, *(self.offsets[m] for m in sorted(self.offsets))):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def offset(self, modality: str, layer: int | None = None) -> torch.Tensor | None:
        """delta for `modality` at `layer` (`[d]`), or None for text."""
        if modality == "text":
            return None
        if modality not in self.offsets:
            raise ValueError(f"this state has no {modality} offset (fitted modalities: {sorted(self.offsets)}): "
                             "refit with neutral inputs of that modality")
        return self.offsets[modality][self.layer if layer is None else layer]

    def plane_coords(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """`h [..., d]` -> `[..., 2]`: (unsafety score along r_hat, coordinate along the plane PC in units of ||r||)."""
        if self.plane_pc is None:
            raise ValueError("this state has no trust-region plane (fitted by an older version): refit it")
        mu, r = self.mu_minus[layer].double(), self.r[layer].double()
        x = torch.as_tensor(h).double() - mu
        r2 = float((r * r).sum())
        return torch.stack([(x @ r) / r2, (x @ self.plane_pc[layer].double()) / r2 ** 0.5], dim=-1).float()

    def check_compatible(self, backbone) -> None:
        """Raise ValueError unless this state was fitted on a model of the same type and shape as `backbone`."""
        ours = (self.model_type, self.num_layers, self.hidden_size)
        theirs = (backbone.model_type, backbone.num_layers, backbone.hidden_size)
        if ours != theirs:
            raise ValueError(
                f"this MARS state was fitted on {self.model_id!r} ({self.model_type}, {self.num_layers} layers, "
                f"hidden size {self.hidden_size}) but the loaded model is {backbone.model_id!r} "
                f"({backbone.model_type}, {backbone.num_layers} layers, hidden size {backbone.hidden_size}): "
                f"fit a state for it with: python -m mars_viz fit --model {backbone.model_id} --out DIR")

    # ---- persistence ----------------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {"mu_plus": self.mu_plus, "mu_minus": self.mu_minus, "spread_unsafe": self.spread_unsafe,
                   "spread_safe": self.spread_safe, "taus": self.taus}
        tensors.update({f"offset.{m}": t for m, t in self.offsets.items()})
        for name in ("calib_points", "proj_mean", "proj_basis", "proj_points", "plane_pc", "plane_points"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(d / STATE_TENSORS))
        meta = {
            "format_version": FORMAT_VERSION,
            "model": self.model_id, "model_type": self.model_type, "num_layers": self.num_layers,
            "hidden_size": self.hidden_size, "layer": self.layer, "tau": self.tau,
            "target_level": self.target_level,
            "target_curve": {_level_key(k): v for k, v in self.target_curve.items()},
            "layer_scores": self.layer_scores.to_dict(),
            "r_norm": [float(x) for x in self.r_norm],
            "taus": [float(x) for x in self.taus],
            "refusal_opening": self.refusal_opening, "behaviour": self.behaviour,
            "prompt_hashes": self.prompt_hashes, "config": self.config.to_dict(),
            "modalities": sorted(self.offsets), "calib_labels": self.calib_labels, "extra": self.extra,
        }
        (d / STATE_JSON).write_text(json.dumps(meta, indent=2, allow_nan=True))
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> MarsState:
        d = Path(directory)
        if d.is_file():
            d = d.parent
        jp, tp = d / STATE_JSON, d / STATE_TENSORS
        if not jp.exists() or not tp.exists():
            raise ValueError(f"no MARS state in {str(d)!r}: expected {STATE_JSON} and {STATE_TENSORS} "
                             "(create them with: python -m mars_viz fit --model M --out DIR)")
        try:
            meta = json.loads(jp.read_text())
            tensors = load_file(str(tp))
        except Exception as e:  # JSONDecodeError, SafetensorError
            raise ValueError(f"the MARS state in {str(d)!r} is corrupt ({type(e).__name__}: {e})") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"state format {meta.get('format_version')} is not supported (expected "
                             f"{FORMAT_VERSION}): refit it")
        try:
            state = cls(
                model_id=meta["model"], model_type=meta["model_type"], num_layers=int(meta["num_layers"]),
                hidden_size=int(meta["hidden_size"]), mu_plus=tensors["mu_plus"], mu_minus=tensors["mu_minus"],
                spread_unsafe=tensors["spread_unsafe"], spread_safe=tensors["spread_safe"],
                offsets={k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("offset.")},
                taus=tensors["taus"], layer=int(meta["layer"]), target_level=float(meta["target_level"]),
                target_curve={float(k): float(v) for k, v in meta["target_curve"].items()},
                layer_scores=LayerScores.from_dict(meta["layer_scores"]),
                config=MarsConfig.from_dict(meta.get("config", {})),
                refusal_opening=meta.get("refusal_opening", ""), behaviour=meta.get("behaviour", {}),
                prompt_hashes=meta.get("prompt_hashes", {}), calib_points=tensors.get("calib_points"),
                proj_mean=tensors.get("proj_mean"), proj_basis=tensors.get("proj_basis"),
                proj_points=tensors.get("proj_points"), plane_pc=tensors.get("plane_pc"),
                plane_points=tensors.get("plane_points"),
                calib_labels=list(meta.get("calib_labels", [])), extra=meta.get("extra", {}))
        except KeyError as e:
            raise ValueError(f"the MARS state in {str(d)!r} is missing {e}: refit it") from None
        shape = (state.num_layers, state.hidden_size)
        if tuple(state.mu_plus.shape) != shape or tuple(state.mu_minus.shape) != shape:
            raise ValueError(f"the MARS state in {str(d)!r} is inconsistent: centroids {tuple(state.mu_plus.shape)} "
                             f"vs num_layers x hidden_size {shape}")
        return state

    def with_overrides(self, *, layer: int | None = None, tau: float | None = None) -> MarsState:
        """A copy with the chosen layer and/or gate threshold overridden (the fitted values are kept)."""
        import copy

        new = copy.copy(self)
        if layer is not None:
            if not -self.num_layers <= layer < self.num_layers:
                raise ValueError(f"layer {layer} is out of range: the model has {self.num_layers} layers (0.."
                                 f"{self.num_layers - 1})")
            new.layer = layer % self.num_layers
        if tau is not None:
            if not math.isfinite(tau):
                raise ValueError("tau must be a finite number")
            new.config = MarsConfig.from_dict({**self.config.to_dict(), "tau": float(tau)})
        return new


def _level_key(level: float) -> str:
    return f"{level:g}"
