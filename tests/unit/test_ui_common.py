"""The UI's error seam and stale-results banner, without a server: a rejected input is one log line, a bug is not."""

from __future__ import annotations

import inspect
import logging

import gradio as gr
import pytest

from mars_viz.ui.common import GATE_POSITION_CHOICES, parse_gate_position, steer_options, user_errors


def test_a_rejected_input_is_one_warning_line_without_traceback(caplog):
    @user_errors("explore")
    def handler(prompt: str, image=None):
        raise ValueError("the prompt is empty:\n  type a question")

    with caplog.at_level(logging.WARNING, logger="mars_viz"), pytest.raises(gr.Error) as err:
        handler("")
    assert err.value.print_exception is False  # Gradio prints no traceback for it
    assert "the prompt is empty" in err.value.message
    assert [(r.name, r.levelno, r.getMessage(), r.exc_info) for r in caplog.records] == [
        ("mars_viz", logging.WARNING, "input rejected on /explore: the prompt is empty: type a question", None)]
    assert list(inspect.signature(handler).parameters) == ["prompt", "image"]  # the API keeps the names


def test_a_streaming_handler_stays_a_generator():
    @user_errors("explore")
    def handler(prompt: str, progress=gr.Progress()):
        yield "partial"
        raise ValueError("bad frame")

    assert inspect.isgeneratorfunction(handler)
    it = handler("hi")
    assert next(it) == "partial"
    with pytest.raises(gr.Error, match="bad frame"):
        next(it)


def test_a_bug_is_not_rejected(caplog):
    @user_errors("analyze")
    def handler():
        raise RuntimeError("boom")

    with caplog.at_level(logging.WARNING, logger="mars_viz"), pytest.raises(RuntimeError, match="boom"):
        handler()
    assert not caplog.records


def test_gate_position_parses_auto_post_and_inst():
    for choice, expected in [(None, None), ("", None), ("auto", None), ("auto (the fitted position)", None),
                             ("post", "post"), ("inst", "inst"), (" INST ", "inst"), ("t_inst", "inst"),
                             ("t_post", "post")]:
        assert parse_gate_position(choice) == expected, choice
    assert [parse_gate_position(v) for _, v in GATE_POSITION_CHOICES] == [None, "post", "inst"]
    with pytest.raises(ValueError, match="gate position must be auto, post .* or inst"):
        parse_gate_position("middle")


def test_steer_options_passes_the_gate_position():
    assert steer_options(True, 1.0, "auto", "", True, "auto", "inst").gate_position == "inst"
    assert steer_options(True, 1.0, "auto", "", True, "3", "post").gate_position == "post"
    assert steer_options(True, 1.0, "auto", "", True).gate_position is None  # default: the state's choice
    with pytest.raises(ValueError, match="gate position"):
        steer_options(True, 1.0, "auto", "", True, "auto", "t_middle")


def test_a_waiting_page_is_told_what_the_shared_model_is_doing():
    from types import SimpleNamespace

    from mars_viz.ui.common import busy_banner, gr_progress
    from mars_viz.ui.serving import Runs

    session = SimpleNamespace(runs=Runs())
    assert busy_banner(session, SimpleNamespace(session_hash="b"))["visible"] is False  # idle
    session.runs.hold("a", "being calibrated in the Calibrate tab")
    step = gr_progress(lambda *a, **k: None, session, "being calibrated in the Calibrate tab")
    step("target level", 3, 9)
    other = busy_banner(session, SimpleNamespace(session_hash="b"))
    assert other["visible"] and "being calibrated in the Calibrate tab (step 3/9: target level)" in other["value"]
    assert busy_banner(session, SimpleNamespace(session_hash="a"))["visible"] is False  # not to the page that fits
    session.runs.release()
    assert busy_banner(session, SimpleNamespace(session_hash="b"))["visible"] is False


def test_the_servers_token_limit_is_a_clear_error():
    from mars_viz.ui.serving import ServerLimits

    limits = ServerLimits(max_new_tokens=64)
    assert limits.check_new_tokens("48") == 48
    with pytest.raises(ValueError, match="above this server's limit of 64 tokens"):
        limits.check_new_tokens(65)
    with pytest.raises(ValueError, match="at least 1"):
        limits.check_new_tokens(0)
