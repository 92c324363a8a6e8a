"""Choose the attention kernel once at start: an optional kernel when it is installed, agrees with
PyTorch SDPA on a quick check on this GPU *and* is faster there; PyTorch SDPA otherwise.

The optional bf16 kernels: SageAttention (any CUDA GPU; it quantizes q/k to int8 and p/v to fp8
inside the kernel) and FlashAttention-3 (Hopper only, `wan_lite.runtime.fa3_attention`). Their
builds are specific to a GPU architecture and CUDA version, so an installed wheel can still be
wrong or crash on a given card. The self-check runs a kernel and SDPA on small random inputs shaped
like the DiT's self- and cross-attention (head size 128, a query length that is not a multiple of
the kernel's tile, 512 text keys) and accepts the kernel only within `TOLERANCE` relative L2 error
of SDPA. Then both are timed on one self-attention (`_SPEED_SHAPE`; on Hopper the DiT-scale
`_DIT_SPEED_SHAPE`, as for the fp8 kernels): faster is not a given. On an
H200 PyTorch's SDPA picks cuDNN attention, 1.4x the speed of SageAttention 1.0.6, which in turn is
1.2x SDPA's FlashAttention-2 backend, what SDPA runs where cuDNN attention is not available
(bench/bench_attention.py). The fastest kernel that passes and beats SDPA by `SPEEDUP` runs.
Whatever the outcome, one log line says which kernel runs and why; `AttentionChoice.note` carries
the same text for the UI. Nothing is installed or compiled here.

`select_fp8_attention` is the entry point of the fp8 compute path: the same trial among the fp8
kernels, cuDNN's fp8 attention (`wan_lite.runtime.fp8_attention`, backend "cudnn-fp8": the
optional cuDNN frontend on a Hopper or newer GPU) and FlashAttention-3's fp8 forward ("fa3-fp8",
Hopper), within `FP8_TOLERANCE` and timed at the DiT's scale; when none is used it does what
`select_attention` does and its note adds why.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from wan_lite.models.attention import AttentionFn, sdpa_attention
from wan_lite.runtime.fa3_attention import fa3_backend, fa3_unavailable_reason, is_hopper
from wan_lite.runtime.fp8_attention import cudnn_fp8_backend, cudnn_fp8_unavailable_reason

log = logging.getLogger(__name__)

TOLERANCE = 0.05  # sage's own accuracy on random data is ~1-2% relative L2; a broken build is ~100%
# (query tokens, key tokens) of the check: self-attention with a ragged length, text cross-attention.
_CHECK_SHAPES = ((1000, 1000), (1000, 512))
_CHECK_HEADS, _CHECK_HEAD_DIM = 4, 128
_SPEED_SHAPE = (8192, 8)  # tokens, heads of the timed self-attention (~0.3 TFLOP: a few ms on any GPU)
SPEEDUP = 1.05  # the optional kernel must be at least this much faster than SDPA to be used
# fp8 e4m3 keeps 3 mantissa bits: rounding alone gives V and the softmax probabilities P (cuDNN
# quantizes P too) ~3.6% RMS relative error each and q/k add noise to the logits, ~5% relative L2
# against bf16 SDPA together on the check's random inputs. A wrong scale, layout or missing
# descale is off by tens of percent or more, so 8% keeps the honest kernel and rejects a broken one.
FP8_TOLERANCE = 0.08
# The timed attention at the DiT's own scale (27k-76k tokens x 24-40 heads; this one is ~8.8 TFLOP,
# ~15 ms in bf16 on an H200), where small cases mislead:
# - fp8 kernels always: their fixed per-call work (quantizing q, k and v, cuDNN's launch) decides
#   small cases. On an H200 cuDNN fp8 is 1.3x slower than SDPA at 16k x 8 but 1.15x faster at the
#   5B's 27k x 24 and 1.36x at the A14B's 76k x 40 (bench_attention.py).
# - bf16 kernels on Hopper (fast enough that it takes a fraction of a second): FlashAttention-3
#   makes whole bf16 forwards 1.14-1.16x faster there, but on `_SPEED_SHAPE` it measured 1.00-1.10x
#   against the 1.05x it needs, so SDPA ran in some runs (bench/results/2026-12-04-zh, -zj).
_DIT_SPEED_SHAPE = (32768, 16)
FP8_BACKEND = "cudnn-fp8"
FA3_FP8_BACKEND = "fa3-fp8"


@dataclass(frozen=True)
class AttentionChoice:
    backend: str  # the kernel's name: "sdpa", "sage", "fa3", "cudnn-fp8", "fa3-fp8"
    note: str  # one sentence for the log and the UI
    rel_error: float | None = None  # the self-check's worst relative L2 error, when one ran
    failed: bool = False  # an installed kernel was rejected by the self-check
    fn: AttentionFn = sdpa_attention  # the kernel, for `WanPipeline.set_attention` / `WanDiT.set_attention`


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def self_check(fn: AttentionFn, device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
               seed: int = 0, tolerance: float = TOLERANCE) -> tuple[bool, float, str]:
    """Run `fn` and SDPA on random q/k/v [1, L, 4, 128]; returns (passed, worst rel L2, reason).

    Exceptions from `fn` (no kernel for this GPU, bad build) count as a failed check. `tolerance`
    is the accepted relative L2 error (`FP8_TOLERANCE` for an fp8 kernel).
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    worst = 0.0
    for lq, lk in _CHECK_SHAPES:
        q, k, v = (torch.randn(1, n, _CHECK_HEADS, _CHECK_HEAD_DIM, generator=gen, device=device).to(dtype)
                   for n in (lq, lk, lk))
        try:
            out = fn(q, k, v)
        except Exception as err:  # any failure of an optional kernel means "do not use it"
            return False, float("nan"), f"it raised {type(err).__name__}: {err}"
        if out.shape != q.shape:
            return False, float("nan"), f"it returned shape {list(out.shape)} for {list(q.shape)}"
        if not torch.isfinite(out).all():
            return False, float("nan"), "it returned non-finite values"
        worst = max(worst, _rel_l2(out, sdpa_attention(q, k, v)))
    if worst > tolerance:
        return False, worst, f"its output differs from SDPA by {worst:.1%} (limit {tolerance:.0%})"
    return True, worst, "passed"


def compare_speed(fn: AttentionFn, device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
                  shape: tuple[int, int] = _SPEED_SHAPE, repeats: int = 5) -> tuple[float, float]:
    """Milliseconds per call of `fn` and of SDPA on one self-attention [1, tokens, heads, 128],
    after a warm-up call each (a JIT-compiled kernel compiles there). CUDA events on a GPU."""
    device = torch.device(device)
    tokens, heads = shape
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, tokens, heads, _CHECK_HEAD_DIM, generator=gen, device=device).to(dtype)
               for _ in range(3))

    def ms(f: AttentionFn) -> float:
        f(q, k, v)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                f(q, k, v)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / repeats
        t0 = time.perf_counter()
        for _ in range(repeats):
            f(q, k, v)
        return (time.perf_counter() - t0) * 1000 / repeats

    return ms(fn), ms(sdpa_attention)


def _sage_backend() -> AttentionFn | None:
    """SageAttention wrapped to our contract ([B, L, H, Dh] in, same layout and q's dtype out)."""
    try:
        sage = importlib.import_module("sageattention")
    except Exception:  # not installed, or its extension fails to load: same answer
        return None
    sageattn: Callable = sage.sageattn

    def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in (64, 96, 128):
            return sdpa_attention(q, k, v)  # shapes/dtypes the kernel does not take
        # "NHD" is [batch, tokens, heads, head_dim]: our layout, no transposes.
        return sageattn(q, k, v, tensor_layout="NHD", is_causal=False).to(q.dtype)

    return sage_attention


def select_attention(device: torch.device | str | None = None, *, allow_sage: bool = True) -> AttentionChoice:
    """Pick the attention kernel for `device` (default: CUDA if present, else CPU); the caller
    hands `choice.fn` to the models that run it.

    allow_sage=False keeps PyTorch SDPA without trying the optional kernels."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    choice = _decide(dev, allow_sage)
    # A kernel that is installed but wrong deserves a warning; everything else is an info line.
    log.log(logging.WARNING if choice.failed else logging.INFO, "%s", choice.note)
    return choice


@dataclass
class _Trial:
    """One optional kernel, checked and timed against SDPA."""
    backend: str
    label: str  # "SageAttention", "FlashAttention-3", ...
    ms: float | None = None  # set when it passed the check and was timed
    sdpa_ms: float | None = None
    rel_error: float | None = None
    why_not: str = ""  # a clause ("SageAttention is not installed (optional)") when it cannot be used
    failed: bool = False  # installed but wrong or broken


def _try(backend: str, label: str, fn: AttentionFn, dev: torch.device, check: dict, speed: dict) -> _Trial:
    """Self-check `fn` (keyword arguments `check`), then time it against SDPA (`speed`)."""
    with torch.no_grad():
        ok, err, reason = self_check(fn, dev, **check)
    if not ok:
        return _Trial(backend, label, rel_error=err, failed=True,
                      why_not=f"{label} is installed but failed its self-check on this GPU ({reason})")
    try:
        with torch.no_grad():
            ms, sdpa_ms = compare_speed(fn, dev, **speed)
    except Exception as e:  # a kernel that passed on small inputs but fails on a larger one
        return _Trial(backend, label, rel_error=err, failed=True,
                      why_not=f"{label} is installed but failed on a larger input ({type(e).__name__}: {e})")
    trial = _Trial(backend, label, ms, sdpa_ms, err)
    if ms * SPEEDUP > sdpa_ms:
        trial.why_not = (f"SDPA is about as fast or faster than the installed {label} on this GPU "
                         f"({sdpa_ms:.2f} vs {ms:.2f} ms on a test attention)")
    return trial


def _fastest(trials: list[_Trial]) -> _Trial | None:
    usable = [t for t in trials if t.ms is not None and not t.why_not]
    return min(usable, key=lambda t: t.ms) if usable else None


def _chosen_note(trial: _Trial) -> str:
    return (f"Attention: {trial.label} ({trial.sdpa_ms / trial.ms:.2f}x the speed of SDPA here; "
            f"self-check against SDPA: {trial.rel_error:.2%} rel. error).")


def _decide(dev: torch.device, allow_sage: bool) -> AttentionChoice:
    """SDPA, SageAttention (any CUDA GPU) or FlashAttention-3 in bf16 (Hopper): the fastest one
    that is installed, passes the self-check and beats SDPA by `SPEEDUP`."""
    if not allow_sage:
        return AttentionChoice("sdpa", "Attention: PyTorch SDPA (optional kernels disabled by the user).")
    if dev.type != "cuda":
        return AttentionChoice("sdpa", f"Attention: PyTorch SDPA (the optional kernels need a CUDA GPU, "
                                       f"running on {dev}).")
    trials: list[_Trial] = []
    kernels: dict[str, AttentionFn] = {}
    speed = {"shape": _DIT_SPEED_SHAPE} if is_hopper(dev) else {}
    sage = _sage_backend()
    if sage is None:
        trials.append(_Trial("sage", "SageAttention", why_not="SageAttention is not installed (optional)"))
    else:
        kernels["sage"] = sage
        trials.append(_try("sage", "SageAttention", sage, dev, {}, speed))
    if is_hopper(dev):  # FlashAttention-3 exists for Hopper only: elsewhere it is not worth a word
        reason = fa3_unavailable_reason(dev)
        checked = fa3_backend(strict=True) if reason is None else None
        if checked is None:
            trials.append(_Trial("fa3", "FlashAttention-3", why_not=f"FlashAttention-3 {_clause(reason)}"))
        else:
            kernels["fa3"] = fa3_backend()  # the same kernel, running SDPA for any input it does not take
            trials.append(_try("fa3", "FlashAttention-3", checked, dev, {}, speed))
    best = _fastest(trials)
    failed = any(t.failed for t in trials)
    if best is None:
        return AttentionChoice("sdpa", "Attention: PyTorch SDPA - " + "; ".join(t.why_not for t in trials) + ".",
                               max((t.rel_error for t in trials if t.rel_error is not None), default=None),
                               failed=failed)
    return AttentionChoice(best.backend, _chosen_note(best), best.rel_error, failed=failed, fn=kernels[best.backend])


def _clause(reason: str | None) -> str:
    """A reason phrased "it is not installed ..." as a clause after the kernel's name."""
    return (reason or "is not available").removeprefix("it ")


# ------------------------------------------------------------------------------------------
# The fp8 compute path


def select_fp8_attention(device: torch.device | str | None = None, *, allow_sage: bool = True) -> AttentionChoice:
    """Pick an fp8 attention kernel for `device`: cuDNN's ("cudnn-fp8") or, on Hopper,
    FlashAttention-3's ("fa3-fp8"), the fastest that is available, passes the self-check within
    `FP8_TOLERANCE` and is faster than SDPA; otherwise what `select_attention(device,
    allow_sage=allow_sage)` picks, with a note that says why not fp8."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen, why, failed = _decide_fp8(dev)
    if chosen is not None:
        log.info("%s", chosen.note)
        return chosen
    fallback = select_attention(dev, allow_sage=allow_sage)
    log.log(logging.WARNING if failed else logging.INFO, "%s", why)
    return replace(fallback, note=f"{fallback.note} {why}", failed=fallback.failed or failed)


def _decide_fp8(dev: torch.device) -> tuple[AttentionChoice | None, str, bool]:
    """(the choice when an fp8 kernel is used, else None; why none is, in sentences; whether one
    failed a check)."""
    if dev.type != "cuda":
        return None, f"cuDNN fp8 attention is not used: it needs a CUDA GPU (running on {dev}).", False
    trials: list[_Trial] = []
    kernels: dict[str, Callable[[], AttentionFn | None]] = {}
    check, speed = {"tolerance": FP8_TOLERANCE}, {"shape": _DIT_SPEED_SHAPE}
    reason = cudnn_fp8_unavailable_reason(dev)
    checked = cudnn_fp8_backend(strict=True) if reason is None else None  # strict: the check sees the kernel
    if checked is None:
        trials.append(_Trial(FP8_BACKEND, "cuDNN fp8 attention", why_not=_clause(reason)))
    else:
        kernels[FP8_BACKEND] = cudnn_fp8_backend  # the same kernel, running SDPA for any input it does not take
        trials.append(_try(FP8_BACKEND, "cuDNN fp8 attention", checked, dev, check, speed))
    if is_hopper(dev):
        reason = fa3_unavailable_reason(dev)
        checked = fa3_backend(fp8=True, strict=True) if reason is None else None
        if checked is None:
            trials.append(_Trial(FA3_FP8_BACKEND, "FlashAttention-3 fp8", why_not=_clause(reason)))
        else:
            kernels[FA3_FP8_BACKEND] = lambda: fa3_backend(fp8=True)
            trials.append(_try(FA3_FP8_BACKEND, "FlashAttention-3 fp8", checked, dev, check, speed))
    best = _fastest(trials)
    fn = kernels[best.backend]() if best is not None else None
    failed = any(t.failed for t in trials)
    if best is None or fn is None:
        return None, " ".join(f"{t.label} is not used: {_reason_sentence(t)}" for t in trials), failed
    return AttentionChoice(best.backend, _chosen_note(best), best.rel_error, failed=failed, fn=fn), "", failed


def _reason_sentence(trial: _Trial) -> str:
    """The trial's why_not as the rest of "<kernel> is not used: ...", ending in a full stop."""
    text = trial.why_not or "it is not available"
    if text.startswith(trial.label + " "):
        text = "it " + text.removeprefix(trial.label + " ")
    elif not text.startswith(("it ", "SDPA ")):
        text = "it " + text
    return text.rstrip(".") + "."
