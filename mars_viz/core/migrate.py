"""Upgrading a saved state's JSON sidecar (`mars_state.json`) from an earlier format, one version at a time.

`MarsState.load` reads only the current format: it calls `migrate` first, so the knowledge of every earlier format
lives here and nowhere else. The tensors file (`mars_state.safetensors`) has kept its names in every format (a
format that renames or adds a required tensor needs a tensor step too).

Format history (what each version's JSON holds that the next one does not, and how it is upgraded):

version 1 (every state saved before format 2; the number was not bumped as the schema grew, so it comes in four
shapes, told apart by their keys):
  1a (the first fits) - the per-layer diagnostics lists (`balanced_accuracy`, `steerability_gain_nats`,
     `allowed_layers`, `misalignment_video_before/after`) sit under the untyped key "extra", not "diagnostics";
     no "detect_layer" (the gate reads at the push layer), no gate position; "config" also has the retired
     calibration keys "skip_first" and "skip_last" (the allowed layer range before separability chose it).
  1b (typed diagnostics) - "diagnostics" replaces "extra"; otherwise as 1a.
  1c (conditional MARS) - adds "detect_layer" (the layer the gate reads at t_post, its own tau); "config" gains
     "detect_layer" and loses "skip_first" / "skip_last"; later also "diagnostics.map_layer" (maps).
  1d (gate positions) - adds "gate_position" ("post" or "inst") and "inst_detect_layer" (the t_inst axis's layer;
     null without it; its tensors are "inst.*"); "config" gains "gate_position".
  In every shape "config" also carries the fit-time overrides "layer", "tau" (and, from 1c / 1d, "detect_layer",
  "gate_position"): `layer`, `detect_layer` and `gate_position` duplicate the state's own top-level values, and
  "config.tau" is a threshold that replaces the fitted one at the gate's site.
version 2 - each setting has one owner: "config" holds only calibration parameters (`MarsConfig`); the gate
  threshold override is the top-level "tau_override" (null: the fitted threshold); "diagnostics", "detect_layer",
  "gate_position" and "inst_detect_layer" are always present. The top-level "tau" stays what it was in 1: the
  threshold in effect (informational; the fitted ones are tensors, the override is "tau_override").

1 -> 2: "extra" merges into "diagnostics" (diagnostics win); a missing "detect_layer" is the push layer; a missing
"gate_position" is "post" and a missing "inst_detect_layer" null (the state reads at t_post and has no t_inst fit);
"config.tau" moves to "tau_override"; "config.layer", "config.detect_layer", "config.gate_position" and the retired
"config.skip_first" / "config.skip_last" are dropped. Keys that later shapes of 1 added to "diagnostics" (map_layer,
map_position, gate_choice, hr_labels) are left absent: `Diagnostics` gives them their "not measured" defaults.

Example:
    >>> migrate({"format_version": 1, "layer": 3, "config": {"tau": 0.4, "layer": 3}})["tau_override"]
    0.4
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

__all__ = ["FORMAT_VERSION", "migrate"]

FORMAT_VERSION = 2

# Keys a version-1 "config" held that are not calibration parameters (they are the state's) or no longer exist.
_V1_CONFIG_OVERRIDES = ("layer", "detect_layer", "gate_position")
_V1_CONFIG_RETIRED = ("skip_first", "skip_last")


def _v1_to_v2(meta: dict[str, Any]) -> dict[str, Any]:
    """Format 1 (any of its shapes 1a-1d) -> 2: one owner per setting, every key present."""
    meta["diagnostics"] = {**meta.pop("extra", {}), **meta.get("diagnostics", {})}
    meta.setdefault("detect_layer", meta["layer"])
    meta.setdefault("gate_position", "post")
    meta.setdefault("inst_detect_layer", None)
    config = dict(meta.get("config", {}))
    meta["tau_override"] = config.pop("tau", None)
    for key in _V1_CONFIG_OVERRIDES + _V1_CONFIG_RETIRED:
        config.pop(key, None)
    meta["config"] = config
    return meta


# version -> the step that upgrades a sidecar of that version to the next one
STEPS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _v1_to_v2}


def migrate(meta: dict[str, Any]) -> dict[str, Any]:
    """The sidecar `meta` upgraded to `FORMAT_VERSION`, step by step (a new dict; `meta` is left as it is).

    Raises ValueError for a format this version of mars_viz does not know (a newer one, or none)."""
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"state format {version!r} is not a MARS state format (expected 1..{FORMAT_VERSION}): "
                         "refit it")
    if version > FORMAT_VERSION:
        raise ValueError(f"state format {version} is newer than this mars_viz reads (up to {FORMAT_VERSION}): "
                         "upgrade mars_viz, or refit the state with this version")
    out = copy.deepcopy(meta)
    while version < FORMAT_VERSION:
        out = STEPS[version](out)
        version += 1
        out["format_version"] = version
    return out
