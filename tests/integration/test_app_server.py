"""Opening a session: the offline fallback for the default model, and clear errors for an explicit one."""

from __future__ import annotations

import pytest


def test_default_model_falls_back_offline_and_says_so(tmp_path, monkeypatch):
    from mars_viz.session import DEFAULT_MODEL, open_session

    monkeypatch.setenv("MARS_VIZ_CACHE", str(tmp_path))
    session = open_session(None, device="cpu")  # HF_HUB_OFFLINE=1: the hub default cannot load
    assert DEFAULT_MODEL in session.notice and "tiny" in session.notice
    assert session.backbone.model_type == "qwen2_vl"
    assert (tmp_path / "demo" / "qwen2_vl" / "config.json").exists()


def test_explicit_missing_model_raises():
    from mars_viz.session import open_session

    with pytest.raises(ValueError, match="does not exist"):
        open_session("/no/such/model")


def test_page_shows_the_fallback_notice(tmp_path, monkeypatch):
    from mars_viz.session import open_session
    from mars_viz.ui import create_app

    monkeypatch.setenv("MARS_VIZ_CACHE", str(tmp_path))
    demo = create_app(open_session(None, device="cpu"))
    texts = [str(getattr(b, "value", "") or "") for b in demo.blocks.values()]
    assert any("is not available" in t and "demo model" in t for t in texts)
    assert any("built-in tiny random qwen2_vl demo model" in t for t in texts)  # the header names it, not a path
    import gradio as gr

    prose = [str(b.value or "") for b in demo.blocks.values() if isinstance(b, gr.Markdown)]
    assert not any(str(tmp_path) in t or "OSError" in t for t in prose)  # no cache path, no raw error in the text
