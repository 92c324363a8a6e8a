"""What doing a DiT block's per-token work in token chunks costs: time of a forward per chunk size.

    python bench/profile_chunks.py [--model 5b] [--layers 6] [--size WxH] [--chunks 0,16384,8192,4096,2048]
                                   [--batch 1,2] [--fp8]

Builds the model with `--layers` blocks at full width (random weights, as bench_dit.py), then times
one forward per (batch, chunk) with the attention kernel the engine picks; 0 = no chunking. Prints
ms per forward and the cost per extra chunk per block over the unchunked forward, what the
planner's K.chunked_token_s and K.chunk_block_s model. `--fp8`: blocks in fp8 with fp8 compute.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dit import MODELS, build_wan  # noqa: E402
from common import parse_size  # noqa: E402
from profile_dit import timed  # noqa: E402

from wan_lite.models.dit import WanDiTConfig  # noqa: E402
from wan_lite.runtime.attention_select import select_attention  # noqa: E402
from wan_lite.runtime.quant import quantize_model  # noqa: E402


def ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="5b")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--size", type=parse_size, default=None, help="WxH (default: the model's)")
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--chunks", type=ints, default=[0, 16384, 8192, 4096, 2048])
    ap.add_argument("--batch", type=ints, default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fp8", action="store_true", help="fp8 weights with fp8 compute")
    args = ap.parse_args()
    cfg, stride, (w, h), frames = MODELS[args.model]
    w, h = args.size or (w, h)
    frames = args.frames or frames
    cfg = WanDiTConfig(**{**cfg.__dict__, "num_layers": args.layers})
    latent = (cfg.in_dim, (frames - 1) // stride[0] + 1, h // stride[1], w // stride[2])
    tokens = latent[1] * (latent[2] // cfg.patch_size[1]) * (latent[3] // cfg.patch_size[2])
    model = build_wan(cfg, 0)
    if args.fp8:
        quantize_model(model, "fp8", compute="fp8")
    pick = select_attention("cuda")
    print(f"{args.model} {w}x{h}x{frames}: {tokens} tokens, {args.layers} blocks{' fp8' if args.fp8 else ''}; "
          f"attention: {pick.note}", flush=True)
    model.set_attention(pick.fn)
    with torch.inference_mode():
        for b in args.batch:
            x = torch.randn(b, *latent, device="cuda")
            ctx = torch.randn(b, 512, cfg.text_dim, device="cuda")
            t = torch.full((b,), 500.0, device="cuda")
            base = None
            for c in args.chunks:
                for blk in model.blocks:
                    blk.chunk_tokens = c or None
                torch.cuda.reset_peak_memory_stats()
                ms = timed(lambda: model(x, t, ctx), args.repeats) * 1000  # noqa: B023
                peak = torch.cuda.max_memory_allocated() / 1024**3
                n = math.ceil(tokens / c) if c else 1
                base = ms if base is None and not c else base
                per = (ms - base) / ((n - 1) * args.layers) if base and n > 1 else float("nan")
                print(f"batch {b} chunk {c or 'none':>5} ({n:2d} chunks): {ms:8.1f} ms, peak {peak:5.2f} GiB, "
                      f"{per:6.3f} ms per extra chunk per block", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
