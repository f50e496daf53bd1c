"""Load a multimodal LLM and its processor, and find the decoder layers of its language model.

`Backbone` is the one narrow model interface the rest of mars_viz talks to: the model, its processor, the decoder
layer list (the residual stream MARS reads and steers), and a few facts (model id, `model_type`, layer count, hidden
size, whether it has a native video path) and its architecture's record in the registry (`Backbone.arch`, from
`archs`). It is an explicit object, never a module global.

Example:
    >>> bb = load_backbone("/tmp/tiny/qwen2_vl")          # doctest: +SKIP
    >>> bb.num_layers, bb.hidden_size, bb.video_mode      # doctest: +SKIP
    (4, 64, 'native')
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .archs import ARCHS, ArchSpec, arch_spec, at_path

__all__ = [
    "Backbone",
    "DECODER_LAYERS_FALLBACK",
    "NATIVE_VIDEO_TYPES",
    "ROWS_LAYOUT_TYPES",
    "load_backbone",
    "pick_device_dtype",
    "resolve_decoder_layers",
    "typographic_layout",
]

# Derived from the registry (`archs.ARCHS`, one record per model_type), kept for callers that import them.
# model_type -> dotted path of the language model's decoder layers, for when `get_decoder().layers` is not there.
DECODER_LAYERS_FALLBACK: dict[str, str] = {t: s.layers for t, s in ARCHS.items() if s.layers}
# Architectures whose processor takes `videos=`; the others get sampled frames as images.
NATIVE_VIDEO_TYPES = frozenset(t for t, s in ARCHS.items() if s.video == "native")
# Models that read typography best with its lines on their 28-px token rows (`media.typographic_rows`).
ROWS_LAYOUT_TYPES = frozenset(t for t, s in ARCHS.items() if s.typography == "rows")


@dataclass
class Backbone:
    """A loaded model plus what MARS needs to know about it."""

    model: nn.Module
    processor: Any  # a ProcessorMixin, or a tokenizer for text-only LLMs
    # decoder layers of the language model, in order, less those a text-only forward skips (`ArchSpec.skip_layers`:
    # Mllama's cross-attention layers), so layer i here is the i-th decoder layer that is not skipped
    layers: nn.ModuleList
    model_id: str
    model_type: str
    num_layers: int
    hidden_size: int
    modalities: tuple[str, ...]  # subset of ("text", "image", "video")
    video_mode: Literal["native", "frames", "none"]
    # (device, dtype) -> `timing.measure_pair_cost`'s result: measured once per placement, shown by `describe()`
    pair_costs: dict[tuple[str, str], dict] = field(default_factory=dict, repr=False, compare=False)
    # `inputs.instruction_offset`'s result, measured once from the chat template
    instruction_suffix: int | None = field(default=None, repr=False, compare=False)

    @property
    def arch(self) -> ArchSpec:
        """The registry's record for this model's type (`archs.arch_spec`): what mars_viz knows about it."""
        return arch_spec(self.model_type)

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def input_device(self) -> torch.device:
        """Where input ids go (the embedding's device; differs from layer devices under device_map='auto')."""
        weight = self.model.get_input_embeddings().weight
        if weight.device.type != "meta":
            return weight.device
        # Offloaded by accelerate (device_map with a CPU/disk share): the weight is a meta placeholder and the
        # hook that loads it on each call knows where inputs must go.
        emb = self.model.get_input_embeddings()
        for owner in (emb, self.model):
            hook_device = getattr(getattr(owner, "_hf_hook", None), "execution_device", None)
            if hook_device is not None:
                return torch.device(hook_device if not isinstance(hook_device, int) else f"cuda:{hook_device}")
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def is_demo(self) -> bool:
        """A tiny random model built by `demo_models` (its folder holds `mars_demo.json`): mechanics, no behaviour."""
        return (Path(self.model_id).expanduser() / "mars_demo.json").is_file()

    @property
    def display_name(self) -> str:
        """What to call the model in a header: its hub id or folder name, or plainly a random demo model."""
        if self.is_demo:
            return f"built-in tiny random {self.model_type} demo model"
        path = Path(self.model_id).expanduser()
        return path.name if path.is_dir() else self.model_id

    @property
    def placement(self) -> tuple[str, str]:
        """(device, dtype) as strings, e.g. ("cpu", "float32"): what a speed measurement depends on."""
        return str(self.input_device), str(self.dtype).removeprefix("torch.")

    @classmethod
    def from_model(cls, model: nn.Module, processor: Any, *, model_id: str | None = None,
                   layers_path: str | None = None) -> Backbone:
        """Wrap a model and processor you already have (e.g. from `from_pretrained`): what `load_backbone` does
        after loading. A multimodal model takes its processor; a text-only LLM takes its tokenizer. The model is
        put in eval mode with gradients off, and a tokenizer without a pad token pads with its end-of-sequence token.

        Example:
            >>> model = AutoModelForImageTextToText.from_pretrained(path)               # doctest: +SKIP
            >>> backbone = Backbone.from_model(model, AutoProcessor.from_pretrained(path))  # doctest: +SKIP
        """
        model.eval()
        model.requires_grad_(False)
        tok = getattr(processor, "tokenizer", processor)
        if getattr(tok, "pad_token", None) is None and getattr(tok, "eos_token", None) is not None:
            tok.pad_token = tok.eos_token
        layers = resolve_decoder_layers(model, layers_path)
        model_type = model.config.model_type
        if tok is not processor:  # a multimodal processor
            has_video = (arch_spec(model_type).video == "native"
                         and getattr(processor, "video_processor", None) is not None)
            video_mode: Literal["native", "frames", "none"] = "native" if has_video else "frames"
            modalities: tuple[str, ...] = ("text", "image", "video")
        else:
            video_mode, modalities = "none", ("text",)
        name = model_id or getattr(model.config, "_name_or_path", "") or model_type
        return cls(model=model, processor=processor, layers=layers, model_id=str(name), model_type=model_type,
                   num_layers=len(layers), hidden_size=int(model.config.get_text_config().hidden_size),
                   modalities=modalities, video_mode=video_mode)

    def describe(self) -> dict:
        device, dtype = self.placement
        out = {"model": self.model_id, "model_type": self.model_type, "num_layers": self.num_layers,
               "hidden_size": self.hidden_size, "modalities": list(self.modalities), "video_mode": self.video_mode,
               "dtype": dtype, "device": device}
        if self.placement in self.pair_costs:
            out["pair_strategy"] = dict(self.pair_costs[self.placement])
        return out


def pick_device_dtype(device: str | None = None, dtype: str | torch.dtype | None = None) -> tuple[str, torch.dtype]:
    """The device and dtype to load in: cuda > mps > cpu unless `device` names one; the dtype `dtype` names, else
    bf16 on a CUDA GPU that supports it, bf16 on MPS, float32 elsewhere.

    Why: the residual stream MARS reads grows large in the last layers, past fp16's 65504 on many models, so fp16
    would overflow to inf; bf16 keeps fp32's range. MPS has no float64 and no fp16-safe fallback, so it gets bf16
    too; MPS supports bf16 from macOS 14 on: on older macOS pass `dtype="float32"` (`--dtype float32`). A CUDA GPU
    without bf16 (before Ampere) and the CPU get float32 (CPU bf16 is usually slower without AMX).

    Example:
        >>> pick_device_dtype("cpu")
        ('cpu', torch.float32)
        >>> pick_device_dtype("mps")
        ('mps', torch.bfloat16)
    """
    if device is None or device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    if isinstance(dtype, str) and dtype != "auto":
        if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    if dtype is None or dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            dtype = torch.bfloat16
        elif device == "mps":
            dtype = torch.bfloat16
        else:
            dtype = torch.float32
    return device, dtype


def resolve_decoder_layers(model: nn.Module, override: str | None = None) -> nn.ModuleList:
    """The language model's decoder layers: `override` path, else `get_decoder().layers`, else the registry's path
    for the model type (`archs.ArchSpec.layers`).

    Never matches on module names alone: the vision tower has `layers` too. The list found is checked against the
    text config's `num_hidden_layers`. Layers that a text-only forward skips (`archs.ArchSpec.skip_layers`: Mllama's
    cross-attention layers, which run only when there are image tiles to attend to) are left out, since nothing
    could be read or steered there on every prompt: the result is then a new `nn.ModuleList` of the remaining layers,
    in order (its index i is the i-th kept decoder layer, not decoder layer i), else the model's own list.
    """
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    expected = getattr(text_cfg, "num_hidden_layers", None)
    model_type = getattr(cfg, "model_type", "?")
    candidates: list[tuple[str, Any]] = []
    if override:
        try:
            candidates.append((override, at_path(model, override)))
        except (AttributeError, IndexError) as e:
            raise ValueError(f"layer path {override!r} not found on {type(model).__name__}: {e}") from None
    else:
        if hasattr(model, "get_decoder"):
            dec = model.get_decoder()
            if dec is not None and dec is not model and isinstance(getattr(dec, "layers", None), nn.ModuleList):
                candidates.append(("get_decoder().layers", dec.layers))
        path = arch_spec(model_type).layers
        if path:
            try:
                candidates.append((path, at_path(model, path)))
            except (AttributeError, IndexError):
                pass
    skipped = arch_spec(model_type).skipped_layers(text_cfg)
    for _where, layers in candidates:
        if isinstance(layers, nn.ModuleList) and len(layers) > 0 and (expected is None or len(layers) == expected):
            if skipped:
                return nn.ModuleList([layer for i, layer in enumerate(layers) if i not in skipped])
            return layers
    raise ValueError(
        f"don't know how to find the decoder layers of {type(model).__name__} (model_type {model_type!r}); "
        f"tried {[w for w, _ in candidates] or 'nothing'}: pass layers_path='model.language_model.layers' "
        "(or --layers-path) pointing at the language model's nn.ModuleList of decoder layers")


def _friendly_load_error(model_id: str, err: Exception, *, device: str | None = None,
                         dtype: torch.dtype | None = None, device_map: str | dict | None = None) -> ValueError:
    """The ValueError that says why `model_id` did not load: out of memory (`memory.OutOfMemory`: the model's size,
    the device's free memory, what to change), a missing folder, or not found / not supported."""
    from .memory import OutOfMemory, is_out_of_memory, release_memory

    if is_out_of_memory(err):
        release_memory(err)  # the half-loaded weights in its frames, before measuring what is free
        return OutOfMemory.loading(model_id, err, device=device, dtype=dtype, device_map=device_map)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    looks_local = model_id.startswith(("/", ".", "~")) or os.path.sep in model_id and not model_id.count("/") == 1
    first = str(err).strip().splitlines()[0][:240] if str(err).strip() else type(err).__name__
    if looks_local and not Path(model_id).expanduser().exists():
        return ValueError(f"model folder {model_id!r} does not exist")
    hint = ("it is not in the local Hugging Face cache and the hub is unreachable (offline)" if offline else
            "it could not be downloaded or is not a supported model")
    return ValueError(f"could not load model {model_id!r}: {hint} [{type(err).__name__}: {first}]. Pass a local "
                      "folder, or build a tiny offline one: python -m mars_viz demo-model --arch qwen2_vl --out DIR")


def load_backbone(model_id: str | os.PathLike, *, device: str | None = None, dtype: str | torch.dtype | None = None,
                  device_map: str | dict | None = None, trust_remote_code: bool = False,
                  layers_path: str | None = None) -> Backbone:
    """Load a hub id or local folder through the Auto classes and wrap it in a `Backbone`.

    Multimodal models load with `AutoModelForImageTextToText` + `AutoProcessor`; a plain chat LLM falls back to
    `AutoModelForCausalLM` + `AutoTokenizer` (text only). `device_map="auto"` spreads a large model over devices
    (needs accelerate); hooks and capture work across devices. Raises ValueError with what to do on failure.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    model_id = str(model_id)
    dev, dt = pick_device_dtype(device, dtype)
    try:
        config = AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    except Exception as e:  # OSError, ValueError, HF hub errors
        raise _friendly_load_error(model_id, e) from None
    kwargs: dict[str, Any] = dict(dtype=dt, trust_remote_code=trust_remote_code)
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForImageTextToText.from_pretrained(model_id, config=config, **kwargs)
        processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "Unrecognized configuration class" not in str(e):
            raise _friendly_load_error(model_id, e, device=dev, dtype=dt, device_map=device_map) from None
        try:
            model = AutoModelForCausalLM.from_pretrained(model_id, config=config, **kwargs)
            processor = AutoTokenizer.from_pretrained(model_id, trust_remote_code=trust_remote_code)
        except Exception as e2:
            raise _friendly_load_error(model_id, e2, device=dev, dtype=dt, device_map=device_map) from None
    except Exception as e:
        raise _friendly_load_error(model_id, e, device=dev, dtype=dt, device_map=device_map) from None
    if device_map is None:
        try:
            model.to(dev)
        except (RuntimeError, MemoryError) as e:  # CUDA usually runs out here, as the weights move onto it
            from .memory import is_out_of_memory

            if not is_out_of_memory(e):
                raise
            del model  # the half-moved weights, before the message measures what is free
            raise _friendly_load_error(model_id, e, device=dev, dtype=dt, device_map=device_map) from None
    return Backbone.from_model(model, processor, model_id=model_id, layers_path=layers_path)


def typographic_layout(backbone: Backbone) -> str:
    """The layout its typographic images should use (`media.typographic_image(layout=...)`): "rows" for a model
    that reads token rows as lines (the reading graft), else "free"; the registry's `ArchSpec.typography`."""
    return backbone.arch.typography
