"""Prompt sets: our built-in harmful / harmless instructions, user files (.txt, .jsonl, .csv), seeded splits.

Example:
    >>> harmful = builtin_prompts("harmful")
    >>> len(harmful) >= 128
    True
    >>> fit, held = split(harmful, heldout_frac=0.25, seed=0)
    >>> len(fit) + len(held) == len(harmful)
    True
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
from pathlib import Path

__all__ = ["ASSETS", "builtin_prompts", "load_prompts", "prompts_hash", "split"]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
_TEXT_KEYS = ("prompt", "instruction", "goal", "text", "question", "query", "behavior", "Behavior", "Goal")


def builtin_prompts(kind: str) -> list[str]:
    """Our own instruction sets, written for this project: kind is 'harmful' or 'harmless'."""
    if kind not in ("harmful", "harmless"):
        raise ValueError(f"kind must be 'harmful' or 'harmless', got {kind!r}")
    return load_prompts(ASSETS / "prompts" / f"{kind}.txt")


def _from_record(rec: dict, where: str) -> str:
    for k in _TEXT_KEYS:
        if isinstance(rec.get(k), str) and rec[k].strip():
            return rec[k].strip()
    raise ValueError(f"{where}: no prompt field; use one of the keys {', '.join(_TEXT_KEYS[:6])}")


def load_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line (.txt), per JSON object (.jsonl / .json list) or per row (.csv with a header naming a
    prompt column: prompt, instruction, goal, text, question, query or behavior). Blank lines are skipped, duplicates
    dropped (first kept). Raises ValueError saying what was wrong."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"prompt file {str(p)!r} does not exist")
    try:
        raw = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"prompt file {p.name!r} is not UTF-8 text") from None
    suffix = p.suffix.lower()
    out: list[str] = []
    if suffix == ".jsonl":
        for i, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p.name}:{i}: not valid JSON ({e.msg})") from None
                out.append(rec if isinstance(rec, str) else _from_record(rec, f"{p.name}:{i}"))
    elif suffix == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p.name}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise ValueError(f"{p.name}: expected a JSON list of prompts or objects")
        out = [d if isinstance(d, str) else _from_record(d, p.name) for d in data]
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(raw))
        if not reader.fieldnames or not any(k in reader.fieldnames for k in _TEXT_KEYS):
            raise ValueError(f"{p.name}: the CSV header needs a prompt column (prompt, instruction, goal, text, "
                             f"question, query or behavior); found {reader.fieldnames}")
        out = [_from_record(row, p.name) for row in reader]
    else:
        out = raw.splitlines()
    cleaned = list(dict.fromkeys(s.strip() for s in out if isinstance(s, str) and s.strip()))
    if not cleaned:
        raise ValueError(f"prompt file {p.name!r} has no prompts")
    return cleaned


def prompts_hash(prompts: list[str]) -> str:
    """Short content hash of a prompt list (order-sensitive), recorded in the fitted state."""
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()[:16]


def split(prompts: list[str], heldout_frac: float = 0.3, seed: int = 0) -> tuple[list[str], list[str]]:
    """Seeded fit / held-out split; both parts non-empty when there are at least 2 prompts."""
    if not 0.0 < heldout_frac < 1.0:
        raise ValueError(f"heldout_frac must be in (0, 1), got {heldout_frac}")
    if len(prompts) < 2:
        raise ValueError(f"need at least 2 prompts to split into fit and held-out parts, got {len(prompts)}")
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    n_held = min(len(prompts) - 1, max(1, round(len(prompts) * heldout_frac)))
    held = sorted(order[:n_held])
    fit = sorted(order[n_held:])
    return [prompts[i] for i in fit], [prompts[i] for i in held]
