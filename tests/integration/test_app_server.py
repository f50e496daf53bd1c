"""Open the real Gradio server on a tiny model and drive it through gradio_client."""

from __future__ import annotations

import socket

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_dirs):
    from mars_viz.session import open_session
    from mars_viz.ui import create_app

    session = open_session(str(tiny_dirs("qwen2_vl")), device="cpu")
    demo = create_app(session)
    demo.queue()
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, show_error=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_capture_endpoint_with_image(server, tmp_path):
    from gradio_client import Client, handle_file

    from mars_viz.media import neutral_images

    img = tmp_path / "red.png"
    neutral_images(1, seed=1, size=48)[0].save(img)
    client = Client(server, verbose=False)
    _seen, _plot, info = client.predict("What colour is this?", handle_file(str(img)), None, 8, api_name="/capture")
    assert info["modality"] == "image" and len(info["residual_norm"]) == 4


def test_bad_upload_is_a_clear_error_and_server_stays_up(server, tmp_path):
    from gradio_client import Client, handle_file

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    client = Client(server, verbose=False)
    with pytest.raises(Exception, match="not an image"):
        client.predict("hi", handle_file(str(bad)), None, 8, api_name="/capture")
    _seen, _plot, info = client.predict("still alive?", None, None, 8, api_name="/capture")
    assert info["modality"] == "text"


def test_default_model_falls_back_offline_and_says_so(tmp_path, monkeypatch):
    from mars_viz.session import DEFAULT_MODEL, open_session

    monkeypatch.setenv("MARS_VIZ_CACHE", str(tmp_path))
    session = open_session(None, device="cpu")  # HF_HUB_OFFLINE=1: the hub default cannot load
    assert DEFAULT_MODEL in session.notice and "tiny" in session.notice
    assert session.backbone.model_type == "qwen2_vl"
    assert (tmp_path / "demo" / "qwen2_vl" / "config.json").exists()


def test_explicit_missing_model_raises():
    from mars_viz.session import open_session

    with pytest.raises(ValueError):
        open_session("/no/such/model")
