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

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..core.state import MarsConfig, MarsState
from ..fit.cache import calibrate_cached
from ..model.backbone import Backbone, _friendly_load_error, load_backbone
from ..model.memory import OutOfMemory, release_memory
from ..paths import cache_dir
from ..steer.cancel import cancellable, raise_if_cancelled
from .serving import Runs, ServerLimits, SessionFiles

__all__ = ["DEFAULT_MODEL", "FALLBACK_ARCH", "LoadOptions", "Session", "open_session"]

log = logging.getLogger("mars_viz")

# Qwen2-VL-2B-Instruct: safety-tuned (refuses clearly harmful requests), native image *and* video paths, and ~4.5 GB
# in bf16 / ~9 GB in fp32, so it runs on a laptop CPU or any 8 GB GPU.
DEFAULT_MODEL = "Qwen/Qwen2-VL-2B-Instruct"
FALLBACK_ARCH = "qwen2_vl"


@dataclass(frozen=True)
class LoadOptions:
    """How the app loads a model: its launch options (`--device`, `--dtype`, `--device-map`, `--trust-remote-code`,
    `--layers-path`), kept by the session so that a model switched in the Calibrate tab loads the same way.

        >>> LoadOptions(dtype="bfloat16", device_map="auto").describe()
        'dtype bfloat16, device_map auto'
    """

    device: str | None = None
    dtype: Any = None  # "float32", "bfloat16", "float16", a torch.dtype, or None (bf16 on a GPU, fp32 on the CPU)
    device_map: str | dict | None = None
    trust_remote_code: bool = False
    layers_path: str | None = None

    def kwargs(self) -> dict[str, Any]:
        """`load_backbone`'s keyword arguments."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def describe(self) -> str:
        """The options that differ from the defaults, in words ("defaults" when none do)."""
        return ", ".join(f"{f.name} {getattr(self, f.name)}" for f in fields(self)
                         if getattr(self, f.name) != f.default) or "defaults"


@dataclass
class _Loaded:
    """What the session's backbone was loaded from, and how: enough to load it again after a failed switch."""

    source: str  # the folder or hub id given to `load_backbone`
    options: LoadOptions
    model_id: str  # the name it was shown under (a cached snapshot keeps its repo id)


@dataclass
class Session:
    """The model, its MARS state, and the lock every model call takes. Shared by all users of one app."""

    backbone: Backbone  # None only while `switch_model` loads another one (with `lock` held)
    notice: str = ""  # shown in the UI header, e.g. "fell back to the tiny demo model"
    options: LoadOptions = field(default_factory=LoadOptions)  # the launch options, reused by `switch_model`
    loaded: _Loaded | None = None  # where `backbone` came from (None: built by the caller, e.g. from its model_id)
    lock: threading.Lock = field(default_factory=threading.Lock)
    state: MarsState | None = None
    state_source: str = ""  # where the state came from (file, cache, fitted now)
    config: MarsConfig = field(default_factory=MarsConfig)
    generation: int = 0  # bumped when the model or the state is replaced; each page compares it with its last run
    change: str = ""  # what the last bump replaced, in words (shown in the pages' "run again" banner)
    pair_strategy: str = "auto"  # how both answers are computed: auto, gate_first, batched or doubled (steer/pair.py)
    showcase: list = field(default_factory=list)  # `showcase.ShowcaseEntry`s of the last evaluation (Learn shows them)
    runs: Runs = field(default_factory=Runs)  # work in flight, per browser session (a Stop or a closed tab ends it)
    files: SessionFiles = field(default_factory=SessionFiles)  # one temporary folder per browser session
    limits: ServerLimits = field(default_factory=ServerLimits)
    allow_any_model: bool = True  # False (the app's default): Calibrate loads only presets and cached models

    @contextlib.contextmanager
    def work(self, key: str | None, what: str) -> Iterator[threading.Event]:
        """Hold the model for one request of browser session `key` (Gradio's session hash; None for a script): the
        lock, and an event that `runs.cancel(key)` sets to end the work at its next decode step (`steer.cancel`),
        bound to this context; a generator that yields inside passes it on explicitly (`analyze_stream(cancel=)`).
        `what` is shown to the pages that wait while it runs (`runs.activity`); `runs.say` updates it."""
        with self.runs.run(key) as event, self.lock:
            self.runs.hold(key, what)
            try:
                with cancellable(event):
                    raise_if_cancelled()  # stopped while it waited for the model
                    yield event
            finally:
                self.runs.release()

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
        """The cached state for this model and config if one exists (no fitting). Installing it takes the lock; while
        another request holds the model (a generation, a fit, a model switch) the page gets what is there now."""
        if self.state is not None or not self.lock.acquire(blocking=False):
            return self.state
        try:
            backbone = self.backbone
            if self.state is None and backbone is not None:  # None: another model is loading
                try:
                    state, folder, _ = calibrate_cached(backbone, self.config, only_cached=True)
                except LookupError:
                    return None
                self.set_state(state, f"loaded from cache: {folder}")
            return self.state
        finally:
            self.lock.release()

    def load_state(self, path: str | os.PathLike) -> MarsState:
        state = MarsState.load(path)
        state.check_compatible(self.backbone)
        self.set_state(state, f"loaded from {path}")
        return state

    def switch_model(self, model: str, options: LoadOptions | None = None) -> None:
        """Load another model in place of this one (call with `lock` held), the way the app was launched (`options`,
        default the session's launch options). Its state must be fitted or loaded again.

        Two models rarely fit at once, so the current one is released first (references dropped, garbage collected,
        the CUDA cache emptied). A model that cannot be found (a missing folder, an unknown id, offline) fails
        before that and the current one stays. One that fails to load after it (out of memory, a broken checkpoint)
        brings the previous model back, with its state, and raises with both stories told; if even that fails, the
        built-in tiny demo model is loaded, and `change` says so.
        """
        options = options or self.options
        _check_config(model, options)
        previous = self._release()
        try:
            backbone = load_backbone(model, **options.kwargs())
        except Exception as e:
            if not isinstance(e, ValueError):  # a bug: it keeps its traceback
                self._restore(previous)
                raise
            release_memory(e)  # what the failed load still holds, before loading the previous model again
            sequel = self._restore(previous)
            if isinstance(e, OutOfMemory):
                raise OutOfMemory(f"{e} {sequel}", device=e.device, needed=e.needed, free=e.free) from None
            raise ValueError(f"{e} {sequel}") from None
        self.backbone, self.loaded = backbone, _Loaded(str(model), options, backbone.model_id)
        self.state, self.state_source, self.notice = None, "", ""
        self._changed(f"model {model} loaded ({options.describe()})")

    def _release(self) -> _Previous:
        """Drop the current backbone (and so, once nothing else holds it, the model) and return what it takes to
        load it again."""
        bb = self.backbone
        loaded = self.loaded or _Loaded(bb.model_id, self.options, bb.model_id)
        previous = _Previous(loaded, self.state, self.state_source, self.notice, bb.display_name)
        self.backbone, self.loaded, self.state = None, None, None  # type: ignore[assignment]
        del bb
        release_memory()
        return previous

    def _restore(self, previous: _Previous) -> str:
        """Load the released model again after a failed switch; returns what happened, in words."""
        try:
            backbone = load_backbone(previous.loaded.source, **previous.loaded.options.kwargs())
        except Exception as e:  # noqa: BLE001 - whatever it is, the session must end with a model
            log.exception("the previous model %s could not be loaded again", previous.name)
            release_memory(e)
            path = _fallback_model()
            demo = replace(self.options, layers_path=None)
            self.backbone, self.loaded = load_backbone(path, **demo.kwargs()), _Loaded(str(path), demo, str(path))
            self.state, self.state_source = None, ""
            self.notice = (f"The previous model {previous.name} could not be loaded again; the built-in tiny random "
                           "demo model is loaded instead. Load a model in the Calibrate tab.")
            self._changed(f"the previous model {previous.name} could not be loaded again, so the built-in tiny "
                          "random demo model is loaded")
            return (f"The previous model {previous.name} could not be loaded again either ({e}): the built-in tiny "
                    "random demo model is loaded instead; load a model in the Calibrate tab.")
        backbone.model_id = previous.loaded.model_id
        self.backbone, self.loaded = backbone, previous.loaded
        self.state, self.state_source, self.notice = previous.state, previous.state_source, previous.notice
        return f"The previous model {previous.name} is loaded again, with its MARS state."


@dataclass
class _Previous:
    """A released model, to load again if its replacement fails."""

    loaded: _Loaded
    state: MarsState | None
    state_source: str
    notice: str
    name: str


def _check_config(model: str, options: LoadOptions) -> None:
    """Fail fast, before the current model is released, when `model` cannot be found: its config is read (a small
    file; from the hub cache when offline). Raises `load_backbone`'s ValueError."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(model), trust_remote_code=options.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, hub errors: all "cannot be loaded"
        raise _friendly_load_error(str(model), e) from None


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

    from ..model.archs import ARCHS

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
            if model_type in ARCHS:
                found.append((repo.repo_id, Path(rev.snapshot_path)))
                break
    return found


def open_session(model: str | None = None, *, fallback: bool = True, **load_kwargs) -> Session:
    """Load `model` (default: DEFAULT_MODEL) with `load_kwargs` (`LoadOptions`' fields: the launch options, which
    the session keeps for a later `switch_model`). If that fails and `fallback`, use a supported MLLM from the local
    Hugging Face cache, else the built-in tiny demo model, and say so plainly in `Session.notice`; an explicitly
    requested model that fails raises ValueError (`OutOfMemory` when it does not fit)."""
    options = LoadOptions(**load_kwargs)
    explicit = model is not None
    target = model or DEFAULT_MODEL
    try:
        backbone = load_backbone(target, **options.kwargs())
        return Session(backbone=backbone, options=options, loaded=_Loaded(str(target), options, backbone.model_id))
    except ValueError as e:
        if explicit or not fallback:
            raise
        for repo_id, snapshot in cached_mllms():
            try:
                backbone = load_backbone(snapshot, **options.kwargs())
            except ValueError as err:
                log.warning("cached model %s could not be loaded: %s", repo_id, err)
                continue
            backbone.model_id = repo_id  # name it as the user knows it
            return Session(backbone=backbone, options=options, loaded=_Loaded(str(snapshot), options, repo_id),
                           notice=(f"The default model {DEFAULT_MODEL} is not available; using {repo_id}, found in "
                                   "the local Hugging Face cache. Start with --model PATH_OR_ID to choose another."))
        path = _fallback_model()
        log.warning("default model %s could not be loaded: %s", DEFAULT_MODEL, e)
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        why = ("it does not fit in this machine's memory" if isinstance(e, OutOfMemory) else
               "it is not in the local Hugging Face cache and the hub is offline" if offline else
               "it could not be loaded")
        notice = (f"The default model {DEFAULT_MODEL} is not available ({why}; details in the server log). Using the "
                  f"built-in tiny {FALLBACK_ARCH} demo model instead: it has random weights, so its answers are "
                  "gibberish. Start with --model PATH_OR_ID for a real model.")
        demo = replace(options, layers_path=None)
        return Session(backbone=load_backbone(path, **demo.kwargs()), options=options,
                       loaded=_Loaded(str(path), demo, str(path)), notice=notice)
