"""Multi-head attention entry point shared by the models, with a swappable kernel.

`attention(q, k, v)` runs the active backend on tensors laid out [B, L, heads, head_dim] (the
layout of the official Wan code). Only PyTorch SDPA is implemented here; the runtime may
register a faster kernel (flash / sage attention) with `register_attention_backend` and select
it with `set_attention_backend`, without the models knowing.

Inputs are used in the caller's dtype: the DiT casts q/k/v to its compute dtype first (bf16 for a
bf16 model, as the reference's flash-attention call does; fp32 for an fp32 model).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from wan_lite.errors import InputError

logger = logging.getLogger(__name__)

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


_BACKENDS: dict[str, AttentionFn] = {"sdpa": sdpa_attention}
_active: str = "sdpa"


def register_attention_backend(name: str, fn: AttentionFn) -> None:
    """Make `fn` (same contract as `sdpa_attention`) selectable under `name`. An fp8 kernel may
    also take q and k already quantized: it says so with an attribute `fn.fp8_qk` (an `Fp8QKFn`,
    the contract of `attention_fp8_qk`)."""
    _BACKENDS[name] = fn


def available_attention_backends() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def set_attention_backend(name: str) -> None:
    """Select the kernel every later `attention` call uses."""
    global _active
    if name not in _BACKENDS:
        raise InputError(
            f"Unknown attention backend {name!r}.",
            f"Choose one of: {', '.join(_BACKENDS)}.",
        )
    if name != _active:
        logger.info("attention backend: %s", name)
    _active = name


def get_attention_backend() -> str:
    return _active


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B, Lq, H, Dh], k/v [B, Lk, H, Dh] -> [B, Lq, H, Dh], with the active backend."""
    return _BACKENDS[_active](q, k, v)


def takes_fp8_qk() -> bool:
    """Whether the active backend also takes q and k in fp8 (`attention_fp8_qk`): the DiT then
    writes them in e4m3 straight from its RMSNorm + RoPE kernel, instead of in bf16 for the
    kernel to read, reduce and quantize again."""
    return getattr(_BACKENDS[_active], "fp8_qk", None) is not None


def attention_fp8_qk(q8: torch.Tensor, k8: torch.Tensor, v: torch.Tensor, descale_q: torch.Tensor,
                     descale_k: torch.Tensor) -> torch.Tensor:
    """q8 [B, Lq, H, Dh] and k8 [B, Lk, H, Dh] float8_e4m3fn with q ~= q8 * descale_q[b, h] (descales
    [B, H] float32), v [B, Lk, H, Dh] in the compute dtype -> [B, Lq, H, Dh] in v's dtype, with the
    active backend (which must `takes_fp8_qk`)."""
    return _BACKENDS[_active].fp8_qk(q8, k8, v, descale_q, descale_k)  # type: ignore[attr-defined]


def dequantize_heads(x8: torch.Tensor, descale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x8 [B, L, H, Dh] float8_e4m3fn, descale [B, H] -> x8 * descale in `dtype` (for a kernel that
    takes 16-bit inputs only)."""
    return (x8.float() * descale[:, None, :, None]).to(dtype)
