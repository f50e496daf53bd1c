"""A tiny random Qwen2 chat LLM (Qwen2ForCausalLM + a tokenizer trained in-process), for the graft tests."""

from __future__ import annotations

from pathlib import Path


def build_tiny_qwen2(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mars_viz.model.demo_models import _QWEN_SPECIALS, _text_kwargs, _train_tokenizer, chat_template

    torch.manual_seed(seed)
    tok = _train_tokenizer(list(_QWEN_SPECIALS))
    tok.chat_template = chat_template("<|vision_start|><|image_pad|><|vision_end|>")
    model = Qwen2ForCausalLM(Qwen2Config(**_text_kwargs(tok)))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
