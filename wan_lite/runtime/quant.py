"""int8 / fp8-e4m3 weights with per-output-channel scales, and 4-bit "int4" weights with
per-group scales (runtime/int4.py), applied to a model from outside.

`quantize_model(model, "int8" | "fp8" | "int4")` swaps the `nn.Linear` layers inside the block list
(`WanDiT.blocks`, the umT5 encoder's `encoder.block`) for `QuantizedLinear`, except those the model
declares in `no_quantize_patterns` / `keep_fp32_patterns`; everything outside the blocks keeps its dtype.

Why our own module and not optimum-quanto: quanto's runtime Linear is slower than bf16 (int8
1.2-1.4x, fp8 2.4-2.9x its time for one DiT Linear at 27k tokens on an H200), its tensor subclasses would need special cases in the
block streamer, and it does not serialise to a plain state dict. What we need is small: 1 byte per
weight + one fp32 scale per output row (the ideal size); a forward that dequantizes the weight once
into the activation dtype (one read-int8/write-bf16 pass, cheap next to the GEMM) and runs the bf16
GEMM; and on GPUs with fp8 tensor cores (cc >= 8.9) an fp8 x fp8 `torch._scaled_mm` with per-row
activation and per-channel weight scales. Both formats are stored as int8 (fp8 bits viewed as
int8): `model.to(dtype)` never casts them, and transformers' T5 skips its `wo` input cast for int8.

"int4" halves int8's bytes again (0.53 per weight: two 4-bit codes per uint8, a bf16 scale per
64 inputs of a row) for a RAM or disk too small for an 8-bit DiT; its weight error is 3 to 10
times int8's (int4.py gives the levels, the measurements and why). It has no low-precision GEMM
here: its forward dequantizes to the activation dtype (one pass, compiled on CUDA) as int8's
does. The DiT's block layers only: the text encoder stays int8 / bf16.

Quantized models are cached on disk by `wan_lite.runtime.quant_cache.load_or_quantize`.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from wan_lite.errors import CheckpointError, InputError
from wan_lite.models.dit import name_matches as matches  # the one name-pattern rule (streaming uses it too)
from wan_lite.models.fp8_rows import Fp8Rows
from wan_lite.models.fused import Fused, KernelSwitch
from wan_lite.runtime import fp8_row_kernel, int4
from wan_lite.runtime.int4 import INT4_GROUP

log = logging.getLogger(__name__)

FORMATS = ("int8", "fp8", "int4")
COMPUTE_MODES = ("auto", "dequant", "fp8")
_INT8_MAX = 127.0
_FP8_MAX = 448.0  # largest finite float8_e4m3fn value
# Activation scale target for the fp8 compute path: a little under 448 so that the bf16 rounding
# of the reciprocal scale can never push a value past the largest finite e4m3 number.
_FP8_ACT_TARGET = 440.0
# Above |min GELU| (0.1700 for both forms, at about -0.75) and its bf16 rounding.
_GELU_NEG_BOUND = 0.171
SCALE_SUFFIX = "_scale"  # QuantizedLinear stores `weight` and `weight_scale`
_BLOCK_LISTS = ("blocks", "encoder.block", "block")  # WanDiT, UMT5EncoderModel, a bare T5 stack


def find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated blocks of a model: `blocks` (WanDiT) or `encoder.block` (transformers umT5).

    Returns (qualified name, ModuleList). Raises TypeError for a model without either: that is a
    programming error, not something a user can cause.
    """
    for path in _BLOCK_LISTS:
        obj: object = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return path, obj
    raise TypeError(f"{type(model).__name__} has no `blocks` or `encoder.block` ModuleList.")


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise InputError(f"Unknown weight format {fmt!r}.", f"Use one of: {', '.join(FORMATS)}.")


def quantize_weight(weight: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric quantization of a [out, in] weight.

    Returns (q [out, in] int8 - for fp8 the e4m3 bits viewed as int8 -, scale [out] float32) with
    weight ~= q * scale[:, None]. Computed in float32 on the weight's device; a zero row gets
    scale 1 so that dequantization stays exact (zeros).
    "int4": (packed [out, G*32] uint8, scale [out, G] bfloat16), G = ceil(in / 64) (`int4.quantize`).
    """
    _check_format(fmt)
    if fmt == "int4":
        return int4.quantize(weight)
    w = weight.detach().to(torch.float32)
    amax = w.abs().amax(dim=1)
    top = _INT8_MAX if fmt == "int8" else _FP8_MAX
    scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
    scaled = w / scale[:, None]
    if fmt == "int8":
        q = scaled.round_().clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    else:
        q = scaled.clamp_(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn).view(torch.int8)
    return q, scale


def _dequantize_eager(raw: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """raw [out, in] int8 or float8_e4m3fn, scale [out] fp32 -> raw * scale in `dtype`.

    The in-place multiply computes in float32 (the common dtype of the bf16 weight and the fp32
    scale) and rounds once to `dtype`, so the result is as precise as a bf16 copy of the float
    weight would be, without a float32 temporary of the whole matrix.
    """
    w = raw.to(dtype)  # int8 and e4m3 values are exact in bf16/fp16/fp32
    return w.mul_(scale[:, None])


def _dequantize_fused(raw: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The same numbers as `_dequantize_eager` (float32 product, one rounding) in one pass."""
    return (raw.to(torch.float32) * scale[:, None]).to(dtype)


_fused_dequantize = Fused(_dequantize_fused)
# uncompiled (the CPU, or no Triton on a GPU): a few rows at a time, no float32 copy of the matrix
_fused_dequantize_int4 = Fused(int4.dequantize_rows, eager=int4.dequantize_eager)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, fmt: str, dtype: torch.dtype,
                      in_features: int | None = None) -> torch.Tensor:
    """q [out, in] int8 (or fp8 bits), scale [out] fp32 -> weight [out, in] in `dtype`.

    On CUDA, fused by torch.compile into one kernel (read 1 byte, write 2 per weight: the eager
    version's cast-then-multiply moves 7), when Triton is available. This matters because a
    chunked block (`WanAttentionBlock.chunk_tokens`) dequantizes each layer once per chunk.
    "int4": q packed [out, G*32] uint8, scale [out, G] -> [out, in_features] (the zero padding of
    the last group cut off; None: all G*64 columns), the same way (read 0.53 bytes, write 2).
    """
    if fmt == "int4":
        pairs = int4.pairs_table(q.device)
        w = _fused_dequantize_int4(q, scale, pairs, dtype)
        return w if in_features is None or in_features == w.shape[1] else w[:, :in_features]
    raw = q if fmt == "int8" else q.view(torch.float8_e4m3fn)
    if not raw.is_cuda:
        return _dequantize_eager(raw, scale, dtype)
    return _fused_dequantize(raw, scale, dtype)


def fp8_scale_rows(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """An fp8 file's weight scale ([] or [1] per tensor, [rows] or [rows, 1] per row) as the
    float32 [rows] vector QuantizedLinear holds (a per-tensor scale repeated on every row)."""
    flat = scale.detach().to(torch.float32).reshape(-1)
    if flat.numel() not in (1, rows):
        raise CheckpointError(f"An fp8 weight scale of shape {list(scale.shape)} does not fit {rows} rows.",
                              "Use the fp16/bf16 or fp8_scaled file of this model instead.")
    return flat.expand(rows).contiguous()


# ------------------------------------------------------------------------------------------
# fp8 compute path


_FP8_CAPABLE: dict[int, bool] = {}


def _fp8_tensor_cores(device: torch.device) -> bool:
    """Compute capability >= 8.9 (Ada, Hopper, Blackwell), cached per device index."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _FP8_CAPABLE:
        _FP8_CAPABLE[index] = torch.cuda.get_device_capability(index) >= (8, 9)
    return _FP8_CAPABLE[index]


def _quantize_rows_eager(x: torch.Tensor, gelu: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x8 [M, K] float8_e4m3fn, scale [M, 1] fp32) with x ~= x8 * scale.

    gelu: quantize `F.gelu(x, approximate=gelu)` (in x's dtype, as the nn.GELU it stands for)
    instead of x. Its scale comes from a bound, not from the GELU's own max-abs: GELU(v) <= v for
    v >= 0 and |GELU(v)| < `_GELU_NEG_BOUND` for v < 0, so max(max(x), that bound) covers every
    value of the row. Why: the max-abs pass then reads x without computing the GELU, which the
    compiled kernel would otherwise evaluate twice (once per pass over a [tokens, ffn_dim] row);
    on an H200 that made it compute-bound, 3.4x slower than without the GELU. An e4m3 number
    keeps its relative precision at any scale, so a bound a little above the true max-abs costs
    nothing measurable (the largest value of a row with max(x) >= 2 is within 3 % of the bound).
    Eager: a few passes over x; `_quantize_rows` fuses them on CUDA (one kernel, one fp8 write).
    """
    if gelu is None:
        amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=1, keepdim=True, dtype=torch.float32)
    else:
        amax = x.amax(dim=1, keepdim=True).float().clamp(min=_GELU_NEG_BOUND)
        x = F.gelu(x, approximate=gelu)
    inv = (_FP8_ACT_TARGET / amax.clamp(min=1e-12)).to(x.dtype)
    x8 = (x * inv).to(torch.float8_e4m3fn)
    # The scale handed to the GEMM is the reciprocal of the *rounded* multiplier actually used.
    return x8, inv.to(torch.float32).reciprocal()


# Row-wise fp8 quantization of activations, compiled on CUDA into one kernel.
_quantize_rows_fused = Fused(_quantize_rows_eager)
_ROW_KERNEL = KernelSwitch("fp8 row quantization kernel", "compiled form")  # as exact


def _quantize_rows(x: torch.Tensor, gelu: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`_quantize_rows_eager`'s result, by the hand-written Triton kernel where it runs (at the
    memory-traffic time, `fp8_row_kernel`), else by the compiled form (`Fused`)."""
    if not _ROW_KERNEL.failed and fp8_row_kernel.takes(x, gelu) and _fp8_tensor_cores(x.device):
        done = _ROW_KERNEL.run(fp8_row_kernel.quantize_rows, x, gelu, _FP8_ACT_TARGET, _GELU_NEG_BOUND)
        if done is not None:
            return done
    return _quantize_rows_fused(x, gelu)


class _ActivationCache:
    """Remembers the fp8 version of the last activation (and the GELU applied first, if any), so
    q, k and v projections of the same input quantize it once. The entry dies with the
    activation (weakref callback), so it never holds memory longer than the bf16 tensor it came
    from. Tensors made under inference_mode have no version counter: for them a hit means the
    same tensor object, which the models never modify in place between projections."""

    def __init__(self) -> None:
        self._ref: weakref.ref | None = None
        self._version = -1
        self._gelu: str | None = None
        self._value: tuple[torch.Tensor, torch.Tensor] | None = None

    def _clear(self, _ref: object = None) -> None:
        self._ref, self._value = None, None

    def get(self, x: torch.Tensor, gelu: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        version = -1 if x.is_inference() else x._version
        hit = self._ref is not None and self._ref() is x and (version, gelu) == (self._version, self._gelu)
        if hit and self._value is not None:
            return self._value
        value = _quantize_rows(x.reshape(-1, x.shape[-1]), gelu)
        self._ref, self._version, self._gelu, self._value = weakref.ref(x, self._clear), version, gelu, value
        return value




class _WeightReuse:
    """Dequantized weights of layers that are called again right away, as in a block that works
    in token chunks (`WanAttentionBlock.chunk_tokens`): q, k, v, q, k, v, ... then ffn.0, ffn.2,
    ffn.0, ... A layer whose previous call was at most `NEAR` layer calls ago is in such a loop:
    its weight is kept (at most `SIZE` weights, least recently used out), so a block in 10
    chunks dequantizes each layer twice instead of 10 times. A layer called once per forward
    (unchunked) is never kept. An entry is valid only for the very weight tensor it came from
    (a streamed block's weights are new views each time it is loaded) and that tensor's
    version, so a kept weight can never be stale. The planner counts the kept q, k and v (the
    attention is the activation peak); `release_kept_weights` frees them when a stage ends."""

    NEAR, SIZE = 4, 3

    def __init__(self) -> None:
        self._calls = 0
        self._last: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
        self._kept: dict[int, tuple[weakref.ref, weakref.ref, int, torch.dtype, torch.Tensor]] = {}

    @staticmethod
    def _version(t: torch.Tensor) -> int:
        return -1 if t.is_inference() else t._version

    def get(self, layer: QuantizedLinear, dtype: torch.dtype) -> torch.Tensor:
        self._calls += 1
        last, self._last[layer] = self._last.get(layer), self._calls
        key = id(layer)
        kept = self._kept.pop(key, None)
        w = layer.weight
        if kept is not None:
            layer_ref, w_ref, version, kdtype, value = kept
            if layer_ref() is layer and w_ref() is w and version == self._version(w) and kdtype == dtype:
                self._kept[key] = kept  # most recently used last
                return value
        value = layer.dequantized(dtype)
        if last is not None and self._calls - last <= self.NEAR:
            self._kept[key] = (weakref.ref(layer), weakref.ref(w), self._version(w), dtype, value)
            while len(self._kept) > self.SIZE:
                del self._kept[next(iter(self._kept))]
        return value

    def clear(self) -> None:
        self._kept.clear()


class QuantCaches:
    """What the quantized layers of one model share: the dequantized weights kept for reuse
    across token chunks and the last fp8 activation (q, k and v of one input). Each model owns
    its own (`share_caches`), so two models in one process never see each other's entries."""

    def __init__(self) -> None:
        self.reuse = _WeightReuse()
        self.activations = _ActivationCache()


def share_caches(model: nn.Module) -> QuantCaches:
    """One QuantCaches for every QuantizedLinear of `model` (called where a model gets its
    quantized layers: `quantize_model`, the stored-format loader)."""
    caches = QuantCaches()
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m.caches = caches
    return caches


def release_kept_weights(model: nn.Module) -> None:
    """Free the dequantized weights `model`'s layers keep for reuse (call when its stage ends)."""
    for caches in {id(m.caches): m.caches for m in model.modules()
                   if isinstance(m, QuantizedLinear) and m.caches is not None}.values():
        caches.reuse.clear()


class QuantizedLinear(nn.Module):
    """A Linear layer with int8 or fp8-e4m3 weights and per-output-channel fp32 scales, or int4
    weights with a bf16 scale per 64 inputs of a row.

    Buffers: weight [out, in] int8 (fp8 bits viewed as int8), weight_scale [out] fp32,
    bias [out] in the original dtype (or None); int4: weight [out, G*32] uint8 (two codes a
    byte), weight_scale [out, G] bf16, G = ceil(in / 64). Forward: x [..., in] -> [..., out] in
    x's dtype. compute: "dequant" (weight -> x.dtype, then F.linear), "fp8" (torch._scaled_mm;
    fp8 format only), "auto" (fp8 on CUDA devices with compute capability >= 8.9, else dequant).
    input_gelu: None, or the `approximate` of a GELU this layer applies to its input first
        (set by `fold_activations`: on the fp8 path the GELU runs inside the activation
        quantization, so its bf16 output is never written).
    """

    input_gelu: str | None = None

    def __init__(self, in_features: int, out_features: int, fmt: str, *, compute: str = "auto",
                 bias_dtype: torch.dtype | None = torch.bfloat16, device: torch.device | str | None = None) -> None:
        super().__init__()
        _check_format(fmt)
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.compute = compute
        if fmt == "int4":
            packed, scales = int4.shapes(out_features, in_features)
            self.register_buffer("weight", torch.empty(packed, dtype=torch.uint8, device=device))
            self.register_buffer("weight_scale", torch.ones(scales, dtype=int4.SCALE_DTYPE, device=device))
        else:
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        bias = None if bias_dtype is None else torch.zeros(out_features, dtype=bias_dtype, device=device)
        self.register_buffer("bias", bias)
        self._fp8_broken = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str, compute: str = "auto") -> QuantizedLinear:
        """Quantize `linear` (on any device; on meta only the structure is made)."""
        w = linear.weight
        bias_dtype = None if linear.bias is None else linear.bias.dtype
        module = cls(linear.in_features, linear.out_features, fmt, bias_dtype=bias_dtype,
                     device=w.device, compute=compute)
        if w.device.type != "meta":
            q, scale = quantize_weight(w, fmt)
            module.weight, module.weight_scale = q, scale
            if linear.bias is not None:
                module.bias = linear.bias.detach().clone()
        return module

    @classmethod
    def from_fp8(cls, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 compute: str = "auto") -> QuantizedLinear:
        """A layer holding an fp8 checkpoint's own weight: `weight` float8_e4m3fn [out, in] is kept
        (its bytes viewed as int8, no copy), `scale` per tensor ([]) or per row ([out] / [out, 1])
        becomes the fp32 [out] row scale; the real weight is weight * scale, as in the file."""
        if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
            raise CheckpointError(f"Expected a 2-D float8_e4m3fn weight, got {weight.dtype} {list(weight.shape)}.",
                                  "Use the fp16/bf16 or fp8_scaled (e4m3) file of this model instead.")
        out_f, in_f = weight.shape
        module = cls(in_f, out_f, "fp8", compute=compute, bias_dtype=None if bias is None else bias.dtype,
                     device="meta")
        module.weight = weight.view(torch.int8)
        module.weight_scale = fp8_scale_rows(scale, out_f).to(weight.device)
        module.bias = bias
        return module

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] in `dtype`."""
        return dequantize_weight(self.weight, self.weight_scale, self.fmt, dtype, self.in_features)

    caches: QuantCaches | None = None  # shared with the model's other quantized layers (share_caches)

    def _caches(self) -> QuantCaches:
        if self.caches is None:  # a layer on its own has caches of its own
            self.caches = QuantCaches()
        return self.caches

    def _use_fp8(self, device: torch.device) -> bool:
        if self.fmt != "fp8" or self._fp8_broken or self.compute == "dequant":
            return False
        if self.in_features % 16 or self.out_features % 16:  # _scaled_mm's alignment
            return False
        if self.compute == "fp8":
            return True
        return device.type == "cuda" and _fp8_tensor_cores(device)

    def accepts_fp8_rows(self, device: torch.device) -> bool:
        """Whether this layer would run its fp8 x fp8 GEMM on `device`, so that a producer may hand
        it an `Fp8Rows` (no GELU in front: the GELU must see the real values)."""
        return self.input_gelu is None and self._use_fp8(device)

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        rows = x if isinstance(x, Fp8Rows) else None
        if rows is not None and self.input_gelu is not None:  # the GELU must see the real values
            x, rows = rows.dequantized(), None
        if self._use_fp8(x.data.device if rows is not None else x.device):
            try:
                return self._forward_fp8(x)
            except torch.OutOfMemoryError:
                raise  # the caller's plan must react; falling back would need even more memory
            except RuntimeError as err:  # a shape/dtype this torch build's fp8 GEMM rejects
                self._fp8_broken = True
                log.warning("fp8 matmul unavailable for %s (%s); using dequantized bf16.", self, err)
        if rows is not None:
            x = rows.dequantized()
        if self.input_gelu is not None:
            x = F.gelu(x, approximate=self.input_gelu)
        dtype = x.dtype if x.is_floating_point() else torch.bfloat16
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x, self._caches().reuse.get(self, dtype), bias)

    def _forward_fp8(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        if isinstance(x, Fp8Rows):
            x8, x_scale = x.data.reshape(-1, x.data.shape[-1]), x.scale
        else:
            x8, x_scale = self._caches().activations.get(x, self.input_gelu)
        # _scaled_mm wants the second operand column-major: the [out, in] row-major weight
        # transposed is exactly that, so no copy is made.
        w8 = self.weight.view(torch.float8_e4m3fn).t()
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        out = torch._scaled_mm(x8, w8, scale_a=x_scale, scale_b=self.weight_scale.view(1, -1),
                               bias=bias, out_dtype=torch.bfloat16)
        shape = x.data.shape if isinstance(x, Fp8Rows) else x.shape
        out = out.reshape(*shape[:-1], self.out_features)
        return out if x.dtype == torch.bfloat16 else out.to(x.dtype)

    def extra_repr(self) -> str:
        gelu = "" if self.input_gelu is None else f", input_gelu={self.input_gelu}"
        group = f", group={INT4_GROUP}" if self.fmt == "int4" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}{group}, "
                f"bias={self.bias is not None}, compute={self.compute}{gelu}")


# ------------------------------------------------------------------------------------------
# Whole models


def skip_patterns(model: nn.Module, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """Patterns never quantized: the model's declared `no_quantize_patterns` and
    `keep_fp32_patterns`, plus `extra`. (transformers' `_keep_in_fp32_modules`, T5's `wo`, is an
    fp16-overflow guard, not a sensitivity declaration: in bf16 / int8 it is quantized too.)"""
    pats: list[str] = []
    for attr in ("no_quantize_patterns", "keep_fp32_patterns"):
        pats.extend(getattr(model, attr, None) or ())
    pats.extend(extra)
    return tuple(dict.fromkeys(pats))


def quantizable_linears(model: nn.Module, skip: Iterable[str] = ()) -> list[str]:
    """Qualified names of the nn.Linear layers inside the block list that may be quantized."""
    prefix, blocks = find_block_list(model)
    pats = skip_patterns(model, skip)
    names = []
    for name, module in blocks.named_modules():
        full = f"{prefix}.{name}"
        if isinstance(module, nn.Linear) and not matches(full, pats):
            names.append(full)
    return names


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_model(model: nn.Module, fmt: str, skip: Iterable[str] = (), *, compute: str = "auto",
                   names: Iterable[str] | None = None) -> list[str]:
    """Replace the quantizable nn.Linear layers of `model` by QuantizedLinear, in place.

    Works on a filled model (weights quantized now, on their device: quantize on the GPU for
    speed) and on a meta model (structure only, to be filled by `refill.refill_like` or from a cache).
    A GELU in front of a quantized layer moves into it (`fold_activations`).
    names: exactly these layers (from a cache's metadata) instead of `quantizable_linears`.
    Returns the names of the replaced layers.
    """
    _check_format(fmt)
    if compute not in COMPUTE_MODES:
        raise InputError(f"Unknown compute mode {compute!r}.", f"Use one of: {', '.join(COMPUTE_MODES)}.")
    chosen = list(names) if names is not None else quantizable_linears(model, skip)
    for name in chosen:
        linear = model.get_submodule(name)
        if isinstance(linear, QuantizedLinear):
            continue
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"Cannot quantize {name}: it is a {type(linear).__name__}, not a Linear.",
                                  "The quantized cache does not match this model; delete it.")
        _replace(model, name, QuantizedLinear.from_linear(linear, fmt, compute))
    fold_activations(model)
    share_caches(model)
    log.debug("quantized %d Linear layers to %s", len(chosen), fmt)
    return chosen


def fold_activations(model: nn.Module) -> int:
    """Move each GELU that feeds a QuantizedLinear inside an nn.Sequential (the DiT's FFN: Linear,
    GELU, Linear) into that layer (`input_gelu`), leaving an nn.Identity in its place. Same
    GELU values on every path (the dequant path's output is bit-identical); on the fp8 one the
    GELU, the row scale and the fp8 cast become one kernel instead of two passes over the
    [tokens, ffn_dim] hidden (the largest activation of a block), and the row scale comes from
    a bound (`_quantize_rows_eager`). Returns the number of GELUs moved."""
    moved = 0
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for act_name, next_name in zip(names, names[1:], strict=False):
            act, layer = seq._modules[act_name], seq._modules[next_name]
            if isinstance(act, nn.GELU) and isinstance(layer, QuantizedLinear) and layer.input_gelu is None:
                layer.input_gelu = act.approximate
                seq._modules[act_name] = nn.Identity()
                moved += 1
    return moved


def quantized_modules(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def set_compute(model: nn.Module, compute: str) -> None:
    """Choose the matmul path of every QuantizedLinear ("auto", "dequant", "fp8")."""
    if compute not in COMPUTE_MODES:
        raise InputError(f"Unknown compute mode {compute!r}.", f"Use one of: {', '.join(COMPUTE_MODES)}.")
    for m in quantized_modules(model).values():
        m.compute = compute


def weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes held by the quantized layers: weights + scales + biases, number of weights in them)."""
    total = count = 0
    for m in quantized_modules(model).values():
        count += m.out_features * m.in_features
        total += sum(t.numel() * t.element_size() for t in (m.weight, m.weight_scale, m.bias) if t is not None)
    return total, count
