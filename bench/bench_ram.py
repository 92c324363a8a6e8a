"""`python -m wan_lite generate` as a user runs it on a small machine, under a hard RAM limit (issue 21).

    python bench/bench_ram.py --out ram.json [--models t2v-a14b,i2v-a14b,ti2v-5b] [--vram 8,6,4] [--steps 3] [--work DIR]
                              [--a14b-dtype bf16|fp32] [--unlimited] [--keep]
    python bench/bench_ram.py --out /tmp/ram.json --tiny      # the same code on the CPU, tiny models

For each machine of the issue (MACHINES: T2V-A14B and I2V-A14B 1280x720x81 on 8 GB VRAM / 16 GB
RAM, 832x480x81 on 6 GB / 16 GB, TI2V-5B 1280x704x121 on 4 GB / 8 GB) it writes random full-size
checkpoints in the official layout (`--work`, one model at a time, deleted after its cases unless
`--keep`): the A14B experts as sharded safetensors, the umT5 .pth, the VAE .pth and the tokenizer.
The released A14B experts are fp32 (57 GB each); the GPU machine's 64 GB disk holds one such
expert but not it with umT5 and a cache, so the default writes them in bf16 (`--a14b-dtype fp32`
where the disk allows; the two experts are hard links of one file either way, same bytes, so the
cache holds one entry for both). TI2V-5B is bf16 as released.
Then it runs the CLI twice per machine, the first time with an empty weights cache (conversion)
and the second from the cache, each in a cgroup v2 whose memory.max is the RAM such a machine
leaves available (hardware.fake_available_ram_gib: 13.5 GiB of 16, 5.5 of 8; no swap there),
with the GPU capped by torch.cuda.set_per_process_memory_fraction and a memory profile of that
machine (written into a temporary profile folder). `--unlimited` adds a run without either
limit, for the time ratio. Recorded per run, as cases "ram-limit MODEL WxHxF VRAM/RAM first|second":
the plan's RAM figure and time per step, the measured peak RSS (wait4's ru_maxrss of the CLI
process) and the cgroup's memory.peak (page cache included), peak VRAM (allocated, reserved),
seconds per step (the sidecar's denoising time, both experts, / steps), whether it finished, its exit code and the
cgroup's oom_kill count. Without a writable cgroup v2 (or `--tiny`) the runs are not limited and
the record says so (`ram_limit_enforced: false`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import GIB, run_meta  # noqa: E402

from wan_lite.registry import MODELS  # noqa: E402
from wan_lite.runtime.hardware import fake_available_ram_gib  # noqa: E402

# (model, (width, height, frames), VRAM GB, RAM GB)
MACHINES = (("t2v-a14b", (1280, 720, 81), 8, 16), ("i2v-a14b", (1280, 720, 81), 8, 16),
            ("t2v-a14b", (832, 480, 81), 6, 16), ("i2v-a14b", (832, 480, 81), 6, 16),
            ("ti2v-5b", (1280, 704, 121), 4, 8))
CGROUP = Path("/sys/fs/cgroup")
SHARD_BYTES = 5 << 30
# --tiny: the tiny models' plans still count the released text encoder and VAE, which a 16 GB
# machine cannot hold beside the RAM base; the script check plans for this much RAM instead
TINY_RAM_GB = 64
PROMPT = "a red fox running through fresh snow at dawn, cinematic"

# The CLI in this process, with the GPU capped and the bench's profile folder: the same code as
# `python -m wan_lite generate ...`; it writes its peak VRAM to $WAN_LITE_BENCH_VRAM at exit.
CHILD = """
import atexit, json, os, sys
import torch
cap = float(os.environ.get("WAN_LITE_BENCH_VRAM_GIB", "0"))
if cap and torch.cuda.is_available():
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / torch.cuda.mem_get_info()[1]))
from wan_lite.runtime import hardware
hardware.PROFILES_DIR = __import__("pathlib").Path(os.environ["WAN_LITE_BENCH_PROFILES"])
def peak():
    cuda = torch.cuda.is_available()
    out = {"max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
           "max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0}
    with open(os.environ["WAN_LITE_BENCH_VRAM"], "w") as fh:
        json.dump(out, fh)
atexit.register(peak)
from wan_lite.cli import main
sys.exit(main(sys.argv[1:]))
"""


# ------------------------------------------------------------------------------ checkpoints
def _std(name: str, shape: tuple[int, ...]) -> float:
    if "norm" in name and name.endswith("weight"):
        return -0.1  # a gain 1 + N(0, 0.1)
    if name.endswith("modulation") or name.endswith("bias"):
        return 0.1
    return 1.0 / math.sqrt(math.prod(shape[1:]))


def _random(shape, std: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    t = torch.randn(shape, generator=gen, device=device)
    return 1.0 + t * -std if std < 0 else t * std


def write_dit(folder: Path, name: str, dtype: torch.dtype, device: torch.device, seed: int,
              sizes: dict | None = None) -> None:
    """A DiT in the official layout: sharded safetensors (each shard made and written alone),
    the index and config.json."""
    from tests.tiny_ckpt.dit import official_dit_shapes

    spec = MODELS[name]
    d = sizes or dict(dim=spec.dit.dim, ffn_dim=spec.dit.ffn_dim, num_layers=spec.dit.num_layers,
                      text_dim=spec.dit.text_dim)
    shapes = official_dit_shapes(in_dim=spec.dit_in_dim, out_dim=spec.dit_out_dim, dim=d["dim"], ffn_dim=d["ffn_dim"],
                                 num_layers=d["num_layers"], text_dim=d["text_dim"])
    folder.mkdir(parents=True, exist_ok=True)
    groups, cur, size = [], [], 0
    for n, s in shapes.items():
        nbytes = math.prod(s) * dtype.itemsize
        if cur and size + nbytes > SHARD_BYTES:
            groups.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += nbytes
    groups.append(cur)
    gen = torch.Generator(device).manual_seed(seed)
    weight_map, total = {}, 0
    for k, names in enumerate(groups):
        fname = f"diffusion_pytorch_model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        part = {n: _random(shapes[n], _std(n, shapes[n]), gen, device).to(dtype).cpu() for n in names}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in part.values())
        weight_map |= dict.fromkeys(names, fname)
        del part
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "model_type": spec.task, "text_len": 512, "in_dim": spec.dit_in_dim,
        "dim": d["dim"], "ffn_dim": d["ffn_dim"], "freq_dim": 256, "out_dim": spec.dit_out_dim,
        "num_heads": d["dim"] // 128, "num_layers": d["num_layers"], "eps": 1e-6}))


def write_model(root: Path, name: str, a14b_dtype: torch.dtype, device: torch.device, tiny: bool) -> Path:
    """The model folder in the official layout (full size, or the tests' tiny one)."""
    from tests.tiny_ckpt.t5 import T5_FILE, TOKENIZER_SUBDIR, write_tokenizer
    from tests.tiny_ckpt.vae import random_vae_state

    if tiny:
        from tests.tiny_ckpt import write_model as tiny_model

        return tiny_model(root, name)
    spec = MODELS[name]
    dtype = a14b_dtype if len(spec.dits) > 1 else torch.bfloat16
    first = root / spec.dits[0].folder
    write_dit(first, name, dtype, device, seed=1)
    for part in spec.dits[1:]:  # the same bytes under the other expert's name, no second copy
        (root / part.folder).mkdir(parents=True, exist_ok=True)
        for f in first.iterdir():
            os.link(f, root / part.folder / f.name)
    from bench_a14b_job import t5_shapes

    gen = torch.Generator(device).manual_seed(3)
    t5 = {n: _random(s, std, gen, device).to(torch.bfloat16).cpu()
          for n, (s, std) in t5_shapes(4096, 64, 10240, 24, 256384).items()}
    torch.save(t5, root / T5_FILE)
    del t5
    base = {"2.1": (96, 96), "2.2": (160, 256)}[spec.vae_version]
    torch.save(random_vae_state(spec.vae_version, base_dim=base[0], dec_dim=base[1], seed=4), root / spec.vae_file)
    write_tokenizer(root / TOKENIZER_SUBDIR)
    return root


# ------------------------------------------------------------------------------ limits
def make_cgroup(limit_bytes: int, tag: str) -> Path | None:
    """A cgroup v2 with memory.max = limit (swap off), or None where none can be made here."""
    try:
        if not (CGROUP / "cgroup.controllers").is_file() or "memory" not in (CGROUP / "cgroup.controllers").read_text():
            return None
        control = CGROUP / "cgroup.subtree_control"
        if "memory" not in control.read_text():
            control.write_text("+memory")
        group = CGROUP / f"wan_lite_bench_{os.getpid()}_{tag}"
        group.mkdir(exist_ok=True)
        (group / "memory.max").write_text(str(limit_bytes))
        if (group / "memory.swap.max").exists():
            (group / "memory.swap.max").write_text("0")
        return group
    except OSError as err:
        print(f"[bench_ram] no cgroup limit here ({err})", flush=True)
        return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def run_cli(argv: list[str], env: dict, group: Path | None, log: Path, timeout: float) -> dict:
    """Run the CLI (CHILD) in `group`; exit code, wait4's peak RSS, the cgroup's peak and OOM kills."""
    def enter() -> None:
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, *argv], cwd=ROOT, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, preexec_fn=enter)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                fh.write(f"\n[bench_ram] stopped after {timeout:.0f} s\n")
                break
            time.sleep(0.2)
    rc = os.waitstatus_to_exitcode(status)
    out = {"exit_code": rc, "wall_s": time.perf_counter() - start, "peak_rss_gib": usage.ru_maxrss / 2**20}
    if group is not None:
        peak = _read(group / "memory.peak").strip()
        out["cgroup_peak_gib"] = int(peak) / GIB if peak.isdigit() else None
        events = dict(line.split() for line in _read(group / "memory.events").splitlines() if line.strip())
        out["oom_kills"] = int(events.get("oom_kill", 0))
    return out


# ------------------------------------------------------------------------------ cases
def planner_figures(name: str, size: tuple[int, int, int], vram: float, ram: float, steps: int,
                    profile_dir: Path, tiny_cfg=None) -> dict:
    from wan_lite.runtime.hardware import Hardware, get_profile
    from wan_lite.runtime.planner import ModelFootprint, PlanRequest, plan

    hw = Hardware.probe(".")
    fp = ModelFootprint.full_size(name) if tiny_cfg is None else ModelFootprint.from_config(
        tiny_cfg, name=name, vae_version=MODELS[name].vae_version, experts=len(MODELS[name].dits))
    prof = get_profile(profile_name(vram, ram), profile_dir)
    p = plan(fp, PlanRequest(*size, steps=steps, image=name.startswith("i2v")), hw, prof)
    denoise = dict(p.stage_seconds).get("denoise", 0.0)
    return {"plan": p.summary(), "plan_fits": p.fits, "plan_ram_gib": p.peak_ram_gib, "plan_vram_gib": p.peak_vram_gib,
            "plan_s_per_step": denoise / steps, "plan_reason": p.reason}


def profile_name(vram: float, ram: float) -> str:
    return f"ram-limit {vram:g}gb-{ram:g}gb"


def write_profiles(folder: Path, tiny: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for _n, _s, vram, ram in MACHINES:
        ram = TINY_RAM_GB if tiny else ram
        name = profile_name(vram, ram)
        (folder / f"{name.replace(' ', '-')}.json").write_text(json.dumps({
            "name": name, "description": f"bench_ram: a machine with {vram} GB VRAM and {ram} GB RAM",
            "hardware": {"vram_gb": vram, "ram_gb": ram}}))


def sidecar_timings(video: Path) -> dict:
    try:
        data = json.loads(video.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}
    settings = data.get("settings", data)
    return settings.get("timings") or data.get("timings") or {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("_bench_ram"))
    ap.add_argument("--models", type=lambda s: s.split(","), default=["t2v-a14b", "i2v-a14b", "ti2v-5b"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--vram", type=lambda s: [float(v) for v in s.split(",")], default=None,
                    help="only the machines with these VRAM sizes (8: the 720p A14B ones, 6: 480p, 4: TI2V-5B)")
    ap.add_argument("--a14b-dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--unlimited", action="store_true", help="also run each case without the RAM and GPU limits")
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    ap.add_argument("--timeout-s", type=float, default=3000.0, help="per CLI run")
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU (checks the script)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    meta = run_meta(cuda)
    profiles = Path(tempfile.mkdtemp(prefix="wan_lite_bench_profiles_"))
    write_profiles(profiles, args.tiny)
    records: list[dict] = []
    a14b_dtype = torch.float32 if args.a14b_dtype == "fp32" else torch.bfloat16
    for model in dict.fromkeys(args.models):
        root = args.work / model
        t0 = time.perf_counter()
        write_model(root, model, a14b_dtype, device, args.tiny)
        write_s = time.perf_counter() - t0
        tiny_cfg = None
        if args.tiny:
            from wan_lite.loading.components import resolve_sources
            from wan_lite.models.dit import WanDiTConfig

            _spec, sources, _tok = resolve_sources(root, {}, model)
            tiny_cfg = WanDiTConfig.from_shapes(sources[f"dit_{MODELS[model].dit_roles[0]}"].shapes())
        image = args.work / "start.png"
        if model.startswith("i2v"):
            from PIL import Image

            Image.new("RGB", (1280, 720), (180, 120, 60)).save(image)
        for name, size, vram, ram in MACHINES:
            if name != model or (args.vram and vram not in args.vram):
                continue
            w, h, f = (64, 64, 9) if args.tiny else size
            ram = TINY_RAM_GB if args.tiny else ram
            runs = [("first", True), ("second", True)] + ([("unlimited", False)] if args.unlimited else [])
            cache = args.work / "cache" / f"{model}-{vram}-{ram}"
            shutil.rmtree(cache, ignore_errors=True)  # the first run converts
            for label, limited in runs:
                case = f"ram-limit {model} {w}x{h}x{f} {vram}GB/{ram}GB {label}"
                limit = int(fake_available_ram_gib(ram) * GIB)
                group = make_cgroup(limit, f"{model}-{vram}-{label}") if limited and not args.tiny else None
                video = args.work / "out" / f"{model}-{vram}-{label}.mp4"
                for old in video.parent.glob(f"{video.stem}*"):
                    old.unlink()
                vram_file = args.work / "out" / f"{model}-{vram}-{label}.vram.json"
                video.parent.mkdir(parents=True, exist_ok=True)
                env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1",
                           WAN_LITE_CONFIG_DIR=os.environ.get("WAN_LITE_CONFIG_DIR", str(args.work / "config")),
                           WAN_LITE_CACHE_DIR=str(cache), WAN_LITE_BENCH_PROFILES=str(profiles),
                           WAN_LITE_BENCH_VRAM=str(vram_file),
                           WAN_LITE_BENCH_VRAM_GIB=str(vram if limited and cuda else 0))
                argv = ["generate", "--model-dir", str(root), "--model", model, "--prompt", PROMPT,
                        "--size", f"{w}x{h}", "--frames", str(f), "--steps", str(args.steps), "--seed", "1",
                        "--out", str(video), "--overwrite",
                        "--profile", profile_name(vram, ram) if limited else "auto"]
                if model.startswith("i2v"):
                    argv += ["--image", str(image)]
                if args.tiny:
                    argv += ["--device", "cpu"]
                print(f"[bench_ram] {case}: {' '.join(argv)}", flush=True)
                log = args.work / "out" / f"{model}-{vram}-{label}.log"
                got = run_cli(argv, env, group, log, args.timeout_s)
                timings = sidecar_timings(video)
                denoise = sum(v for k, v in timings.items() if k in ("denoise", "high_noise", "low_noise"))
                rec = {"case": case, "model": model, "size": f"{w}x{h}", "frames": f, "vram_gb": vram, "ram_gb": ram,
                       "run": label, "ram_limit_gib": limit / GIB if limited else None,
                       "ram_limit_enforced": group is not None, "gpu_cap_gib": vram if limited and cuda else None,
                       "a14b_dtype": args.a14b_dtype if len(MODELS[model].dits) > 1 else "bf16",
                       "finished": got["exit_code"] == 0 and video.is_file(), **got,
                       "peak_ram_gib": got["peak_rss_gib"],
                       "s_per_step": denoise / args.steps if denoise else None,
                       "timings": timings, "write_s": write_s, "log_tail": log.read_text()[-1500:]}
                try:
                    v = json.loads(vram_file.read_text())
                    rec["peak_vram_gib"], rec["peak_vram_reserved_gib"] = v["max_allocated_gib"], v["max_reserved_gib"]
                except (OSError, ValueError, KeyError):
                    rec["peak_vram_gib"] = None
                if limited:
                    rec |= planner_figures(model, (w, h, f), vram, ram, args.steps, profiles, tiny_cfg)
                    rec["rss_within_plan"] = rec["plan_fits"] and rec["peak_rss_gib"] <= rec["plan_ram_gib"]
                if group is not None:
                    try:
                        group.rmdir()
                    except OSError:
                        pass
                records.append(rec | {k: meta[k] for k in ("gpu", "torch", "date")})
                unlimited = next((r for r in records if r["case"] == case.replace(label, "unlimited")), None)
                if unlimited:
                    for r in records:
                        if r["case"].startswith(case.rsplit(" ", 1)[0]) and r.get("s_per_step") and unlimited.get(
                                "s_per_step"):
                            r["ratio_vs_unlimited"] = r["s_per_step"] / unlimited["s_per_step"]
                print(json.dumps({k: v for k, v in rec.items() if k != "log_tail"}), flush=True)
                args.out.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(profiles, ignore_errors=True)
    return 0 if all(r["finished"] for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
