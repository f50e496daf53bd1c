"""MARS end to end on every tiny architecture: calibrate, save/load, steer only the last prompt position of prefill,
bit-identical output when the gate is closed."""

from __future__ import annotations

import pytest
import torch

from mars_viz.core.state import MarsConfig, MarsState
from mars_viz.fit.cache import calibrate_cached
from mars_viz.fit.calibrate import calibrate
from mars_viz.model.hooks import capture_residuals, count_hooks
from mars_viz.model.inputs import Query, build_batch
from mars_viz.model.media import neutral_images, read_video
from mars_viz.steer.pair import run_pairs
from mars_viz.steer.steering import SteerOptions, mars_steering

from ..conftest import ARCHS, SMALL_CONFIG

SMALL = MarsConfig(max_prompts=12, k_neutral=3, neutral_prompts=3, curve_prompts=3, steer_prompts=3,
                   filter_tokens=3, levels=(1.0, 2.0, 4.0), batch_size=8)
assert SMALL == MarsConfig(**SMALL_CONFIG)  # the `fitted` fixture (conftest) calibrates with it


def _queries(arch, video_file):
    ims = neutral_images(2, seed=9, size=40)
    frames = tuple(read_video(video_file, num_frames=4).frames)
    return [Query("Tell me a story about a dragon"), Query("What colour is this?", images=(ims[0],)),
            Query("What happens here?", video=frames)]


@pytest.mark.parametrize("arch", ARCHS)
def test_gate_closed_output_is_token_identical(arch, tiny_backbones, fitted, video_file):
    bb, state = tiny_backbones(arch), fitted(arch)
    res = run_pairs(bb, state, _queries(arch, video_file), SteerOptions(tau=100.0), max_new_tokens=6)
    for r in res:
        assert not r.gate_open and r.displacement_norm == 0.0
        assert r.steered.token_ids == r.unsteered.token_ids and len(r.steered.token_ids) > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_gate_forced_open_displaces(arch, tiny_backbones, fitted, video_file):
    bb, state = tiny_backbones(arch), fitted(arch)
    # t* far out, so every input lies inside the trust region (tiny random models never refuse: their t* is 1)
    res = run_pairs(bb, state, _queries(arch, video_file), SteerOptions(tau=-100.0, target_level=50.0),
                    max_new_tokens=4)
    for r in res:
        assert r.gate_open and r.gate_weight == 1.0 and r.t_star == 50.0
        assert r.displacement_norm > 0
        # lands at t* (measured on the re-centred activation): |disp| = |t* - s| * ||r||
        expect = abs(r.t_star - r.score_recentred) * float(state.r_norm[r.layer])
        assert r.displacement_norm == pytest.approx(expect, rel=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_hook_touches_only_last_prompt_position_of_prefill(arch, tiny_backbones, fitted):
    bb, state = tiny_backbones(arch), fitted(arch)
    q = Query("Explain how rainbows form, please", images=tuple(neutral_images(1, seed=2, size=40)))
    batch = build_batch(bb, [q])
    seq = batch["input_ids"].shape[1]
    all_pos = torch.arange(seq).unsqueeze(0)
    state = state.with_overrides(detect_layer=state.layer)  # single-layer MARS (two layers: test_pair_strategies)
    layer = state.layer
    with torch.no_grad():
        with capture_residuals([bb.layers[layer]], positions=all_pos) as plain:
            bb.model(**batch)
        with mars_steering(bb, state, SteerOptions(tau=-100.0, target_level=50.0), ["image"]) as rec:
            with capture_residuals([bb.layers[layer]], positions=all_pos) as steered:
                bb.model(**batch)
    a, b = plain.at_positions()[0, 0], steered.at_positions()[0, 0]  # [seq, d]
    assert torch.equal(a[:-1], b[:-1]), "positions before the last must be untouched"
    assert not torch.equal(a[-1], b[-1])
    assert rec.edited_calls == 1 and rec.position == seq - 1 and rec.seq_len == seq
    # under generate: the hook runs on every step but edits only the prefill call
    before = count_hooks(bb.model)
    with torch.no_grad(), mars_steering(bb, state, SteerOptions(tau=-100.0, target_level=50.0), ["image"]) as rec2:
        bb.model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert rec2.calls == 4 and rec2.edited_calls == 1
    assert count_hooks(bb.model) == before


def test_no_steer_reports_scores_and_changes_nothing(tiny_backbones, fitted, video_file):
    bb, state = tiny_backbones("qwen2_vl"), fitted("qwen2_vl")
    res = run_pairs(bb, state, _queries("qwen2_vl", video_file),
                    SteerOptions(steer=False, tau=-100.0, target_level=50.0),
                    max_new_tokens=4)
    for r in res:
        assert r.gate_open and r.displacement_norm == 0.0 and r.steered.text == r.unsteered.text


def test_recentring_changes_only_media_scores(tiny_backbones, fitted, video_file):
    bb, state = tiny_backbones("qwen2_vl"), fitted("qwen2_vl")
    qs = _queries("qwen2_vl", video_file)
    on = run_pairs(bb, state, qs, SteerOptions(steer=False), max_new_tokens=1)
    off = run_pairs(bb, state, qs, SteerOptions(steer=False, recenter=False), max_new_tokens=1)
    assert on[0].score_recentred == on[0].score_raw  # text: delta = 0
    for r_on, r_off in zip(on[1:], off[1:], strict=True):
        assert r_off.score_recentred == r_off.score_raw
        assert r_on.score_raw == pytest.approx(r_off.score_raw)
        assert r_on.score_recentred != pytest.approx(r_on.score_raw)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_state_round_trip_and_contents(arch, tiny_backbones, fitted, tmp_path):
    state = fitted(arch)
    state.save(tmp_path)
    again = MarsState.load(tmp_path)
    assert torch.equal(again.mu_plus, state.mu_plus) and torch.equal(again.offsets["image"], state.offsets["image"])
    assert again == state and again.fingerprint() == state.fingerprint()  # every field, tensors by value
    assert again.diagnostics.target_curve == state.diagnostics.target_curve
    assert again.diagnostics.layer_scores.to_dict() == state.diagnostics.layer_scores.to_dict()
    assert set(again.offsets) == {"image", "video"}  # frames-as-images models get a video offset too
    assert again.mu_plus.dtype == torch.float64 and again.mu_plus.shape == (4, 64)
    assert again.diagnostics.prompt_hashes["harmful"] and again.config == SMALL


def test_state_from_another_model_is_refused_clearly(tiny_backbones, fitted):
    state = fitted("qwen2_vl")
    with pytest.raises(ValueError, match="fitted on .*qwen2_vl.* loaded model is .*idefics3"):
        state.check_compatible(tiny_backbones("idefics3"))
    with pytest.raises(ValueError, match="fit a state"):
        run_pairs(tiny_backbones("idefics3"), state, [Query("hi")], SteerOptions())


def test_corrupt_state_files(tmp_path, fitted):
    with pytest.raises(ValueError, match="no MARS state"):
        MarsState.load(tmp_path)
    fitted("llava").save(tmp_path)
    (tmp_path / "mars_state.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        MarsState.load(tmp_path)


def test_behaviour_filter_uses_refused_prompts_only(tiny_backbones):
    """A judge that calls every other answer a refusal: the unsafe centroid must be the mean of exactly those."""
    from mars_viz.fit.calibrate import split_sets
    from mars_viz.model.activations import collect_activations

    bb = tiny_backbones("llava")
    calls = []

    def judge(texts):
        calls.append(len(texts))
        return [i % 2 == 0 for i in range(len(texts))]

    cfg = MarsConfig(**{**SMALL.to_dict(), "levels": SMALL.levels, "min_refused": 2})
    state = calibrate(bb, cfg, judge=judge)
    u_fit = split_sets(cfg)["u_fit"]
    acts = collect_activations(bb, [Query(p) for p in u_fit[::2]])
    torch.testing.assert_close(state.mu_plus, acts.double().mean(0), atol=1e-5, rtol=0)
    assert state.diagnostics.behaviour["unsafe_used"] == len(u_fit[::2]) and not state.diagnostics.behaviour["fallback"]


def test_behaviour_filter_fallback_is_reported(fitted):
    b = fitted("gemma3").diagnostics.behaviour  # a random model refuses nothing
    assert b["fallback"] and "uses all" in b["notes"][0] and b["unsafe_used"] == b["harmful_total"]


def test_layer_scores_have_one_value_per_layer(fitted):
    scores = fitted("qwen2_5_vl").diagnostics.layer_scores.to_dict()
    for name in ("separability", "consistency", "steerability", "combined", "misalignment_before",
                 "misalignment_after"):
        assert len(scores[name]) == 4
    assert max(scores["steerability"]) == pytest.approx(1.0) or max(scores["steerability"]) == 0.0


def test_calibration_is_cached(tiny_backbones, tmp_path, monkeypatch):
    bb = tiny_backbones("qwen2_vl")
    s1, folder, hit = calibrate_cached(bb, SMALL, cache_root=tmp_path)
    assert not hit and (folder / "mars_state.json").exists()

    def boom(*a, **k):
        raise AssertionError("refit although cached")

    monkeypatch.setattr("mars_viz.fit.cache.calibrate", boom)
    s2, folder2, hit2 = calibrate_cached(bb, SMALL, cache_root=tmp_path)
    assert hit2 and folder2 == folder and torch.equal(s1.mu_minus, s2.mu_minus)


def test_progress_stages_reported(tiny_backbones):
    seen = []
    calibrate(tiny_backbones("llava"), SMALL, progress=lambda stage, d, n: seen.append((stage, d, n)))
    stages = list(dict.fromkeys(s for s, _, _ in seen))
    assert stages[:2] == ["text activations", "behaviour filter"] and "target level" in stages
    assert all(d <= n for _, d, n in seen)


def test_input_beyond_target_level_is_not_pushed_further(tiny_backbones, fitted):
    """The trust region's outer wall: with s >= t*, the displacement is exactly zero even with the gate open."""
    bb, state = tiny_backbones("qwen2_vl"), fitted("qwen2_vl")
    res = run_pairs(bb, state, [Query("Tell me a story about a dragon")], SteerOptions(tau=-100.0, target_level=-50.0),
                    max_new_tokens=3)[0]
    assert res.gate_open and res.displacement_norm == 0.0 and res.steered.token_ids == res.unsteered.token_ids


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prefill_pair_equals_two_separate_generations(arch, tiny_backbones, fitted):
    """One shared prefill of prompt[:-1], then [unsteered, steered] rows, gives exactly the answers of two
    independent full generations (one plain, one with the steering hook)."""
    from mars_viz.steer.generate import generate_batch

    bb, state = tiny_backbones(arch), fitted(arch)
    opts = SteerOptions(tau=-100.0, target_level=50.0)
    queries = [Query("Tell me about the sea", images=tuple(neutral_images(1, seed=4, size=40))),
               Query("Name three birds, please", images=tuple(neutral_images(1, seed=5, size=40)))]
    state = state.with_overrides(detect_layer=state.layer)  # single-layer MARS (two layers: test_pair_strategies)
    pair = run_pairs(bb, state, queries, opts, max_new_tokens=6, strategy="batched")  # rows [q0, q0', q1, q1']
    single = run_pairs(bb, state, queries, opts, max_new_tokens=6, batch_size=1, strategy="gate_first")
    assert [r.steered.token_ids for r in single] == [r.steered.token_ids for r in pair]
    for q, res in zip(queries, pair, strict=True):
        plain = generate_batch(bb, build_batch(bb, [q]), 6)[0][0]
        with mars_steering(bb, state, opts, [q.modality]):
            steered = generate_batch(bb, build_batch(bb, [q]), 6)[0][0]
        assert res.unsteered.token_ids == plain
        assert res.steered.token_ids == steered


def test_gate_closed_single_query_decodes_once(tiny_backbones, fitted):
    """With the gate closed the steered answer is the unsteered one bit for bit, so it is not decoded again."""
    bb, state = tiny_backbones("qwen2_vl"), fitted("qwen2_vl")
    calls = {"n": 0}

    def count(*_):
        calls["n"] += 1

    handle = bb.model.register_forward_pre_hook(count)
    try:
        q = [Query("Tell me about the sea")]
        closed = run_pairs(bb, state, q, SteerOptions(tau=100.0), max_new_tokens=5, strategy="gate_first")[0]
        n_closed, calls["n"] = calls["n"], 0
        opened = run_pairs(bb, state, q, SteerOptions(tau=-100.0, target_level=50.0), max_new_tokens=5,
                           strategy="gate_first")[0]
        n_open = calls["n"]
    finally:
        handle.remove()
    assert closed.steered.token_ids == closed.unsteered.token_ids and closed.displacement_norm == 0
    assert opened.displacement_norm > 0
    assert n_open > n_closed  # the second decode happens only when MARS moves the input


def test_layer_override_says_t_star_was_calibrated_elsewhere(tiny_backbones, fitted):
    bb, state = tiny_backbones("qwen2_vl"), fitted("qwen2_vl")
    other = (state.layer + 1) % state.num_layers
    (same,) = run_pairs(bb, state, [Query("Hello there")], SteerOptions(), max_new_tokens=2)
    assert same.to_json()["target_level_layer"] == state.layer and "t_star_note" not in same.to_json()
    (moved,) = run_pairs(bb, state, [Query("Hello there")], SteerOptions(layer=other), max_new_tokens=2)
    note = moved.to_json()["t_star_note"]
    assert f"calibrated at layer {state.layer}" in note and f"pushes at layer {other}" in note
    (given,) = run_pairs(bb, state, [Query("Hello there")], SteerOptions(layer=other, target_level=2.0),
                         max_new_tokens=2)
    assert given.to_json()["target_level_layer"] is None and "t_star_note" not in given.to_json()
