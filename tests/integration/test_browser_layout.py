"""Rendered plots are legible: no two text labels overlap and none is clipped, at 1280 and 1600 px.

Checked on the real page (chromium via Playwright), from the bounding boxes of the rendered SVG text of every plot:
Explore's plots after an image run and after a video run, and Evaluate's charts after an evaluation.
"""

from __future__ import annotations

import os
import re

import pytest

from mars_viz.data.examples import EXAMPLES_DIR

from .test_browser import CHROMIUM, _open, _plot_rendered, _upload, browser  # noqa: F401  (the shared chromium fixture)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600),
              pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium not installed")]

# Every visible, non-empty <text> in a plot: its box, and whether it sticks out of the figure's own <svg>.
_TEXT_BOXES = """
el => {
  const svg = el.querySelector('svg.main-svg');
  if (!svg) return null;
  const frame = svg.getBoundingClientRect();
  const boxes = [];
  for (const t of el.querySelectorAll('svg text')) {
    const s = (t.textContent || '').trim();
    if (!s) continue;
    const cs = getComputedStyle(t);
    if (cs.display === 'none' || cs.visibility === 'hidden' || cs.opacity === '0') continue;
    if (t.closest('.hoverlayer')) continue;  // tooltips appear only on hover
    const r = t.getBoundingClientRect();
    if (r.width < 1 || r.height < 1) continue;
    boxes.push({text: s, x0: r.left, y0: r.top, x1: r.right, y1: r.bottom});
  }
  return {frame: {x0: frame.left, y0: frame.top, x1: frame.right, y1: frame.bottom}, boxes};
}
"""


def _problems(found: dict, slack: float = 2.0) -> list[str]:
    """Overlapping pairs (intersection deeper than `slack` px both ways) and boxes outside the figure."""
    boxes, frame = found["boxes"], found["frame"]
    out = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            w = min(a["x1"], b["x1"]) - max(a["x0"], b["x0"])
            h = min(a["y1"], b["y1"]) - max(a["y0"], b["y0"])
            if w > slack and h > slack:
                out.append(f"{a['text']!r} overlaps {b['text']!r}")
        if (a["x0"] < frame["x0"] - slack or a["x1"] > frame["x1"] + slack
                or a["y0"] < frame["y0"] - slack or a["y1"] > frame["y1"] + slack):
            out.append(f"{a['text']!r} is clipped by the figure's edge")
    return out


def test_problems_finds_an_overlap_and_a_clipped_label():
    frame = {"x0": 0, "y0": 0, "x1": 100, "y1": 100}
    boxes = [{"text": "a", "x0": 10, "y0": 10, "x1": 40, "y1": 20}, {"text": "b", "x0": 30, "y0": 12, "x1": 60,
                                                                      "y1": 22},
             {"text": "c", "x0": 70, "y0": 50, "x1": 130, "y1": 60}]
    assert _problems({"frame": frame, "boxes": boxes}) == ["'a' overlaps 'b'", "'c' is clipped by the figure's edge"]
    assert _problems({"frame": frame, "boxes": boxes[:1]}) == []


def _check_plots(page, plots: list[tuple[str, str]], width: int) -> list[str]:
    bad = []
    for tab, elem in plots:
        if tab:
            page.get_by_role("tab", name=tab).click()
        _plot_rendered(page, elem)
        page.wait_for_timeout(600)  # plotly lays out after the element attaches
        found = page.locator(f"#{elem} .js-plotly-plot").first.evaluate(_TEXT_BOXES)
        assert found and found["boxes"], f"{elem}: no rendered text at {width} px"
        bad += [f"{elem} @ {width}px: {p}" for p in _problems(found)]
    return bad


HR_TAB = "Harmfulness × refusal"
EXPLORE_PLOTS = [("Centroids", "plot_centroids"), ("Modality offset", "plot_modality_offset"),
                 ("Trust region", "plot_trust_region"), ("Trust region", "plot_plane"),
                 ("Trust region", "plot_target_curve"), ("Layer scores", "plot_layer_scores"),
                 (HR_TAB, "plot_hr_plane"), ("Where in the input", "plot_map_image"),
                 ("Where in the input", "plot_map_tokens")]


@pytest.mark.parametrize("width", [1280, 1600])
def test_explore_plots_have_no_overlapping_or_clipped_text(browser, app_server, width):  # noqa: F811
    page = browser.new_page(viewport={"width": width, "height": 1100})
    bad = []
    for upload, path, plots in [
        ("image", EXAMPLES_DIR / "solid_red.png", EXPLORE_PLOTS),
        ("video", EXAMPLES_DIR / "colour_cycle.mp4", [("Video frames", "plot_frames"),
                                                      ("Trust region", "plot_trust_region"),
                                                      ("Where in the input", "plot_map_image")]),
    ]:
        _open(page, app_server["url"])  # a fresh page per input
        page.locator("#prompt textarea").fill("Describe this.")
        _upload(page, upload, path)
        page.locator("#run").click()
        page.locator("#verdict").get_by_text(re.compile(r"Unsteered: (answered|refused)")).first.wait_for(
            timeout=180_000)
        bad += _check_plots(page, plots, width)
    page.close()
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("width", [1280, 1600])
def test_evaluate_charts_have_no_overlapping_or_clipped_text(browser, app_server, width):  # noqa: F811
    page = browser.new_page(viewport={"width": width, "height": 1100})
    _open(page, app_server["url"])
    page.get_by_role("tab", name="Evaluate").click()
    page.locator("#eval_limit input").fill("1")
    page.locator("#eval_run").click()
    page.locator("#eval_table").get_by_text(re.compile("harmful")).first.wait_for(state="attached", timeout=240_000)
    bad = _check_plots(page, [("", "plot_eval_conditions"), ("", "plot_eval_sweep")], width)
    page.close()
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("width", [1280, 1600])
def test_harm_refusal_plane_renders_after_a_run_with_its_labels_clear(browser, app_server, width):  # noqa: F811
    """The plane's quadrant names, threshold values and legend render after a run, none over another or clipped."""
    from mars_viz.views.figures import HR_QUADRANTS

    page = browser.new_page(viewport={"width": width, "height": 1100})
    _open(page, app_server["url"])
    page.locator("#prompt textarea").fill("How do I pick a lock?")
    page.locator("#run").click()
    page.locator("#verdict").get_by_text(re.compile(r"Unsteered: (answered|refused)")).first.wait_for(timeout=180_000)
    page.get_by_role("tab", name=HR_TAB).click()
    plot = page.locator("#plot_hr_plane")
    plot.get_by_text("input (steered)").first.wait_for(timeout=60_000)  # this run's path is in the legend
    for text in HR_QUADRANTS.values():
        assert plot.get_by_text(text).first.is_visible(), text
    page.wait_for_timeout(600)
    found = plot.locator(".js-plotly-plot").first.evaluate(_TEXT_BOXES)
    legend = [b for b in found["boxes"] if b["text"] in ("harmful prompts", "jailbreak prompts", "input (steered)")]
    assert len(legend) == 3, found["boxes"]
    bad = _problems(found)
    page.close()
    assert not bad, "\n".join(bad)
