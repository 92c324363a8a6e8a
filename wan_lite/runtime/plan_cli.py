"""`python -m wan_lite plan`: the memory plan and preflight estimate for this machine or a
hypothetical one, e.g. `python -m wan_lite plan --model t2v-a14b --size 1280x720 --frames 81
--vram-gb 8 --ram-gb 32 --json`. Exit status 0 when the request fits, 1 when it does not.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Any, TextIO

from wan_lite.api import CACHE_MODES
from wan_lite.errors import InputError
from wan_lite.registry import DEFAULT_MODEL, MODELS, get_spec
from wan_lite.sizing import read_size
from wan_lite.units import duration


def add_plan_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `plan` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "plan", help="what a request will use on this (or a hypothetical) machine, before running it",
        description="Print the memory plan (quantization, resident blocks, VAE tiles, ...) and the "
                    "estimated peak GPU memory, peak RAM and time. Exit status 1 when it does not fit.")
    p.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS), help="which model")
    p.add_argument("--size", help="WIDTHxHEIGHT, e.g. 1280x704 (default: the model's)")
    p.add_argument("--frames", type=int, help="frame count (default: the model's)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    p.add_argument("--image", action="store_true", help="image-to-video (an input image is encoded)")
    p.add_argument("--cache", default="off", choices=list(CACHE_MODES), help="step cache setting (see generate)")
    p.add_argument("--vram-gb", type=float, help="plan for a GPU with this much memory instead of this one's")
    p.add_argument("--ram-gb", type=float, help="plan for this much RAM instead of this machine's")
    p.add_argument("--cc", help="compute capability of the hypothetical GPU, e.g. 8.6 (default 8.9)")
    p.add_argument("--gpu-name", help="name of the hypothetical GPU, e.g. 'RTX 4070' (for the time estimate)")
    p.add_argument("--disk-gbps", type=float,
                   help="read speed in GB/s of the disk the weights cache is on (default: this machine's, "
                        "measured once; 1.5 for a hypothetical one): where the DiT streams from disk it decides "
                        "between that and 4-bit weights in RAM")
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="plan one video split over N GPUs like this one (generate --gpus N): each GPU's plan, "
                        "with 1/N of the RAM, and the split job's time")
    p.add_argument("--jobs", type=int, default=1, metavar="J",
                   help="with --gpus: a queue of J jobs like this one; says whether one job per GPU finishes "
                        "them sooner than splitting each")
    p.add_argument("--profile", default="auto", help="memory profile name or file name, or 'auto'")
    p.add_argument("--list-profiles", action="store_true", help="list the memory profiles and exit")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def _size(text: str) -> tuple[int, int]:
    size = read_size(text)
    if size is None:
        raise InputError(f"Cannot read the size {text!r}.", "Write it as WIDTHxHEIGHT, e.g. 1280x704.")
    return size


def _hardware(args: argparse.Namespace) -> Any:
    hw = _machine(args)
    if getattr(args, "disk_gbps", None) is None:
        return hw
    if not args.disk_gbps > 0:
        raise InputError(f"Cannot plan for a disk reading {args.disk_gbps} GB/s.", "Give a speed > 0, e.g. 1.5.")
    return replace(hw, disk_gbps=args.disk_gbps)


def _machine(args: argparse.Namespace) -> Any:
    from wan_lite.runtime.hardware import Hardware

    if args.vram_gb is None and args.ram_gb is None:
        return Hardware.probe()
    probed = Hardware.probe() if args.vram_gb is None or args.ram_gb is None else None
    cc = (8, 9)
    if args.cc:
        try:
            major, minor = (int(v) for v in args.cc.split("."))
        except ValueError:
            raise InputError(f"Cannot read the compute capability {args.cc!r}.", "Write it as 8.6 or 8.9.") from None
        cc = (major, minor)
    elif probed is not None and probed.has_gpu and args.vram_gb is None:
        cc = probed.cc
    vram = args.vram_gb if args.vram_gb is not None else probed.vram_total_gib
    ram = args.ram_gb if args.ram_gb is not None else probed.ram_total_gib
    return Hardware.fake(vram, ram, cc, gpu_name=args.gpu_name or (
        probed.gpu_name if probed is not None and args.vram_gb is None else None))


def run_plan(args: argparse.Namespace, out: TextIO | None = None, plan_gpus: Any = None) -> int:
    """Run `plan` for parsed arguments; returns the exit status. `plan_gpus`: the multi-GPU
    planner (`wan_lite.parallel.plan.plan_gpus`, a layer above this one), for `--gpus` > 1."""
    from wan_lite.runtime.hardware import load_profiles
    from wan_lite.runtime.planner import ModelFootprint, PlanRequest, fp8_attention_opted_in, plan

    out = out or sys.stdout
    if args.list_profiles:
        for profile in load_profiles().values():
            out.write(f"{profile.name}\n    {profile.description}\n")
        return 0
    from wan_lite.runtime.step_cache import computed_share

    spec = get_spec(args.model)
    width, height = _size(args.size) if args.size else spec.default_size
    steps = args.steps or spec.steps
    share = computed_share(spec.name, args.cache, steps, spec.shift, image=args.image)
    request = PlanRequest(width, height, args.frames or spec.frames, steps=steps,
                          image=args.image or spec.needs_image, fp8_attention=fp8_attention_opted_in(),
                          cache=args.cache, cache_share=share)
    gpus, jobs = getattr(args, "gpus", 1), getattr(args, "jobs", 1)
    if gpus < 1 or jobs < 1:
        raise InputError(f"Cannot plan {jobs} job(s) on {gpus} GPU(s).", "Give --gpus and --jobs as 1 or more.")
    model, machine = ModelFootprint.full_size(spec.name), _hardware(args)
    split = None
    if gpus > 1:
        if plan_gpus is None:
            raise InputError("This `plan` cannot plan several GPUs.", "Run it as `python -m wan_lite plan --gpus N`.")
        split = plan_gpus(model, request, machine, gpus, jobs=jobs, profile=args.profile)
        p = split.per_gpu
    else:
        p = plan(model, request, machine, profile=args.profile)
    if args.json:
        data = p.to_json()
        if split is not None:
            data["gpus"] = split.to_json() | {"jobs": jobs}
        json.dump(data, out, indent=2)
        out.write("\n")
        return 0 if p.fits else 1
    hw = p.hardware if split is None else machine  # (each rank plans with its share of the RAM)
    each = f" (each GPU, with 1/{gpus} of the RAM)" if split is not None else ""
    stages = ", ".join(f"{k} {v:.1f} GiB" for k, v in p.stage_vram_gib)
    times = ", ".join(f"{k} {duration(v)}" for k, v in p.stage_seconds)
    lines = [f"machine: {hw.summary() if hw else '?'}" + (f" [profile {p.profile}]" if p.profile else "")]
    if split is not None:
        lines.append(f"GPUs:    {split.reason}")
    lines += [f"plan:    {p.summary()}{each}",
              f"GPU memory by stage: {stages or 'none (CPU)'}"]
    if split is not None and split.mode == "split":
        lines.append(f"time:    about {duration(split.seconds)} a video over {gpus} GPUs "
                     f"(the denoise shared; on one GPU: {times})")
    else:
        lines.append(f"time:    about {duration(p.seconds_estimate)} ({times})" + (" a job" if split else ""))
    lines += [f"note:    {n}" for n in p.notes]
    if not p.fits:
        lines.append(f"does not fit: {p.reason}")
    out.write("\n".join(lines) + "\n")
    return 0 if p.fits else 1
