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
    """Make `fn` (same contract as `sdpa_attention`) selectable under `name`."""
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
