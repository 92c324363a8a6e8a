"""fp8 row quantization of a GEMM's input in one hand-written Triton kernel, GELU first if asked.

`quant._quantize_rows` hands an [M, K] activation here when `takes(x)` (Triton is installed, x is
on a CUDA GPU, its rows are contiguous, and the fused forms are on: `models.fused.set_fusion`) and
the GPU has fp8 tensor cores (`quant._fp8_tensor_cores`). Everywhere else the compiled (or eager) `quant._quantize_rows_eager`
runs. One program per row reads the row once into registers (up to `ONE_PASS_MAX` values, every
width of the Wan DiTs; wider rows are read twice), takes its bound, and writes the e4m3 values
and the row's scale: x ~= x8 * scale.

- Without a GELU the bound is the row's max-abs; with one, max(max(x), `neg_bound`): GELU(v) <= v
  above 0 and |GELU(v)| < neg_bound below it (`quant._quantize_rows_eager` says why this bound).
- The multiplier target / bound and the product stay in fp32, rounded once, to e4m3 (the compiled
  form rounds the GELU to bf16 and multiplies by a bf16 multiplier first): the same error against
  the exact values, a little lower (bench/results/2026-12-04-zg: 2.648 % vs 2.668 %).
- The tanh GELU (the DiT's FFN) uses the GPU's tanh instruction (`tanh.approx.f32`, relative error
  about 2^-11, far inside e4m3's step of 2^-4); the erf GELU, Triton's erf.

Why not the compiled form alone: torch.compile's reduction evaluates the GELU slowly enough to be
compute-bound. On an H200 (run zg) it took 618 us for a TI2V-5B FFN input (27280 x 14336 bf16) and
2523 us at A14B 720p (75600 x 13824), 2.1x and 3.2x the memory-traffic time; this kernel takes 294
and 788 us, the traffic time.
"""

from __future__ import annotations

import torch

try:  # Triton ships with torch's CUDA wheels on Linux; elsewhere the compiled form runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

from wan_lite.models import fused

ONE_PASS_MAX = 16384  # row width read once into registers (8 warps: 64 fp32 values per thread)
_TWO_PASS_BLOCK = 2048
_GELUS = {None: 0, "tanh": 1, "none": 2}  # `approximate` of nn.GELU -> the kernel's GELU code


def takes(x: torch.Tensor, gelu: str | None = None) -> bool:
    """Whether this kernel quantizes x (2-d, rows contiguous, 16/32-bit float, on a CUDA GPU; the
    caller checks that it has fp8 tensor cores)."""
    if triton is None or not x.is_cuda or not fused.fusion_enabled() or gelu not in _GELUS:
        return False
    return x.dim() == 2 and x.stride(1) == 1 and x.dtype in (torch.bfloat16, torch.float16, torch.float32)


if triton is not None:
    @triton.jit
    def _gelu(x, GELU: tl.constexpr):
        if GELU == 1:
            z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            th = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [z], dtype=tl.float32,
                                           is_pure=True, pack=1)
            x = 0.5 * x * (1.0 + th)
        elif GELU == 2:
            x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
        return x

    @triton.jit
    def _bound(x, mask, GELU: tl.constexpr):
        # masked lanes load as 0; under a GELU the bound is max(x), so they must not count
        if GELU == 0:
            b = tl.max(tl.abs(x), axis=0)
        else:
            b = tl.max(tl.where(mask, x, float("-inf")), axis=0)
        return b

    @triton.jit
    def _quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, K, row_stride, target, low,
                              BLOCK: tl.constexpr, ONE_PASS: tl.constexpr, GELU: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        src, dst = x_ptr + row * row_stride, out_ptr + row * K
        if ONE_PASS:
            offs = tl.arange(0, BLOCK)
            mask = offs < K
            x = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
            inv = target / tl.maximum(_bound(x, mask, GELU), low)
            tl.store(dst + offs, (_gelu(x, GELU) * inv).to(tl.float8e4nv), mask=mask)
        else:
            top = tl.zeros([], tl.float32) + low
            for k0 in range(0, K, BLOCK):
                offs = k0 + tl.arange(0, BLOCK)
                mask = offs < K
                top = tl.maximum(top, _bound(tl.load(src + offs, mask=mask, other=0.0).to(tl.float32), mask, GELU))
            inv = target / top
            for k0 in range(0, K, BLOCK):
                offs = k0 + tl.arange(0, BLOCK)
                mask = offs < K
                x = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(dst + offs, (_gelu(x, GELU) * inv).to(tl.float8e4nv), mask=mask)
        tl.store(scale_ptr + row, 1.0 / inv)


def quantize_rows(x: torch.Tensor, gelu: str | None, target: float, neg_bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (`takes(x, gelu)`) -> (x8 [M, K] float8_e4m3fn, scale [M, 1] fp32), x8 * scale ~= x
    (or ~= GELU(x)), each row's largest value at `target`. neg_bound: the GELU's bound below 0."""
    m, k = x.shape
    out = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        return out, scale.fill_(1.0)
    one_pass = k <= ONE_PASS_MAX
    block = triton.next_power_of_2(k) if one_pass else _TWO_PASS_BLOCK
    low = neg_bound if gelu is not None else 1e-12  # an all-zero row gets a finite scale
    with torch.cuda.device(x.device):
        _quantize_rows_kernel[(m,)](x, out, scale, k, x.stride(0), target, low,
                                    BLOCK=block, ONE_PASS=one_pass, GELU=_GELUS[gelu], num_warps=8)
    return out, scale
