"""A real headless browser (Debian chromium via Playwright) drives the dashboard on a tiny model."""

from __future__ import annotations

import os
import re
import shutil

import pytest

from mars_viz.data.examples import EXAMPLES_DIR

CHROMIUM = "/usr/bin/chromium"
pytestmark = [pytest.mark.browser, pytest.mark.timeout(600),
              pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium not installed")]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _plot_rendered(page, elem_id: str, timeout: float = 60_000) -> None:
    page.locator(f"#{elem_id} .js-plotly-plot").first.wait_for(state="attached", timeout=timeout)


def _open(page, url: str, attempts: int = 3) -> None:
    """Load the dashboard and wait until it can take input: the Run button and both file inputs are on the page.

    On a loaded machine the page has come up with Run drawn but a file input still missing after 30 s (CI, twice):
    the components' code loads lazily, one request each. So a page that is not ready within 45 s is reloaded, up to
    `attempts` times; one that never gets ready fails with what `#image` holds.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(attempts):
        if attempt == 0:
            page.goto(url)
        else:
            page.reload()
        try:
            page.locator("#run").wait_for(timeout=45_000)
            for field in ("image", "video"):
                page.locator(f"#{field} input[type=file]").wait_for(state="attached", timeout=45_000)
            return
        except PlaywrightTimeout as err:
            if attempt == attempts - 1:
                html = page.evaluate("() => (document.querySelector('#image') || {}).outerHTML || 'no #image'")
                raise AssertionError(f"the dashboard never became ready for input; #image is: {html[:600]}") from err


def _upload(page, field: str, path, attempts: int = 3) -> None:
    """Put `path` into the `#field` file input and wait until the page shows it.

    Right after a page load the input can exist before the component listens to it (seen once in CI, on a loaded
    machine): the file is then dropped silently. So the upload is retried, up to `attempts` times; a file the page
    never shows still fails the test. Open the page with `_open`, which waits for the inputs to exist.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    def shown(timeout: float) -> None:
        # the file's name, as the component shows it: Gradio may split it into stem and extension elements (a long
        # name is laid out as two flex items), so the field's text is compared with its white space removed
        page.wait_for_function("([id, name]) => { const el = document.querySelector('#' + id);"
                               " return !!el && el.innerText.replace(/\\s+/g, '').includes(name); }",
                               arg=[field, path.name], timeout=timeout)

    for attempt in range(attempts):
        field_input = page.locator(f"#{field} input[type=file]")
        if attempt and not field_input.count():
            # the input is gone: an earlier attempt's file did land, only late (a loaded machine); wait for it
            shown(90_000)
            return
        field_input.set_input_files(str(path), timeout=60_000)
        try:
            shown(30_000)
            return
        except PlaywrightTimeout:
            if attempt == attempts - 1:
                raise


def _watch_verdict(page) -> None:
    """Record whether a run starts from now on (every run first shows "Running…" in the verdict)."""
    page.evaluate("""() => { window.__ran = false; const v = document.querySelector('#verdict');
        new MutationObserver(() => { if (v.innerText.includes('Running')) window.__ran = true; })
            .observe(v, {subtree: true, childList: true, characterData: true}); }""")


def _wait_new_verdict(page, timeout: float = 180_000) -> None:
    page.wait_for_function("() => window.__ran && /Unsteered: (answered|refused)/.test("
                           "document.querySelector('#verdict').innerText)", timeout=timeout)


def _run_and_wait(page, timeout: float = 180_000) -> None:
    """Click Run and wait for the verdict of this run (not the one shown before the click)."""
    _watch_verdict(page)
    page.locator("#run").click()
    _wait_new_verdict(page, timeout)


def test_upload_run_plots_toggle_screenshot(browser, app_server, tmp_path):
    page = browser.new_page(viewport={"width": 1500, "height": 1400})
    _open(page, app_server["url"])
    page.locator("#prompt textarea").fill("What colour is this image?")
    _upload(page, "image", EXAMPLES_DIR / "solid_red.png")
    page.locator("#run").click()
    page.locator("#verdict").get_by_text(re.compile(r"Unsteered: (answered|refused)")).first.wait_for(timeout=120_000)
    # every plot renders (tabs are clicked so their plots mount)
    for tab, elem in [("Centroids", "plot_centroids"), ("Modality offset", "plot_modality_offset"),
                      ("Trust region", "plot_trust_region"), ("Trust region", "plot_plane"),
                      ("Trust region", "plot_target_curve"), ("Layer scores", "plot_layer_scores")]:
        page.get_by_role("tab", name=tab).click()
        _plot_rendered(page, elem)
    steered = page.locator("#steered textarea").input_value()
    unsteered = page.locator("#unsteered textarea").input_value()
    assert page.locator("#active textarea").input_value() == steered
    page.locator("#toggle").get_by_text("Unsteered").click()
    page.wait_for_function("v => document.querySelector('#active textarea').value === v", arg=unsteered,
                           timeout=10_000)
    page.get_by_role("tab", name="Trust region").click()
    _plot_rendered(page, "plot_trust_region")
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000
    if os.environ.get("MARS_VIZ_SCREENSHOT"):
        shutil.copy(shot, os.environ["MARS_VIZ_SCREENSHOT"])
    page.close()


def test_bad_upload_shows_error_and_page_still_works(browser, app_server, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"definitely not an image")
    page = browser.new_page()
    _open(page, app_server["url"])
    _upload(page, "image", bad)  # tolerant of a late upload and of the name laid out in two parts
    page.locator("#run").click()
    # in the verdict, where the page says it (the first match page-wide can be a hidden element)
    page.locator("#verdict").get_by_text("not an image").first.wait_for(timeout=60_000)
    page.close()


def test_a_state_swap_is_announced_on_an_open_page(browser, app_server):
    from dataclasses import replace

    session = app_server["session"]
    page = browser.new_page()
    _open(page, app_server["url"])
    page.locator("#run").wait_for(timeout=30_000)
    with session.lock:
        original, source = session.ensure_state(), session.state_source
    try:
        page.wait_for_timeout(3_000)  # the page has loaded and polled at least once: no banner yet
        assert not page.locator("#stale_banner").get_by_text("run again").is_visible()
        with session.lock:
            session.set_state(replace(original, target_level=original.target_level + 0.5), "swapped by a test")
        page.locator("#stale_banner").get_by_text("state swapped by a test").first.wait_for(timeout=15_000)
    finally:
        with session.lock:
            session.set_state(original, source)
        page.close()


def test_random_demo_model_carries_a_persistent_warning(browser, app_server):
    """The shared test server runs a tiny random model: the page must say its verdicts mean nothing, and keep
    saying so (not a toast) after a run."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    _open(page, app_server["url"])
    banner = page.locator("#credibility")
    banner.get_by_text("not meaningful").first.wait_for(timeout=30_000)
    assert "random weights" in banner.inner_text()
    assert "demo model" in page.locator("h1").first.evaluate("e => e.parentElement.innerText")
    page.close()


def test_learn_load_switches_to_explore_with_the_example(browser, app_server):
    from mars_viz.data.examples import EXAMPLES

    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    _open(page, app_server["url"])
    page.get_by_role("tab", name="Learn").click()
    page.locator("#learn_0").click()
    page.locator("#prompt textarea").wait_for(state="visible", timeout=30_000)  # Explore is the visible tab again
    page.wait_for_function("v => document.querySelector('#prompt textarea').value === v", arg=EXAMPLES[0].prompt,
                           timeout=30_000)
    assert page.get_by_text("into Explore: press Run").first.is_visible()
    page.close()


def test_showcase_round_trip_loads_and_runs_in_explore(browser, app_server):
    page = browser.new_page(viewport={"width": 1280, "height": 1200})
    _open(page, app_server["url"])
    page.get_by_role("tab", name="Evaluate").click()
    page.locator("#eval_limit input").fill("1")
    page.locator("#eval_run").click()
    # the table's cells are virtualised (attached, not "visible"); the dropdown gets the same entries
    page.locator("#showcase_table").get_by_text(re.compile("left unchanged|MARS refused|over-refused")).first.wait_for(
        state="attached", timeout=240_000)
    page.locator("#showcase_load").click()
    # the page switches to Explore with the item in place, and the chained Run produces a verdict
    page.locator("#prompt textarea").wait_for(state="visible", timeout=30_000)
    page.locator("#verdict").get_by_text(re.compile(r"Unsteered: (answered|refused)")).first.wait_for(timeout=120_000)
    assert page.locator("#prompt textarea").input_value().strip()
    # the Learn walkthrough now draws on the same showcase, and loads an item the same way
    first = app_server["session"].showcase[0]
    page.locator("#prompt textarea").fill("something else")
    page.get_by_role("tab", name="Learn").click()
    page.locator("#learn_showcase_note").get_by_text("this model's last evaluation").first.wait_for(timeout=30_000)
    _watch_verdict(page)
    page.locator("#learn_showcase_load").click()
    page.locator("#prompt textarea").wait_for(state="visible", timeout=30_000)
    page.wait_for_function("v => document.querySelector('#prompt textarea').value === v", arg=first.prompt,
                           timeout=30_000)
    _wait_new_verdict(page)
    page.close()


def test_image_and_video_together_mark_only_the_verdict(browser, app_server):
    page = browser.new_page(viewport={"width": 1280, "height": 1200})
    _open(page, app_server["url"])
    _upload(page, "image", EXAMPLES_DIR / "solid_red.png")
    _run_and_wait(page)
    old_answer = page.locator("#steered textarea").input_value()
    _upload(page, "video", EXAMPLES_DIR / "colour_cycle.mp4")
    page.locator("#run").click()
    page.locator("#verdict").get_by_text("Not run").first.wait_for(timeout=30_000)
    verdict = page.locator("#verdict").inner_text()
    assert "not both" in verdict and "Unsteered:" not in verdict  # the old verdict is replaced by the reason
    page.wait_for_timeout(1_000)
    for panel in ("#unsteered", "#steered", "#seen", "#plot_centroids"):  # nothing else is marked as failed
        assert not page.locator(panel).get_by_text("Error", exact=True).count(), panel
    assert page.locator("#steered textarea").input_value() == old_answer  # nothing is lost
    page.close()


def test_video_gallery_has_no_broken_thumbnail_over_five_runs(browser, app_server):
    page = browser.new_page(viewport={"width": 1280, "height": 1200})
    _open(page, app_server["url"])
    _upload(page, "video", EXAMPLES_DIR / "colour_cycle.mp4")
    broken = []
    for run in range(5):
        _run_and_wait(page)
        page.wait_for_function("() => { const imgs = [...document.querySelectorAll('#seen img')];"
                               " return imgs.length > 0 && imgs.every(i => i.complete); }", timeout=30_000)
        sizes = page.locator("#seen img").evaluate_all("imgs => imgs.map(i => [i.src, i.naturalWidth])")
        assert len(sizes) >= 4, sizes  # the sampled frames are all shown
        broken += [f"run {run}: {src}" for src, w in sizes if w == 0]
    page.close()
    assert not broken, broken


def test_layer_inspector_keeps_the_calibrated_layers_and_names_the_inspected_one(browser, app_server):
    state = app_server["session"].ensure_state()
    page = browser.new_page(viewport={"width": 1280, "height": 1200})
    _open(page, app_server["url"])
    _upload(page, "image", EXAMPLES_DIR / "solid_red.png")
    _run_and_wait(page)
    verdict = page.locator("#verdict").inner_text()
    other = next(i for i in range(app_server["session"].backbone.num_layers) if i not in (state.layer,
                                                                                          state.gate_layer))
    page.get_by_role("tab", name="Layer scores").click()
    box = page.locator("#inspect input[type=number]")
    box.fill(str(other))
    box.press("Enter")
    layers = page.locator("#plot_layer_scores")
    layers.get_by_text(f"inspecting {other}").first.wait_for(timeout=30_000)
    assert layers.get_by_text(f"push {state.layer}").count()  # the calibrated push layer stays marked
    if state.gate_position == "inst":  # the gate's layer, named with its position (drawn even at the push layer)
        assert layers.get_by_text(f"gate {state.gate_layer} (t_inst)").count()
    elif state.gate_layer != state.layer:
        assert layers.get_by_text(f"gate {state.gate_layer}").count()
    page.get_by_role("tab", name="Trust region").click()
    page.locator("#plot_trust_region").get_by_text(re.compile(rf"[Ll]ayer {other}\b")).first.wait_for(timeout=30_000)
    assert page.locator("#verdict").inner_text() == verdict  # the verdict is about the run, at the calibrated layer
    page.close()


def test_a_gate_at_t_inst_without_its_fit_is_rejected_in_the_verdict(browser, app_server):
    """An old state (no t_inst fit): choosing "Gate reads at: inst" replaces the verdict with the reason, no run."""
    from dataclasses import replace

    session = app_server["session"]
    with session.lock:
        original, source = session.ensure_state(), session.state_source
        session.set_state(replace(original, inst=None, gate_position="post"), "an old state, by a test")
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    try:
        _open(page, app_server["url"])
        page.locator("#gate_position input").click()
        page.get_by_role("option", name=re.compile("^inst")).click()
        page.locator("#run").click()
        page.locator("#verdict").get_by_text("Not run").first.wait_for(timeout=30_000)
        verdict = page.locator("#verdict").inner_text()
        assert "no t_inst fit" in verdict and "refit" in verdict and "Unsteered:" not in verdict
    finally:
        page.close()
        with session.lock:
            session.set_state(original, source)
