"""cuDNN's fp8 flash attention for the DiT, on Hopper and newer GPUs (optional).

`cudnn_fp8_backend()` returns `fp8_attention(q, k, v)`, a kernel with the contract of
`wan_lite.models.attention.sdpa_attention`, or None where it cannot run. Why: cuDNN's fp8 attention
forward is reported at ~1.2 PFLOP/s on an H100 against ~0.6 for the bf16 cuDNN attention PyTorch's
SDPA runs there, and attention is ~45% of a DiT forward.

It comes from NVIDIA's cuDNN frontend (the prebuilt wheel `nvidia-cudnn-frontend`, import name
`cudnn`; nothing is compiled on the user's machine), an optional dependency: this module imports it
only when asked, and everything works without it (then SDPA runs).

What cuDNN supports (its attention support matrix and the frontend's fp8 SDPA node): the fp8
attention forward needs compute capability 9.0 or newer - Hopper (H100/H200, sm_90) and Blackwell
(sm_100, sm_120) - and a cuDNN backend library of 9.1 or newer. Ampere and Ada (sm_80-sm_89, so the
RTX 30xx and 40xx) get fp16/bf16 attention only: the frontend refuses an fp8 SDPA graph below cc 9.0,
so Ada's fp8 tensor cores are not used here. On Hopper the fp8 forward takes any sequence length
(ours are rarely multiples of 128) from backend 9.7 on, and 9.10.0 has known fp8 attention bugs
(TransformerEngine refuses it): both are checked before the kernel is offered.

How:
- q, k and v are quantized to float8_e4m3fn with one scale per tensor, on the GPU without a host
  synchronisation: multiplier m = 448 / amax, rounded to the input dtype (the multiply runs in
  it), descale = 1 / m, i.e. amax / 448 up to that rounding, so that x ~= x8 * descale holds for
  exactly the numbers the kernel reads. Fused into few kernels by torch.compile where Triton is
  available (the pattern of `wan_lite.runtime.quant._quantize_rows`), else eager.
- The fp8 copies keep the [B, L, H, D] memory layout of the inputs; cuDNN is given [B, H, L, D]
  dims with the strides of that memory (no transposes). The output is written the same way, in
  q's dtype: cuDNN mixes fp8 inputs with a bf16/fp16 output where the backend allows it (the
  output scale is then 1); where it does not, the output is fp8 with scale 7/8 * 448 / amax(v)
  (every output row is a convex combination of v's rows, so |O| <= amax(v)) and is dequantized.
- The softmax probabilities P are in [0, 1]: their fp8 scale is the constant 448 (descale 1/448).
- One cuDNN graph per (device, shapes, strides, dtype), built on the first call and kept in a
  bounded LRU cache (`MAX_CACHED_GRAPHS`); the workspace comes from PyTorch's caching allocator on
  every call; cuDNN runs on torch's current stream (one cuDNN handle per device, set to it).
- Anything the kernel does not take (head size other than 128, fp32, CPU tensors, autograd) runs
  `sdpa_attention`. A shape whose graph cannot be built (or whose run raises) runs SDPA for the
  rest of the process, after one log line saying why; a generation never fails for this kernel.
  Out-of-memory is re-raised: the caller's memory plan must react, as for every other kernel.

Accuracy: fp8 e4m3 has 3 mantissa bits; against bf16 SDPA this is ~5% relative L2 error on random
inputs (`wan_lite.runtime.attention_select.FP8_TOLERANCE` is the accepted limit). Forward only.
Extra memory per call: one byte per element of q, k and v, plus cuDNN's workspace.
"""

from __future__ import annotations

import importlib
import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from wan_lite.models.attention import AttentionFn, sdpa_attention
from wan_lite.models.fused import Fused

log = logging.getLogger(__name__)

HEAD_DIM = 128  # the DiT's head size; the only one this kernel is offered for
MAX_CACHED_GRAPHS = 16
# Shorter key sequences (the DiT's 512-token text cross-attention) run SDPA: quantizing the long q
# and dequantizing the output cost more than fp8 saves there (5B forward 0.905 s with it on every
# attention against 0.842 s with SDPA, bench_dit on an H200).
MIN_KEYS = 4096
_E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
_P_SCALE = 448.0  # fp8 scale of the softmax probabilities (P <= 1): cuDNN's documented bound for e4m3
_MIN_AMAX = 1e-30  # an all-zero tensor gets a finite multiplier (its fp8 copy is zeros either way)
# An fp8 output (only where cuDNN gives no bf16 one) is scaled to 7/8 of the e4m3 range: P is
# rounded to fp8 before P @ V but the row sum is not, so |O| may exceed amax(v) by a few percent.
_FP8_OUT_HEADROOM = 0.875
_MIN_BACKEND = 90700  # cuDNN 9.7: fp8 attention on Hopper for any sequence length
_BAD_BACKENDS = {91000: "cuDNN 9.10.0 has known fp8 attention bugs"}
_MIN_CAPABILITY = (9, 0)


# ------------------------------------------------------------------------------------------
# Availability


_cudnn_module: Any = None


def _cudnn() -> Any:
    """The `cudnn` module (imported once); raises when it is not installed or does not load."""
    global _cudnn_module
    if _cudnn_module is None:
        module = importlib.import_module("cudnn")
        if not hasattr(module, "pygraph") or not hasattr(module.pygraph, "sdpa_fp8"):
            raise ImportError("this `cudnn` module has no pygraph.sdpa_fp8 (not NVIDIA's cuDNN frontend 1.x)")
        _cudnn_module = module
    return _cudnn_module


def _version_text(version: int) -> str:
    return f"{version // 10000}.{version // 100 % 100}.{version % 100}"  # cuDNN 9+: major*10000 + minor*100 + patch


_CAPABLE: dict[int, bool] = {}


def _capable(index: int) -> bool:
    if index not in _CAPABLE:
        _CAPABLE[index] = torch.cuda.get_device_capability(index) >= _MIN_CAPABILITY
    return _CAPABLE[index]


def cudnn_fp8_unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why the cuDNN fp8 kernel cannot run on `device` (default: the current CUDA device), as a
    clause for a note ("it ..."); None when it can."""
    try:
        cudnn = _cudnn()
    except ModuleNotFoundError:
        return "it is not installed (optional: pip install nvidia-cudnn-frontend)"
    except Exception as err:  # a broken or foreign install: same answer, with the reason
        return f"the cuDNN frontend does not load ({type(err).__name__}: {err})"
    if not torch.cuda.is_available():
        return "it needs a CUDA GPU and none is available"
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    if dev.type != "cuda":
        return f"it needs a CUDA GPU (running on {dev})"
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if not _capable(index):
        major, minor = torch.cuda.get_device_capability(index)
        return f"it needs a GPU of compute capability 9.0 or newer (Hopper, Blackwell); this one is {major}.{minor}"
    try:
        version = int(cudnn.backend_version())
    except Exception as err:  # the cuDNN library itself is missing or does not load
        return f"the cuDNN library does not load ({type(err).__name__}: {err})"
    if version < _MIN_BACKEND:
        try:
            installed = str(cudnn.backend_version_string())
        except Exception:  # an old frontend without it
            installed = str(version)
        return (f"cuDNN {installed} is older than {_version_text(_MIN_BACKEND)}, the first with fp8 attention for "
                f"any sequence length")
    if version in _BAD_BACKENDS:
        return _BAD_BACKENDS[version]
    return None


def cudnn_fp8_backend(*, strict: bool = False) -> AttentionFn | None:
    """`fp8_attention(q, k, v)` (the contract of `sdpa_attention`), or None when the cuDNN frontend
    is not installed, there is no CUDA GPU, the current one has compute capability < 9.0, or its
    cuDNN library is too old (`cudnn_fp8_unavailable_reason` says which).

    strict: raise instead of running SDPA for inputs the kernel does not take or shapes it failed
    on (for the self-check and the benchmark, which must measure this kernel and nothing else).
    """
    if cudnn_fp8_unavailable_reason() is not None:
        return None

    def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """cuDNN fp8 attention; q [B, Lq, H, 128], k/v [B, Lk, H, 128] bf16/fp16 on CUDA -> [B, Lq, H, 128]
        in q's dtype (unmasked, non-causal, scale 1/sqrt(128)); anything else runs SDPA."""
        return _attention(q, k, v, strict)

    return fp8_attention


# ------------------------------------------------------------------------------------------
# Quantization


def _quantize_tensor_eager(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any shape, bf16/fp16/fp32) -> (x8 float8_e4m3fn, descale [1, 1, 1, 1] fp32), x ~= x8 * descale.

    One scale for the whole tensor: the multiplier m = 448 / amax is rounded to x's dtype (the
    multiply runs in it, which keeps the eager version free of a float32 copy of x) and kept below
    that dtype's largest value (fp16: a tiny amax), so the amax element lands on 448 (the cast rounds
    its at most 0.4% excess back to 448) and descale = 1 / m is amax / 448 up to m's rounding.
    """
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dtype=torch.float32)
    mult = (_E4M3_MAX / amax.clamp(min=_MIN_AMAX)).clamp(max=torch.finfo(x.dtype).max).to(x.dtype)
    x8 = (x * mult).to(torch.float8_e4m3fn)
    return x8, mult.to(torch.float32).reciprocal().reshape(1, 1, 1, 1)


def _quantize_qkv_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(q8, k8, v8, descale_q, descale_k, descale_v), each tensor with its own scale."""
    q8, dq = _quantize_tensor_eager(q)
    k8, dk = _quantize_tensor_eager(k)
    v8, dv = _quantize_tensor_eager(v)
    return q8, k8, v8, dq, dk, dv


# `_quantize_qkv_eager`, fused by torch.compile on CUDA when Triton is available (per tensor: the
# max-abs reduction, then one pass that reads x and writes its fp8 copy; eager adds a 16-bit
# temporary and more launches); the eager version otherwise.
_quantize_qkv = Fused(_quantize_qkv_eager, exact_casts=False)


# ------------------------------------------------------------------------------------------
# cuDNN graphs


@dataclass
class _Graph:
    graph: Any  # cudnn.pygraph, built
    ports: dict[str, Any]  # name -> the graph's tensor, for the variant pack
    workspace_bytes: int
    fp8_output: bool  # O is written in fp8 and dequantized here (no bf16 output from this cuDNN)
    side_outputs: dict[str, torch.Tensor]  # port name -> buffer: cuDNN's amaxes, written on every run, never read


_LOCK = threading.Lock()  # guards everything below; a cuDNN handle must not be used by two threads at once
_GRAPHS: OrderedDict[tuple, _Graph] = OrderedDict()  # least recently used first
_FAILED: dict[tuple, str] = {}  # shape key -> why its graph could not be used
_HANDLES: dict[int, Any] = {}  # device index -> cudnn.Handle
_CONSTANTS: dict[int, dict[str, torch.Tensor]] = {}  # device index -> scale_s, descale_s, one


def cached_graph_count() -> int:
    """How many cuDNN graphs are built and cached (for tests and diagnostics)."""
    with _LOCK:
        return len(_GRAPHS)


def _handle(cudnn: Any, index: int) -> Any:
    """This device's cuDNN handle (made under `torch.cuda.device(index)`, kept for the process)."""
    handle = _HANDLES.get(index)
    if handle is None:
        handle = _HANDLES[index] = cudnn.create_handle()
    return handle


def _constants(device: torch.device) -> dict[str, torch.Tensor]:
    consts = _CONSTANTS.get(device.index)
    if consts is None:
        def scalar(x: float) -> torch.Tensor:
            return torch.full((1, 1, 1, 1), x, dtype=torch.float32, device=device)

        consts = _CONSTANTS[device.index] = {"scale_s": scalar(_P_SCALE), "descale_s": scalar(1.0 / _P_SCALE),
                                             "one": scalar(1.0)}
    return consts


def _bhsd_stride(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides of a [B, L, H, D] tensor as cuDNN's [B, H, L, D] dims see the same memory."""
    sb, sl, sh, sd = t.stride()
    return sb, sh, sl, sd


_SCALARS = ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")


def _build(cudnn: Any, handle: Any, dims: dict[str, list[int]], strides: dict[str, tuple[int, ...]],
           out_dtype: torch.dtype, fp8_output: bool, declare_amax_s: bool, device: torch.device) -> _Graph:
    """Build one fp8 attention graph (cuDNN frontend's sdpa_fp8: validate, plans from heuristics
    A then FALLBACK, check support, build). Raises whatever cuDNN raises for what it does not take.

    declare_amax_s: make the deprecated Amax_S a real output, as older callers (TransformerEngine)
    do, for a backend that does not take it virtual."""
    e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    out_type = e4m3 if fp8_output else {torch.bfloat16: cudnn.data_type.BFLOAT16,
                                        torch.float16: cudnn.data_type.HALF}[out_dtype]
    graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
    ports = {name: graph.tensor(name=name, dim=dims[name], stride=list(strides[name]), data_type=e4m3)
             for name in ("q", "k", "v")}
    for name in _SCALARS:
        ports[name] = graph.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32)
    # Returns [O, Stats, Amax_S, Amax_O]; Stats is None without generate_stats. Amax_S is left
    # virtual first (deprecated; declaring it keeps the graph off the frontend's own engines).
    o, _stats, amax_s, amax_o = graph.sdpa_fp8(
        q=ports["q"], k=ports["k"], v=ports["v"],
        descale_q=ports["descale_q"], descale_k=ports["descale_k"], descale_v=ports["descale_v"],
        descale_s=ports["descale_s"], scale_s=ports["scale_s"], scale_o=ports["scale_o"],
        generate_stats=False, attn_scale=1.0 / math.sqrt(dims["q"][3]), name="wan_lite_fp8_attention")
    o.set_output(True).set_dim(dims["o"]).set_stride(list(strides["o"])).set_data_type(out_type)
    ports["o"], ports["amax_o"] = o, amax_o
    side = ["amax_o"]
    if declare_amax_s:
        ports["amax_s"] = amax_s
        side.append("amax_s")
    for name in side:
        ports[name].set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    workspace = int(graph.get_workspace_size())
    buffers = {name: torch.empty((1, 1, 1, 1), dtype=torch.float32, device=device) for name in side}
    return _Graph(graph, ports, workspace, fp8_output, buffers)


def _first_line(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:limit] if text else ''}"


# The graph variants tried for a new shape, best first: (fp8 output, Amax_S declared). A 16-bit
# output needs no dequantization; the others are for backends that refuse the first (an fp8 O only
# where cuDNN does not mix fp8 inputs with a 16-bit output).
_VARIANTS = ((False, False), (False, True), (True, False), (True, True))


def _variant_text(out_dtype: torch.dtype, fp8_output: bool, declare_amax_s: bool) -> str:
    out = "fp8" if fp8_output else str(out_dtype).removeprefix("torch.")
    return f"{out} output" + (", Amax_S declared" if declare_amax_s else "")


def _graph_for(cudnn: Any, handle: Any, key: tuple, dims: dict, strides: dict, out_dtype: torch.dtype,
               device: torch.device) -> _Graph:
    """The cached graph for `key`, else the first of `_VARIANTS` cuDNN builds. Called under _LOCK
    and the device."""
    entry = _GRAPHS.get(key)
    if entry is not None:
        _GRAPHS.move_to_end(key)
        return entry
    errors = []
    for fp8_output, declare_amax_s in _VARIANTS:
        try:
            entry = _build(cudnn, handle, dims, strides, out_dtype, fp8_output, declare_amax_s, device)
            break
        except Exception as err:  # what this cuDNN does not take; the next variant may do
            errors.append(f"{_variant_text(out_dtype, fp8_output, declare_amax_s)}: {_first_line(err, 160)}")
    else:
        raise RuntimeError("no cuDNN graph (" + "; ".join(errors) + ")")
    if errors:
        log.info("cuDNN fp8 attention uses a graph with %s; this cuDNN refused %s.",
                 _variant_text(out_dtype, entry.fp8_output, "amax_s" in entry.side_outputs), "; ".join(errors))
    _GRAPHS[key] = entry
    while len(_GRAPHS) > MAX_CACHED_GRAPHS:
        _GRAPHS.popitem(last=False)
    return entry


# ------------------------------------------------------------------------------------------
# The kernel


def input_refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtypes: tuple[torch.dtype, ...],
                  head_dims: tuple[int, ...]) -> str | None:
    """Why q, k, v are not inputs of a forward-only CUDA attention kernel that takes `dtypes` and
    `head_dims` in our [batch, tokens, heads, head_dim] layout; None when they are."""
    if not (q.is_cuda and k.is_cuda and v.is_cuda) or not (q.device == k.device == v.device):
        return "the tensors are not all on one CUDA device"
    if q.dtype not in dtypes or not (k.dtype == v.dtype == q.dtype):
        names = " or ".join(str(t).removeprefix("torch.") for t in dtypes)
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype} ({names} only)"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k and v are not [batch, tokens, heads, head_dim]"
    b, lq, h, d = q.shape
    if d not in head_dims or k.shape[-1] != d or v.shape[-1] != d:
        return f"head size {d} (this kernel is offered for {', '.join(map(str, head_dims))} only)"
    if k.shape != v.shape or k.shape[0] != b or k.shape[2] != h:
        return f"k {list(k.shape)} and v {list(v.shape)} do not fit q {list(q.shape)}"
    if min(b, lq, h, k.shape[1]) < 1:
        return "an empty dimension"
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return "autograd needs a gradient (this kernel is forward only)"
    return None


def _refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why these inputs are not for the fp8 kernel; None when they are."""
    why = input_refusal(q, k, v, (torch.bfloat16, torch.float16), (HEAD_DIM,))
    if why is not None:
        return why
    if not _capable(q.device.index):
        return f"{q.device} has compute capability below {_MIN_CAPABILITY[0]}.{_MIN_CAPABILITY[1]}"
    return None


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, strict: bool) -> torch.Tensor:
    why = _refusal(q, k, v)
    if why is None and not strict and k.shape[1] < MIN_KEYS:  # strict: the self-check measures the kernel
        return sdpa_attention(q, k, v)
    if why is not None:
        if strict:
            raise ValueError(f"cuDNN fp8 attention does not take these inputs: {why}")
        return sdpa_attention(q, k, v)
    shape = (q.device.index, q.shape[0], q.shape[2], q.shape[1], k.shape[1], q.dtype)
    failed = _FAILED.get(shape)
    if failed is not None:
        if strict:
            raise RuntimeError(f"cuDNN fp8 attention failed on this shape before: {failed}")
        return sdpa_attention(q, k, v)
    try:
        return _run(q, k, v, shape)
    except torch.OutOfMemoryError:
        raise  # the caller's memory plan must react; SDPA would need memory too
    except Exception as err:
        reason = _first_line(err, limit=800)  # the two build errors of _graph_for share one line
        with _LOCK:
            first = shape not in _FAILED
            _FAILED[shape] = reason
        if first:
            log.info("cuDNN fp8 attention is not used for q %s, k %s (%s) on %s: %s. This shape runs PyTorch "
                     "SDPA from now on.", list(q.shape), list(k.shape), str(q.dtype).removeprefix("torch."),
                     q.device, reason)
        if strict:
            raise
        return sdpa_attention(q, k, v)


def _run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: tuple) -> torch.Tensor:
    cudnn = _cudnn()
    device = q.device
    b, lq, h, d = q.shape
    lk = k.shape[1]
    q8, k8, v8, dq, dk, dv = _quantize_qkv(q, k, v)
    # cuDNN needs the head dimension contiguous; any other layout is passed as it is, as strides.
    q8, k8, v8 = (t if t.stride(-1) == 1 else t.contiguous() for t in (q8, k8, v8))
    out_stride = (lq * h * d, d, h * d, 1)  # the output: contiguous [B, Lq, H, D], seen as [B, H, Lq, D]
    strides = {"q": _bhsd_stride(q8), "k": _bhsd_stride(k8), "v": _bhsd_stride(v8), "o": out_stride}
    dims = {"q": [b, h, lq, d], "k": [b, h, lk, d], "v": [b, h, lk, d], "o": [b, h, lq, d]}
    key = (*shape, strides["q"], strides["k"], strides["v"], out_stride)
    with _LOCK, torch.cuda.device(device):
        handle = _handle(cudnn, device.index)
        entry = _graph_for(cudnn, handle, key, dims, strides, q.dtype, device)
        consts = _constants(device)
        if entry.fp8_output:
            out = torch.empty((b, lq, h, d), dtype=torch.float8_e4m3fn, device=device)
            scale_o = dv.reciprocal() * _FP8_OUT_HEADROOM  # 7/8 * 448 / amax(v)
        else:
            out = torch.empty((b, lq, h, d), dtype=q.dtype, device=device)
            scale_o = consts["one"]
        workspace = (torch.empty(entry.workspace_bytes, dtype=torch.uint8, device=device)
                     if entry.workspace_bytes > 0 else None)
        ports = entry.ports
        pack = {ports["q"]: q8, ports["k"]: k8, ports["v"]: v8, ports["descale_q"]: dq, ports["descale_k"]: dk,
                ports["descale_v"]: dv, ports["descale_s"]: consts["descale_s"], ports["scale_s"]: consts["scale_s"],
                ports["scale_o"]: scale_o, ports["o"]: out}
        pack.update({ports[name]: buffer for name, buffer in entry.side_outputs.items()})
        cudnn.set_stream(handle, torch.cuda.current_stream(device).cuda_stream)  # a no-op when unchanged
        entry.graph.execute(pack, workspace, handle=handle)
    if entry.fp8_output:
        # The [1, 1, 1, 1] float32 factor takes part in type promotion: the product is computed in
        # float32 and rounded once to q's dtype.
        return out.to(q.dtype).mul_(dv / _FP8_OUT_HEADROOM)
    return out
