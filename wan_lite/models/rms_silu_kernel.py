"""The VAE's RMS norm then SiLU in one hand-written Triton kernel, over channels-last activations.

Every VAE ResidualBlock and head runs `silu(x / ||x|| * sqrt(C) * gamma)` over the channels of each
pixel before its 3x3x3 convolution. In eager PyTorch that is five passes over the activation (the
float32 norm, the bf16 inverse applied with a broadcast, the broadcast gamma, the SiLU) and the
broadcasts run PyTorch's slow strided kernel: on an H100 these took about 0.75 s of a 4.2 s
TI2V-5B 720p decode (bench/results/2026-12-06-c), against 2.7 s of convolutions. In the VAE's
channels-last layout (NDHWC) each pixel's C values are contiguous, so one program reads a block of
pixel rows once, reduces each row in float32, and writes the activated values once, in the padded
buffer the causal convolution reads (`vae_common._time_padded`).

The values are computed in float32 and rounded once; the eager form rounds the inverse norm, the
normalised values and the gamma product to the activation dtype in turn. So in bf16 the two differ
by a bf16 rounding, and this one is the closer to the float32 result (tests/test_vae.py). In
float32 they agree to float32 rounding.

The same kernel adds the bias of the convolution that made x, and `add_rows` is the residual sum
h += s + bias of a ResidualBlock: the block's convolutions leave their biases to these two
(`vae_common.ResidualBlock`), since cuDNN adds a bias in a separate broadcast pass that PyTorch
runs with its strided kernel (0.44 s of a 3.7 s decode, bench/results/2026-12-06-d).

`takes(x, out)` says when it runs: Triton installed, CUDA tensors, the fused forms on
(`models.fused.set_fusion`), x and out each a batch of [rows, C] blocks with contiguous rows (the
channels-last layout, also the time slice of a padded buffer). Everywhere else the eager form runs.
"""

from __future__ import annotations

import contextlib

import torch

try:  # Triton ships with torch's CUDA wheels on Linux; elsewhere the eager form runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

from wan_lite.models import fused

MAX_CHANNELS = 4096  # one row in registers (the Wan VAEs have at most 1024 channels)
_BLOCK_ELEMENTS = 4096  # values per program: BLOCK_C channels x BLOCK_R rows


def _rows_view(t: torch.Tensor) -> torch.Tensor | None:
    """t [B, C, ...] as a view [B, rows, C] with contiguous rows, or None where its layout is not
    channels-last within each batch element."""
    if t.dim() < 3:
        return None
    b, c, n = t.shape[0], t.shape[1], t[0, 0].numel() if t.numel() else 0
    try:
        rows = t.movedim(1, -1).view(b, n, c)
    except RuntimeError:  # the pixels of one batch element are not evenly spaced
        return None
    if (n > 1 and rows.stride(1) != c) or (c > 1 and rows.stride(2) != 1):
        return None
    return rows


def takes(x: torch.Tensor, out: torch.Tensor | None = None) -> bool:
    """Whether the kernel computes silu(norm(x)) for these tensors (see the module's docstring)."""
    if triton is None or not x.is_cuda or not fused.fusion_enabled():
        return False
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or x.shape[1] > MAX_CHANNELS:
        return False
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype or out.device != x.device):
        return False
    return _rows_view(x) is not None and (out is None or _rows_view(out) is not None)


if triton is not None:
    @triton.jit
    def _block(n_rows, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's (batch element, offsets [BLOCK_R, BLOCK_C] of its rows within it, mask,
        column indices): program (i, b) takes rows i*BLOCK_R... of batch element b."""
        batch = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < C)
        return batch, rows[:, None] * C + cols[None, :], mask, cols

    @triton.jit
    def _rms_silu_kernel(x_ptr, out_ptr, gamma_ptr, bias_ptr, n_rows, C, x_batch_stride, out_batch_stride,
                         scale, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr):
        batch, offs, mask, cols = _block(n_rows, C, BLOCK_R, BLOCK_C)
        x = tl.load(x_ptr + batch * x_batch_stride + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:  # the bias of the convolution that made x (0 in the padding columns)
            x = x + tl.load(bias_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
        inv = scale / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)
        gamma = tl.load(gamma_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
        y = x * inv[:, None] * gamma[None, :]
        y = y / (1.0 + tl.exp(-y))
        tl.store(out_ptr + batch * out_batch_stride + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _add_rows_kernel(h_ptr, s_ptr, bias_ptr, n_rows, C, h_batch_stride, s_batch_stride,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        batch, offs, mask, cols = _block(n_rows, C, BLOCK_R, BLOCK_C)
        h = tl.load(h_ptr + batch * h_batch_stride + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + batch * s_batch_stride + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(bias_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
        tl.store(h_ptr + batch * h_batch_stride + offs, (h + s + b[None, :]).to(h_ptr.dtype.element_ty),
                 mask=mask)


def _launch(kernel, first: torch.Tensor, second: torch.Tensor, vectors: tuple[torch.Tensor, ...],
            *args: object, **meta: object) -> None:
    """Run `kernel` over the [B, rows, C] views of `first` and `second` (both `_rows_view`-able, the
    same shape): kernel(first, second, *vectors, rows, C, first's and second's batch strides,
    *args, BLOCK_R, BLOCK_C, **meta), one program per BLOCK_R rows of each batch element."""
    one, two = _rows_view(first), _rows_view(second)
    assert one is not None and two is not None, "the VAE kernels need channels-last rows (takes)"
    b, n, c = one.shape
    if b * n * c == 0:
        return
    block_c = triton.next_power_of_2(c)
    block_r = max(1, _BLOCK_ELEMENTS // block_c)
    vecs = [v.reshape(-1).to(device=first.device).contiguous() for v in vectors]
    # the device guard; off CUDA only under TRITON_INTERPRET=1, which runs the kernels on the CPU (tests)
    with torch.cuda.device(first.device) if first.is_cuda else contextlib.nullcontext():
        kernel[(triton.cdiv(n, block_r), b)](
            one, two, *vecs, n, c, one.stride(0), two.stride(0), *args, BLOCK_R=block_r, BLOCK_C=block_c,
            num_warps=4 if block_c * block_r <= 4096 else 8, **meta)


def rms_silu(x: torch.Tensor, gamma: torch.Tensor, scale: float, out: torch.Tensor | None = None,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu(y / max(||y||_2 over dim 1, 1e-12) * scale * gamma) with y = x (+ bias, per channel) for
    x [B, C, ...] with `takes(x, out)`; gamma and bias hold C values. Written into `out` when
    given, else into a new tensor in x's layout."""
    if out is None:
        out = torch.empty_like(x)  # keeps the channels-last strides
    # without a bias the kernel never reads its bias vector: gamma stands in for it
    _launch(_rms_silu_kernel, x, out, (gamma, gamma if bias is None else bias), float(scale),
            HAS_BIAS=bias is not None)
    return out


def takes_sum(h: torch.Tensor, s: torch.Tensor) -> bool:
    """Whether `add_rows(h, s, bias)` runs the kernel for these tensors."""
    return (takes(h) and s.shape == h.shape and s.dtype == h.dtype and s.device == h.device
            and _rows_view(s) is not None)


def add_rows(h: torch.Tensor, s: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """h += s + bias (bias per channel of dim 1), in one pass over h and s (`takes_sum(h, s)`)."""
    _launch(_add_rows_kernel, h, s, (bias,))
    return h
