"""Drive the real Gradio server through gradio_client: every public endpoint, the instant toggle, concurrency."""

from __future__ import annotations

import logging
import os
import threading
import time
import zipfile
from dataclasses import replace

import pytest
from gradio_client import Client, handle_file

from mars_viz.data.examples import EXAMPLES_DIR
from mars_viz.ui.explore import PLOTS

RED = str(EXAMPLES_DIR / "solid_red.png")
WORDS = str(EXAMPLES_DIR / "words_harmful.mp4")
EXPLORE_ARGS = dict(frames=4, steer=True, strength=1.0, layer="auto", tau="", recenter=True, max_new_tokens=8,
                    toggle="MARS-steered", method="PCA")


@pytest.fixture
def client(app_server):
    return Client(app_server["url"], verbose=False)


def explore(client, prompt="What colour is this?", image=RED, video=None, **kw):
    return client.predict(prompt=prompt, image=handle_file(image) if image else None,
                          video=handle_file(video) if video else None, **{**EXPLORE_ARGS, **kw}, api_name="/explore")


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


def test_analyze_by_keyword_with_defaults(client):
    r = client.predict(prompt="What colour is this?", image=handle_file(RED), api_name="/analyze")
    assert r["modality"] == "image" and r["steered"]["text"] and "gate_open" in r


def test_view_api_names_the_parameters(client):
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    names = lambda ep: [p["parameter_name"] for p in api[ep]["parameters"]]  # noqa: E731
    assert names("/analyze") == ["prompt", "image", "video", "strength", "layer", "tau", "recenter", "steer",
                                 "max_new_tokens", "frames", "detect_layer", "gate_position"]
    assert names("/explore") == ["prompt", "image", "video", "frames", "steer", "strength", "layer", "tau",
                                 "recenter", "max_new_tokens", "toggle", "method", "detect_layer", "gate_position"]
    assert names("/inspect_layer") == names("/projection") == names("/export") == ["layer", "method"]
    assert names("/toggle") == ["toggle"] and names("/example") == ["example"]
    assert names("/evaluate") == ["sets", "limit", "strengths", "max_new_tokens"]
    assert names("/load_model") == ["model"] and names("/load_state") == ["files"]
    assert not any("_v" in n for ep in api for n in names(ep)), "a parameter still has a *_v name"
    assert all(p["parameter_has_default"] for p in api["/analyze"]["parameters"][1:])


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
             "offset", "trust", "plane", "curve", "layers", "hr_plane", "frames", "map_image", "map_tokens"]
    got = dict(zip(names, out, strict=True))
    assert "Gate" in got["verdict"] and got["active"] == got["steered"]
    for name in ("centroids", "offset", "trust", "plane", "curve", "layers", "hr_plane"):
        assert got[name] is not None, name
    # the harmfulness x refusal plane: the calibration prompts, the four quadrants and this input's path
    hr = str(got["hr_plane"])
    assert all(k in hr for k in ("harmful prompts", "jailbreak prompts", "input (steered)", "jailbreaks sit here",
                                 "over-refusal"))
    # image input: the frame plot says why it is empty instead of staying blank
    assert "video input" in str(got["frames"]) and got["seen"]  # the gallery was sent (once) and kept
    # where in the input: a heatmap over the image, the prompt's tokens coloured by score
    assert "heatmap" in str(got["map_image"]) and "heatmap" in str(got["map_tokens"])


def test_toggle_and_inspect_do_not_run_the_model(client, app_server):
    out = explore(client, tau="-100")
    unsteered, steered = out[0], out[1]
    counter = CallCounter(app_server["session"].backbone.model)
    try:
        assert client.predict("Unsteered", api_name="/toggle") == unsteered
        assert client.predict("MARS-steered", api_name="/toggle") == steered
        figs = client.predict(1, "PCA", api_name="/inspect_layer")
        assert len(figs) == len(PLOTS) and figs[0] is not None
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
    assert os.path.getsize(path) < 2_000_000  # plotly.js once, not once per figure
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        assert {"centroids.html", "centroids.csv", "layer_scores.csv", "hr_plane.html", "hr_plane.csv", "result.json",
                "plotly.min.js"} <= names
        # the maps: per-position CSV, a PNG over the image and of the token strip (Pillow), their pages
        assert {"map_positions.csv", "map_tokens.png", "map_overlay.html", "map_tokens.html"} <= names
        assert any(n.endswith(".png") and n.startswith("map_00_image_1") for n in names), names
        assert z.read("map_tokens.png")[:8] == b"\x89PNG\r\n\x1a\n"
        assert z.read("map_positions.csv").decode().startswith("position,token,kind,score,cell")
        page = z.read("trust_region.html").decode()
        # offline once unpacked: the page loads the bundled file beside it, and nothing from the network
        assert 'src="plotly.min.js"' in page and "https://cdn" not in page
        assert len(z.read("plotly.min.js")) > 1_000_000


def test_occlusion_check_and_map_views_on_demand(client):
    explore(client)
    fig = client.predict(api_name="/occlusion")
    assert "heatmap" in str(fig) and "Occlusion" in str(fig)
    image, tokens = client.predict(api_name="/map_raw")
    assert "raw, not re-centred" in str(image) and "raw score" in str(tokens)
    image, tokens = client.predict(api_name="/map_recentred")
    assert "re-centred (per-position offsets)" in str(image)
    explore(client, image=None, prompt="Tell me a story")
    with pytest.raises(Exception, match="image or a video"):
        client.predict(api_name="/occlusion")


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


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_second_user_stays_responsive_while_first_generates(app_server):
    """While one request holds the model (slowed by a test hook), another user's toggle and page still answer."""
    session = app_server["session"]
    gate = threading.Event()

    def slow(*_):
        gate.wait(0.2)

    handle = session.backbone.model.register_forward_pre_hook(slow)
    try:
        first, second = Client(app_server["url"], verbose=False), Client(app_server["url"], verbose=False)
        explore(second, image=None, prompt="warm up", max_new_tokens=4)
        job = first.submit("Tell me a long story", None, None, *{**EXPLORE_ARGS, "max_new_tokens": 64}.values(),
                           api_name="/explore")  # positional, in the documented order
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
    table, cond_fig, sweep_fig, report, showcase, pick = client.predict(["text", "image"], 1, "0,1", 4,
                                                                         api_name="/evaluate")
    conds = [row[0] for row in table["data"]]
    assert conds == ["text/harmful", "text/harmless", "image/harmful", "image/harmless"]
    assert cond_fig is not None and sweep_fig is not None
    with zipfile.ZipFile(report) as z:
        assert {"report.json", "report.csv", "report_items.jsonl"} <= set(z.namelist())
    # the showcase lists items by what MARS did (a random model refuses nothing: only "left unchanged" here)
    rows = showcase["data"]
    assert rows and all(r[0] in ("MARS refused (was answered)", "over-refused by MARS (harmless)", "left unchanged")
                        for r in rows)
    assert {r[1] for r in rows} <= set(conds)
    # loading one puts its prompt and media into Explore (the run is chained after it on the page)
    label = pick if isinstance(pick, str) else pick["value"]
    prompt, image, video = client.predict(label, api_name="/showcase_load")
    assert prompt in [r[2] for r in rows] and f"· {prompt[:40]}" in label  # text and image items ask the request
    assert (image is not None) == (" image/" in label) and video is None


NO_UPDATE = {"__type__": "update"}  # what gr.update() (keep the shown value) looks like to a client


def _is_figure(value) -> bool:
    return isinstance(value, dict) and bool(value.get("plot"))


def _handlers(session) -> dict:
    """api_name -> the registered handler of a fresh (not launched) app on the same session."""
    from mars_viz.ui import create_app

    return {fn.api_name: fn.fn for fn in create_app(session).fns.values()}


def test_results_from_a_replaced_state_are_not_reused(client, app_server):
    """After a state swap (what the Calibrate tab does for every user), the page's old analysis gives the 'run again'
    message for the toggle, the layer inspector, the projection switch and export, never a figure from the new
    state, and every page's banner says so."""
    from mars_viz.analysis.analyze import analyze_stream
    from mars_viz.model.inputs import Query
    from mars_viz.steer.steering import SteerOptions
    from mars_viz.ui.common import stale_banner

    session = app_server["session"]
    explore(client, tau="-100")
    assert all(map(_is_figure, client.predict(1, "PCA", api_name="/inspect_layer")[:6]))
    with session.lock:
        original, source = session.ensure_state(), session.state_source
        *_, last = analyze_stream(session.backbone, original, Query("hi"), SteerOptions(), 4)
    old, seen = last.analysis, session.generation
    handlers = _handlers(session)
    try:
        with session.lock:
            session.set_state(replace(original, target_level=original.target_level + 0.5), "swapped by a test")
        assert session.generation == seen + 1
        banner = stale_banner(session, seen)
        assert banner["visible"] and "state swapped by a test" in banner["value"] and "run again" in banner["value"]
        assert not stale_banner(session, session.generation)["visible"]

        # through the server: the page keeps what it shows (a no-op update, not a figure), export refuses
        assert client.predict("Unsteered", api_name="/toggle") == NO_UPDATE
        for endpoint in ("/inspect_layer", "/projection"):
            assert list(client.predict(1, "PCA", api_name=endpoint)) == [NO_UPDATE] * len(PLOTS), endpoint
        with pytest.raises(Exception, match="another model/state: run it again"):
            client.predict(1, "PCA", api_name="/export")

        # the handlers themselves: the message, and no update
        for name, args in [("toggle", ("Unsteered", old)), ("inspect_layer", (1, "PCA", old)),
                           ("projection", (1, "UMAP", old))]:
            with pytest.warns(UserWarning, match="another model/state: run it again"):
                result = handlers[name](*args)
            n = 1 if name == "toggle" else len(PLOTS)
            assert (result if isinstance(result, list) else [result]) == [NO_UPDATE] * n
        with pytest.raises(Exception, match="another model/state: run it again"):
            handlers["export"](old, 1, "PCA")

        # running again uses the new state, and its results may be inspected
        explore(client)
        assert all(map(_is_figure, client.predict(1, "PCA", api_name="/inspect_layer")[:6]))
    finally:
        with session.lock:
            session.set_state(original, source)
    assert old.check_state(session.state) is None  # the original state is back: the old result is valid again


def test_rejected_inputs_log_one_line_and_bugs_keep_their_traceback(client, tmp_path, caplog, capfd, monkeypatch):
    from mars_viz.ui import api

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    capfd.readouterr()
    with caplog.at_level(logging.WARNING, logger="mars_viz"):
        with pytest.raises(Exception, match="empty"):
            client.predict(prompt="   ", api_name="/analyze")
        with pytest.raises(Exception, match="corrupt|not an image"):
            explore(client, image=str(bad))
        with pytest.raises(Exception, match="strengths"):
            client.predict(["text"], 1, "0,x", 4, api_name="/evaluate")
    lines = [(r.levelno, r.getMessage().split(":")[0]) for r in caplog.records if r.name == "mars_viz"]
    assert lines == [(logging.WARNING, "input rejected on /analyze"), (logging.WARNING, "input rejected on /explore"),
                     (logging.WARNING, "input rejected on /evaluate")]
    assert "Traceback" not in capfd.readouterr().err

    def boom(*_, **__):
        raise RuntimeError("a real bug")

    monkeypatch.setattr(api, "analyze_stream", boom)
    with pytest.raises(Exception, match="a real bug"):  # show_error=True: the page still sees the message
        client.predict(prompt="hi", api_name="/analyze")
    err = capfd.readouterr().err
    assert "Traceback" in err and "RuntimeError: a real bug" in err


def test_two_layers_in_the_verdict_the_json_and_the_plots(client):
    out = explore(client, layer="1", detect_layer="3", tau="-100", gate_position="post")
    verdict, result = out[3], out[5]
    assert "Gate read at layer 3, t_post; push at layer 1, t_post" in verdict
    assert "Gate **open** at layer 3 at t_post (the prompt's last position)" in verdict
    assert result["detect_layer"] == 3 and result["layer"] == 1
    r = client.predict(prompt="What colour is this?", image=handle_file(RED), detect_layer=2, layer=2,
                       max_new_tokens=2, api_name="/analyze")
    assert r["detect_layer"] == r["layer"] == 2


@pytest.mark.parametrize("position", ["inst", "post"])
def test_gate_position_is_a_named_parameter_of_analyze_and_explore(client, position):
    r = client.predict(prompt="What colour is this?", image=handle_file(RED), gate_position=position,
                       max_new_tokens=2, api_name="/analyze")
    assert r["gate_position"] == position
    out = explore(client, gate_position=position, max_new_tokens=4)
    verdict, result = out[3], out[5]
    assert result["gate_position"] == position
    words = {"inst": "t_inst (the instruction's last token)", "post": "t_post (the prompt's last position)"}
    assert f"at layer {result['detect_layer']} at {words[position]}" in verdict


def test_a_gate_at_t_inst_on_a_state_without_its_fit_is_a_clear_error(client, app_server):
    session = app_server["session"]
    with session.lock:
        original, source = session.ensure_state(), session.state_source
        session.set_state(replace(original, inst=None, gate_position="post"), "an old state, by a test")
    try:
        for call in (lambda: client.predict(prompt="hi", gate_position="inst", max_new_tokens=2, api_name="/analyze"),
                     lambda: explore(client, image=None, prompt="hi", gate_position="inst", max_new_tokens=4)):
            with pytest.raises(Exception, match="no t_inst fit .* refit it"):
                call()
        # the plane says why it is empty, and "auto" still runs (at t_post)
        out = explore(client, image=None, prompt="hi", max_new_tokens=4)
        assert out[5]["gate_position"] == "post" and "no t_inst fit" in str(out[13])
    finally:
        with session.lock:
            session.set_state(original, source)
