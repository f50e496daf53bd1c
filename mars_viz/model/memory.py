"""Out of memory, told as such: how big the model is, how much the device has free, and what to do.

A model that does not fit used to read "could not be downloaded or is not a supported model". `is_out_of_memory`
recognises the ways torch says it (CUDA's `torch.OutOfMemoryError`, the CPU allocator's RuntimeError, MPS, a plain
`MemoryError`), and `OutOfMemory` carries a message with the numbers: the model's size estimated from its checkpoint
(`model_bytes`), the device's free memory (`free_memory`), and the options that make it fit.

Example:
    >>> try:                                                                    # doctest: +SKIP
    ...     backbone = load_backbone("llava-hf/llava-1.5-7b-hf", device="cuda")
    ... except OutOfMemory as e:
    ...     print(e)
    out of memory loading llava-hf/llava-1.5-7b-hf on cuda (float32): it needs about 26.3 GiB (7.06 G parameters in
    its checkpoint x 4 bytes) and cuda has 7.6 GiB free. To fit it: --dtype bfloat16 (half the memory of ...
    >>> format_bytes(3 * 2**30), format_bytes(None)
    ('3.0 GiB', 'unknown')
"""

from __future__ import annotations

import errno
import gc
import json
import os
import struct
from pathlib import Path

import torch
from torch import nn

__all__ = ["OutOfMemory", "as_out_of_memory", "checkpoint_bytes", "checkpoint_params", "config_params",
           "format_bytes", "free_memory", "is_out_of_memory", "model_bytes", "model_folder", "release_memory",
           "weights_bytes"]

# What torch's allocators say when they give up (lower case): CUDA / MPS, the CPU allocator on Linux and Windows,
# cuBLAS failing to allocate its workspace.
_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory",
             "cublas_status_alloc_failed")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_TIP_RUNNING = ("use a shorter prompt, a smaller image, fewer video frames or fewer new tokens; or load the model with "
                "less memory")


class OutOfMemory(ValueError, MemoryError):
    """The model, or one input's activations, did not fit in the device's memory.

    A ValueError like every load failure `load_backbone` reports (its message says what to do, so the CLI prints it
    as one `error:` line and the dashboard as an error), and a MemoryError. `needed` and `free` are bytes (None when
    unknown); `device` is where it did not fit.
    """

    def __init__(self, message: str, *, device: str | None = None, needed: int | None = None,
                 free: int | None = None):
        super().__init__(message)
        self.device, self.needed, self.free = device, needed, free

    @classmethod
    def loading(cls, model_id: str, err: BaseException, *, device: str | torch.device | None = None,
                dtype: torch.dtype | None = None, device_map: str | dict | None = None) -> OutOfMemory:
        """The error for a model whose weights did not fit while loading `model_id` on `device` in `dtype`."""
        dev = str(device) if device is not None else _oom_device(err)
        needed, how = model_bytes(model_id, dtype)
        free = free_memory(dev)
        size = f"about {format_bytes(needed)} ({how})" if needed is not None else "an unknown amount (no checkpoint "\
            "files found to measure)"
        where = dev or "the device"
        dt = f" ({_dtype_name(dtype)}{f', device_map {device_map}' if device_map is not None else ''})" \
            if dtype is not None else ""
        return cls(f"out of memory loading {model_id} on {where}{dt}: it needs {size} and {where} has "
                   f"{format_bytes(free)} free. To fit it: {_advice(dtype, device_map)} [{_first_line(err)}]",
                   device=dev, needed=needed, free=free)

    @classmethod
    def running(cls, err: BaseException, device: str | torch.device | None = None, *,
                weights: int | None = None) -> OutOfMemory:
        """The error for an input whose activations did not fit while the model ran on `device` (weights: bytes)."""
        dev = str(device) if device is not None else _oom_device(err)
        free = free_memory(dev)
        held = f"; the model's weights take {format_bytes(weights)}" if weights is not None else ""
        where = dev or "the device"
        return cls(f"out of memory running the model on {where} ({format_bytes(free)} free now{held}): "
                   f"{_TIP_RUNNING}: {_advice(None, None)} [{_first_line(err)}]", device=dev, free=free)


def is_out_of_memory(err: BaseException) -> bool:
    """True when `err`, or an error it was raised from or while handling, says memory ran out.

    >>> is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    True
    >>> is_out_of_memory(KeyError("layer"))
    False
    """
    cuda_oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, MemoryError) or (cuda_oom is not None and isinstance(e, cuda_oom)):
            return True
        if isinstance(e, OSError) and e.errno == errno.ENOMEM:
            return True
        if isinstance(e, RuntimeError) and any(t in str(e).lower() for t in _OOM_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


def as_out_of_memory(err: BaseException, device: str | torch.device | None = None) -> OutOfMemory:
    """`err` itself when it is an `OutOfMemory` already, else `OutOfMemory.running(err, device)`."""
    return err if isinstance(err, OutOfMemory) else OutOfMemory.running(err, device)


def release_memory(err: BaseException | None = None) -> None:
    """Let go of what an out-of-memory error still holds, then return freed blocks to the device.

    The frames in `err`'s traceback (and in those it was raised from) keep their locals alive: half-loaded weights,
    a batch's activations. They are dropped, garbage is collected, and torch's CUDA cache is emptied (a no-op
    while CUDA was never used), so the next request, or the next model, gets the memory back.
    """
    seen: set[int] = set()
    e = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        e.__traceback__ = None
        e = e.__cause__ or e.__context__
    gc.collect()
    torch.cuda.empty_cache()


def free_memory(device: str | torch.device | None) -> int | None:
    """Bytes free on `device` now: CUDA's `mem_get_info`, the CPU's MemAvailable (Linux); None when unknown."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        return None
    if dev.type == "cpu":
        return _mem_available()
    if dev.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(dev.index)[0])
        except Exception:  # noqa: BLE001 - no driver, or a CUDA context broken by the error: just say unknown
            return None
    return None


def _mem_available(meminfo: str | os.PathLike = "/proc/meminfo") -> int | None:
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def model_folder(model_id: str | os.PathLike) -> Path | None:
    """The local folder of `model_id`: itself if it is a folder, else its snapshot in the Hugging Face cache (no
    download); None when neither is there."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(str(model_id), "config.json")
    except Exception:  # noqa: BLE001 - not a valid repo id, or no cache: nothing to measure
        return None
    return Path(config).parent if isinstance(config, str) else None


def _weight_files(folder: Path) -> list[Path]:
    safetensors = sorted(folder.glob("*.safetensors"))
    return safetensors or sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())


def checkpoint_bytes(folder: str | os.PathLike) -> int:
    """Total size of the weight files in `folder` (safetensors if any, else .bin/.pt/.pth/.ckpt), as stored."""
    folder = Path(folder)
    return sum(p.stat().st_size for p in _weight_files(folder)) if folder.is_dir() else 0


def checkpoint_params(folder: str | os.PathLike) -> int | None:
    """Parameter count from the safetensors headers in `folder` (a few KB read per file); None without them."""
    files = sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []
    if not files:
        return None
    total = 0
    try:
        for path in files:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > 100 * 2**20:
                    return None
                header = json.loads(f.read(n))
            for name, info in header.items():
                if name != "__metadata__":
                    numel = 1
                    for s in info["shape"]:
                        numel *= int(s)
                    total += numel
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None
    return total


def config_params(config: dict) -> int | None:
    """A rough parameter count from a config.json dict: the language model's embeddings, attention and MLP blocks,
    plus a vision tower's blocks when the config has one. Used only when there is no checkpoint to read."""
    text = config.get("text_config") or config.get("llm_config") or config
    h, layers = text.get("hidden_size"), text.get("num_hidden_layers")
    if not (h and layers):
        return None
    inter = text.get("intermediate_size") or 4 * h
    vocab = text.get("vocab_size") or config.get("vocab_size") or 0
    tied = text.get("tie_word_embeddings", config.get("tie_word_embeddings", False))
    total = vocab * h * (1 if tied else 2) + layers * (4 * h * h + 3 * h * inter)
    vision = config.get("vision_config") or {}
    vh = vision.get("hidden_size") or vision.get("embed_dim")
    vlayers = vision.get("num_hidden_layers") or vision.get("depth")
    if vh and vlayers:
        vinter = vision.get("intermediate_size") or int(vh * vision.get("mlp_ratio", 4))
        total += vlayers * (4 * vh * vh + 2 * vh * vinter)
    return int(total)


def model_bytes(model_id: str | os.PathLike, dtype: torch.dtype | None = None) -> tuple[int | None, str]:
    """(bytes the weights take in `dtype`, how that was estimated). In order: the safetensors headers' parameter
    count x the dtype's size, the checkpoint files' size as stored, the config's parameter estimate x the dtype's
    size; (None, "unknown") when the model is neither a local folder nor in the Hugging Face cache."""
    folder = model_folder(model_id)
    if folder is None:
        return None, "unknown"
    size = torch.tensor([], dtype=dtype).element_size() if dtype is not None else None
    params = checkpoint_params(folder)
    if params is not None and size is not None:
        return params * size, f"{_count(params)} parameters in its checkpoint x {size} bytes"
    stored = checkpoint_bytes(folder)
    if stored:
        return stored, "its checkpoint files' size"
    try:
        params = config_params(json.loads((folder / "config.json").read_text()))
    except (OSError, ValueError):
        params = None
    if params is not None and size is not None:
        return params * size, f"{_count(params)} parameters estimated from its config x {size} bytes"
    return None, "unknown"


def weights_bytes(model: nn.Module) -> int:
    """Bytes the loaded model's parameters and buffers take."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def format_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB"


def _count(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.")


def _advice(dtype: torch.dtype | None, device_map: str | dict | None) -> str:
    """What makes a model fit, skipping what it already uses."""
    tips = []
    if dtype is None or torch.tensor([], dtype=dtype).element_size() >= 4:
        tips.append("--dtype bfloat16 (half the memory of float32)")
    if device_map is None:
        tips.append("--device-map auto (spreads the layers over the GPUs and the CPU; needs accelerate)")
    tips.append("a smaller model")
    return (", ".join(tips[:-1]) + ", or " if len(tips) > 1 else "") + tips[-1] + "."


def _oom_device(err: BaseException) -> str | None:
    """Where an error says memory ran out, when the caller does not know: CUDA, MPS or the CPU."""
    cuda_oom = getattr(torch, "OutOfMemoryError", None)
    text = str(err)
    if (cuda_oom is not None and isinstance(err, cuda_oom)) or "CUDA" in text:
        return "cuda"
    if "MPS" in text:
        return "mps"
    if isinstance(err, MemoryError) or "CPUAllocator" in text or "can't allocate memory" in text:
        return "cpu"
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    first = text.splitlines()[0][:240] if text else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__
