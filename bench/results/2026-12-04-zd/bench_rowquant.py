"""Micro-benchmark: formulations of the fp8 row quantization (optionally GELU first) on the GPU."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wan_lite.models.fused import Fused  # noqa: E402
from wan_lite.runtime import quant  # noqa: E402

T = quant._FP8_ACT_TARGET


def _act(x, gelu):
    return x if gelu is None else F.gelu(x, approximate=gelu)


def amax_fn(x, gelu):
    return torch.linalg.vector_norm(_act(x, gelu), ord=float("inf"), dim=1, keepdim=True, dtype=torch.float32)


def quant_fn(x, amax, gelu):
    inv = (T / amax.clamp(min=1e-12)).to(x.dtype)
    return (_act(x, gelu) * inv).to(torch.float8_e4m3fn), inv.to(torch.float32).reciprocal()


def _chunk(k):
    for c in (1024, 512, 256, 128):
        if k % c == 0:
            return c
    return k


def split_fn(x, gelu):
    m, k = x.shape
    c = _chunk(k)
    a = _act(x, gelu)
    part = torch.linalg.vector_norm(a.view(m, k // c, c), ord=float("inf"), dim=2, dtype=torch.float32)
    amax = part.amax(dim=1, keepdim=True)
    inv = (T / amax.clamp(min=1e-12)).to(x.dtype)
    return (a * inv).to(torch.float8_e4m3fn), inv.to(torch.float32).reciprocal()


_amax = Fused(amax_fn)
_quant = Fused(quant_fn)
_split = Fused(split_fn)


def two(x, gelu):
    return _quant(x, _amax(x, gelu), gelu)


def aten_amax(x, gelu):
    a = _act(x, gelu)
    return _quant(x, a.abs().amax(dim=1, keepdim=True).float(), gelu)


def sig_fn(x, gelu):
    if gelu == "tanh":
        xf = x.float()
        x = (xf * torch.sigmoid(1.5957691216057308 * (xf + 0.044715 * xf * xf * xf))).to(x.dtype)
    return quant._quantize_rows_eager(x)


_sig = Fused(sig_fn)
_sig_dyn = Fused(sig_fn)
_cur_dyn = Fused(quant._quantize_rows_eager)


def warm_dynamic(fn, k, gelu):  # a first call of another row count: the next compile is dynamic
    fn(torch.randn(77, k, device="cuda", dtype=torch.bfloat16), gelu)
    return fn


VARIANTS = {"cur": lambda x, g: quant._quantize_rows(x, g), "sig": _sig,
            "cur_dyn": lambda x, g: warm_dynamic(_cur_dyn, x.shape[1], g)(x, g),
            "sig_dyn": lambda x, g: warm_dynamic(_sig_dyn, x.shape[1], g)(x, g)}


def timed(fn, reps=20):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1000


def main():
    torch.manual_seed(0)
    for m, k, gelu in ((27280, 14336, "tanh"), (27280, 3072, None), (75600, 13824, "tanh"), (75600, 5120, None)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 2
        ref8, refs = quant._quantize_rows_eager(x, gelu)
        ideal = m * k * 3 / 4.0e12 * 1e6  # one bf16 read + one fp8 write at 4 TB/s
        line = [f"{m}x{k} gelu={gelu}: ideal {ideal:.0f} us"]
        for name, fn in VARIANTS.items():
            with torch.inference_mode():
                if name.endswith("_dyn"):
                    warm_dynamic({"cur_dyn": _cur_dyn, "sig_dyn": _sig_dyn}[name], k, gelu)
                    fn = {"cur_dyn": _cur_dyn, "sig_dyn": _sig_dyn}[name]
                x8, s = fn(x, gelu)
                us = timed(lambda fn=fn: fn(x, gelu))
            same = (x8.view(torch.uint8) == ref8.view(torch.uint8)).float().mean().item()
            line.append(f"{name} {us:.0f} us (same {same:.5f}, scale ok {torch.allclose(s, refs, rtol=1e-2)})")
        print("; ".join(line), flush=True)
        del x, ref8, refs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
