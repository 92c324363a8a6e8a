"""Block streaming: keep transformer blocks in CPU memory and copy each to the GPU just before use.

`BlockStreamer.attach(model, device, resident, prefetch, pinned)` works on any module with a block
list (`WanDiT.blocks`, the umT5 encoder's `encoder.block`), from outside, with forward hooks:

- the first `resident` blocks and everything outside the block list move to `device` for good;
- every other block is packed into one contiguous CPU buffer (pinned when allowed and RAM allows,
  pageable otherwise) holding its tensors in their current dtypes (bf16, int8 + scales, ...); the
  block's parameters and buffers become views into that buffer, so no RAM is duplicated;
- a ring of `prefetch + 1` GPU slots, each as large as the largest streamed block, receives the
  buffers on a side CUDA stream `prefetch` blocks ahead of use. Each slot has two events:
  `copied` (recorded on the copy stream after the copy; the compute stream waits on it before the
  block runs) and `free` (recorded on the compute stream after the block ran; the copy stream waits
  on it before overwriting the slot). Nothing synchronises the host.

With `source` (a TensorSource of the model's exact tensors: the converted-weights cache, or a
checkpoint already in the runtime format) the streamed blocks are not kept in RAM at all: they
stay on `meta` and each is read from the memory-mapped file when its slot is loaded (on CUDA by
one reader thread into a page-locked staging buffer per slot, `prefetch` blocks ahead, then
copied on the side stream); the parts outside the blocks and the resident blocks are read from
the source block by block straight to the device. RAM then holds the staging buffers only.

On a CPU device the same code runs without streams or events (slots are plain CPU buffers), so
tests can check streamed == resident bit for bit.

The blocks' layouts in RAM and in a file are packed_blocks.py's (`PackedBlock`, `DiskBlock`).

`move_expert(model, "gpu" | "ram" | "disk")` moves a whole model (one A14B expert) between
places; "disk" drops every tensor (meta) and re-fills it from its TensorSource on demand.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from wan_lite.loading.tensors import TensorSource
from wan_lite.runtime.embedding_rows import can_read_rows, rows_on_demand
from wan_lite.runtime.packed_blocks import (
    DiskBlock,
    PackedBlock,
    block_tensors,
    page_aligned,
    pin_budget,
    pin_in_place,
    unpin_memory,
    view_of,
)
from wan_lite.runtime.quant import find_block_list, matches
from wan_lite.runtime.refill import read_plan, refill_like

log = logging.getLogger(__name__)

_GIB = 1024**3
# transformers' UMT5EncoderModel: the token embedding (256k x 4096, 2 GB in bf16) is only looked
# up, 512 rows per prompt; it stays in RAM and the lookup runs on the CPU.
T5_HOST_MODULES = ("shared", "encoder.embed_tokens")


class BlockStreamer:
    """Streams the blocks of one model; see the module docstring. Use `attach` to create."""

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.device = torch.device("cpu")
        self.resident = 0
        self.prefetch = 1
        self._packed: list[PackedBlock] = []
        self._slots: list[torch.Tensor] = []
        self._owner: list[int] = []  # streamed position held (or being copied) in each slot, -1 none
        self._slot_of: dict[int, int] = {}
        self._copied: list[torch.cuda.Event | None] = []
        self._free: list[torch.cuda.Event | None] = []
        self._copy_stream: torch.cuda.Stream | None = None
        self._bound: tuple[int, int] | None = None  # (position, slot) whose params point at a slot
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._undo: list[Callable[[], None]] = []  # embedding_rows.rows_on_demand's
        self.source: TensorSource | None = None  # streamed blocks read from this file (not kept in RAM)
        self._staging: list[torch.Tensor] = []  # page-locked, one per slot (CUDA with a source)
        self._staging_pins: list[weakref.finalize] = []
        self._reader: ThreadPoolExecutor | None = None
        self._pending: dict[int, Future] = {}  # slot -> its read-and-copy, not yet waited for

    # -------------------------------------------------------------------------------- set-up

    @classmethod
    def attach(
        cls,
        model: nn.Module,
        device: torch.device | str,
        resident: int = 0,
        prefetch: int = 1,
        pinned: bool = True,
        pin_limit: int | None = None,
        host_modules: tuple[str, ...] = (),
        source: TensorSource | None = None,
        key_map: Callable[[str], str] | None = None,
    ) -> BlockStreamer:
        """Stream `model`'s blocks to `device`, keeping the first `resident` blocks there.

        prefetch: how many blocks ahead are copied (>= 1); the GPU holds prefetch + 1 slots.
        pinned: page-lock the CPU copies (faster, asynchronous transfers); falls back to pageable
        memory block by block when pinning fails or would exceed `pin_limit` bytes (default: half
        of the available RAM).
        host_modules: name patterns of modules outside the blocks that stay in host memory and run
        there, inputs moved to the CPU and outputs back (umT5's 2 GB token embedding:
        `T5_HOST_MODULES`); everything else outside the blocks moves to `device`.
        source, key_map: stream the blocks from this file instead of RAM (module docstring);
        tensors of the model still on `meta` (an expert waiting on disk) are read from it.
        """
        if prefetch < 1:
            raise ValueError("prefetch must be >= 1")
        detach_streamer(model)
        self = cls()
        try:
            self.source = source
            self._setup(model, torch.device(device), resident, prefetch, pinned, pin_limit, host_modules, key_map)
        except BaseException:
            self.detach()  # no half-attached model: hooks removed, blocks left as valid CPU tensors
            raise
        _ATTACHED[model] = weakref.ref(self)
        log.info("%s", self.summary())
        return self

    def _setup(self, model: nn.Module, device: torch.device, resident: int, prefetch: int, pinned: bool,
               pin_limit: int | None, host_modules: tuple[str, ...],
               key_map: Callable[[str], str] | None = None) -> None:
        self.model, self.device = model, device
        prefix, blocks = find_block_list(model)
        block_ids = {id(m) for b in blocks for m in b.modules()}
        named_host = [(n, m) for n, m in model.named_modules()
                      if n and matches(n, host_modules) and id(m) not in block_ids]
        host = list({id(m): m for _n, m in named_host}.values())  # umT5's embedding has two names
        if self.source is not None:  # what waits on disk outside the streamed blocks is read now,
            # except a token embedding on the host: its lookups read their rows from the file
            on_file = []
            for n, m in named_host:
                key = key_map(f"{n}.weight") if key_map else f"{n}.weight"
                if all(m is not o for o in on_file) and can_read_rows(m, self.source, key):
                    self._undo.append(rows_on_demand(m, self.source, key))
                    on_file.append(m)
            skip = [n for n, t in model.state_dict(keep_vars=True).items()
                    if any(t is o.weight for o in on_file)]
            fill_from_source(model, self.source, key_map, blocks=range(min(resident, len(blocks))), skip=skip)
        self.resident = max(0, min(resident, len(blocks)))
        self.prefetch = prefetch
        host_ids = {id(sub) for m in host for sub in m.modules()}
        for m in host:
            if "forward" not in m.__dict__:  # one read row by row stays on meta
                m.to("cpu")
            self._handles.append(m.register_forward_pre_hook(self._inputs_to_host, with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._output_to_device))
        # Everything else outside the block list is small next to the blocks (time and text
        # embeddings, head): it lives on the device for the whole run.
        for module in model.modules():
            if id(module) not in block_ids | host_ids and not isinstance(module, nn.ModuleList):
                for _n, p in module.named_parameters(recurse=False):
                    p.data = p.data.to(self.device)
                for n, b in list(module._buffers.items()):
                    if b is not None:
                        module._buffers[n] = b.to(self.device)
        for block in blocks[: self.resident]:
            block.to(self.device)
        streamed = list(blocks[self.resident :])
        use_pin = pinned and torch.cuda.is_available() and self.device.type == "cuda"
        budget = pin_budget(pin_limit) if use_pin else 0
        if self.source is not None:
            names = {id(m): (f"{n}." if n else "") for n, m in model.named_modules()}
            for i, block in enumerate(streamed):
                idx = self.resident + i
                block_names = [n for n in model.state_dict(keep_vars=True) if n.startswith(f"{prefix}.{idx}.")]
                plan = read_plan(model, self.source, key_map=key_map, names=block_names)
                block.to("meta")  # a copy in RAM is dropped: the file is the copy
                self._packed.append(DiskBlock(idx, block, names, self.source, plan))
            trim_host_memory(collect=False)
        for i, block in enumerate(streamed if self.source is None else []):
            # Pack from CPU: a block still on the GPU is first brought back to host memory.
            block.to("cpu")
            size = sum(t.numel() * t.element_size() for *_, t in block_tensors(block))
            pin = use_pin and size <= budget
            packed = PackedBlock(self.resident + i, block, pin)
            budget -= packed.nbytes if packed.pinned else 0
            self._packed.append(packed)
            trim_host_memory(collect=False)  # the block's original tensors are free now
        if self._packed:
            n_slots = min(prefetch + 1, len(self._packed))
            slot_bytes = max(p.nbytes for p in self._packed)
            self._slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(n_slots)]
            self._owner = [-1] * n_slots
            if self.source is not None and self.device.type == "cuda":
                # page-locked staging: the reader thread fills it while the GPU runs other blocks
                for _ in range(n_slots):
                    stage = page_aligned(slot_bytes)
                    if use_pin and pin_in_place(stage):
                        fin = weakref.finalize(stage, unpin_memory, stage.data_ptr())
                        fin.atexit = False
                        self._staging_pins.append(fin)
                    self._staging.append(stage)
                self._reader = ThreadPoolExecutor(1, thread_name_prefix="wan_lite-disk-reader")
            if self.device.type == "cuda":
                self._copy_stream = torch.cuda.Stream(self.device)
                # A streamer collected without detach() may leave a prefetch writing into a slot
                # that the allocator is about to reuse: finish the side stream first.
                weakref.finalize(self, self._copy_stream.synchronize).atexit = False
                self._copied = [torch.cuda.Event() for _ in range(n_slots)]
                self._free = [torch.cuda.Event() for _ in range(n_slots)]
            else:
                self._copied = [None] * n_slots
                self._free = [None] * n_slots
            for pos, block in enumerate(streamed):
                self._handles.append(block.register_forward_pre_hook(self._make_pre(pos)))
                self._handles.append(block.register_forward_hook(self._make_post(pos)))
            # Start the first copies now so that they overlap the work before the first block.
            for pos in range(n_slots):
                self._load(pos, pos)

    @staticmethod
    def _inputs_to_host(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        def host(v: object) -> object:
            return v.cpu() if isinstance(v, torch.Tensor) else v

        return tuple(host(a) for a in args), {k: host(v) for k, v in kwargs.items()}

    def _output_to_device(self, _m: nn.Module, _args: tuple, out: object) -> object:
        return out.to(self.device) if isinstance(out, torch.Tensor) else out

    def summary(self) -> str:
        streamed = sum(p.nbytes for p in self._packed)
        pinned = sum(p.nbytes for p in self._packed if p.pinned)
        slots = sum(s.numel() for s in self._slots)
        where = (f"from {self.source.describe()}, {sum(s.numel() for s in self._staging) / _GIB:.2f} GiB staging"
                 if self.source is not None else f"{streamed / _GIB:.2f} GiB in RAM, {pinned / _GIB:.2f} GiB pinned")
        return (f"block streaming on {self.device}: {self.resident} resident, {len(self._packed)} streamed "
                f"({where}), "
                f"{len(self._slots)} slots ({slots / _GIB:.2f} GiB), prefetch {self.prefetch}")

    @property
    def slot_bytes(self) -> int:
        return sum(s.numel() for s in self._slots)

    @property
    def streamed_bytes(self) -> int:
        return sum(p.nbytes for p in self._packed)

    @property
    def pinned_blocks(self) -> int:
        return sum(p.pinned for p in self._packed)

    def detach(self) -> None:
        """Remove the hooks and free the GPU slots. Streamed blocks stay in (packed) CPU memory;
        resident blocks and the rest of the model stay on the device."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for undo in self._undo:  # an embedding read row by row stays on meta, to be filled when needed
            undo()
        self._undo.clear()
        self._wait_reads()
        if self._reader is not None:
            self._reader.shutdown(wait=True)
            self._reader = None
        self._unbind_current()
        if self._copy_stream is not None:
            # The slots are about to return to the allocator; copies still in flight on the side
            # stream must finish first, and the compute stream must not reuse that memory before.
            self._copy_stream.synchronize()
        for p in self._packed:
            p.bind(p.cpu_views)
            p.slot_views.clear()
            p.unpin()  # detached blocks are plain host tensors again; a re-attach packs anew
        self._slots, self._owner, self._slot_of = [], [], {}
        self._copied, self._free, self._copy_stream = [], [], None
        for fin in self._staging_pins:
            fin()
        self._staging, self._staging_pins = [], []
        if self.model is not None and streamer_of(self.model) is self:
            del _ATTACHED[self.model]
        self.model = None

    # -------------------------------------------------------------------------------- transfers

    def _views(self, pos: int, slot: int) -> list[torch.Tensor]:
        packed = self._packed[pos]
        if slot not in packed.slot_views:
            packed.slot_views[slot] = [view_of(self._slots[slot], e) for e in packed.entries]
        return packed.slot_views[slot]

    def _load(self, pos: int, slot: int) -> None:
        """Queue the copy of streamed block `pos` into `slot`."""
        old = self._owner[slot]
        if old == pos:
            return
        if old >= 0:
            self._slot_of.pop(old, None)
        self._owner[slot], self._slot_of[pos] = pos, slot
        packed = self._packed[pos]
        dst = self._slots[slot][: packed.nbytes]
        if isinstance(packed, DiskBlock):
            if self._copy_stream is None:
                packed.read_into(dst)
            else:
                self._pending[slot] = self._reader.submit(self._read_and_copy, packed, slot, dst)
            return
        if self._copy_stream is None:
            dst.copy_(packed.cpu)
            return
        with torch.cuda.stream(self._copy_stream):
            # Do not overwrite the slot while kernels of its previous block may still read it.
            self._copy_stream.wait_event(self._free[slot])
            # From pinned memory this returns at once; from pageable memory the driver stages it
            # (the host may wait for the copy stream), which is slower but still correct.
            dst.copy_(packed.cpu, non_blocking=True)
            self._copied[slot].record(self._copy_stream)

    def _read_and_copy(self, packed: DiskBlock, slot: int, dst: torch.Tensor) -> None:
        """On the reader thread: the block from the file into the slot's staging buffer, then its
        copy queued on the side stream. One reader runs the reads in the order they were asked."""
        stage = self._staging[slot][: packed.nbytes]
        with torch.cuda.device(self.device):
            # the staging buffer still feeds the last copy into this slot until that copy is done
            self._copied[slot].synchronize()
            packed.read_into(stage)
            with torch.cuda.stream(self._copy_stream):
                # kernels of the slot's previous block may still read it (recorded before this read was asked)
                self._copy_stream.wait_event(self._free[slot])
                dst.copy_(stage, non_blocking=True)
                self._copied[slot].record(self._copy_stream)

    def _wait_read(self, slot: int) -> None:
        pending = self._pending.pop(slot, None)
        if pending is not None:
            pending.result()  # the copy is queued (its event recorded); a failed read raises here

    def _wait_reads(self) -> None:
        for slot in list(self._pending):
            self._wait_read(slot)

    def _pick_slot(self, pos: int) -> int:
        """A slot for an on-demand load: an empty one, else the one whose block is needed last."""
        n = len(self._packed)

        def distance(slot: int) -> int:
            owner = self._owner[slot]
            return n + 1 if owner < 0 else (owner - pos) % n

        return max(range(len(self._slots)), key=distance)

    def _unbind_current(self) -> None:
        if self._bound is None:
            return
        pos, slot = self._bound
        self._bound = None
        if self._copy_stream is not None:
            # A forward that raised (e.g. out of memory) skipped the post-hook; the slot's
            # kernels were queued on the current stream, so mark the slot free after them.
            self._free[slot].record(torch.cuda.current_stream(self.device))
        self._packed[pos].bind(self._packed[pos].cpu_views)

    def _make_pre(self, pos: int) -> Callable:
        def pre_hook(_module: nn.Module, _args: tuple) -> None:
            self._unbind_current()
            slot = self._slot_of.get(pos)
            if slot is None:  # not prefetched: first use, or blocks called out of order
                slot = self._pick_slot(pos)
                self._load(pos, slot)
            self._wait_read(slot)
            if self._copy_stream is not None:
                # The block's kernels must not start before its weights arrived; this orders the
                # GPU streams only, the host goes on queueing work.
                torch.cuda.current_stream(self.device).wait_event(self._copied[slot])
            self._packed[pos].bind(self._views(pos, slot))
            self._bound = (pos, slot)

        return pre_hook

    def _make_post(self, pos: int) -> Callable:
        def post_hook(_module: nn.Module, _args: tuple, _output: object) -> None:
            bound = self._bound
            self._bound = None
            slot = self._slot_of[pos] if bound is None else bound[1]
            if self._copy_stream is not None:
                # Everything that reads this slot is queued before this point on this stream.
                self._free[slot].record(torch.cuda.current_stream(self.device))
            self._packed[pos].bind(self._packed[pos].cpu_views)
            # Refill the slot just freed with the block `len(slots)` positions ahead, wrapping
            # around so that the next forward (next step) finds its first blocks already loaded.
            target = (pos + len(self._slots)) % len(self._packed)
            if target not in self._slot_of:
                self._load(target, slot)

        return post_hook


# model -> its streamer. Both references are weak: the hooks on the model keep the streamer alive,
# and a model dropped without detach() is collected with its streamer.
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, weakref.ref[BlockStreamer]] = weakref.WeakKeyDictionary()


def attach(model: nn.Module, device: torch.device | str, resident: int = 0, prefetch: int = 1,
           pinned: bool = True, pin_limit: int | None = None, host_modules: tuple[str, ...] = (),
           source: TensorSource | None = None, key_map: Callable[[str], str] | None = None) -> BlockStreamer:
    """Shortcut for `BlockStreamer.attach`."""
    return BlockStreamer.attach(model, device, resident, prefetch, pinned, pin_limit, host_modules, source, key_map)


def streamer_of(model: nn.Module) -> BlockStreamer | None:
    ref = _ATTACHED.get(model)
    return None if ref is None else ref()


def detach_streamer(model: nn.Module) -> None:
    """Detach the streamer of `model`, if any."""
    streamer = streamer_of(model)
    if streamer is not None:
        streamer.detach()


# ------------------------------------------------------------------------------------------
# Whole-model placement (A14B experts)


_SOURCES: weakref.WeakKeyDictionary[nn.Module, tuple[TensorSource, Callable[[str], str] | None]] = (
    weakref.WeakKeyDictionary()
)


_LIBC: ctypes.CDLL | None | bool = None


def trim_host_memory(collect: bool = True) -> None:
    """Hand freed host memory back to the OS. glibc keeps the freed heap pages of tensors under
    its mmap threshold (up to 32 MiB: most weight matrices), so after an expert or the text
    encoder is dropped the process would still hold its RAM (measured: 1 GiB of 3 in a
    4-block A14B run), and packing an expert's blocks for streaming would hold the freed
    originals next to the packed copies (~6 GiB for a full-size fp8 A14B expert).
    collect: run the garbage collector first. No-op where there is no glibc."""
    global _LIBC
    if collect:
        gc.collect()
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def fill_from_source(model: nn.Module, source: TensorSource, key_map: Callable[[str], str] | None = None, *,
                     blocks: Iterable[int] | None = None, device: torch.device | str | None = None,
                     quant_device: torch.device | str = "cpu", skip: Iterable[str] = ()) -> None:
    """Read the tensors of `model` still on meta from `source`: the parts outside the block list,
    then each block of `blocks` (every block when None), one block at a time, each moved to
    `device` right after it is read when one is given, so RAM holds at most one block of them.
    `skip`: names left on meta (an embedding read row by row)."""
    prefix, block_list = find_block_list(model)
    meta, seen = [], set()
    skip = set(skip)
    for n, t in model.state_dict(keep_vars=True).items():
        if t.device.type == "meta" and id(t) not in seen and n not in skip:  # a tied tensor (umT5's embedding) is read once
            seen.add(id(t))
            meta.append(n)
    outside = [n for n in meta if not n.startswith(f"{prefix}.")]
    if outside:  # straight to `device` (a large tensor, umT5's embedding, a chunk at a time)
        refill_like(model, source, key_map=key_map, names=outside, quant_device=quant_device, device=device)
    for i in range(len(block_list)) if blocks is None else blocks:
        names = [n for n in meta if n.startswith(f"{prefix}.{i}.")]
        if names:
            refill_like(model, source, key_map=key_map, names=names, quant_device=quant_device)
        if device is not None:
            block_list[i].to(device)


def expert_source(model: nn.Module) -> tuple[TensorSource, Callable[[str], str] | None] | None:
    """(source, key_map) `set_expert_source` registered for `model`, or None."""
    return _SOURCES.get(model)


def set_expert_source(model: nn.Module, source: TensorSource, key_map: Callable[[str], str] | None = None) -> None:
    """Remember where `model`'s tensors come from, so `move_expert(model, "disk")` can drop them.

    `source` is the quantized cache file (exact tensors) or the original float checkpoint (the
    quantized layers are then quantized again as they are read)."""
    _SOURCES[model] = (source, key_map)


def where_is(model: nn.Module) -> str:
    """"disk" (tensors dropped), "gpu" (every tensor on a CUDA device), "ram", or "mixed"."""
    kinds = {t.device.type for t in list(model.parameters()) + list(model.buffers())}
    if kinds <= {"meta"}:
        return "disk"
    if kinds == {"cuda"}:
        return "gpu"
    if kinds == {"cpu"}:
        return "ram"
    return "mixed"


def move_expert(model: nn.Module, where: str, *, device: torch.device | str = "cuda",
                quant_device: torch.device | str = "cpu") -> None:
    """Put a whole model on the GPU ("gpu"), in host RAM ("ram") or nowhere ("disk").

    "disk" drops every tensor (the file on disk, memory-mapped, is the copy); "ram" and "gpu"
    re-fill a dropped model from the source given to `set_expert_source`. A streamer attached to
    the model is detached first. To keep two A14B experts within one GPU's budget, move the idle
    one to "ram" or "disk" *before* moving the next one to "gpu".
    """
    if where not in ("gpu", "ram", "disk"):
        raise ValueError(f"where must be 'gpu', 'ram' or 'disk', not {where!r}")
    detach_streamer(model)
    if where == "disk":
        if model not in _SOURCES:
            raise RuntimeError("move_expert(..., 'disk') needs set_expert_source(model, source) first")
        # to_empty on meta keeps every dtype and shape (so the refill knows them) and frees storage.
        model.to_empty(device="meta")
        trim_host_memory()
        return
    meta = any(t.device.type == "meta" for t in model.state_dict(keep_vars=True).values())
    if meta:
        if model not in _SOURCES:
            raise RuntimeError("this model was dropped without a source; cannot re-fill it")
        source, key_map = _SOURCES[model]
        # block by block, each sent on to the GPU at once: RAM never holds the whole model
        fill_from_source(model, source, key_map, device=device if where == "gpu" else None,
                         quant_device=quant_device)
    # Host copies are pageable here: a streamer attached later packs and page-locks its own.
    model.to("cpu" if where == "ram" else device)
