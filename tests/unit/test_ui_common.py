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
