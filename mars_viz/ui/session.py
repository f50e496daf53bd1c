"""The explicit context object the app holds: one loaded backbone, a lock that serialises model access, and why
this model was chosen (e.g. the offline fallback). Never a module global.

Hooks are global to the module they are attached to, so two requests must never run the model at once: every
model call in the UI goes through `Session.lock`.

Example:
    >>> session = open_session("/tmp/tiny/qwen2_vl")        # doctest: +SKIP
    >>> with session.lock:                                  # doctest: +SKIP
    ...     acts = collect_activations(session.backbone, queries)
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..core.state import MarsConfig, MarsState
from ..fit.cache import calibrate_cached
from ..model.backbone import Backbone, load_backbone
from ..paths import cache_dir

__all__ = ["DEFAULT_MODEL", "FALLBACK_ARCH", "Session", "open_session"]

# Qwen2-VL-2B-Instruct: safety-tuned (refuses clearly harmful requests), native image *and* video paths, and ~4.5 GB
# in bf16 / ~9 GB in fp32, so it runs on a laptop CPU or any 8 GB GPU.
DEFAULT_MODEL = "Qwen/Qwen2-VL-2B-Instruct"
FALLBACK_ARCH = "qwen2_vl"


@dataclass
class Session:
    """The model, its MARS state, and the lock every model call takes. Shared by all users of one app."""

    backbone: Backbone
    notice: str = ""  # shown in the UI header, e.g. "fell back to the tiny demo model"
    lock: threading.Lock = field(default_factory=threading.Lock)
    state: MarsState | None = None
    state_source: str = ""  # where the state came from (file, cache, fitted now)
    config: MarsConfig = field(default_factory=MarsConfig)
    generation: int = 0  # bumped when the model or the state is replaced; each page compares it with its last run
    change: str = ""  # what the last bump replaced, in words (shown in the pages' "run again" banner)
    pair_strategy: str = "auto"  # how both answers are computed: auto, gate_first, batched or doubled (steer/pair.py)
    showcase: list = field(default_factory=list)  # `showcase.ShowcaseEntry`s of the last evaluation (Learn shows them)

    def set_state(self, state: MarsState | None, source: str) -> None:
        """Install `state` (call with `lock` held). Replacing a state by a different one bumps `generation`."""
        old = self.state
        self.state, self.state_source = state, source
        if old is not None and (state is None or state.fingerprint() != old.fingerprint()):
            self._changed(f"state {source}")

    def _changed(self, what: str) -> None:
        self.generation += 1
        self.change = what
        self.showcase = []  # drawn from the old model or state's behaviour

    def ensure_state(self, progress=None) -> MarsState:
        """The fitted state; fits (or loads from the per-model cache) on first use. Call with `lock` held."""
        if self.state is None:
            state, folder, hit = calibrate_cached(self.backbone, self.config, progress=progress)
            self.set_state(state, f"{'loaded from cache' if hit else 'fitted now'}: {folder}")
        return self.state

    def cached_state(self) -> MarsState | None:
        """The cached state for this model and config if one exists (no fitting)."""
        if self.state is None:
            try:
                state, folder, hit = calibrate_cached(self.backbone, self.config, only_cached=True)
            except LookupError:
                return None
            self.set_state(state, f"loaded from cache: {folder}")
        return self.state

    def load_state(self, path: str | os.PathLike) -> MarsState:
        state = MarsState.load(path)
        state.check_compatible(self.backbone)
        self.set_state(state, f"loaded from {path}")
        return state

    def switch_model(self, model: str, **load_kwargs) -> None:
        """Load another model (call with `lock` held); its state must be fitted or loaded again."""
        self.backbone = load_backbone(model, **load_kwargs)
        self.state, self.state_source, self.notice = None, "", ""
        self._changed(f"model {model} loaded")


def _fallback_model() -> Path:
    from ..model.demo_models import build_demo_model

    path = cache_dir() / "demo" / FALLBACK_ARCH
    if not (path / "mars_demo.json").exists():
        build_demo_model(FALLBACK_ARCH, path)
    return path


def cached_mllms(cache: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """Supported multimodal models already in the local Hugging Face cache: (repo id, snapshot folder), newest
    first. What an offline user can run without downloading anything."""
    import json

    from huggingface_hub import constants, scan_cache_dir

    from ..model.backbone import DECODER_LAYERS_FALLBACK

    cache = cache or os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE  # the env var wins, read now
    try:
        info = scan_cache_dir(cache)
    except Exception:  # noqa: BLE001 - no cache folder, or not a cache: nothing to offer
        return []
    found = []
    for repo in sorted(info.repos, key=lambda r: r.last_modified, reverse=True):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            config = Path(rev.snapshot_path) / "config.json"
            try:
                model_type = json.loads(config.read_text()).get("model_type")
            except (OSError, ValueError):
                continue
            if model_type in DECODER_LAYERS_FALLBACK:
                found.append((repo.repo_id, Path(rev.snapshot_path)))
                break
    return found


def open_session(model: str | None = None, *, fallback: bool = True, **load_kwargs) -> Session:
    """Load `model` (default: DEFAULT_MODEL). If that fails and `fallback`, use a supported MLLM from the local
    Hugging Face cache, else the built-in tiny demo model, and say so plainly in `Session.notice`; an explicitly
    requested model that fails raises ValueError."""
    explicit = model is not None
    target = model or DEFAULT_MODEL
    try:
        return Session(backbone=load_backbone(target, **load_kwargs))
    except ValueError as e:
        if explicit or not fallback:
            raise
        for repo_id, snapshot in cached_mllms():
            try:
                backbone = load_backbone(snapshot, **load_kwargs)
            except ValueError as err:
                logging.getLogger("mars_viz").warning("cached model %s could not be loaded: %s", repo_id, err)
                continue
            backbone.model_id = repo_id  # name it as the user knows it
            return Session(backbone=backbone, notice=(
                f"The default model {DEFAULT_MODEL} is not available; using {repo_id}, found in the local Hugging "
                "Face cache. Start with --model PATH_OR_ID to choose another."))
        path = _fallback_model()
        logging.getLogger("mars_viz").warning("default model %s could not be loaded: %s", DEFAULT_MODEL, e)
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        why = ("it is not in the local Hugging Face cache and the hub is offline" if offline else
               "it could not be loaded")
        notice = (f"The default model {DEFAULT_MODEL} is not available ({why}; details in the server log). Using the "
                  f"built-in tiny {FALLBACK_ARCH} demo model instead: it has random weights, so its answers are "
                  "gibberish. Start with --model PATH_OR_ID for a real model.")
        return Session(backbone=load_backbone(path, **{k: v for k, v in load_kwargs.items() if k != "layers_path"}),
                       notice=notice)
