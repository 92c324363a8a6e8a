"""Time to video: a whole TI2V-5B 1280x704x121 job from request to mp4 written, models loaded.

    python bench/bench_video.py --out video.json [--cases quality-off,quality-balanced,turbo]
    python bench/bench_video.py --out /tmp/v.json --smoke      # the same code on the CPU, tiny sizes

The full-size random-weight TI2V-5B of bench_job.py (DiT, Wan2.2 VAE, umT5-XXL, all bf16) runs
through wan_lite's pipeline with the planner's plan for this GPU, the attention kernel the engine
picks, and each case is one request resolved by `wan_lite.job.resolve`:
  quality-off       50 steps, guidance 5, every DiT forward (the official Quality job)
  quality-balanced  the same with the step cache "balanced"
  quality-fast      the same with the step cache "fast"
  turbo             Turbo: 4 steps, guidance 1 (one DiT pass per step: what a speed LoRA runs),
                    planned speed first (the VAE in bf16)
  turbo-new-prompt  the same with a new prompt: its encoding with the text encoder kept loaded
Each case gets the plan the engine makes for it on this GPU.
A Turbo-shaped warm-up run comes first (kernels compiled, the prompt encoded once: its text time is
`text_first_s`, the encoder loaded); then each case runs once, as the app runs a second job with
the models loaded and only the settings changed (the prompt's embedding cached).
Recorded per case: wall seconds from request to the mp4 on disk, with the breakdown text /
denoise / decode / write, DiT forwards computed and skipped, the ratio to quality-off, peak GPU
memory. The mp4 is written with the app's writer (H.264 through imageio-ffmpeg).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from wan_lite.api import GenerateRequest  # noqa: E402
from wan_lite.job import resolve  # noqa: E402
from wan_lite.output import write_mp4  # noqa: E402
from wan_lite.runtime.apply import PlannedPlacement  # noqa: E402
from wan_lite.runtime.hardware import Hardware  # noqa: E402
from wan_lite.runtime.planner import ModelFootprint, PlanRequest, plan  # noqa: E402

GIB = 1024**3
PROMPT = "a red fox trotting through fresh snow, morning light"
CASES = {
    "quality-off": dict(steps=50, cache="off"),
    "quality-balanced": dict(steps=50, cache="balanced"),
    "quality-fast": dict(steps=50, cache="fast"),
    "turbo": dict(steps=4, guidance=1.0, cache="off", turbo=True),
    # the same with a prompt not seen before: its encoding with the text encoder kept loaded
    "turbo-new-prompt": dict(steps=4, guidance=1.0, cache="off", turbo=True, prompt="a paper boat on a rainy street"),
}


def _pipeline(smoke: bool):
    if smoke:
        import wan_lite
        from tests.tiny_ckpt import write_model

        folder = write_model(Path(tempfile.mkdtemp()) / "ti2v-5b", "ti2v-5b")
        return wan_lite.load_pipeline(folder, device="cpu"), dict(width=64, height=64, frames=9)
    from bench_job import build_pipeline

    return build_pipeline(torch.device("cuda")), dict(width=1280, height=704, frames=121)


def bind_plan(pipe, job, hw) -> str:
    """The plan the engine makes for this job on this GPU (Turbo: speed first), bound to the pipeline."""
    the_plan = plan(ModelFootprint.full_size("ti2v-5b"),
                    PlanRequest(job.width, job.height, job.frames, steps=job.steps,
                                cfg=any(g != 1 for g in job.guidance), speed_first=bool(job.request.turbo)), hw)
    if getattr(getattr(pipe, "placement", None), "plan", None) != the_plan:
        PlannedPlacement(the_plan, pipe.device).bind(pipe)
    return the_plan.summary()


def run_case(pipe, size: dict, fields: dict, out_dir: Path, cuda: bool, hw=None) -> dict:
    fields = dict(fields)
    job = resolve(GenerateRequest(fields.pop("prompt", PROMPT), model="ti2v-5b", seed=0, **size, **fields))
    the_plan = bind_plan(pipe, job, hw) if cuda else "CPU smoke run"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = pipe.generate(job, preview_every=0)
    t1 = time.perf_counter()
    video = write_mp4(out_dir / f"{fields['cache']}-{job.steps}.mp4", result.frames, result.fps,
                      {"settings": result.settings})
    t2 = time.perf_counter()
    timings = result.timings
    return {
        "wall_s": t2 - t0,
        "text_s": timings.get("text", 0.0),
        "denoise_s": sum(v for k, v in timings.items() if k in ("denoise", "high_noise", "low_noise")),
        "decode_s": timings.get("decode", 0.0),
        "write_s": t2 - t1,
        "dit_forwards": result.settings["dit_forwards"],
        "peak_vram_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
        "mp4_bytes": video.stat().st_size,
        "latents_finite": bool(torch.isfinite(result.latents).all()),
        "plan": the_plan,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU (checks the script)")
    args = ap.parse_args()
    cuda = not args.smoke
    pipe, size = _pipeline(args.smoke)
    hw = None
    if cuda:
        from wan_lite.runtime.attention_select import select_attention

        hw = Hardware.probe()
        choice = select_attention(pipe.device)
        pipe.set_attention(choice.fn)
        meta = {"attention": choice.note, "gpu": torch.cuda.get_device_name(0)}
    else:
        meta = {"gpu": None}
    meta.update(torch=torch.__version__, date=dt.date.today().isoformat())
    out_dir = Path(tempfile.mkdtemp())
    warm = run_case(pipe, size, dict(CASES["turbo"]), out_dir, cuda, hw)
    meta["text_first_s"] = warm["text_s"]
    records = []
    for case in args.cases.split(","):
        fields = dict(CASES[case])
        if args.smoke:
            fields["steps"] = min(fields["steps"], 12)
        try:
            rec = run_case(pipe, size, fields, out_dir, cuda, hw)
        except Exception as err:  # a failed case is a result too
            rec = {"error": f"{type(err).__name__}: {err}"}
        rec.update(case=f"video ti2v-5b {size['width']}x{size['height']}x{size['frames']} {case}", **meta)
        records.append(rec)
        print(json.dumps(rec), flush=True)
        args.out.write_text(json.dumps(records, indent=2))
    base = next((r for r in records if r["case"].endswith(" quality-off") and "wall_s" in r), None)
    for rec in records:
        if base is not None and "wall_s" in rec:
            rec["ratio_vs_quality_off"] = rec["wall_s"] / base["wall_s"]
    args.out.write_text(json.dumps(records, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
