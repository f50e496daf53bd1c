"""Rendered plots and tables are legible: no two text labels overlap and none is clipped, and no table column sits
outside the window, at 1280 and 1600 px.

Checked on the real page (chromium via Playwright), from the bounding boxes of the rendered SVG text of every plot:
Explore's plots after an image run and after a video run, and Evaluate's charts after an evaluation; from the boxes
of the header cells of Evaluate's results and showcase tables; and from where the Run button lies after the Learn
tab loads an example into Explore.
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


# Each header cell of a table: its text and its box (the cells of a row share its columns' boxes).
_COLUMN_BOXES = """
el => [...el.querySelectorAll('thead th')].map(c => {
  const r = c.getBoundingClientRect();
  return {text: (c.innerText || '').trim(), x0: r.left, x1: r.right, y0: r.top, y1: r.bottom};
}).filter(c => c.x1 - c.x0 > 0)
"""


def _columns_outside(columns: list[dict], width: int, slack: float = 2.0) -> list[str]:
    """The columns whose box is not within the window's width ``0..width``."""
    return [f"{c['text']!r} at {c['x0']:.0f}..{c['x1']:.0f} px" for c in columns
            if c["x0"] < -slack or c["x1"] > width + slack]


def test_columns_outside_finds_a_column_past_the_window():
    cols = [{"text": "a", "x0": 30, "x1": 600}, {"text": "b", "x0": 600, "x1": 1300}]
    assert _columns_outside(cols, 1280) == ["'b' at 600..1300 px"]
    assert _columns_outside(cols, 1600) == []


@pytest.mark.parametrize("width", [1280, 1600])
def test_evaluate_charts_and_tables_fit_with_no_clipped_text(browser, app_server, width):  # noqa: F811
    """After an evaluation: the charts' text is clear, both tables keep every column in the window (the results
    under people's headers, not the report's machine names), and the showcase's heading says what it lists."""
    from mars_viz.ui.evaluate_tab import COLUMNS, HEADERS, SHOWCASE_COLUMNS, showcase_summary

    page = browser.new_page(viewport={"width": width, "height": 1100})
    _open(page, app_server["url"])
    page.get_by_role("tab", name="Evaluate").click()
    page.locator("#eval_limit input").fill("1")
    page.locator("#eval_run").click()
    page.locator("#eval_table").get_by_text(re.compile("harmful")).first.wait_for(state="attached", timeout=240_000)
    page.locator("#showcase_table").get_by_text(re.compile("left unchanged|MARS refused|over-refused")).first.wait_for(
        state="attached", timeout=60_000)
    heading, _ = showcase_summary(app_server["session"].showcase)
    page.locator("#showcase_heading").get_by_text(heading).first.wait_for(timeout=30_000)
    bad = _check_plots(page, [("", "plot_eval_conditions"), ("", "plot_eval_sweep")], width)
    page.wait_for_timeout(600)
    for elem, headers in (("eval_table", [HEADERS[c] for c in COLUMNS]), ("showcase_table", SHOWCASE_COLUMNS)):
        columns = page.locator(f"#{elem}").evaluate(_COLUMN_BOXES)
        assert [c["text"] for c in columns] == headers, elem
        bad += [f"{elem} @ {width}px: column {c} is outside the window" for c in _columns_outside(columns, width)]
    page.close()
    assert not bad, "\n".join(bad)


def test_learn_load_shows_the_inputs_down_to_run(browser, app_server):  # noqa: F811
    """A Learn example's Load switches to Explore and shows its inputs (the prompt) down to the Run button, not the
    Learn tab's scroll position (which leaves the prompt above the window, or Run below it)."""
    from mars_viz.data.examples import EXAMPLES

    height = 900
    page = browser.new_page(viewport={"width": 1280, "height": height})
    _open(page, app_server["url"])
    page.get_by_role("tab", name="Learn").click()
    last = len(EXAMPLES) - 1  # the lowest Load button: the page is scrolled furthest down
    page.locator(f"#learn_{last}").scroll_into_view_if_needed()
    page.locator(f"#learn_{last}").click()
    page.wait_for_function("v => document.querySelector('#prompt textarea').value === v", arg=EXAMPLES[last].prompt,
                           timeout=30_000)
    page.wait_for_timeout(1500)  # the scroll follows the loaded input's layout for about a second
    run, prompt = page.locator("#run").bounding_box(), page.locator("#prompt").bounding_box()
    page.close()
    assert run is not None and 0 <= run["y"] and run["y"] + run["height"] <= height, run
    assert prompt is not None and 0 <= prompt["y"] < height, prompt


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
