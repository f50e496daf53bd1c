"""Every tiny architecture: load through the Auto classes, capture exactly, with text / image / video, generate."""

from __future__ import annotations

import pytest
import torch

from mars_viz.model.activations import collect_activations, forward_last
from mars_viz.model.backbone import load_backbone, resolve_decoder_layers
from mars_viz.model.hooks import capture_residuals, count_hooks
from mars_viz.model.inputs import Query, build_batch
from mars_viz.model.media import neutral_images, read_video

from ..conftest import ARCHS

PROMPTS = ["Hi", "How do I bake a loaf of sourdough bread at home, step by step?", "Write a short poem"]


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_with_facts(arch, tiny_backbones):
    bb = tiny_backbones(arch)
    assert bb.model_type == arch and bb.num_layers == 4 and bb.hidden_size == 64
    native = {"llava_onevision", "qwen2_vl", "qwen2_5_vl", "mars_reader"}
    assert bb.video_mode == ("native" if arch in native else "frames")
    # the resolved layers are the language model's, not the vision tower's
    assert bb.layers is bb.model.get_decoder().layers
    assert all(not any(n.startswith(("vision", "visual")) for n, _ in layer.named_modules()) for layer in bb.layers)


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padding_changes_no_row(arch, tiny_backbones):
    bb = tiny_backbones(arch)
    qs = [Query(p) for p in PROMPTS]
    batch = build_batch(bb, qs)
    assert (batch["attention_mask"][:, 0] == 0).any(), "prompts of different length must be padded"
    together = forward_last(bb, qs)
    assert together.shape == (3, 4, 64) and together.dtype == torch.float32
    for i, q in enumerate(qs):
        torch.testing.assert_close(together[i], forward_last(bb, [q])[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_equals_output_hidden_states(arch, tiny_backbones):
    """hidden_states[l+1] is the output of layer l, except the last entry, which has the final norm applied."""
    bb = tiny_backbones(arch)
    batch = build_batch(bb, [Query(PROMPTS[1])])
    with torch.no_grad(), capture_residuals(bb.layers) as cap:
        out = bb.model(**batch, output_hidden_states=True)
    ours = cap.last()[0]  # [L, d]
    hs = out.hidden_states
    assert len(hs) == bb.num_layers + 1
    for layer in range(bb.num_layers - 1):
        assert torch.equal(ours[layer], hs[layer + 1][0, -1].float())
    # last entry: transformers ties it to last_hidden_state = final_norm(resid_post of the last layer)
    assert not torch.allclose(ours[-1], hs[-1][0, -1].float(), atol=1e-3)
    normed = bb.model.get_decoder().norm(ours[-1][None, None].to(bb.dtype))[0, 0].float()
    torch.testing.assert_close(normed, hs[-1][0, -1].float(), atol=1e-5, rtol=1e-5)
    # named access, TransformerLens style, negative layers included
    assert torch.equal(cap["resid_post.2"], cap[2]) and torch.equal(cap[-1], cap[bb.num_layers - 1])


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_at_positions(arch, tiny_backbones):
    bb = tiny_backbones(arch)
    batch = build_batch(bb, [Query(PROMPTS[0]), Query(PROMPTS[1])])
    seq = batch["input_ids"].shape[1]
    pos = torch.tensor([[seq - 1, seq - 2], [seq - 1, 0]])
    with torch.no_grad(), capture_residuals(bb.layers, positions=pos) as cap:
        bb.model(**batch)
    at = cap.at_positions()  # [B, L, P, d]
    assert at.shape == (2, 4, 2, 64)
    assert torch.equal(at[:, :, 0], cap.last())
    assert not torch.equal(at[1, :, 1], at[1, :, 0])


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_with_image_and_several_images(arch, tiny_backbones):
    bb = tiny_backbones(arch)
    ims = neutral_images(3, seed=5, size=40)
    text_only = forward_last(bb, [Query("What colour is this?")])
    one = forward_last(bb, [Query("What colour is this?", images=(ims[0],))])
    assert one.shape == (1, 4, 64) and torch.isfinite(one).all()
    assert not torch.allclose(one, text_only)  # the image tokens reach the residual stream
    two = forward_last(bb, [Query("Compare these", images=(ims[1], ims[2]))])
    assert two.shape == (1, 4, 64) and torch.isfinite(two).all()
    # batched image queries equal single runs (padding with images)
    both = forward_last(bb, [Query("What colour is this?", images=(ims[0],)), Query("Hm?", images=(ims[1],))])
    torch.testing.assert_close(both[0], one[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_with_video_file(arch, tiny_backbones, video_file):
    bb = tiny_backbones(arch)
    video = read_video(video_file, num_frames=4)
    batch = build_batch(bb, [Query("What happens in this video?", video=tuple(video.frames))])
    if bb.video_mode == "native":
        assert any(k.startswith("pixel_values_videos") for k in batch), sorted(batch)
    else:
        assert "pixel_values" in batch  # frames go in as images
    acts = collect_activations(bb, [Query("What happens in this video?", video=tuple(video.frames))])
    assert acts.shape == (1, 4, 64) and torch.isfinite(acts).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_generates_tokens(arch, tiny_backbones):
    bb = tiny_backbones(arch)
    batch = build_batch(bb, [Query("Hello there", images=tuple(neutral_images(1, size=40)))])
    with torch.no_grad():
        out = bb.model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 4


def test_capture_first_call_only_under_generate(tiny_backbones):
    bb = tiny_backbones("qwen2_vl")
    batch = build_batch(bb, [Query(PROMPTS[1])])
    with torch.no_grad():
        with capture_residuals(bb.layers) as cap:
            bb.model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    torch.testing.assert_close(cap.last(), forward_last(bb, [Query(PROMPTS[1])]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["qwen2_vl", "gemma3"])
def test_no_hook_left_after_a_forward_that_raised(arch, tiny_backbones):
    bb = tiny_backbones(arch)
    before = count_hooks(bb.model)

    def boom(*_a, **_k):
        raise RuntimeError("boom")

    handle = bb.layers[2].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with capture_residuals(bb.layers):
                assert count_hooks(bb.model) == before + 1 + bb.num_layers
                bb.model(**build_batch(bb, [Query("hi")]))
    finally:
        handle.remove()
    assert count_hooks(bb.model) == before


def test_progress_callback_and_order(tiny_backbones):
    bb = tiny_backbones("qwen2_vl")
    qs = [Query(p) for p in PROMPTS] + [Query("Colour?", images=tuple(neutral_images(1, size=40)))]
    seen = []
    acts = collect_activations(bb, qs, batch_size=2, progress=lambda d, n: seen.append((d, n)))
    assert seen[0] == (0, 4) and seen[-1] == (4, 4) and len(seen) >= 3
    for i, q in enumerate(qs):  # output order is the input order, despite sorting into batches
        torch.testing.assert_close(acts[i], forward_last(bb, [q])[0], atol=1e-4, rtol=0)


def test_layer_resolution_override_and_errors(tiny_backbones):
    bb = tiny_backbones("llava")
    assert resolve_decoder_layers(bb.model, "model.language_model.layers") is bb.layers
    with pytest.raises(ValueError, match="not found"):
        resolve_decoder_layers(bb.model, "model.nope.layers")
    with pytest.raises(ValueError, match="layers_path"):
        # the vision tower has `layers` too, but the wrong count: refused, not guessed
        resolve_decoder_layers(bb.model, "model.vision_tower.encoder.layers")


def test_fallback_table_used_when_get_decoder_missing(tiny_backbones, monkeypatch):
    bb = tiny_backbones("idefics3")
    monkeypatch.setattr(type(bb.model), "get_decoder", lambda self: None)
    assert resolve_decoder_layers(bb.model) is bb.model.model.text_model.layers


def test_missing_model_gives_actionable_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_backbone(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="demo-model"):
        load_backbone("someone/not-a-real-model-xyz")


def test_text_only_llm_loads_via_causal_lm(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mars_viz.model.demo_models import _train_tokenizer, chat_template

    tok = _train_tokenizer([])
    tok.chat_template = chat_template("")
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=tok.pad_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    bb = load_backbone(tmp_path, device="cpu")
    assert bb.modalities == ("text",) and bb.num_layers == 2
    assert forward_last(bb, [Query("a"), Query("a longer prompt")]).shape == (2, 2, 32)
    with pytest.raises(ValueError, match="text-only"):
        build_batch(bb, [Query("x", images=tuple(neutral_images(1, size=8)))])
