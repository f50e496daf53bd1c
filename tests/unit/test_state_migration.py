"""Saved states of every earlier format load through `core.migrate`, and a newer format fails with a clear message.

Each test saves a current state from a tiny fit, rewrites its JSON sidecar (and, where that format had fewer, its
tensors) into an earlier shape exactly as `core/migrate.py` documents it, and checks what loads back.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mars_viz.core.migrate import FORMAT_VERSION, migrate
from mars_viz.core.state import STATE_JSON, STATE_TENSORS, MarsConfig, MarsState

TAU = 0.3125  # a threshold override, so that the move from config.tau to tau_override is checked


def to_1d(meta: dict, tensors: dict) -> None:
    """2 -> 1d (gate positions): format 1; the overrides sit in "config" (layer, detect_layer and gate_position
    None: not forced; tau the override) and there is no top-level "tau_override"."""
    meta["format_version"] = 1
    meta["config"].update(layer=None, detect_layer=None, gate_position=None, tau=meta.pop("tau_override"))


def to_1c(meta: dict, tensors: dict) -> None:
    """1d -> 1c (conditional MARS, with maps): no gate position (the gate reads at t_post) and no t_inst fit: no
    "gate_position", "inst_detect_layer", "config.gate_position", gate_choice / map_position / hr_labels diagnostics,
    and no "inst.*" or "hr_points" tensors."""
    to_1d(meta, tensors)
    for key in ("gate_position", "inst_detect_layer"):
        del meta[key]
    del meta["config"]["gate_position"]
    for key in ("gate_choice", "map_position", "hr_labels"):
        del meta["diagnostics"][key]
    for key in [k for k in tensors if k.startswith("inst.") or k == "hr_points"]:
        del tensors[key]


def to_1b(meta: dict, tensors: dict) -> None:
    """1c -> 1b (typed diagnostics, one layer): no "detect_layer" (the gate reads at the push layer), no maps
    ("map_layer", "map_cells.*", "map_tokens.*"), no per-layer gate error rates; "config" without the keys conditional
    MARS added (detect_layer, min_sep_frac, lookalike, lookalike_frac, map_neutral, surface checks) and with the
    retired skip_first / skip_last."""
    to_1c(meta, tensors)
    del meta["detect_layer"]
    for key in ("map_layer", "gate_fpr", "gate_fnr"):
        del meta["diagnostics"][key]
    for key in ("detect_layer", "min_sep_frac", "lookalike", "lookalike_frac", "map_neutral", "surface_check",
                "min_surface_agreement"):
        del meta["config"][key]
    meta["config"].update(skip_first=0.1, skip_last=0.2)
    for key in [k for k in tensors if k.startswith(("map_cells.", "map_tokens."))]:
        del tensors[key]


def to_1a(meta: dict, tensors: dict) -> None:
    """1b -> 1a (the first fits): the per-layer lists sit under the untyped "extra", and there is no "diagnostics"."""
    to_1b(meta, tensors)
    kept = ("balanced_accuracy", "steerability_gain_nats", "allowed_layers", "misalignment_video_before",
            "misalignment_video_after")
    diag = meta.pop("diagnostics")
    meta["extra"] = {k: diag[k] for k in kept if diag.get(k) is not None}


SHAPES = {"1d": to_1d, "1c": to_1c, "1b": to_1b, "1a": to_1a}


@pytest.fixture(scope="module")
def state(fitted) -> MarsState:
    """A tiny fit (video too: offsets of both modalities at both positions) with a threshold override."""
    return fitted("qwen2_vl").with_overrides(tau=TAU)


def rewrite(state: MarsState, folder: Path, shape: str) -> Path:
    """Save `state` and rewrite its files into format shape `shape`."""
    state.save(folder)
    meta = json.loads((folder / STATE_JSON).read_text())
    tensors = load_file(str(folder / STATE_TENSORS))
    SHAPES[shape](meta, tensors)
    (folder / STATE_JSON).write_text(json.dumps(meta))
    save_file(tensors, str(folder / STATE_TENSORS))
    return folder


def test_the_current_format_loads_unchanged_and_migrate_leaves_it_alone(state, tmp_path):
    meta = json.loads((state.save(tmp_path) / STATE_JSON).read_text())
    assert meta["format_version"] == FORMAT_VERSION == 2 and meta["tau_override"] == TAU
    assert not {"layer", "detect_layer", "tau", "gate_position"} & set(meta["config"])  # the state's, not the config's
    assert migrate(meta) == meta
    loaded = MarsState.load(tmp_path)
    assert loaded == state and loaded.tau == TAU and loaded.fingerprint() == state.fingerprint()


def test_format_1_with_positions_loads_as_the_same_state(state, tmp_path):
    loaded = MarsState.load(rewrite(state, tmp_path, "1d"))
    assert loaded == state  # every field, tensors by value: config.tau became tau_override
    assert loaded.tau_override == TAU and loaded.tau == TAU


def _same_fit(loaded: MarsState, state: MarsState) -> None:
    """What every format kept: the t_post fit, the push layer, t*, the config and the threshold override."""
    for name in ("mu_plus", "mu_minus", "taus"):
        assert torch.equal(getattr(loaded, name), getattr(state, name)), name
    assert loaded.offsets.keys() == state.offsets.keys() == {"image", "video"}
    assert all(torch.equal(loaded.offsets[m], state.offsets[m]) for m in state.offsets)
    assert (loaded.model_id, loaded.num_layers, loaded.hidden_size) == (state.model_id, state.num_layers,
                                                                         state.hidden_size)
    assert (loaded.layer, loaded.target_level) == (state.layer, state.target_level)
    assert loaded.config == state.config  # the keys an old config lacks take the defaults SMALL_CONFIG keeps
    assert loaded.tau_override == TAU and loaded.tau == TAU
    assert loaded.diagnostics.layer_scores.to_dict() == state.diagnostics.layer_scores.to_dict()
    assert loaded.diagnostics.target_curve == state.diagnostics.target_curve
    assert loaded.diagnostics.balanced_accuracy == state.diagnostics.balanced_accuracy
    assert loaded.diagnostics.allowed_layers == state.diagnostics.allowed_layers
    assert loaded.diagnostics.misalignment_video_before == state.diagnostics.misalignment_video_before


@pytest.mark.parametrize("shape", ["1c", "1b", "1a"])
def test_format_1_before_positions_reads_at_t_post(state, tmp_path, shape):
    loaded = MarsState.load(rewrite(state, tmp_path, shape))
    _same_fit(loaded, state)
    assert loaded.inst is None and loaded.gate_position == "post" and loaded.positions == ("post",)
    assert loaded.diagnostics.gate_choice == {} and loaded.diagnostics.hr_points is None
    # 1c kept its own gate layer; before it (1b, 1a) the gate read at the push layer
    assert loaded.detect_layer == (state.detect_layer if shape == "1c" else state.layer)
    if shape == "1c":
        assert loaded.diagnostics.map_layer == state.diagnostics.map_layer and loaded.diagnostics.map_cells
        assert loaded.diagnostics.gate_fpr == state.diagnostics.gate_fpr
    else:
        assert loaded.diagnostics.map_layer is None and not loaded.diagnostics.map_cells
        assert loaded.diagnostics.gate_fpr == []
    with pytest.raises(ValueError, match="no t_inst fit"):
        loaded.with_overrides(gate_position="inst")


def test_migrate_is_pure_and_drops_the_overrides_format_1_kept_in_its_config(state, tmp_path):
    state.save(tmp_path)
    meta = json.loads((tmp_path / STATE_JSON).read_text())
    to_1d(meta, {})
    meta["config"].update(layer=state.layer, detect_layer=state.gate_layer, gate_position=state.gate_position)
    before = copy.deepcopy(meta)
    out = migrate(meta)
    assert meta == before  # the input is left as it is
    assert out["format_version"] == FORMAT_VERSION and out["tau_override"] == TAU
    assert MarsConfig.from_dict(out["config"]) == state.config
    assert {k: out[k] for k in ("layer", "detect_layer", "gate_position")} == {
        "layer": state.layer, "detect_layer": state.detect_layer, "gate_position": state.gate_position}
    # a format-1 state without a threshold override has none
    meta["config"]["tau"] = None
    assert migrate(meta)["tau_override"] is None


def test_a_newer_or_missing_format_says_what_to_do(state, tmp_path):
    state.save(tmp_path)
    meta = json.loads((tmp_path / STATE_JSON).read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (tmp_path / STATE_JSON).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"state format {FORMAT_VERSION + 1} is newer than this mars_viz reads "
                                         rf"\(up to {FORMAT_VERSION}\): upgrade mars_viz"):
        MarsState.load(tmp_path)
    for bad in (None, 0, "2", True):
        with pytest.raises(ValueError, match="is not a MARS state format"):
            migrate({**meta, "format_version": bad})


def test_the_config_holds_only_calibration_parameters():
    for name in ("layer", "detect_layer", "tau", "gate_position"):
        assert name not in MarsConfig.__dataclass_fields__
    with pytest.raises(ValueError, match=r"unknown MarsConfig keys \['layer'\]"):
        MarsConfig.from_dict({"layer": 3})
