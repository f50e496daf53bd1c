"""The CLI as a user runs it: a subprocess, JSON on stdout, one `error:` line on failure, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mars_viz", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_demo_model_builds_a_loadable_folder(tmp_path):
    out = tmp_path / "m"
    r = run("demo-model", "--arch", "gemma3", "--out", out)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["arch"] == "gemma3"
    assert (out / "config.json").exists() and (out / "processor_config.json").exists()


def test_capture_prints_per_layer_norms(tiny_dirs, tmp_path, video_file):
    r = run("capture", "--model", tiny_dirs("qwen2_vl"), "--prompt", "What happens?", "--video", video_file,
            "--frames", "4")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["modality"] == "video" and out["num_layers"] == 4 and len(out["residual_norm"]) == 4
    assert all(x > 0 for x in out["residual_norm"])


@pytest.mark.parametrize("args, match", [
    (["demo-model", "--arch", "nope", "--out", "x"], "invalid choice"),
    (["capture", "--model", "/does/not/exist", "--prompt", "x"], "does not exist"),
])
def test_bad_arguments_give_one_error_line(args, match):
    r = run(*args)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and match in last and "Traceback" not in r.stderr


def test_corrupt_image_is_an_error_line(tiny_dirs, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"definitely not a png")
    r = run("capture", "--model", tiny_dirs("llava"), "--prompt", "x", "--image", bad)
    assert r.returncode == 1 and r.stderr.startswith("error:") and "not an image" in r.stderr
    assert "Traceback" not in r.stderr
