"""Issue 23's legibility points, on fixed data: wrapped titles and placeholder messages, the layer-score lines and
marks, the refusal plane's legend and title, the strength sweep's labels, the conditions chart's legend, and the
Evaluate / Learn wording (table headers, the showcase heading and why nothing changed)."""

from __future__ import annotations

import re

import numpy as np

from mars_viz.views import figures
from mars_viz.views.layout import NARROW_FIG_PX, text_lines, title_layout, wrap_text

LONG = ("Press Run in Explore. The first run calibrates MARS for this model (about 30 s on the tiny demo model, 10-20 "
        "min for a 0.5B model on a CPU) and caches it; after that these plots are instant.")


def _lines(text: str) -> list[str]:
    return re.split(r"<br\s*/?>", text)


def test_wrap_text_keeps_words_and_breaks_and_fits_the_width():
    out = wrap_text(LONG, 300, 14)
    assert out.replace("<br>", " ") == LONG  # only spaces became breaks
    assert len(_lines(out)) > 2 and all(len(line) * 14 * 0.5 <= 300 for line in _lines(out))
    assert wrap_text("a<br>b", 300) == "a<br>b" and text_lines("a<br>b") == 2 and text_lines("") == 0


def test_a_long_title_is_wrapped_above_the_plot_and_gets_the_room_it_needs():
    title, top = title_layout("x " * 10)
    assert title == {"text": ("x " * 10).strip()} and top == 50  # one line: plotly's own place
    fig = figures.placeholder_figure("m", "Occlusion: the gate's score minus the score with each region covered "
                                          "in the neutral colour (positive = the region pushes toward refusal)")
    assert "<br>" in fig.layout.title.text and fig.layout.title.yref == "paper" and fig.layout.title.automargin
    assert fig.layout.margin.t > 50 and fig.layout.height > figures.HEIGHT  # the plot keeps its size
    assert figures.wrap_title("short title") == "short title"


def test_placeholder_message_is_wrapped_to_the_narrowest_plot():
    text = figures.placeholder_figure(LONG, "No MARS state yet").layout.annotations[0].text
    assert text.replace("<br>", " ") == LONG
    assert all(len(line) * 14 * 0.45 < NARROW_FIG_PX - 40 for line in _lines(text))


SCORES = {"separability": [0.6, 0.9, 0.95, 0.97], "consistency": [0.2, 0.5, 0.6, 0.7],
          "steerability": [0.0, 0.0, 0.0, 0.0], "combined": [0.0, 0.0, 0.0, 0.0]}


def test_steerability_is_drawn_over_the_steer_score_and_listed_in_order():
    fig = figures.layer_scores_figure(SCORES, chosen_layer=1)
    names = [t.name for t in fig.data]
    steer, steerability = (next(t for t in fig.data if t.name.startswith(n)) for n in ("steer score", "steerability"))
    assert names.index(steer.name) < names.index("steerability")  # drawn first: under it
    assert steerability.line.dash == "dash" and steerability.line.width >= 2
    ranked = sorted(fig.data, key=lambda t: t.legendrank)
    assert [t.name for t in ranked][:4] == ["separability", "consistency", "steerability", steer.name]


def test_inspecting_the_push_or_gate_layer_keeps_its_mark():
    texts = [a.text for a in figures.layer_scores_figure(SCORES, 1, detect_layer=3, inspected=3).layout.annotations]
    assert "gate 3 · inspecting" in texts and "push 1" in texts
    texts = [a.text for a in figures.layer_scores_figure(SCORES, 1, detect_layer=3, inspected=1).layout.annotations]
    assert "push 1 · inspecting" in texts and "gate 3" in texts
    texts = [a.text for a in figures.layer_scores_figure(SCORES, 1, detect_layer=3, inspected=2).layout.annotations]
    assert "inspecting 2" in texts


def test_plane_legend_is_short_and_its_title_names_the_layer():
    coords = np.array([[0.0, 0.1], [1.0, 0.3], [0.5, 0.9], [0.6, 1.1]])
    current = {"raw": (0.55, 1.0), "recentred": (0.3, 0.1), "steered": (1.8, 0.1)}
    fig = figures.plane_figure(coords, ["safe", "unsafe", "image", "video"], current, 0.45, 3.0, layer=7)
    listed = [t.name for t in fig.data if t.showlegend is not False]
    assert "safe centroid" not in listed and "input path" not in listed and len(listed) == 7
    assert fig.layout.legend.orientation == "h" and fig.layout.legend.itemsizing == "constant"
    assert "layer 7" in fig.layout.title.text and "<br>" not in fig.layout.title.text


def test_strength_sweep_labels_run_inward_unclipped():
    sweep = {"0": {"refusal_harmless": 0.0, "refusal_harmful": 0.0},
             "1": {"refusal_harmless": 1.0, "refusal_harmful": 1.0}}
    tr = figures.strength_sweep_figure(sweep).data[0]
    assert tr.cliponaxis is False and list(tr.text) == ["λ=0", "λ=1"]
    assert tr.textposition[0].endswith("right") and tr.textposition[0].startswith("top")  # from (0, 0): up, right
    assert tr.textposition[1].endswith("left") and tr.textposition[1].startswith("bottom")  # from (1, 1): down, left


def test_conditions_legend_sits_at_the_foot_clear_of_the_axis_title():
    fig = figures.eval_conditions_figure({"text/harmful": {"refusal_unsteered": 0.0, "refusal_steered": 0.5}})
    assert fig.layout.legend.yref == "container" and fig.layout.legend.y == 0
    assert fig.layout.margin.b >= 100


def test_evaluate_headers_are_for_people_and_the_report_keeps_machine_names():
    from mars_viz.ui.evaluate_tab import COLUMN_HELP, COLUMNS, HEADERS

    assert list(HEADERS) == COLUMNS and HEADERS["refusal_unsteered"] == "refusal (unsteered)"
    assert all("_" not in h for h in HEADERS.values())
    for name, header in HEADERS.items():  # the help names both
        assert header in COLUMN_HELP.replace("\n", " ") and (name in COLUMN_HELP or name in ("condition", "n"))


def _entry(category):
    from mars_viz.analysis.showcase import ShowcaseEntry

    return ShowcaseEntry(category, "text/harmful", "req", "req", "a", "b")


def test_showcase_heading_matches_what_is_listed():
    from mars_viz.ui.evaluate_tab import EvalShowcase, HarmfulOutcome, showcase_summary

    heading, text = showcase_summary([_entry("mars_refused"), _entry("unchanged")])
    assert heading == "Where MARS changed the outcome" and "**1** harmful" in text and "1 it left unchanged" in text
    opened = HarmfulOutcome(n=8, refused_unsteered=0.0, refused_mars=0.0, gate_open=0.625)
    heading, text = showcase_summary(EvalShowcase([_entry("unchanged")] * 3, opened))
    assert heading.startswith("No input changed outcome") and "3" in heading and "changed the outcome" not in heading
    assert "gate opened on 62%" in text or "gate opened on 63%" in text
    assert "did not become refusals" in text and "refused them already" not in text


def test_why_nothing_flipped_follows_the_numbers():
    from mars_viz.ui.evaluate_tab import HarmfulOutcome

    rows = [{"kind": "harmful", "unsteered": {"refused": False}, "mars": {"refused": False, "gate_open": g}}
            for g in (True, False)] + [{"kind": "harmless", "unsteered": {"refused": True},
                                        "mars": {"refused": True, "gate_open": True}}]
    out = HarmfulOutcome.of(rows)
    assert (out.n, out.gate_open, out.refused_unsteered) == (2, 0.5, 0.0)
    assert "gate opened on 50% of the 2" in out.why_none_flipped()
    assert "stayed closed" in HarmfulOutcome(4, 0.0, 0.0, 0.0).why_none_flipped()
    assert "already refused all 4" in HarmfulOutcome(4, 1.0, 1.0, 0.5).why_none_flipped()


def test_learn_note_heading_says_nothing_changed_when_nothing_did():
    from types import SimpleNamespace

    from mars_viz.ui.evaluate_tab import EvalShowcase, HarmfulOutcome
    from mars_viz.ui.learn import _showcase_view

    session = SimpleNamespace(showcase=EvalShowcase([_entry("unchanged")] * 2, HarmfulOutcome(8, 0.0, 0.0, 0.625)))
    note = _showcase_view(session)[0]["value"]
    assert note.startswith("### No input changed outcome") and "This model's last evaluation" in note
    assert "gate opened on" in note and "refused them already" not in note
