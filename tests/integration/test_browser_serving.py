"""A page that waits for the shared model says so (its place in the queue, and what the model is doing), and its
Stop button ends its own run, in a real headless browser."""

from __future__ import annotations

import os
import time

import pytest

from tests.conftest import model_held, wait_until
from tests.integration.test_browser import CHROMIUM, _open, _run_and_wait, browser  # noqa: F401

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600),
              pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium not installed")]


def test_a_second_page_shows_its_queue_position_while_another_run_holds_the_model(browser, class_server,  # noqa: F811
                                                                                   tmp_path):
    from gradio_client import Client

    s = class_server["session"]
    other = Client(class_server["url"], verbose=False)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        _open(page, class_server["url"])
        other.submit(prompt="Tell me a very long story.", max_new_tokens=2000, api_name="/analyze")
        wait_until(lambda: model_held(s), 60)
        page.locator("#run").click()
        # Gradio's status on the page's outputs: "queue: 1/1 | …", not a bare spinner
        page.wait_for_function("() => /queue: *\\d+ *\\/ *\\d+/.test(document.body.innerText)", timeout=30_000)
        # and the line that says what the shared model is doing meanwhile
        busy = page.locator("#busy_banner")
        busy.get_by_text("answering an /analyze API call").wait_for(timeout=10_000)
        page.screenshot(path=str(tmp_path / "queued.png"))
        assert other.predict(api_name="/stop")  # the other user stops: this page's run goes next
        page.locator("#verdict").get_by_text("Unsteered:").first.wait_for(timeout=120_000)
        page.wait_for_function("() => !(document.querySelector('#busy_banner') || {innerText: ''})"
                               ".innerText.includes('shared model is')", timeout=10_000)
    finally:
        other.close()
        page.close()


def test_the_stop_button_ends_the_pages_run_and_frees_the_model(browser, class_server):  # noqa: F811
    s = class_server["session"]
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    try:
        _open(page, class_server["url"])
        _run_and_wait(page)  # a first short run, so the page has answers to keep
        box = page.locator("#component-0").page.get_by_label("Max new tokens", exact=False).first
        box.fill("2000")
        box.press("Enter")
        page.locator("#prompt textarea").fill("Tell me a very long story.")
        page.locator("#run").click()
        wait_until(lambda: model_held(s), 60)
        time.sleep(0.5)
        t0 = time.monotonic()
        page.locator("#stop").click()
        wait_until(lambda: not s.lock.locked(), 5)
        assert time.monotonic() - t0 < 2.0  # a click's round trip, then one decode step
        page.locator("#verdict").get_by_text("Stopped.").wait_for(timeout=10_000)
        assert s.runs.count() == 0
        _run_and_wait(page)  # the page runs again
    finally:
        page.close()


@pytest.mark.parametrize("width", [1280, 1600])
def test_run_and_stop_are_in_view_on_an_empty_page(browser, class_server, width):  # noqa: F811
    """The empty drop zones are compact (the app's CSS must win over Gradio's own height), so Run and Stop sit
    above the fold at 900 px before anything is uploaded."""
    page = browser.new_page(viewport={"width": width, "height": 900})
    try:
        _open(page, class_server["url"])
        for field in ("image", "video"):
            assert page.locator(f"#{field} .upload-container").first.bounding_box()["height"] <= 120
        for button in ("#run", "#stop"):
            box = page.locator(button).bounding_box()
            assert box["y"] + box["height"] <= 900, (button, box)
    finally:
        page.close()


def test_a_page_without_a_run_shows_a_state_fitted_since_it_opened(browser, class_server):  # noqa: F811
    """A first run in Evaluate (or Calibrate) fits the state while Explore shows "No MARS state yet"; opening the
    Explore tab again draws that state's own figures."""
    s = class_server["session"]
    with s.lock:
        fitted = s.state
        s.set_state(None, "cleared by a test")
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        _open(page, class_server["url"])
        placeholder = page.get_by_text("No MARS state yet").first
        placeholder.wait_for(timeout=30_000)
        with s.lock:  # what Evaluate's first run does: the state is fitted (here: installed) for the first time
            s.set_state(fitted, "fitted by a test")
        page.get_by_role("tab", name="Calibrate").click()
        page.get_by_role("tab", name="Explore").click()
        placeholder.wait_for(state="hidden", timeout=30_000)
        page.locator("#run").wait_for(timeout=10_000)
        assert page.get_by_text("No MARS state yet").count() == 0
    finally:
        with s.lock:
            s.set_state(fitted, "test")
        page.close()
