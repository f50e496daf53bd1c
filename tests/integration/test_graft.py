"""`python -m mars_viz graft` on a tiny random Qwen2 LLM: trains a few steps, saves, reloads, answers image + video."""

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
    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="module")
def grafted(tiny_llm, tmp_path_factory):
    out = tmp_path_factory.mktemp("graft") / "reading"
    rc = main(["graft", "--stem", "vit", "--llm", str(tiny_llm), "--out", str(out), "--steps", "3", "--minutes", "5",
               "--quiet"])
    assert rc == 0
    return out


def test_graft_saves_a_qwen2_vl_checkpoint_with_a_record(grafted):
    cfg = json.loads((grafted / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2VLForConditionalGeneration"] and cfg["model_type"] == "qwen2_vl"
    assert cfg["vision_config"]["temporal_patch_size"] == 2
    rec = json.loads((grafted / "mars_graft.json").read_text())
    assert rec["steps"] == 3 and rec["history"] and len(rec["heldout_phrases"]) == 200
    assert {"read_recall", "read_char", "loss"} <= set(rec["final"])


def test_llm_weights_are_copied_unchanged(tiny_llm, grafted):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    llm = AutoModelForCausalLM.from_pretrained(tiny_llm)
    vl = AutoModelForImageTextToText.from_pretrained(grafted)
    ref = llm.model.state_dict()
    got = vl.model.language_model.state_dict()
    assert set(ref) == set(got)
    for k, v in ref.items():
        assert torch.equal(v, got[k]), k
    assert torch.equal(llm.lm_head.weight, vl.lm_head.weight)


def test_tower_was_trained(grafted, tiny_llm):
    """The saved tower differs from the same seed's untrained initialisation."""
    from transformers import AutoModelForImageTextToText, Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    vl = AutoModelForImageTextToText.from_pretrained(grafted)
    torch.manual_seed(0)
    init = Qwen2VisionTransformerPretrainedModel(Qwen2VLVisionConfig(**vl.config.vision_config.to_dict()))
    trained = vl.model.visual.state_dict()
    assert not torch.equal(init.state_dict()["merger.mlp.2.weight"], trained["merger.mlp.2.weight"])


def test_reloads_through_load_backbone_and_answers_image_and_video(grafted):
    from mars_lab.render import render_phrase, render_word_video
    from mars_viz.model.backbone import load_backbone
    from mars_viz.model.inputs import Query, build_batch
    from mars_viz.steer.generate import greedy_texts

    bb = load_backbone(grafted, device="cpu")
    assert bb.model_type == "qwen2_vl" and bb.video_mode == "native" and bb.num_layers == 4
    image = render_phrase("seven quiet lamps", random.Random(0))
    video = tuple(render_word_video("paper boats sail slowly", random.Random(1), frames=4))
    queries = [Query("What is written in the image? Answer with the text only.", images=(image,)),
               Query("Read the words shown across the frames, in order.", video=video)]
    batch = build_batch(bb, queries)
    cfg = bb.model.config
    n_img = int((batch["input_ids"][0] == cfg.image_token_id).sum())
    n_vid = int((batch["input_ids"][1] == cfg.video_token_id).sum())
    assert n_img == image.width * image.height // (28 * 28)
    assert n_vid == 2 * video[0].width * video[0].height // (28 * 28)  # 4 frames = 2 temporal pairs
    answers = greedy_texts(bb, queries, max_new_tokens=4)
    assert len(answers) == 2 and all(len(ids) >= 1 for ids, _ in answers)


def test_text_is_read_as_by_the_llm_and_image_tokens_get_width_positions(tiny_llm, grafted):
    """Every rotary frequency goes to the width axis: text-only logits equal the LLM's own (t = h = w on text), and a
    one-row image's tokens sit at consecutive positions, the way the LLM reads text."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    from mars_lab.render import render_phrase

    vl = AutoModelForImageTextToText.from_pretrained(grafted).eval()
    llm = AutoModelForCausalLM.from_pretrained(tiny_llm).eval()
    head_dim = llm.config.hidden_size // llm.config.num_attention_heads
    assert vl.config.text_config.rope_parameters["mrope_section"] == [0, 0, head_dim // 2]
    ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    with torch.no_grad():
        assert torch.allclose(vl(input_ids=ids).logits, llm(input_ids=ids).logits, atol=1e-5)
    proc = AutoProcessor.from_pretrained(grafted)
    image = render_phrase("seven quiet lamps", random.Random(0))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    enc = proc(text=[proc.apply_chat_template(msgs, add_generation_prompt=True)], images=[image],
               return_tensors="pt")
    pos, _ = vl.model.get_rope_index(enc["input_ids"], enc["mm_token_type_ids"],
                                     image_grid_thw=enc["image_grid_thw"], attention_mask=enc["attention_mask"])
    w = pos[2, 0][enc["input_ids"][0] == vl.config.image_token_id]
    assert enc["image_grid_thw"][0, 1] == 2 and torch.equal(torch.diff(w), torch.ones(len(w) - 1, dtype=w.dtype))


def test_auto_classes_and_chat_template(grafted):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(grafted)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Hi"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>Hi" in text
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


def test_same_seed_same_tower_other_seed_differs(tiny_llm, tmp_path):
    from safetensors.torch import load_file

    from mars_lab import GraftConfig, graft

    cfg = GraftConfig(batch_size=4, heldout=8, eval_items=4)
    paths = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        graft(str(tiny_llm), tmp_path / name, steps=2, seed=seed, cfg=cfg)
        paths.append(load_file(str(tmp_path / name / "model.safetensors")))
    a, b, c = paths
    vis = [k for k in a if "visual." in k]
    assert vis and all(torch.equal(a[k], b[k]) for k in vis)
    assert any(not torch.equal(a[k], c[k]) for k in vis)


def test_bad_llm_path_is_one_error_line(tmp_path, capsys):
    rc = main(["graft", "--llm", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--steps", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error:") and "does not exist" in err and len(err.strip().splitlines()) == 1


def test_non_qwen2_llm_is_refused_clearly(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "llama")
    capsys.readouterr()  # drop the save's progress bar
    rc = main(["graft", "--llm", str(tmp_path / "llama"), "--out", str(tmp_path / "o"), "--steps", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "Qwen2" in err and "LlamaForCausalLM" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_disk_too_small_is_refused_before_training(tiny_llm, tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    import mars_lab.build as build
    import mars_lab.train as train

    trained = []
    monkeypatch.setattr(train, "train_tower", lambda *a, **k: trained.append(1))
    monkeypatch.setattr(build, "train_tower", lambda *a, **k: trained.append(1))
    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(build.shutil, "disk_usage", lambda p: usage(real.total, real.total - 4096, 4096))
    out = tmp_path / "deep" / "o"
    rc = main(["graft", "--llm", str(tiny_llm), "--out", str(out), "--steps", "1"])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]  # (the LLM's loading bar precedes it)
    assert rc == 1 and len(errors) == 1 and errors[0].startswith("error: --out") and "GiB free" in errors[0]
    assert not trained and not out.exists()


def test_bad_minutes_is_an_error(tiny_llm, tmp_path, capsys):
    rc = main(["graft", "--llm", str(tiny_llm), "--out", str(tmp_path / "o"), "--minutes", "0"])
    assert rc == 1 and capsys.readouterr().err.startswith("error: --minutes")
