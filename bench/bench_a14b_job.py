"""The whole T2V-A14B job at full size, from files on disk, as a user with 8 GB VRAM / 32 GB RAM runs it.

    python bench/bench_a14b_job.py --out job_a14b.json [--steps 6] [--cap-gib 8] [--profile 08gb-vram-32gb-ram]
                                   [--force resident_blocks=0,text_encoder=stream]
    python bench/bench_a14b_job.py --out /tmp/x.json --smoke     # same code on the CPU, tiny models

First it writes random full-size checkpoints in the files people download from ComfyUI's
repackaged repo (`--work`, default ./_bench_ckpt; about 36 GB): both experts as fp8_e4m3fn scaled
single files (`weight_scale` layout), umT5-XXL as an fp8 scaled single file, the Wan 2.1 VAE as the
official .pth, plus the tests' tokenizer. Then it runs the job through `Engine` (the app's own
path: component files chosen per slot, the planner's plan for the memory profile, loading, text
encoding, both experts, the VAE decode) at 1280x720, 81 frames, with the GPU capped at `--cap-gib`
by torch.cuda.set_per_process_memory_fraction. Recorded: the preflight estimate, the plan, peak
GPU memory (allocated and reserved), peak host memory (RSS, and its anonymous and file-backed
parts), seconds per step per expert and the stage timings. `--force key=value,...` adds plan
fields to the profile's forced ones (resident_blocks=0,text_encoder=stream: the smallest GPU
footprint, what a 7 GB card gets). Records are
appended to `--out`, so several cases can share one file (the checkpoints are written once). The mp4 is not written (no encoder
is needed on the GPU machine); the decoded frames are checked to be finite.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GIB, PeakRSS, parse_fields, run_meta  # noqa: E402

from tests.tiny_ckpt.dit import official_dit_shapes  # noqa: E402
from tests.tiny_ckpt.formats import comfy_state  # noqa: E402
from tests.tiny_ckpt.t5 import write_tokenizer  # noqa: E402
from tests.tiny_ckpt.vae import random_vae_state  # noqa: E402
from wan_lite.api import GenerateRequest  # noqa: E402
from wan_lite.engine import Engine  # noqa: E402
from wan_lite.loading import keymaps  # noqa: E402

FULL = {"dim": 5120, "ffn_dim": 13824, "layers": 40, "t5": (4096, 64, 10240, 24, 256384), "vae": 96}
TINY = {"dim": 256, "ffn_dim": 512, "layers": 2, "t5": (64, 4, 128, 2, 4096), "vae": 8}


def t5_shapes(d: int, heads: int, d_ff: int, layers: int, vocab: int) -> dict[str, tuple[tuple[int, ...], float]]:
    """Official umT5 encoder names -> (shape, std), scaled as tests/tiny_ckpt/t5.py does."""
    out = {"token_embedding.weight": ((vocab, d), 1.0)}
    for i in range(layers):
        p = f"blocks.{i}."
        out |= {p + "norm1.weight": ((d,), -0.1), p + "norm2.weight": ((d,), -0.1),
                p + "attn.q.weight": ((d, d), (d * (d // heads)) ** -0.5),
                p + "attn.k.weight": ((d, d), d**-0.5), p + "attn.v.weight": ((d, d), d**-0.5),
                p + "attn.o.weight": ((d, d), d**-0.5),
                p + "ffn.gate.0.weight": ((d_ff, d), d**-0.5), p + "ffn.fc1.weight": ((d_ff, d), d**-0.5),
                p + "ffn.fc2.weight": ((d, d_ff), d_ff**-0.5),
                p + "pos_embedding.embedding.weight": ((32, heads), 0.5)}
    out["norm.weight"] = ((d,), -0.1)
    return out


def dit_std(name: str, shape: tuple[int, ...]) -> float:
    """Negative: a norm gain 1 + N(0, -std); else N(0, std) (as tests/tiny_ckpt/dit.py)."""
    if "norm" in name and name.endswith("weight"):
        return -0.1
    if name.endswith("modulation") or name.endswith("bias"):
        return 0.1
    return 1.0 / math.sqrt(math.prod(shape[1:]))


def write_fp8_file(path: Path, specs: dict[str, tuple[tuple[int, ...], float]], device: torch.device,
                   seed: int, rename=lambda n: n, keep: tuple[str, ...] = ()) -> Path:
    """A ComfyUI fp8_e4m3fn scaled single file: random tensors made on `device` one at a time."""
    if path.exists():
        return path
    gen = torch.Generator(device).manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for name, (shape, std) in specs.items():
        t = torch.randn(shape, generator=gen, device=device)
        t = 1.0 + t * -std if std < 0 else t * std
        key = rename(name)
        part, meta = comfy_state({key: t}, dtype=torch.bfloat16, fp8="weight_scale", keep=keep)
        tensors.update({k: v.cpu() for k, v in part.items()})
        if meta:
            layers |= json.loads(meta["_quantization_metadata"])["layers"]
    tmp = path.with_suffix(".part")
    save_file(tensors, str(tmp), metadata={"_quantization_metadata": json.dumps(
        {"format_version": "1.0", "layers": layers})})
    tmp.rename(path)
    return path


def write_checkpoints(work: Path, sizes: dict, device: torch.device) -> dict[str, Path]:
    work.mkdir(parents=True, exist_ok=True)
    dit = official_dit_shapes(in_dim=16, out_dim=16, dim=sizes["dim"], ffn_dim=sizes["ffn_dim"],
                              num_layers=sizes["layers"], text_dim=sizes["t5"][0])
    dit_specs = {n: (s, dit_std(n, s)) for n, s in dit.items()}
    parts = {}
    for slot, seed in (("dit_high", 1), ("dit_low", 2)):
        noise = slot.removeprefix("dit_")
        parts[slot] = write_fp8_file(work / f"wan2.2_t2v_{noise}_noise_14B_fp8_scaled.safetensors",
                                     dit_specs, device, seed)
    parts["text_encoder"] = write_fp8_file(work / "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                                           t5_shapes(*sizes["t5"]), device, 3, rename=keymaps.t5_official_to_hf,
                                           keep=("shared.weight",))
    vae = work / "Wan2.1_VAE.pth"
    if not vae.exists():
        torch.save(random_vae_state("2.1", base_dim=sizes["vae"], dec_dim=sizes["vae"], seed=4), vae)
    parts["vae"] = vae
    parts["tokenizer"] = write_tokenizer(work / "google" / "umt5-xxl")
    return parts


def force_plan_fields(profile: str, forced: dict) -> None:
    """Make the engine plan with `profile` plus the `forced` plan fields (the engine asks the
    planner with a profile name; the bench hands it this variant instead)."""
    from dataclasses import replace

    from wan_lite.runtime import planner
    from wan_lite.runtime.hardware import get_profile

    base = get_profile(profile)
    variant = replace(base, name=f"{base.name} + {forced}", force=(*base.force, *forced.items()))
    real = planner.plan
    planner.plan = lambda model, request, hw, profile=None: real(model, request, hw, profile=variant)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("_bench_ckpt"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--cap-gib", type=float, default=8.0, help="GPU memory cap (the profile's card)")
    ap.add_argument("--profile", default="08gb-vram-32gb-ram")
    ap.add_argument("--force", default="", help="plan fields to force, e.g. resident_blocks=0,text_encoder=stream")
    ap.add_argument("--guidance", type=float, default=None,
                    help="guidance of both experts (1: one DiT pass per step, Turbo-shaped; default: official)")
    ap.add_argument("--cache", default="off", help="step cache: off, balanced or fast")
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU (checks the script)")
    args = ap.parse_args()
    cuda = not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    if args.smoke:
        args.size, args.frames, args.steps = "64x64", 5, 2
    width, height = (int(v) for v in args.size.lower().split("x"))
    t0 = time.perf_counter()
    parts = write_checkpoints(args.work, TINY if args.smoke else FULL, device)
    write_s = time.perf_counter() - t0
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GIB / total))
    engine = Engine(args.work / "models", args.work / "out", device=str(device), components={"t2v-a14b": parts})
    profile_name = args.profile
    if args.force:
        force_plan_fields(args.profile, parse_fields(args.force))
        profile_name = f"{args.profile} + {args.force}"
    request = GenerateRequest("a red fox trotting through fresh snow, morning light", model="t2v-a14b",
                              width=width, height=height, frames=args.frames, steps=args.steps, seed=0,
                              memory_profile=args.profile, guidance=args.guidance, guidance_low=args.guidance,
                              cache=args.cache)
    job = engine.resolve(request)
    estimate = engine.preflight(job)
    stamps: list[tuple[str, int, float]] = []

    memory: list[tuple[str, int, float, float]] = []  # (stage, step, allocated GiB, peak GiB so far)

    def progress(p) -> None:
        if cuda:
            memory.append((p.stage, p.step, torch.cuda.memory_allocated() / GIB,
                           torch.cuda.max_memory_allocated() / GIB))
        if p.stage in ("denoise", "high_noise", "low_noise"):
            if cuda:
                torch.cuda.synchronize()
            stamps.append((p.stage, p.step, time.perf_counter()))

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with PeakRSS() as rss:
        pipe = engine.pipeline(job.spec.name, progress, job)
        load_s = time.perf_counter() - t0
        try:
            result = pipe.generate(job, on_progress=progress)
        except Exception as err:  # a failed case is a result too: where the memory went
            rec = {"case": f"t2v-a14b job {width}x{height}x{args.frames}, cap {args.cap_gib:g} GiB: FAILED",
                   "error": f"{type(err).__name__}: {err}", "memory_by_stage": memory,
                   "plan": pipe.placement.plan.summary() if getattr(pipe.placement, "plan", None) else None,
                   "memory_summary": torch.cuda.memory_summary() if cuda else None, **run_meta(cuda)}
            print(json.dumps(rec, indent=1), flush=True)
            old = json.loads(args.out.read_text()) if args.out.is_file() else []
            args.out.write_text(json.dumps([*old, rec], indent=2))
            return 1
    wall = time.perf_counter() - t0
    per_stage: dict[str, list[float]] = {}
    for (s0, _, a), (s1, _, b) in zip(stamps, stamps[1:]):
        if s0 == s1:
            per_stage.setdefault(s1, []).append(b - a)
    frames = torch.as_tensor(result.frames)
    rec = {
        "case": f"t2v-a14b job {width}x{height}x{args.frames} {profile_name}, cap {args.cap_gib:g} GiB"
                + (f", {args.steps} steps guidance {args.guidance:g}" if args.guidance is not None else "")
                + (f", cache {args.cache}" if args.cache != "off" else ""),
        "profile": profile_name, "cap_gib": args.cap_gib, "steps": args.steps,
        "dit_forwards": result.settings.get("dit_forwards"),
        "preflight": {"peak_vram_gib": estimate.peak_vram_gib, "peak_ram_gib": estimate.peak_ram_gib,
                      "seconds": estimate.seconds, "fits": estimate.fits},
        "plan": pipe.placement.plan.summary() if getattr(pipe.placement, "plan", None) else None,
        "peak_vram_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB if cuda else None,
        "peak_ram_gib": rss.peak / GIB, "peak_ram_parts_gib": rss.peaks,
        "s_per_step": statistics.median(v for vs in per_stage.values() for v in vs) if per_stage else None,
        "s_per_step_by_expert": {k: statistics.median(v) for k, v in per_stage.items()},
        "timings": result.timings, "memory_by_stage": memory, "load_s": load_s, "wall_s": wall, "write_checkpoints_s": write_s,
        "frames_finite": bool(torch.isfinite(frames.float()).all()), "frames_shape": list(frames.shape),
        "files_gib": {k: sum(f.stat().st_size for f in ([v] if v.is_file() else v.rglob("*")) if f.is_file()) / GIB
                      for k, v in parts.items()},
        **run_meta(cuda),
    }
    print(json.dumps(rec, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(args.out.read_text()) if args.out.is_file() else []
    args.out.write_text(json.dumps([*old, rec], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
