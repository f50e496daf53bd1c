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

__all__ = ["EditRecord", "ResidualCapture", "SequenceCapture", "capture_residuals", "capture_sequence", "count_hooks",
           "edit_position", "read_position"]


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


@dataclass
class SequenceCapture:
    """What `capture_sequence` recorded: every position of the first forward call, at a few layers."""

    layers: tuple[int, ...]
    _seq: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [batch, pos, d]

    def __getitem__(self, layer: int) -> torch.Tensor:
        """float32 `[batch, pos, d]` on CPU: the residual after `layer` at every position of the first call."""
        if layer not in self._seq:
            raise RuntimeError(f"no sequence captured at layer {layer}: did the forward pass run?")
        return self._seq[layer]

    def __contains__(self, layer: int) -> bool:
        return layer in self._seq


@contextlib.contextmanager
def capture_sequence(layers: Sequence[nn.Module], at: Sequence[int], rows: torch.Tensor | None = None
                     ) -> Iterator[SequenceCapture]:
    """Record the residual after each layer in `at` at *every* position (`resid_post.{l}`, `[batch, pos, d]`) of the
    first forward call only (the prefill), for the selected `rows` (bool `[batch]`, default all).

    T x d floats per layer and row, never T x L x d: what the per-position maps need. float32 copies on CPU; the
    handles are removed in `finally`.
    """
    cap = SequenceCapture(layers=tuple(int(i) % len(layers) for i in at))
    handles = []

    def make(i: int):
        def hook(_module, _args, output):
            if i in cap._seq:
                return None
            h = _hidden(output)  # [batch, pos, d]
            if rows is not None:
                h = h[rows.to(h.device)]
            cap._seq[i] = h.detach().to(device="cpu", dtype=torch.float32)
            return None

        return hook

    try:
        for i in dict.fromkeys(cap.layers):
            handles.append(layers[i].register_forward_hook(make(i)))
        yield cap
    finally:
        for h in handles:
            h.remove()


@dataclass
class EditRecord:
    """What `edit_position` did: how often the hook ran, where it wrote, and the size of each row's change."""

    calls: int = 0  # forward calls seen while the context was open
    edited_calls: int = 0  # calls that were edited (1: prefill only)
    position: int | None = None  # absolute position edited in the prefill sequence
    seq_len: int | None = None  # prefill length
    change_norm: torch.Tensor | None = None  # [batch] ||h' - h|| at the edited position
    info: dict = field(default_factory=dict)  # whatever the edit function reports (scores, gate, ...)


@contextlib.contextmanager
def edit_position(layer: nn.Module, edit: Callable[[torch.Tensor, dict], torch.Tensor],
                  position: int = -1, rows: torch.Tensor | None = None,
                  paused: Callable[[], bool] | None = None) -> Iterator[EditRecord]:
    """Replace the residual after `layer` at one prompt position, during the first forward call (prefill) only.

    `edit(h, info) -> h_new` receives the residual `[B', d]` at `position` for the selected `rows` (a bool mask
    `[batch]`, default all) and may write diagnostics into `info`. Every other position, every other row and every
    later call (decode steps) pass through untouched; the change still reaches later tokens through the KV cache.
    While `paused()` is true, calls pass through uncounted (a probe forward run inside the context, e.g.
    `steering.mars_steering` reading a later gate first). The handle is removed in `finally`.
    """
    rec = EditRecord()

    def hook(_module, _args, output):
        if paused is not None and paused():
            return None
        rec.calls += 1
        if rec.edited_calls:
            return None
        h = _hidden(output)  # [batch, pos, d]
        pos = int(position) % h.shape[1]
        sel = torch.ones(h.shape[0], dtype=torch.bool, device=h.device) if rows is None else rows.to(h.device)
        if not bool(sel.any()):
            rec.edited_calls += 1
            rec.position, rec.seq_len = pos, h.shape[1]
            rec.change_norm = torch.zeros(h.shape[0])
            return None
        old = h[sel, pos, :]  # [B', d]
        new = edit(old, rec.info).to(h.dtype)
        out = h.clone()
        out[sel, pos, :] = new
        norms = torch.zeros(h.shape[0], dtype=torch.float32)
        norms[sel.cpu()] = (new.float() - old.float()).norm(dim=-1).cpu()
        rec.edited_calls += 1
        rec.position, rec.seq_len, rec.change_norm = pos, h.shape[1], norms
        return _with_hidden(output, out)

    handle = layer.register_forward_hook(hook)
    try:
        yield rec
    finally:
        handle.remove()


@contextlib.contextmanager
def read_position(layer: nn.Module, read: Callable[[torch.Tensor], None], position: int = -1,
                  rows: torch.Tensor | None = None) -> Iterator[None]:
    """Call `read(h [B', d])` with the residual after `layer` at one prompt position of the selected `rows`, during
    the first forward call (prefill) only. Changes nothing; the handle is removed in `finally`."""
    done = False

    def hook(_module, _args, output):
        nonlocal done
        if done:
            return None
        done = True
        h = _hidden(output)  # [batch, pos, d]
        sel = torch.ones(h.shape[0], dtype=torch.bool, device=h.device) if rows is None else rows.to(h.device)
        read(h[sel, int(position) % h.shape[1], :].detach())
        return None

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
