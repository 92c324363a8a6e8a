"""Copies between GPU and CPU memory that overlap the GPU's work (the tiled VAE's).

A tile's crop goes to the GPU through pinned staging (`to_device`), weights parked in CPU memory
go there asynchronously (`to_host`), and results bound for CPU memory are copied out through
pinned staging while the GPU computes the next one, then written on the CPU (`HostSink`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor's copy in pinned CPU memory (pageable when pinning fails), same strides.
    Pinned, the copy out is asynchronous and several times faster than into pageable memory
    (H200: 240 MB of decoder weights took 170 ms pageable), and so is the way back. The copy may
    still be running when this returns: the CPU must not read it before the stream is synchronised."""
    if not t.is_cuda:
        return t
    host = pinned_like(t)
    if host is None:
        return t.to("cpu")
    return host.copy_(t, non_blocking=True)  # stream-ordered: whatever reuses t's memory runs after


def pinned_like(t: torch.Tensor, layout: torch.memory_format = torch.preserve_format) -> torch.Tensor | None:
    """An empty pinned CPU tensor with t's shape and dtype, its strides (or dense in `layout`); None
    where no page-locked memory is to be had."""
    try:
        return torch.empty_like(t, device="cpu", pin_memory=True, memory_format=layout)
    except RuntimeError:
        return None


def to_device(src: torch.Tensor, device: torch.device, layout: torch.memory_format) -> torch.Tensor:
    """A CPU view `src` (a tile's crop) as a dense tensor in `layout` on `device`. To a GPU through
    a pinned staging copy, so the copy over is asynchronous (torch's pinned allocator keeps the
    staging block until that copy is done, then reuses it); else a plain copy."""
    stage = pinned_like(src, layout) if device.type == "cuda" else None
    if stage is None:
        stage = torch.empty_like(src, memory_format=layout)
    stage.copy_(src)
    return stage.to(device, non_blocking=True)


class HostSink:
    """Adds (or copies) results into their destinations. A CUDA result bound for CPU memory is
    copied asynchronously into pinned staging memory and written on the CPU only after the next
    result has been queued, so the copy and the CPU's work overlap the GPU's; at most two staging
    blocks are in use at a time (torch's pinned allocator reuses them)."""

    def __init__(self) -> None:
        self._pending: list[tuple[Callable[[torch.Tensor], None], torch.Tensor, torch.cuda.Event | None]] = []

    def add(self, dst: torch.Tensor, part: torch.Tensor, accumulate: bool = True) -> None:
        """`part` added to (or copied into) `dst`."""
        if part.device == dst.device:
            _write(dst, part, accumulate)
            return
        self.put(part, lambda staged: _write(dst, staged, accumulate), dst.device)

    def put(self, part: torch.Tensor, write: Callable[[torch.Tensor], None],
            device: torch.device | str = "cpu") -> None:
        """write(part on `device`), once it is there."""
        device = torch.device(device)
        if part.device == device:
            write(part)
            return
        event = None
        # without page-locked memory (or for other devices): a synchronous copy below
        staged = pinned_like(part) if part.is_cuda and device.type == "cpu" else None
        if staged is not None:
            staged.copy_(part, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            staged = part.to(device)
        self.flush()
        self._pending.append((write, staged, event))

    def flush(self) -> None:
        while self._pending:
            write, staged, event = self._pending.pop(0)
            if event is not None:
                event.synchronize()
            write(staged)


def _write(dst: torch.Tensor, src: torch.Tensor, accumulate: bool) -> None:
    if accumulate:
        dst.add_(src)
    else:
        dst.copy_(src)
