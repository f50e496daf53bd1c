"""An evaluation's report on disk: report.json, a CSV of the conditions, the per-item rows (JSONL) and two
interactive charts (refusal per condition; the strength sweep). `analysis.evaluate` computes, this module writes.

Example:
    >>> paths = write_report(summarise(rows), rows, "out/report.json")               # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

from .export import figure_html
from .figures import eval_conditions_figure, strength_sweep_figure

__all__ = ["write_report"]


def write_report(report: dict, rows: Sequence[dict], out: str | Path) -> list[Path]:
    """report.json (+ meta), a CSV of the conditions, the per-item rows (JSONL) and two interactive charts."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    stem = out.with_suffix("")
    buf = io.StringIO()
    fields = ["condition"] + list(next(iter(report["conditions"].values())).keys()) if report["conditions"] else []
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for cond, vals in report["conditions"].items():
        w.writerow({"condition": cond, **vals})
    paths = [out, Path(f"{stem}.csv"), Path(f"{stem}_items.jsonl"), Path(f"{stem}_conditions.html"),
             Path(f"{stem}_strength_sweep.html")]
    paths[1].write_text(buf.getvalue())
    paths[2].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    paths[3].write_text(figure_html(eval_conditions_figure(report["conditions"])))
    paths[4].write_text(figure_html(strength_sweep_figure(report["strength_sweep"])))
    return paths
