"""How a streamed block's tensors sit in memory (runtime/streaming.py's BlockStreamer moves them).

A block held in RAM is packed into one contiguous CPU buffer (`PackedBlock`), page-locked where
allowed (`pin_in_place`: exactly its size, not torch's power-of-two rounding), its parameters
views into it; a block whose tensors stay in a file (`DiskBlock`) knows only its layout in a slot
and reads itself from the source into a buffer when its slot is loaded. Both bind their tensors
to a GPU slot's views, in the same layout (`Entry`, `ALIGN`).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from wan_lite.loading.tensors import TensorSource
from wan_lite.runtime.refill import read_planned

log = logging.getLogger(__name__)

ALIGN = 256  # byte alignment of every tensor inside a packed block (vector loads, fp8 GEMMs)
PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class Entry:
    """One tensor of a block: where it lives in the module and in the packed buffer."""

    module: nn.Module
    name: str
    is_param: bool
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def view_of(buf: torch.Tensor, e: Entry) -> torch.Tensor:
    n = e.dtype.itemsize * int(torch.Size(e.shape).numel())
    return buf[e.offset : e.offset + n].view(e.dtype).view(e.shape)


def set_tensor(e: Entry, tensor: torch.Tensor) -> None:
    if e.is_param:
        # Swapping `.data` keeps the Parameter object (and anything holding it) valid.
        e.module._parameters[e.name].data = tensor
    else:
        e.module._buffers[e.name] = tensor


def block_tensors(block: nn.Module) -> list[tuple[nn.Module, str, bool, torch.Tensor]]:
    out = []
    for module in block.modules():
        for name, p in module._parameters.items():
            if p is not None:
                out.append((module, name, True, p.data))
        for name, b in module._buffers.items():
            if b is not None:
                out.append((module, name, False, b))
    return out


def page_aligned(nbytes: int) -> torch.Tensor:
    """A uint8 buffer starting on a page boundary and spanning whole pages of its own: CUDA locks
    whole pages, and two registered ranges may not share one (small buffers from the heap can)."""
    size = -(-nbytes // PAGE) * PAGE
    raw = torch.empty(size + PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % PAGE
    return raw[start : start + size]


def clear_cuda_error() -> None:
    """A failed CUDA runtime call stays the thread's "last error", which torch would report at the
    next kernel launch as if that kernel had failed; reading it once through libcudart resets it."""
    try:
        with open("/proc/self/maps") as fh:
            libs = {line.split()[-1] for line in fh if "libcudart.so" in line}
        for lib in libs:
            ctypes.CDLL(lib).cudaGetLastError()
    except OSError:  # cudart linked statically or /proc missing: nothing we can reset
        pass


def pin_in_place(buf: torch.Tensor) -> bool:
    """Page-lock `buf`'s memory where it is (cudaHostRegister). torch's pinned allocator rounds
    every request up to a power of two (a 700 MB A14B block would lock 1 GiB); registering an
    ordinary allocation locks exactly its size."""
    try:
        torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0))
        return True
    except (RuntimeError, AssertionError, AttributeError) as err:
        clear_cuda_error()
        log.warning("page-locking %.0f MB failed (%s); this block stays in pageable memory", buf.numel() / 1e6, err)
        return False


def unpin_memory(ptr: int) -> None:
    # Called by detach() (copies already finished) or when a streamer is collected without one:
    # then a prefetch may still be reading this memory, so wait for the device first.
    torch.cuda.synchronize()
    # The memory stays valid (pageable) for anything still viewing it; only the lock goes.
    torch.cuda.cudart().cudaHostUnregister(ptr)


def pin_budget(limit: int | None) -> int:
    """Bytes we allow ourselves to pin. Pinned pages cannot be swapped; pinning nearly all RAM
    stalls the whole machine, so by default we keep pinned memory to half of what is available."""
    if limit is not None:
        return limit
    try:
        import psutil

        return int(psutil.virtual_memory().available * 0.5)
    except ImportError:  # psutil is optional: without it, trust the allocator to fail cleanly
        return 1 << 62


class PackedBlock:
    """A block's tensors in one contiguous CPU buffer, and views of it per GPU slot."""

    def __init__(self, index: int, block: nn.Module, pin: bool) -> None:
        self.index = index
        entries, offset, seen = [], 0, {}
        items = block_tensors(block)
        for module, name, is_param, t in items:
            if t.device.type == "meta":
                raise RuntimeError(f"block {index} has a tensor on meta ({name}); fill the model before streaming")
            key = id(t)
            if key not in seen:  # a tensor shared by two modules is stored once
                seen[key] = offset
                offset = align(offset + t.numel() * t.element_size())
            entries.append(Entry(module, name, is_param, seen[key], t.dtype, tuple(t.shape)))
        self.entries: list[Entry] = entries
        self.nbytes = max(offset, ALIGN)
        region = page_aligned(self.nbytes) if pin else torch.empty(self.nbytes, dtype=torch.uint8)
        self.pinned = pin and pin_in_place(region)
        self.cpu = region[: self.nbytes]
        # Unlock before the memory can be freed, however this object goes away (a locked range
        # that is freed stays locked until the process exits).
        self.unpin_memory = weakref.finalize(self, unpin_memory, self.cpu.data_ptr()) if self.pinned else None
        if self.unpin_memory is not None:
            self.unpin_memory.atexit = False  # at exit the OS unlocks everything; CUDA may be gone by then
        for (_m, _n, _p, t), e in zip(items, entries, strict=True):
            view_of(self.cpu, e).copy_(t)
        self.cpu_views = [view_of(self.cpu, e) for e in entries]
        self.bind(self.cpu_views)
        self.slot_views: dict[int, list[torch.Tensor]] = {}

    def bind(self, views: list[torch.Tensor]) -> None:
        for e, v in zip(self.entries, views, strict=True):
            set_tensor(e, v)

    def unpin(self) -> None:
        if self.unpin_memory is not None:
            self.unpin_memory()
        self.pinned = False


class DiskBlock:
    """A streamed block whose tensors stay in a file: its layout in a slot (as PackedBlock's),
    and how to read it from the source into a buffer. Its tensors are `meta` between uses."""

    pinned = False

    def __init__(self, index: int, block: nn.Module, names: dict[int, str], source: TensorSource,
                 plan: list) -> None:
        self.index = index
        entries, offset, seen = [], 0, {}
        self.by_name: dict[str, Entry] = {}
        for module, name, is_param, t in block_tensors(block):
            key = id(t)
            if key not in seen:
                seen[key] = offset
                offset = align(offset + t.numel() * t.element_size())
            e = Entry(module, name, is_param, seen[key], t.dtype, tuple(t.shape))
            entries.append(e)
            self.by_name[names[id(module)] + name] = e
        self.entries: list[Entry] = entries
        self.nbytes = max(offset, ALIGN)
        self.cpu_views = [torch.empty(e.shape, dtype=e.dtype, device="meta") for e in entries]
        self.bind(self.cpu_views)
        self.slot_views: dict[int, list[torch.Tensor]] = {}
        self.source, self.plan = source, plan

    def read_into(self, buf: torch.Tensor) -> None:
        """Read this block's tensors from the source into `buf` (a slot or a staging buffer)."""
        for name, t in read_planned(self.plan, self.source):
            view_of(buf, self.by_name[name]).copy_(t)

    def bind(self, views: list[torch.Tensor]) -> None:
        # new Parameter objects: a meta parameter's `.data` cannot take a real tensor (nor back)
        for e, v in zip(self.entries, views, strict=True):
            if e.is_param:
                e.module._parameters[e.name] = nn.Parameter(v, requires_grad=False)
            else:
                e.module._buffers[e.name] = v

    def unpin(self) -> None:
        pass
