"""Where in the input, on every tiny architecture: grids match the processor's token counts, the layout matches where
the model itself puts each vision feature, and a vector planted along r-hat at chosen tokens lights exactly their
cells (image, several images, a chosen video frame)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from mars_viz.analysis.analyze import analyze_stream
from mars_viz.core.state import MarsState
from mars_viz.maps.layout import layout_grids, layout_spec
from mars_viz.maps.scoring import rescore
from mars_viz.model.backbone import load_backbone
from mars_viz.model.hooks import capture_sequence, count_hooks
from mars_viz.model.inputs import Query, build_batch
from mars_viz.model.media import neutral_video
from mars_viz.steer.steering import SteerOptions, plan

from ..conftest import ARCHS

# native video (inputs.py: video_mode "native")
VIDEO_ARCHS = ["qwen2_vl", "qwen2_5_vl", "mars_reader", "llava_onevision"]
PIXEL_KEYS = ("pixel_values",)


def _images(n: int) -> tuple[Image.Image, ...]:
    sizes, colours = [(100, 60), (40, 90), (64, 64)], [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    return tuple(Image.new("RGB", sizes[i], colours[i]) for i in range(n))


def _video(n: int = 4) -> tuple[Image.Image, ...]:
    return tuple(neutral_video(n, seed=5, size=64))


def _layout(bb, q):
    batch = build_batch(bb, [q])
    ids = batch["input_ids"][0].tolist()
    meta = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask") and not k.startswith(PIXEL_KEYS)}
    sizes = [im.size for im in q.images] or [f.size for f in (q.video or ())]
    grids, notes = layout_grids(layout_spec(bb), ids, meta, len(q.images), len(q.video or ()), sizes)
    return batch, ids, grids, notes


def _expected_shapes(arch: str, bb, batch, q) -> list[tuple[str, tuple[int, int]]]:
    """(view, shape) of each grid, from the processor's own outputs and the configs (not from maps/layout.py)."""
    cfg, proc = bb.model.config, bb.processor
    n_img = len(q.images) or len(q.video or ())
    if arch in ("qwen2_vl", "qwen2_5_vl", "mars_reader"):
        m = cfg.vision_config.spatial_merge_size
        if q.video:
            t, h, w = batch["video_grid_thw"][0].tolist()
            return [("frames", (h // m, w // m))] * t
        return [("patches", (h // m, w // m)) for _, h, w in batch["image_grid_thw"].tolist()]
    if arch == "llava":
        side = proc.image_processor.crop_size["height"] // proc.patch_size
        return [("patches", (side, side))] * n_img
    if arch == "gemma3":
        side = math.isqrt(proc.image_seq_length)
        return [("pooled", (side, side))] * n_img
    if arch == "idefics3":
        side = math.isqrt(proc.image_seq_len)
        return [("global", (side, side))] * n_img
    if arch == "llava_onevision":
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        if q.video:
            fed = batch["pixel_values_videos"].shape[1]
            return [("frames", (math.ceil(side / 2), math.ceil(side / 2)))] * fed
        return None  # anyres tiles depend on the unpadding: checked by the feature-marker test
    raise AssertionError(arch)


CASES = {"one image": lambda: Query("What is in the picture?", images=_images(1)),
         "two images": lambda: Query("Compare them.", images=_images(2)),
         "video": lambda: Query("What happens?", video=_video(5))}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", ARCHS)
def test_grid_shapes_match_the_processor_token_counts(arch, case, tiny_backbones):
    bb = tiny_backbones(arch)
    q = CASES[case]()
    batch, ids, grids, notes = _layout(bb, q)
    spec = layout_spec(bb)
    media = [i for i, t in enumerate(ids) if t in (spec.image_token_id, spec.video_token_id)]
    placed = np.concatenate([g.positions[g.positions >= 0] for g in grids])
    assert len(placed) == len(set(placed.tolist())), "a token placed twice"
    assert set(placed.tolist()) <= set(media)
    unplaced = len(media) - len(placed)
    if arch == "llava_onevision":  # newline tokens only: one per tile row, one per image, one per video
        assert all(ids[i] in (spec.image_token_id, spec.video_token_id) for i in media)
        rows = sum(g.shape[0] for g in grids if g.view == "tiles")
        extra = 1 if q.video else sum(1 for g in grids if g.view == "base" and "newline" in g.note)
        assert unplaced == rows + extra or (unplaced > rows and not q.video)
    else:
        assert unplaced == 0, notes
    assert not any(g.view == "sequence" for g in grids), notes
    expected = _expected_shapes(arch, bb, batch, q)
    if expected is not None:
        got = [(g.view, g.shape) for g in grids if g.view not in ("tiles",)]
        assert got == expected
    if arch == "llava" and case == "one image":  # 100 x 60, shortest edge to 28, centre crop 28 x 28
        assert grids[0].box == pytest.approx((0.2, 0.0, 0.8, 1.0))
    if q.video:
        frames = sorted({f for g in grids for f in g.frames})
        assert frames == list(range(len(q.video)))
        assert all(g.kind == "frame" for g in grids)
    else:
        assert sorted({g.index for g in grids}) == list(range(len(q.images)))


# ---- the layout against the model itself: mark each vision feature, see which prompt position it lands on -------

def _feature_module(bb):
    m = bb.model.model
    if bb.model_type == "mars_reader":
        return m.visual.merged
    return m.visual.merger if hasattr(m, "visual") else m.connector if hasattr(m, "connector") \
        else m.multi_modal_projector


def _landing(bb, q) -> dict[int, int]:
    """Feature index (flat over the feature module's output, before packing) -> prompt position it reaches."""
    batch = build_batch(bb, [q])
    feats, seen = {}, {}

    def mark(_m, _a, out):
        o = out.clone()
        flat = o.view(-1, o.shape[-1])
        flat[:, 0] += 1000.0 * torch.arange(1, flat.shape[0] + 1, dtype=o.dtype)
        feats["n"] = flat.shape[0]
        return o

    def grab(_m, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        seen.setdefault("h", h[0, :, 0].clone())

    for marked in (False, True):
        seen.clear()
        handles = [bb.layers[0].register_forward_pre_hook(grab, with_kwargs=True)]
        if marked:
            handles.append(_feature_module(bb).register_forward_hook(mark))
        try:
            with torch.inference_mode():
                bb.model(**batch, use_cache=False, logits_to_keep=1)
        finally:
            for h in handles:
                h.remove()
        feats["marked" if marked else "plain"] = seen["h"]
    diff = (feats["marked"] - feats["plain"]).double() / 1000.0
    out = {}
    for pos in torch.nonzero(diff.abs() > 0.5).flatten().tolist():
        out[round(float(diff[pos])) - 1] = pos
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_layout_puts_each_vision_feature_where_the_model_does(arch, tiny_backbones):
    """Every vision feature, marked at the projector/merger output, lands on the prompt position the map puts in the
    cell the feature came from (its row-major place in the vision tower's own grid)."""
    bb = tiny_backbones(arch)
    ims = (Image.new("RGB", (64, 64), (90, 90, 90)),) * 2 if arch == "llava_onevision" else _images(2)
    q = Query("Compare them.", images=ims)
    batch, ids, grids, _ = _layout(bb, q)
    land = _landing(bb, q)
    cell_of = {int(p): (g.index, g.view, r, c) for g in grids for (r, c), p in np.ndenumerate(g.positions) if p >= 0}
    cfg = bb.model.config
    checked = 0
    for idx, pos in land.items():
        if arch in ("qwen2_vl", "qwen2_5_vl", "mars_reader"):
            m = cfg.vision_config.spatial_merge_size
            k, img = idx, 0
            for _, h, w in batch["image_grid_thw"].tolist():
                if k < h * w // (m * m):
                    break
                k -= h * w // (m * m)
                img += 1
            want = (img, "patches", k // (w // m), k % (w // m))
        elif arch in ("llava", "gemma3", "idefics3"):
            per = len(land) // len(ims)
            side = math.isqrt(per)
            img, k = divmod(idx, per)
            want = (img, {"llava": "patches", "gemma3": "pooled", "idefics3": "global"}[arch], k // side, k % side)
        else:  # llava_onevision, square images: [base, tile] per image, no unpadding
            side = cfg.vision_config.image_size // cfg.vision_config.patch_size
            img, rest = divmod(idx, 2 * side * side)
            patch, k = divmod(rest, side * side)
            want = (img, "base" if patch == 0 else "tiles", k // side, k % side)
        assert cell_of.get(pos) == want, (idx, pos)
        checked += 1
    assert checked == len(cell_of) > 0


def test_idefics3_tiles_land_where_the_model_puts_them(tiny_dirs):
    """Image splitting on: row/col tiles stitched into one grid, then the global view."""
    bb = load_backbone(tiny_dirs("idefics3"), device="cpu")  # a private copy: its processor is changed below
    ip = bb.processor.image_processor
    ip.do_image_splitting, ip.size = True, {"longest_edge": 112}
    img = Image.new("RGB", (120, 60), (10, 120, 200))
    q = Query("Describe.", images=(img,))
    _, ids, grids, notes = _layout(bb, q)
    assert [g.view for g in grids] == ["tiles", "global"], notes
    info = ip([[img]], return_row_col_info=True)
    rows, cols = info["rows"][0][0], info["cols"][0][0]
    s = math.isqrt(bb.processor.image_seq_len)
    assert grids[0].shape == (rows * s, cols * s) and rows * cols > 1
    land = _landing(bb, q)
    cell_of = {int(p): (g.view, r, c) for g in grids for (r, c), p in np.ndenumerate(g.positions) if p >= 0}
    for idx, pos in land.items():
        tile, k = divmod(idx, s * s)
        if tile < rows * cols:
            tr, tc = divmod(tile, cols)
            want = ("tiles", tr * s + k // s, tc * s + k % s)
        else:
            want = ("global", k // s, k % s)
        assert cell_of[pos] == want
    assert len(land) == len(cell_of)


# ---- planted: a known vector along r-hat at chosen tokens lights exactly their cells --------------------------------

def _plant(bb, layer: int, positions: list[int], vec: torch.Tensor):
    def hook(_m, _a, out):
        h = out[0] if isinstance(out, tuple) else out
        if h.shape[1] <= max(positions):
            return None
        h = h.clone()
        h[:, positions] += vec.to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    return bb.layers[layer].register_forward_hook(hook)


def _run_map(bb, state, q, opts=SteerOptions(), plant=None, strategy="gate_first"):
    handle = None if plant is None else _plant(bb, *plant)
    try:
        *_, last = analyze_stream(bb, state, q, opts, max_new_tokens=2, strategy=strategy)
    finally:
        if handle is not None:
            handle.remove()
    return last.analysis


def _lit(before, after, grids_b, grids_a) -> set[tuple[int, int, int]]:
    out = set()
    for gi, (gb, ga) in enumerate(zip(grids_b, grids_a, strict=True)):
        d = np.nan_to_num(ga.scores - gb.scores)
        out |= {(gi, r, c) for r, c in zip(*np.nonzero(d), strict=True)}
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_planted_direction_lights_exactly_the_chosen_image_cells(arch, tiny_backbones, fitted):
    bb, state = tiny_backbones(arch), fitted(arch)
    q = Query("Compare these pictures.", images=_images(2))
    base = _run_map(bb, state, q)
    m0 = base.input_map
    layer = plan(state, SteerOptions()).detect_layer
    assert m0.layer == layer and m0.offset_source == "per-position"
    # the gate's own position in the map is the gate's own score (one scoring function)
    assert m0.scores[m0.gate_at] == pytest.approx(base.result.score_gate, abs=1e-6)
    grids = m0.grids
    first = next(g for g in grids if g.index == 0)
    second = next(g for g in grids if g.index == 1)
    chosen = [(grids.index(first), first.shape[0] - 1, first.shape[1] - 1), (grids.index(second), 0, 0)]
    positions = [int(grids[g].positions[r, c]) for g, r, c in chosen]
    r = state.gate_axis().r[layer]
    c = 3.0 * float(r.norm())
    planted = _run_map(bb, state, q, plant=(layer, positions, (c * r / r.norm()).float()))
    m1 = planted.input_map
    assert _lit(m0, m1, m0.grids, m1.grids) == set(chosen)
    for g, rr, cc in chosen:
        assert m1.grids[g].scores[rr, cc] - m0.grids[g].scores[rr, cc] == pytest.approx(3.0, rel=1e-3)
    text = [i for i, k in enumerate(m0.kinds) if k == "text"]
    assert np.array_equal(m0.scores[text], m1.scores[text])


@pytest.mark.parametrize("arch", ARCHS)
def test_planted_direction_lights_the_chosen_video_frame(arch, tiny_backbones, fitted):
    bb, state = tiny_backbones(arch), fitted(arch)
    q = Query("What happens in the clip?", video=_video(4))
    m0 = _run_map(bb, state, q).input_map
    frame = 2
    target = [g for g in m0.frame_grids() if frame in g.frames]
    assert target, [g.frames for g in m0.grids]
    positions = [int(p) for g in target for p in g.positions[g.positions >= 0].tolist()]
    layer = m0.layer
    r = state.gate_axis().r[layer]
    m1 = _run_map(bb, state, q, plant=(layer, positions, (2.0 * r).float())).input_map
    lit_frames = set()
    for gb, ga in zip(m0.grids, m1.grids, strict=True):
        d = np.nan_to_num(ga.scores - gb.scores)
        if np.any(d != 0):
            lit_frames |= set(gb.frames)
            assert np.all(np.abs(d[gb.positions >= 0] - 2.0) < 1e-3)
    expected = {f for g in target for f in g.frames}
    assert lit_frames == expected and frame in expected
    if arch in VIDEO_ARCHS and arch != "llava_onevision":
        assert expected == {2, 3} and not target[0].exact  # a Qwen video token covers two frames: flagged


def test_recentring_switch_and_old_state_fallback(tiny_backbones, fitted, tmp_path):
    bb, state = tiny_backbones("qwen2_vl"), fitted("qwen2_vl")
    q = Query("What colour is this?", images=_images(1))
    on = _run_map(bb, state, q).input_map
    off = _run_map(bb, state, q, SteerOptions(recenter=False)).input_map
    media = [i for i, k in enumerate(on.kinds) if k == "image"]
    assert off.offset_source == "none" and on.offset_source == "per-position"
    assert not np.allclose(on.scores[media], off.scores[media])
    # the page's "raw" / "re-centred" buttons re-score the kept residuals: the same as running with that setting
    assert np.allclose(rescore(state, on, SteerOptions(recenter=False)).scores, off.scores, rtol=0, atol=1e-9)
    assert np.allclose(rescore(state, off, SteerOptions()).scores, on.scores, rtol=0, atol=1e-9)
    # an old state (no per-position statistics) still loads and maps, re-centring by the mean modality offset
    from dataclasses import replace
    old = replace(state, diagnostics=replace(state.diagnostics, map_layer=None, map_cells={}, map_tokens={}))
    folder = old.save(tmp_path / "old")
    meta = folder / "mars_state.json"
    text = meta.read_text().replace('"map_layer": null', '"unused": null')
    meta.write_text(text)
    loaded = MarsState.load(folder)
    assert loaded.diagnostics.map_tokens == {} and loaded.diagnostics.map_layer is None
    fb = _run_map(bb, loaded, q).input_map
    assert fb.offset_source == "mean modality offset"
    assert any("mean modality offset" in n for n in fb.notes)


def test_fitted_state_round_trips_the_map_statistics(fitted, tmp_path):
    state = fitted("llava_onevision")
    d = state.diagnostics
    assert (d.map_layer, d.map_position) == (state.gate_layer, state.gate_position)
    assert {"image.base", "image.tiles", "video.frames"} <= set(d.map_cells)
    assert MarsState.load(state.save(tmp_path / "s")) == state


def test_capture_sequence_removes_its_hooks_on_error(tiny_backbones):
    bb = tiny_backbones("llava")
    before = count_hooks(bb.model)
    with pytest.raises(RuntimeError), capture_sequence(bb.layers, [0, 2]):
        raise RuntimeError("boom")
    assert count_hooks(bb.model) == before


def test_input_map_from_a_text_prompt_is_all_text(tiny_backbones, fitted):
    bb, state = tiny_backbones("gemma3"), fitted("gemma3")
    a = _run_map(bb, state, Query("How do I bake bread?"))
    m = a.input_map
    assert m.grids == [] and set(m.kinds) == {"text"} and len(m.tokens) == len(m.scores)
    assert m.scores[m.gate_at] == pytest.approx(a.result.score_gate, abs=1e-6)
    assert "".join(m.tokens).endswith("assistant")


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava_onevision", "gemma3"])
def test_the_neutral_inputs_score_zero_in_every_cell_on_average(arch, tiny_backbones, fitted):
    """What the per-position offsets mean: re-centred, the fit's own neutral images average 0 (the safe centroid's
    score) in every cell of every view, however far their raw scores are from it."""
    from mars_viz.fit.calibrate import split_sets
    from mars_viz.maps.offsets import capture_prompt_positions
    from mars_viz.maps.scoring import input_map
    from mars_viz.model.media import neutral_images

    bb, state = tiny_backbones(arch), fitted(arch)
    cfg = state.config
    prompts = split_sets(cfg)["s_fit"][: cfg.neutral_prompts][: cfg.map_neutral]
    images = neutral_images(cfg.k_neutral, seed=cfg.seed, size=cfg.neutral_size)
    opts = SteerOptions()
    by_view: dict[str, list[np.ndarray]] = {}
    raw: list[float] = []
    for i, p in enumerate(prompts):
        q = Query(p, images=(images[i % len(images)],))
        seq = capture_prompt_positions(bb, q, [state.gate_layer])
        for g in input_map(bb, state, opts, q, seq).grids:
            by_view.setdefault(g.view, []).append(g.scores)
        m_raw = input_map(bb, state, SteerOptions(recenter=False), q, seq)
        raw += [float(s) for s, k in zip(m_raw.scores, m_raw.kinds, strict=True) if k == "image"]
    assert by_view and len(prompts) >= 2
    for view, grids in by_view.items():
        assert np.allclose(np.mean(grids, axis=0), 0.0, atol=1e-4), view
    assert max(abs(v) for v in raw) > 0.01  # the raw scores were not already 0: the offsets did the work


def test_push_layer_map_from_the_same_prefill(tiny_backbones, fitted):
    from mars_viz.maps.offsets import capture_prompt_positions
    from mars_viz.views.panels import map_figures

    bb, state = tiny_backbones("qwen2_vl"), fitted("qwen2_vl")
    push = 1 if state.gate_layer != 1 else 2
    opts = SteerOptions(layer=push)
    q = Query("What colour is this?", images=_images(1))
    a = _run_map(bb, state, q, opts)
    assert a.input_map.layer == state.gate_layer and a.push_residuals.shape == a.input_map.h.shape
    # the kept residuals are the push layer's (up to the float noise of a cached vs an uncached forward)
    alone = capture_prompt_positions(bb, q, [push])["h"][push]
    assert torch.allclose(alone, a.push_residuals, atol=1e-4)
    m = rescore(state, a.input_map, opts, h=a.push_residuals, layer=push)
    assert m.layer == push and [g.shape for g in m.grids] == [g.shape for g in a.input_map.grids]
    assert m.offset_source == "mean modality offset" and any(f"not at layer {push}" in n for n in m.notes)
    assert m.scores[-1] == pytest.approx(a.result.score_recentred, abs=1e-6)  # the push layer's own score
    assert "(the push layer)" in str(map_figures(a, state, at_push=True)["map_image"].layout.title.text)
    same = _run_map(bb, state, q)  # gate and push at one layer: nothing else to show
    if state.layer == state.gate_layer:
        assert same.push_residuals is None
        with pytest.raises(ValueError, match="same layer"):
            map_figures(same, state, at_push=True)
