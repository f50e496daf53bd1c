"""The architecture registry (`mars_viz.model.archs`): one record per model_type, the only place that names types.

Its facts are checked against the tiny fixtures built from `demo_models.ARCHITECTURES` (decoder-layer paths, video
mode, temporal patch, where `rope_deltas` live), the README's "Supported models" table is checked to be the one it
generates, and no other module tests model types by name. The device/dtype default is checked against the README's
line in the same section.
"""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import mars_viz
from mars_viz.model import archs
from mars_viz.model.archs import ARCHS, arch_spec, at_path, markdown_table
from mars_viz.model.backbone import pick_device_dtype, resolve_decoder_layers
from mars_viz.model.demo_models import ARCHITECTURES

ROOT = Path(mars_viz.__file__).parent
README = ROOT.parent / "README.md"
# every type the tables before the registry covered (backbone.py's fallback and video tables)
TYPES = {"llava", "llava_next", "llava_next_video", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "mars_reader",
         "qwen3_vl", "idefics3", "smolvlm", "gemma3", "mistral3", "internvl", "qwen2", "llama"}


def test_registry_covers_every_type_and_is_keyed_by_its_records():
    assert TYPES <= set(ARCHS)
    assert all(key == spec.model_type and spec.known for key, spec in ARCHS.items())
    assert all(spec.layers for spec in ARCHS.values()), "every registered type names its decoder layers"


def test_unknown_type_gets_conservative_defaults():
    spec = arch_spec("some_new_vlm")
    assert not spec.known and spec.model_type == "some_new_vlm"
    assert (spec.layers, spec.video, spec.frame_multiple, spec.nested_images, spec.maps, spec.rope_deltas,
            spec.typography, spec.tiny) == ("", "frames", 1, False, "", (), "free", False)
    assert (spec.skip_layers, spec.text_format, spec.prefix_lm, spec.skipped_layers(object())) == ("", "", False,
                                                                                                   frozenset())


def test_frame_parity_only_where_a_video_token_spans_frames():
    for spec in ARCHS.values():
        assert spec.frame_multiple == (spec.temporal_patch if spec.even_frames else 1)
        if spec.even_frames:
            assert spec.video == "native" and spec.temporal_patch == 2
    assert {t for t, s in ARCHS.items() if s.even_frames} == {"qwen2_vl", "qwen2_5_vl", "mars_reader", "qwen3_vl"}


def test_module_doctest():
    assert doctest.testmod(archs).failed == 0


def test_at_path_walks_attributes_and_indices():
    seq = nn.Sequential(nn.Linear(2, 2), nn.ModuleList([nn.ReLU()]))
    assert at_path(seq, "") is seq and at_path(seq, "1.0") is seq[1][0]
    with pytest.raises(AttributeError):
        at_path(seq, "1.nope")


# ---- the registry against the tiny fixtures ------------------------------------------------------------------------

def test_every_fixture_is_registered_as_tested_and_only_those():
    untested = sorted(a for a in ARCHITECTURES if not arch_spec(a).tiny)
    assert not untested, f"demo_models builds {untested}: give them tiny=True in mars_viz/model/archs.py ARCHS"
    claimed = sorted(t for t, s in ARCHS.items() if s.tiny and t not in ARCHITECTURES)
    assert not claimed, f"ARCHS marks {claimed} tested, but demo_models.ARCHITECTURES builds no fixture for them"


@pytest.fixture(scope="module")
def fixture_models():
    """arch -> its tiny random model, built in memory (no save/load: the registry's facts are about the modules)."""
    cache: dict[str, nn.Module] = {}

    def get(arch: str) -> nn.Module:
        if arch not in cache:
            torch.manual_seed(0)
            cache[arch] = ARCHITECTURES[arch]()[0]
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_fixture_facts_match_the_record(arch, fixture_models, monkeypatch):
    model, spec = fixture_models(arch), arch_spec(arch)
    assert model.config.model_type == arch
    # the spec's path is the language model's layers, and resolve_decoder_layers finds them through it alone
    layers = at_path(model, spec.layers)
    assert layers is model.get_decoder().layers and len(layers) == model.config.get_text_config().num_hidden_layers
    monkeypatch.setattr(type(model), "get_decoder", lambda self: None)
    skipped = spec.skipped_layers(model.config.get_text_config())
    if skipped:  # left out (Mllama's cross-attention layers): the other layers, in order
        assert list(resolve_decoder_layers(model)) == [m for i, m in enumerate(layers) if i not in skipped]
        assert 0 < len(skipped) < len(layers)
    else:
        assert resolve_decoder_layers(model) is layers
    # rope_deltas: exactly the modules the record names hold them
    holders = {name for name, m in model.named_modules() if "rope_deltas" in vars(m)}
    assert holders == set(spec.rope_deltas)
    # a video token spans `temporal_patch` frames (the vision config's, where it has one)
    vc = getattr(model.config, "vision_config", None)
    assert int(getattr(vc, "temporal_patch_size", 1)) == spec.temporal_patch


# ---- no type tests outside the registry ----------------------------------------------------------------------------

def test_no_module_but_the_registry_tests_model_types():
    pattern = re.compile(r"model_type ==|hasattr\(.*rope")
    hits = [f"{path.relative_to(ROOT.parent)}:{i}: {line.strip()}"
            for path in sorted(ROOT.rglob("*.py")) if path != ROOT / "model" / "archs.py"
            for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, "ask mars_viz.model.archs.arch_spec(model_type) instead:\n" + "\n".join(hits)


# ---- the README's "Supported models" section ----------------------------------------------------------------------

def _section() -> str:
    text = README.read_text()
    return text[text.index("## Supported models"):text.index("\n## ", text.index("## Supported models") + 1)]


def test_readme_table_is_the_registrys():
    m = re.search(r"<!-- ARCHS:BEGIN[^>]*-->\n(.*?)\n<!-- ARCHS:END -->", _section(), re.S)
    assert m, "README 'Supported models' lost its ARCHS:BEGIN / ARCHS:END markers"
    assert m.group(1) == markdown_table(), ("README's table differs from the registry: paste the output of "
                                            "`python -m mars_viz.model.archs` between its ARCHS markers")


def test_markdown_table_has_one_row_per_type():
    rows = markdown_table().splitlines()[2:]
    assert [re.match(r"\| `([^`]+)` \|", r).group(1) for r in rows] == list(ARCHS)


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _readme_dtype(device: str) -> torch.dtype:
    line = " ".join(_section().split("Device and dtype:")[1].split("\n\n")[0].split())
    m = re.search(rf"(bf16|fp16|fp32) on {device}\b", line)
    assert m, f"README's 'Device and dtype' line names no dtype for {device}: {line}"
    return _DTYPES[m.group(1)]


def test_mps_default_dtype_is_the_readmes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device_dtype() == ("mps", _readme_dtype("MPS")) == ("mps", torch.bfloat16)
    assert pick_device_dtype("auto", "float32") == ("mps", torch.float32)  # what the README tells old macOS to pass
    assert "`--dtype float32`" in _section()


def test_cuda_and_cpu_default_dtypes(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert pick_device_dtype() == ("cuda", _readme_dtype("CUDA GPUs that support it")) == ("cuda", torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert pick_device_dtype() == ("cuda", torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device_dtype() == ("cpu", torch.float32)
