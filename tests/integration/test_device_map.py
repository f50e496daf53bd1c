"""`device_map="auto"` with accelerate's big-model dispatch, on this CPU: a tiny model really split between the CPU
and the disk (some decoder layers offloaded: their weights sit on the meta device and accelerate's hooks load them
for each forward), wrapped with `Backbone.from_model`. Capture, steering (gate open and closed, the gate read at the
push layer and after it, where `mars_steering` probes on a copy of the KV cache) and every pair strategy give the
same tokens, and residuals allclose to, the unsplit model. `load_backbone(device_map="auto")` works here too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mars_viz.model.activations import collect_activations, forward_sites
from mars_viz.model.backbone import Backbone, load_backbone
from mars_viz.model.hooks import capture_sequence
from mars_viz.model.inputs import Query, build_batch
from mars_viz.model.media import neutral_images
from mars_viz.steer.generate import generate_batch
from mars_viz.steer.pair import PAIR_STRATEGIES, run_pairs
from mars_viz.steer.steering import SteerOptions, mars_steering

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SPLIT_ARCHS = ["qwen2_vl", "llava"]
N_TOKENS = 6
OPEN = SteerOptions(tau=-1e9, target_level=50.0)  # gate forced open, t* far out: every input is moved
CLOSED = SteerOptions(tau=1e9)
GATES = {"open": OPEN, "closed": CLOSED}
# Where the push and the gate sit on the split: the state's own choice, and overrides placed by the split. A gate
# read after the push layer makes steering probe the first call (on a copy of its KV cache) before steering it.
SITES = ("fitted", "cpu-push_later-disk-gate", "disk-push_later-disk-gate", "disk-push_cpu-gate-at-inst")
ATOL = 1e-5


def _image_query(seed: int = 4, prompt: str = "Tell me about the sea") -> Query:
    return Query(prompt, images=tuple(neutral_images(1, seed=seed, size=40)))


QUERIES = [_image_query(4), _image_query(5, "Name three birds, please, and say why")]


def _layer_places(model, backbone: Backbone) -> list[str]:
    """Where `hf_device_map` puts each decoder layer ("cpu" or "disk"), matching the most specific entry."""
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for layer in backbone.layers:
        name = names[id(layer)]
        key = max((k for k in model.hf_device_map if k == "" or name == k or name.startswith(k + ".")), key=len)
        out.append(str(model.hf_device_map[key]))
    return out


def _load_split(folder: Path, offload: Path):
    """The tiny model dispatched with a CPU budget small enough that some decoder layers go to disk and big
    enough that the embeddings and at least one layer stay on the CPU (tried from a few fractions of its size)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    tried = []
    for frac in (0.8, 0.7, 0.9, 0.6, 0.5):
        model = AutoModelForImageTextToText.from_pretrained(
            folder, dtype=torch.float32, device_map="auto", max_memory={"cpu": int(frac * size)},
            offload_folder=str(offload / f"{frac}"))
        bb = Backbone.from_model(model, AutoProcessor.from_pretrained(folder), model_id=str(folder))
        places = _layer_places(model, bb)
        tried.append((frac, places))
        if "cpu" in places and "disk" in places and str(bb.input_device) == "cpu":
            return bb
    raise AssertionError(f"no CPU budget split {folder.name}'s decoder layers between cpu and disk: {tried}")


@pytest.fixture(scope="module")
def split(tiny_dirs, tmp_path_factory):
    """arch -> Backbone over the CPU/disk-split model (cached per module)."""
    cache: dict = {}

    def get(arch: str) -> Backbone:
        if arch not in cache:
            cache[arch] = _load_split(tiny_dirs(arch), tmp_path_factory.mktemp(f"offload-{arch}"))
        return cache[arch]

    return get


def _offloaded(bb: Backbone) -> list[int]:
    return [i for i, place in enumerate(_layer_places(bb.model, bb)) if place == "disk"]


def _ours(bb: Backbone) -> int:
    """Torch hooks on the model that are not transformers' own lazily installed output-capturing hooks (accelerate's
    hooks replace `forward` instead, so they are never counted): none may stay behind."""
    return sum(1 for m in bb.model.modules() for d in (m._forward_hooks, m._forward_pre_hooks) for fn in d.values()
               if "output_capturing" not in getattr(fn, "__qualname__", ""))


def _site(bb: Backbone, state, site: str):
    """`state` with the push and gate layers of `site`, placed on `bb`'s split."""
    places = _layer_places(bb.model, bb)
    cpu = [i for i, p in enumerate(places) if p == "cpu"]
    disk = [i for i, p in enumerate(places) if p == "disk"]
    if site == "fitted":
        return state
    if site == "cpu-push_later-disk-gate":
        return state.with_overrides(layer=cpu[-1], detect_layer=disk[-1], gate_position="post")
    if site == "disk-push_later-disk-gate":
        if len(disk) < 2:
            pytest.skip("one decoder layer on disk")
        return state.with_overrides(layer=disk[0], detect_layer=disk[-1], gate_position="post")
    assert site == "disk-push_cpu-gate-at-inst"
    return state.with_overrides(layer=disk[-1], detect_layer=cpu[0], gate_position="inst")


def _on_meta(bb: Backbone, i: int) -> bool:
    return all(p.device.type == "meta" for p in bb.layers[i].parameters())


@pytest.mark.parametrize("arch", SPLIT_ARCHS)
def test_the_model_is_really_split(arch, split, tiny_backbones):
    bb, ref = split(arch), tiny_backbones(arch)
    disk = _offloaded(bb)
    assert disk and len(disk) < bb.num_layers, bb.model.hf_device_map
    assert "disk" in bb.model.hf_device_map.values() and "cpu" in bb.model.hf_device_map.values()
    for i in range(bb.num_layers):
        hook = getattr(bb.layers[i], "_hf_hook", None)
        assert hook is not None, f"layer {i} has no accelerate hook"
        assert str(hook.execution_device) == "cpu"
        assert _on_meta(bb, i) == (i in disk)  # offloaded weights wait on the meta device between forwards
        # the weights of an offloaded layer are loaded, module by module, by hooks that offload them again
        assert any(getattr(getattr(m, "_hf_hook", None), "offload", False) for m in bb.layers[i].modules()) == \
            (i in disk)
    assert (bb.num_layers, bb.hidden_size, bb.model_type, bb.placement) == \
        (ref.num_layers, ref.hidden_size, ref.model_type, ref.placement)


@pytest.mark.parametrize("arch", SPLIT_ARCHS)
def test_capture_matches_the_unsplit_model(arch, split, tiny_backbones):
    bb, ref = split(arch), tiny_backbones(arch)
    for queries in (QUERIES, [Query("hi"), Query("how are you today?")]):  # left padding, image and text
        got, want = forward_sites(bb, queries), forward_sites(ref, queries)
        assert got.keys() == want.keys()
        for site in got:
            assert got[site].shape == (len(queries), bb.num_layers, bb.hidden_size)
            torch.testing.assert_close(got[site], want[site], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(collect_activations(bb, QUERIES, batch_size=1),
                               collect_activations(ref, QUERIES, batch_size=2), atol=ATOL, rtol=1e-5)
    at = [0, bb.num_layers - 1]
    seqs = []
    for b in (bb, ref):
        with capture_sequence(b.layers, at) as cap, torch.inference_mode():
            b.model(**build_batch(b, QUERIES[:1]), use_cache=False)
        seqs.append(cap)
    for i in at:
        torch.testing.assert_close(seqs[0][i], seqs[1][i], atol=ATOL, rtol=1e-5)
    assert _ours(bb) == 0
    assert all(_on_meta(bb, i) for i in _offloaded(bb))  # accelerate put the offloaded weights back


def _steered(bb: Backbone, state, options: SteerOptions, q: Query):
    with mars_steering(bb, state, options, [q.modality]) as rec:
        tokens = generate_batch(bb, build_batch(bb, [q]), N_TOKENS)[0][0]
    return tokens, rec


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("arch", SPLIT_ARCHS)
def test_steering_matches_the_unsplit_model(arch, gate, site, split, tiny_backbones, fitted):
    bb, ref = split(arch), tiny_backbones(arch)
    state = _site(bb, fitted(arch), site)
    q = _image_query()
    got, rec = _steered(bb, state, GATES[gate], q)
    want, ref_rec = _steered(ref, state, GATES[gate], q)
    assert got == want
    assert rec.edited_calls == ref_rec.edited_calls == 1
    assert bool(rec.info["gate_open"][0]) == (gate == "open")
    for key in ("s_raw", "s_gate", "planned_norm", "displacement_norm"):
        torch.testing.assert_close(rec.info[key], ref_rec.info[key], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rec.change_norm, ref_rec.change_norm, atol=1e-4, rtol=1e-4)
    plain = generate_batch(ref, build_batch(ref, [q]), N_TOKENS)[0][0]
    assert (got == plain) == (gate == "closed")  # the tiny models all answer differently when pushed
    assert _ours(bb) == 0
    assert all(_on_meta(bb, i) for i in _offloaded(bb))


def _pairs(bb: Backbone, state, options: SteerOptions, strategy: str):
    return [(r.unsteered.token_ids, r.steered.token_ids, r.gate_open, r.score_gate, r.displacement_norm)
            for r in run_pairs(bb, state, QUERIES, options, max_new_tokens=N_TOKENS, strategy=strategy)]


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("strategy", PAIR_STRATEGIES)
@pytest.mark.parametrize("arch", SPLIT_ARCHS)
def test_pair_strategies_match_the_unsplit_model(arch, strategy, site, split, tiny_backbones, fitted):
    bb, ref = split(arch), tiny_backbones(arch)
    state = _site(bb, fitted(arch), site)
    for gate, options in GATES.items():
        got, want = _pairs(bb, state, options, strategy), _pairs(ref, state, options, strategy)
        for g, w in zip(got, want, strict=True):
            assert g[:3] == w[:3], (gate, g, w)
            assert g[3:] == pytest.approx(w[3:], rel=1e-4, abs=1e-4)
            assert g[2] == (gate == "open")
            if gate == "closed":
                assert g[0] == g[1]
    assert _ours(bb) == 0
    assert all(_on_meta(bb, i) for i in _offloaded(bb))


@pytest.mark.parametrize("arch", SPLIT_ARCHS)
def test_load_backbone_with_device_map_auto(arch, tiny_dirs, tiny_backbones, fitted):
    """No split on this CPU (everything fits): transformers places the whole model on the CPU without dispatching
    it (no accelerate hooks, no `hf_device_map`), and it answers as the plainly loaded one."""
    bb, ref = load_backbone(tiny_dirs(arch), device_map="auto"), tiny_backbones(arch)
    assert getattr(bb.model, "hf_device_map", {"": "cpu"}) == {"": "cpu"} and bb.placement == ref.placement
    assert all(p.device.type == "cpu" for p in bb.model.parameters())
    got, want = forward_sites(bb, QUERIES), forward_sites(ref, QUERIES)
    for site in got:
        torch.testing.assert_close(got[site], want[site], atol=ATOL, rtol=1e-5)
    state = fitted(arch)
    assert [p[:3] for p in _pairs(bb, state, OPEN, "gate_first")] == \
        [p[:3] for p in _pairs(ref, state, OPEN, "gate_first")]


@pytest.mark.parametrize("arch", SPLIT_ARCHS)
def test_embeddings_offloaded_too(arch, tiny_dirs, tiny_backbones, tmp_path):
    """A CPU budget below the embeddings: the whole model waits on disk (`{"": "disk"}`) and runs on the CPU."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = tiny_dirs(arch)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, device_map="auto",
                                                        max_memory={"cpu": 1000}, offload_folder=str(tmp_path))
    assert set(model.hf_device_map.values()) == {"disk"}
    bb, ref = Backbone.from_model(model, AutoProcessor.from_pretrained(folder), model_id=str(folder)), \
        tiny_backbones(arch)
    assert bb.input_device == torch.device("cpu")
    got, want = forward_sites(bb, QUERIES), forward_sites(ref, QUERIES)
    for site in got:
        torch.testing.assert_close(got[site], want[site], atol=ATOL, rtol=1e-5)
    assert generate_batch(bb, build_batch(bb, QUERIES), N_TOKENS) == \
        generate_batch(ref, build_batch(ref, QUERIES), N_TOKENS)
