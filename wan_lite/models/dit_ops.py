"""The Wan 2.2 DiT's elementwise steps: LayerNorm + modulation, gated residual adds, RMSNorm +
RoPE, the timestep runs and the rotary tables (used by `wan_lite.models.dit`).

Numerics follow the reference run under bf16 autocast (see dit.py's docstring). Each step has an
eager form (`*_fn`: what runs on the CPU, and what the tests compare with) and its one-kernel form
on CUDA (a `Fused`, models/fused.py) with the same roundings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from wan_lite.errors import InputError
from wan_lite.models.fp8_rows import Fp8Rows
from wan_lite.models.fused import Fused

ROPE_THETA = 10000.0
_ROPE_CHUNK_TOKENS = 4096  # bounds the float64 temporaries of the rotation (~16 bytes x D per token)

# A run: tokens [start, end) share, in batch row b, the timestep of table row idx[b] (idx: [B] int64).
Run = tuple[int, int, torch.Tensor]


def gated_add_(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, table: torch.Tensor, runs: list[Run],
               gate: int) -> None:
    """out = x + y * gate in fp32, per run (out [B, l, D] fp32, may be x itself; x, y any float dtype).

    bf16 operands are promoted exactly by the fp32 gate, as in the reference's fp32 island.
    """
    same = out.data_ptr() == x.data_ptr() and out.stride() == x.stride() and out.dtype == x.dtype
    for s, e, idx in runs:
        g = table[idx, gate, None]
        if same:  # in place: the compiled form must not see two aliased arguments
            gated_add_inplace(x[:, s:e], y[:, s:e], g)
        else:
            gated_add_into(out[:, s:e], x[:, s:e], y[:, s:e], g)


def norm_modulate(x: torch.Tensor, table: torch.Tensor, runs: list[Run], shift: int, scale: int, eps: float,
                  dtype: torch.dtype, add: torch.Tensor | None = None, fp8: bool = False) -> torch.Tensor | Fp8Rows:
    """LayerNorm(x) (no affine, fp32 statistics, rounded to x's dtype) * (1 + scale) + shift with
    the run's rows of `table`, rounded to `dtype`, per run in one kernel on CUDA: x [B, l, D] ->
    [B, l, D] in dtype.

    add: y [B, l, D] added to x in place first (`x.add_(y)`, a residual), in the same kernel, so
    the fp32 x is read and written once for both steps.
    fp8: the result as `Fp8Rows` for layers that take it, written in e4m3 by the same kernel with
    one scale per (batch row, run) from a bound of the values (`modulated_multiplier`), so no
    pass over the result is needed to find its scale."""
    if fp8:
        out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
        row_scale = torch.empty(x.shape[:2], dtype=torch.float32, device=x.device)
        kernel = norm_modulate_fp8_into if add is None else add_norm_modulate_fp8_into
    else:
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
        kernel = norm_modulate_into if add is None else add_norm_modulate_into
    for s, e, idx in runs:
        sh, sc = table[idx, shift, None], table[idx, scale, None]  # [B, 1, D]
        residual = () if add is None else (add[:, s:e],)
        if fp8:
            mult = modulated_multiplier(sh, sc)  # [B, 1, 1]
            row_scale[:, s:e] = mult.reciprocal()[:, :, 0]
            kernel(out[:, s:e], x[:, s:e], *residual, sh, sc, eps, mult)
        else:
            kernel(out[:, s:e], x[:, s:e], *residual, sh, sc, eps)
    return Fp8Rows(out, row_scale.reshape(-1, 1), dtype) if fp8 else out


def modulated_multiplier(shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """shift, scale [B, 1, D] fp32 -> the e4m3 multiplier [B, 1, 1] of the modulated LayerNorm.

    LayerNorm (no affine) leaves every token with sum(n^2) <= D, so |n_i| <= sqrt(D), and each
    modulated value within sqrt(D) * |1 + scale_i| + |shift_i| (times 1 + 2^-6 for the bf16
    rounding of n): 448 over the largest of these maps every value to a finite e4m3 number. The
    bound lies some 10-20x above the largest value on random data; e4m3 keeps its relative
    precision at any scale, and only values below about 0.2 % of the RMS become subnormal."""
    bound = (math.sqrt(shift.shape[-1]) * (1 + scale).abs() + shift.abs()).amax(dim=-1, keepdim=True)
    return e4m3_multiplier(bound)


def e4m3_multiplier(bound: torch.Tensor) -> torch.Tensor:
    """448 (the largest e4m3 value) over `bound` raised by 2^-6 for the bf16 roundings on the way:
    the multiplier that maps every value within `bound` to a finite e4m3 number."""
    return 448.0 / (bound * (1 + 2**-6)).clamp(min=1e-30)


# The single-kernel forms (models/fused.py) of the block's elementwise steps; each is the eager
# sequence of operations above, written out so torch.compile sees all of it at once.
def _round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 x rounded to `dtype` and back (`x.to(dtype).float()`), for the roundings the reference
    makes between fp32 steps. For bf16 in integer operations (round to nearest even on the bits;
    finite values): some torch versions' compilers fold a float32 -> bf16 -> float32 pair away."""
    if dtype == torch.float32:
        return x
    if dtype != torch.bfloat16:
        return x.to(dtype).float()
    bits = x.view(torch.int32)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -0x10000
    return bits.view(torch.float32)


def _modulated_f32(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm(x) rounded to x's dtype, then * (1 + scale) + shift, in float32."""
    u = _round_to(F.layer_norm(x.float(), x.shape[-1:], None, None, eps), x.dtype)
    return u * (1 + scale) + shift


def norm_modulate_into_fn(out: torch.Tensor, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                          eps: float) -> None:
    out.copy_(_modulated_f32(x, shift, scale, eps))


def add_norm_modulate_into_fn(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, shift: torch.Tensor,
                               scale: torch.Tensor, eps: float) -> None:
    x.add_(y)
    norm_modulate_into_fn(out, x, shift, scale, eps)


def norm_modulate_fp8_into_fn(out: torch.Tensor, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                               eps: float, mult: torch.Tensor) -> None:
    """The modulated LayerNorm in fp32 times mult [B, 1, 1], written in e4m3 into out."""
    out.copy_((_modulated_f32(x, shift, scale, eps) * mult).to(torch.float8_e4m3fn))


def add_norm_modulate_fp8_into_fn(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, shift: torch.Tensor,
                                   scale: torch.Tensor, eps: float, mult: torch.Tensor) -> None:
    x.add_(y)
    norm_modulate_fp8_into_fn(out, x, shift, scale, eps, mult)


def gated_add_inplace_fn(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> None:
    x.add_(y * gate)


def gated_add_into_fn(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> None:
    out.copy_(x + y * gate)


def _rms_norm_f32(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """WanRMSNorm's result as float32 values (each exactly representable in the result dtype)."""
    xf = x.float()
    n = _round_to(xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps), x.dtype)
    return _round_to(n * weight.float(), torch.promote_types(x.dtype, weight.dtype))


def rms_norm_fn(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _rms_norm_f32(x, weight, eps).to(torch.promote_types(x.dtype, weight.dtype))


def _rms_norm_rope_f32(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor,
                       sin: torch.Tensor) -> torch.Tensor:
    """RoPE(RMSNorm(x) * weight) [B, l, D] in float32, the rotation in fp32; cos, sin [l, Dh/2]."""
    n = _rms_norm_f32(x, weight, eps).unflatten(-1, (-1, cos.shape[-1], 2))  # [B, l, H, Dh/2, 2]
    x0, x1 = n[..., 0], n[..., 1]
    c, sn = cos.float()[None, :, None], sin.float()[None, :, None]
    return torch.stack([x0 * c - x1 * sn, x0 * sn + x1 * c], dim=-1).flatten(2)


def rms_norm_rope_into_fn(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float,
                          cos: torch.Tensor, sin: torch.Tensor) -> None:
    """out [B, l, D] (16-bit) = RoPE(RMSNorm(x) * weight) with fp32 rotation math (as `apply_rope`
    for a 16-bit result); cos, sin [l, Dh/2]."""
    out.copy_(_rms_norm_rope_f32(x, weight, eps, cos, sin))


def rms_norm_rope_fp8_into_fn(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float,
                               cos: torch.Tensor, sin: torch.Tensor, mult: torch.Tensor) -> None:
    """`rms_norm_rope_into_fn`'s rotation (fp32), times `mult` [D] (a multiplier per channel) and
    written in e4m3 into out [B, l, D] float8_e4m3fn: q or k for an fp8 attention kernel."""
    out.copy_((_rms_norm_rope_f32(x, weight, eps, cos, sin) * mult).to(torch.float8_e4m3fn))


def layer_norm_fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float,
                   dtype: torch.dtype) -> torch.Tensor:
    """The reference's result in x's dtype, then cast to `dtype` (the block's compute dtype), in
    one pass: fp32 residual in, bf16 out, without writing and re-reading an fp32 copy."""
    return F.layer_norm(x.float(), x.shape[-1:], w.float(), b.float(), eps).to(x.dtype).to(dtype)


def layer_norm_fp8_fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float,
                      mult: torch.Tensor) -> torch.Tensor:
    """The reference's result in x's dtype, in fp32 times mult ([] float32), in e4m3."""
    y = F.layer_norm(x.float(), x.shape[-1:], w.float(), b.float(), eps).to(x.dtype)
    return (y.float() * mult).to(torch.float8_e4m3fn)


def affine_multiplier(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The e4m3 multiplier ([] float32) of an affine LayerNorm's output: every value lies within
    sqrt(D) * |w_i| + |b_i| (`modulated_multiplier`'s argument, with w for 1 + scale)."""
    return e4m3_multiplier((math.sqrt(w.shape[-1]) * w.float().abs() + b.float().abs()).amax())


norm_modulate_into = Fused(norm_modulate_into_fn)
add_norm_modulate_into = Fused(add_norm_modulate_into_fn)
norm_modulate_fp8_into = Fused(norm_modulate_fp8_into_fn)
add_norm_modulate_fp8_into = Fused(add_norm_modulate_fp8_into_fn)
gated_add_inplace = Fused(gated_add_inplace_fn)
gated_add_into = Fused(gated_add_into_fn)
rms_norm = Fused(rms_norm_fn)
rms_norm_rope_into = Fused(rms_norm_rope_into_fn)
rms_norm_rope_fp8_into = Fused(rms_norm_rope_fp8_into_fn)
layer_norm = Fused(layer_norm_fn)
layer_norm_fp8 = Fused(layer_norm_fp8_fn)


def clip_runs(runs: list[Run], start: int, end: int) -> list[Run]:
    """The runs restricted to tokens [start, end), re-based to start at 0."""
    return [(max(s, start) - start, min(e, end) - start, idx) for s, e, idx in runs if s < end and e > start]


def timestep_runs(t: torch.Tensor, batch: int, tokens: int) -> tuple[torch.Tensor, list[Run]]:
    """Distinct timestep values and the token runs using them.

    t [B] (or [1]) or [B, L] -> (values [U] in t's dtype, runs). Runs are maximal token ranges in
    which every batch row keeps one value; TI2V gives two runs (frame 0 at t=0, the rest).
    """
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2 or t.shape[0] not in (1, batch) or t.shape[1] not in (1, tokens):
        raise InputError(
            f"Timesteps of shape {list(t.shape)} do not fit {batch} sample(s) of {tokens} tokens.",
            "Pass t as [B] or [B, tokens].",
        )
    values, inverse = torch.unique(t.expand(batch, -1), return_inverse=True)
    if inverse.shape[1] == 1:
        return values, [(0, tokens, inverse[:, 0])]
    change = (inverse[:, 1:] != inverse[:, :-1]).any(dim=0)
    starts = [0] + (torch.nonzero(change).flatten() + 1).tolist()
    ends = starts[1:] + [tokens]
    return values, [(s, e, inverse[:, s]) for s, e in zip(starts, ends, strict=True)]


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[U] timesteps -> [U, dim] float32 embedding [cos | sin], frequencies 10000^(-k/half), in float64."""
    half = dim // 2
    pos = t.to(torch.float64)
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device).div(half))
    angles = torch.outer(pos, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


def rope_table(grid: tuple[int, int, int], head_dim: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [F*h*w, head_dim/2] float64 for the token grid, (frame | height | width) channels."""
    d = head_dim
    axis_dims = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))  # 44, 42, 42 real channels for 128
    f, h, w = grid
    parts = []
    for axis, (n, ad) in enumerate(zip(grid, axis_dims, strict=True)):
        inv = 1.0 / torch.pow(ROPE_THETA, torch.arange(0, ad, 2, dtype=torch.float64, device=device).div(ad))
        ang = torch.outer(torch.arange(n, dtype=torch.float64, device=device), inv)  # [n, ad/2]
        view = [1, 1, 1, -1]
        view[axis] = n
        parts.append(ang.view(view).expand(f, h, w, -1))
    angles = torch.cat(parts, dim=-1).reshape(f * h * w, -1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rotate channel pairs (2k, 2k+1) of x [B, L, H, Dh] by the token's angles -> [B, L, H, Dh] in `dtype`.

    For an fp32 result: float64 math rounded to fp32, exactly the reference's RoPE output. For a
    16-bit result (what the reference's attention call rounds it to): one fp32 complex multiply,
    whose error (~1e-7) lies far below the 16-bit rounding that follows, in 3 vectorised kernels
    instead of a dozen strided float64 ones. Chunked so no full-size temporary of q/k is held.
    """
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    if dtype == torch.float32:
        for s in range(0, x.shape[1], _ROPE_CHUNK_TOKENS):
            e = min(s + _ROPE_CHUNK_TOKENS, x.shape[1])
            x0, x1 = x[:, s:e].double().unflatten(-1, (-1, 2)).unbind(-1)  # [B, l, H, Dh/2] each
            c, sn = cos[None, s:e, None], sin[None, s:e, None]
            out[:, s:e, :, 0::2] = (x0 * c - x1 * sn).float()
            out[:, s:e, :, 1::2] = (x0 * sn + x1 * c).float()
        return out
    step = 2 * _ROPE_CHUNK_TOKENS  # fp32 temporaries are half the size of float64 ones
    for s in range(0, x.shape[1], step):
        e = min(s + step, x.shape[1])
        rot = torch.complex(cos[s:e].float(), sin[s:e].float())[None, :, None]  # [1, l, 1, Dh/2]
        xc = torch.view_as_complex(x[:, s:e].float().unflatten(-1, (-1, 2)))
        out[:, s:e] = torch.view_as_real(xc * rot).flatten(-2)
    return out
