"""mars_viz: Modality-Agnostic Refusal Steering (MARS) for multimodal LLMs, as a library and a dashboard.

The public API (README, "Use it as a library"):

    >>> import mars_viz as mv                                                         # doctest: +SKIP
    >>> backbone = mv.load_backbone(path)            # or mv.Backbone.from_model(model, processor)   # doctest: +SKIP
    >>> state = mv.calibrate(backbone)               # or mv.MarsState.load(folder)   # doctest: +SKIP
    >>> with mv.steering(backbone, state, batch):                                       # doctest: +SKIP
    ...     backbone.model.generate(**batch, max_new_tokens=64)

The folders, lowest layer first (each folder's docstring says what it may import; tests/unit/test_imports.py checks
it): `core` (the MARS maths and the fitted state), `model` (loading, inputs, hooks), `data` (prompt sets, the refusal
judge, examples), `steer` (the steering hook, the steered/unsteered pair), `maps` (where in the input), `fit` (the
calibration), `analysis` (one input end to end, the evaluation), `views` (figures), `ui` (the Gradio dashboard), `cli`.
`api` is the front door above. The lab graft lives apart, in the `mars_lab` package.

Importing the package registers the project's own lab model type (`mars_reader`, see `mars_viz.model.reader`) with
transformers' Auto classes, so its checkpoints load like any other.
"""

import importlib

from .model.reader import register as _register_reader

__version__ = "0.1.0"
# name -> the module that defines it. Loaded on first use (PEP 562), so `import mars_viz.paths` or one folder's
# module does not pull in the whole library.
_EXPORTS = {
    "GateReading": "api", "score": "api", "steering": "api",
    "MarsConfig": "core.state", "MarsState": "core.state",
    "FitChoices": "fit.calibrate", "calibrate": "fit.calibrate",
    "Backbone": "model.backbone", "load_backbone": "model.backbone",
    "build_demo_model": "model.demo_models",
    "Query": "model.inputs", "build_batch": "model.inputs", "row_modalities": "model.inputs",
    "SteerOptions": "steer.steering",
}
__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mars_viz' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


_register_reader()
