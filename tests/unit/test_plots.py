"""Plot builders: pure figures from fixed data; traces found by name, values checked against the input."""

from __future__ import annotations

import csv
import io
import re

import numpy as np
import plotly.graph_objects as go
import pytest

from mars_viz.core.rule import MarsRule
from mars_viz.views import export, figures, layout
from mars_viz.views.export import PLOT_CONFIG, figure_csv, figure_html
from mars_viz.views.figures import (
    COLORS,
    centroid_figure,
    frame_scores_figure,
    layer_scores_figure,
    modality_offset_figure,
    plane_figure,
    target_curve_figure,
    trust_region_figure,
)

COORDS = np.array([[0.0, 0.1], [0.2, -0.1], [1.0, 0.3], [1.2, 0.2], [0.5, 0.9], [0.6, 1.1]])
LABELS = ["safe", "safe", "unsafe", "unsafe", "image", "video"]
CURRENT = {"raw": (0.55, 1.0), "recentred": (0.3, 0.1), "steered": (1.8, 0.1)}


def trace(fig: go.Figure, name: str):
    found = [t for t in fig.data if t.name == name]
    assert len(found) == 1, f"expected one trace named {name!r}, got {[t.name for t in fig.data]}"
    return found[0]


def shapes(fig: go.Figure, name: str) -> list:
    return [s for s in fig.layout.shapes if s.name == name]


def common(fig: go.Figure) -> None:
    assert fig.layout.template.layout.paper_bgcolor is not None  # a template object is attached
    assert fig.layout.height in (figures.HEIGHT, figures.HEIGHT + 80)  # + room for a legend under the plot
    assert all(t.name for t in fig.data), "every trace must be named"


def test_template_is_plotly_white():
    import plotly.io as pio

    fig = target_curve_figure({1.0: 0.5}, 1.0)
    assert fig.layout.template == pio.templates["plotly_white"]


def test_centroid_figure():
    fig = centroid_figure(COORDS, LABELS, {"safe": (0.1, 0.0), "unsafe": (1.1, 0.25)}, CURRENT, method="UMAP")
    common(fig)
    assert list(trace(fig, "safe prompts").x) == [0.0, 0.2]
    assert list(trace(fig, "safe prompts").y) == [0.1, -0.1]
    assert list(trace(fig, "unsafe prompts").x) == [1.0, 1.2]
    assert list(trace(fig, "neutral image + safe").y) == [0.9]
    assert list(trace(fig, "neutral video + safe").x) == [0.6]
    assert trace(fig, "safe prompts").marker.color == COLORS["safe"] == "#2a9d8f"
    assert trace(fig, "unsafe prompts").marker.color == "#e76f51"
    assert trace(fig, "neutral image + safe").marker.color == "#8d99ae"
    assert trace(fig, "neutral video + safe").marker.color == "#6d597a"
    safe_c, unsafe_c = trace(fig, "safe centroid"), trace(fig, "unsafe centroid")
    assert (safe_c.x, safe_c.y) == ((0.1,), (0.0,)) and safe_c.marker.symbol == "star"
    assert (unsafe_c.x, unsafe_c.y) == ((1.1,), (0.25,)) and unsafe_c.marker.symbol == "star"
    for key, name, color in (("raw", "input (raw)", "#264653"), ("recentred", "input (re-centred)", "#f4a261"),
                             ("steered", "input (steered)", "#e63946")):
        t = trace(fig, name)
        assert (t.x[0], t.y[0]) == CURRENT[key] and t.marker.color == color
    path = trace(fig, "input path")
    assert list(path.x) == [0.55, 0.3, 1.8] and list(path.y) == [1.0, 0.1, 0.1]
    assert fig.layout.xaxis.title.text == "UMAP 1" and fig.layout.yaxis.title.text == "UMAP 2"


def test_centroid_figure_without_current_and_errors():
    fig = centroid_figure(COORDS[:2], ["safe", "unsafe"], {"safe": (0, 0), "unsafe": (1, 0)}, None)
    names = [t.name for t in fig.data]
    assert "input path" not in names and "input (raw)" not in names
    assert fig.layout.xaxis.title.text == "PCA 1"
    # a single current point: marker but no path
    fig = centroid_figure(COORDS[:2], ["safe", "unsafe"], {}, {"raw": (0.5, 0.5)})
    assert "input path" not in [t.name for t in fig.data] and trace(fig, "input (raw)").x == (0.5,)
    with pytest.raises(ValueError, match="labels"):
        centroid_figure(COORDS, LABELS[:2], {})
    with pytest.raises(ValueError, match="unknown point label"):
        centroid_figure(COORDS[:1], ["text"], {})
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        centroid_figure(np.zeros((2, 3)), ["safe", "safe"], {})
    with pytest.raises(ValueError, match="current-input"):
        centroid_figure(COORDS[:1], ["safe"], {}, {"final": (0, 0)})


def test_modality_offset_figure():
    ratio = {"image": [0.2, 0.8, 1.5], "video": [0.1, 0.5, 1.0]}
    before = {"image": [0.1, 0.4, 0.9], "video": [0.05, 0.3, 0.6]}
    after = {"image": [0.0, 0.02, -0.01], "video": [0.01, 0.0, 0.0]}
    fig = modality_offset_figure(ratio, before, after, chosen_layer=2)
    assert fig.layout.height in (figures.HEIGHT, figures.HEIGHT + 80)  # + room for a legend under the plot
    img = trace(fig, "image offset")
    assert list(img.x) == [0, 1, 2] and list(img.y) == [0.2, 0.8, 1.5]
    assert img.xaxis == "x" and img.yaxis == "y"  # left panel
    assert list(trace(fig, "video offset").y) == [0.1, 0.5, 1.0]
    for m in ("image", "video"):
        b, a = trace(fig, f"{m} before re-centring"), trace(fig, f"{m} after re-centring")
        assert list(b.y) == before[m] and list(a.y) == after[m]
        assert b.xaxis == "x2" and a.xaxis == "x2"  # right panel
        assert b.line.dash == "dash"
    chosen = shapes(fig, "chosen layer")
    assert sorted(s.xref for s in chosen) == ["x", "x2"]
    assert all(s.x0 == s.x1 == 2 and s.line.dash == "dash" for s in chosen)
    zero = shapes(fig, "zero")
    assert len(zero) == 1 and zero[0].y0 == zero[0].y1 == 0 and zero[0].yref == "y2"
    titles = [a.text for a in fig.layout.annotations]
    assert "offset norm / ||r_l|| (log)" in titles and "spurious score shift (held-out)" in titles
    assert fig.layout.yaxis.type == "log"  # a layer-0 spike must not flatten the other layers
    assert trace(fig, "image offset").line.dash == "dot"  # never the same style as "after re-centring"
    assert fig.layout.xaxis.title.text == fig.layout.xaxis2.title.text == "decoder layer"
    assert shapes(modality_offset_figure(ratio, before, after, None), "chosen layer") == []


def test_trust_region_figure():
    tau, m, t_star = 0.4, 0.2, 3.0
    fig = trust_region_figure(MarsRule(tau, t_star, m), {"raw": 0.9, "recentred": 0.5, "steered": 2.8},
                              spreads=(0.3, 0.4), layer=7)
    common(fig)
    # vertical lines at tau and t*
    (tau_line,) = shapes(fig, "tau")
    (t_line,) = shapes(fig, "t*")
    assert tau_line.type == t_line.type == "line"
    assert tau_line.x0 == tau_line.x1 == tau and t_line.x0 == t_line.x1 == t_star
    texts = [a.text for a in fig.layout.annotations]
    assert "τ = 0.40" in texts and "t* = 3" in texts
    # shaded regions with the right extents; axis from min(-0.5, ...) to max(t*+1, ...)
    (safe,) = shapes(fig, "safe side (gate closed)")
    (ramp,) = shapes(fig, "ramp")
    (trust,) = shapes(fig, "trust region")
    (beyond,) = shapes(fig, "beyond t*")
    assert safe.x0 == -0.6 and safe.x1 == tau  # -2 * spread of safe scores < -0.5
    assert (ramp.x0, ramp.x1) == (tau, pytest.approx(tau + m))
    assert (trust.x0, trust.x1) == (tau, t_star)
    assert (beyond.x0, beyond.x1) == (t_star, t_star + 1)
    assert tuple(fig.layout.xaxis.range) == (-0.6, 4.0)
    # centroids at 0 and 1 with spreads as error bars
    sc, uc = trace(fig, "safe centroid"), trace(fig, "unsafe centroid")
    assert sc.x == (0.0,) and uc.x == (1.0,)
    assert tuple(sc.error_x.array) == (0.3,) and tuple(uc.error_x.array) == (0.4,)
    for name, val in (("score (raw)", 0.9), ("score (re-centred) = the gate's score", 0.5), ("score (steered)", 2.8)):
        assert trace(fig, name).x == (val,)
    # the steered marker has its own row, so a closed gate's unmoved input does not hide the re-centred one
    assert trace(fig, "score (steered)").y[0] > trace(fig, "score (re-centred) = the gate's score").y[0]
    (arrow,) = [a for a in fig.layout.annotations if a.showarrow]
    assert (arrow.ax, arrow.x) == (0.5, 2.8)
    # gate weight and push, on the secondary axis, with exact kinks
    gate, push = trace(fig, "gate weight w(s)"), trace(fig, "push λ·w(s)·ReLU(t*−s)")
    assert gate.yaxis == push.yaxis == "y2"
    s, w, p = np.array(gate.x), np.array(gate.y), np.array(push.y)
    assert np.array_equal(np.array(push.x), s)
    assert np.allclose(w, np.clip((s - tau) / m, 0, 1))
    assert np.allclose(p, np.clip((s - tau) / m, 0, 1) * np.maximum(t_star - s, 0))
    for x, want_w, want_p in ((0.0, 0.0, 0.0), (tau, 0.0, 0.0), (0.5, 0.5, 1.25), (tau + m, 1.0, 2.4),
                              (2.0, 1.0, 1.0), (t_star, 1.0, 0.0), (3.5, 1.0, 0.0)):
        # kinks (tau, tau + m, t*) are grid points; elsewhere the 401-point grid interpolates the curve closely
        assert np.interp(x, s, w) == pytest.approx(want_w, abs=1e-3)
        assert np.interp(x, s, p) == pytest.approx(want_p, abs=1e-3)
    for x in (tau, tau + m, t_star):
        assert x in s.tolist()
    assert p.max() == pytest.approx(t_star - tau - m)  # largest just past the ramp


def test_trust_region_push_curve_honours_strength_and_mode():
    full = trace(trust_region_figure(MarsRule(0.4, 3.0, 0.2, strength=1.0)), "push λ·w(s)·ReLU(t*−s)")
    half = trace(trust_region_figure(MarsRule(0.4, 3.0, 0.2, strength=0.5)), "push λ·w(s)·ReLU(t*−s)")
    assert np.array_equal(np.array(full.x), np.array(half.x))
    assert np.allclose(np.array(half.y), 0.5 * np.array(full.y)) and max(full.y) > 0
    ungated = trace(trust_region_figure(MarsRule(0.4, 3.0, 0.2, gated=False)), "push λ·ReLU(t*−s), ungated")
    s, p = np.array(ungated.x), np.array(ungated.y)
    assert np.allclose(p, np.maximum(3.0 - s, 0))  # no gate: the safe side is pushed too
    assert "(layer 7)" in trust_region_figure(MarsRule(0.4, 3.0), layer=7).layout.title.text


def test_trust_region_marks_the_gates_own_reading_when_it_reads_elsewhere():
    from mars_viz.views.figures import GateRead

    fig = trust_region_figure(MarsRule(-2.0, 1.0, 0.1), {"raw": 0.3, "recentred": 0.1, "steered": 1.0}, layer=0,
                              gate=GateRead(layer=3, tau=-2.0, score=-4.25))
    (mark,) = [t for t in fig.data if t.name == "gate score (layer 3)"]
    assert mark.x == (-4.25,) and "gate s = -4.250" in mark.text[0]
    assert trace(fig, "score (re-centred)").x == (0.1,)  # the push layer's score is not called the gate's
    assert fig.layout.xaxis.range[0] < -4.25  # the gate's reading is on the plot
    (tick,) = shapes(fig, "gate tau")
    assert tick.x0 == tick.x1 == -2.0


def test_trust_region_figure_minimal_and_errors():
    fig = trust_region_figure(MarsRule(0.5, 2.0, 0.1))
    assert not any(t.name.startswith("score") for t in fig.data)
    assert not [a for a in fig.layout.annotations if a.showarrow]
    assert tuple(fig.layout.xaxis.range) == (-0.5, 3.0)
    assert trace(fig, "safe centroid").error_x.visible is False
    # far-out scores widen the axis
    fig = trust_region_figure(MarsRule(0.5, 2.0, 0.1), {"raw": -2.0, "steered": 6.0})
    lo, hi = fig.layout.xaxis.range
    assert lo < -2.0 and hi > 6.0
    with pytest.raises(ValueError, match="margin"):
        trust_region_figure(MarsRule(0.5, 2.0, 0.0))
    with pytest.raises(ValueError, match="unknown score key"):
        trust_region_figure(MarsRule(0.5, 2.0, 0.1), {"final": 1.0})


def test_target_curve_figure():
    curve = {6.0: 0.0, 1.0: 0.19, 2.0: 0.31, 3.0: 0.50, 4.0: 0.44}  # unsorted on purpose
    fig = target_curve_figure(curve, t_star=3.0)
    common(fig)
    rate = trace(fig, "refusal rate (held-out harmless, text)")
    assert list(rate.x) == [1.0, 2.0, 3.0, 4.0, 6.0]
    assert list(rate.y) == [0.19, 0.31, 0.50, 0.44, 0.0]
    star = trace(fig, "t*")
    assert (star.x, star.y) == ((3.0,), (0.5,))
    assert tuple(fig.layout.yaxis.range) == (0, 1)
    assert fig.layout.yaxis.title.text == "refusal rate"
    # t* between levels: on the interpolated curve
    star = trace(target_curve_figure({1.0: 0.2, 3.0: 0.6}, 2.0), "t*")
    assert star.y[0] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="empty"):
        target_curve_figure({}, 1.0)


def test_plane_figure():
    fig = plane_figure(COORDS, LABELS, CURRENT, tau=0.45, t_star=3.0)
    common(fig)
    assert fig.layout.xaxis.title.text == "unsafety score s (along r̂)"
    assert fig.layout.yaxis.title.text == "top PC of residual (units of ||r||)"
    xs = sorted(s.x0 for s in fig.layout.shapes if s.type == "line")
    assert xs == [0.0, 0.45, 1.0, 3.0]
    assert shapes(fig, "tau")[0].x0 == 0.45 and shapes(fig, "t*")[0].x0 == 3.0
    (trust,) = shapes(fig, "trust region")
    assert (trust.x0, trust.x1) == (0.45, 3.0)
    assert list(trace(fig, "unsafe prompts").x) == [1.0, 1.2]
    assert (trace(fig, "safe centroid").x, trace(fig, "safe centroid").y) == ((0.0,), (0.0,))
    assert (trace(fig, "unsafe centroid").x, trace(fig, "unsafe centroid").y) == ((1.0,), (0.0,))
    assert trace(fig, "input (steered)").x == (1.8,)
    assert list(trace(fig, "input path").x) == [0.55, 0.3, 1.8]


SCORES = {
    "separability": [0.6, 0.9, 0.95, 0.97, 0.9, 0.8],
    "consistency": [0.2, 0.5, 0.6, 0.7, 0.6, 0.5],
    "steerability": [0.0, 0.1, 0.5, 1.0, 0.8, 0.2],
    "combined": [0.0, 0.045, 0.285, 0.679, 0.432, 0.08],
    "fisher": [1.0] * 6,  # ignored
}


STEER = "steer score (consistency × steerability)"


def test_layer_scores_figure():
    fig = layer_scores_figure(SCORES, chosen_layer=3, allowed=(1, 5))
    common(fig)
    for key in ("separability", "consistency", "steerability", "combined"):
        t = trace(fig, STEER if key == "combined" else key)
        assert list(t.x) == list(range(6)) and list(t.y) == SCORES[key]
    assert "fisher" not in [t.name for t in fig.data]
    (chosen,) = shapes(fig, "push layer")
    assert chosen.x0 == chosen.x1 == 3
    assert "push 3" in [a.text for a in fig.layout.annotations]
    assert shapes(fig, "detect layer") == [] and shapes(fig, "inspected layer") == []
    excluded = sorted((s.x0, s.x1) for s in shapes(fig, "excluded layers"))
    assert excluded == [(-0.5, 0.5), (4.5, 5.5)]  # layers 0 and 5 are outside range(1, 5)
    assert all(s.type == "rect" for s in shapes(fig, "excluded layers"))
    assert fig.layout.xaxis.title.text == "decoder layer"
    assert fig.layout.hovermode == "x unified"
    assert "%{y" in trace(fig, STEER).hovertemplate


def test_layer_scores_figure_marks_gate_push_and_inspected_layers():
    fig = layer_scores_figure(SCORES, chosen_layer=3, allowed=(1, 6), detect_layer=5, inspected=1)
    assert [s.x0 for s in shapes(fig, "push layer")] == [3]
    assert [s.x0 for s in shapes(fig, "detect layer")] == [5]
    assert [s.x0 for s in shapes(fig, "inspected layer")] == [1]
    texts = [a.text for a in fig.layout.annotations]
    assert "push 3" in texts and "gate 5" in texts and "inspecting 1" in texts
    with pytest.raises(ValueError, match="detect_layer 6 is outside"):
        layer_scores_figure(SCORES, chosen_layer=3, detect_layer=6)


def test_layer_scores_figure_misalignment_and_range():
    scores = dict(SCORES, misalignment_before=[0.1, 0.3, 0.5, 0.7, 0.6, 0.4], misalignment_after=[0.0] * 6)
    fig = layer_scores_figure(scores, chosen_layer=2, allowed=range(2, 6))
    before = trace(fig, "misalignment before re-centring")
    after = trace(fig, "misalignment after re-centring")
    assert before.yaxis == after.yaxis == "y2" and trace(fig, STEER).yaxis == "y"
    assert list(before.y) == scores["misalignment_before"] and list(after.y) == [0.0] * 6
    assert sorted((s.x0, s.x1) for s in shapes(fig, "excluded layers")) == [(-0.5, 1.5)]
    # no allowed range: nothing shaded
    assert shapes(layer_scores_figure(SCORES, chosen_layer=0), "excluded layers") == []
    with pytest.raises(ValueError, match="outside"):
        layer_scores_figure(SCORES, chosen_layer=6)
    with pytest.raises(ValueError, match="no layer scores"):
        layer_scores_figure({"fisher": [1.0]}, chosen_layer=0)


def test_frame_scores_figure():
    scores = [0.1, 0.7, 0.45, 0.5, 0.51]
    fig = frame_scores_figure(scores, tau=0.5, frame_indices=[0, 12, 24, 36, 48], t_star=2.0)
    common(fig)
    bar = trace(fig, "each frame alone (re-centred by the image offset)")
    assert isinstance(bar, go.Bar)
    # numbered as the maps number them (sampling order); the file's index is in the hover data
    assert list(bar.x) == [f"frame {k}" for k in range(5)] and list(bar.y) == scores
    assert [c[0] for c in bar.customdata] == [0, 12, 24, 36, 48]
    # split at tau: s <= tau keeps the gate closed (safe colour), s > tau opens it
    assert list(bar.marker.color) == ["#2a9d8f", "#e76f51", "#2a9d8f", "#2a9d8f", "#e76f51"]
    assert shapes(fig, "tau")[0].y0 == 0.5 and shapes(fig, "t*")[0].y0 == 2.0
    assert not shapes(fig, "clip")  # no clip score given: no line for it
    default = trace(frame_scores_figure([0.2, 0.9], tau=0.5), "each frame alone (re-centred by the image offset)")
    assert list(default.x) == ["frame 0", "frame 1"]
    # the site, the re-centring and the whole clip's own score are stated
    raw = frame_scores_figure([0.2, 0.9], tau=0.5, layer=3, clip_score=0.3, position="inst", recenter=False)
    assert "layer 3, t_inst" in raw.layout.title.text and "raw" in raw.layout.title.text
    assert shapes(raw, "clip")[0].y0 == 0.3
    assert "whole clip: s = 0.300" in [a.text for a in raw.layout.annotations]
    with pytest.raises(ValueError, match="frame indices"):
        frame_scores_figure([0.1, 0.2], 0.5, frame_indices=[0])


def test_figure_csv_has_every_trace_row():
    fig = target_curve_figure({1.0: 0.2, 2.0: 0.7}, 2.0)
    rows = list(csv.DictReader(io.StringIO(figure_csv(fig))))
    assert list(rows[0]) == ["trace", "x", "y", "text"]  # the t* marker carries text
    name = "refusal rate (held-out harmless, text)"
    assert [(r["trace"], float(r["x"]), float(r["y"])) for r in rows] == [
        (name, 1.0, 0.2), (name, 2.0, 0.7), ("t*", 2.0, 0.7)]
    assert rows[2]["text"] == "t* = 2" and rows[0]["text"] == ""
    # every trace of a bigger figure, row counts matching the data
    fig = centroid_figure(COORDS, LABELS, {"safe": (0, 0), "unsafe": (1, 0)}, CURRENT)
    text = figure_csv(fig)
    assert text.splitlines()[0] == "trace,x,y"
    rows = list(csv.DictReader(io.StringIO(text)))
    for t in fig.data:
        got = [(float(r["x"]), float(r["y"])) for r in rows if r["trace"] == t.name]
        assert got == list(zip(t.x, t.y, strict=True)), t.name
    assert len(rows) == sum(len(t.x) for t in fig.data)


def test_figure_html_and_config():
    fig = layer_scores_figure(SCORES, chosen_layer=3)
    html = figure_html(fig)
    assert "<html>" in html[:100] and html.rstrip().endswith("</html>")
    assert "plotly" in html and len(html) > 1_000_000  # plotly.js inlined: works offline
    assert not re.search(r'<script[^>]*src="https?://', html)  # no CDN script tag
    for name in ("separability", "consistency", "steerability", "steer score"):
        assert f"\"name\":\"{name}" in html
    assert '"toImageButtonOptions": {"format": "png", "scale": 2' in html
    assert PLOT_CONFIG["toImageButtonOptions"] == {"format": "png", "scale": 2, "filename": "mars_viz"}


def test_all_exports():
    for module in (figures, export):
        for name in module.__all__:
            assert hasattr(module, name), name


def test_label_rows_never_put_two_overlapping_labels_in_one_row():
    from mars_viz.views.layout import _Label, _label_rows

    labels = [_Label(x, f"label {i}", f"n{i}", anchor=a) for i, (x, a) in
              enumerate([(0.0, "left"), (0.02, "left"), (0.5, "center"), (0.51, "left"), (3.0, "left"), (9.9, "left")])]
    placed = _label_rows(labels, (0.0, 10.0), plot_px=400)
    per_px = 10.0 / 400
    spans: dict[int, list[tuple[float, float]]] = {}
    for lab, row, anchor in placed:
        w = (len(lab.text) * 7.0 + 10) * per_px
        x0 = {"left": lab.x, "right": lab.x - w, "center": lab.x - w / 2}[anchor]
        for a, b in spans.get(row, []):
            assert x0 >= b or x0 + w <= a, f"{lab.text} overlaps another label in row {row}"
        spans.setdefault(row, []).append((x0, x0 + w))
    rows = {lab.text: (row, anchor) for lab, row, anchor in placed}
    assert rows["label 0"][0] != rows["label 1"][0]  # 0.02 apart: stacked
    assert rows["label 4"] == (0, "left")  # alone: top row
    assert rows["label 5"][1] == "right"  # at the right edge: anchored on its right, inside the plot


def test_strength_sweep_labels_each_distinct_point_once():
    fig = figures.strength_sweep_figure({"0": {"refusal_harmless": 0.0, "refusal_harmful": 0.5},
                                         "0.5": {"refusal_harmless": 0.0, "refusal_harmful": 0.5},
                                         "1": {"refusal_harmless": 0.25, "refusal_harmful": 0.9}})
    assert list(fig.data[0].text) == ["λ=0, 0.5", "", "λ=1"]


HR_POINTS = np.array([[0.9, 0.8], [1.1, 0.95], [0.1, 0.05], [0.2, -0.1], [0.3, 0.7], [0.85, 0.1]])
HR_LABELS = ["harmful", "harmful", "harmless", "harmless", "look-alike", "jailbreak"]
HR_CURRENT = {"raw": (0.7, 0.45), "recentred": (0.6, 0.2), "steered": (0.6, 2.0)}


def test_harm_refusal_figure_points_thresholds_and_path():
    fig = figures.harm_refusal_figure(HR_POINTS, HR_LABELS, HR_CURRENT, x_threshold=0.45, y_threshold=0.35,
                                      inst_layer=4, push_layer=2)
    assert fig.layout.height > figures.HEIGHT and all(t.name for t in fig.data)  # a tab to itself: taller
    for key, rows in (("harmful", [0, 1]), ("harmless", [2, 3]), ("look-alike", [4]), ("jailbreak", [5])):
        name, color = figures.HR_GROUPS[key]
        t = trace(fig, name)
        assert list(t.x) == HR_POINTS[rows, 0].tolist() and list(t.y) == HR_POINTS[rows, 1].tolist()
        assert t.marker.color == color
    (vx,) = shapes(fig, "harmfulness threshold")
    (hy,) = shapes(fig, "refusal threshold")
    assert vx.x0 == vx.x1 == 0.45 and vx.yref == "y domain"
    assert hy.y0 == hy.y1 == 0.35 and hy.xref == "x domain"
    texts = [a.text for a in fig.layout.annotations]
    assert "τ = 0.45" in texts and "τ = 0.35" in texts
    # the input's path raw -> re-centred -> steered, by arrows
    assert list(trace(fig, "input path").x) == [0.7, 0.6, 0.6] and list(trace(fig, "input path").y) == [0.45, 0.2, 2.0]
    assert (trace(fig, "input (steered)").x[0], trace(fig, "input (steered)").y[0]) == (0.6, 2.0)
    assert "t_inst, layer 4" in fig.layout.title.text and "t_post, layer 2" in fig.layout.title.text
    # the two "wrong" quadrants are tinted: jailbreaks (right of x, below y), over-refusal (left of x, above y)
    (jb,) = shapes(fig, "jailbreak quadrant")
    (over,) = shapes(fig, "over-refusal quadrant")
    assert jb.x0 == 0.45 and jb.y1 == 0.35 and over.x1 == 0.45 and over.y0 == 0.35


def test_harm_refusal_figure_names_the_quadrants_clear_of_the_points():
    fig = figures.harm_refusal_figure(HR_POINTS, HR_LABELS, HR_CURRENT, x_threshold=0.45, y_threshold=0.35)
    quads = {a.text: a for a in fig.layout.annotations if (a.name or "").startswith("quadrant")}
    assert set(quads) == set(figures.HR_QUADRANTS.values())
    x0, x1 = fig.layout.xaxis.range
    y0, y1 = fig.layout.yaxis.range
    for (refused, harmful), text in figures.HR_QUADRANTS.items():
        a = quads[text]
        assert (a.yanchor, a.y < 0.5) == (("top", False) if refused else ("bottom", True)), text
        assert (a.xanchor, a.x) == (("right", x1) if harmful else ("left", x0)), text
    assert "jailbreaks sit here" in figures.HR_QUADRANTS[False, True]
    assert "over-refusal" in figures.HR_QUADRANTS[True, False]
    # every label row (from the top and from the bottom) is reserved: no point, path node or threshold lies there
    rows = {anchor: 1 + max(round((1 - a.y if anchor == "top" else a.y) / layout._ROW)
                            for a in fig.layout.annotations if a.yref == "y domain" and a.yanchor == anchor)
            for anchor in ("top", "bottom")}
    below, above = (y0 + rows["bottom"] * layout._ROW * (y1 - y0), y1 - rows["top"] * layout._ROW * (y1 - y0))
    ys = [*HR_POINTS[:, 1], *(p[1] for p in HR_CURRENT.values()), 0.35]
    assert all(below < y < above for y in ys)
    assert all(x0 < x < x1 for x in [*HR_POINTS[:, 0], 0.45])


def test_harm_refusal_figure_empty_and_errors():
    fig = figures.harm_refusal_figure(np.zeros((0, 2)), [], None, 0.5, 0.5)
    assert [t.name for t in fig.data] == [] and shapes(fig, "refusal threshold")
    with pytest.raises(ValueError, match="labels"):
        figures.harm_refusal_figure(HR_POINTS, HR_LABELS[:2])
    with pytest.raises(ValueError, match="unknown point label"):
        figures.harm_refusal_figure(HR_POINTS[:1], ["safe"])
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        figures.harm_refusal_figure(np.zeros((2, 3)), ["harmful", "harmless"])


def test_layer_scores_figure_names_a_gate_at_t_inst():
    fig = layer_scores_figure(SCORES, chosen_layer=3, detect_layer=3, gate_position="inst")
    assert [s.x0 for s in shapes(fig, "detect layer")] == [3]  # drawn even at the push layer: another position
    assert "gate 3 (t_inst)" in [a.text for a in fig.layout.annotations]


def test_trust_region_names_a_gate_read_at_t_inst():
    fig = trust_region_figure(MarsRule(0.4, 3.0), {"recentred": 0.5}, layer=2,
                              gate=figures.GateRead(layer=2, tau=0.4, score=0.9, position="inst"))
    assert fig.layout.title.text == "Push at layer 2, gate read at layer 2 at t_inst"
    assert any("gate read at layer 2 at t_inst: s = 0.90 > τ = 0.40" in (a.text or "") for a in fig.layout.annotations)


def test_a_label_too_long_for_either_side_stays_anchored_inside_the_plot():
    from mars_viz.views.layout import _Label, _label_rows

    long = _Label(0.0, "gate read at layer 0 at t_inst: s = 4.31 ≤ τ = 4.32 → closed", "gate")
    [(_, _, anchor)] = _label_rows([long], (0.0, 10.0), plot_px=380)
    assert anchor == "left"  # anchored on its right at the left edge, it would start outside the figure
