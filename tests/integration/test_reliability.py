"""Bad inputs through the CLI and the app, hook leaks on every path, concurrent users, safe defaults, fuzzing."""

from __future__ import annotations

import concurrent.futures as cf
import re

import pytest
import torch
from gradio_client import Client, handle_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mars_viz.cli import main as cli
from mars_viz.core.state import MarsConfig
from mars_viz.model.hooks import capture_residuals, count_hooks
from mars_viz.model.inputs import Query, build_batch, clean_prompt
from mars_viz.model.media import load_image, prepare_image, read_video
from mars_viz.steer.pair import run_pairs
from mars_viz.steer.steering import SteerOptions, mars_steering
from mars_viz.steer.stream import stream_pair

from ..conftest import SMALL_CONFIG
from ..corpus import build_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    items = build_corpus(tmp_path_factory.mktemp("corpus"))
    assert len(items) >= 25
    return items


def _check(expect: str, error: str | None, name: str) -> None:
    if error is None:
        assert "ok" in expect.split("|"), f"{name}: accepted, but expected an error matching {expect!r}"
    else:
        assert re.search(expect, error), f"{name}: error {error!r} does not match {expect!r}"


def test_corpus_through_the_library(corpus):
    for name, kind, value, expect in corpus:
        error = None
        try:
            if kind == "image":
                assert load_image(value).mode == "RGB"
            elif kind == "video":
                v = read_video(value, num_frames=8, max_seconds=10)
                assert 1 <= len(v.frames) <= 8 and all(max(f.size) <= 1024 for f in v.frames)
                if name == "long.mp4":
                    assert any("first 10s" in n for n in v.notes)
            else:
                clean_prompt(value)
        except ValueError as e:
            error = str(e)
        _check(expect, error, name)


def test_corpus_through_the_cli(corpus, tiny_dirs, capsys):
    model = str(tiny_dirs("qwen2_vl"))
    for name, kind, value, expect in corpus:
        args = ["capture", "--model", model, "--prompt", value if kind == "prompt" else "What is this?"]
        if kind == "image":
            args += ["--image", value]
        elif kind == "video":
            args += ["--video", value, "--frames", "4"]
        code = cli.main(args)
        err = capsys.readouterr().err.strip()
        last = err.splitlines()[-1] if err else ""
        if code == 0:
            _check(expect, None, name)
        else:
            assert code == 1 and last.startswith("error:"), (name, err[-300:])
            assert "Traceback" not in err
            _check(expect, last, name)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_corpus_through_the_app_and_it_stays_up(corpus, app_server):
    client = Client(app_server["url"], verbose=False)
    for name, kind, value, expect in corpus:
        image = handle_file(value) if kind == "image" else None
        video = handle_file(value) if kind == "video" else None
        prompt = value if kind == "prompt" else "What is this?"
        error = None
        try:
            client.predict(prompt, image, video, 1.0, None, None, True, True, 2, 4, api_name="/analyze")
        except Exception as e:  # gradio_client raises AppError with the gr.Error message
            error = str(e)
        _check(expect, error, name)
    assert client.predict("still alive", None, None, 1.0, None, None, True, True, 2, 4,
                          api_name="/analyze")["modality"] == "text"


def test_state_from_another_model_cli_and_app(app_server, tiny_backbones, tmp_path, capsys):
    from mars_viz.fit.calibrate import calibrate

    other = calibrate(tiny_backbones("gemma3"), MarsConfig(**SMALL_CONFIG))
    folder = other.save(tmp_path / "gemma-state")
    code = cli.main(["run", "--model", str(app_server["session"].backbone.model_id), "--state", str(folder),
                     "--prompt", "hi"])
    assert code == 1 and "fitted on" in capsys.readouterr().err
    client = Client(app_server["url"], verbose=False)
    with pytest.raises(Exception, match="fitted on"):
        client.predict([handle_file(str(folder / "mars_state.json")),
                        handle_file(str(folder / "mars_state.safetensors"))], api_name="/load_state")
    assert app_server["session"].state is not None and app_server["session"].state.model_type == "qwen2_vl"


# ---- hooks never leak ------------------------------------------------------------------------------------------------

def _boom(*_a, **_k):
    raise RuntimeError("boom")


@pytest.fixture
def qwen(app_server):
    session = app_server["session"]
    with session.lock:
        state = session.ensure_state()
    return session.backbone, state


def _raises_without_leak(model, register, action, match: str) -> None:
    """`register()` a failing test hook, run `action`, expect the error; afterwards no hook of ours may remain."""
    before = count_hooks(model)
    handle = register()
    try:
        with pytest.raises(RuntimeError, match=match):
            action()
    finally:
        handle.remove()
    assert count_hooks(model) == before


def test_no_hook_left_after_steering_raises(qwen):
    bb, state = qwen
    _raises_without_leak(bb.model, lambda: bb.layers[-1].register_forward_hook(_boom),
                         lambda: run_pairs(bb, state, [Query("hi")], SteerOptions(tau=-100.0), max_new_tokens=2),
                         "boom")


def test_no_hook_left_after_generation_raises_mid_stream(qwen):
    bb, state = qwen
    calls = {"n": 0}

    def late_boom(*_a):
        calls["n"] += 1
        if calls["n"] == 3:  # during decode, after prefill
            raise RuntimeError("decode failed")

    def consume():
        for _ in stream_pair(bb, state, Query("Tell me a story"), SteerOptions(), max_new_tokens=8):
            pass

    _raises_without_leak(bb.model, lambda: bb.model.register_forward_pre_hook(late_boom), consume, "decode failed")


def test_no_hook_left_when_the_consumer_stops_early(qwen):
    bb, state = qwen
    before = count_hooks(bb.model)
    gen = stream_pair(bb, state, Query("Tell me a story"), SteerOptions(), max_new_tokens=16)
    next(gen)
    gen.close()  # a closed browser tab: the worker finishes, its hooks go
    assert count_hooks(bb.model) == before


def test_no_hook_left_after_edit_function_raises(qwen):
    from mars_viz.model.hooks import edit_position

    bb, state = qwen
    before = count_hooks(bb.model)
    batch = build_batch(bb, [Query("hi")])

    def bad_edit(h, info):
        raise RuntimeError("edit failed")

    with pytest.raises(RuntimeError, match="edit failed"):
        with capture_residuals(bb.layers), edit_position(bb.layers[1], bad_edit):
            bb.model(**batch)
    with pytest.raises(ValueError, match="out of range"):
        with mars_steering(bb, state, SteerOptions(layer=99), ["text"]):
            bb.model(**batch)
    assert count_hooks(bb.model) == before


# ---- concurrency -----------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(300)
def test_eight_concurrent_users_get_what_they_get_alone(app_server):
    """Mixed steering on/off and strengths from 8 clients at once; each equals the same request made alone."""
    url = app_server["url"]
    requests = [("Tell me about whales", True, 1.0, "-100"), ("Tell me about whales", False, 1.0, "-100"),
                ("Write a poem about rain", True, 0.5, "-100"), ("Write a poem about rain", True, 2.0, "-100"),
                ("How do tides work?", True, 1.0, ""), ("How do tides work?", False, 0.0, ""),
                ("Name a colour", True, 3.0, "-100"), ("Name a colour", True, 1.0, "100")]

    def call(req):
        prompt, steer, strength, tau = req
        client = Client(url, verbose=False)
        r = client.predict(prompt, None, None, strength, None, float(tau) if tau else None, True, steer, 8,
                           api_name="/analyze")
        return r["unsteered"]["text"], r["steered"]["text"], r["displacement_norm"], r["gate_open"]

    alone = [call(r) for r in requests]
    with cf.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(call, requests))
    assert together == alone
    assert alone[0][2] > 0 and alone[1][2] == 0  # steering on vs off really differ in the hook's work


# ---- safe defaults ---------------------------------------------------------------------------------------------------

def test_safe_defaults(tmp_path, tiny_backbones):
    import inspect

    from mars_viz.model.backbone import load_backbone
    from mars_viz.ui.app import launch_kwargs

    kw = launch_kwargs()
    assert kw["server_name"] == "127.0.0.1" and kw["share"] is False and kw["max_file_size"] == "200mb"
    assert len(kw["allowed_paths"]) == 1 and kw["allowed_paths"][0].endswith("assets/examples")
    assert inspect.signature(load_backbone).parameters["trust_remote_code"].default is False
    from mars_viz.fit.calibrate import calibrate

    folder = calibrate(tiny_backbones("llava"), MarsConfig(**SMALL_CONFIG)).save(tmp_path / "s")
    assert sorted(p.name for p in folder.iterdir()) == ["mars_state.json", "mars_state.safetensors"]


# ---- fuzzing ---------------------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes_never_crash_image_loading(data):
    try:
        assert load_image(data).mode == "RGB"
    except ValueError:
        pass


MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "I;16", "RGBX"]


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(MODES), st.integers(1, 300), st.integers(1, 300), st.integers(16, 256))
def test_fuzz_modes_and_sizes(mode, w, h, cap):
    from PIL import Image

    out = prepare_image(Image.new(mode, (w, h)), max_side=cap)
    assert out.mode == "RGB" and max(out.size) <= max(cap, 1) and min(out.size) >= 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=300))
def test_fuzz_prompts_through_the_input_layer(tiny_backbones, text):
    bb = tiny_backbones("qwen2_vl")
    try:
        prompt = clean_prompt(text)
    except ValueError:
        return
    batch = build_batch(bb, [Query(prompt)])
    assert batch["input_ids"].shape[0] == 1 and torch.all(batch["attention_mask"][0, -1] == 1)
