"""Where a tiled Wan 2.2 VAE decode spends its time, against the untiled decode.

    python bench/profile_vae.py [--tile 32] [--overlap 2] [--chunk 0] [--top 15]

Builds the full-size Wan 2.2 VAE (random weights, as bench_vae.py; the encoder's weights in CPU
memory), decodes z [1, 48, 31, 44, 80] (1280x704, 121 frames) and prints the seconds of:
the untiled decode (video left on the GPU, then with the copy to CPU memory), the decoder's
global pass alone (conv1, middle, first upsampling level), the tiled decode into CPU memory and
into GPU memory, into uint8 frames (tiled and untiled, as the pipeline decodes), the untiled
decode and the frames with the eager norm + SiLU instead of the fused kernel; the GPU time of each decoder level in the untiled and the tiled decode (CUDA
events); then the profiler's tables (CUDA kernels; CPU ops by self time) for the tiled decode
into CPU memory, with the GPU's busy time against the wall time; last, both again with
cudnn.benchmark on.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_vae import build_wan  # noqa: E402

from wan_lite.models.fused import set_fusion  # noqa: E402
from wan_lite.models.vae22 import VAE22Config  # noqa: E402
from wan_lite.runtime import tiled_vae  # noqa: E402


def timed(fn, repeats: int = 2) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.empty_cache()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


class LevelTimer:
    """GPU seconds spent in each decoder level and the head (CUDA events around every call)."""

    def __init__(self, decoder: torch.nn.Module) -> None:
        parts = {f"level {i}": m for i, m in enumerate(decoder.upsamples)}
        parts.update({"conv1": decoder.conv1, "middle": decoder.middle, "head": decoder.head})
        self.pairs: dict[str, list] = {name: [] for name in parts}
        self.handles = []
        for name, module in parts.items():
            self.handles.append(module.register_forward_pre_hook(self._start(name)))
            self.handles.append(module.register_forward_hook(self._stop(name)))

    def _start(self, name: str):
        def hook(module, args):
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.pairs[name].append([event, None])
        return hook

    def _stop(self, name: str):
        def hook(module, args, out):
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.pairs[name][-1][1] = event
        return hook

    def report(self) -> str:
        torch.cuda.synchronize()
        for h in self.handles:
            h.remove()
        secs = {k: sum(a.elapsed_time(b) for a, b in v) / 1e3 for k, v in self.pairs.items()}
        return ", ".join(f"{k} {v:.3f} s ({len(self.pairs[k])} calls)" for k, v in secs.items())


def bf16_error() -> str:
    """The untiled bf16 decode against the fp32 decode of the same random weights and latent:
    relative L2, and the largest and mean difference in uint8 levels of the written video."""
    z = torch.randn(1, 48, 31, 44, 80, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    videos = {}
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            vae = build_wan(VAE22Config(), dtype, 0)
            vae.encoder.to("cpu")
            videos[dtype] = vae.decode(z.to(dtype))
            del vae
            torch.cuda.empty_cache()
        a, b = videos[torch.bfloat16], videos[torch.float32]
        rel = ((a - b).norm() / b.norm()).item()
        levels = ((a + 1) * 127.5).round() - ((b + 1) * 127.5).round()
        return (f"bf16 decode vs fp32: rel L2 {rel:.2e}, uint8 levels max {levels.abs().max().item():.0f}, "
                f"mean {levels.abs().mean().item():.3f}, share of pixels off by >1 "
                f"{(levels.abs() > 1).float().mean().item():.2e}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tile", type=int, default=32)
    ap.add_argument("--overlap", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=0, help="frame chunk (0: whole chunks)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--fp32-error", action="store_true",
                    help="first, the bf16 decode's error against the fp32 decode of the same weights")
    ap.add_argument("--quick", action="store_true",
                    help="the timings only (no per-level times, profiler tables or cudnn variants)")
    args = ap.parse_args()
    if args.fp32_error:
        print(bf16_error(), flush=True)
    chunk = args.chunk or None
    vae = build_wan(VAE22Config(), torch.bfloat16, 0)
    vae.encoder.to("cpu")
    z = torch.randn(1, 48, 31, 44, 80, device="cuda", dtype=torch.bfloat16)

    def tiled(out_device: str):
        return lambda: tiled_vae.tiled_decode(vae, z, args.tile, args.overlap, out_device=out_device,
                                              frame_chunk=chunk)

    runs = {
        "untiled (video on GPU)": lambda: vae.decode(z),
        "untiled + copy to CPU": lambda: vae.decode(z).cpu(),
        "low-res part (global pass)": lambda: tiled_vae.decoder_low_res(vae, z),
        "tiled into CPU memory": tiled("cpu"),
        "tiled into GPU memory": tiled("cuda"),
        "tiled into uint8 frames (CPU)": lambda: tiled_vae.tiled_decode(
            vae, z, args.tile, args.overlap, frame_chunk=chunk, frames=True),
        "untiled into uint8 frames (CPU)": lambda: tiled_vae.tiled_decode(vae, z, 1 << 20, frames=True),
    }
    with torch.inference_mode():
        for name, fn in runs.items():
            print(f"{name:32} {timed(fn):7.3f} s", flush=True)
        old = set_fusion(False)  # the VAE's norm + SiLU as eager ops instead of one kernel
        for name in ("untiled (video on GPU)", "tiled into uint8 frames (CPU)"):
            print(f"{name + ', eager norm + SiLU':48} {timed(runs[name]):7.3f} s", flush=True)
        set_fusion(old)
        if args.quick:
            return 0
        for name in ("untiled (video on GPU)", "tiled into CPU memory"):
            timer = LevelTimer(vae.decoder)
            runs[name]()
            print(f"{name} by part: {timer.report()}", flush=True)
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        for name in ("untiled (video on GPU)", "tiled into CPU memory"):
            with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
                t0 = time.perf_counter()
                runs[name]()
                torch.cuda.synchronize()
                wall = time.perf_counter() - t0
            events = prof.key_averages()
            busy = sum(e.self_device_time_total for e in events) / 1e6
            print(f"\n==== {name}: wall {wall:.3f} s under the profiler, GPU kernels {busy:.3f} s")
            print(events.table(sort_by="self_cuda_time_total", row_limit=args.top, max_name_column_width=60))
            print(events.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60))
            shaped = prof.key_averages(group_by_input_shape=True)
            print(shaped.table(sort_by="self_cuda_time_total", row_limit=args.top, max_name_column_width=40,
                               max_shapes_column_width=90))
        torch.backends.cudnn.benchmark = True  # cuDNN times its algorithms per shape
        for name in ("untiled (video on GPU)", "tiled into CPU memory"):
            print(f"{name + ', cudnn.benchmark':48} {timed(runs[name]):7.3f} s", flush=True)
        torch.backends.cudnn.benchmark = False
        vae.activation_layout = torch.contiguous_format  # NCDHW activations instead of NDHWC
        print(f"{'untiled, NCDHW activations':48} {timed(runs['untiled (video on GPU)']):7.3f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
