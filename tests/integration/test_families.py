"""More families (issue 22): tiny random LLaVA-NeXT, LLaVA-NeXT-Video, SmolVLM, Qwen3-VL, InternVL, Mistral 3
(Pixtral), PaliGemma and Llama 3.2 Vision (Mllama) fixtures, each saved to a folder and loaded back through
`load_backbone` (the Auto classes), calibrated (SMALL_CONFIG), run through every concrete pair strategy on one image
and one video query (native video, or its frames as images), and mapped (`analysis.analyze_stream`'s input map).

Each pair strategy must give exactly the token ids of two separate generations (a plain one, and a steered one given
the gate of an independent forward), as on the first seven architectures (`test_pair_strategies`). What the pipeline
does not do yet for a family is marked xfail (not strict) with the change it needs, so the mark turns into an XPASS
the day the change lands."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mars_viz.maps.layout import layout_spec
from mars_viz.model.activations import forward_sites
from mars_viz.model.backbone import load_backbone
from mars_viz.model.hooks import count_hooks
from mars_viz.model.inputs import Query, build_batch
from mars_viz.model.media import neutral_images, neutral_video
from mars_viz.steer.generate import generate_batch
from mars_viz.steer.pair import PAIR_STRATEGIES, run_pairs
from mars_viz.steer.steering import SteerOptions, plan
from mars_viz.steer.stream import stream_pair

from .test_pair_strategies import N_TOKENS, OPEN, _no_hook_of_ours, _rope_state, reference_gate, steered_reference

FAMILIES = ["llava_next", "llava_next_video", "smolvlm", "qwen3_vl", "internvl", "mistral3", "paligemma", "mllama"]
NATIVE_VIDEO = {"llava_next_video", "smolvlm", "qwen3_vl", "internvl"}  # the others take a video's frames as images
MODEL_CLASS = {"llava_next": "LlavaNextForConditionalGeneration",
               "llava_next_video": "LlavaNextVideoForConditionalGeneration",
               "smolvlm": "SmolVLMForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration",
               "internvl": "InternVLForConditionalGeneration", "mistral3": "Mistral3ForConditionalGeneration",
               "paligemma": "PaliGemmaForConditionalGeneration", "mllama": "MllamaForConditionalGeneration"}

# What the pipeline still lacks, per family, as {arch: reason} (each entry xfails its tests; none left today: the
# registry, model/backbone.py, model/inputs.py, steer/generate.py, steer/pair.py and maps/layout.py support all eight).
# PaliGemma (`ArchSpec.prefix_lm`) runs every strategy as `doubled`, so its gate_first and batched pairs pass too.
NO_PIPELINE: dict[str, str] = {}
SHARED_PREFILL: dict[str, str] = {}
NO_VIDEO_LAYOUT: dict[str, str] = {}
# Images that enter through cross-attention layers, not as tokens of the residual stream: the map's media positions
# are the one <|image|> placeholder per image (or frame), and there is no patch grid to draw
CROSS_ATTENTION = {"mllama"}
N_FRAMES = 4


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# SmolVLMProcessor raises ImportError without num2words (it spells out the frame count of a video's prompt)
MISSING = {"smolvlm": "num2words is not installed: SmolVLMProcessor needs it (requirements.txt must list it)"}
MISSING = {a: why for a, why in MISSING.items() if not _has("num2words")}


def _params(table: dict[str, str], archs=FAMILIES):
    out = []
    for a in archs:
        marks = [pytest.mark.skip(reason=MISSING[a])] if a in MISSING else []
        if a in table:
            marks.append(pytest.mark.xfail(reason=table[a], strict=False))
        out.append(pytest.param(a, marks=marks))
    return out


def _query(modality: str) -> Query:
    if modality == "image":  # 2:1, so tiled processors pad or split it (anyres unpadding, Mllama's empty tiles)
        return Query("Tell me about the sea", images=(neutral_images(1, seed=4, size=32)[0].resize((64, 32)),))
    return Query("What happens in the clip?", video=tuple(neutral_video(N_FRAMES, seed=5, size=64)))


@pytest.fixture(scope="module")
def separate(tiny_backbones, fitted):
    """(arch, modality) -> token ids of two independent full generations: plain, and steered with the gate of an
    independent forward (what every strategy must reproduce token for token)."""
    cache: dict = {}

    def get(arch: str, modality: str) -> tuple[list[int], list[int]]:
        if (arch, modality) not in cache:
            bb, state, q = tiny_backbones(arch), fitted(arch), _query(modality)
            plain = generate_batch(bb, build_batch(bb, [q]), N_TOKENS)[0][0]
            cache[arch, modality] = (plain, steered_reference(bb, state, OPEN, q))
        return cache[arch, modality]

    return get


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch", _params({}))
def test_fixture_saves_and_loads_through_the_auto_classes(arch, tiny_dirs):
    folder = tiny_dirs(arch)
    assert (folder / "config.json").is_file() and (folder / "mars_demo.json").is_file()
    bb = load_backbone(folder, device="cpu")
    assert bb.model_type == arch and type(bb.model).__name__ == MODEL_CLASS[arch]
    assert bb.hidden_size == 64 and bb.is_demo
    assert bb.video_mode == ("native" if arch in NATIVE_VIDEO else "frames")
    # the resolved layers are the language model's, not the vision tower's
    assert all(not any(n.startswith(("vision", "visual")) for n, _ in layer.named_modules()) for layer in bb.layers)
    assert sum(p.numel() for p in bb.model.parameters()) < 2_000_000  # tiny: a fixture builds in seconds
    spec = layout_spec(bb)
    for modality in ("image", "video"):  # one query each, media placeholders expanded by the model's own processor
        batch = build_batch(bb, [_query(modality)])
        assert any(t in (spec.image_token_id, spec.video_token_id) for t in batch["input_ids"][0].tolist())
        ((tokens, _),) = generate_batch(bb, batch, 3)
        assert 1 <= len(tokens) <= 3


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("arch", _params(NO_PIPELINE))
def test_calibrates_with_both_modalities(arch, tiny_backbones, fitted):
    bb, state = tiny_backbones(arch), fitted(arch)
    state.check_compatible(bb)
    assert 0 <= state.layer < bb.num_layers and 0 <= state.gate_layer < bb.num_layers
    d = state.diagnostics
    assert {k.split(".")[0] for k in d.map_cells} <= {"image", "video"} and set(d.map_tokens) == {"image", "video"}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("modality", ["image", "video"])
@pytest.mark.parametrize("strategy", PAIR_STRATEGIES)
@pytest.mark.parametrize("arch", _params(NO_PIPELINE))
def test_every_strategy_gives_two_separate_generations(arch, strategy, modality, tiny_backbones, fitted, separate):
    bb, state = tiny_backbones(arch), fitted(arch)
    if strategy != "doubled" and arch in SHARED_PREFILL:
        pytest.xfail(SHARED_PREFILL[arch])
    q = _query(modality)
    plain, steered = separate(arch, modality)
    rope_before, hooks_before = _rope_state(bb), count_hooks(bb.model)
    (res,) = run_pairs(bb, state, [q], OPEN, max_new_tokens=N_TOKENS, strategy=strategy)
    assert all(a is b for a, b in zip(_rope_state(bb), rope_before, strict=True)), "rope_deltas not restored"
    assert _no_hook_of_ours(bb, hooks_before)
    assert res.modality == modality and res.gate_open and res.displacement_norm > 0
    assert res.unsteered.token_ids == plain and res.steered.token_ids == steered
    # the gate read inside the strategy is the score of an independent full forward (a shared prefill that is not the
    # full prompt's would show here first, before any token flips)
    assert res.score_gate == pytest.approx(float(reference_gate(bb, state, OPEN, q)[0]), rel=1e-4, abs=1e-4)
    # ... and so are the unsteered residuals it keeps, at every layer and both gate positions
    final = list(stream_pair(bb, state, q, OPEN, max_new_tokens=2, strategy=strategy))[-1]
    ref = forward_sites(bb, [q])
    torch.testing.assert_close(final.acts, ref["post"][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(final.acts_inst, ref["inst"][0], atol=1e-4, rtol=1e-4)
    # closed gate: the steered answer is the unsteered one, bit for bit
    (closed,) = run_pairs(bb, state, [q], SteerOptions(tau=1e9), max_new_tokens=N_TOKENS, strategy=strategy)
    assert not closed.gate_open and closed.displacement_norm == 0.0
    assert closed.steered.token_ids == closed.unsteered.token_ids == plain


def _map(bb, state, q, plant=None):
    from .test_maps import _run_map

    return _run_map(bb, state, q, plant=plant, strategy="doubled")


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("modality", ["image", "video"])
@pytest.mark.parametrize("arch", _params(NO_PIPELINE))
def test_input_map_scores_every_position_and_lights_planted_tokens(arch, modality, tiny_backbones, fitted):
    """The map of one query: one score per prompt position, the gate's own score at the gate's position, every
    media token at most once on a grid, and a vector planted along r-hat at two media tokens lights exactly their
    cells (by +3 units of the unsafe-safe distance), whatever the layout (spatial or in sequence order)."""
    bb, state = tiny_backbones(arch), fitted(arch)
    q = _query(modality)
    a = _map(bb, state, q)
    m = a.input_map
    assert m is not None, a.notes
    n = build_batch(bb, [q])["input_ids"].shape[1]
    assert len(m.tokens) == len(m.kinds) == len(m.scores) == n
    assert m.scores[m.gate_at] == pytest.approx(a.result.score_gate, abs=1e-6)
    spec = layout_spec(bb)
    ids = build_batch(bb, [q])["input_ids"][0].tolist()
    media = {i for i, t in enumerate(ids) if t in (spec.image_token_id, spec.video_token_id)}
    placed = [int(p) for g in m.grids for p in g.positions[g.positions >= 0].tolist()]
    assert placed and len(placed) == len(set(placed)) and set(placed) <= media
    assert {m.kinds[i] for i in media} <= {"image", "video"} and all(m.kinds[i] != "text" for i in media)
    first, last = min(placed), max(placed)
    layer = m.layer
    r = state.gate_axis().r[layer]
    planted = _map(bb, state, q, plant=(layer, [first, last], (3.0 * r).float())).input_map
    lit = set()
    for gb, ga in zip(m.grids, planted.grids, strict=True):
        d = np.nan_to_num(ga.scores - gb.scores)
        lit |= {int(gb.positions[rc]) for rc in zip(*np.nonzero(d), strict=True)}
        assert np.allclose(d[d != 0], 3.0, atol=1e-3)
    assert lit == {first, last}
    text = [i for i, k in enumerate(m.kinds) if k == "text"]
    assert np.array_equal(m.scores[text], planted.scores[text])


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("modality", ["image", "video"])
@pytest.mark.parametrize("arch", _params(NO_PIPELINE))
def test_input_map_is_spatial(arch, modality, tiny_backbones, fitted):
    """Where the registry gives the family a layout, its media tokens sit on grids (no token shown in sequence
    order); an anyres model leaves only its newline tokens off the grid. Mllama has one placeholder per image."""
    bb = tiny_backbones(arch)
    spec = layout_spec(bb)
    if arch in CROSS_ATTENTION:  # by design: one <|image|> token per image in the residual stream, nothing spatial
        q = _query(modality)
        m = _map(bb, fitted(arch), q).input_map
        n = len(q.images) or N_FRAMES
        assert sum(k != "text" for k in m.kinds) == n and sum(g.positions.size for g in m.grids) == n
        return
    if not spec.family:
        pytest.xfail(f"no map layout family is registered for {arch} (archs.ArchSpec.maps; maps/layout.py)")
    if modality == "video" and arch in NO_VIDEO_LAYOUT:
        pytest.xfail(NO_VIDEO_LAYOUT[arch])
    q = _query(modality)
    m = _map(bb, fitted(arch), q).input_map
    assert not any(g.view == "sequence" for g in m.grids), m.notes
    ids = build_batch(bb, [q])["input_ids"][0].tolist()
    media = [i for i, t in enumerate(ids) if t in (spec.image_token_id, spec.video_token_id)]
    placed = sum(int(np.sum(g.positions >= 0)) for g in m.grids)
    if arch == "llava_next" or (arch == "llava_next_video" and modality == "image"):  # anyres images
        newlines = sum(g.shape[0] for g in m.grids if g.view == "tiles") + sum(g.view == "base" for g in m.grids)
        assert 0 < len(media) - placed <= newlines  # only the newline tokens ending each tile row (or the base)
    else:
        assert placed == len(media), m.notes
    if modality == "video":
        assert sorted({f for g in m.grids for f in g.frames}) == list(range(N_FRAMES))
        assert all(g.kind == "frame" for g in m.grids)
    else:
        assert {g.index for g in m.grids} == {0}
    assert plan(fitted(arch), SteerOptions()).detect_layer == m.layer
