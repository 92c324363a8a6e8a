"""Wan 2.2 VAE decode at full size with random weights: wan_lite untiled / tiled against diffusers.

    python bench/bench_vae.py --out results/vae.json [--tiles 16,24,32] [--budget-s 330]

Decodes z [1, 48, 31, 44, 80] (1280x704, 121 frames; `--size`, `--frames` change it) and measures,
after a short warm-up (2 latent frames, same spatial shapes), the median seconds of `--repeats`
decodes (host clock after a device sync, and CUDA events; plus, where the video is left on the
GPU, the copy to CPU memory that the pipeline then makes), the peak GPU memory
(`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, and the reserved peak), the
weights on the GPU, and the error against wan_lite's untiled decode in the same dtype, for:

    wan-untiled-{bf16,fp32}     WanVAE22.decode, the video assembled on the GPU
    wan-tiled-{bf16,fp32}-tN    tiled_decode, tiles of at most N latent px (16N video px), overlap
                                4 latent px, full-resolution levels in frame chunks of
                                `--frame-chunk` (default 1), the video assembled in CPU memory
    wan-tiled-bf16-tN-nochunk   the same in whole 4-frame chunks (as before frame chunks)
    wan-tiled-bf16-tN-decoder-only   the same with the encoder's weights left in CPU memory
    wan-tiled-bf16-tN-oK-cC-decoder-only   the 2 GiB candidates (`--candidates`): N latent px
                                tiles (32: 2 x 3 tiles at 720p, 41: 2 x 2 at overlap 2), overlap K
                                latent px, frame chunk C (0: whole chunks), decoder only
    wan-auto-bf16-2g-decoder-only    choose_decode's pick for a 2 GiB GPU, as the pipeline's
                                decode makes it (memory model, margins, time model;
                                `tile_latent` and `frame_chunk` say what it chose)
    diffusers-untiled-bf16      AutoencoderKLWan (2.2 config) with the same weights
    diffusers-tiled-bf16        + enable_tiling() (its defaults: 256 px tiles, stride 192)

Weights: built on `meta`, `to_empty` on the GPU, conv weights ~ N(0, 1/fan_in) (activations keep a
unit scale through the residual stack), biases ~ N(0, 0.05), norm gains ~ 1 + N(0, 0.1): the tiny
test writer's scheme. The latent is N(0, 1) (the VAE de-normalises it with the real statistics).

At the end it fits the planner's memory constants from the tiled cases (peak minus weights, per
output pixel of the largest tile; untiled: minus the fp32 video too) and prints them with the
results table. Records go
to `--out` as JSON after every case; cases past `--budget-s` are skipped and repeats drop to 1 once
half the budget is spent (an H100 runs everything in ~4 minutes). `--quick` (bf16, tiles 24, one
repeat: ~2 minutes on an H200) keeps the comparison and drops the rest. `--smoke` runs a tiny VAE
on the CPU to check the script.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_device, host_rss_gib, parse_size, run_meta  # noqa: E402

from wan_lite.loading.keymaps import vae_official_to_diffusers  # noqa: E402
from wan_lite.models.vae22 import LATENT_MEAN_22, LATENT_STD_22, VAE22Config, WanVAE22  # noqa: E402
from wan_lite.runtime import tiled_vae, vae_memory  # noqa: E402

log = logging.getLogger("bench_vae")
GIB = 1024**3
DEVICE = torch.device("cuda")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TINY = VAE22Config(dim=16, dec_dim=32)  # --smoke


def build_wan(config: VAE22Config, dtype: torch.dtype, seed: int) -> WanVAE22:
    """WanVAE22 on DEVICE in `dtype` with seeded random weights (the tiny writer's scheme)."""
    with torch.device("meta"):
        vae = WanVAE22(config)
    vae.to(dtype).to_empty(device=DEVICE)
    gen = torch.Generator(device=DEVICE)
    with torch.no_grad():
        for i, (name, p) in enumerate(vae.named_parameters()):
            gen.manual_seed(seed * 1_000_003 + i)  # per tensor: the same weights in every dtype
            if name.endswith("gamma"):
                p.normal_(1.0, 0.1, generator=gen)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05, generator=gen)
            else:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=gen)
    return vae.eval()


def to_diffusers(vae: WanVAE22):
    """The same weights in diffusers' AutoencoderKLWan with the Wan 2.2 config (tensors shared)."""
    from diffusers import AutoencoderKLWan

    c = vae.config
    with torch.device("meta"):
        dm = AutoencoderKLWan(
            base_dim=c.dim, decoder_base_dim=c.dec_dim, z_dim=c.z_dim, dim_mult=list(c.dim_mult),
            num_res_blocks=c.num_res_blocks, temperal_downsample=list(c.temporal_downsample),
            latents_mean=list(LATENT_MEAN_22), latents_std=list(LATENT_STD_22), is_residual=True,
            in_channels=12, out_channels=12, patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16)
    state = {vae_official_to_diffusers(k, "2.2"): v for k, v in vae.state_dict().items()}
    dm.load_state_dict(state, strict=True, assign=True)
    return dm.eval()


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def release() -> None:
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def gpu_bytes() -> int:
    return torch.cuda.memory_allocated() if DEVICE.type == "cuda" else 0


def compare(out: torch.Tensor, ref: torch.Tensor | None) -> dict:
    if ref is None:
        return {}
    d = (out.float().cpu() - ref).abs()
    return {"max_abs_err": d.max().item(), "mean_abs_err": d.mean().item(),
            "rel_l2_err": (d.norm() / ref.norm()).item()}


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.start = time.perf_counter()
        self.records: list[dict] = []
        self.refs: dict[str, torch.Tensor] = {}  # untiled wan_lite video per dtype, CPU float32
        cuda = DEVICE.type == "cuda"
        self.meta = run_meta(cuda)

    def wanted(self, case: str) -> bool:
        return self.args.cases is None or any(case.startswith(c) for c in self.args.cases)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def save(self) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps({"meta": self.meta, "records": self.records}, indent=1))
        os.replace(tmp, out)

    def timed(self, fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, warm: torch.Tensor) -> dict:
        """Warm-up on `warm`, then the median of the repeats on `z`; the last output kept as 'out'."""
        with torch.inference_mode():
            fn(warm)
            release()
            weights = gpu_bytes()
            repeats = self.args.repeats if self.elapsed() < self.args.budget_s / 2 else 1
            times, event_times, peaks, reserved, out = [], [], [], [], None
            for _ in range(repeats):
                out = None
                release()
                if DEVICE.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                t0 = time.perf_counter()
                out = fn(z)
                if DEVICE.type == "cuda":
                    end.record()
                sync()
                times.append(time.perf_counter() - t0)
                if DEVICE.type == "cuda":
                    event_times.append(start.elapsed_time(end) / 1000)
                    peaks.append(torch.cuda.max_memory_allocated())
                    reserved.append(torch.cuda.max_memory_reserved())
            # The pipeline needs the video in CPU memory: time that copy where the decode left it on the GPU.
            t0 = time.perf_counter()
            out_cpu = out.cpu()
            to_cpu = time.perf_counter() - t0 if out.device != out_cpu.device else 0.0
        res = {"s": statistics.median(times), "times_s": times, "weights_gib": weights / GIB, "out": out_cpu,
               "repeats": repeats, "s_to_cpu": to_cpu, "s_incl_to_cpu": statistics.median(times) + to_cpu}
        if event_times:
            res |= {"s_cuda_events": statistics.median(event_times), "peak_vram_gib": max(peaks) / GIB,
                    "peak_reserved_gib": max(reserved) / GIB,
                    "peak_minus_weights_gib": (max(peaks) - weights) / GIB}
        return res

    def record(self, case: str, run: Callable[[], dict], ref_dtype: str | None = None) -> None:
        rec: dict = {"case": case, **self.base}
        if not self.wanted(case):
            return
        if self.elapsed() > self.args.budget_s:
            rec["skipped"] = f"time budget of {self.args.budget_s:.0f} s spent"
        else:
            try:
                res = run()
                out = res.pop("out")
                if ref_dtype is not None and ref_dtype not in self.refs and case.startswith("wan-untiled"):
                    self.refs[ref_dtype] = out.float().cpu()
                elif ref_dtype is not None:
                    res |= compare(out, self.refs.get(ref_dtype))
                del out
                rec.update(res)
            except torch.OutOfMemoryError as err:
                rec["error"] = f"out of memory: {err}".splitlines()[0]
            except Exception as err:  # keep measuring the other cases; the record says what failed
                log.exception("%s failed", case)
                rec["error"] = f"{type(err).__name__}: {err}".splitlines()[0]
            release()
        rec["host_rss_gib"] = host_rss_gib()
        self.records.append(rec)
        self.save()
        shown = ("s", "peak_vram_gib", "peak_minus_weights_gib", "model_estimate_gib", "mean_abs_err",
                 "max_abs_err", "error", "skipped")
        log.info("%-40s %s", case, {k: rec[k] for k in shown if rec.get(k) is not None})

    def run(self) -> None:
        a = self.args
        config = TINY if a.smoke else VAE22Config()
        w, h = a.size
        t = (a.frames - 1) // 4 + 1
        lat = (48, t, h // 16, w // 16)
        self.base = {"size": f"{w}x{h}", "frames": a.frames, "latent": list(lat)}
        gen = torch.Generator(device=DEVICE).manual_seed(1234)
        z = torch.randn(1, *lat, device=DEVICE, generator=gen)
        warm = z[:, :, :2].contiguous()
        for dname in a.dtypes:
            dtype = DTYPES[dname]
            vae = build_wan(config, dtype, a.seed)
            zd = z.to(dtype)
            def estimate(tile: int | None, overlap: int | None = None, chunk: int | None = None,
                         vae: WanVAE22 = vae, dtype: torch.dtype = dtype) -> dict:
                est = vae_memory.estimate_decode_bytes(vae, tuple(z.shape), tile, dtype, overlap, frame_chunk=chunk)
                return {"model_estimate_gib": est / GIB}  # the tiler's memory model, weights excluded

            self.record(f"wan-untiled-{dname}", lambda: {**self.timed(vae.decode, zd, warm.to(dtype)),
                                                         **estimate(None)}, dname)
            tiles = a.tiles if dname == "bf16" else a.tiles[len(a.tiles) // 2 :][:1]
            for tile in tiles:
                self.record(f"wan-tiled-{dname}-t{tile}", lambda vae=vae, dtype=dtype, tile=tile: {
                    **self.tiled(vae, zd, warm.to(dtype), tile, a.overlap, a.frame_chunk),
                    **estimate(tile, a.overlap, a.frame_chunk)}, dname)
            if dname == "bf16" and a.tiles:
                tile = a.tiles[len(a.tiles) // 2]
                self.record(f"wan-tiled-bf16-t{tile}-nochunk", lambda tile=tile: {
                    **self.tiled(vae, zd, warm.to(dtype), tile, a.overlap, None),
                    **estimate(tile, a.overlap, None)}, dname)
                self.record(f"wan-tiled-bf16-t{tile}-decoder-only", lambda tile=tile: self.decoder_only(
                    vae, lambda: self.tiled(vae, zd, warm.to(dtype), tile, a.overlap, a.frame_chunk)), dname)
            if dname == "bf16":
                for tile, overlap, chunk in a.candidates:
                    tile = min(tile, 2) if a.smoke else tile
                    self.record(f"wan-tiled-bf16-t{tile}-o{overlap}-c{chunk or 0}-decoder-only",
                                lambda tile=tile, overlap=overlap, chunk=chunk: self.decoder_only(vae, lambda: {
                                    **self.tiled(vae, zd, warm.to(dtype), tile, overlap, chunk),
                                    **estimate(tile, overlap, chunk)}), dname)
                self.record("wan-auto-bf16-2g-decoder-only", lambda: self.decoder_only(
                    vae, lambda: self.auto(vae, zd, warm.to(dtype), 2 * GIB, estimate)), dname)
            if dname == "bf16" and self.wanted("diffusers"):
                self.run_diffusers(vae, zd, warm.to(dtype), dname)
            del vae, zd
            release()

    def tiled(self, vae: WanVAE22, z: torch.Tensor, warm: torch.Tensor, tile: int, overlap: int,
              chunk: int | None) -> dict:
        """tiled_decode into CPU memory, timed; the record says the layout."""
        def run(x: torch.Tensor) -> torch.Tensor:
            return tiled_vae.tiled_decode(vae, x, tile, overlap, out_device="cpu", frame_chunk=chunk)

        spans_h = vae_memory.tile_spans(z.shape[3], tile, overlap)
        spans_w = vae_memory.tile_spans(z.shape[4], tile, overlap)
        return {**self.timed(run, z, warm), "tile_latent": tile, "tile_px": tile * 16, "overlap_latent": overlap,
                "frame_chunk": chunk, "out_device": "cpu", "tiles": [len(spans_h), len(spans_w)],
                "tile_shape": [spans_h[0][1] - spans_h[0][0], spans_w[0][1] - spans_w[0][0]]}

    def decoder_only(self, vae: WanVAE22, run: Callable[[], dict]) -> dict:
        """`run()` with the encoder's weights in CPU memory (decode never uses them)."""
        vae.encoder.to("cpu")
        release()
        try:
            return {**run(), "decoder_only": True}
        finally:
            vae.encoder.to(DEVICE)

    def auto(self, vae: WanVAE22, z: torch.Tensor, warm: torch.Tensor, budget: int,
             estimate: Callable[..., dict]) -> dict:
        """What choose_decode picks when the GPU has `budget` bytes in all (weights placed)."""
        release()
        free = budget - gpu_bytes()
        tile, chunk = vae_memory.choose_decode(vae, tuple(z.shape), free, z.dtype)
        if tile is None:
            return {**self.timed(vae.decode, z, warm), "tile_latent": None, **estimate(None)}
        overlap = vae_memory.DEFAULT_OVERLAP_PX // 16
        return {**self.tiled(vae, z, warm, tile, overlap, chunk), **estimate(tile, overlap, chunk),
                "budget_gib": budget / GIB}

    def run_diffusers(self, vae: WanVAE22, z: torch.Tensor, warm: torch.Tensor, dname: str) -> None:
        try:
            dm = to_diffusers(vae)
        except ImportError as err:
            for case in ("diffusers-untiled", "diffusers-tiled"):
                self.record(f"{case}-{dname}", lambda err=err: {"error": f"diffusers not importable: {err}"})
            return
        # diffusers' VAE does not normalise: the pipeline de-normalises first (z * std + mean).
        mean = torch.tensor(LATENT_MEAN_22, device=DEVICE).view(1, -1, 1, 1, 1)
        std = torch.tensor(LATENT_STD_22, device=DEVICE).view(1, -1, 1, 1, 1)

        def decode(x: torch.Tensor) -> torch.Tensor:
            return dm.decode((x.float() * std + mean).to(x.dtype), return_dict=False)[0]

        self.record(f"diffusers-untiled-{dname}", lambda: self.timed(decode, z, warm), dname)
        dm.enable_tiling()
        self.record(f"diffusers-tiled-{dname}", lambda: {
            **self.timed(decode, z, warm), "tile_px": dm.tile_sample_min_height,
            "stride_px": dm.tile_sample_stride_height}, dname)
        del dm

    def calibration(self) -> dict:
        """Per-pixel activation bytes of one latent frame, from the tiled cases (planner constants)."""
        fits: dict = {}
        for dname in self.args.dtypes:
            per_px = []
            for r in self.records:
                if r["case"].startswith(f"wan-tiled-{dname}-t") and "peak_minus_weights_gib" in r \
                        and r.get("frame_chunk") == self.args.frame_chunk and not r.get("decoder_only"):
                    th, tw = r["tile_shape"]
                    px = th * tw * 256
                    act = r["peak_minus_weights_gib"] * GIB  # no tile video on the GPU any more
                    per_px.append({"tile": r["tile_latent"], "px": px, "act_bytes": act, "bytes_per_px": act / px})
            untiled = next((r for r in self.records if r["case"] == f"wan-untiled-{dname}"
                            and "peak_minus_weights_gib" in r), None)
            entry: dict = {"tiled": per_px}
            if untiled:
                px = untiled["latent"][2] * untiled["latent"][3] * 256
                act = untiled["peak_minus_weights_gib"] * GIB - 3 * untiled["frames"] * px * 4
                entry["untiled_bytes_per_px"] = act / px
            if len(per_px) >= 2:  # least squares act = a * px + b
                xs, ys = [p["px"] for p in per_px], [p["act_bytes"] for p in per_px]
                mx, my = statistics.fmean(xs), statistics.fmean(ys)
                slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
                entry["fit_bytes_per_px"] = slope
                entry["fit_fixed_bytes"] = my - slope * mx
                key = "DECODE_PX_PER_BYTE_CHUNKED" if self.args.frame_chunk else "DECODE_PX_PER_BYTE"
                entry[key] = (slope - vae_memory.CHUNK_OUT_PX) / DTYPES[dname].itemsize
            fits[dname] = entry
        return fits


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file for the records")
    p.add_argument("--size", type=parse_size, default=None, help="WxH, default 1280x704")
    p.add_argument("--frames", type=int, default=None, help="video frames, 4k+1 (default 121)")
    p.add_argument("--tiles", type=lambda s: [int(x) for x in s.split(",") if x], default=None,
                   help="tile sides in latent px for the bf16 cases (fp32: the middle one); default 16,24,32")
    p.add_argument("--overlap", type=int, default=None, help="latent px, default 4")
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=["bf16", "fp32"])
    p.add_argument("--cases", type=lambda s: s.split(","), default=None, help="case name prefixes to run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=330.0, help="skip cases once this much time has passed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frame-chunk", type=int, default=vae_memory.DEFAULT_FRAME_CHUNK,
                   help="frames the full-resolution levels decode at a time in the tN cases (0: whole chunks)")
    p.add_argument("--candidates", default=[(32, 4, 1), (32, 2, 1), (32, 2, 2)],
                   type=lambda s: [tuple(int(v) or None for v in c.split("-")) for c in s.split(",") if c],
                   help="2 GiB candidates as tile-overlap-chunk (latent px; chunk 0: whole chunks), e.g. 32-2-2,41-2-1")
    p.add_argument("--quick", action="store_true", help="bf16 only, tiles 24, one repeat (~2 minutes)")
    p.add_argument("--smoke", action="store_true", help="a tiny VAE on the CPU: checks the script")
    args = p.parse_args(argv)
    args.frame_chunk = args.frame_chunk or None
    if args.quick:
        args.dtypes, args.repeats = ["bf16"], 1
        args.tiles = args.tiles or ([6] if args.smoke else [24])
    args.size = args.size or ((256, 128) if args.smoke else (1280, 704))
    args.frames = args.frames or (9 if args.smoke else 121)
    args.tiles = args.tiles or ([6, 8] if args.smoke else [16, 24, 32])
    args.overlap = args.overlap if args.overlap is not None else (2 if args.smoke else 4)
    global DEVICE
    DEVICE = bench_device(args.smoke, "bench_vae")
    if DEVICE is None:
        return 2
    bench = Bench(args)
    log.info("%s", bench.meta)
    bench.run()
    bench.meta["calibration"] = bench.calibration()
    bench.save()
    nan = float("nan")
    table = [f"{'case':40} {'s':>7} {'s+cpu':>7} {'peak GiB':>9} {'-weights':>9} {'max err':>8} "
             f"{'mean err':>9}"]
    for r in bench.records:
        table.append(f"{r['case']:40} {r.get('s', nan):7.2f} {r.get('s_incl_to_cpu', nan):7.2f} "
                     f"{r.get('peak_vram_gib', nan):9.2f} "
                     f"{r.get('peak_minus_weights_gib', nan):9.2f} {r.get('max_abs_err', nan):8.4f} "
                     f"{r.get('mean_abs_err', nan):9.5f} {r.get('error') or r.get('skipped') or ''}")
    log.info("results (%s, torch %s):\n%s", bench.meta["gpu"], bench.meta["torch"], "\n".join(table))
    log.info("calibration: %s", json.dumps(bench.meta["calibration"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
