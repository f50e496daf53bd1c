"""Where in the input, in a real headless browser (Debian chromium via Playwright) on the tiny qwen2_vl server: the
heatmap overlay renders over an image and over a video's frames, the token strip renders the prompt's text, and the
occlusion check draws its map."""

from __future__ import annotations

import os
import re
import shutil

import pytest

from mars_viz.data.examples import EXAMPLES_DIR

from .test_browser import CHROMIUM, _open, _upload, browser  # noqa: F401  (the shared chromium fixture)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600),
              pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium not installed")]


# what plotly actually drew: traces by type, the images under them, and the heatmap cells' text
_DRAWN = """id => { const el = document.querySelector('#' + id + ' .js-plotly-plot');
  if (!el || !el.data) return null;
  return {types: el.data.map(t => t.type), images: (el.layout.images || []).length,
          cells: el.querySelectorAll('.heatmaplayer image, .hm image').length,
          text: [...el.querySelectorAll('.textpoint, text')].map(t => t.textContent).join(' '),
          title: (el.layout.title && el.layout.title.text) || ''}; }"""


def _run(page, url: str, field: str, path, prompt: str) -> None:
    _open(page, url)
    page.locator("#prompt textarea").fill(prompt)
    _upload(page, field, path)
    page.locator("#run").click()
    page.locator("#verdict").get_by_text(re.compile(r"Unsteered: (answered|refused)")).first.wait_for(timeout=180_000)
    page.get_by_role("tab", name="Where in the input").click()


def _drawn(page, elem_id: str, want_panels: int) -> dict:
    page.locator(f"#{elem_id} .js-plotly-plot").first.wait_for(state="attached", timeout=60_000)
    page.wait_for_function(f"() => {{ const d = ({_DRAWN})('{elem_id}'); return d && d.types.includes('heatmap') "
                           f"&& d.images >= {want_panels} && d.cells > 0; }}", timeout=120_000)
    return page.evaluate(_DRAWN, elem_id)


def test_overlay_renders_over_an_image_and_the_token_strip_shows_the_prompt(browser, app_server, tmp_path):  # noqa: F811
    page = browser.new_page(viewport={"width": 1400, "height": 1300})
    _run(page, app_server["url"], "image", EXAMPLES_DIR / "figstep_harmful.png", "Complete the steps on the list.")
    drawn = _drawn(page, "plot_map_image", 1)
    assert drawn["types"] == ["heatmap"] and "Where in the image" in drawn["title"]
    strip = _drawn(page, "plot_map_tokens", 0)
    assert "·the" in strip["text"] and "img×" in strip["text"]  # the tiny tokenizer splits words
    # hovering a cell gives its score
    page.locator("#plot_map_image .nsewdrag").first.scroll_into_view_if_needed()  # the mouse reaches only the viewport
    box = page.locator("#plot_map_image .nsewdrag").first.bounding_box()
    hover = page.locator("#plot_map_image .hoverlayer").get_by_text(re.compile(r"unsafety score -?\d")).first
    for dx in (0.3, 0.5, 0.7, 0.4, 0.6):  # plotly draws the label on a mouse *move* over a cell
        page.mouse.move(box["x"] + box["width"] * dx, box["y"] + box["height"] * dx, steps=4)
        try:
            hover.wait_for(timeout=10_000)
            break
        except Exception:
            continue
    hover.wait_for(timeout=30_000)
    page.locator("#map_raw").click()  # re-scored from the kept residuals, no re-run
    page.wait_for_function(f"() => ({_DRAWN})('plot_map_image').title.includes('raw, not re-centred')",
                           timeout=60_000)
    page.locator("#occlusion").click()
    occl = _drawn(page, "plot_occlusion", 1)
    assert "Occlusion" in occl["title"]
    shot = tmp_path / "maps.png"
    page.locator("#plot_map_image").screenshot(path=str(shot))
    assert shot.stat().st_size > 5_000
    if os.environ.get("MARS_VIZ_MAPS_SCREENSHOT"):
        shutil.copy(shot, os.environ["MARS_VIZ_MAPS_SCREENSHOT"])
    page.close()


def test_overlay_renders_on_each_sampled_frame_of_a_video(browser, app_server):  # noqa: F811
    page = browser.new_page(viewport={"width": 1400, "height": 1300})
    _run(page, app_server["url"], "video", EXAMPLES_DIR / "colour_cycle.mp4", "What happens in this video?")
    drawn = _drawn(page, "plot_map_image", 2)
    # the tiny qwen2_vl model pairs frames (temporal patch of 2): every sampled frame gets a panel
    assert drawn["images"] >= 4 and "video's sampled frames" in drawn["title"]
    assert "frame 0" in drawn["text"] and "shared with frames" in drawn["text"]
    strip = _drawn(page, "plot_map_tokens", 0)
    assert "vid×" in strip["text"]
    page.close()
