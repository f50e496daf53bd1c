"""Shared fixtures: tiny random models of every architecture (built once per session, offline), video files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARCHS = ["llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "mars_reader", "idefics3", "gemma3"]
REAL_ROOT = Path(os.environ.get("MARS_REAL_ROOT", "/tmp/mars-real"))


# Test tiers (README, "Testing"): the tiers that need an explicit, larger @pytest.mark.timeout(N) than the ini default.
EXPLICIT_TIMEOUT_MARKERS = ("slow", "browser", "real")
TIMEOUT_PROBLEMS = pytest.StashKey[list]()


@pytest.hookimpl(tryfirst=True)  # before -m deselects, so the check sees every collected test
def pytest_collection_modifyitems(config, items):
    """Record tests without a working timeout: a timeout marker of 0 (none), or a slow/browser/real test that relies
    on the ini default (sized for the fast tier). tests/unit/test_tiers.py fails on any."""
    default = float(config.getini("timeout") or 0)
    problems = []
    for item in items:
        marker = item.get_closest_marker("timeout")
        value = marker.kwargs.get("timeout", marker.args[0] if marker.args else None) if marker else None
        tiers = [m for m in EXPLICIT_TIMEOUT_MARKERS if item.get_closest_marker(m)]
        if marker is None and tiers:
            problems.append(f"{item.nodeid}: {'/'.join(tiers)} without @pytest.mark.timeout(N)")
        elif marker is not None and not (value and float(value) >= default):
            problems.append(f"{item.nodeid}: timeout {value!r} is none or below the default {default:g}s")
    config.stash[TIMEOUT_PROBLEMS] = problems


def real_model(name: str) -> Path:
    path = REAL_ROOT / name
    if not (path / ".ok").exists():
        pytest.skip(f"real backbone {name} not built (see README, 'Development')")
    return path


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """arch -> folder of a tiny demo model, built lazily once per test session."""
    from mars_viz.model.demo_models import build_demo_model

    root = tmp_path_factory.mktemp("tiny")
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = build_demo_model(arch, root / arch)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def tiny_backbones(tiny_dirs):
    """arch -> loaded Backbone (cached per session)."""
    from mars_viz.model.backbone import load_backbone

    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = load_backbone(tiny_dirs(arch), device="cpu")
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def video_file(tmp_path_factory):
    """A real 12-frame MP4 (4 fps) of distinct solid colours, written with PyAV."""
    from mars_viz.model.media import neutral_video
    from mars_viz.model.videoio import write_video

    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    return Path(write_video(path, neutral_video(12, seed=3, size=64), fps=4))


SMALL_CONFIG = dict(max_prompts=12, k_neutral=3, neutral_prompts=3, curve_prompts=3, steer_prompts=3,
                    filter_tokens=3, levels=(1.0, 2.0, 4.0), batch_size=8)


@pytest.fixture(scope="session")
def fitted(tiny_backbones, tmp_path_factory):
    """arch -> a MarsState from a small calibration (SMALL_CONFIG), saved and loaded back; cached per session."""
    from mars_viz.core.state import MarsConfig, MarsState
    from mars_viz.fit.calibrate import calibrate

    cache = {}

    def get(arch: str):
        if arch not in cache:
            state = calibrate(tiny_backbones(arch), MarsConfig(**SMALL_CONFIG))
            folder = state.save(tmp_path_factory.mktemp(f"state-{arch}"))
            cache[arch] = MarsState.load(folder)
        return cache[arch]

    return get


def wait_until(cond, timeout: float, step: float = 0.01) -> float:
    """Seconds until `cond()` holds; fails after `timeout`."""
    import time

    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(step)
    return time.monotonic() - t0


def model_held(session) -> bool:
    """Whether a run holds the session's model (the lock, and a holder recorded)."""
    return session.lock.locked() and session.runs.holder is not None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def app_server(tiny_dirs, tmp_path_factory):
    """A real Gradio server on the tiny qwen2_vl model (small calibration), shared by the UI tests."""
    from mars_viz.core.state import MarsConfig
    from mars_viz.ui import create_app
    from mars_viz.ui.app import launch_kwargs
    from mars_viz.ui.session import open_session

    os.environ["MARS_VIZ_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    session = open_session(str(tiny_dirs("qwen2_vl")), device="cpu")
    session.config = MarsConfig(**SMALL_CONFIG)
    demo = create_app(session)
    demo.queue(default_concurrency_limit=4)
    port = _free_port()
    demo.launch(prevent_thread_lock=True, **launch_kwargs(port=port))
    yield {"url": f"http://127.0.0.1:{port}/", "session": session}
    demo.close()


@pytest.fixture(scope="module")
def class_server(tiny_dirs, fitted, tmp_path_factory):
    """A real server on the tiny qwen2_vl model, fitted, that allows long answers (to have something to stop)."""
    import os

    from mars_viz.ui import create_app
    from mars_viz.ui.app import launch_kwargs
    from mars_viz.ui.serving import ServerLimits, SessionFiles
    from mars_viz.ui.session import open_session

    os.environ["MARS_VIZ_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    session = open_session(str(tiny_dirs("qwen2_vl")), device="cpu")
    session.set_state(fitted("qwen2_vl"), "test")
    session.limits = ServerLimits(max_new_tokens=4000, session_ttl_s=600)
    session.files = SessionFiles(tmp_path_factory.mktemp("server-files"), ttl_s=600)
    # no EOS: every answer runs to its max_new_tokens, so a long one is long
    session.backbone.model.generation_config.eos_token_id = None
    demo = create_app(session)
    demo.queue()
    port = _free_port()
    demo.launch(prevent_thread_lock=True, **launch_kwargs(port=port))
    yield {"url": f"http://127.0.0.1:{port}/", "session": session, "demo": demo}
    demo.close()
