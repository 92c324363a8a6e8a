"""All of wan_lite's GPU measurements in one command, and the report built from them.

    python bench/run.py measure --out DIR [--parts tests,attention,dit,vae,job,job_a14b,video,lora,quality,multigpu,ram] [--budget-s 560]
    python bench/run.py report DIR [DIR ...] [--docs docs]

`measure` (on the GPU) runs the GPU-marked tests and the benchmark scripts (bench_attention.py:
the attention kernels at the DiT's shapes; bench_dit.py: one DiT
forward per plan and format against diffusers; bench_vae.py: Wan2.2 VAE decode; bench_job.py:
the whole TI2V-5B job under a memory cap; bench_video.py: request to mp4 of TI2V-5B 720p, with and
without the step cache, and Turbo-shaped; bench_lora.py: a DiT forward with a rank-64 LoRA merged and
unmerged, and the time to apply it; bench_ram.py: `python -m wan_lite generate` under a cgroup RAM
limit and a GPU cap for the small machines of issue 21, first run and from the cache; bench_a14b_job.py: the whole T2V-A14B job from
ComfyUI-format fp8 files with the 8 GB / 32 GB profile; bench_quality.py: int8 and fp8 against bf16 over
a whole tiny-model generation, which also runs on a CPU; bench_multigpu.py: time per step of one job
split over 1/2/4/8 GPUs, on a machine with several), each writing raw JSON into DIR. A device call is
limited to 10 minutes, so the parts can be measured in separate calls into separate folders.
`report` merges raw folders into docs/benchmarks.json (one record per case: case, plan,
peak_vram_gib, peak_ram_gib, s_per_step, ratio_vs_resident, ratio_vs_diffusers, rel_error, gpu,
torch, date) and the table in docs/benchmarks.md. Numbers in those files come only from here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("tests", "attention", "dit", "vae", "job", "job_a14b", "video", "lora", "quality", "multigpu", "ram")


def _run(cmd: list[str], timeout: float, log: Path) -> int:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path)
    with log.open("w") as fh:
        try:
            return subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                  timeout=max(10, timeout)).returncode
        except subprocess.TimeoutExpired:
            fh.write(f"\n[run.py] stopped after {timeout:.0f} s\n")
            return 124


def measure(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    left = lambda: args.budget_s - (time.perf_counter() - start)  # noqa: E731
    py = sys.executable
    for part in args.parts:
        t0 = time.perf_counter()
        if part == "tests":
            files = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").glob("test_*.py")
                           if "mark.gpu" in f.read_text())
            rc = _run([py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files,
                       "--junitxml", str(out / "gpu_tests.xml")], min(150, left()), out / "gpu_tests.log")
        elif part == "attention":
            rc = _run([py, "bench/bench_attention.py", "--out", str(out / "attention.json")], min(120, left()),
                      out / "attention.log")
        elif part == "dit":
            rc = _run([py, "bench/bench_dit.py", "--out", str(out / "dit.json"), "--budget-s",
                       str(max(30, min(args.dit_budget_s, left() - 20))), *args.dit_args.split()],
                      left(), out / "dit.log")
        elif part == "vae":
            rc = _run([py, "bench/bench_vae.py", "--out", str(out / "vae.json"), "--budget-s",
                       str(max(30, left() - 30)), *args.vae_args.split()], left(), out / "vae.log")
        elif part == "job":
            rc = _run([py, "bench/bench_job.py", "--out", str(out / "job.json"), *args.job_args.split()], left(),
                      out / "job.log")
        elif part == "job_a14b":
            # the 8 GB / 32 GB profile's own plan, then the plan for a GPU with 6 GiB usable (every block
            # streamed, the text encoder too, 8192-token chunks: the planner's choice there) under a 6 GiB cap
            six = "resident_blocks=0,text_encoder=stream,ffn_chunk_tokens=8192"
            for log, extra in (("job_a14b.log", ["--cap-gib", "8"]),
                               ("job_a14b_streamed.log", ["--cap-gib", "6", "--force", six])):
                rc = _run([py, "bench/bench_a14b_job.py", "--out", str(out / "job_a14b.json"), *extra],
                          left(), out / log)
        elif part == "video":
            rc = _run([py, "bench/bench_video.py", "--out", str(out / "video.json"), *args.video_args.split()],
                      left(), out / "video.log")
        elif part == "lora":
            rc = _run([py, "bench/bench_lora.py", "--out", str(out / "lora.json")], left(), out / "lora.log")
        elif part == "ram":
            rc = _run([py, "bench/bench_ram.py", "--out", str(out / "ram.json"), "--timeout-s", str(max(60, left() - 30)),
                       *args.ram_args.split()], left(), out / "ram.log")
        elif part == "quality":
            rc = _run([py, "bench/bench_quality.py", "--out", str(out / "quality.json")], min(300, left()),
                      out / "quality.log")
        elif part == "multigpu":  # one job over 1/2/4/8 GPUs; measures nothing on a one-GPU machine
            rc = _run([py, "bench/bench_multigpu.py", "--out", str(out / "multigpu.json"), "--budget-s",
                       str(max(30, left() - 30)), *args.multigpu_args.split()], left(), out / "multigpu.log")
        else:
            raise SystemExit(f"unknown part {part!r}; parts are {', '.join(PARTS)}")
        print(f"[run.py] {part}: exit {rc} in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _dit_records(data: dict) -> list[dict]:
    meta = data.get("meta", {})
    recs = [r for r in data.get("records", []) if "s_per_forward" in r]
    out = []
    for r in recs:
        same = {x["case"]: x for x in recs if x["model"] == r["model"]}
        s = r["s_per_forward"]
        resident = same.get("bf16-resident", {}).get("s_per_forward")
        peer = "diffusers-group-offload" if "streamed" in r["case"] else "diffusers-resident"
        d = same.get(peer, {}).get("s_per_forward")
        out.append({
            "case": f"DiT {r['model']} {r['size']}x{r['frames']} {r['case']}",
            "plan": r["case"],
            "peak_vram_gib": r.get("peak_vram_gib"),
            "peak_ram_gib": r.get("host_rss_gib"),
            "s_per_step": 2 * s,  # two forwards per step (cond + uncond)
            "ratio_vs_resident": s / resident if resident and not r["case"].startswith("diffusers") else None,
            "ratio_vs_diffusers": None if r["case"].startswith("diffusers") or not d else s / d,
            "peer": None if r["case"].startswith("diffusers") else peer,
            "rel_error": r.get("rel_l2_vs_bf16"),
            "gpu": meta.get("gpu"), "torch": meta.get("torch"), "date": meta.get("date"),
        })
    return out


def _vae_records(data: dict) -> list[dict]:
    meta = data.get("meta", {})
    recs = [r for r in data.get("records", []) if "s" in r]
    by_case = {r["case"]: r for r in recs}
    out = []
    for r in recs:
        dtype = "fp32" if "fp32" in r["case"] else "bf16"
        base = by_case.get(f"wan-untiled-{dtype}", {}).get("s")
        tiled = r.get("tile_latent") is not None  # the auto case says what it chose
        peer = by_case.get("diffusers-tiled-bf16" if tiled else "diffusers-untiled-bf16", {}).get("s")
        ours = r["case"].startswith("wan")
        out.append({
            "case": f"VAE 2.2 decode {r.get('size')}x{r.get('frames')} {r['case']}",
            "plan": r["case"],
            "peak_vram_gib": r.get("peak_vram_gib"),
            "peak_ram_gib": r.get("host_rss_gib"),
            "decode_s": r["s"],
            "ratio_vs_resident": r["s"] / base if (base and ours) else None,
            "ratio_vs_diffusers": r["s"] / peer if (peer and ours and dtype == "bf16") else None,
            "rel_error": r.get("mean_abs_err"),
            "max_abs_err": r.get("max_abs_err"),
            "gpu": meta.get("gpu"), "torch": meta.get("torch"), "date": meta.get("date"),
        })
    return out


def _generic_records(data) -> list[dict]:
    recs = data.get("records", data) if isinstance(data, dict) else data
    return [r for r in recs if isinstance(r, dict) and "case" in r]


def report(args: argparse.Namespace) -> int:
    records: list[dict] = []
    tests = []
    attention: list[str] = []
    for folder in map(Path, args.dirs):
        found: list[dict] = []
        if (d := _load(folder / "attention.json")) is not None:
            gpu = d.get("meta", {}).get("gpu")
            attention += [f"| {folder.name} | {r['shape']} | {r['kernel']} | " +
                          (f"{r['ms']:.1f} | {r['tflops']:.0f} | {r['rel_error']:.4f} | {gpu} |" if "ms" in r
                           else f"{r.get('error', '?')} | | | {gpu} |") for r in d.get("records", [])]
        if (d := _load(folder / "dit.json")) is not None:
            found += _dit_records(d)
        if (d := _load(folder / "vae.json")) is not None:
            found += _vae_records(d)
        for name in ("job.json", "job_a14b.json", "video.json", "lora.json", "quality.json", "multigpu.json", "ram.json"):
            if (d := _load(folder / name)) is not None:
                found += _generic_records(d)
        records += [r | {"run": folder.name} for r in found]
        if (folder / "gpu_tests.log").is_file():
            tail = (folder / "gpu_tests.log").read_text().strip().splitlines()[-1:]
            tests += tail
    # An A14B job step against the all-resident bf16 DiT forward at its size (bench_dit.py, the
    # latest run up to the job's own, so both ran the same code and kernels): the bench's disk holds
    # fp8 files of the experts, not the 57 GB of bf16 ones.
    resident = sorted((r["run"], r["case"].split()[2], r["s_per_step"]) for r in records
                      if r["case"].startswith("DiT a14b") and r["case"].endswith("bf16-resident"))
    for r in records:
        if r["case"].startswith("t2v-a14b job") and r.get("s_per_step"):
            size = r["case"].split()[2]
            base = [s for run, sz, s in resident if sz == size and run <= r["run"]]
            r["ratio_vs_resident"] = r["s_per_step"] / base[-1] if base else None
    docs = Path(args.docs)
    (docs / "benchmarks.json").write_text(json.dumps(records, indent=1) + "\n")
    keys = ("run", "case", "peak_vram_gib", "peak_ram_gib", "s_per_step", "decode_s", "wall_s", "ratio_vs_quality_off",
            "ratio_vs_resident",
            "ratio_vs_diffusers", "rel_error")

    def cell(v, key=""):
        if isinstance(v, float) and key.startswith("ratio"):
            return f"{v:.3f}"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v).replace("|", "/")

    gpus = sorted({r.get("gpu") for r in records if r.get("gpu")})
    torches = sorted({r.get("torch") for r in records if r.get("torch")})
    lines = ["# Benchmarks", "",
             f"Written by `python bench/run.py report` on {dt.date.today().isoformat()} from raw results of",
             "`python bench/run.py measure` (see bench/). Devices: " + (", ".join(gpus) or "?") +
             "; torch " + (", ".join(torches) or "?") + ".", "",
             "s_per_step counts the two DiT forwards of a guided step. ratio_vs_diffusers compares a",
             "resident case with diffusers all resident and a streamed case with diffusers",
             "`enable_group_offload(block_level, use_stream=True)`, at the same shapes in the same run;",
             "a tiled VAE decode is compared with diffusers' `enable_tiling()`. rel_error: relative L2 error",
             "of one DiT forward against wan_lite's resident bf16 forward; for the VAE, the mean absolute",
             "error (pixels in [-1, 1]) against the untiled decode in the same dtype. The job rows run the",
             "real pipeline (text encoding, denoising, decoding) with the planner's plan; their `plan`",
             "field in benchmarks.json says what was chosen; a ti2v-5b row named `CASE + fields` runs the",
             "plan of CASE with those fields forced (a choice the planner did not make; empty where it",
             "failed, its error in benchmarks.json), its ratio against the resident row of its run.",
             "The t2v-a14b job rows load ComfyUI-format",
             "fp8 files from disk under a hard GPU cap (`cap`) and count host RAM as the process's peak",
             "RSS; their ratio_vs_resident is against the all-resident bf16 DiT forward at the same size",
             "(latest run up to the job's own): bf16 files of both experts (57 GB) do not fit the GPU machine's disk beside",
             "the rest, so no bf16 resident job is run. The tiny generation rows: a whole generation",
             "(64x64, 9 frames, 4 steps) of tiny random models with int8 or fp8 experts; rel_error is",
             "that of the final latents against the bf16 run (benchmarks.json: also the video's).", "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k), k) for k in keys) + " |" for r in records]
    if attention:
        lines += ["", "Self-attention kernels at the DiT's shapes (bench_attention.py; bf16, head size 128;",
                  "rel_error against the flash backend):", "",
                  "| run | shape | kernel | ms | TFLOP/s | rel_error | gpu |", "|---|---|---|---|---|---|---|",
                  *attention]
    if tests:
        lines += ["", "GPU-marked tests: " + "; ".join(tests)]
    runs = [(Path(f).name, (Path(f) / "command.txt").read_text().strip())
            for f in args.dirs if (Path(f) / "command.txt").is_file()]
    if runs:
        lines += ["", "Runs (raw results in bench/results/<run>/):", ""]
        lines += [f"- {name}: `{cmd}`" for name, cmd in runs]
    (docs / "benchmarks.md").write_text("\n".join(lines) + "\n")
    print(f"{len(records)} records -> {docs / 'benchmarks.json'}, {docs / 'benchmarks.md'}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--out", required=True)
    m.add_argument("--parts", type=lambda s: s.split(","), default=list(PARTS))
    m.add_argument("--budget-s", type=float, default=560.0)
    m.add_argument("--dit-budget-s", type=float, default=330.0)
    m.add_argument("--dit-args", default="", help="extra arguments for bench_dit.py, e.g. '--size-a14b 1280x720'")
    m.add_argument("--vae-args", default="", help="extra arguments for bench_vae.py")
    m.add_argument("--job-args", default="", help="extra arguments for bench_job.py, e.g. '--variant ...'")
    m.add_argument("--multigpu-args", default="", help="extra arguments for bench_multigpu.py, e.g. '--gpus 1,8'")
    m.add_argument("--video-args", default="", help="extra arguments for bench_video.py, e.g. '--cases turbo'")
    m.add_argument("--ram-args", default="", help="extra arguments for bench_ram.py, e.g. '--models ti2v-5b --unlimited'")
    r = sub.add_parser("report")
    r.add_argument("dirs", nargs="+")
    r.add_argument("--docs", default=str(ROOT / "docs"))
    args = ap.parse_args()
    return measure(args) if args.cmd == "measure" else report(args)


if __name__ == "__main__":
    sys.exit(main())
