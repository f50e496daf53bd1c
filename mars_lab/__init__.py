"""A reading graft: a small Qwen2-VL vision tower trained here so that images of text carry words to a frozen LLM.

`python -m mars_viz graft --llm PATH --out DIR` builds it; see the README section "A reading graft (lab model)".
Modules: `render` (training images and phrase sets), `train` (objective and loop), `build` (config, processor,
weights, the pipeline), `metrics` (word recall, character accuracy).
"""

from __future__ import annotations

from .build import graft
from .train import GraftConfig

__all__ = ["GraftConfig", "graft"]
