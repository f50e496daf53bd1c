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
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .migrate import FORMAT_VERSION, migrate
from .selection import LayerScores

__all__ = ["FORMAT_VERSION", "Diagnostics", "GateAxis", "MarsConfig", "MarsState", "STATE_JSON", "STATE_TENSORS"]

STATE_TENSORS = "mars_state.safetensors"
STATE_JSON = "mars_state.json"


@dataclass(frozen=True)
class MarsConfig:
    """Formulation and calibration parameters (README, "The formulation"); every one is recorded in the state.

    Only how to fit: what a fit chooses (push layer, the gate's layer and position, tau) is the state's
    (`MarsState.layer`, `detect_layer`, `gate_position`, `tau_override`; forced at fit time by `calibrate`'s
    `FitChoices`), and run-time overrides are `SteerOptions`.
    """

    seed: int = 0
    heldout_frac: float = 0.3
    max_prompts: int | None = 128  # per set (harmful / harmless), after loading; None = all
    behaviour_filter: bool = True
    filter_tokens: int = 12  # greedy tokens to judge refusal in the behaviour filter and the target curve
    min_refused: int = 8  # fewer refused harmful fit prompts -> fall back to all of them
    k_neutral: int = 16  # random solid-colour neutral images (and videos)
    neutral_prompts: int = 32  # safe fit prompts paired with neutral inputs (cycling through the K colours)
    neutral_video_frames: int = 4
    map_neutral: int = 8  # neutral inputs per modality for the maps' per-position offsets (0: none)
    neutral_size: int = 224
    margin: float = 0.1  # ReLU gate ramp m
    levels: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
    level_tol: float = 0.05
    curve_prompts: int = 32  # held-out harmless prompts steered per level for t*
    steer_prompts: int = 16  # held-out harmless prompts for steerability
    min_sep_frac: float = 0.9  # push layers: from the first whose separability reaches this share of the best
    lookalike: bool = True  # a fit split of look-alike prompts joins the safe side (harmless_lookalike.txt)
    lookalike_frac: float = 0.5  # share of the look-alikes held out for evaluation
    surface_check: bool = True  # the gate's site must decide the same under surface changes of held-out prompts
    min_surface_agreement: float = 0.95  # ... for at least this share of them, per change
    batch_size: int = 8  # prompts per forward of the activation steps and steerability (costs grow with rows)
    # rows per batch of the fit's greedy generations (behaviour filter, target curve): a decode step cost about the
    # same for 2 to 16 rows (0.32 s) and 1.3x that for 32 on the 0.5B LLaVA graft on 2 CPU cores, so more rows per
    # batch means fewer steps; rows leave the batch as their verdicts settle
    generate_batch_size: int = 32

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["levels"] = list(self.levels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MarsConfig:
        """The config `to_dict` wrote (keys it lacks take their defaults; an unknown key is an error)."""
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown MarsConfig keys {unknown}")
        known = dict(d)
        if "levels" in known:
            known["levels"] = tuple(float(x) for x in known["levels"])
        return cls(**known)


@dataclass
class Diagnostics:
    """What calibration measured that is only plotted or reported. Nothing here changes what MARS does to an input.

    Per-layer tensors are `[L]` (or `[L, d]`, `[N, L, 2]` as noted); lists are per layer too.
    """

    layer_scores: LayerScores
    target_curve: dict[float, float]  # level -> refusal rate of held-out harmless text steered there at `layer`
    spread_unsafe: torch.Tensor  # [L] std of s over the unsafe fit set
    spread_safe: torch.Tensor  # [L] std of s over the safe fit set
    balanced_accuracy: list[float] = field(default_factory=list)  # [L] of the gate threshold on held-out text
    gate_fpr: list[float] = field(default_factory=list)  # [L] gate opens on held-out harmless text (at taus[l])
    gate_fnr: list[float] = field(default_factory=list)  # [L] gate stays closed on held-out harmful text
    steerability_gain_nats: list[float] = field(default_factory=list)  # [L] raw gains behind `steerability`
    allowed_layers: tuple[int, int] | None = None  # [start, stop) of the layer range the choice was made in
    misalignment_video_before: list[float] | None = None  # [L] like layer_scores.misalignment_*, for video
    misalignment_video_after: list[float] | None = None
    refusal_opening: str = ""  # the model's own most frequent refusal opening (steerability target)
    behaviour: dict[str, Any] = field(default_factory=dict)  # behaviour-filter counts and notes
    prompt_hashes: dict[str, str] = field(default_factory=dict)
    calib_points: torch.Tensor | None = None  # [N, d] float32 activations at `layer`, for UMAP
    calib_labels: list[str] = field(default_factory=list)  # per calib point: unsafe / safe / image / video
    proj_mean: torch.Tensor | None = None  # [L, d] per-layer PCA centre of the calibration points
    proj_basis: torch.Tensor | None = None  # [L, 2, d] per-layer top-2 PCA directions
    proj_points: torch.Tensor | None = None  # [N, L, 2] calibration points in that PCA plane
    plane_pc: torch.Tensor | None = None  # [L, d] top PC of residuals orthogonal to r (trust-region plane)
    plane_points: torch.Tensor | None = None  # [N, L, 2] calibration points in (score along r_hat, plane PC) coords
    # "Where in the input" maps (`maps.offsets.neutral_position_offsets`): per-position offsets at `map_layer`
    # measured on the neutral inputs, minus mu_minus there. States fitted before the maps have none (the maps say so).
    map_layer: int | None = None
    map_position: str = "post"  # the gate position the per-position offsets were measured for (its mu_minus)
    map_cells: dict[str, torch.Tensor] = field(default_factory=dict)  # "image.patches" -> [rows, cols, d] per cell
    map_tokens: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> [d] over all its media tokens
    # The gate's position (`calibrate._choose_gate`): per position, per layer, held-out detection and false-positive
    # rates and the quality the choice maximised; {} for states fitted before positions existed.
    gate_choice: dict[str, Any] = field(default_factory=dict)
    # The harmfulness x refusal plane: per calibration prompt (harmful, harmless, look-alike and jailbreak text),
    # x = harmfulness score at t_inst (the inst axis at its layer), y = refusal score at t_post (the push layer).
    hr_points: torch.Tensor | None = None  # [N, 2]
    hr_labels: list[str] = field(default_factory=list)
    fit_seconds: dict[str, float] = field(default_factory=dict)  # wall time of each fit step, in the fit's order

    _TENSORS = ("spread_unsafe", "spread_safe", "calib_points", "proj_mean", "proj_basis", "proj_points", "plane_pc",
                "plane_points", "hr_points")
    _JSON = ("balanced_accuracy", "gate_fpr", "gate_fnr", "steerability_gain_nats", "allowed_layers",
             "misalignment_video_before", "misalignment_video_after", "map_layer", "gate_choice", "hr_labels",
             "map_position", "fit_seconds")

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {n: getattr(self, n) for n in self._TENSORS if getattr(self, n) is not None}
        out.update({f"map_cells.{k}": v for k, v in self.map_cells.items()})
        out.update({f"map_tokens.{k}": v for k, v in self.map_tokens.items()})
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Diagnostics):
            return NotImplemented
        return _fields_equal(self, other)


@dataclass
class GateAxis:
    """What the gate reads at one prompt position ("post" or "inst", `inputs.GATE_POSITIONS`): the centroids,
    thresholds and modality offsets of every layer there, and the layer it reads by default. Tensors are float64."""

    position: str
    mu_plus: torch.Tensor  # [L, d]
    mu_minus: torch.Tensor  # [L, d]
    taus: torch.Tensor  # [L]
    offsets: dict[str, torch.Tensor]  # modality -> [L, d]
    detect_layer: int

    @property
    def r(self) -> torch.Tensor:
        return self.mu_plus - self.mu_minus

    def offset(self, modality: str, layer: int) -> torch.Tensor | None:
        """delta for `modality` at `layer` (`[d]`) at this position, or None for text."""
        if modality == "text":
            return None
        if modality not in self.offsets:
            raise ValueError(f"this state has no {modality} offset (fitted modalities: {sorted(self.offsets)}): "
                             "refit with neutral inputs of that modality")
        return self.offsets[modality][layer]

    def to(self, device: str | torch.device) -> GateAxis:
        return replace(self, mu_plus=self.mu_plus.to(device), mu_minus=self.mu_minus.to(device),
                       taus=self.taus.to(device), offsets={m: t.to(device) for m, t in self.offsets.items()})

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GateAxis):
            return NotImplemented
        return _fields_equal(self, other)


@dataclass
class MarsState:
    """What steers: centroids, offsets, thresholds, the layer and t*, fitted for one model. Tensors are float64.

    `diagnostics` holds what calibration measured for the plots and reports. Equality compares every field, tensors
    by value; `.to(device)` moves the tensors that steer (a copy).
    """

    model_id: str
    model_type: str
    num_layers: int
    hidden_size: int
    mu_plus: torch.Tensor  # [L, d] unsafe centroid
    mu_minus: torch.Tensor  # [L, d] safe centroid
    offsets: dict[str, torch.Tensor]  # modality -> [L, d] modality offset delta_m
    taus: torch.Tensor  # [L] balanced-accuracy thresholds
    layer: int  # the push (steering) layer
    target_level: float  # t*, calibrated at `layer`
    config: MarsConfig
    diagnostics: Diagnostics
    detect_layer: int = -1  # the layer the gate reads at t_post (its own tau and offsets); -1: the same as `layer`
    # The harmfulness axis at t_inst (fitted by intent: every harmful fit prompt, no behaviour filter); None for
    # states fitted before gate positions existed, which read at t_post.
    inst: GateAxis | None = None
    gate_position: str = "post"  # where the gate reads by default ("post" or "inst"); the push is always at t_post
    tau_override: float | None = None  # replaces the fitted threshold at the gate's own site (None: the fitted one)

    def __post_init__(self) -> None:
        if self.detect_layer < 0:
            self.detect_layer = self.layer
        if self.tau_override is not None and not math.isfinite(self.tau_override):
            raise ValueError("tau must be a finite number")
        if self.gate_position not in ("post", "inst"):
            raise ValueError(f"unknown gate position {self.gate_position!r}: use post or inst")
        if self.gate_position == "inst" and self.inst is None:
            raise ValueError("gate position inst needs the t_inst fit (state.inst)")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MarsState):
            return NotImplemented
        return _fields_equal(self, other)

    def to(self, device: str | torch.device) -> MarsState:
        """A copy whose steering tensors live on `device` (diagnostics stay where they are: they are only plotted)."""
        return replace(self, mu_plus=self.mu_plus.to(device), mu_minus=self.mu_minus.to(device),
                       taus=self.taus.to(device), offsets={m: t.to(device) for m, t in self.offsets.items()},
                       inst=None if self.inst is None else self.inst.to(device))

    # ---- derived --------------------------------------------------------------------------------------------------
    @property
    def r(self) -> torch.Tensor:
        """Refusal directions `[L, d]` (mu_plus - mu_minus)."""
        return self.mu_plus - self.mu_minus

    @property
    def r_norm(self) -> torch.Tensor:
        return self.r.norm(dim=-1)

    @property
    def positions(self) -> tuple[str, ...]:
        """The gate positions this state can read at: ("post",) or ("post", "inst")."""
        return ("post",) if self.inst is None else ("post", "inst")

    def gate_axis(self, position: str | None = None) -> GateAxis:
        """What the gate reads at `position` (default: the state's gate position). "post" shares the push's
        centroids and offsets (a view, no copy)."""
        position = self.gate_position if position is None else position
        if position == "post":
            return GateAxis("post", self.mu_plus, self.mu_minus, self.taus, self.offsets, self.detect_layer)
        if position == "inst":
            if self.inst is None:
                raise ValueError("this state has no t_inst fit (fitted before gate positions): refit it to read the "
                                 "gate at the instruction's last token, or use gate position post")
            return self.inst
        raise ValueError(f"unknown gate position {position!r}: use post or inst")

    @property
    def gate_layer(self) -> int:
        """The layer the gate reads at the state's gate position."""
        return self.gate_axis().detect_layer

    @property
    def tau(self) -> float:
        """Gate threshold at the gate's position and layer (`tau_override` when set, else the fitted one)."""
        axis = self.gate_axis()
        return float(self.tau_override) if self.tau_override is not None else float(axis.taus[axis.detect_layer])

    def fingerprint(self) -> str:
        """A short hash of what steers (model identity, centroids, offsets, thresholds, layers, t*).

        Results computed with one state carry it, so a result from another model or state is recognised instead of
        being re-scored against whatever is loaded now.
        """
        inst = self.inst
        h = hashlib.sha256(json.dumps([self.model_id, self.model_type, self.num_layers, self.hidden_size, self.layer,
                                       self.detect_layer, self.tau, self.target_level, sorted(self.offsets),
                                       self.gate_position, None if inst is None else inst.detect_layer]).encode())
        extra = () if inst is None else (inst.mu_plus, inst.mu_minus, inst.taus,
                                         *(inst.offsets[m] for m in sorted(inst.offsets)))
        for t in (self.mu_plus, self.mu_minus, self.taus, *(self.offsets[m] for m in sorted(self.offsets)), *extra):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def credibility_warnings(self) -> list[str]:
        """Why this state's scores, gates and answers would not be meaningful, if they would not (else []).

        A random model refuses nothing, so its "refusal direction" is noise: the fit then falls back to all harmful
        prompts and separability sits near chance. A dashboard must say so instead of showing confident verdicts.
        """
        diag, out = self.diagnostics, []
        refused = diag.behaviour.get("harmful_refused")
        if refused == 0:
            out.append("the model refused none of the harmful calibration prompts, so there is no refusal behaviour "
                       "to find a direction for")
        elif diag.behaviour.get("fallback"):
            out.append("the behaviour filter fell back (too few refusals): the unsafe centroid mixes refused and "
                       "answered prompts")
        site = diag.gate_choice.get(self.gate_position, {})
        seps = site.get("separability") or [float(x) for x in diag.layer_scores.separability]
        sep = float(seps[self.gate_layer])
        if sep < 0.6:
            out.append(f"held-out separability at the gate's layer {self.gate_layer} ({self.gate_position}) is "
                       f"{sep:.2f}, near chance (0.5): the gate cannot tell harmful from harmless text")
        return out

    def offset(self, modality: str, layer: int | None = None) -> torch.Tensor | None:
        """delta for `modality` at `layer` (default: the push layer) at t_post (`[d]`), or None for text."""
        return self.gate_axis("post").offset(modality, self.layer if layer is None else layer)

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
        diag = self.diagnostics
        tensors = {"mu_plus": self.mu_plus, "mu_minus": self.mu_minus, "taus": self.taus, **diag.tensors()}
        tensors.update({f"offset.{m}": t for m, t in self.offsets.items()})
        if self.inst is not None:
            tensors.update({"inst.mu_plus": self.inst.mu_plus, "inst.mu_minus": self.inst.mu_minus,
                            "inst.taus": self.inst.taus})
            tensors.update({f"inst.offset.{m}": t for m, t in self.inst.offsets.items()})
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(d / STATE_TENSORS))
        meta = {
            "format_version": FORMAT_VERSION,
            "model": self.model_id, "model_type": self.model_type, "num_layers": self.num_layers,
            "hidden_size": self.hidden_size, "layer": self.layer, "detect_layer": self.detect_layer, "tau": self.tau,
            "tau_override": self.tau_override, "target_level": self.target_level, "gate_position": self.gate_position,
            "inst_detect_layer": None if self.inst is None else self.inst.detect_layer,
            "target_curve": {_level_key(k): v for k, v in diag.target_curve.items()},
            "layer_scores": diag.layer_scores.to_dict(),
            "r_norm": [float(x) for x in self.r_norm],
            "taus": [float(x) for x in self.taus],
            "refusal_opening": diag.refusal_opening, "behaviour": diag.behaviour,
            "prompt_hashes": diag.prompt_hashes, "config": self.config.to_dict(),
            "modalities": sorted(self.offsets), "calib_labels": diag.calib_labels,
            "diagnostics": {n: getattr(diag, n) for n in Diagnostics._JSON},
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
        try:
            meta = migrate(meta)  # the one place that knows every earlier format
        except ValueError as e:  # a newer format, or none
            raise ValueError(f"the MARS state in {str(d)!r}: {e}") from None
        except KeyError as e:
            raise ValueError(f"the MARS state in {str(d)!r} is missing {e}: refit it") from None
        try:
            listed = meta["diagnostics"]
            typed = {n: listed.get(n) for n in Diagnostics._JSON if listed.get(n) is not None}
            if typed.get("allowed_layers") is not None:
                typed["allowed_layers"] = tuple(int(x) for x in typed["allowed_layers"])
            diag = Diagnostics(
                layer_scores=LayerScores.from_dict(meta["layer_scores"]),
                target_curve={float(k): float(v) for k, v in meta["target_curve"].items()},
                spread_unsafe=tensors["spread_unsafe"], spread_safe=tensors["spread_safe"],
                refusal_opening=meta["refusal_opening"], behaviour=meta["behaviour"],
                prompt_hashes=meta["prompt_hashes"], calib_labels=list(meta["calib_labels"]),
                **{n: tensors.get(n) for n in Diagnostics._TENSORS if n not in ("spread_unsafe", "spread_safe")},
                map_cells={k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("map_cells.")},
                map_tokens={k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("map_tokens.")},
                **typed)
            state = cls(
                model_id=meta["model"], model_type=meta["model_type"], num_layers=int(meta["num_layers"]),
                hidden_size=int(meta["hidden_size"]), mu_plus=tensors["mu_plus"], mu_minus=tensors["mu_minus"],
                offsets={k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("offset.")},
                taus=tensors["taus"], layer=int(meta["layer"]), target_level=float(meta["target_level"]),
                config=MarsConfig.from_dict(meta["config"]), diagnostics=diag, detect_layer=int(meta["detect_layer"]),
                inst=None if meta["inst_detect_layer"] is None else GateAxis(
                    "inst", tensors["inst.mu_plus"], tensors["inst.mu_minus"], tensors["inst.taus"],
                    {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith("inst.offset.")},
                    int(meta["inst_detect_layer"])),
                gate_position=meta["gate_position"],
                tau_override=None if meta["tau_override"] is None else float(meta["tau_override"]))
        except KeyError as e:
            raise ValueError(f"the MARS state in {str(d)!r} is missing {e}: refit it") from None
        shape = (state.num_layers, state.hidden_size)
        if tuple(state.mu_plus.shape) != shape or tuple(state.mu_minus.shape) != shape:
            raise ValueError(f"the MARS state in {str(d)!r} is inconsistent: centroids {tuple(state.mu_plus.shape)} "
                             f"vs num_layers x hidden_size {shape}")
        return state

    def with_overrides(self, *, layer: int | None = None, tau: float | None = None,
                       detect_layer: int | None = None, gate_position: str | None = None) -> MarsState:
        """A copy with the push layer, the gate's position, its layer (at that position) and/or its threshold
        (`tau_override`) replaced; the fitted centroids, thresholds and offsets are kept, and t* stays the one
        calibrated at the fitted push layer. For one run, pass the same overrides to `SteerOptions` instead."""
        import copy

        new = copy.copy(self)
        if gate_position is not None:
            self.gate_axis(gate_position)  # raises for an unknown position or a state without the inst fit
            new.gate_position = gate_position
        for name, value in (("layer", layer), ("detect_layer", detect_layer)):
            if value is None:
                continue
            if not -self.num_layers <= value < self.num_layers:
                raise ValueError(f"{name} {value} is out of range: the model has {self.num_layers} layers (0.."
                                 f"{self.num_layers - 1})")
            if name == "detect_layer" and new.gate_position == "inst":  # the gate's layer at its own position
                new.inst = replace(self.inst, detect_layer=value % self.num_layers)
            else:
                setattr(new, name, value % self.num_layers)
        if tau is not None:
            if not math.isfinite(tau):
                raise ValueError("tau must be a finite number")
            new.tau_override = float(tau)
        return new


def _fields_equal(a, b) -> bool:
    """Dataclass equality with tensors compared by value (and dicts of tensors, e.g. offsets)."""

    def same(x, y) -> bool:
        if torch.is_tensor(x) or torch.is_tensor(y):
            return torch.is_tensor(x) and torch.is_tensor(y) and x.shape == y.shape and torch.equal(x.cpu(), y.cpu())
        if isinstance(x, dict) and isinstance(y, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if is_dataclass(x) and not isinstance(x, type):
            return type(x) is type(y) and _fields_equal(x, y)
        return x == y

    return all(same(getattr(a, f.name), getattr(b, f.name)) for f in fields(a))


def _level_key(level: float) -> str:
    return f"{level:g}"
