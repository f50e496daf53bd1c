"""A server that stays up for a class: runs end on Stop or on a closed client, the model is one queue, per-page
results and files go with their page, the API's answer length is capped, and UMAP is fitted once per layer."""

from __future__ import annotations

import threading
import time

import pytest

from ..conftest import model_held, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

LONG = 2000  # tokens: a generation that would hold the tiny model far longer than the test waits




def _quiet(session) -> dict:
    from mars_viz.ui.serving import health

    h = health(session)
    assert h["lock_held"] is False and h["runs"] == 0 and h["pair_threads"] == 0, h
    return h


@pytest.mark.timeout(240)
def test_stop_ends_a_long_generation_within_a_second_and_the_next_user_runs(class_server):
    from gradio_client import Client

    s = class_server["session"]
    hooks = _quiet(s)["hooks"]
    a, b = Client(class_server["url"], verbose=False), Client(class_server["url"], verbose=False)
    try:
        job = a.submit(prompt="Tell me a very long story.", max_new_tokens=LONG, api_name="/explore")
        wait_until(lambda: model_held(s), 60)
        time.sleep(0.5)  # well into the decode
        assert s.lock.locked(), "the 2000-token generation ended by itself: nothing was stopped"
        t0 = time.monotonic()
        said = a.predict(api_name="/stop")  # the page's Stop button: same browser session as the run
        wait_until(lambda: not s.lock.locked(), 5)
        released = time.monotonic() - t0
        assert released < 1.0, f"the lock was released {released:.2f} s after Stop"
        assert "Stopped" in said
        with pytest.raises(Exception):  # noqa: B017 - the run is cancelled: no result
            job.result(timeout=30)
        out = b.predict(prompt="hi", max_new_tokens=4, api_name="/analyze")  # another user's run starts
        assert out["steered"]["text"] is not None and out["unsteered"]["num_tokens"] <= 4
        h = _quiet(s)
        assert h["hooks"] == hooks  # nothing left on the model
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(240)
def test_a_closed_client_has_its_generation_ended(class_server, monkeypatch):
    """Closing the client (a closed tab) ends its run: the server learns of it at its next heartbeat, and from then
    the lock goes within a second."""
    from gradio_client import Client

    monkeypatch.setenv("GRADIO_HEARTBEAT_INTERVAL", "0.5")  # read per heartbeat connection, by the server
    s = class_server["session"]
    c = Client(class_server["url"], verbose=False)
    c.submit(prompt="Tell me a very long story.", max_new_tokens=LONG, api_name="/analyze")
    wait_until(lambda: model_held(s), 60)
    time.sleep(0.5)
    assert s.lock.locked()
    c.close()
    released = wait_until(lambda: not s.lock.locked(), 0.5 + 1.0 + 1.0)  # heartbeat + unload + one decode step
    assert released < 2.5
    _quiet(s)


@pytest.mark.timeout(120)
def test_the_api_caps_max_new_tokens_with_a_clear_error(class_server):
    from gradio_client import Client

    c = Client(class_server["url"], verbose=False)
    try:
        with pytest.raises(Exception, match="above this server's limit of 4000"):
            c.predict(prompt="hi", max_new_tokens=4001, api_name="/analyze")
        assert c.predict(prompt="hi", max_new_tokens=2, api_name="/analyze")["gate_open"] in (True, False)
    finally:
        c.close()


@pytest.mark.timeout(180)
def test_a_closed_page_takes_its_results_and_files_with_it(class_server, monkeypatch):
    from gradio_client import Client

    monkeypatch.setenv("GRADIO_HEARTBEAT_INTERVAL", "0.5")
    s, demo = class_server["session"], class_server["demo"]
    c = Client(class_server["url"], verbose=False)
    c.predict(prompt="What colour is this?", max_new_tokens=4, api_name="/explore")
    c.predict(layer=0, method="PCA", api_name="/export")  # a zip in the page's own folder
    key = c.session_hash
    folder = s.files.root / "sessions" / key
    assert any(folder.rglob("mars_viz_export.zip"))
    assert demo.state_holder.session_data[key].state_data  # the page's analysis is held
    c.close()
    wait_until(lambda: key not in demo.state_holder.session_data and not folder.exists(), 5)


def test_session_folders_expire_after_their_time_to_live(tmp_path):
    import os

    from mars_viz.ui.serving import SessionFiles

    files = SessionFiles(tmp_path, ttl_s=60)
    old, new = files.folder("old-page"), files.folder("new-page")
    (old / "a.zip").write_bytes(b"x")
    (new / "b.zip").write_bytes(b"y")
    past = time.time() - 120
    os.utime(old.parent, (past, past))
    assert files.sweep() == 1
    assert not old.exists() and (new / "b.zip").exists()
    assert files.folder("../../etc").parent.parent == tmp_path / "sessions"  # a client's key never escapes


def test_page_load_does_not_wait_for_the_model(tiny_dirs, tmp_path, monkeypatch):
    """`cached_state` (every page load) installs a cached state under the lock, but never waits for it."""
    from mars_viz.ui.session import open_session

    monkeypatch.setenv("MARS_VIZ_CACHE", str(tmp_path))
    s = open_session(str(tiny_dirs("qwen2_vl")), device="cpu")
    held, done = threading.Event(), threading.Event()

    def hold():
        with s.lock:
            held.set()
            done.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(5)
    t0 = time.monotonic()
    assert s.cached_state() is None
    assert time.monotonic() - t0 < 0.5
    done.set()
    t.join()


def test_umap_is_fitted_once_per_state_and_layer(fitted, monkeypatch):
    from mars_viz.core import projection
    from mars_viz.views import panels

    calls = []

    def fake(points, method="pca", **kw):
        calls.append(method)
        return projection.project(points, method="pca")

    monkeypatch.setattr(panels, "project", fake)
    monkeypatch.setattr(panels, "_umaps", type(panels._umaps)())
    state = fitted("qwen2_vl")
    for _ in range(3):
        panels._centroid_fig(state, state.layer, None, "umap")
    assert calls == ["umap"]


def test_stale_banner_names_the_tab_whose_results_are_old(tiny_backbones):
    from mars_viz.ui.common import stale_banner
    from mars_viz.ui.session import Session

    s = Session(backbone=tiny_backbones("qwen2_vl"))
    s._changed("model X loaded")
    now = s.generation
    assert stale_banner(s, now, None)["visible"] is False
    assert "results in Evaluate came" in stale_banner(s, now, now - 1)["value"]
    assert "Explore and Evaluate" in stale_banner(s, now - 1, now - 1)["value"]
    assert "results in Explore came" in stale_banner(s, now - 1, None)["value"]


def test_gradio_upload_leftovers_expire_too(tmp_path):
    import os

    from mars_viz.ui.serving import SessionFiles

    files = SessionFiles(tmp_path / "ours", ttl_s=60)
    files.upload_dir = tmp_path / "gradio"
    (files.upload_dir / "0123abcd").mkdir(parents=True)  # an upload Gradio keeps (its own delete_cache ages it)
    kept = files.upload_dir / "0123abcd" / "cat.png"
    kept.write_bytes(b"png")
    old, new = files.upload_dir / "tmpold", files.upload_dir / "tmpnew"
    old.write_bytes(b"")
    new.write_bytes(b"")
    past = time.time() - 120
    os.utime(old, (past, past))
    os.utime(kept, (past, past))
    files.sweep()
    assert not old.exists() and new.exists() and kept.exists()
