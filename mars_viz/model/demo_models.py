"""Tiny random-weight multimodal models, built offline, for tests and for trying the app without a download.

Each builder makes a real transformers model of one architecture (a 4-layer, 64-wide language model and a 2-layer
vision tower), a tokenizer trained in-process with the `tokenizers` library, the architecture's own processor and a
chat template with the right image / video placeholders, then writes everything with `save_pretrained`. The folder
loads through exactly the same `load_backbone` path as a hub id.

The models are random: they check mechanics (shapes, hooks, padding, generation), never behaviour.

`ARCHITECTURES` covers LLaVA-1.5, LLaVA-NeXT (-Video), LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, the reading
graft, Idefics3, SmolVLM, Gemma 3, InternVL, Mistral 3 (Pixtral), PaliGemma and Llama 3.2 Vision (Mllama). SmolVLM's
processor needs `num2words`; the video processors need torchvision.

Example:
    >>> from mars_viz.model.demo_models import build_demo_model
    >>> path = build_demo_model("qwen2_vl", "/tmp/tiny-qwen2-vl")   # doctest: +SKIP
    >>> # python -m mars_viz demo-model --arch qwen2_vl --out /tmp/tiny-qwen2-vl
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from ..paths import ASSETS

__all__ = ["ARCHITECTURES", "build_demo_model", "chat_template"]

# Language-model size shared by every tiny model.
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE = 64, 4, 4, 2, 128
HEAD_DIM = HIDDEN // HEADS
VOCAB_TARGET = 600
SEED = 0

_CORPUS_FALLBACK = (
    "The quick brown fox jumps over the lazy dog. How do I bake bread? Write a poem about the sea. "
    "I'm sorry, but I can't help with that. Sure, here is a short answer. Describe the image. "
    "What happens in this video? Explain photosynthesis in simple terms. 0 1 2 3 4 5 6 7 8 9"
)


def chat_template(image: str, video: str | None = None, bos: str = "") -> str:
    """A ChatML Jinja template that accepts string content or structured parts.

    `image` / `video` are the literal placeholder strings the architecture's processor expands.
    """
    video_part = (
        "{%- elif part['type'] == 'video' -%}" + video.replace("'", "\\'")
        if video is not None
        else "{%- elif part['type'] == 'video' -%}{{ raise_exception('this model has no video input') }}"
    )
    return (
        bos
        + "{%- for message in messages -%}"
        "<|im_start|>{{ message['role'] }}\n"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}" + image.replace("'", "\\'") + video_part + ""
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        "<|im_end|>\n"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
    )


def _corpus() -> list[str]:
    root = ASSETS / "prompts"
    lines: list[str] = [_CORPUS_FALLBACK]
    for name in ("harmful.txt", "harmless.txt"):
        p = root / name
        if p.exists():
            lines += p.read_text(encoding="utf-8").splitlines()
    return lines


def _train_tokenizer(specials: list[str], extra: dict[str, str] | None = None, bos: str | None = None):
    """Byte-level BPE trained on our own prompt files; `specials` become single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"] + ([bos] if bos else [])
    all_specials = list(dict.fromkeys(base + specials))
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        special_tokens=all_specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    kwargs: dict = dict(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token=None,
        padding_side="left",
    )
    if bos:
        kwargs["bos_token"] = bos
    if extra:
        kwargs["extra_special_tokens"] = extra
    return PreTrainedTokenizerFast(**kwargs)


def _text_kwargs(tokenizer) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )


def _tok_id(tokenizer, token: str) -> int:
    i = tokenizer.convert_tokens_to_ids(token)
    if i is None or i == tokenizer.unk_token_id:
        raise ValueError(f"token {token!r} missing from the demo tokenizer")
    return int(i)


# --------------------------------------------------------------------------------------------------------------------
# One builder per architecture: returns (model, processor).


def _llava():
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = _train_tokenizer(["<image>"])
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**_text_kwargs(tok), head_dim=HEAD_DIM),
                      image_token_index=_tok_id(tok, "<image>"), vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(cfg)
    ip = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=chat_template("<image>"))
    return model, proc


def _llava_onevision():
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tok = _train_tokenizer(["<image>", "<video>"])
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=28, patch_size=14)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=Qwen2Config(**_text_kwargs(tok)),
                               image_token_index=_tok_id(tok, "<image>"), video_token_index=_tok_id(tok, "<video>"),
                               image_grid_pinpoints=[[28, 28]], vision_feature_select_strategy="full",
                               vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9")
    model = LlavaOnevisionForConditionalGeneration(cfg)
    ip = LlavaOnevisionImageProcessor(size={"height": 28, "width": 28}, image_grid_pinpoints=[[28, 28]])
    vp = LlavaOnevisionVideoProcessor(size={"height": 28, "width": 28})
    proc = LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, num_image_tokens=4,
                                   vision_feature_select_strategy="full",
                                   chat_template=chat_template("<image>", "<video>"))
    return model, proc


_QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
_QWEN_VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
_QWEN_SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _qwen_ids(tok) -> dict:
    return dict(vision_start_token_id=_tok_id(tok, "<|vision_start|>"),
                vision_end_token_id=_tok_id(tok, "<|vision_end|>"),
                image_token_id=_tok_id(tok, "<|image_pad|>"), video_token_id=_tok_id(tok, "<|video_pad|>"))


def _qwen_processors(image_cls, video_cls):
    common = dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=28 * 28, max_pixels=56 * 56)
    return image_cls(**common), video_cls(do_sample_frames=False, cap_pixels_per_frame=True, **common)


def _qwen_rope() -> dict:
    half = HEAD_DIM // 2
    section = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    return {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}


def _qwen2_vl():
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLTextConfig,
        Qwen2VLVideoProcessor,
        Qwen2VLVisionConfig,
    )

    tok = _train_tokenizer(_QWEN_SPECIALS)
    text = Qwen2VLTextConfig(**_text_kwargs(tok), rope_parameters=_qwen_rope())
    vision = Qwen2VLVisionConfig(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=HIDDEN,
                                 patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **_qwen_ids(tok))
    model = Qwen2VLForConditionalGeneration(cfg)
    ip, vp = _qwen_processors(Qwen2VLImageProcessor, Qwen2VLVideoProcessor)
    proc = Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp,
                            chat_template=chat_template(_QWEN_IMAGE, _QWEN_VIDEO))
    return model, proc


def _qwen2_5_vl():
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2_5_VLTextConfig,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

    tok = _train_tokenizer(_QWEN_SPECIALS)
    text = Qwen2_5_VLTextConfig(**_text_kwargs(tok), rope_parameters=_qwen_rope())
    vision = Qwen2_5_VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=HIDDEN,
                                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                                    fullatt_block_indexes=[1])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **_qwen_ids(tok))
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    ip, vp = _qwen_processors(Qwen2VLImageProcessor, Qwen2VLVideoProcessor)
    proc = Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp,
                               chat_template=chat_template(_QWEN_IMAGE, _QWEN_VIDEO))
    return model, proc


def _mars_reader():
    """The project's reading graft (`mars_viz.model.reader`) at toy size: a narrow random recognizer and projector."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLTextConfig, Qwen2VLVideoProcessor

    from .reader.modeling import MarsReaderConfig, MarsReaderForConditionalGeneration, MarsReaderVisionConfig

    tok = _train_tokenizer(_QWEN_SPECIALS)
    text = Qwen2VLTextConfig(**_text_kwargs(tok), rope_parameters=_qwen_rope())
    vision = MarsReaderVisionConfig(hidden_size=HIDDEN, recognizer_channels=16, recognizer_hidden=16, proj_dim=32,
                                    proj_layers=1)
    cfg = MarsReaderConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), tie_word_embeddings=False,
                           **_qwen_ids(tok))
    model = MarsReaderForConditionalGeneration(cfg)
    ip, vp = _qwen_processors(Qwen2VLImageProcessor, Qwen2VLVideoProcessor)
    proc = Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp,
                            chat_template=chat_template(_QWEN_IMAGE, _QWEN_VIDEO))
    return model, proc


def _idefics3():
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
    )

    row_col = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tok = _train_tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + row_col)
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=56, patch_size=14)
    cfg = Idefics3Config(vision_config=vision, text_config=LlamaConfig(**_text_kwargs(tok), head_dim=HEAD_DIM),
                         scale_factor=2, image_token_id=_tok_id(tok, "<image>"), tie_word_embeddings=False)
    model = Idefics3ForConditionalGeneration(cfg)
    ip = Idefics3ImageProcessor(size={"longest_edge": 56}, max_image_size={"longest_edge": 56},
                                do_image_splitting=False)
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=chat_template("<image>"))
    return model, proc


def _gemma3():
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    extra = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = _train_tokenizer(list(extra.values()), extra=extra, bos="<bos>")
    kw = _text_kwargs(tok)
    text = Gemma3TextConfig(**kw, head_dim=HEAD_DIM, sliding_window=16, query_pre_attn_scalar=HEAD_DIM)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=56, patch_size=14, vision_use_head=False)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                       boi_token_index=_tok_id(tok, "<start_of_image>"), eoi_token_index=_tok_id(tok, "<end_of_image>"),
                       image_token_index=_tok_id(tok, "<image_soft_token>"), tie_word_embeddings=False)
    model = Gemma3ForConditionalGeneration(cfg)
    ip = Gemma3ImageProcessor(size={"height": 56, "width": 56}, do_pan_and_scan=False)
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4,
                           chat_template=chat_template("<start_of_image>", bos="{{ bos_token }}"))
    return model, proc


# ---- more families (issue 22) --------------------------------------------------------------------------------------

_ANYRES_PINPOINTS = [[28, 56], [56, 28], [56, 56]]  # a 28-px base view plus up to 2 x 2 anyres tiles of 28 px


def _clip_vision():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=28, patch_size=14, projection_dim=32)


def _llava_next():
    """LLaVA-NeXT (1.6): a CLIP tower, a 28-px base view plus anyres tiles (unpadded, a newline token per tile row);
    a video goes in as its frames."""
    from transformers import (
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tok = _train_tokenizer(["<image>"])
    cfg = LlavaNextConfig(vision_config=_clip_vision(), text_config=LlamaConfig(**_text_kwargs(tok), head_dim=HEAD_DIM),
                          image_token_index=_tok_id(tok, "<image>"), image_grid_pinpoints=_ANYRES_PINPOINTS,
                          vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=4)
    model = LlavaNextForConditionalGeneration(cfg)
    ip = LlavaNextImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                 image_grid_pinpoints=_ANYRES_PINPOINTS)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=chat_template("<image>"))
    return model, proc


def _llava_next_video():
    """LLaVA-NeXT-Video: LLaVA-NeXT images plus native video (each 56-px frame's 4 x 4 patches pooled to 2 x 2)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextImageProcessor,
        LlavaNextVideoConfig,
        LlavaNextVideoForConditionalGeneration,
        LlavaNextVideoProcessor,
        LlavaNextVideoVideoProcessor,
    )

    tok = _train_tokenizer(["<image>", "<video>"])
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=56, patch_size=14, projection_dim=32)
    pinpoints = [[56, 56]]
    cfg = LlavaNextVideoConfig(vision_config=vision, text_config=LlamaConfig(**_text_kwargs(tok), head_dim=HEAD_DIM),
                               image_token_index=_tok_id(tok, "<image>"), video_token_index=_tok_id(tok, "<video>"),
                               image_grid_pinpoints=pinpoints, vision_feature_layer=-2,
                               vision_feature_select_strategy="default", spatial_pool_stride=2,
                               image_seq_length=16, video_seq_length=4)
    model = LlavaNextVideoForConditionalGeneration(cfg)
    ip = LlavaNextImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                 image_grid_pinpoints=pinpoints)
    vp = LlavaNextVideoVideoProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    proc = LlavaNextVideoProcessor(video_processor=vp, image_processor=ip, tokenizer=tok, patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=chat_template("<image>", "<video>"))
    return model, proc


def _smolvlm():
    """SmolVLM (2): Idefics3's layout, a SmolLM text model and native video (frames as global views with timestamps;
    its video processor needs torchvision, its processor num2words). The chat template is SmolVLM's own: the
    processor swaps it in for any conversation with a video, so the images must use the same one."""
    from transformers import (
        LlamaConfig,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    row_col = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tok = _train_tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", "<video>"]
                           + row_col)
    tok.eos_token = "<end_of_utterance>"
    vision = SmolVLMVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=56, patch_size=14)
    cfg = SmolVLMConfig(vision_config=vision, text_config=LlamaConfig(**_text_kwargs(tok), head_dim=HEAD_DIM),
                        scale_factor=2, image_token_id=_tok_id(tok, "<image>"), tie_word_embeddings=False)
    model = SmolVLMForConditionalGeneration(cfg)
    ip = SmolVLMImageProcessor(size={"longest_edge": 56}, max_image_size={"longest_edge": 56},
                               do_image_splitting=False)
    vp = SmolVLMVideoProcessor(size={"longest_edge": 56}, max_image_size={"longest_edge": 56})
    proc = SmolVLMProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, image_seq_len=4,
                            chat_template=DEFAULT_CHAT_TEMPLATE)
    return model, proc


def _qwen3_vl():
    """Qwen3-VL: 16-px patches, DeepStack (vision features of tower layers 0 and 1 added to the first decoder layers'
    residual stream at the media positions), interleaved M-RoPE, and videos with a `<t seconds>` stamp per frame
    pair."""
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLTextConfig,
        Qwen3VLVideoProcessor,
        Qwen3VLVisionConfig,
    )

    tok = _train_tokenizer(_QWEN_SPECIALS)
    rope = dict(_qwen_rope(), mrope_interleaved=True)
    text = Qwen3VLTextConfig(**_text_kwargs(tok), head_dim=HEAD_DIM, rope_parameters=rope)
    vision = Qwen3VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=HIDDEN,
                                 patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                                 num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **_qwen_ids(tok))
    model = Qwen3VLForConditionalGeneration(cfg)
    common = dict(patch_size=16, merge_size=2, temporal_patch_size=2)
    ip = Qwen2VLImageProcessor(min_pixels=64 * 64, max_pixels=64 * 64, **common)
    vp = Qwen3VLVideoProcessor(size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64 * 16}, do_sample_frames=False,
                               cap_pixels_per_frame=True, max_video_tokens=4, **common)
    proc = Qwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp,
                            chat_template=chat_template(_QWEN_IMAGE, _QWEN_VIDEO))
    return model, proc


def _internvl():
    """InternVL (3, transformers' native port): an InternViT tower, pixel-shuffle to 2 x 2 tokens per 56-px tile,
    a Qwen2 text model; images are cut into up to 2 tiles plus a thumbnail, a video is frames of one tile each
    ("FrameN: <img>...</img>", the image token)."""
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
        InternVLVisionConfig,
        Qwen2Config,
    )

    extra = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tok = _train_tokenizer(list(extra.values()), extra=extra)
    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=[56, 56], patch_size=[14, 14])
    cfg = InternVLConfig(vision_config=vision, text_config=Qwen2Config(**_text_kwargs(tok)),
                         image_token_id=_tok_id(tok, "<IMG_CONTEXT>"), image_seq_length=4, downsample_ratio=0.5,
                         vision_feature_layer=-1, tie_word_embeddings=False)
    model = InternVLForConditionalGeneration(cfg)
    ip = GotOcr2ImageProcessor(size={"height": 56, "width": 56}, crop_to_patches=True, min_patches=1, max_patches=2)
    vp = InternVLVideoProcessor(size={"height": 56, "width": 56})
    proc = InternVLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, image_seq_length=4,
                             chat_template=chat_template("<IMG_CONTEXT>", "<video>"))
    return model, proc


def _mistral3():
    """Mistral Small 3 (Mistral3, a Pixtral tower): images at native aspect, 14-px patches merged 2 x 2, each token
    row closed by [IMG_BREAK], the last by [IMG_END]."""
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralImageProcessor,
        PixtralProcessor,
        PixtralVisionConfig,
    )

    tok = _train_tokenizer(["[IMG]", "[IMG_BREAK]", "[IMG_END]"])
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=56, patch_size=14, head_dim=16)
    text = MistralConfig(**_text_kwargs(tok), head_dim=HEAD_DIM, sliding_window=None)
    cfg = Mistral3Config(vision_config=vision, text_config=text, image_token_index=_tok_id(tok, "[IMG]"),
                         spatial_merge_size=2, vision_feature_layer=-1, tie_word_embeddings=False)
    model = Mistral3ForConditionalGeneration(cfg)
    ip = PixtralImageProcessor(size={"longest_edge": 56}, patch_size=14)
    proc = PixtralProcessor(image_processor=ip, tokenizer=tok, patch_size=14, spatial_merge_size=2,
                            chat_template=chat_template("[IMG]"))
    return model, proc


def _paligemma():
    """PaliGemma: a SigLIP tower, a Gemma text model, and a prefix-LM mask (the whole prompt, image and text, attends
    bidirectionally). Its processor puts BOS after the image tokens, ends the prompt with a newline and adds 1152
    location / segmentation tokens to the vocabulary; it has no text-only path (it requires images)."""
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    extra = {"image_token": "<image>"}
    tok = _train_tokenizer(["<image>"], extra=extra, bos="<bos>")
    ip = SiglipImageProcessor(size={"height": 28, "width": 28})
    ip.image_seq_length = 4
    proc = PaliGemmaProcessor(image_processor=ip, tokenizer=tok, chat_template=chat_template("<image>"))
    tok = proc.tokenizer  # the processor added its <locXXXX> / <segXXX> tokens: size the embeddings after it
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=28, patch_size=14, vision_use_head=False)
    text = GemmaConfig(**_text_kwargs(tok), head_dim=HEAD_DIM)
    cfg = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=_tok_id(tok, "<image>"),
                          vocab_size=len(tok), projection_dim=HIDDEN, hidden_size=HIDDEN, tie_word_embeddings=False)
    model = PaliGemmaForConditionalGeneration(cfg)
    return model, proc


def _mllama():
    """Llama 3.2 Vision (Mllama): an image is one <|image|> token in the prompt; its tiles enter through gated
    cross-attention decoder layers (here layer 2 of 4), which a text-only forward skips altogether."""
    from transformers import (
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaImageProcessor,
        MllamaProcessor,
        MllamaTextConfig,
        MllamaVisionConfig,
    )

    tok = _train_tokenizer(["<|image|>"], bos="<|begin_of_text|>")
    vision = MllamaVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                                attention_heads=2, image_size=28, patch_size=14, max_num_tiles=4,
                                intermediate_layers_indices=[0, 1], vision_output_dim=32 * 3)
    kw = _text_kwargs(tok)
    text = MllamaTextConfig(**kw, cross_attention_layers=[2], rope_parameters={"rope_type": "default",
                                                                                "rope_theta": 10000.0})
    cfg = MllamaConfig(vision_config=vision, text_config=text, image_token_index=_tok_id(tok, "<|image|>"))
    model = MllamaForConditionalGeneration(cfg)
    with torch.no_grad():  # transformers starts the tanh gates of the cross-attention layers at 0 (images ignored)
        for layer in model.model.language_model.layers:
            if hasattr(layer, "cross_attn_attn_gate"):
                layer.cross_attn_attn_gate.fill_(1.0)
                layer.cross_attn_mlp_gate.fill_(1.0)
    ip = MllamaImageProcessor(size={"height": 28, "width": 28}, max_image_tiles=4)
    proc = MllamaProcessor(image_processor=ip, tokenizer=tok,
                           chat_template=chat_template("<|image|>", bos="{{ bos_token }}"))
    return model, proc


ARCHITECTURES: dict[str, Callable[[], tuple]] = {
    "llava": _llava,
    "llava_onevision": _llava_onevision,
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
    "mars_reader": _mars_reader,
    "idefics3": _idefics3,
    "gemma3": _gemma3,
    "llava_next": _llava_next,
    "llava_next_video": _llava_next_video,
    "smolvlm": _smolvlm,
    "qwen3_vl": _qwen3_vl,
    "internvl": _internvl,
    "mistral3": _mistral3,
    "paligemma": _paligemma,
    "mllama": _mllama,
}


def build_demo_model(arch: str, out: str | Path, seed: int = SEED) -> Path:
    """Build, save and return the folder of a tiny random model of architecture `arch`.

    Raises ValueError for an unknown `arch` (the message lists the known ones).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    out = Path(out)
    torch.manual_seed(seed)
    model, processor = ARCHITECTURES[arch]()
    model.eval()
    model.generation_config.do_sample = False
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "mars_demo.json").write_text(json.dumps({"arch": arch, "seed": seed, "random_weights": True}, indent=2))
    return out
