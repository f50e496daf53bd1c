"""Opening a session: the offline fallback for the default model, and clear errors for an explicit one."""

from __future__ import annotations

import pytest


def test_default_model_falls_back_offline_and_says_so(tmp_path, monkeypatch):
    from mars_viz.ui.session import DEFAULT_MODEL, open_session

    monkeypatch.setenv("MARS_VIZ_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))  # no cached MLLM to prefer
    session = open_session(None, device="cpu")  # HF_HUB_OFFLINE=1: the hub default cannot load
    assert DEFAULT_MODEL in session.notice and "tiny" in session.notice
    assert session.backbone.model_type == "qwen2_vl"
    assert (tmp_path / "demo" / "qwen2_vl" / "config.json").exists()


def test_explicit_missing_model_raises():
    from mars_viz.ui.session import open_session

    with pytest.raises(ValueError, match="does not exist"):
        open_session("/no/such/model")


def test_page_shows_the_fallback_notice(tmp_path, monkeypatch):
    from mars_viz.ui import create_app
    from mars_viz.ui.session import open_session

    monkeypatch.setenv("MARS_VIZ_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    demo = create_app(open_session(None, device="cpu"))
    texts = [str(getattr(b, "value", "") or "") for b in demo.blocks.values()]
    assert any("is not available" in t and "demo model" in t for t in texts)
    assert any("built-in tiny random qwen2_vl demo model" in t for t in texts)  # the header names it, not a path
    import gradio as gr

    prose = [str(b.value or "") for b in demo.blocks.values() if isinstance(b, gr.Markdown)]
    assert not any(str(tmp_path) in t or "OSError" in t for t in prose)  # no cache path, no raw error in the text


def test_offline_fallback_prefers_a_supported_model_in_the_hf_cache(tmp_path, monkeypatch, tiny_dirs):
    """Before the random demo model, the app looks in the local Hugging Face cache (`scan_cache_dir`)."""
    import shutil

    from mars_viz.ui.session import cached_mllms, open_session

    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-vlm"
    snap = repo / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_dirs("llava"), snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    (repo / "blobs").mkdir()
    other = cache / "models--acme--text-only" / "snapshots" / ("b" * 40)  # not a supported MLLM: ignored
    other.mkdir(parents=True)
    (other / "config.json").write_text('{"model_type": "bert"}')
    (cache / "models--acme--text-only" / "refs").mkdir()
    (cache / "models--acme--text-only" / "refs" / "main").write_text("b" * 40)
    (cache / "models--acme--text-only" / "blobs").mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("MARS_VIZ_CACHE", str(tmp_path / "mv"))
    assert [r for r, _ in cached_mllms()] == ["acme/tiny-vlm"]
    session = open_session(None, device="cpu")
    assert session.backbone.model_id == "acme/tiny-vlm" and session.backbone.model_type == "llava"
    assert "found in the local Hugging Face cache" in session.notice
    assert not (tmp_path / "mv" / "demo").exists()  # the random model was not needed
