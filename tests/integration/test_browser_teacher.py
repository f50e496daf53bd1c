"""Issue 23, checked in chromium as a teacher would use the page: the picture is shown whole, every number agrees,
errors do not hide the verdict, the page stays on the machine and its headings use one face, and Centroids opens on
the view that shows the separation."""

# ruff: noqa: F811  (the tests take the shared `browser` fixture imported from test_browser)
from __future__ import annotations

import math
import re

import pytest

from mars_viz.data.examples import EXAMPLES_DIR

from .test_browser import CHROMIUM, _open, _plot_rendered, _run_and_wait, _upload, browser  # noqa: F401 (fixture)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(900),
              pytest.mark.skipif(not __import__("os").path.exists(CHROMIUM), reason="Debian chromium not installed")]
WIDTHS = [1280, 1600]


def _boxes(page, selector: str) -> list[dict]:
    return page.locator(selector).evaluate_all(
        "els => els.filter(e => e.offsetParent !== null).map(e => { const r = e.getBoundingClientRect();"
        " return {x: r.x, y: r.y, w: r.width, h: r.height, W: +e.dataset.width || e.naturalWidth,"
        " H: +e.dataset.height || e.naturalHeight}; })")


def _visible_boxes(page, selector: str) -> list[dict]:
    """Boxes of the elements a user can see: laid out, and neither they nor an ancestor transparent or hidden."""
    return page.locator(selector).evaluate_all(
        "els => els.filter(e => { for (let n = e; n && n !== document.body; n = n.parentElement) {"
        " const cs = getComputedStyle(n); if (cs.display === 'none' || cs.visibility === 'hidden'"
        " || +cs.opacity === 0) return false; } const r = e.getBoundingClientRect();"
        " return r.width > 0 && r.height > 0; })"
        ".map(e => { const r = e.getBoundingClientRect(); return {x: r.x, y: r.y, w: r.width, h: r.height}; })")


def _inside(inner: dict, outer: dict, tol: float = 1.0) -> bool:
    return (inner["x"] >= outer["x"] - tol and inner["y"] >= outer["y"] - tol
            and inner["x"] + inner["w"] <= outer["x"] + outer["w"] + tol
            and inner["y"] + inner["h"] <= outer["y"] + outer["h"] + tol)


def _overlap(a: dict, b: dict) -> bool:
    return not (a["x"] + a["w"] <= b["x"] or b["x"] + b["w"] <= a["x"] or a["y"] + a["h"] <= b["y"]
                or b["y"] + b["h"] <= a["y"])


def _plot_data(page, elem_id: str) -> list[dict]:
    # _fullData: what plotly.js drew, with typed arrays (numpy data is sent base64-encoded) decoded
    return page.evaluate(f"() => document.querySelector('#{elem_id} .js-plotly-plot')._fullData.map("
                         "t => ({name: t.name, x: Array.from(t.x || []), y: Array.from(t.y || []),"
                         " z: t.z ? Array.from(t.z, row => Array.from(row)) : null}))")


def _show_tab(page, tab: str, elem_id: str) -> list[dict]:
    page.get_by_role("tab", name=tab).click()
    _plot_rendered(page, elem_id)
    return _plot_data(page, elem_id)


@pytest.mark.parametrize("width", WIDTHS)
def test_what_the_model_sees_shows_the_whole_picture(browser, app_server, width):
    page = browser.new_page(viewport={"width": width, "height": 900})
    _open(page, app_server["url"])
    _upload(page, "image", EXAMPLES_DIR / "figstep_harmful.png")
    _run_and_wait(page)
    page.wait_for_function("() => [...document.querySelectorAll('#seen img')].every(i => i.complete)")
    box = _boxes(page, "#seen")[0]
    imgs = _boxes(page, "#seen img")
    assert len(imgs) == 1
    img = imgs[0]
    assert abs(img["w"] / img["h"] - img["W"] / img["H"]) < 0.02 * img["W"] / img["H"], img  # not stretched, not cut
    assert _inside(img, box), (img, box)
    # the file's aspect ratio, not just the sent copy's
    from PIL import Image

    with Image.open(EXAMPLES_DIR / "figstep_harmful.png") as im:
        assert abs(img["w"] / img["h"] - im.width / im.height) < 0.02 * im.width / im.height
    page.close()


@pytest.mark.parametrize("width", WIDTHS)
def test_every_video_frame_is_inside_the_box_and_no_label_covers_one(browser, app_server, video_file, width):
    page = browser.new_page(viewport={"width": width, "height": 900})
    _open(page, app_server["url"])
    _upload(page, "video", video_file)
    _run_and_wait(page)
    page.wait_for_function("() => [...document.querySelectorAll('#seen img')].every(i => i.complete)")
    box = _boxes(page, "#seen")[0]
    imgs, captions = _boxes(page, "#seen img"), _boxes(page, "#seen figcaption")
    assert len(imgs) == 8 and len(captions) == 8  # the default 8 sampled frames, each named
    for img in imgs:
        assert _inside(img, box), (img, box)
        assert abs(img["w"] / img["h"] - img["W"] / img["H"]) < 0.03 * img["W"] / img["H"]
        assert not any(_overlap(img, c) for c in captions), img
    names = page.locator("#seen figcaption").all_inner_texts()
    assert [n.split(" ·")[0].split(" (")[0] for n in names] == [f"frame {k}" for k in range(8)]
    page.close()


def _verdict_score(page) -> float:
    text = page.locator("#verdict").inner_text()
    m = re.search(r"Gate \w+ at layer \d+ at t_\w+ [^:]*?: s = (-?\d+\.\d{3})|\(s = (-?\d+\.\d{3}) >", text)
    assert m, text
    return float(m.group(1) or m.group(2))


def _json_score_gate(page) -> float:
    page.get_by_text("Result JSON and export").first.click()
    page.locator("#result_json").get_by_text("score_gate").first.wait_for(timeout=30_000)
    text = page.locator("#result_json").inner_text()
    m = re.search(r"score_gate\W*?(-?\d+\.\d+(?:e-?\d+)?)", text)
    assert m, text
    return float(m.group(1))


def _trust_gate_marker(page) -> float:
    data = _show_tab(page, "Trust region", "plot_trust_region")
    marks = [t for t in data if t["name"] and (t["name"].startswith("gate score") or "the gate's score" in t["name"])]
    assert len(marks) == 1, [t["name"] for t in data]
    return float(marks[0]["x"][0])


def _map_last_position(page) -> float:
    data = _show_tab(page, "Where in the input", "plot_map_tokens")
    cells = [v for row in data[0]["z"] for v in row if v is not None and math.isfinite(v)]  # NaN: empty cells
    return float(cells[-1])


def _check_one_gate_score(page, app_server) -> float:
    s = _verdict_score(page)
    state = app_server["session"].state
    assert state.gate_position == "post", "the map's last position is the gate's only when the gate reads t_post"
    marker, js, last = _trust_gate_marker(page), _json_score_gate(page), _map_last_position(page)
    assert abs(marker - js) < 1e-9 and abs(last - js) < 1e-6, (marker, js, last)
    assert abs(s - js) <= 5e-4, (s, js)  # printed with three decimals
    return js


def test_the_gate_score_is_one_number_everywhere_for_an_image(browser, app_server):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    _open(page, app_server["url"])
    _upload(page, "image", EXAMPLES_DIR / "figstep_harmful.png")
    _run_and_wait(page)
    _check_one_gate_score(page, app_server)
    # the image map and the token strip share one colour range: one colour is one score
    ranges = page.evaluate("() => ['#plot_map_image', '#plot_map_tokens'].map(id => document.querySelector("
                           "id + ' .js-plotly-plot')._fullData.filter(t => t.type === 'heatmap')"
                           ".map(t => [t.zmin, t.zmax]))")
    flat = {tuple(r) for plot in ranges for r in plot}
    assert all(ranges) and len(flat) == 1, ranges
    page.close()


def test_the_gate_score_and_the_frames_agree_for_a_video(browser, app_server, video_file):
    from mars_viz.analysis.analyze import frame_scores
    from mars_viz.model.media import read_video
    from mars_viz.steer.steering import SteerOptions

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    _open(page, app_server["url"])
    prompt = page.locator("#prompt textarea").input_value()
    _upload(page, "video", video_file)
    _run_and_wait(page)
    clip = _check_one_gate_score(page, app_server)
    # "Video frames": numbered as the map numbers them, the site and the re-centring stated, values recomputed
    data = _show_tab(page, "Video frames", "plot_frames")
    bars = data[0]
    title = page.evaluate("() => document.querySelector('#plot_frames .js-plotly-plot').layout.title.text")
    title = re.sub(r"<br>|<sup>|</sup>", " ", title)  # long titles wrap with <br>
    session = app_server["session"]
    state = session.state
    assert f"layer {state.gate_layer}, t_post" in title and re.search(r"image\s+offset", title), title
    clip_lines = [t for t in page.evaluate(
        "() => document.querySelector('#plot_frames .js-plotly-plot').layout.shapes.map(s => [s.name, s.y0])")
        if t[0] == "clip"]
    assert clip_lines and abs(clip_lines[0][1] - clip) < 1e-9  # the whole clip's gate score is drawn too
    video = read_video(video_file, num_frames=8)
    want = frame_scores(session.backbone, state, prompt, video.frames, SteerOptions())
    assert len(bars["y"]) == len(want) == 8
    assert all(abs(a - b) < 1e-6 for a, b in zip(bars["y"], want, strict=True)), (bars["y"], want)
    map_titles = page.evaluate("() => [...document.querySelectorAll('#plot_map_image .annotation-text')]"
                               ".map(a => a.textContent)")
    if not map_titles:  # the map tab was shown before "Video frames": show it again to read its panel names
        _show_tab(page, "Where in the input", "plot_map_image")
        map_titles = page.evaluate("() => [...document.querySelectorAll('#plot_map_image .annotation-text')]"
                                   ".map(a => a.textContent)")
    in_map = {m.group(0) for t in map_titles for m in [re.match(r"frame \d+", t)] if m}
    assert in_map and in_map <= set(bars["x"]), (in_map, bars["x"])
    page.close()


@pytest.mark.parametrize("width", WIDTHS)
def test_a_bad_input_names_itself_in_the_verdict_with_no_badge_or_popup(browser, app_server, tmp_path, video_file,
                                                                        width):
    """Two errors in a row (an unreadable image, then an image and a video together): each is named in the verdict,
    the newest replacing the older, with no pop-up (none to stack) and no status badge over the text."""
    page = browser.new_page(viewport={"width": width, "height": 900})
    _open(page, app_server["url"])
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"definitely not an image")
    for field, path, says, stale in (("image", bad, "not an image", None), ("video", video_file, "not both",
                                                                            "not an image")):
        _upload(page, field, path)
        page.locator("#run").click()
        page.locator("#verdict").get_by_text(says).first.wait_for(timeout=60_000)
        page.wait_for_timeout(800)
        verdict = page.locator("#verdict").inner_text()
        assert "Not run" in verdict and (stale is None or stale not in verdict), verdict
        text_box = _boxes(page, "#verdict .prose, #verdict p")
        badges = _visible_boxes(page, "#verdict .error, span.error")
        covering = [b for b in badges for t in text_box if _overlap(b, t)]
        assert not covering, covering
        assert not _visible_boxes(page, ".toast-body"), "said in place: no pop-up"
    page.evaluate("() => window.scrollTo(0, 0)")
    run = _boxes(page, "#run")[0]
    assert run["y"] + run["h"] <= 900, run  # Run is in view without scrolling at 900 px
    page.close()


def test_the_page_stays_on_the_machine_and_its_text_uses_one_face(browser, app_server):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    _open(page, app_server["url"])
    page.wait_for_timeout(1500)
    outside = [u for u in requests if not re.match(r"(https?|wss?)://127\.0\.0\.1[:/]", u)
               and not u.startswith(("data:", "blob:"))]
    assert not outside, outside
    cdp = page.context.new_cdp_session(page)
    cdp.send("DOM.enable")
    cdp.send("CSS.enable")
    root = cdp.send("DOM.getDocument", {"depth": -1})["root"]["nodeId"]
    faces: dict[str, set[str]] = {}
    for selector in ("h1", "#example label", "#prompt label", "#verdict", "button#run", "[role=tab]"):
        for node in cdp.send("DOM.querySelectorAll", {"nodeId": root, "selector": selector})["nodeIds"][:3]:
            fonts = cdp.send("CSS.getPlatformFontsForNode", {"nodeId": node})["fonts"]
            if fonts:  # what drew the node's glyphs: (family, served by the page rather than the system)
                faces.setdefault(selector, set()).update((f["familyName"], f["isCustomFont"]) for f in fonts)
    # one face for every glyph of every heading, label, tab and button, and it is the page's own (Gradio's theme
    # font, served from 127.0.0.1), never a system fallback: before the fix h1 mixed DejaVu Sans Bold with 5 glyphs
    # from a subset file ("Modality-Agnostic" with a foreign "A")
    used = set().union(*faces.values()) if faces else set()
    assert len(faces) >= 4 and len(used) == 1 and next(iter(used))[1], faces
    page.close()


def test_centroids_open_on_the_rhat_view(browser, app_server):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    _open(page, app_server["url"])
    _upload(page, "image", EXAMPLES_DIR / "solid_red.png")
    _run_and_wait(page)
    assert page.locator("#method input:checked").evaluate("e => e.value") == "r̂ × top PC"
    _show_tab(page, "Centroids", "plot_centroids")
    x_title = page.evaluate("() => document.querySelector('#plot_centroids .js-plotly-plot').layout.xaxis.title.text")
    assert "along r̂" in x_title, x_title
    cents = {t["name"]: t["x"][0] for t in _plot_data(page, "plot_centroids") if t["name"].endswith("centroid")}
    assert abs(cents["safe centroid"]) < 1e-4 and abs(cents["unsafe centroid"] - 1) < 1e-4, cents  # s = 0 and 1
    page.close()
