"""Where in the input: per-position unsafety scores (`position_scores`), mapped back to the prompt's words, the
image's patch grid and the video's frames (`InputMap`, `build_input_map`, `input_map`), and re-scored from the kept
residuals with other options (`rescore`).

The Run's prefill already computes the residual at every prompt position; `stream.stream_pair(seq_layers=...)`
keeps it at the detection layer (T x d floats). Each position is scored along that layer's r-hat with the gate's
own affine map (`steering.gate_scores`, i.e. `rule.unsafety_score`); image and video tokens are re-centred by
a *per-position* offset measured at fit time on the neutral solid-colour inputs (`offsets`, so a neutral image
scores 0, the safe centroid's score, in every cell). Then the media tokens are placed on their grids (`layout`).

Example:
    >>> for upd in stream_pair(bb, state, q, opts, seq_layers=[plan(state, opts).detect_layer]):  # doctest: +SKIP
    ...     pass
    >>> m = input_map(bb, state, opts, q, upd.seq)                                               # doctest: +SKIP
    >>> m.grids[0].scores.shape, m.text()[:3]                                                    # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..steer.steering import Plan, SteerOptions, gate_scores, plan
from .layout import Grid, LayoutSpec, layout_grids, layout_spec

__all__ = ["InputMap", "build_input_map", "input_map", "position_scores", "rescore"]


@dataclass
class InputMap:
    """Per-position scores of one input and where they sit: text tokens, image grids, video frame grids."""

    layer: int  # the layer scored (the gate's detection layer)
    recenter: bool
    tokens: list[str]  # [T] the text of every prompt position
    kinds: list[str]  # [T] "text", "image" or "video"
    scores: np.ndarray  # [T] float64
    grids: list[Grid]
    offset_source: str  # "per-position", "mean modality offset" or "none"
    notes: list[str] = field(default_factory=list)
    modality: str = "text"  # the input's modality (text positions are re-centred by its offset, as the gate does)
    layout_notes: list[str] = field(default_factory=list)  # the layout's own notes (kept when re-scored)
    h: torch.Tensor | None = field(default=None, repr=False, compare=False)  # [T, d] the residuals scored
    gate_at: int = -1  # the position the gate reads (t_post: the last; t_inst: the user's last token), from the start

    @property
    def exact(self) -> bool:
        return all(g.exact for g in self.grids)

    def text(self) -> list[tuple[int, str, float]]:
        """(position, token, score) of every text (non-media) position, in order."""
        return [(i, t, float(s)) for i, (t, k, s) in enumerate(zip(self.tokens, self.kinds, self.scores, strict=True))
                if k == "text"]

    def frame_grids(self) -> list[Grid]:
        return [g for g in self.grids if g.kind == "frame"]

    def image_grids(self) -> list[Grid]:
        return [g for g in self.grids if g.kind == "image"]

    def to_json(self) -> dict:
        return {"layer": self.layer, "recenter": self.recenter, "offset_source": self.offset_source,
                "exact": self.exact, "notes": list(self.notes), "gate_at": self.gate_at % len(self.tokens),
                "positions": [{"pos": i, "token": t, "kind": k, "score": float(s)}
                              for i, (t, k, s) in enumerate(zip(self.tokens, self.kinds, self.scores, strict=True))],
                "grids": [g.to_json() for g in self.grids]}


# ---- scores ------------------------------------------------------------------------------------------------------

def _score(state, p: Plan, h: torch.Tensor) -> torch.Tensor:
    """The gate's own score of residuals `h [N, d]` at the detection layer, with no further offset (any re-centring
    was applied to `h` already): `steering.gate_scores`, i.e. `rule.unsafety_score`."""
    return gate_scores(state, p, h, ["text"] * h.shape[0], recenter=False)


def _cell_offsets(cells: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Fit-time offsets `[gh, gw, d]` resampled (bilinear; identity when the shapes agree) to `shape` -> [r, c, d]."""
    if tuple(cells.shape[:2]) == tuple(shape):
        return cells
    x = cells.permute(2, 0, 1)[None].double()
    return torch.nn.functional.interpolate(x, size=shape, mode="bilinear", align_corners=False)[0].permute(1, 2, 0)


def position_scores(state, options: SteerOptions, h: torch.Tensor, kinds: Sequence[str], grids: Sequence[Grid],
                    modality: str = "text") -> tuple[np.ndarray, str, list[str]]:
    """Score every position `h [T, d]` (residuals at the detection layer) -> (`[T]` scores, offset source, notes).

    Text positions are scored as the gate scores the last one: re-centred by the input's modality offset (the gate's
    delta; zero for a text-only input), so the last position's score *is* the gate's. Media positions, with
    re-centring: minus the per-position offset the state measured on neutral inputs for that grid view (resampled
    when the grid's shape differs), or the mean over the neutral media tokens where no view matches. A state without
    per-position offsets (fitted before maps existed, or read at another layer) falls back to the gate's mean modality
    offset, and says so. Without re-centring every position is scored raw.
    """
    p = plan(state, options)
    h = h.double()
    kinds = list(kinds)
    text = [i for i, k in enumerate(kinds) if k == "text"]
    media = [i for i, k in enumerate(kinds) if k != "text"]
    scores = torch.zeros(len(kinds), dtype=torch.float64)
    notes: list[str] = []
    source = "none"
    if text:
        scores[text] = gate_scores(state, p, h[text], [modality] * len(text), options.recenter).cpu()
    if not media:
        return scores.numpy(), source, notes
    if not options.recenter:
        scores[media] = _score(state, p, h[media]).cpu()
        return scores.numpy(), source, notes
    diag = state.diagnostics
    cells = getattr(diag, "map_cells", None) or {}
    tokens = getattr(diag, "map_tokens", None) or {}
    measured = (getattr(diag, "map_layer", None), getattr(diag, "map_position", "post"))
    if measured != (p.detect_layer, p.gate_position) or not tokens:
        why = ("this state has no per-position offsets (fitted before the maps existed)" if not tokens else
               f"the per-position offsets were measured at layer {measured[0]} for the gate at t_{measured[1]}, "
               f"not at layer {p.detect_layer} for t_{p.gate_position}")
        notes.append(f"{why}: image and video tokens are re-centred by the mean modality offset (the gate's δ)")
        scores[media] = gate_scores(state, p, h[media], [kinds[i] for i in media], recenter=True).cpu()
        return scores.numpy(), "mean modality offset", notes
    delta = torch.zeros_like(h)
    for i in media:
        if kinds[i] not in tokens:
            raise ValueError(f"this state has no {kinds[i]} offsets: refit it with neutral {kinds[i]} inputs")
        delta[i] = tokens[kinds[i]].double()
    resampled = set()
    for g in grids:
        placed = g.positions[g.positions >= 0]
        if not len(placed):
            continue
        key = f"{kinds[int(placed[0])]}.{g.view}"
        if key not in cells:
            continue
        off = _cell_offsets(cells[key].double(), g.shape)
        if tuple(cells[key].shape[:2]) != g.shape:
            resampled.add(f"{key} {tuple(cells[key].shape[:2])} -> {g.shape}")
        for (r, c), pos in np.ndenumerate(g.positions):
            if pos >= 0:
                delta[pos] = off[r, c]
    if resampled:
        notes.append("per-position offsets resampled (bilinear) from the neutral inputs' grid: "
                     + "; ".join(sorted(resampled)))
    scores[media] = _score(state, p, h[media] - delta[media]).cpu()
    return scores.numpy(), "per-position", notes


def build_input_map(spec: LayoutSpec, decode: Callable[[int], str], state, options: SteerOptions, query,
                    ids: Sequence[int], h: torch.Tensor, meta: dict, gate_at: int = -1) -> InputMap:
    """The `InputMap` of one query from its unpadded prompt ids, residuals `h [T, d]` at the detection layer and the
    processor's media metadata (`image_grid_thw`, `image_sizes`, ...). `decode(id)` gives a token's text; `gate_at`
    is the position the gate reads (`inputs.gate_index`)."""
    ids = [int(t) for t in ids]
    if h.shape[0] != len(ids):
        raise ValueError(f"{h.shape[0]} residuals for {len(ids)} prompt positions")
    n_frames = len(query.video or ())
    sizes = [im.size for im in (query.images or ())] or [f.size for f in (query.video or ())]
    grids, notes = layout_grids(spec, ids, meta, len(query.images or ()), n_frames, sizes)
    kinds = ["text"] * len(ids)
    video_modality = "video" if query.video else "image"
    for g in grids:
        for pos in g.positions[g.positions >= 0].tolist():
            kinds[pos] = "video" if g.kind == "frame" else "image"
    for i, t in enumerate(ids):  # media tokens that no grid holds (newline, class token): still media
        if kinds[i] == "text" and t in (spec.image_token_id, spec.video_token_id):
            kinds[i] = video_modality if (t == spec.video_token_id or query.video) else "image"
    scores, source, more = position_scores(state, options, h, kinds, grids, query.modality)
    for g in grids:
        g.scores = np.where(g.positions >= 0, scores[np.clip(g.positions, 0, None)], np.nan)
    layout_notes = list(dict.fromkeys(notes + [g.note for g in grids if not g.exact and g.note]))
    return InputMap(layer=plan(state, options).detect_layer, recenter=options.recenter,
                    tokens=[decode(t) for t in ids], kinds=kinds, scores=scores, grids=grids, offset_source=source,
                    notes=list(dict.fromkeys(layout_notes + more)), modality=query.modality,
                    layout_notes=layout_notes, h=h.detach().float().cpu(), gate_at=gate_at % len(ids))


def rescore(state, m: InputMap, options: SteerOptions, h: torch.Tensor | None = None,
            layer: int | None = None) -> InputMap:
    """The same map scored with other options (re-centring on / off), from its kept residuals: no model call.

    `h` `[T, d]` and `layer`: score residuals the same prefill kept at another layer (the push layer) on the same
    grids. The per-position offsets are measured at the gate's layer only, so there media tokens are re-centred by the
    mean modality offset, and the map says so. That map is scored along the push's own axis (t_post's), whatever
    position the gate reads at.
    """
    if layer is not None:
        options = replace(options, detect_layer=layer, gate_position="post")
    h = m.h if h is None else h
    if h is None:
        raise ValueError("this map kept no residuals: run the input again")
    if layer is None and plan(state, options).detect_layer != m.layer:
        raise ValueError(f"the map was captured at layer {m.layer}: run the input again to map another layer")
    if h.shape[0] != len(m.kinds):
        raise ValueError(f"{h.shape[0]} residuals for {len(m.kinds)} prompt positions")
    scores, source, more = position_scores(state, options, h, m.kinds, m.grids, m.modality)
    grids = [replace(g, scores=np.where(g.positions >= 0, scores[np.clip(g.positions, 0, None)], np.nan))
             for g in m.grids]
    return replace(m, layer=plan(state, options).detect_layer, recenter=options.recenter, scores=scores, grids=grids,
                   offset_source=source, notes=list(dict.fromkeys(m.layout_notes + more)), h=h)


def input_map(backbone, state, options: SteerOptions, query, seq: dict) -> InputMap:
    """`build_input_map` from a `PairUpdate.seq` (or `capture_prompt_positions`) on a loaded backbone."""
    from ..model.inputs import gate_index

    p = plan(state, options)
    tok = backbone.tokenizer
    return build_input_map(layout_spec(backbone), lambda t: tok.decode([t]), state, options, query,
                           seq["input_ids"].tolist(), seq["h"][p.detect_layer], seq["meta"],
                           gate_at=gate_index(backbone, p.gate_position))
