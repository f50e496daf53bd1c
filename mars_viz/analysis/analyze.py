"""One input, run through the model: the narrow interface the dashboard calls (no gradio here).

`analyze_stream` runs the model once (both answers from one shared prefill, every layer's residual captured from
the same prefill) and returns an `Analysis`. Everything after that (re-scoring at another layer, the figures) is pure
and lives in `views`, so the dashboard's toggle and layer slider are instant.

Example:
    >>> for upd in analyze_stream(backbone, state, Query("hi"), SteerOptions()):   # doctest: +SKIP
    ...     print(upd.unsteered, "|", upd.steered)
    >>> figs, view = views.build_figures(state, upd.analysis, layer=12)            # doctest: +SKIP
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..core.state import MarsState
from ..maps.scoring import InputMap, input_map
from ..model.activations import forward_sites
from ..model.backbone import Backbone
from ..model.inputs import Query
from ..model.memory import OutOfMemory, is_out_of_memory, release_memory, weights_bytes
from ..steer.pair import PairStrategy
from ..steer.results import PairResult
from ..steer.steering import SteerOptions, gate_scores, plan
from ..steer.stream import stream_pair

__all__ = ["Analysis", "StreamUpdate", "analyze_stream", "frame_scores", "gate_scorer"]

log = logging.getLogger("mars_viz")


@dataclass
class Analysis:
    query: Query
    options: SteerOptions
    result: PairResult
    acts: torch.Tensor  # [L, d] raw residuals at the last prompt position (t_post)
    state_fingerprint: str  # `MarsState.fingerprint()` of the state it was computed with
    frame_scores: list[float] | None = None  # video: re-centred score of each sampled frame at the chosen layer
    frame_indices: list[int] | None = None
    notes: list[str] = field(default_factory=list)
    input_map: InputMap | None = None  # per-position scores at the detection layer, placed on the input (maps/)
    push_residuals: torch.Tensor | None = None  # [T, d] the same prefill at the push layer (when it is another layer)
    acts_inst: torch.Tensor | None = None  # [L, d] raw residuals at the last token of the user's text (t_inst)

    def to_json(self, maps: bool = False) -> dict:
        """The `run --json` object; `maps=True` adds the per-position scores and grids (`run --json --maps`)."""
        out = self.result.to_json()
        if self.frame_scores is not None:
            out["frame_scores"] = self.frame_scores
            out["frame_indices"] = self.frame_indices
        if self.notes:
            out["notes"] = self.notes
        if maps and self.input_map is not None:
            out["maps"] = self.input_map.to_json()
        return out

    def check_state(self, state: MarsState | None) -> None:
        """Raise ValueError unless `state` is the one this result was computed with.

        The residuals are re-scored against the loaded state (toggle, layer inspector, export); against another
        model or state that would draw a figure that mixes two fits, so callers ask the user to run again instead.
        """
        if state is None or state.fingerprint() != self.state_fingerprint:
            raise ValueError("this result was computed with another model/state: run it again")


@torch.inference_mode()
def frame_scores(backbone: Backbone, state: MarsState, prompt: str, frames, options: SteerOptions) -> list[float]:
    """The gate's score (re-centred, at the detection layer) of each video frame shown alone as an image."""
    p = plan(state, options)
    sites = forward_sites(backbone, [Query(prompt, images=(f,)) for f in frames], inst=p.gate_position == "inst")
    acts = sites[p.gate_position][:, p.detect_layer]  # [F, d]
    return [float(x) for x in gate_scores(state, p, acts, ["image"] * len(frames), options.recenter)]


def gate_scorer(backbone: Backbone, state: MarsState, options: SteerOptions):
    """`queries -> [the gate's score of each]` (re-centred, at the detection layer): the occlusion check's scorer."""
    p = plan(state, options)

    @torch.inference_mode()
    def score(queries) -> list[float]:
        acts = forward_sites(backbone, list(queries), inst=p.gate_position == "inst")[p.gate_position][
            :, p.detect_layer]  # [B, d]
        return [float(x) for x in gate_scores(state, p, acts, [q.modality for q in queries], options.recenter)]

    return score


@dataclass
class StreamUpdate:
    unsteered: str
    steered: str
    analysis: Analysis | None = None  # set on the last update


def analyze_stream(backbone: Backbone, state: MarsState, query: Query, options: SteerOptions,
                   max_new_tokens: int = 64, frame_indices: list[int] | None = None,
                   notes: list[str] | None = None, strategy: PairStrategy = "auto",
                   maps: bool = True, cancel: threading.Event | None = None) -> Iterator[StreamUpdate]:
    """Stream both answers, then yield the full `Analysis` (with per-frame scores for a video and, with `maps`, the
    per-position scores of the same prefill placed on the input: `Analysis.input_map`).

    `cancel` (a `threading.Event`) ends the generation at its next decode step when set (`steer.cancel.Cancelled`).
    Running out of memory anywhere in it raises `OutOfMemory` (a ValueError whose message gives the device's free
    memory and what to change), after letting go of what the failed step held."""
    try:
        yield from _analyze_stream(backbone, state, query, options, max_new_tokens, frame_indices, notes, strategy,
                                   maps, cancel)
    except Exception as e:
        if isinstance(e, OutOfMemory) or not is_out_of_memory(e):
            raise
        release_memory(e)
        raise OutOfMemory.running(e, backbone.input_device, weights=weights_bytes(backbone.model)) from None


def _analyze_stream(backbone: Backbone, state: MarsState, query: Query, options: SteerOptions, max_new_tokens: int,
                    frame_indices: list[int] | None, notes: list[str] | None, strategy: PairStrategy,
                    maps: bool, cancel: threading.Event | None = None) -> Iterator[StreamUpdate]:
    p = plan(state, options)
    seq_layers = ([p.detect_layer] + ([p.layer] if p.layer != p.detect_layer else [])) if maps else None
    for upd in stream_pair(backbone, state, query, options, max_new_tokens=max_new_tokens, strategy=strategy,
                           seq_layers=seq_layers, cancel=cancel):
        if not upd.done:
            yield StreamUpdate(upd.unsteered, upd.steered)
            continue
        imap, map_note, push_h = None, None, None
        if upd.seq is not None:
            push_h = upd.seq["h"].get(p.layer) if p.layer != p.detect_layer else None
            imap, map_note = _input_map(backbone, state, options, query, upd.seq)
        fs = None
        if query.video:
            fs = frame_scores(backbone, state, query.prompt, query.video, options)
        analysis = Analysis(query=query, options=options, result=upd.result, acts=upd.acts,
                            state_fingerprint=state.fingerprint(), frame_scores=fs,
                            frame_indices=frame_indices, notes=list(notes or []) + ([map_note] if map_note else []),
                            input_map=imap, push_residuals=push_h, acts_inst=upd.acts_inst)
        yield StreamUpdate(upd.unsteered, upd.steered, analysis)


def _input_map(backbone: Backbone, state: MarsState, options: SteerOptions, query: Query,
               seq: dict) -> tuple[InputMap | None, str | None]:
    """(the per-position map, None), or (None, a note saying why there is none): the answers stand without it.

    A ValueError is what the map cannot show for this input (one WARNING line); a RuntimeError, KeyError or
    IndexError is a bug, logged with its traceback; running out of memory is not a note at all (re-raised)."""
    try:
        return input_map(backbone, state, options, query, seq), None
    except ValueError as e:
        log.warning("no per-position map: %s", e)
        return None, f"the per-position map could not be built ({e})"
    except (RuntimeError, KeyError, IndexError) as e:
        if is_out_of_memory(e):
            raise
        log.exception("the per-position map failed (a bug; the answers stand without it)")
        return None, (f"the per-position map could not be built: a bug ({type(e).__name__}: {e}); its traceback is "
                      "in the server log")
