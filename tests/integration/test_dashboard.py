"""Drive the real Gradio server through gradio_client: every public endpoint, the instant toggle, concurrency."""

from __future__ import annotations

import threading
import time
import zipfile

import pytest
from gradio_client import Client, handle_file

from mars_viz.examples import EXAMPLES_DIR

RED = str(EXAMPLES_DIR / "solid_red.png")
WORDS = str(EXAMPLES_DIR / "words_harmful.mp4")
EXPLORE_ARGS = dict(frames_v=4, steer_v=True, strength_v=1.0, layer_v="auto", tau_v="", recenter_v=True,
                    max_tok_v=8, toggle_v="MARS-steered", method_v="PCA")


@pytest.fixture
def client(app_server):
    return Client(app_server["url"], verbose=False)


def explore(client, prompt="What colour is this?", image=RED, video=None, **kw):
    args = {**EXPLORE_ARGS, **kw}
    return client.predict(prompt, handle_file(image) if image else None, handle_file(video) if video else None,
                          *args.values(), api_name="/explore")


class CallCounter:
    """Counts forward calls of the model (a test-owned hook, removed afterwards)."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_pre_hook(self._inc)

    def _inc(self, *_):
        self.n += 1

    def close(self):
        self.handle.remove()


def test_analyze_returns_run_json(client):
    r = client.predict("What colour is this?", handle_file(RED), None, 1.0, None, None, True, True, 6,
                       api_name="/analyze")
    for key in ("prompt", "layer", "modality", "score_raw", "score_recentred", "tau", "gate_open",
                "displacement_norm", "unsteered", "steered"):
        assert key in r
    assert r["modality"] == "image" and r["steered"]["text"] and isinstance(r["gate_open"], bool)


def test_analyze_video_gives_frame_scores_and_forced_gate(client):
    r = client.predict("Follow the words.", None, handle_file(WORDS), 1.0, None, -100.0, True, True, 4,
                       api_name="/analyze")
    assert r["modality"] == "video" and r["gate_open"] and len(r["frame_scores"]) == len(r["frame_indices"]) > 1


def test_analyze_gate_closed_is_identical(client):
    r = client.predict("Tell me a story", None, None, 1.0, None, 100.0, True, True, 8, api_name="/analyze")
    assert not r["gate_open"] and r["displacement_norm"] == 0 and r["unchanged"]


def test_explore_returns_every_plot(client):
    out = explore(client)
    names = ["unsteered", "steered", "seen", "verdict", "active", "result", "inspect", "centroids",
             "offset", "trust", "plane", "curve", "layers", "frames"]
    got = dict(zip(names, out, strict=True))
    assert "Gate" in got["verdict"] and got["active"] == got["steered"]
    for name in ("centroids", "offset", "trust", "plane", "curve", "layers"):
        assert got[name] is not None, name
    assert got["frames"] is None  # image input: no frame plot


def test_toggle_and_inspect_do_not_run_the_model(client, app_server):
    out = explore(client, tau_v="-100")
    unsteered, steered = out[0], out[1]
    counter = CallCounter(app_server["session"].backbone.model)
    try:
        assert client.predict("Unsteered", api_name="/toggle") == unsteered
        assert client.predict("MARS-steered", api_name="/toggle") == steered
        figs = client.predict(1, "PCA", api_name="/inspect_layer")
        assert len(figs) == 7 and figs[0] is not None
        client.predict(2, "PCA", api_name="/projection")
    finally:
        counter.close()
    assert counter.n == 0


def test_example_endpoint_fills_inputs(client):
    prompt, image, video = client.predict("Typographic attack (FigStep-style)", api_name="/example")
    assert "numbered" in prompt and image is not None and video is None


def test_export_zip_has_html_csv_json(client):
    explore(client)
    path = client.predict(0, "PCA", api_name="/export")
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        assert {"centroids.html", "centroids.csv", "layer_scores.csv", "result.json"} <= names
        assert b"plotly" in z.read("trust_region.html").lower()


def test_bad_inputs_are_clear_errors_and_server_stays_up(client, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(Exception, match="corrupt|not an image"):
        client.predict("hi", handle_file(str(bad)), None, 1.0, None, None, True, True, 4, api_name="/analyze")
    with pytest.raises(Exception, match="empty"):
        client.predict("   ", None, None, 1.0, None, None, True, True, 4, api_name="/analyze")
    with pytest.raises(Exception, match="image or a video"):
        explore(client, video=WORDS)
    r = client.predict("still up?", None, None, 1.0, None, None, True, True, 4, api_name="/analyze")
    assert r["modality"] == "text"


def test_state_save_and_load_round_trip(client, app_server, tmp_path):
    path = client.predict(api_name="/save_state")
    summary = client.predict([handle_file(path)], api_name="/load_state")
    assert summary["state"]["layer"] == app_server["session"].state.layer
    assert "loaded from" in summary["state"]["source"]


def test_loading_a_missing_model_is_an_error_and_keeps_the_current_one(client, app_server):
    before = app_server["session"].backbone
    with pytest.raises(Exception, match="does not exist"):
        client.predict("/no/such/model", api_name="/load_model")
    assert app_server["session"].backbone is before


def test_second_user_stays_responsive_while_first_generates(app_server):
    """While one request holds the model (slowed by a test hook), another user's toggle and page still answer."""
    session = app_server["session"]
    gate = threading.Event()

    def slow(*_):
        gate.wait(0.2)

    handle = session.backbone.model.register_forward_pre_hook(slow)
    try:
        first, second = Client(app_server["url"], verbose=False), Client(app_server["url"], verbose=False)
        explore(second, image=None, prompt="warm up", max_tok_v=4)
        job = first.submit("Tell me a long story", None, None, *{**EXPLORE_ARGS, "max_tok_v": 64}.values(),
                           api_name="/explore")
        deadline = time.time() + 60
        while not session.lock.locked() and time.time() < deadline:
            time.sleep(0.05)
        assert session.lock.locked(), "the first request never started"
        assert second.predict("Unsteered", api_name="/toggle") is not None
        assert not job.done(), "the second user was served only after the first finished"
    finally:
        gate.set()
        handle.remove()
    job.result(timeout=120)


def test_evaluate_endpoint_table_charts_and_report(client):
    table, cond_fig, sweep_fig, report = client.predict(["text", "image"], 1, "0,1", 4, api_name="/evaluate")
    conds = [row[0] for row in table["data"]]
    assert conds == ["text/harmful", "text/harmless", "image/harmful", "image/harmless"]
    assert cond_fig is not None and sweep_fig is not None
    with zipfile.ZipFile(report) as z:
        assert {"report.json", "report.csv", "report_items.jsonl"} <= set(z.namelist())
