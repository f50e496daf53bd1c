"""Forward hooks on decoder layers, only ever inside context managers that remove them in `finally`.

Hook site names (TransformerLens style): `resid_post.{l}` is the output of decoder layer `l`, i.e. the residual
stream after that layer, shape `[batch, pos, d_model]`. Capture keeps the last prompt position (and optionally given
positions) of the *first* forward call only, so it works unchanged under `generate()` (the first call is prefill).

Example:
    >>> with capture_residuals(backbone.layers) as cap:      # doctest: +SKIP
    ...     backbone.model(**batch)
    >>> cap.last().shape                                      # [batch, layers, d_model]   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["ResidualCapture", "capture_residuals", "count_hooks", "hook_name", "layer_output_hook"]


def hook_name(layer: int) -> str:
    return f"resid_post.{layer}"


def count_hooks(module: nn.Module) -> int:
    """Forward and pre-forward hooks registered anywhere under `module` (for leak tests)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def _hidden(output):
    """Decoder layers return a tensor (transformers v5) or a tuple whose first item is the hidden state."""
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output, hidden: torch.Tensor):
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


@contextlib.contextmanager
def layer_output_hook(layer: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Call `fn(hidden)` on a layer's output hidden state [batch, pos, d]; a returned tensor replaces it.

    The handle is removed in `finally`, even when the forward raises.
    """

    def hook(_module, _args, output):
        new = fn(_hidden(output))
        return None if new is None else _with_hidden(output, new)

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class ResidualCapture:
    """What `capture_residuals` recorded: per layer, the last position and optional extra positions."""

    num_layers: int
    _last: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [batch, d]
    _positions: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [batch, P, d]

    def last(self) -> torch.Tensor:
        """float32 `[batch, layers, d]` on CPU: the residual after every layer at the last prompt position."""
        missing = [i for i in range(self.num_layers) if i not in self._last]
        if missing:
            raise RuntimeError(f"no activations captured for layers {missing}: did the forward pass run?")
        return torch.stack([self._last[i] for i in range(self.num_layers)], dim=1)

    def at_positions(self) -> torch.Tensor:
        """float32 `[batch, layers, P, d]` at the positions given to `capture_residuals`."""
        if not self._positions:
            raise RuntimeError("no positions were requested")
        return torch.stack([self._positions[i] for i in range(self.num_layers)], dim=1)

    def __getitem__(self, key: str | int) -> torch.Tensor:
        """`cap["resid_post.3"]`, `cap[3]` or `cap[-1]`: one layer's last-position residual `[batch, d]`."""
        if isinstance(key, str):
            if not key.startswith("resid_post."):
                raise KeyError(f"unknown hook site {key!r}; sites are resid_post.<layer>")
            key = int(key.split(".", 1)[1])
        idx = key % self.num_layers
        return self._last[idx]


@contextlib.contextmanager
def capture_residuals(layers: Sequence[nn.Module], positions: torch.Tensor | None = None,
                      first_call_only: bool = True) -> Iterator[ResidualCapture]:
    """Record the residual stream after each layer at the last position (and at `positions`, `[batch, P]` indices).

    Records float32 copies on CPU, so it works when layers sit on different devices (device_map='auto').
    With `first_call_only`, later calls (decode steps under `generate`) are ignored.
    """
    cap = ResidualCapture(num_layers=len(layers))
    handles = []

    def make(i: int):
        def hook(_module, _args, output):
            if first_call_only and i in cap._last:
                return None
            h = _hidden(output)  # [batch, pos, d]
            cap._last[i] = h[:, -1, :].detach().to(device="cpu", dtype=torch.float32)
            if positions is not None:
                idx = positions.to(h.device).unsqueeze(-1).expand(-1, -1, h.shape[-1])  # [batch, P, d]
                cap._positions[i] = torch.gather(h, 1, idx).detach().to(device="cpu", dtype=torch.float32)
            return None

        return hook

    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_hook(make(i)))
        yield cap
    finally:
        for h in handles:
            h.remove()
