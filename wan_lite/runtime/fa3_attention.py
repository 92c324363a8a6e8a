"""FlashAttention-3 for the DiT on Hopper GPUs (H100/H200), in bf16 and in fp8 (optional).

`fa3_backend(fp8=False)` returns a kernel with the contract of
`wan_lite.models.attention.sdpa_attention`, or None where FlashAttention-3 cannot run
(`fa3_unavailable_reason` says why). Why: on an H200, PyTorch's SDPA runs cuDNN's bf16 attention at
about 600 TFLOP/s and attention is half of a TI2V-5B forward and three quarters of an A14B one at
720p; FlashAttention-3 is written for Hopper's tensor-memory-accelerator and warp-group matrix
instructions, and its fp8 forward is reported at over 1 PFLOP/s.

It comes from a prebuilt wheel, an optional dependency imported only when asked: the upstream
Hopper build (`flash_attn_interface`, the package flash-attn-3) or the forward-only build on PyPI
(`pip install fa3-fwd`, module `fa3_fwd_interface`, built against PyTorch's stable ABI and CUDA 13:
nothing is compiled on the user's machine). Both take [batch, tokens, heads, head_dim], our layout,
so there are no transposes. FlashAttention-3 runs on compute capability 9.x only: Ampere, Ada
(RTX 30xx/40xx) and Blackwell keep SDPA.

fp8 (`fp8=True`, for plans that compute in fp8): q, k and v are quantized to float8_e4m3fn with
one scale per (batch entry, head), the descale layout FlashAttention-3 takes ([batch, heads]
float32), on the GPU without a host synchronisation: multiplier m = 448 / amax rounded to the
input dtype (the multiply runs in it), descale = 1 / m. Fused into few kernels by torch.compile
where Triton is available. The kernel writes bf16. Key sequences shorter than
`fp8_attention.MIN_KEYS` (the 512-token text cross-attention) run SDPA: quantizing the long q costs
more than fp8 saves there. The fp8 kernel also takes q and k already in e4m3 with their
[batch, heads] descales (its `fp8_qk` entry, `models.attention.attention_fp8_qk`): the DiT then
writes them so from its RoPE kernel with static per-head scales (`WanSelfAttention.fp8_qk_scales`)
and only v is quantized here.

Anything a kernel does not take (other dtypes, head sizes, CPU tensors, autograd) runs
`sdpa_attention`; a shape whose call raises runs SDPA for the rest of the process after one log
line; out-of-memory is re-raised for the caller's memory plan. Forward only. Extra memory per fp8
call: one byte per element of q, k and v.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

from wan_lite.models.attention import AttentionFn, Fp8QKFn, dequantize_heads, sdpa_attention
from wan_lite.models.fused import Fused
from wan_lite.runtime.fp8_attention import _E4M3_MAX, _MIN_AMAX, MIN_KEYS, _first_line, input_refusal

log = logging.getLogger(__name__)

# Import names of the builds that provide `flash_attn_func(q, k, v, ..., q_descale=, k_descale=,
# v_descale=)`, first found wins: upstream's Hopper package, then the forward-only PyPI wheel.
MODULES = ("flash_attn_interface", "fa3_fwd_interface")
INSTALL_HINT = "optional: pip install fa3-fwd"
HEAD_DIMS = (64, 96, 128, 192, 256)
_DTYPES = (torch.bfloat16,)  # the PyPI build leaves out fp16; the DiT computes in bf16


_loaded: dict[str, Any] = {}  # "fn" -> flash_attn_func once imported; "error" -> why not


def _flash_attn_func() -> Callable[..., Any]:
    """The installed build's `flash_attn_func` (imported once); raises when none is installed or loads."""
    if "fn" in _loaded:
        return _loaded["fn"]
    errors = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:  # the package is there but something it needs is not
                errors.append(f"{name}: {err}")
            continue
        except Exception as err:  # a build for another torch or CUDA: its extension does not load
            errors.append(f"{name}: {type(err).__name__}: {err}")
            continue
        fn = getattr(module, "flash_attn_func", None)
        if callable(fn):
            _loaded["fn"] = fn
            return fn
        errors.append(f"{name} has no flash_attn_func")
    if errors:
        raise ImportError("; ".join(errors))
    raise ModuleNotFoundError("FlashAttention-3 is not installed")


def _capability(device: torch.device | str | None) -> tuple[int, int] | None:
    """`device`'s compute capability (default: the current CUDA device); None when it is no CUDA GPU."""
    if not torch.cuda.is_available():
        return None
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    if dev.type != "cuda":
        return None
    return torch.cuda.get_device_capability(dev.index if dev.index is not None else torch.cuda.current_device())


def fa3_unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why FlashAttention-3 cannot run on `device` (default: the current CUDA device), as a clause
    for a note ("it ..."); None when it can. The GPU is asked first: on anything but Hopper the
    package is not even imported."""
    if not torch.cuda.is_available():
        return "it needs a CUDA GPU and none is available"
    capability = _capability(device)
    if capability is None:
        return f"it needs a CUDA GPU (running on {device})"
    if capability[0] != 9:
        return f"it runs on Hopper GPUs (compute capability 9.x) only; this one is {capability[0]}.{capability[1]}"
    try:
        _flash_attn_func()
    except ModuleNotFoundError:
        return f"it is not installed ({INSTALL_HINT})"
    except Exception as err:
        return f"it is installed but does not load ({_first_line(err)})"
    return None


def is_hopper(device: torch.device | str | None = None) -> bool:
    """Whether `device` is a CUDA GPU of compute capability 9.x (where FlashAttention-3 would run)."""
    capability = _capability(device)
    return capability is not None and capability[0] == 9


# ------------------------------------------------------------------------------------------
# Quantization


def _quantize_heads_eager(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, L, H, D] (bf16/fp16/fp32) -> (x8 float8_e4m3fn [B, L, H, D], descale [B, H] fp32),
    x[b, :, h] ~= x8[b, :, h] * descale[b, h].

    One scale per batch entry and head: the multiplier m = 448 / amax is rounded to x's dtype (the
    multiply runs in it) and kept below that dtype's largest value, so each head's amax element
    lands on 448 and descale = 1 / m is amax / 448 up to m's rounding."""
    # max |x| over each token's head vector (contiguous rows), then over tokens: the same value as
    # one reduction over (L, D), which compiles to a slow strided kernel (H200: 3 ms per A14B block)
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=3).amax(dim=1).float()
    mult = (_E4M3_MAX / amax.clamp(min=_MIN_AMAX)).clamp(max=torch.finfo(x.dtype).max).to(x.dtype)
    x8 = (x * mult[:, None, :, None]).to(torch.float8_e4m3fn)
    return x8, mult.float().reciprocal()


def _quantize_qkv_heads_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(q8, k8, v8, descale_q, descale_k, descale_v), each tensor with its own per-head scales."""
    q8, dq = _quantize_heads_eager(q)
    k8, dk = _quantize_heads_eager(k)
    v8, dv = _quantize_heads_eager(v)
    return q8, k8, v8, dq, dk, dv


_quantize_qkv_heads = Fused(_quantize_qkv_heads_eager, exact_casts=False)
_quantize_heads = Fused(_quantize_heads_eager, exact_casts=False)


# ------------------------------------------------------------------------------------------
# The kernels


def _refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why these inputs are not for FlashAttention-3; None when they are."""
    return input_refusal(q, k, v, _DTYPES, HEAD_DIMS)


_LOCK = threading.Lock()
_FAILED: dict[tuple, str] = {}  # (kind, device, shapes, dtype) -> why its call raised


def _attempt(key: tuple, kind: str, q: torch.Tensor, k: torch.Tensor, strict: bool,
             run: Callable[[], torch.Tensor], fallback: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`run()`, unless this shape (`key`) raised before; when it raises (not out-of-memory, which
    the caller's memory plan must handle: SDPA would need memory too) the shape is remembered and
    logged once, and `fallback()` runs now and from then on (strict: raise instead)."""
    failed = _FAILED.get(key)
    if failed is not None:
        if strict:
            raise RuntimeError(f"FlashAttention-3 ({kind}) failed on this shape before: {failed}")
        return fallback()
    try:
        return run()
    except torch.OutOfMemoryError:
        raise
    except Exception as err:
        reason = _first_line(err)
        with _LOCK:
            first = key not in _FAILED
            _FAILED[key] = reason
        if first:
            log.info("FlashAttention-3 (%s) is not used for q %s, k %s on %s: %s. This shape runs PyTorch "
                     "SDPA from now on.", kind, list(q.shape), list(k.shape), q.device, reason)
        if strict:
            raise
        return fallback()


def _guarded(fp8: bool, strict: bool, run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
             ) -> AttentionFn:
    """`run` behind the input checks, the short-key rule (fp8), and the fall back to SDPA."""
    kind = "fp8" if fp8 else "bf16"

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        why = _refusal(q, k, v)
        if why is not None:
            if strict:
                raise ValueError(f"FlashAttention-3 ({kind}) does not take these inputs: {why}")
            return sdpa_attention(q, k, v)
        if fp8 and not strict and k.shape[1] < MIN_KEYS:  # strict: the self-check measures the kernel
            return sdpa_attention(q, k, v)
        key = (kind, q.device.index, tuple(q.shape), tuple(k.shape), q.dtype)
        return _attempt(key, kind, q, k, strict, lambda: run(q, k, v), lambda: sdpa_attention(q, k, v))

    return attention


def _qk8_refusal(q8: torch.Tensor, k8: torch.Tensor, v: torch.Tensor, dq: torch.Tensor,
                 dk: torch.Tensor) -> str | None:
    """Why e4m3 q8/k8 with [B, H] descales and a 16-bit v are not for the kernel; None when they are."""
    if q8.dtype != torch.float8_e4m3fn or k8.dtype != torch.float8_e4m3fn:
        return f"q and k are {q8.dtype}/{k8.dtype}, not float8_e4m3fn"
    if v.dtype not in _DTYPES:
        return f"v is {v.dtype} (bfloat16 only)"
    if not (q8.is_cuda and k8.is_cuda and v.is_cuda and dq.is_cuda and dk.is_cuda) or not (
            q8.device == k8.device == v.device):
        return "the tensors are not all on one CUDA device"
    if q8.dim() != 4 or k8.shape != v.shape or k8.shape[0] != q8.shape[0] or k8.shape[2:] != q8.shape[2:]:
        return f"q {list(q8.shape)}, k {list(k8.shape)} and v {list(v.shape)} do not fit"
    if q8.shape[-1] not in HEAD_DIMS:
        return f"head size {q8.shape[-1]} (this kernel is offered for {', '.join(map(str, HEAD_DIMS))} only)"
    if tuple(dq.shape) != (q8.shape[0], q8.shape[2]) or dk.shape != dq.shape:
        return f"descales {list(dq.shape)} / {list(dk.shape)} are not [batch, heads]"
    if min(q8.shape[:3]) < 1 or k8.shape[1] < 1:
        return "an empty dimension"
    return None


def _guarded_qk8(strict: bool, run: Fp8QKFn) -> Fp8QKFn:
    """`run` (q and k given in fp8) behind its input checks and the fall back to SDPA on the
    dequantized q and k, as `_guarded` does for the 16-bit entry."""

    def fallback(q8: torch.Tensor, k8: torch.Tensor, v: torch.Tensor, dq: torch.Tensor,
                 dk: torch.Tensor) -> torch.Tensor:
        return sdpa_attention(dequantize_heads(q8, dq, v.dtype), dequantize_heads(k8, dk, v.dtype), v)

    def attention_qk8(q8: torch.Tensor, k8: torch.Tensor, v: torch.Tensor, dq: torch.Tensor,
                      dk: torch.Tensor) -> torch.Tensor:
        why = _qk8_refusal(q8, k8, v, dq, dk)
        if why is not None:
            if strict:
                raise ValueError(f"FlashAttention-3 (fp8) does not take these inputs: {why}")
            return fallback(q8, k8, v, dq, dk)
        key = ("fp8, q and k given in fp8", q8.device.index, tuple(q8.shape), tuple(k8.shape), v.dtype)
        return _attempt(key, key[0], q8, k8, strict, lambda: run(q8, k8, v, dq, dk),
                        lambda: fallback(q8, k8, v, dq, dk))

    return attention_qk8


def _output(result: Any) -> torch.Tensor:
    """The attention output: older FlashAttention-3 builds also return the softmax log-sum-exp."""
    return result[0] if isinstance(result, tuple) else result


def fa3_backend(*, fp8: bool = False, strict: bool = False) -> AttentionFn | None:
    """FlashAttention-3 in bf16 (`fp8=False`) or fp8 with the contract of `sdpa_attention`, or None
    where it cannot run on the current device (`fa3_unavailable_reason` says why).

    strict: raise instead of running SDPA for inputs the kernel does not take, shapes it failed on,
    and (fp8) short key sequences: for the self-check and the benchmark, which must measure this
    kernel and nothing else."""
    if fa3_unavailable_reason() is not None:
        return None
    flash_attn_func = _flash_attn_func()

    if not fp8:
        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return _output(flash_attn_func(q, k, v))
    else:
        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            q8, k8, v8, dq, dk, dv = _quantize_qkv_heads(q, k, v)
            out = _output(flash_attn_func(q8, k8, v8, q_descale=dq, k_descale=dk, v_descale=dv))
            return out if out.dtype == q.dtype else out.to(q.dtype)

        def run_qk8(q8: torch.Tensor, k8: torch.Tensor, v: torch.Tensor, dq: torch.Tensor,
                    dk: torch.Tensor) -> torch.Tensor:
            v8, dv = _quantize_heads(v)
            out = _output(flash_attn_func(q8, k8, v8, q_descale=dq, k_descale=dk, v_descale=dv))
            return out if out.dtype == v.dtype else out.to(v.dtype)

    fn = _guarded(fp8, strict, run)
    if fp8:
        fn.fp8_qk = _guarded_qk8(strict, run_qk8)  # type: ignore[attr-defined]
    return fn
