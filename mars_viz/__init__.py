"""mars_viz: Modality-Agnostic Refusal Steering (MARS) for multimodal LLMs, as a library and a dashboard.

Modules, in data-flow order: media -> inputs/backbone -> hooks/activations -> geometry -> plots -> ui.
Importing the package registers the project's own lab model type (`mars_reader`, see `mars_viz.model.reader`) with
transformers' Auto classes, so its checkpoints load like any other.
"""

from .model.reader import register as _register_reader

__version__ = "0.1.0"
__all__ = ["__version__"]

_register_reader()
