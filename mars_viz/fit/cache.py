"""The per-model cache of fitted MARS states: where it lives, how an entry is keyed, and fit-or-load.

One home for all three, so the app's first run, the CLI and the tests cannot disagree about which entry belongs to a
model + config + prompt sets. `calibrate` fits and knows nothing of caching; `session` asks this module. Neither of
them imports the other.

Example:
    >>> state, folder, hit = calibrate_cached(backbone, MarsConfig(max_prompts=64))   # doctest: +SKIP
    >>> folder.relative_to(cache_dir())                    # doctest: +SKIP
    PosixPath('states/Qwen_Qwen2-VL-2B-Instruct/3f0c...')
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

from ..core.state import STATE_JSON, MarsConfig, MarsState
from ..data.datasets import builtin_prompts, prompts_hash
from ..data.judge import RefusalJudge
from ..model.backbone import Backbone
from ..paths import cache_dir
from .calibrate import CalibrationProgress, calibrate

__all__ = ["cache_dir", "calibrate_cached", "load_cached", "state_cache_key", "state_folder"]


def state_cache_key(backbone: Backbone, config: MarsConfig, harmful: Sequence[str], harmless: Sequence[str]) -> str:
    """16 hex digits naming one fit: model identity and shape, the whole config, and hashes of both prompt sets."""
    blob = json.dumps({"model": backbone.model_id, "type": backbone.model_type, "L": backbone.num_layers,
                       "d": backbone.hidden_size, "config": config.to_dict(),
                       "harmful": prompts_hash(list(harmful)), "harmless": prompts_hash(list(harmless))},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def state_folder(backbone: Backbone, config: MarsConfig, harmful: Sequence[str], harmless: Sequence[str],
                 cache_root: Path | None = None) -> Path:
    """`<cache_root or cache_dir()/states>/<model id, filesystem-safe>/<state_cache_key>`."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", backbone.model_id.strip("/"))[-80:]
    return (cache_root or cache_dir() / "states") / name / state_cache_key(backbone, config, harmful, harmless)


def load_cached(backbone: Backbone, folder: Path) -> MarsState | None:
    """The state saved in `folder` if it loads and fits `backbone`; None when absent, corrupt or stale."""
    if not (folder / STATE_JSON).exists():
        return None
    try:
        state = MarsState.load(folder)
        state.check_compatible(backbone)
    except ValueError:
        return None
    return state


def calibrate_cached(backbone: Backbone, config: MarsConfig | None = None, harmful: Sequence[str] | None = None,
                     harmless: Sequence[str] | None = None, judge: RefusalJudge | None = None,
                     progress: CalibrationProgress | None = None, cache_root: Path | None = None,
                     only_cached: bool = False) -> tuple[MarsState, Path, bool]:
    """`calibrate`, cached per model + config + prompt sets. Returns (state, folder, loaded_from_cache).

    With `only_cached`, raises LookupError instead of fitting when there is no usable cache entry; a corrupt or
    stale entry is refitted and overwritten."""
    cfg = config or MarsConfig()
    harmful = list(harmful or builtin_prompts("harmful"))
    harmless = list(harmless or builtin_prompts("harmless"))
    folder = state_folder(backbone, cfg, harmful, harmless, cache_root)
    state = load_cached(backbone, folder)
    if state is not None:
        return state, folder, True
    if only_cached:
        raise LookupError(f"no cached MARS state for {backbone.model_id} in {folder}")
    state = calibrate(backbone, cfg, harmful, harmless, judge, progress)
    state.save(folder)
    return state, folder, False
