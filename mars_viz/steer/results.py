"""What a pair returns: one answer (`Answer`), one query's unsteered and steered answers with MARS's diagnostics
(`PairResult`), and the snapshots `stream.stream_pair` yields while both answers are generated (`PairUpdate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Answer", "PairResult", "PairUpdate"]


@dataclass
class Answer:
    text: str
    refused: bool
    token_ids: list[int]

    def to_json(self) -> dict:
        return {"text": self.text, "refused": self.refused, "num_tokens": len(self.token_ids)}


@dataclass
class PairResult:
    """One query's unsteered and steered answers, and why MARS did what it did."""

    prompt: str
    modality: str
    layer: int  # the push layer
    score_raw: float  # s of the raw activation at the push layer
    score_recentred: float  # s at the push layer after subtracting the modality offset (sets how far to push)
    tau: float  # the gate's threshold, at detect_layer
    t_star: float
    gate_open: bool
    gate_weight: float
    strength: float
    recenter: bool
    steer: bool
    displacement_norm: float
    unsteered: Answer
    steered: Answer
    t_star_layer: int | None = None  # the layer t* was calibrated at (None: t* was given by the user)
    detect_layer: int | None = None  # where the gate read its score (None: the push layer)
    score_gate: float | None = None  # the re-centred score the gate read there
    gate_position: str = "post"  # the position the gate read at: "post" (t_post) or "inst" (t_inst)

    @property
    def gate_layer(self) -> int:
        return self.layer if self.detect_layer is None else self.detect_layer

    @property
    def gate_score(self) -> float:
        return self.score_recentred if self.score_gate is None else self.score_gate

    @property
    def t_star_note(self) -> str | None:
        """Says so when a layer override pushes with a t* that was calibrated at another layer."""
        if self.t_star_layer is None or self.t_star_layer == self.layer:
            return None
        return (f"t* = {self.t_star:g} was calibrated at layer {self.t_star_layer}; this run pushes at layer "
                f"{self.layer} with it (refusal at that level is not measured there)")

    def to_json(self) -> dict:
        out = {"prompt": self.prompt, "modality": self.modality, "layer": self.layer,
               "detect_layer": self.gate_layer, "gate_position": self.gate_position, "score_gate": self.gate_score,
               "score_raw": self.score_raw, "score_recentred": self.score_recentred, "tau": self.tau,
               "target_level": self.t_star, "target_level_layer": self.t_star_layer, "gate_open": self.gate_open,
               "gate_weight": self.gate_weight, "strength": self.strength, "recenter": self.recenter,
               "steer": self.steer, "displacement_norm": self.displacement_norm,
               "unchanged": self.unsteered.text == self.steered.text,
               "unsteered": self.unsteered.to_json(), "steered": self.steered.to_json()}
        if self.t_star_note:
            out["t_star_note"] = self.t_star_note
        return out


@dataclass
class PairUpdate:
    """A streaming snapshot: partial texts, then (done=True) the full result and the input's residuals."""

    unsteered: str
    steered: str
    done: bool = False
    result: PairResult | None = None
    acts: torch.Tensor | None = None  # [L, d] raw residuals of the input at the last prompt position (t_post)
    acts_inst: torch.Tensor | None = None  # [L, d] the same at the last token of the user's text (t_inst)
    seq: dict | None = None  # with `seq_layers`: {"h": {layer: [T, d]}, "input_ids": [T], "meta": {...}}
