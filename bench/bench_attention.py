"""The attention kernels available for the DiT's self-attention, at its real shapes.

    python bench/bench_attention.py --out attention.json

For each shape (TI2V-5B at 1280x704x121: 27280 tokens x 24 heads; an A14B expert at 832x480x81:
32760 x 40, and at 1280x720x81: 75600 x 40; head size 128, bf16) it times PyTorch SDPA as it picks
its kernel by itself and with each backend forced (flash, cuDNN, memory-efficient), SageAttention when it is installed
and cuDNN's fp8 attention ("cudnn-fp8", `wan_lite.runtime.fp8_attention`: the optional cuDNN
frontend on a Hopper or newer GPU; its time includes quantizing q, k and v to fp8) and
FlashAttention-3 in bf16 and fp8 ("fa3-bf16", "fa3-fp8", `wan_lite.runtime.fa3_attention`: the
optional fa3-fwd wheel on a Hopper GPU; fp8 time includes the quantization), and reports
milliseconds, TFLOP/s (4 * L^2 * heads * 128 FLOPs) and the relative L2 error against the flash
backend. wan_lite uses what `wan_lite.runtime.attention_select` picks; this script says what the
alternatives would give.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import run_meta  # noqa: E402

from wan_lite.runtime.fa3_attention import fa3_backend, fa3_unavailable_reason  # noqa: E402
from wan_lite.runtime.fp8_attention import cudnn_fp8_backend, cudnn_fp8_unavailable_reason  # noqa: E402

SHAPES = {"5b 1280x704x121": (27280, 24), "a14b 832x480x81": (32760, 40), "a14b 1280x720x81": (75600, 40)}
BACKENDS = {"sdpa-default": None, "sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    kernels = {}
    for name, backend in BACKENDS.items():
        def run(q, k, v, backend=backend):
            if backend is None:  # what PyTorch picks by itself (wan_lite's and diffusers' default)
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                      v.transpose(1, 2)).transpose(1, 2)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                      v.transpose(1, 2)).transpose(1, 2)
        kernels[name] = run
    try:
        from sageattention import sageattn

        kernels["sageattention"] = lambda q, k, v: sageattn(q, k, v, tensor_layout="NHD", is_causal=False)
    except Exception as err:  # not installed or broken: say so in the results
        print(f"sageattention unavailable: {err}", flush=True)
    # strict: a shape cuDNN cannot run raises (an "error" record) instead of quietly timing SDPA
    fp8 = cudnn_fp8_backend(strict=True)
    if fp8 is not None:
        kernels["cudnn-fp8"] = fp8
    else:
        print(f"cudnn-fp8 unavailable: {cudnn_fp8_unavailable_reason()}", flush=True)
    for name, fp8_fa3 in (("fa3-bf16", False), ("fa3-fp8", True)):
        fn = fa3_backend(fp8=fp8_fa3, strict=True)
        if fn is not None:
            kernels[name] = fn
        else:
            print(f"{name} unavailable: {fa3_unavailable_reason()}", flush=True)
    records = []
    for shape, (tokens, heads) in SHAPES.items():
        gen = torch.Generator("cuda").manual_seed(0)
        q, k, v = (torch.randn(1, tokens, heads, 128, generator=gen, device="cuda", dtype=torch.bfloat16)
                   for _ in range(3))
        ref = kernels["sdpa-flash"](q, k, v).float()
        flops = 4 * tokens * tokens * heads * 128
        for name, fn in kernels.items():
            rec = {"shape": shape, "kernel": name}
            try:
                out = fn(q, k, v)
                rec["rel_error"] = ((out.float() - ref).norm() / ref.norm()).item()
                rec["ms"] = timed(lambda fn=fn: fn(q, k, v), args.repeats)
                rec["tflops"] = flops / rec["ms"] / 1e9
            except Exception as err:  # a backend this GPU/torch cannot run: a result too
                rec["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            print(json.dumps(rec), flush=True)
            records.append(rec)
        del q, k, v, ref
        torch.cuda.empty_cache()
    args.out.write_text(json.dumps({"meta": run_meta(True), "records": records}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
