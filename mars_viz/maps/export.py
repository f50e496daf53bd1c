"""A map as CSV (`map_csv`): one row per prompt position, with its score and the grid cell(s) it sits in."""

from __future__ import annotations

import csv
import io

import numpy as np

from .scoring import InputMap

__all__ = ["map_csv"]


def map_csv(m: InputMap) -> str:
    """One row per prompt position: position, token, kind, score, and the grid cell(s) it sits in."""
    where: dict[int, list[str]] = {}
    for g in m.grids:
        for (r, c), pos in np.ndenumerate(g.positions):
            if pos >= 0:
                where.setdefault(int(pos), []).append(f"{g.label} r{r} c{c}")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["position", "token", "kind", "score", "cell", "layer", "recentred", "offset"])
    for i, (t, k, s) in enumerate(zip(m.tokens, m.kinds, m.scores, strict=True)):
        w.writerow([i, t, k, f"{float(s):.6g}", "; ".join(where.get(i, [])), m.layer, m.recenter, m.offset_source])
    return buf.getvalue()
