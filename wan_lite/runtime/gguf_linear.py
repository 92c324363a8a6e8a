"""Linear layers that keep a checkpoint's own quantized storage, and models built from it.

GGUF files (ComfyUI-GGUF conversions of the Wan DiT) and ComfyUI fp8 files are already small;
dequantizing them into a float model on load would spend 2-4x their size in RAM. Instead:

- `GGUFLinear` holds a layer's raw ggml blocks (`weight`: uint8 [out, bytes per row]) with its
  ggml type and dequantizes them *in forward*, with torch, on whatever device the bytes are (the
  GPU when the block is streamed or resident): Q8_0, Q4_K, Q5_K, Q6_K and the legacy Q4_0, Q4_1,
  Q5_0, Q5_1 (0.56-0.75 bytes per weight instead of bf16's 2). The math is ported from
  gguf-py's numpy `gguf.quants` and gives the same float32 values bit for bit.
- fp8-e4m3 weights become `QuantizedLinear("fp8")` filled with the stored bytes and scales
  (`QuantizedLinear.from_fp8`), so they use its dequant or fp8 x fp8 `_scaled_mm` paths.

`load_stored(model, source, dtype)` swaps the quantizable Linear layers of a meta-built model
(those in its block list that the model does not exclude) for these layers wherever the source
stores their weight quantized, and fills the model. F16 / BF16 / F32 layers stay ordinary
Linear layers in `dtype`, as do the layers the model excludes (embeddings, head), which are
dequantized on read: they are small and the model reads their weights directly.
The returned `StoredSource` presents the stored bytes under the model's state-dict names, so the
block streamer and `move_expert(..., "disk")` can drop and re-fill the model from the file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from wan_lite.errors import CheckpointError
from wan_lite.loading.sources import fp8_weight, quantized, stored_type
from wan_lite.loading.tensors import TensorSource
from wan_lite.runtime.quant import (
    SCALE_SUFFIX,
    QuantizedLinear,
    fold_activations,
    fp8_scale_rows,
    quantizable_linears,
    share_caches,
)

log = logging.getLogger(__name__)

QK_K = 256
# ggml type -> (values per block, bytes per block), as gguf.GGML_QUANT_SIZES
GGUF_BLOCKS: dict[str, tuple[int, int]] = {"Q8_0": (32, 34), "Q4_K": (QK_K, 144), "Q5_K": (QK_K, 176),
                                           "Q6_K": (QK_K, 210), "Q4_0": (32, 18), "Q4_1": (32, 20),
                                           "Q5_0": (32, 22), "Q5_1": (32, 24)}
GGUF_TYPES = tuple(GGUF_BLOCKS)
_CHUNK_VALUES = 1 << 22  # dequantize this many values at a time: bounds the float32 temporaries


# ------------------------------------------------------------------------------------------
# Dequantization (torch ports of gguf.quants.*.dequantize_blocks; blocks: uint8 [n, type_size])


def _f16(b: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 2] little-endian half floats -> float32 [n, 1]."""
    return b.contiguous().view(torch.float16).float()


def _shifts(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])
    return blocks[:, 2:].view(torch.int8).float() * d


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes of packed 6-bit scales and mins -> (scales [n, 8], mins [n, 8]) uint8."""
    s = scales.reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k_scaled(blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Q4_K / Q5_K: d * scale * q - dmin * min per sub-block of 32; q uint8 [n, 8, 32]."""
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sc, mn = _k_scale_min(blocks[:, 4:16])
    # Same operation order as numpy (products first, then one subtraction): bit-identical.
    d = (d * sc.float()).reshape(n, -1, 1)
    dm = (dmin * mn.float()).reshape(n, -1, 1)
    return (d * q.float() - dm).reshape(n, QK_K)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    qs = blocks[:, 16:].reshape(n, -1, 1, 32) >> _shifts((0, 4), blocks.device).reshape(1, 1, 2, 1)
    return _k_scaled(blocks, (qs & 0x0F).reshape(n, -1, 32))


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    qh, qs = blocks[:, 16:48], blocks[:, 48:]
    ql = qs.reshape(n, -1, 1, 32) >> _shifts((0, 4), blocks.device).reshape(1, 1, 2, 1)
    qh = qh.reshape(n, -1, 1, 32) >> _shifts(tuple(range(8)), blocks.device).reshape(1, 1, 8, 1)
    q = (ql & 0x0F).reshape(n, -1, 32) | ((qh & 0x01).reshape(n, -1, 32) << 4)
    return _k_scaled(blocks, q)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    ql, qh = blocks[:, :128], blocks[:, 128:192]
    scales = blocks[:, 192:208].view(torch.int8).float()
    d = (_f16(blocks[:, 208:210]) * scales).reshape(n, QK_K // 16, 1)
    ql = ql.reshape(n, -1, 1, 64) >> _shifts((0, 4), blocks.device).reshape(1, 1, 2, 1)
    qh = qh.reshape(n, -1, 1, 32) >> _shifts((0, 2, 4, 6), blocks.device).reshape(1, 1, 4, 1)
    q = (ql & 0x0F).reshape(n, -1, 32) | ((qh & 0x03).reshape(n, -1, 32) << 4)
    q = (q.view(torch.int8) - 32).reshape(n, QK_K // 16, -1).float()  # 6-bit values, offset 32
    return (d * q).reshape(n, QK_K)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes per block -> 32 4-bit values: the low nibbles first, then the high ones (ggml's order)."""
    n = qs.shape[0]
    return ((qs.reshape(n, 1, 16) >> _shifts((0, 4), qs.device).reshape(1, 2, 1)) & 0x0F).reshape(n, 32)


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """4 bytes per block (a little-endian uint32) -> its 32 bits, bit i for value i, as uint8."""
    n = qh.shape[0]
    bits = qh.reshape(n, 4, 1) >> _shifts(tuple(range(8)), qh.device).reshape(1, 1, 8)
    return (bits & 0x01).reshape(n, 32)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])
    return d * (_nibbles(blocks[:, 2:]).view(torch.int8) - 8).float()


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    return d * _nibbles(blocks[:, 4:]).float() + m


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])
    q = _nibbles(blocks[:, 6:]) | (_high_bits(blocks[:, 2:6]) << 4)
    return d * (q.view(torch.int8) - 16).float()


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    q = _nibbles(blocks[:, 8:]) | (_high_bits(blocks[:, 4:8]) << 4)
    return d * q.float() + m


_DEQUANT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"Q8_0": _q8_0, "Q4_K": _q4_k, "Q5_K": _q5_k,
                                                               "Q6_K": _q6_k, "Q4_0": _q4_0, "Q4_1": _q4_1,
                                                               "Q5_0": _q5_0, "Q5_1": _q5_1}


def gguf_row_bytes(qtype: str, cols: int) -> int:
    """Bytes of one stored row of `cols` values; CheckpointError when cols does not fit the blocks."""
    if qtype not in GGUF_BLOCKS:
        raise CheckpointError(f"The GGUF type {qtype} is not supported for on-the-fly dequantization.",
                              f"Use a {', '.join(GGUF_TYPES)} file.")
    size, type_size = GGUF_BLOCKS[qtype]
    if cols % size:
        raise CheckpointError(f"A {qtype} row of {cols} values is not a whole number of {size}-value blocks.",
                              "The GGUF file is damaged or not a Wan model; download it again.")
    return cols // size * type_size


def dequantize_gguf(data: torch.Tensor, qtype: str, shape: tuple[int, int],
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Raw ggml blocks uint8 [rows, bytes per row] -> weight [rows, cols] in `dtype`, on data's device.

    Computed in float32 (the same values as gguf.quants.dequantize, bit for bit) in chunks of
    rows, each rounded once to `dtype`, so the float32 temporaries stay small.
    """
    rows, cols = shape
    row_bytes = gguf_row_bytes(qtype, cols)
    data = data.reshape(rows, row_bytes)
    size, type_size = GGUF_BLOCKS[qtype]
    fn = _DEQUANT[qtype]
    step = max(1, _CHUNK_VALUES // cols)
    if step >= rows:
        return fn(data.reshape(-1, type_size)).reshape(rows, cols).to(dtype)
    out = torch.empty(rows, cols, dtype=dtype, device=data.device)
    for r in range(0, rows, step):
        part = data[r : r + step]
        out[r : r + step] = fn(part.reshape(-1, type_size)).reshape(part.shape[0], cols)
    return out


class GGUFLinear(nn.Module):
    """A Linear layer whose weight stays in its GGUF blocks and is dequantized in each forward.

    Buffers: weight uint8 [out, bytes per row] (the ggml blocks of each row), bias [out] float or
    None. Forward: x [..., in] -> [..., out] in x's dtype (bfloat16 for a non-float x).
    """

    def __init__(self, in_features: int, out_features: int, qtype: str, *,
                 bias_dtype: torch.dtype | None = torch.bfloat16, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.qtype = in_features, out_features, qtype
        row_bytes = gguf_row_bytes(qtype, in_features)
        self.register_buffer("weight", torch.empty(out_features, row_bytes, dtype=torch.uint8, device=device))
        bias = None if bias_dtype is None else torch.zeros(out_features, dtype=bias_dtype, device=device)
        self.register_buffer("bias", bias)

    @classmethod
    def from_blocks(cls, data: torch.Tensor, qtype: str, shape: tuple[int, int],
                    bias: torch.Tensor | None = None) -> GGUFLinear:
        """A layer holding `data` (uint8 ggml blocks of a [out, in] weight) without copying it."""
        out_f, in_f = shape
        module = cls(in_f, out_f, qtype, bias_dtype=None if bias is None else bias.dtype, device="meta")
        if data.dtype != torch.uint8 or data.numel() != out_f * gguf_row_bytes(qtype, in_f):
            raise CheckpointError(f"{qtype} data {data.dtype} {list(data.shape)} does not hold a {list(shape)} weight.",
                                  "The GGUF file is damaged; download it again.")
        module.weight = data.reshape(out_f, -1)
        module.bias = bias
        return module

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] in `dtype`."""
        return dequantize_gguf(self.weight, self.qtype, (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if x.is_floating_point() else torch.bfloat16
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.dequantized(dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}, "
                f"bias={self.bias is not None}")


# ------------------------------------------------------------------------------------------
# Models built from stored quantized weights


def stored_kind(source: TensorSource, key: str) -> str | None:
    """"fp8" or a GGUF type for a weight we keep as stored, None for one read as float."""
    kind = stored_type(source, key)
    if kind == "F8_E4M3" or kind in GGUF_BLOCKS:
        return "fp8" if kind == "F8_E4M3" else kind
    return None


def stored_format(source: TensorSource) -> str | None:
    """"fp8" or "gguf" when the source stores 2-D weights quantized (we keep them so), else None."""
    for key in source:
        kind = stored_type(source, key)
        if kind == "F8_E4M3":
            return "fp8"
        if kind in GGUF_BLOCKS:
            return "gguf"
    return None


class StoredSource(TensorSource):
    """`inner` with the stored bytes of the chosen layers in place of their float weights.

    layers: source weight key -> "fp8" or a GGUF type. For fp8 layers `<m>.weight` reads as the
    stored e4m3 bits viewed as int8 [out, in] and `<m>.weight_scale` as float32 [out]; for GGUF
    layers `<m>.weight` reads as uint8 blocks [out, bytes per row]. Every other key is `inner`'s.
    """

    def __init__(self, inner: TensorSource, layers: dict[str, str]) -> None:
        self.inner = inner
        self.files = inner.files
        self.layers = dict(layers)
        self._scale_keys = {k + SCALE_SUFFIX: k for k, kind in self.layers.items() if kind == "fp8"}
        self._scales: dict[str, torch.Tensor] = {}  # read with the weight, handed out once

    def _fp8(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        stored = fp8_weight(self.inner, key)
        if stored is None or stored.weight.dtype != torch.float8_e4m3fn:
            raise CheckpointError(f"{self.describe()}: {key!r} is not stored as fp8 e4m3.",
                                  "The file changed while wan_lite was running; load the model again.")
        return stored.weight.view(torch.int8), fp8_scale_rows(stored.scale, stored.weight.shape[0])

    def __getitem__(self, name: str) -> torch.Tensor:
        kind = self.layers.get(name)
        if kind == "fp8":
            weight, self._scales[name] = self._fp8(name)
            return weight
        if kind is not None:
            raw = quantized(self.inner, name)
            return raw.data.reshape(self.shape(name))
        if name in self._scale_keys:
            key = self._scale_keys[name]
            scale = self._scales.pop(key, None)
            return scale if scale is not None else self._fp8(key)[1]
        return self.inner[name]

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name in self.layers or name in self._scale_keys:
            return self[name]  # stored bytes are never cast
        return self.inner.read(name, dtype)

    def read_rows(self, name: str, rows: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name in self.layers or name in self._scale_keys:
            return super().read_rows(name, rows, dtype)
        return self.inner.read_rows(name, rows, dtype)

    def rows_are_cheap(self, name: str) -> bool:
        return name not in self.layers and name not in self._scale_keys and self.inner.rows_are_cheap(name)

    def __iter__(self) -> Iterator[str]:
        yield from self.inner
        yield from self._scale_keys

    def __len__(self) -> int:
        return len(self.inner) + len(self._scale_keys)

    def __contains__(self, name: object) -> bool:
        return name in self._scale_keys or name in self.inner

    def shape(self, name: str) -> tuple[int, ...]:
        kind = self.layers.get(name)
        if name in self._scale_keys:
            return (self.inner.shape(self._scale_keys[name])[0],)
        shape = self.inner.shape(name)
        if kind is None or kind == "fp8":
            return shape
        return (shape[0], gguf_row_bytes(kind, shape[1]))

    def dtype(self, name: str) -> torch.dtype:
        kind = self.layers.get(name)
        if name in self._scale_keys:
            return torch.float32
        if kind is None:
            return self.inner.dtype(name)
        return torch.int8 if kind == "fp8" else torch.uint8

    def describe(self) -> str:
        return self.inner.describe()


def stored_key_map(key_map: Callable[[str], str] | None) -> Callable[[str], str]:
    """Model name -> `StoredSource` key under `key_map` (model name -> source key): a quantization
    scale is named after its weight's source key."""
    kmap = key_map or (lambda n: n)

    def full_map(name: str) -> str:
        if name.endswith(".weight" + SCALE_SUFFIX):
            return kmap(name[: -len(SCALE_SUFFIX)]) + SCALE_SUFFIX
        return kmap(name)

    return full_map


def _declare_as_filled(model: nn.Module, source: TensorSource, dtype: torch.dtype | None,
                       key_map: Callable[[str], str], keep_fp32: Callable[[str], bool], what: str) -> None:
    """The meta `model` in the dtypes `fill_module` would give it from `source` (checked as
    `read_plan` checks a source: every tensor there, in its shape), nothing read."""
    from wan_lite.runtime.refill import declare_each, read_plan

    read_plan(model, source, key_map=key_map, what=what)
    declare_each(model, lambda name: torch.float32 if keep_fp32(name) else dtype or source.dtype(key_map(name)))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def load_stored(model: nn.Module, source: TensorSource, dtype: torch.dtype | None, *,
                key_map: Callable[[str], str] | None = None, keep_fp32: Callable[[str], bool] | None = None,
                what: str = "model", compute: str = "auto", fill: bool = True) -> StoredSource:
    """Fill a meta-built `model` from `source`, keeping quantized weights as stored.

    Each quantizable Linear (see `quant.quantizable_linears`) whose weight the source stores as
    fp8-e4m3 becomes a `QuantizedLinear("fp8")`, one stored as Q8_0 / Q4_K / Q5_K / Q6_K a
    `GGUFLinear`; everything else is read (dequantized if need be) and cast to `dtype`, float32
    where `keep_fp32(name)`. Returns the `StoredSource` the model was filled from (for re-filling).
    fill: False checks the source (every tensor there, in its shape) and leaves the model on meta
    in the dtypes a fill gives: a model that waits on disk is never read whole (a plan's
    blocks_from "disk": the streamer reads its blocks from the file).
    """
    from wan_lite.loading.build import fill_module

    kmap = key_map or (lambda n: n)
    layers: dict[str, str] = {}
    counts: dict[str, int] = {}
    for name in quantizable_linears(model):
        key = kmap(f"{name}.weight")
        if key not in source:
            continue  # fill_module reports the missing tensor with the others
        kind = stored_kind(source, key)
        if kind is None:
            raw = stored_type(source, key)
            if raw is not None and raw not in ("F32", "F16", "BF16"):
                log.warning("%s: %s is stored as %s, which is dequantized on read (not kept quantized).",
                            what, key, raw)
            continue
        linear = model.get_submodule(name)
        bias_dtype = None if linear.bias is None else (dtype or source.dtype(kmap(f"{name}.bias")))
        if kind == "fp8":
            new: nn.Module = QuantizedLinear(linear.in_features, linear.out_features, "fp8", compute=compute,
                                             bias_dtype=bias_dtype, device="meta")
        else:
            new = GGUFLinear(linear.in_features, linear.out_features, kind, bias_dtype=bias_dtype, device="meta")
        _replace(model, name, new)
        layers[key] = kind
        counts[kind] = counts.get(kind, 0) + 1
    fold_activations(model)
    share_caches(model)
    stored = StoredSource(source, layers)

    def keep(name: str) -> bool:  # fp8 scales stay float32 whatever the model dtype
        return name.endswith(".weight" + SCALE_SUFFIX) or (keep_fp32 is not None and keep_fp32(name))

    full_map = stored_key_map(key_map)
    if fill:
        fill_module(model, stored, dtype, key_map=full_map, keep_fp32=keep, what=what)
    else:
        _declare_as_filled(model, stored, dtype, full_map, keep, what)
    log.info("%s: %s Linear layer(s) kept as stored, no float copy", what,
             ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no")
    return stored
