"""The library's front door: steer your own `model.generate` with a fitted MARS state, and read the gate.

`mars_viz` re-exports these with what they need (`load_backbone`, `Backbone.from_model`, `calibrate`,
`MarsState.load`, `Query`, `build_batch`), so a script imports one name:

    >>> import mars_viz as mv                                                         # doctest: +SKIP
    >>> backbone = mv.load_backbone("Qwen/Qwen2-VL-2B-Instruct")                        # doctest: +SKIP
    >>> state = mv.MarsState.load("runs/qwen2vl")       # or mv.calibrate(backbone)     # doctest: +SKIP
    >>> batch = mv.build_batch(backbone, [mv.Query("Describe this.", images=(img,))])  # doctest: +SKIP
    >>> with mv.steering(backbone, state, batch):                                       # doctest: +SKIP
    ...     out = backbone.model.generate(**batch, max_new_tokens=64)
    >>> mv.score(backbone, state, batch).open                                           # doctest: +SKIP

May import: everything below `ui`, `views` and `cli` (it draws nothing and serves nothing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from .core.state import MarsState
from .model.backbone import Backbone
from .model.hooks import EditRecord
from .model.inputs import Modality, row_modalities
from .steer.steering import SteerOptions, mars_steering

__all__ = ["GateReading", "score", "steering"]


def _options(options: SteerOptions | None, overrides: dict) -> SteerOptions:
    base = options or SteerOptions()
    return replace(base, **overrides) if overrides else base


def _modalities(backbone: Backbone, inputs: Mapping | None, modalities: Sequence[Modality] | None) -> list[Modality]:
    if modalities is not None:
        return list(modalities)
    if inputs is None or "input_ids" not in inputs:
        raise ValueError("give the batch (`inputs`, from build_batch or your processor) or the modality of each row "
                         "(`modalities=['image', 'text', ...]`)")
    return row_modalities(backbone, inputs["input_ids"])


@contextlib.contextmanager
def steering(backbone: Backbone, state: MarsState, inputs: Mapping | None = None, *,
             modalities: Sequence[Modality] | None = None, options: SteerOptions | None = None,
             **overrides) -> Iterator[EditRecord]:
    """MARS on the next `generate` (or forward) call of `backbone.model`: the gate is read, and an input past it is
    pushed toward refusal at the first generated token, inside the trust region.

    Each row is re-centred by its modality's offset: give `modalities` (one per row), or the batch as `inputs`
    and they are read from its media tokens (`inputs.row_modalities`). `options` (a `SteerOptions`) or keyword
    overrides of its fields (`strength=`, `tau=`, `layer=`, `detect_layer=`, `gate_position=`, `recenter=`,
    `mode="ungated"`) change what the state fitted. Yields an `EditRecord`: after the call, `rec.info` holds the
    scores (`s_gate`, `s_recentred`), `gate_open`, `tau` and the displacement's norm, one entry per row.
    """
    with mars_steering(backbone, state, _options(options, overrides), _modalities(backbone, inputs, modalities)) as rec:
        yield rec


@dataclass(frozen=True)
class GateReading:
    """What the gate reads for each row of a batch, as the steering hook records it: its score `s` (re-centred,
    along the gate site's axis), the threshold `tau`, and whether the gate opens (`open`: MARS would push this input
    toward refusal)."""

    s: torch.Tensor  # [B] float64
    open: torch.Tensor  # [B] bool
    tau: float
    layer: int  # the layer the gate reads
    position: str  # "post" (the prompt's last position) or "inst" (the last token of the user's text)


@torch.inference_mode()
def score(backbone: Backbone, state: MarsState, inputs: Mapping, *, modalities: Sequence[Modality] | None = None,
          options: SteerOptions | None = None, **overrides) -> GateReading:
    """The gate's reading for each row of `inputs` (one unsteered forward; nothing is generated or changed)."""
    opts = replace(_options(options, overrides), steer=False)
    with mars_steering(backbone, state, opts, _modalities(backbone, inputs, modalities)) as rec:
        backbone.model(**inputs)
    info = rec.info
    return GateReading(s=info["s_gate"].double(), open=info["gate_open"], tau=float(info["tau"]),
                       layer=int(info["detect_layer"]), position=info["gate_position"])
