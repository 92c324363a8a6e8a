"""Where a DiT forward spends its GPU time: wan_lite against diffusers, kernel by kernel.

    python bench/profile_dit.py [--layers 4] [--model 5b] [--size WxH] [--fp8] [--top 25]

Builds the model with `--layers` blocks at full width (random weights, as bench_dit.py) at the
model's default size (or `--size`), times a forward of each implementation (and wan_lite's without
its fused elementwise kernels, models/fused.py), then prints the profiler's table of CUDA kernels
for each. The attention is the kernel the engine picks (bench_dit.py's); `--fp8`: wan_lite's
blocks in fp8 with fp8 compute and the fp8 attention of WAN_LITE_FP8_ATTENTION=1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dit import MODELS, build_wan, to_diffusers  # noqa: E402
from common import parse_size  # noqa: E402

from wan_lite.models.dit import WanDiTConfig  # noqa: E402
from wan_lite.models.fused import set_fusion  # noqa: E402
from wan_lite.runtime.attention_select import select_attention, select_fp8_attention  # noqa: E402
from wan_lite.runtime.quant import quantize_model  # noqa: E402


def timed(fn, repeats: int = 3) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="5b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--size", type=parse_size, default=None, help="WxH (default: the model's)")
    ap.add_argument("--fp8", action="store_true", help="wan_lite in fp8 with fp8 compute and fp8 attention")
    args = ap.parse_args()
    cfg, stride, (w, h), frames = MODELS[args.model]
    w, h = args.size or (w, h)
    cfg = WanDiTConfig(**{**cfg.__dict__, "num_layers": args.layers})
    latent = (cfg.in_dim, (frames - 1) // stride[0] + 1, h // stride[1], w // stride[2])
    x = torch.randn(1, *latent, device="cuda")
    ctx = torch.randn(1, 512, cfg.text_dim, device="cuda")
    t = torch.tensor([500.0], device="cuda")
    ours = build_wan(cfg, 0)
    theirs = to_diffusers(build_wan(cfg, 0))
    if args.fp8:
        quantize_model(ours, "fp8", compute="fp8")
    pick = (select_fp8_attention if args.fp8 else select_attention)("cuda")
    print(f"attention: {pick.note}", flush=True)

    ours.set_attention(pick.fn)

    def wan_lite() -> torch.Tensor:
        return ours(x, t, ctx)

    runs = {
        "wan_lite": wan_lite,
        "diffusers": lambda: theirs(x.to(torch.bfloat16), t, ctx.to(torch.bfloat16), return_dict=False)[0],
    }
    with torch.inference_mode():
        for name, fn in runs.items():
            print(f"{name}: {timed(fn) * 1000:.1f} ms per forward of {args.layers} blocks", flush=True)
        ref_out = runs["wan_lite"]().float()
        old = set_fusion(False)  # the same forward with the elementwise steps run eagerly
        try:
            ms = timed(runs["wan_lite"]) * 1000
            out = runs["wan_lite"]().float()
        finally:
            set_fusion(old)
        err = ((out - ref_out).norm() / ref_out.norm()).item()
        print(f"wan_lite without fused elementwise kernels: {ms:.1f} ms; rel L2 vs fused {err:.2e}", flush=True)
        for name, fn in runs.items():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            print(f"\n==== {name}")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    sys.exit(main())
