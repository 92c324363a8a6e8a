"""Experiment: fp8 DiT forward time with variants of the fused elementwise kernels.

WAN_EXP=mk,sig python tmpx/exp_fused.py --model 5b --layers 4
  mk : inductor triton.multi_kernel (persistent reductions up to 16k, benchmarked against looped)
  sig: GELU of the fp8 row quantization in sigmoid form x*sigmoid(1.5957691*(x+0.044715x^3))
  nofold: GELU not folded into the row quantization (separate eager nn.GELU)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_dit import MODELS, build_wan  # noqa: E402
from common import parse_size  # noqa: E402

from wan_lite.models import fused  # noqa: E402
from wan_lite.models.attention import set_attention_backend  # noqa: E402
from wan_lite.models.dit import WanDiTConfig  # noqa: E402
from wan_lite.runtime import quant  # noqa: E402
from wan_lite.runtime.attention_select import select_fp8_attention  # noqa: E402

FLAGS = set(filter(None, os.environ.get("WAN_EXP", "").split(",")))


def _quant_rows_sig(x: torch.Tensor, gelu: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if gelu == "tanh":
        xf = x.float()
        x = (xf * torch.sigmoid(1.5957691216057308 * (xf + 0.044715 * xf * xf * xf))).to(x.dtype)
    elif gelu is not None:
        x = F.gelu(x, approximate=gelu)
    return quant._quantize_rows_eager(x)


def timed(fn, repeats: int = 5) -> float:
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
    ap.add_argument("--size", type=parse_size, default=None)
    ap.add_argument("--top", type=int, default=14)
    args = ap.parse_args()
    if "static" in FLAGS:
        fused.COMPILE["dynamic"] = False
    if "mk" in FLAGS:
        fused.OPTIONS["triton.multi_kernel"] = 1
    if "sig" in FLAGS:
        quant._quantize_rows = fused.Fused(_quant_rows_sig)
    cfg, stride, (w, h), frames = MODELS[args.model]
    w, h = args.size or (w, h)
    cfg = WanDiTConfig(**{**cfg.__dict__, "num_layers": args.layers})
    latent = (cfg.in_dim, (frames - 1) // stride[0] + 1, h // stride[1], w // stride[2])
    x = torch.randn(1, *latent, device="cuda")
    ctx = torch.randn(1, 512, cfg.text_dim, device="cuda")
    t = torch.tensor([500.0], device="cuda")
    ours = build_wan(cfg, 0)
    quant.quantize_model(ours, "fp8", compute="fp8")
    if "nofold" in FLAGS:
        for block in ours.blocks:
            block.ffn[1], block.ffn[2].input_gelu = torch.nn.GELU(approximate="tanh"), None
    pick = select_fp8_attention("cuda")
    set_attention_backend(pick.backend)
    with torch.inference_mode():
        ms = timed(lambda: ours(x, t, ctx)) * 1000
        print(f"RESULT {args.model} flags={','.join(sorted(FLAGS)) or 'base'}: {ms:.1f} ms per forward of "
              f"{args.layers} blocks", flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            ours(x, t, ctx)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
