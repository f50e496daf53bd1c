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
from dataclasses import dataclass
from pathlib import Path

from ..paths import ASSETS, cache_dir

__all__ = ["ASSETS", "STANDARD_SETS", "SURFACE_FORMS", "BenchRecord", "StandardSet", "builtin_prompts",
           "load_prompts", "load_standard", "prompts_hash", "split", "surface_forms"]

_TEXT_KEYS = ("prompt", "instruction", "goal", "text", "question", "query", "behavior", "Behavior", "Goal")


_BUILTIN = {"harmful": "harmful.txt", "harmless": "harmless.txt", "lookalike": "harmless_lookalike.txt",
            "jailbreak": "harmful_jailbreak.txt"}


def builtin_prompts(kind: str) -> list[str]:
    """Our own instruction sets, written for this project: 'harmful', 'harmless', 'lookalike' (XSTest-style benign
    requests with alarming words) or 'jailbreak' (harmful requests in role-play / fiction framings)."""
    if kind not in _BUILTIN:
        raise ValueError(f"kind must be one of {', '.join(_BUILTIN)}, got {kind!r}")
    return load_prompts(ASSETS / "prompts" / _BUILTIN[kind])


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


SURFACE_FORMS = ("final_punctuation", "trailing_space", "lower_case")
_FINAL_PUNCTUATION = ".?!;:"


def surface_forms(prompt: str) -> dict[str, str]:
    """The prompt under surface changes a gate at the instruction's last token must not depend on: its final
    punctuation removed (or a full stop added when it has none), a trailing space, and lower case.

    >>> forms = surface_forms("How do I kill a Python process?")
    >>> forms["final_punctuation"], forms["trailing_space"], forms["lower_case"]
    ('How do I kill a Python process', 'How do I kill a Python process? ', 'how do i kill a python process?')
    """
    base = prompt.rstrip()
    flipped = base.rstrip(_FINAL_PUNCTUATION) if base[-1:] in _FINAL_PUNCTUATION else base + "."
    return {"final_punctuation": flipped, "trailing_space": base + " ", "lower_case": base.lower()}


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


# ---- standard benchmarks ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StandardSet:
    """Where a public benchmark lives and how to read it. Files are looked up under `data_dir/<name>/`."""

    name: str
    kind: str  # harmful / harmless / mixed
    files: tuple[str, ...]  # accepted local file names (first found wins)
    column: str  # prompt column / key
    source: str  # where to download it (shown in errors)
    hf: tuple[str, str] | None = None  # (dataset repo, file) for online download
    label_column: str | None = None  # mixed sets: column whose value says safe / unsafe
    image_column: str | None = None  # multimodal sets: relative image path


STANDARD_SETS: dict[str, StandardSet] = {s.name: s for s in [
    StandardSet("advbench", "harmful", ("harmful_behaviors.csv",), "goal",
                "https://github.com/llm-attacks/llm-attacks/blob/main/data/advbench/harmful_behaviors.csv",
                ("walledai/AdvBench", "data/train-00000-of-00001.parquet")),
    StandardSet("harmbench", "harmful", ("harmbench_behaviors_text_all.csv", "harmbench_behaviors_text_test.csv"),
                "Behavior", "https://github.com/centerforaisafety/HarmBench/tree/main/data/behavior_datasets"),
    StandardSet("jailbreakbench", "harmful", ("harmful-behaviors.csv", "behaviors.csv"), "Goal",
                "https://huggingface.co/datasets/JailbreakBench/JBB-Behaviors",
                ("JailbreakBench/JBB-Behaviors", "data/harmful-behaviors.csv")),
    StandardSet("xstest", "mixed", ("xstest_prompts.csv", "xstest_v2_prompts.csv"), "prompt",
                "https://github.com/paul-rottger/xstest/blob/main/xstest_prompts.csv", label_column="label"),
    StandardSet("alpaca", "harmless", ("alpaca_data.json",), "instruction",
                "https://github.com/tatsu-lab/stanford_alpaca/blob/main/alpaca_data.json"),
    StandardSet("figstep", "harmful", ("safebench.csv", "SafeBench.csv"), "instruction",
                "https://github.com/ThuCCSLab/FigStep/tree/main/data/question (SafeBench: columns question, "
                "instruction)"),
    StandardSet("mm-safetybench", "harmful", ("mm_safetybench.jsonl",), "Question",
                "https://github.com/isXinLiu/MM-SafetyBench (flatten data/processed_questions/*.json into JSONL with "
                "Question and image fields)", image_column="image"),
    StandardSet("jailbreakv-28k", "harmful", ("JailBreakV_28K.csv", "mini_JailBreakV_28K.csv"), "jailbreak_query",
                "https://huggingface.co/datasets/JailbreakV-28K/JailBreakV-28k", image_column="image_path"),
    StandardSet("video-safetybench", "harmful", ("video_safetybench.jsonl",), "question",
                "https://huggingface.co/datasets/BAAI/Video-SafetyBench (JSONL with question and video fields)",
                image_column="video"),
]}


@dataclass(frozen=True)
class BenchRecord:
    prompt: str
    kind: str  # harmful / harmless
    media: str | None = None  # absolute path of an image or video, for multimodal sets


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig"))))
    if suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, list) else list(data.values())
    if suffix == ".parquet":
        import pandas as pd  # optional; only for sets downloaded from the hub as parquet

        return pd.read_parquet(path).to_dict("records")
    raise ValueError(f"unsupported file type {path.suffix!r}")


def load_standard(name: str, data_dir: str | os.PathLike | None = None, limit: int | None = None,
                  online: bool | None = None) -> list[BenchRecord]:
    """Load a standard benchmark from `data_dir/<name>/` (default: `~/.cache/mars_viz/datasets`), or download it
    from the Hugging Face hub when online. Raises ValueError saying what to download and where to put it."""
    if name not in STANDARD_SETS:
        raise ValueError(f"unknown benchmark {name!r}: choose one of {', '.join(STANDARD_SETS)}")
    spec = STANDARD_SETS[name]
    if data_dir is None:
        data_dir = cache_dir() / "datasets"
    folder = Path(data_dir) / name
    found = next((folder / f for f in spec.files if (folder / f).is_file()), None)
    if online is None:
        online = os.environ.get("HF_HUB_OFFLINE") != "1"
    if found is None and online and spec.hf is not None:
        try:
            from huggingface_hub import hf_hub_download

            found = Path(hf_hub_download(spec.hf[0], spec.hf[1], repo_type="dataset"))
        except Exception:  # offline, gated, moved: fall through to the instructions
            found = None
    if found is None:
        raise ValueError(f"{name} is not available offline: download it from {spec.source} and put "
                         f"{' or '.join(spec.files)} in {folder}/ (or pass --data-dir)")
    rows = _read_rows(found)
    out: list[BenchRecord] = []
    for row in rows:
        text = row.get(spec.column) or row.get(spec.column.lower()) or row.get(spec.column.capitalize())
        if not isinstance(text, str) or not text.strip():
            continue
        kind = spec.kind
        if spec.label_column:
            label = str(row.get(spec.label_column, "")).lower()
            kind = "harmless" if label in ("safe", "benign", "0", "harmless") else "harmful"
        media = None
        if spec.image_column and row.get(spec.image_column):
            media = str((found.parent / str(row[spec.image_column])).resolve())
        out.append(BenchRecord(text.strip(), kind, media))
        if limit and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"{found} has no usable rows (expected a {spec.column!r} column)")
    return out
