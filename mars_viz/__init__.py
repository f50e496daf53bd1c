"""mars_viz: Modality-Agnostic Refusal Steering (MARS) for multimodal LLMs, as a library and a dashboard.

Modules, in data-flow order: media -> inputs/backbone -> hooks/activations -> geometry -> plots -> ui.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
