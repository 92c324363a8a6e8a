"""The attention kernel contract shared by the models, and its default, PyTorch SDPA.

A kernel is a function `(q, k, v) -> out` on tensors laid out [B, L, heads, head_dim] (the layout
of the official Wan code). Only SDPA is implemented here; the runtime hands a model a faster one
(SageAttention, FlashAttention-3, an fp8 kernel: `WanDiT.set_attention`), so each loaded model
has its own kernel and two models with different kernels coexist in one process.

Inputs are used in the caller's dtype: the DiT casts q/k/v to its compute dtype first (bf16 for a
bf16 model, as the reference's flash-attention call does; fp32 for an fp32 model).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (q8, k8, v, descale_q, descale_k) -> out: a backend's entry for q and k already in fp8.
Fp8QKFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked, non-causal softmax attention with scale 1/sqrt(head_dim).

    q [B, Lq, H, Dh], k and v [B, Lk, H, Dh] -> [B, Lq, H, Dh] in q's dtype.
    """
    # SDPA wants heads before tokens; the transposes are views, SDPA copies as it needs.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def takes_fp8_qk(fn: AttentionFn) -> bool:
    """Whether the kernel `fn` also takes q and k in fp8: it says so with an attribute `fn.fp8_qk`
    (an `Fp8QKFn`). The DiT then writes them in e4m3 straight from its RMSNorm + RoPE kernel,
    instead of in bf16 for the kernel to read, reduce and quantize again."""
    return getattr(fn, "fp8_qk", None) is not None


def dequantize_heads(x8: torch.Tensor, descale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x8 [B, L, H, Dh] float8_e4m3fn, descale [B, H] -> x8 * descale in `dtype` (for a kernel that
    takes 16-bit inputs only)."""
    return (x8.float() * descale[:, None, :, None]).to(dtype)
