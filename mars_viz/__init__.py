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

from .api import GateReading, score, steering
from .core.state import MarsConfig, MarsState
from .fit.calibrate import calibrate
from .model.backbone import Backbone, load_backbone
from .model.demo_models import build_demo_model
from .model.inputs import Query, build_batch, row_modalities
from .model.reader import register as _register_reader
from .steer.steering import SteerOptions

__version__ = "0.1.0"
__all__ = ["Backbone", "GateReading", "MarsConfig", "MarsState", "Query", "SteerOptions", "__version__",
           "build_batch", "build_demo_model", "calibrate", "load_backbone", "row_modalities", "score", "steering"]

_register_reader()
