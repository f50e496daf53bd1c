"""The shared prefill (`generate._prefill_all_but_last`) cuts the per-token inputs by name, never by shape.

Qwen2-VL's `pixel_values` is `[patches, 1176]` (3 channels x 2 frames x 14 x 14): a prompt of exactly 1176 tokens
made it look like a per-token mask, and a cut by shape dropped a column of every patch. Here such a prompt, with an
image, runs through the pair (both strategies that prefill) and must give the answers of separate full generations,
with the whole image reaching the vision tower.
"""

from __future__ import annotations

import pytest

from mars_viz.model.inputs import Query, build_batch
from mars_viz.model.media import neutral_images
from mars_viz.steer.generate import PER_TOKEN_KEYS, generate_batch
from mars_viz.steer.pair import run_pairs

from .test_pair_strategies import N_TOKENS, OPEN, steered_reference


def _prompt_of_length(bb, n: int, image) -> Query:
    """An image query whose templated prompt is exactly `n` tokens long (image placeholders included)."""
    tok = bb.tokenizer
    word = next(w for w in ("the", "a", "I", "sea", "is", "to") if len(tok.tokenize(f" {w}" * 3)) == 3)
    head = "Tell me about the picture"

    def length(k: int) -> int:
        return int(build_batch(bb, [Query(head + f" {word}" * k, images=(image,))])["input_ids"].shape[1])

    k = n - length(0)
    q = Query(head + f" {word}" * k, images=(image,))
    assert length(k) == n, "the filler word should add exactly one token per repeat"
    return q


@pytest.mark.parametrize("strategy", ["gate_first", "batched"])
def test_prompt_as_long_as_a_patch_keeps_the_image(strategy, tiny_backbones, fitted):
    bb, state = tiny_backbones("qwen2_vl"), fitted("qwen2_vl")
    image = neutral_images(1, seed=4, size=40)[0]
    patch = int(build_batch(bb, [Query("x", images=(image,))])["pixel_values"].shape[1])
    assert patch == 1176
    q = _prompt_of_length(bb, patch, image)
    batch = build_batch(bb, [q])
    assert batch["input_ids"].shape[1] == batch["pixel_values"].shape[1] == patch
    assert "pixel_values" not in PER_TOKEN_KEYS

    seen: list[tuple[int, ...]] = []  # the pixel_values the vision tower receives: [patches, 1176]
    handle = bb.model.model.visual.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(tuple((args[0] if args else kwargs["hidden_states"]).shape)),
        with_kwargs=True)
    try:
        res = run_pairs(bb, state, [q], OPEN, max_new_tokens=N_TOKENS, strategy=strategy)[0]
    finally:
        handle.remove()
    assert seen and all(s == tuple(batch["pixel_values"].shape) for s in seen), seen
    assert res.gate_open
    assert res.unsteered.token_ids == generate_batch(bb, batch, N_TOKENS)[0][0]
    assert res.steered.token_ids == steered_reference(bb, state, OPEN, q)
