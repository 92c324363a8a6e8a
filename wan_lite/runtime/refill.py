"""Reading a model's tensors from a checkpoint or the converted-weights cache, tensor by tensor.

A model is built on meta with its quantized layers swapped in and its dtypes declared
(`declare_dtypes`); `read_plan` checks a source against it (every tensor there, in its shape)
before anything is read, and `read_planned` / `iter_refill` then hand out one tensor at a time in
the model's dtype, quantizing a float weight as it is read where the layer is quantized
(`quant.quantize_weight`), and a tensor larger than ROW_CHUNK_BYTES as `Rows`, read a chunk of
rows at a time. `refill_like` fills a model (or some of its tensors) that way; the converted-
weights cache (quant_cache.py) writes what `iter_refill` yields; the block streamer reads its
blocks from a file through `read_planned`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from wan_lite.errors import CheckpointError
from wan_lite.loading.tensors import TensorSource
from wan_lite.runtime import quant
from wan_lite.runtime.quant import SCALE_SUFFIX, quantized_modules


def refill_order(model: nn.Module, names: Iterable[str] | None = None) -> list[str]:
    """The names `iter_refill` yields, in its order: the state dict's, each quantization scale
    right after its weight (made together)."""
    expected = model.state_dict(keep_vars=True)
    qmods = quantized_modules(model)
    wanted = None if names is None else set(names)
    scales = {f"{n}.weight{SCALE_SUFFIX}" for n in qmods}
    order = []
    for name in expected:
        if name in scales or (wanted is not None and name not in wanted):
            continue
        order.append(name)
        scale = name + SCALE_SUFFIX
        if scale in scales and (wanted is None or scale in wanted):
            order.append(scale)
    return order


def _in_source(source: TensorSource, kmap: Callable[[str], str], name: str) -> bool:
    try:
        return kmap(name) in source
    except KeyError:  # a key map that knows only the float checkpoint's names (umT5's)
        return False


ROW_CHUNK_BYTES = 64 << 20  # a large tensor is read, converted and written this much at a time


def read_plan(model: nn.Module, source: TensorSource, *, key_map: Callable[[str], str] | None = None,
              names: Iterable[str] | None = None, what: str = "model") -> list[tuple]:
    """How `read_planned` reads a (meta) model's tensors from `source`, checked (every key there,
    every shape right) before anything is read: [(name, key, dtype, fmt or None, scale dtype)],
    fmt set for a quantized layer's weight that a float source holds (quantized as read, its
    scale made with it; a quantized cache holds `<layer>.weight_scale` and is read as is)."""
    kmap = key_map or (lambda n: n)
    qmods = quantized_modules(model)
    requantize = bool(qmods) and not _in_source(source, kmap, f"{next(iter(qmods))}.weight{SCALE_SUFFIX}")
    expected = model.state_dict(keep_vars=True)
    derived = {f"{n}.weight{SCALE_SUFFIX}" for n in qmods} if requantize else set()
    order = [n for n in refill_order(model, names) if n not in derived]
    missing = [kmap(n) for n in order if kmap(n) not in source]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"The {what} file(s) {source.describe()} lack {len(missing)} tensor(s): {shown}.",
                              "This is not the expected checkpoint or it is incomplete; download it again.")
    plan = []
    for name in order:
        key, ref = kmap(name), expected[name]
        layer = name[: -len(".weight")]
        quantized_here = requantize and name.endswith(".weight") and layer in qmods
        # a float weight to be quantized is [out, in] in the source, whatever its packed shape here
        want = (qmods[layer].out_features, qmods[layer].in_features) if quantized_here else tuple(ref.shape)
        if tuple(source.shape(key)) != tuple(want):
            raise CheckpointError(f"Tensor {key!r} in {source.describe()} has shape {list(source.shape(key))}, "
                                  f"expected {list(want)} for this {what}.", "The file belongs to another model.")
        if quantized_here:
            plan.append((name, key, ref.dtype, qmods[layer].fmt, expected[name + SCALE_SUFFIX].dtype))
        else:
            plan.append((name, key, ref.dtype, None, None))
    return plan


class Rows:
    """A large float tensor of a source, read `ROW_CHUNK_BYTES` at a time (`read_planned` with
    `rows`): written to the cache or filled into its place on the GPU chunk by chunk, so RAM never
    holds it whole (umT5's 2 GB token embedding, the largest tensor any model here has)."""

    def __init__(self, source: TensorSource, key: str, dtype: torch.dtype) -> None:
        self.source, self.key, self.dtype = source, key, dtype
        self.shape = tuple(source.shape(key))

    def chunks(self) -> Iterator[torch.Tensor]:
        row = math.prod(self.shape[1:]) * max(self.dtype.itemsize, self.source.dtype(self.key).itemsize)
        step = max(1, ROW_CHUNK_BYTES // max(1, row))
        for i in range(0, self.shape[0], step):
            yield self.source.read_rows(self.key, torch.arange(i, min(self.shape[0], i + step)), self.dtype)

    def to_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype, device=device or "cpu")
        done = 0
        for chunk in self.chunks():
            out[done : done + chunk.shape[0]].copy_(chunk)
            done += chunk.shape[0]
        return out


def _by_rows(source: TensorSource, key: str, dtype: torch.dtype) -> bool:
    shape = source.shape(key)
    return (len(shape) >= 1 and source.rows_are_cheap(key)
            and math.prod(shape) * max(dtype.itemsize, source.dtype(key).itemsize) > ROW_CHUNK_BYTES)


def read_planned(plan: list[tuple], source: TensorSource, quant_device: torch.device | str = "cpu",
                 rows: bool = False) -> Iterator[tuple[str, torch.Tensor | Rows]]:
    """(name, tensor) one at a time as `plan` (read_plan) says: only one source tensor is alive
    at a time. Touches no module, so it may run on another thread. `rows`: a float tensor larger
    than ROW_CHUNK_BYTES comes as `Rows`, to be read a chunk at a time."""
    for name, key, dtype, fmt, scale_dtype in plan:
        if rows and fmt is None and _by_rows(source, key, dtype):
            yield name, Rows(source, key, dtype)
            continue
        t = source[key]
        if fmt is not None:
            q, scale = quant.quantize_weight(t.to(quant_device), fmt)
            del t
            yield name, q.cpu()
            yield name + SCALE_SUFFIX, scale.to("cpu", scale_dtype)
            continue
        yield name, t if t.dtype == dtype else t.to(dtype)


def iter_refill(model: nn.Module, source: TensorSource, *, key_map: Callable[[str], str] | None = None,
                quant_device: torch.device | str = "cpu", names: Iterable[str] | None = None,
                what: str = "model", rows: bool = False) -> Iterator[tuple[str, torch.Tensor | Rows]]:
    """(name, tensor) for every tensor of a (meta) model in the dtype and shape it declares, one
    at a time in `refill_order`, read from `source` (`read_plan`, `read_planned`). names: only
    these tensors (a block's, the parts outside the blocks); rows: large ones as `Rows`."""
    return read_planned(read_plan(model, source, key_map=key_map, names=names, what=what), source, quant_device,
                        rows=rows)


def refill_like(model: nn.Module, source: TensorSource, *, key_map: Callable[[str], str] | None = None,
                quant_device: torch.device | str = "cpu", names: Iterable[str] | None = None,
                what: str = "model", device: torch.device | str | None = None) -> nn.Module:
    """Fill a (meta) model with the dtypes and shapes it declares, tensor by tensor (`iter_refill`);
    names: only those tensors, the others left as they are. `device`: each tensor goes there as
    it is read (a large one chunk by chunk: RAM holds one chunk of it, not the tensor)."""
    loaded = {n: t.to_tensor(device) if isinstance(t, Rows) else t if device is None else t.to(device)
              for n, t in iter_refill(model, source, key_map=key_map, quant_device=quant_device, names=names,
                                      what=what, rows=device is not None)}
    model.load_state_dict(loaded, assign=True, strict=names is None)
    return model


def declare_dtypes(model: nn.Module, dtype: torch.dtype, keep_fp32: Callable[[str], bool] | None = None) -> None:
    """Cast the float tensors of a (meta: free) model to `dtype`, float32 where `keep_fp32(name)`;
    the quantized weights and their scales keep the dtypes their layer declares (int8 / fp8:
    float32 scales, int4: bfloat16)."""
    scales = {f"{n}.weight{SCALE_SUFFIX}": m.weight_scale.dtype for n, m in quantized_modules(model).items()}
    declare_each(model, lambda name: scales.get(name) or (torch.float32 if keep_fp32 and keep_fp32(name) else dtype))


def declare_each(model: nn.Module, target: Callable[[str], torch.dtype]) -> None:
    """Cast each float tensor of a (meta: free) model to target(its name); others stay as they are."""
    for prefix, module in model.named_modules():
        for store in (module._parameters, module._buffers):
            for n, t in store.items():
                if t is None or not t.is_floating_point():
                    continue
                want = target(f"{prefix}.{n}" if prefix else n)
                if t.dtype != want:
                    if isinstance(t, nn.Parameter):
                        t.data = t.data.to(want)
                    else:
                        store[n] = t.to(want)
