"""The CLI as a user runs it: a subprocess, JSON on stdout, one `error:` line on failure, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


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
    (["run", "--model", "m", "--state", "s", "--prompt", "x", "--pair-strategy", "fast"], "invalid choice"),
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


@pytest.fixture(scope="module")
def fitted_dir(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    r = run("fit", "--model", tiny_dirs("qwen2_vl"), "--out", out, "--max-prompts", "12", "--k-neutral", "3",
            "--neutral-prompts", "3", "--curve-prompts", "3", "--steer-prompts", "3", "--filter-tokens", "3",
            "--levels", "1,2", "--quiet")
    assert r.returncode == 0, r.stderr
    return out


def test_fit_writes_state_with_documented_fields(fitted_dir):
    meta = json.loads((fitted_dir / "mars_state.json").read_text())
    assert (fitted_dir / "mars_state.safetensors").stat().st_size > 0
    for key in ("model", "num_layers", "hidden_size", "layer", "tau", "target_level", "target_curve", "layer_scores"):
        assert key in meta
    assert set(meta["target_curve"]) == {"1", "2"}
    for name in ("separability", "consistency", "steerability", "combined", "misalignment_before",
                 "misalignment_after"):
        assert len(meta["layer_scores"][name]) == meta["num_layers"] == 4


def test_run_json_gate_forced_open(tiny_dirs, fitted_dir, tmp_path):
    img = tmp_path / "i.png"
    from mars_viz.model.media import neutral_images

    neutral_images(1, size=40)[0].save(img)
    r = run("run", "--model", tiny_dirs("qwen2_vl"), "--state", fitted_dir, "--prompt", "Describe this",
            "--image", img, "--tau", "-100", "--target-level", "50", "--max-new-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("prompt", "layer", "modality", "score_raw", "score_recentred", "tau", "gate_open",
                "displacement_norm", "unsteered", "steered"):
        assert key in row
    assert row["modality"] == "image" and row["gate_open"] and row["displacement_norm"] > 0 and row["tau"] == -100
    assert set(row["steered"]) >= {"text", "refused"}


def test_run_prompts_file_one_line_each_and_gate_closed_identical(tiny_dirs, fitted_dir, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("Tell me a joke\nWhat is two plus two?\nName a colour\n")
    r = run("run", "--model", tiny_dirs("qwen2_vl"), "--state", fitted_dir, "--prompts", f, "--tau", "100",
            "--max-new-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert [x["prompt"] for x in rows] == ["Tell me a joke", "What is two plus two?", "Name a colour"]
    assert all(not x["gate_open"] and x["steered"]["text"] == x["unsteered"]["text"] for x in rows)


def test_run_with_state_from_another_model_is_an_error_line(tiny_dirs, fitted_dir):
    r = run("run", "--model", tiny_dirs("llava"), "--state", fitted_dir, "--prompt", "hi", "--json")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: this MARS state was fitted on")


def test_run_pair_strategies_give_the_same_rows(tiny_dirs, fitted_dir, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("Tell me a joke\nWhat is two plus two, exactly?\n")
    rows = {}
    for strategy in ("gate_first", "batched", "doubled"):
        r = run("run", "--model", tiny_dirs("qwen2_vl"), "--state", fitted_dir, "--prompts", f, "--tau", "-100",
                "--target-level", "50", "--max-new-tokens", "4", "--json", "--pair-strategy", strategy)
        assert r.returncode == 0, r.stderr
        rows[strategy] = [json.loads(line) for line in r.stdout.strip().splitlines()]
    def answers(strategy):  # scores differ in the last float digits between batch shapes; the answers may not
        return [(x["gate_open"], x["unsteered"], x["steered"]) for x in rows[strategy]]

    assert answers("gate_first") == answers("batched") == answers("doubled") and len(rows["batched"]) == 2
    for a, b in zip(rows["gate_first"], rows["doubled"], strict=True):
        assert a["score_recentred"] == pytest.approx(b["score_recentred"], rel=1e-4)
