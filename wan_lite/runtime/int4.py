"""The "int4" weight format: 4-bit codes in groups of 64 along a row, NF4 levels, bf16 scales.

A weight [out, in] is cut into groups of INT4_GROUP = 64 consecutive inputs of one row. Each
group keeps its largest magnitude as its scale (bfloat16) and each weight the 4-bit code of the
nearest of 16 fixed levels in [-1, 1] times that scale. Two codes share a byte: byte j of a row
holds input 2j in its low nibble and input 2j+1 in its high one. Stored as
    packed [out, G * 32] uint8, scale [out, G] bfloat16,  G = ceil(in / 64)
that is 0.5 + 2/64 = 0.53 bytes per weight, against int8's 1 + 4/in. A row whose length is not a
multiple of 64 is padded with zeros to the next one (its last group codes the zeros as level 0,
which is exactly 0); dequantization cuts the padding off, so any Linear can be int4.

Why the NF4 levels (the normal-quantile levels of QLoRA, as bitsandbytes' NF4 has them) and not
the uniform integers -7..7 times amax/7: for the same bytes and the same one-pass dequantization
(a 16-entry table lookup instead of an integer cast), the weight error is lower. Measured on
5120 x 5120 matrices (rel. L2 of the weight and of x @ W.T, x ~ N(0, 1)): N(0, 0.02) weights
NF4 0.092 / uniform -7..7 0.108 / uniform -8..7 (GGUF Q4_0's) 0.095; Student-t (3 degrees of
freedom, heavier tails like a trained layer's) 0.123 / 0.180 / 0.160. int8 per row: 0.009 / 0.048.
Uniformly distributed weights (a freshly initialised nn.Linear) are the one case the uniform
levels serve better (0.070 against NF4's 0.091); trained weights are bell-shaped, which is what
the NF4 levels are made for.

Why bfloat16 scales: quantization divides by the scale as stored, so its rounding moves the grid
a little but adds no error (the errors with fp32, fp16 and bf16 scales agree to 1e-5); bf16 has
float32's exponent range (no fp16 underflow of a group of tiny weights) and takes 2 bytes.

Dequantization is one pass: each byte looks up its two levels in a 256 x 2 float32 table, the
product with the group's scale is computed in float32 and rounded once to the activation dtype.
On CUDA `quant.dequantize_weight` runs it compiled into one kernel (`Fused`, as int8's; its speed
on a GPU is not measured yet); on the CPU the same function runs eagerly a bounded number of rows
at a time, so no float32 copy of a whole matrix is made.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INT4_GROUP = 64
SCALE_DTYPE = torch.bfloat16
# The NF4 levels (QLoRA, arXiv 2305.14314, appendix E; bitsandbytes' table): code 7 is exactly 0,
# codes 0 and 15 are -1 and 1 (the group's largest magnitude lands on one of them).
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
# Rows handled at once by the eager paths: float32 temporaries of about this many weights.
_CHUNK_WEIGHTS = 1 << 22

_TABLES: dict[tuple[torch.device, tuple[float, ...]], tuple[torch.Tensor, torch.Tensor]] = {}


def groups(in_features: int) -> int:
    """Groups per row: in_features / 64, rounded up (the last one padded with zeros)."""
    return -(-in_features // INT4_GROUP)


def shapes(out_features: int, in_features: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(packed shape, scale shape) of an [out, in] weight."""
    g = groups(in_features)
    return (out_features, g * INT4_GROUP // 2), (out_features, g)


def _tables(device: torch.device, levels: tuple[float, ...] = NF4_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """(pairs [256, 2] float32: byte -> (level of its low nibble, level of its high one),
    midpoints [15] float32 between neighbouring levels), made once per device."""
    key = (torch.device(device), levels)
    if key not in _TABLES:
        lv = torch.tensor(levels, dtype=torch.float32)
        codes = torch.arange(256)
        pairs = torch.stack((lv[codes & 15], lv[codes >> 4]), dim=-1)
        _TABLES[key] = pairs.to(device), ((lv[1:] + lv[:-1]) / 2).to(device)
    return _TABLES[key]


def quantize(weight: torch.Tensor, levels: tuple[float, ...] = NF4_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] (any float dtype, any device) -> (packed [out, G*32] uint8, scale [out, G]
    bfloat16), computed in float32 a bounded number of rows at a time. A group of zeros gets
    scale 1 and code 7 (level 0): it dequantizes to exact zeros. `levels`: 16 increasing values in
    [-1, 1] (for comparisons; the format is NF4_LEVELS)."""
    w = weight.detach()
    out_f, in_f = w.shape
    g = groups(in_f)
    (_o, half), _ = shapes(out_f, in_f)
    packed = torch.empty(out_f, half, dtype=torch.uint8, device=w.device)
    scale = torch.empty(out_f, g, dtype=SCALE_DTYPE, device=w.device)
    _pairs, mids = _tables(w.device, levels)
    step = max(1, _CHUNK_WEIGHTS // (g * INT4_GROUP))
    for i in range(0, out_f, step):
        rows = w[i : i + step].to(torch.float32)
        if g * INT4_GROUP != in_f:
            rows = F.pad(rows, (0, g * INT4_GROUP - in_f))
        rows = rows.view(rows.shape[0], g, INT4_GROUP)
        s = rows.abs().amax(dim=-1).to(SCALE_DTYPE)
        s = torch.where(s > 0, s, torch.ones_like(s))
        # the nearest level of each weight over the scale as stored (a tie goes to the lower one)
        codes = torch.bucketize(rows / s.float()[..., None], mids, out_int32=True).view(rows.shape[0], half, 2)
        packed[i : i + step] = (codes[..., 0] | (codes[..., 1] << 4)).to(torch.uint8)
        scale[i : i + step] = s
    return packed, scale


def dequantize_rows(packed: torch.Tensor, scale: torch.Tensor, pairs: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """packed [R, G*32] uint8, scale [R, G], pairs (`_tables`) -> [R, G*64] in `dtype`: level x
    scale in float32, rounded once. Pure tensor code: `quant` compiles it on CUDA (one kernel)."""
    rows, g = scale.shape
    levels = F.embedding(packed.to(torch.int32), pairs)  # [R, G*32, 2] float32
    w = levels.view(rows, g, INT4_GROUP) * scale.to(torch.float32)[..., None]
    return w.to(dtype).view(rows, g * INT4_GROUP)


def dequantize_eager(packed: torch.Tensor, scale: torch.Tensor, pairs: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """`dequantize_rows` a bounded number of rows at a time into one output (the same numbers,
    float32 temporaries of at most _CHUNK_WEIGHTS weights instead of the whole matrix's)."""
    rows, width = packed.shape[0], 2 * packed.shape[1]
    out = torch.empty(rows, width, dtype=dtype, device=packed.device)
    step = max(1, _CHUNK_WEIGHTS // max(1, width))
    for i in range(0, rows, step):
        out[i : i + step] = dequantize_rows(packed[i : i + step], scale[i : i + step], pairs, dtype)
    return out


def pairs_table(device: torch.device) -> torch.Tensor:
    """The byte -> two levels table of the format on `device`."""
    return _tables(device)[0]
