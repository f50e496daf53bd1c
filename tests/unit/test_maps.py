"""The pure side of "Where in the input": token layouts from synthetic ids, the figures, the PNG/CSV export and the
occlusion check with a planted scorer. No model."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from PIL import Image

from mars_viz.analysis.occlusion import neutral_fill, occlusion, occlusion_grids
from mars_viz.maps.export import map_csv
from mars_viz.maps.layout import Grid, LayoutSpec, layout_grids
from mars_viz.maps.scoring import InputMap
from mars_viz.model.inputs import Query
from mars_viz.views.map_plots import (
    Panel,
    export_files,
    map_panels,
    overlay_figure,
    overlay_png,
    score_range,
    token_strip_figure,
    token_strip_png,
)

IMG, VID, T = 7, 8, 1  # image / video placeholder ids, a text id


def _ids(*parts) -> list[int]:
    out = []
    for tok, n in parts:
        out += [tok] * n
    return out


def test_qwen_layout_merges_patches_and_pairs_video_frames():
    import torch

    spec = LayoutSpec("qwen", "qwen2_vl", IMG, VID, video_mode="native", merge=2, temporal_patch=2)
    ids = _ids((T, 3), (IMG, 6), (T, 2), (IMG, 2), (T, 4))
    meta = {"image_grid_thw": torch.tensor([[1, 4, 6], [1, 2, 4]])}
    grids, notes = layout_grids(spec, ids, meta, n_images=2, n_frames=0)
    assert [(g.view, g.shape) for g in grids] == [("patches", (2, 3)), ("patches", (1, 2))] and not notes
    assert grids[0].positions.tolist() == [[3, 4, 5], [6, 7, 8]] and grids[1].positions.tolist() == [[11, 12]]
    vids = _ids((T, 2), (VID, 12), (T, 1))
    grids, _ = layout_grids(spec, vids, {"video_grid_thw": torch.tensor([[3, 4, 4]])}, 0, n_frames=5)
    assert [g.frames for g in grids] == [(0, 1), (2, 3), (4,)]
    assert [g.exact for g in grids] == [False, False, True] and "2 consecutive frames" in grids[0].note


def test_llava_drops_the_class_token_and_crops_to_the_centre():
    spec = LayoutSpec("llava", "llava", IMG, crop=(336, 336, 336))
    grids, _ = layout_grids(spec, _ids((T, 2), (IMG, 10), (T, 1)), {}, 1, 0, [(672, 336)])
    (g,) = grids
    assert g.shape == (3, 3) and g.positions[0, 0] == 3 and "class token" in g.note
    assert g.box == pytest.approx((0.25, 0.0, 0.75, 1.0))  # a 2:1 image keeps its central square


def test_gemma3_pan_and_scan_crops_are_flagged_not_placed_on_the_image():
    spec = LayoutSpec("gemma3", "gemma3", IMG)
    ids = _ids((T, 1), (IMG, 4), (T, 2), (IMG, 4), (T, 2), (IMG, 4), (T, 1))
    grids, _ = layout_grids(spec, ids, {}, 1, 0)
    assert [g.view for g in grids] == ["pooled", "crop", "crop"]
    assert grids[0].exact and not grids[1].exact and grids[1].box is None


def test_idefics3_tiles_are_stitched_and_global_kept_apart():
    tags = {20: ("global", 0, 0), 21: ("tiles", 0, 0), 22: ("tiles", 0, 1)}
    spec = LayoutSpec("idefics3", "idefics3", IMG, tags=tags, seq_len=4)
    ids = [T, 9, 21] + [IMG] * 4 + [9, 22] + [IMG] * 4 + [T, 9, 20] + [IMG] * 4 + [9, T]
    grids, _ = layout_grids(spec, ids, {}, 1, 0)
    tiles, glob = grids
    assert tiles.view == "tiles" and tiles.shape == (2, 4) and glob.shape == (2, 2)
    assert tiles.positions[:, :2].tolist() == [[3, 4], [5, 6]] and tiles.positions[:, 2:].tolist() == [[9, 10],
                                                                                                          [11, 12]]


def test_unknown_or_mismatched_layouts_fall_back_to_sequence_order_and_say_so():
    unknown = LayoutSpec("", "mystery", IMG)
    grids, notes = layout_grids(unknown, _ids((T, 1), (IMG, 5)), {}, 1, 0)
    assert grids[0].view == "sequence" and not grids[0].exact and "no patch layout" in notes[0]
    llava = LayoutSpec("llava", "llava", IMG)
    grids, notes = layout_grids(llava, _ids((T, 1), (IMG, 7)), {}, 1, 0)  # 7 is not a square (+1)
    assert grids[0].view == "sequence" and "does not match" in notes[0]


def _map() -> InputMap:
    g = Grid("image", 0, "patches", np.arange(2, 8).reshape(2, 3), scores=np.array([[0.1, 0.2, 1.5],
                                                                                        [-0.3, 0.0, np.nan]]))
    g.positions[1, 2] = -1
    kinds = ["text", "text"] + ["image"] * 6 + ["text"] * 3
    scores = np.array([0.0, 0.4, 0.1, 0.2, 1.5, -0.3, 0.0, 0.9, 0.7, -0.2, 0.3])
    return InputMap(layer=3, recenter=True, tokens=["<s>", "Hi"] + ["<img>"] * 6 + [" how", "\n", "ok"],
                    kinds=kinds, scores=scores, grids=[g], offset_source="per-position", notes=["a note"])


def test_overlay_figure_draws_each_panel_over_its_image_with_a_hoverable_score():
    m = _map()
    panels = map_panels(m, images=[Image.new("RGB", (90, 60), "red")])
    fig = overlay_figure(panels, "where", notes=m.notes)
    (hm,) = fig.data
    assert hm.type == "heatmap" and np.array_equal(np.asarray(hm.z, dtype=float), m.grids[0].scores, equal_nan=True)
    assert "score %{z:.3f}" in hm.hovertemplate and hm.zmid == 0 and hm.zmax == pytest.approx(1.5)
    assert len(fig.layout.images) == 1 and fig.layout.images[0].source.startswith("data:image/png;base64,")
    assert [a.text for a in fig.layout.annotations if a.name == "note"] == ["a note"]


def test_video_panels_repeat_a_grid_shared_by_two_frames():
    g = Grid("frame", 0, "frames", np.array([[1, 2]]), frames=(0, 1), exact=False, scores=np.array([[0.5, 1.0]]))
    m = InputMap(3, True, ["a", "v", "v"], ["text", "video", "video"], np.zeros(3), [g], "per-position")
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue", "green")]
    panels = map_panels(m, frames=frames, frame_labels=[0, 10, 20])
    assert [p.image for p in panels] == frames[:2] and "shared with frames 0-1" in panels[1].title


def test_token_strip_colours_text_tokens_and_collapses_media_runs():
    fig = token_strip_figure(_map())
    (hm,) = fig.data
    texts = [t for row in hm.text for t in row if t]
    assert texts == ["<s>", "Hi", "img×6", "·how", "⏎", "ok"]
    z = [v for row in hm.z for v in row if v == v]
    assert z[2] == pytest.approx(np.mean([0.1, 0.2, 1.5, -0.3, 0.0, 0.9]))
    assert "score %{z:.3f}" in hm.hovertemplate


def test_pngs_and_csv_export():
    m = _map()
    png = overlay_png(Panel("image 1", Image.new("RGB", (200, 100), "white"), m.grids[0]), half=1.5)
    im = Image.open(io.BytesIO(png))
    assert im.format == "PNG" and im.width == 448
    # the hottest cell (row 0, col 2: score 1.5) is red-tinted, the negative one (row 1, col 0) teal-tinted
    hot, cold = im.getpixel((int(448 * 2.5 / 3), 50)), im.getpixel((int(448 * 0.5 / 3), 170))
    assert hot[0] > hot[1] + 40 and cold[1] > cold[0] + 5  # -0.3 of 1.5: a light teal
    assert Image.open(io.BytesIO(token_strip_png(m))).format == "PNG"
    rows = list(csv.DictReader(io.StringIO(map_csv(m))))
    assert len(rows) == len(m.tokens) and rows[4]["cell"] == "image 1 (patches) r0 c2" and rows[4]["score"] == "1.5"
    files = export_files(m, images=[Image.new("RGB", (90, 60), "red")])
    assert {"map_positions.csv", "map_tokens.png", "map_tokens.html", "map_overlay.html"} <= set(files)
    assert any(k.endswith("_patches.png") for k in files)
    assert score_range([0.2, -3.0, np.nan]) == 3.0 and score_range([0.1]) == 1.0


def test_occlusion_finds_the_planted_region():
    """A scorer that counts red pixels: covering the red cell is the only change that moves the score."""
    img = Image.new("RGB", (80, 80), (128, 128, 128))
    img.paste((255, 0, 0), (40, 20, 60, 40))  # cell row 1, col 2 of a 4x4 grid

    def score(queries):
        return [float((np.asarray(q.images[0])[..., 0] == 255).mean()) for q in queries]

    seen = []
    res = occlusion(Query("what is this?", images=(img,)), score, cells=4, fill=(128, 128, 128),
                    progress=lambda d, t: seen.append((d, t)))
    c = res.contribution
    assert len(c) == 16 and seen[-1] == (16, 16)
    (g,) = occlusion_grids(res)
    assert np.unravel_index(np.nanargmax(g.scores), g.shape) == (1, 2)
    assert g.scores[1, 2] == pytest.approx(400 / 6400) and np.count_nonzero(g.scores) == 1
    with pytest.raises(ValueError, match="image or a video"):
        occlusion(Query("text only"), score)


def test_occlusion_of_a_video_covers_whole_frames():
    frames = tuple(Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 0), (0, 0, 0)))

    def score(queries):
        return [float(sum((np.asarray(f)[..., 0] == 255).mean() for f in q.video)) for q in queries]

    res = occlusion(Query("what happens?", video=frames), score, fill=neutral_fill())
    grids = occlusion_grids(res)
    assert [g.frames for g in grids] == [(0,), (1,), (2,)]
    assert [float(g.scores[0, 0]) for g in grids] == [1.0, 0.0, 0.0]


def test_gemma3_crops_of_several_images_are_not_guessed():
    spec = LayoutSpec("gemma3", "gemma3", IMG)
    ids = _ids((T, 1), (IMG, 4), (T, 1), (IMG, 4), (T, 1), (IMG, 4), (T, 1))
    grids, notes = layout_grids(spec, ids, {}, 2, 0)  # 3 runs for 2 images: a crop, but of which image?
    assert all(g.view == "sequence" and not g.exact for g in grids) and "does not match" in notes[0]
