"""The public API (`import mars_viz as mv`): the README's library example runs as written, on a tiny model; a model
the user loaded wraps like one we load; the steering context manager reads the gate wherever the state puts it."""

from __future__ import annotations

import doctest
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import mars_viz as mv

REPO = Path(__file__).resolve().parents[2]


def readme_example() -> str:
    """The python block of the README's "Use it as a library" section."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Use it as a library", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return block


def _run_doctest(source: str, globs: dict) -> doctest.TestResults:
    test = doctest.DocTestParser().get_doctest(source, globs, "README: Use it as a library", "README.md", 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    return runner.summarize(verbose=False)


def test_the_readme_library_example_runs_as_a_doctest(tiny_dirs):
    example = readme_example()
    assert "mv.steering(" in example and "mv.calibrate(" in example and "mv.score(" in example
    result = _run_doctest(example, {"MODEL": str(tiny_dirs("qwen2_vl"))})
    assert result.attempted >= 8 and result.failed == 0, result


def test_the_doctest_runner_reports_a_wrong_output():
    assert _run_doctest(">>> 1 + 1\n3\n", {}).failed == 1  # the runner above can fail


def test_from_model_wraps_a_model_the_user_loaded_like_load_backbone(tiny_dirs):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_dirs("llava_onevision")
    ours = mv.load_backbone(path, device="cpu")
    model = AutoModelForImageTextToText.from_pretrained(path)
    theirs = mv.Backbone.from_model(model, AutoProcessor.from_pretrained(path), model_id=str(path))
    assert theirs.describe() == ours.describe()
    assert not theirs.model.training and not any(p.requires_grad for p in theirs.model.parameters())
    assert [type(x).__name__ for x in theirs.layers] == [type(x).__name__ for x in ours.layers]


def test_row_modalities_reads_each_rows_media_tokens(tiny_backbones):
    backbone = tiny_backbones("qwen2_vl")
    frames = tuple(Image.new("RGB", (32, 32), c) for c in ("red", "blue"))
    batch = mv.build_batch(backbone, [mv.Query("a"), mv.Query("b", images=frames[:1]), mv.Query("c", video=frames)])
    assert mv.row_modalities(backbone, batch["input_ids"]) == ["text", "image", "video"]


def test_steering_needs_the_batch_or_the_modalities(tiny_backbones, fitted):
    with pytest.raises(ValueError, match="modality of each row"), mv.steering(tiny_backbones("qwen2_vl"),
                                                                             fitted("qwen2_vl")):
        pass


@pytest.mark.parametrize("where", ["before", "at", "after"])
def test_steering_reads_the_gate_before_the_push_wherever_it_sits(tiny_backbones, fitted, where):
    """detect < push, detect = push and detect > push: the gate the steered call acted on is the unsteered input's
    (read before any push), and an open gate moves the answer's first step. The gate is forced open (tau very low),
    so a gate read after the push would see the pushed residual and differ."""
    backbone, state = tiny_backbones("qwen2_vl"), fitted("qwen2_vl")
    push = 2
    detect = {"before": push - 1, "at": push, "after": push + 1}[where]
    image = Image.new("RGB", (64, 64), "red")
    batch = mv.build_batch(backbone, [mv.Query("How do I pick a lock?", images=(image,)), mv.Query("Hello.")])
    opts = dict(layer=push, detect_layer=detect, gate_position="post", tau=-1e6, strength=1.0)
    reading = mv.score(backbone, state, batch, **opts)
    assert (reading.layer, reading.position) == (detect, "post") and bool(reading.open.all())
    with mv.steering(backbone, state, batch, **opts) as rec:
        steered = backbone.model(**batch).logits[:, -1]
    torch.testing.assert_close(rec.info["s_gate"].double(), reading.s, rtol=1e-5, atol=1e-5)
    assert bool((rec.info["displacement_norm"] > 0).all())
    plain = backbone.model(**batch).logits[:, -1]
    assert not torch.allclose(steered, plain)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_an_installed_wheel_finds_its_data_and_runs_the_example_and_the_cli(tmp_path):
    """`pip install .` (no dependencies: this venv has them) into a folder, run from outside the checkout: the
    prompt sets come from the wheel's package data, and the README example, `demo-model` and `fit` run."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, cwd=tmp_path, timeout=600)
    assert (target / "mars_viz" / "assets" / "prompts" / "harmful.txt").is_file()
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "MARS_VIZ_CACHE": str(tmp_path / "c")}
    run = dict(cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    tiny = tmp_path / "tiny"
    out = subprocess.run([sys.executable, "-m", "mars_viz", "demo-model", "--arch", "qwen2_vl", "--out", str(tiny)],
                         **run)
    assert out.returncode == 0, out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-m", "mars_viz", "fit", "--model", str(tiny), "--out",
                          str(tmp_path / "state"), "--max-prompts", "12", "--k-neutral", "2"], **run)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "state" / "mars_state.json").is_file()
    script = "\n".join([
        "import doctest, mars_viz, sys",
        f"assert mars_viz.__file__.startswith({str(target)!r}), mars_viz.__file__",
        "from mars_viz.paths import ASSETS",
        "assert ASSETS == mars_viz.paths._HERE / 'assets', ASSETS",
        f"t = doctest.DocTestParser().get_doctest({readme_example()!r}, {{'MODEL': {str(tiny)!r}}}, 'r', 'r', 0)",
        "r = doctest.DocTestRunner(); r.run(t); sys.exit(1 if r.summarize().failed else 0)", ""])
    out = subprocess.run([sys.executable, "-c", script], **run)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
