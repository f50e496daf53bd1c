"""Errors told as they are (issue 22): running out of memory reads "out of memory" with the model's size, the free
memory and what to change, on the command line and in the app (which stays up); a bug keeps its traceback in the
log; a model switched in the Calibrate tab loads with the launch options, after the old one is released."""

from __future__ import annotations

import gc
import logging
import shutil
import weakref

import gradio as gr
import pytest
import torch
from transformers import AutoModelForImageTextToText

from mars_viz.cli.main import main
from mars_viz.model import memory
from mars_viz.model.inputs import Query
from mars_viz.model.memory import OutOfMemory, format_bytes, is_out_of_memory, model_bytes, weights_bytes
from mars_viz.steer.steering import SteerOptions

CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 7.6 GiB"
CPU_OOM = "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 B"


def _raise(exc: BaseException):
    def boom(*args, **kwargs):
        raise exc

    return boom


@pytest.fixture
def other_model(tiny_dirs, tmp_path):
    """A second model folder to switch to (a copy of the tiny qwen2_vl: a different source, the same shapes)."""
    return shutil.copytree(tiny_dirs("qwen2_vl"), tmp_path / "other_qwen2_vl")


# --- recognising it --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("err", [torch.OutOfMemoryError(CUDA_OOM), RuntimeError(CPU_OOM), MemoryError(),
                                 RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"),
                                 ValueError("wrapped")])
def test_out_of_memory_is_recognised(err):
    if isinstance(err, ValueError):  # raised while handling one (load errors are re-raised as ValueErrors)
        try:
            try:
                raise torch.OutOfMemoryError(CUDA_OOM)
            except torch.OutOfMemoryError:
                raise err from None
        except ValueError as e:
            err = e
    assert is_out_of_memory(err)


@pytest.mark.parametrize("err", [RuntimeError("mat1 and mat2 shapes cannot be multiplied"), KeyError("layer"),
                                 ValueError("prompt is empty"), OSError("No such file")])
def test_other_errors_are_not_out_of_memory(err):
    assert not is_out_of_memory(err)


def test_free_memory_per_device(monkeypatch):
    assert memory.free_memory("cpu") is None or memory.free_memory("cpu") > 0
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=None: (5 * 2**30, 8 * 2**30))
    assert memory.free_memory("cuda:0") == 5 * 2**30
    assert memory.free_memory("meta") is None and memory.free_memory(None) is None


def test_model_size_from_the_checkpoint_matches_the_loaded_weights(tiny_dirs, tiny_backbones):
    """The size in the message is the weights' size: the checkpoint's parameter count x the dtype's bytes."""
    loaded = weights_bytes(tiny_backbones("qwen2_vl").model)  # float32
    needed, how = model_bytes(tiny_dirs("qwen2_vl"), torch.float32)
    assert "parameters in its checkpoint x 4 bytes" in how
    assert abs(needed - loaded) / loaded < 0.1
    half, _ = model_bytes(tiny_dirs("qwen2_vl"), torch.bfloat16)
    assert half * 2 == needed
    assert model_bytes("no-such-org/no-such-model", torch.float32) == (None, "unknown")


def test_docstring_examples():
    import doctest

    from mars_viz.ui import session

    assert doctest.testmod(memory).failed == 0 and doctest.testmod(session).failed == 0


# --- on the command line ---------------------------------------------------------------------------------------------

def test_cli_out_of_memory_while_loading_says_so(tiny_dirs, monkeypatch, capsys):
    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", _raise(torch.OutOfMemoryError(CUDA_OOM)))
    monkeypatch.setattr(memory, "_mem_available", lambda: 3 * 2**30)
    rc = main(["capture", "--model", str(tiny_dirs("qwen2_vl")), "--device", "cpu", "--prompt", "hi"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the weights' progress bar
    assert rc == 1 and err.startswith("error: out of memory loading"), err
    needed, _ = model_bytes(tiny_dirs("qwen2_vl"), torch.float32)
    assert f"needs about {format_bytes(needed)}" in err  # the model's size
    assert "cpu has 3.0 GiB free" in err  # the device's free memory
    assert "--dtype bfloat16" in err and "--device-map auto" in err and "smaller model" in err  # what to do
    assert "could not be downloaded" not in err and "Traceback" not in err


def test_cli_out_of_memory_in_a_forward_says_so(tiny_dirs, tiny_backbones, monkeypatch, capsys):
    monkeypatch.setattr(type(tiny_backbones("qwen2_vl").model), "forward", _raise(RuntimeError(CPU_OOM)))
    rc = main(["capture", "--model", str(tiny_dirs("qwen2_vl")), "--device", "cpu", "--prompt", "hi"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1 and err.startswith("error: out of memory running the model on cpu"), err
    assert "fewer new tokens" in err and "--dtype bfloat16" in err


def test_cli_bug_is_not_dressed_up_as_out_of_memory(tiny_dirs, tiny_backbones, monkeypatch):
    monkeypatch.setattr(type(tiny_backbones("qwen2_vl").model), "forward", _raise(KeyError("planted")))
    with pytest.raises(KeyError, match="planted"):
        main(["capture", "--model", str(tiny_dirs("qwen2_vl")), "--device", "cpu", "--prompt", "hi"])


# --- in the analysis and the app -------------------------------------------------------------------------------------

def _analyze(backbone, state, prompt="Describe the weather."):
    from mars_viz.analysis.analyze import analyze_stream

    *_, last = analyze_stream(backbone, state, Query(prompt), SteerOptions(), max_new_tokens=2)
    return last.analysis


def test_analysis_out_of_memory_is_raised_not_noted(tiny_backbones, fitted, monkeypatch):
    monkeypatch.setattr("mars_viz.analysis.analyze.input_map", _raise(torch.OutOfMemoryError(CUDA_OOM)))
    with pytest.raises(OutOfMemory, match="out of memory running the model on cpu"):
        _analyze(tiny_backbones("qwen2_vl"), fitted("qwen2_vl"))


def test_analysis_bug_keeps_its_traceback_in_the_log(tiny_backbones, fitted, monkeypatch, caplog):
    monkeypatch.setattr("mars_viz.analysis.analyze.input_map", _raise(KeyError("planted bug")))
    with caplog.at_level(logging.ERROR, logger="mars_viz"):
        analysis = _analyze(tiny_backbones("qwen2_vl"), fitted("qwen2_vl"))
    logged = [r for r in caplog.records if r.exc_info and r.exc_info[0] is KeyError]
    assert logged and "planted bug" in caplog.text and "Traceback" in caplog.text
    assert analysis.result.steered.text is not None  # the answers stand
    assert any("server log" in n for n in analysis.notes)


def test_app_out_of_memory_is_an_error_and_the_server_stays_up(app_server, caplog):
    from gradio_client import Client

    session = app_server["session"]
    with session.lock:
        session.ensure_state()  # fitted before the forward is broken
    client = Client(app_server["url"], verbose=False)
    handle = session.backbone.model.register_forward_pre_hook(_raise(torch.OutOfMemoryError(CUDA_OOM)))
    try:
        with caplog.at_level(logging.ERROR, logger="mars_viz"), pytest.raises(Exception, match="out of memory") as info:
            client.predict(prompt="hi", max_new_tokens=2, api_name="/analyze")
    finally:
        handle.remove()
    assert "--dtype bfloat16" in str(info.value)
    assert any("out of memory on /analyze" in r.getMessage() for r in caplog.records)
    r = client.predict(prompt="still up?", max_new_tokens=2, api_name="/analyze")
    assert r["steered"]["text"] is not None


# --- switching the model in the Calibrate tab ------------------------------------------------------------------------

def test_switch_reuses_the_launch_options_and_releases_the_old_model(tiny_dirs, other_model, monkeypatch):
    from mars_viz.ui import session as session_mod
    from mars_viz.ui.calibrate_tab import _load_model_handler

    session = session_mod.open_session(str(tiny_dirs("qwen2_vl")), device="cpu", dtype="bfloat16",
                                       layers_path="model.language_model.layers")
    old = weakref.ref(session.backbone.model)
    seen = {}
    real_load = session_mod.load_backbone

    def spy(model, **kwargs):
        gc.collect()
        seen.update(kwargs, old_alive_while_loading=old() is not None)
        return real_load(model, **kwargs)

    monkeypatch.setattr(session_mod, "load_backbone", spy)
    generation = session.generation
    summary = _load_model_handler(session)(str(other_model))
    assert seen["dtype"] == "bfloat16" and seen["device"] == "cpu"
    assert seen["layers_path"] == "model.language_model.layers"
    assert not seen["old_alive_while_loading"]  # released before the new one loaded
    gc.collect()
    assert old() is None
    assert session.backbone.dtype == torch.bfloat16 and session.backbone.model_id == str(other_model)
    assert session.generation == generation + 1 and summary["model"]["dtype"] == "bfloat16"


def test_switch_out_of_memory_says_so_and_brings_the_old_model_back(tiny_dirs, fitted, other_model, monkeypatch,
                                                                    caplog):
    from mars_viz.ui.calibrate_tab import _load_model_handler
    from mars_viz.ui.session import open_session

    first = str(tiny_dirs("qwen2_vl"))
    session = open_session(first, device="cpu")
    state = fitted("qwen2_vl")
    session.set_state(state, "test")
    generation = session.generation
    real = AutoModelForImageTextToText.from_pretrained

    def picky(path, *args, **kwargs):
        if str(path) == str(other_model):
            raise torch.OutOfMemoryError(CUDA_OOM)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", picky)
    with caplog.at_level(logging.ERROR, logger="mars_viz"), pytest.raises(gr.Error) as info:
        _load_model_handler(session)(str(other_model))
    message = info.value.message
    assert message.startswith("out of memory loading") and "--dtype bfloat16" in message
    assert f"previous model {session.backbone.display_name} is loaded again" in message
    assert any("out of memory on /load_model" in r.getMessage() for r in caplog.records)
    assert session.backbone.model_id == first and session.state is state and session.generation == generation
    assert _analyze(session.backbone, session.state).result.steered.text is not None  # it still serves


def test_switch_to_a_missing_model_keeps_the_current_one(tiny_dirs):
    from mars_viz.ui.session import open_session

    session = open_session(str(tiny_dirs("qwen2_vl")), device="cpu")
    before = session.backbone
    with pytest.raises(ValueError, match="does not exist"):
        session.switch_model("/no/such/model")
    assert session.backbone is before


def test_switch_whose_old_model_fails_too_ends_on_the_demo_model(tiny_dirs, other_model, monkeypatch):
    from mars_viz.ui import session as session_mod

    session = session_mod.open_session(str(tiny_dirs("qwen2_vl")), device="cpu")
    real_load = session_mod.load_backbone
    calls = []

    def failing(model, **kwargs):  # the new model and the old one both fail; the demo model loads
        calls.append(str(model))
        if len(calls) <= 2:
            raise ValueError(f"could not load model {model!r}: planted")
        return real_load(model, **kwargs)

    monkeypatch.setattr(session_mod, "load_backbone", failing)
    monkeypatch.setattr(session_mod, "_fallback_model", lambda: tiny_dirs("qwen2_vl"))
    generation = session.generation
    with pytest.raises(ValueError, match="could not be loaded again either.*demo model is loaded instead"):
        session.switch_model(str(other_model))
    assert calls[:2] == [str(other_model), str(tiny_dirs("qwen2_vl"))]
    assert session.backbone.is_demo and session.state is None and session.generation == generation + 1
    assert "demo model" in session.change
