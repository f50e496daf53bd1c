"""`run --json --maps` as a user runs it: a subprocess, one JSON object per prompt with the per-position scores and
the grids."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mars_viz.model.media import neutral_video
from mars_viz.model.videoio import write_video

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mars_viz", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_run_json_maps_image_and_video(tiny_dirs, fitted, tmp_path):
    state_dir = fitted("qwen2_vl").save(tmp_path / "state")
    img = tmp_path / "i.png"
    neutral_video(1, seed=2, size=64)[0].save(img)
    r = _run("run", "--model", tiny_dirs("qwen2_vl"), "--state", state_dir, "--prompt", "Describe this",
             "--image", img, "--max-new-tokens", "3", "--pair-strategy", "gate_first", "--json", "--maps")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[-1])
    m = row["maps"]
    assert m["layer"] == row["detect_layer"] and m["offset_source"] == "per-position"
    kinds = [p["kind"] for p in m["positions"]]
    (g,) = m["grids"]
    assert g["kind"] == "image" and g["rows"] * g["cols"] == kinds.count("image")
    placed = [p for row_ in g["positions"] for p in row_]
    assert all(m["positions"][p]["kind"] == "image" for p in placed)
    assert g["scores"][0][0] == m["positions"][placed[0]]["score"]
    # the last position is scored as the gate scores it (to float rounding of a batched product)
    assert abs(m["positions"][m["gate_at"]]["score"] - row["score_gate"]) < 1e-6

    video = write_video(tmp_path / "v.mp4", neutral_video(6, seed=4, size=64), fps=4)
    r = _run("run", "--model", tiny_dirs("qwen2_vl"), "--state", state_dir, "--prompt", "What happens?",
             "--video", video, "--frames", "4", "--max-new-tokens", "3", "--json", "--maps", "--no-steer")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])["maps"]
    assert [g["frames"] for g in m["grids"]] == [[0, 1], [2, 3]] and not m["exact"]
    # without --maps the row stays as it was
    r = _run("run", "--model", tiny_dirs("qwen2_vl"), "--state", state_dir, "--prompt", "hi", "--max-new-tokens",
             "2", "--json", "--pair-strategy", "doubled")
    assert r.returncode == 0 and "maps" not in json.loads(r.stdout.strip().splitlines()[-1])
