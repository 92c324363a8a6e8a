"""Time per denoising step of one job split over 1/2/4/8 GPUs of one host (wan_lite.parallel).

    python bench/bench_multigpu.py --out results/multigpu.json [--gpus 1,2,4,8] [--models a14b,5b]
    python bench/bench_multigpu.py --tiny --out /tmp/multigpu.json    # CPU, gloo: checks the script

For each model (an A14B expert at 1280x720x81: 75,600 tokens, 40 heads; TI2V-5B at 1280x704x121:
27,280 tokens, 24 heads) and each GPU count N it spawns N ranks (NCCL; `--tiny`: gloo CPU
processes), builds the DiT with the same seeded random bf16 weights on every rank (each holds
the whole expert, as the plan's resident format), and times one guided step: the conditional and
unconditional passes, as `wan_lite.parallel` runs them (N = 1: two forwards; N even: CFG 2 x
sequence N/2; N odd: both passes split over all N). Per case: median seconds per step after a
warm-up step (the slowest rank's), speedup against N = 1 of the same run, the peak GPU memory of
each rank (`torch.cuda.max_memory_allocated`), and the relative L2 error of the guided velocity
against N = 1 (bf16 roundings only). `--sp-attention ulysses,ring` times both sequence-parallel
attentions (Ulysses all-to-all, ring; where the split has a sequence part: N >= 3), to choose the
default by measurement. Records go to `--out` after every case.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import random_dit, rel_l2, run_meta  # noqa: E402

from wan_lite.models.dit import WanDiTConfig  # noqa: E402

log = logging.getLogger("bench_multigpu")
GIB = 1024**3
GUIDANCE = 5.0

MODELS = {  # name: (config, vae stride (t, h, w), size (W, H), frames)
    "a14b": (WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=16, out_dim=16),
             (4, 8, 8), (1280, 720), 81),
    "5b": (WanDiTConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48),
           (4, 16, 16), (1280, 704), 121),
}
TINY = {  # 3 heads: 2 and 4 ranks split them unevenly; token counts no rank count divides
    "a14b": (WanDiTConfig(dim=384, ffn_dim=512, num_heads=3, num_layers=2, in_dim=16, out_dim=16, text_dim=64),
             (4, 8, 8), (80, 48), 9),
    "5b": (WanDiTConfig(dim=384, ffn_dim=512, num_heads=3, num_layers=2, in_dim=48, out_dim=48, text_dim=64),
           (4, 16, 16), (96, 64), 9),
}


def _rank(index: int, world: int, init: str, name: str, tiny: bool, steps: int, out: str) -> None:
    import torch.distributed as dist

    from wan_lite.parallel.group import init_group, leave_group
    from wan_lite.parallel.sequence import SplitDiT

    cfg, stride, (w, h), frames = (TINY if tiny else MODELS)[name]
    if tiny:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    pg = init_group(index, world, index, cfg=True, backend_name="gloo" if tiny else "nccl", init_method=init) \
        if world > 1 else None
    device = torch.device("cpu") if tiny else torch.device("cuda", index)
    dtype = torch.float32 if tiny else torch.bfloat16
    dit = random_dit(cfg, device, dtype)  # the same weights on every rank
    split = SplitDiT(dit, pg).attach() if pg is not None else None
    latent = (cfg.in_dim, (frames - 1) // stride[0] + 1, h // stride[1], w // stride[2])
    gen = torch.Generator(device=device).manual_seed(1234)
    x = torch.randn(1, *latent, device=device, generator=gen)
    ctx = torch.randn(2, 512, cfg.text_dim, device=device, generator=gen).to(dtype)
    t = torch.tensor([900.0], device=device)

    def step() -> torch.Tensor:
        if pg is not None and pg.cfg == 2:  # one batch of 2: the hook gives each CFG half its row
            out = dit(torch.cat([x, x]), torch.cat([t, t]), ctx)
            v_c, v_u = out[:1], out[1:]
        else:
            v_c, v_u = dit(x, t, ctx[:1]), dit(x, t, ctx[1:])
        return v_u + GUIDANCE * (v_c - v_u)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        if pg is not None:
            dist.barrier()

    with torch.no_grad():
        v = step()  # warm-up
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            v = step()
            sync()
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None
    rec = {"rank": index, "s_per_step": statistics.median(times), "peak_vram_gib": peak}
    if pg is not None:
        recs: list = [None] * world
        dist.all_gather_object(recs, rec)
    else:
        recs = [rec]
    if index == 0:
        torch.save({"v": v.float().cpu(), "ranks": recs}, out)
    if split is not None:
        split.detach()
    if pg is not None:
        leave_group()


def run_case(name: str, world: int, tiny: bool, steps: int, tmp: Path, attention: str = "ulysses") -> dict:
    import torch.multiprocessing as mp

    from wan_lite.parallel.launch import _free_port
    from wan_lite.parallel.sequence import SP_ATTENTION_ENV

    os.environ[SP_ATTENTION_ENV] = attention  # the spawned ranks read it
    out = tmp / f"{name}-{world}-{attention}.pt"
    if world == 1:
        _rank(0, 1, "", name, tiny, steps, str(out))
    else:
        if not tiny:
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        mp.start_processes(_rank, args=(world, f"tcp://127.0.0.1:{_free_port()}", name, tiny, steps, str(out)),
                           nprocs=world, start_method="spawn")
    return torch.load(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--gpus", type=lambda s: [int(v) for v in s.split(",")], default=None,
                    help="GPU counts (default 1,2,4,8 up to the GPUs present; --tiny: 1,2,4)")
    ap.add_argument("--models", type=lambda s: s.split(","), default=["a14b", "5b"])
    ap.add_argument("--sp-attention", type=lambda s: s.split(","), default=["ulysses"],
                    help="sequence-parallel attentions to time: ulysses, ring or both (ulysses,ring)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per case (after one warm-up step)")
    ap.add_argument("--tiny", action="store_true", help="tiny models, gloo CPU processes: checks the script")
    ap.add_argument("--budget-s", type=float, default=540.0, help="cases that would start after this are skipped")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not a.tiny and not torch.cuda.is_available():
        log.error("bench_multigpu.py needs CUDA GPUs (or --tiny for a CPU check of the script)")
        return 1
    have = 4 if a.tiny else torch.cuda.device_count()
    if have < 2 and not a.gpus:
        log.warning("one GPU here: nothing to compare (give --gpus 1 to time the one-GPU step alone)")
        return 0
    counts = [n for n in (a.gpus or [1, 2, 4, 8]) if n <= have]
    meta = run_meta(not a.tiny) | {"gpus_present": have, "backend": "gloo" if a.tiny else "nccl"}
    records: list[dict] = []
    start = time.perf_counter()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models:
            cfg, stride, (w, h), frames = (TINY if a.tiny else MODELS)[name]
            tokens = ((frames - 1) // stride[0] + 1) * (h // stride[1] // 2) * (w // stride[2] // 2)
            base = None
            runs = [(n, att) for n in counts for att in (a.sp_attention if n >= 3 else a.sp_attention[:1])]
            for n, att in runs:
                label = f"multigpu {name} {w}x{h}x{frames} {n} GPU" + (f" {att}" if n >= 3 else "")
                if time.perf_counter() - start > a.budget_s:
                    log.warning("budget spent: %s skipped", label)
                    continue
                t0 = time.perf_counter()
                try:
                    got = run_case(name, n, a.tiny, a.steps, Path(tmp), att)
                except Exception as err:  # an OOM or a failed rank: record it and go on
                    records.append({"case": label, "error": repr(err)})
                    log.error("%s failed: %r", label, err)
                    continue
                s = max(r["s_per_step"] for r in got["ranks"])
                if n == 1:
                    base = (s, got["v"])
                layout = "1" if n == 1 else (f"CFG 2 x SP {n // 2}" if n % 2 == 0 else f"SP {n}")
                rec = {"case": label, "model": name, "gpus": n, "sp_attention": att if n >= 3 else None,
                       "layout": layout, "tokens": tokens, "heads": cfg.num_heads, "s_per_step": s,
                       "speedup_vs_1": base[0] / s if base else None,
                       "peak_vram_gib": max((r["peak_vram_gib"] or 0) for r in got["ranks"]) or None,
                       "peak_vram_gib_per_rank": [r["peak_vram_gib"] for r in got["ranks"]],
                       "rel_error": rel_l2(got["v"], base[1]) if base and n > 1 else None,
                       "wall_s": time.perf_counter() - t0, **{k: meta[k] for k in ("gpu", "torch", "date")}}
                records.append(rec)
                log.info("%s", json.dumps(rec))
                out.write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    out.write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
