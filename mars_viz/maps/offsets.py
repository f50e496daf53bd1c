"""The fit-time forwards of the maps: one forward that keeps every prompt position (`capture_prompt_positions`; a
Run uses its prefill instead), and the per-position offsets measured with it on neutral inputs
(`neutral_position_offsets`), which re-centre the media tokens' scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .layout import layout_grids, layout_spec
from .scoring import _cell_offsets

__all__ = ["neutral_position_offsets"]


@torch.inference_mode()
def capture_prompt_positions(backbone, query, layers: Sequence[int]) -> dict:
    """One forward of one query, keeping every position at `layers` (the fit-time pass; a Run uses its prefill)."""
    from ..model.hooks import capture_sequence
    from ..model.inputs import build_batch

    batch = build_batch(backbone, [query])
    with capture_sequence(backbone.layers, layers) as cap:
        backbone.model(**batch, use_cache=False, logits_to_keep=1)
    return {"h": {i: cap[i][0] for i in cap.layers}, "input_ids": batch["input_ids"][0].cpu(),
            "meta": {k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()
                     if k not in ("input_ids", "attention_mask") and not k.startswith("pixel_values")}}


def neutral_position_offsets(backbone, queries: dict[str, Sequence], layer: int, mu_minus: torch.Tensor,
                             progress: Callable[[int, int], None] | None = None
                             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-position offsets at `layer` from neutral inputs (`queries`: modality -> neutral-media queries).

    Returns (cells, tokens): `cells["image.patches"]` `[rows, cols, d]` is the mean residual of each grid cell over
    the neutral inputs minus the safe centroid `mu_minus [d]` (so a neutral image scores 0 in every cell after
    re-centring); `tokens["image"]` `[d]` the same over all media tokens (for tokens no grid view matches).
    """
    spec = layout_spec(backbone)
    cells: dict[str, torch.Tensor] = {}
    tokens: dict[str, torch.Tensor] = {}
    mu = mu_minus.double()
    total, done = sum(len(qs) for qs in queries.values()), 0
    for modality, qs in queries.items():
        acc: dict[str, list[torch.Tensor]] = {}
        toks: list[torch.Tensor] = []
        for q in qs:
            seq = capture_prompt_positions(backbone, q, [layer])
            h = seq["h"][layer].double()  # [T, d]
            ids = seq["input_ids"].tolist()
            grids, _ = layout_grids(spec, ids, seq["meta"], len(q.images), len(q.video or ()),
                                    [im.size for im in q.images] or [f.size for f in (q.video or ())])
            media = [i for i, t in enumerate(ids) if t in (spec.image_token_id, spec.video_token_id)]
            toks.append(h[media])
            for g in grids:
                if not g.exact and g.view in ("sequence", "crop"):
                    continue
                pos = torch.as_tensor(g.positions)
                cell = torch.where((pos >= 0)[..., None], h[pos.clamp(min=0)], torch.nan)  # [r, c, d]
                key = f"{modality}.{g.view}"
                if key in acc and tuple(acc[key][0].shape[:2]) != g.shape:
                    cell = _cell_offsets(torch.nan_to_num(cell), tuple(acc[key][0].shape[:2]))
                acc.setdefault(key, []).append(cell)
            done += 1
            if progress:
                progress(done, total)
        if toks:
            tokens[modality] = (torch.cat(toks).mean(0) - mu).float()
        for key, cs in acc.items():
            cells[key] = (torch.stack(cs).nanmean(0) - mu).nan_to_num().float()
    return cells, tokens
