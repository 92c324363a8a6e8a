"""The whole TI2V-5B job at full size with random weights: text encoding, denoising, decoding.

    python bench/bench_job.py --out job.json [--steps 4] [--cap-gib 3.0]
                              [--variant low-vram:ffn_chunk_tokens=2048 ...]

Two runs of the same job (1280x704, 121 frames) through wan_lite's real pipeline:
  resident   the planner's plan for this GPU as it is (everything resident, bf16)
  low-vram   the planner's plan for a card with `--cap-gib` free, enforced with
             torch.cuda.set_per_process_memory_fraction: an allocation past the cap fails
For each: peak GPU memory over the whole job, peak host RSS, seconds per denoising step (median
of the steps after the first), the decode and text-encoding times. Each `--variant CASE:FIELDS`
runs once more the plan of CASE (low-vram or resident) with the plan fields FIELDS forced, to
compare a choice the planner did not make (its ratio is against the resident run). Weights are
random (built on meta, filled on the GPU, N(0, 0.02), norm gains ~1); the tokenizer is the tests'
tiny one, which only changes which embedding rows are read.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PeakRSS, parse_fields  # noqa: E402

from wan_lite.models.dit import WanDiT, WanDiTConfig  # noqa: E402
from wan_lite.models.vae22 import VAE22Config, WanVAE22  # noqa: E402
from wan_lite.pipeline import WanPipeline  # noqa: E402
from wan_lite.registry import MODELS  # noqa: E402
from wan_lite.runtime.apply import PlannedPlacement  # noqa: E402
from wan_lite.runtime.hardware import Hardware, MemoryProfile  # noqa: E402
from wan_lite.runtime.planner import ModelFootprint, PlanRequest, plan  # noqa: E402

GIB = 1024**3


def random_fill(model: nn.Module, dtype: torch.dtype, std: float = 0.02) -> nn.Module:
    """meta -> real tensors on the GPU with random values, then to the CPU in `dtype`."""
    model.to_empty(device="cuda")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "gamma" in name or name.endswith("layer_norm.weight")):
                p.normal_(1.0, std)
            else:
                p.normal_(0.0, std)
    model.to("cpu", dtype=dtype)
    model.requires_grad_(False).eval()
    torch.cuda.empty_cache()
    return model


def build_pipeline(device: torch.device) -> WanPipeline:
    from transformers import UMT5Config, UMT5EncoderModel

    from tests.tiny_ckpt.t5 import write_tokenizer
    from wan_lite.models.text_encoder import TextEncoder, load_tokenizer

    spec = MODELS["ti2v-5b"]
    with torch.device("meta"):
        dit = WanDiT(WanDiTConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48))
        vae = WanVAE22(VAE22Config())
        t5 = UMT5EncoderModel(UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                         num_heads=64, relative_attention_num_buckets=32,
                                         relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                                         dense_act_fn="gelu_new", layer_norm_epsilon=1e-6,
                                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=1))
    random_fill(dit, torch.bfloat16)
    random_fill(vae, torch.bfloat16, std=0.01)
    random_fill(t5, torch.bfloat16)
    tok_dir = write_tokenizer(Path(tempfile.mkdtemp()) / "google" / "umt5-xxl")
    text_encoder = TextEncoder(t5, load_tokenizer(tok_dir))
    return WanPipeline(spec, text_encoder, vae, {"main": dit}, device=device)


def run_job(pipe: WanPipeline, the_plan, steps: int, cap_gib: float | None) -> dict:
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total) if cap_gib else 1.0)
    placement = PlannedPlacement(the_plan, pipe.device)
    placement.bind(pipe)
    pipe._text_cache.clear()
    stamps: list[float] = []

    def progress(p) -> None:
        if p.stage == "denoise":
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with PeakRSS() as rss:
        result = pipe.generate("a red fox trotting through fresh snow, morning light", width=1280, height=704,
                               frames=121, steps=steps, seed=0, on_progress=progress, preview_every=0)
    wall = time.perf_counter() - t0
    per_step = [b - a for a, b in zip(stamps, stamps[1:])]
    finite = bool(torch.isfinite(result.latents).all())
    return {
        "plan": the_plan.summary(),
        "cap_gib": cap_gib,
        "peak_vram_gib": torch.cuda.max_memory_allocated() / GIB,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
        "peak_ram_gib": rss.peak / GIB,
        "s_per_step": statistics.median(per_step) if per_step else None,
        "steps": steps,
        "timings": result.timings,
        "wall_s": wall,
        "latents_finite": finite,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cap-gib", type=float, default=3.0)
    ap.add_argument("--variant", action="append", default=[], help="CASE:FIELDS, e.g. resident:ffn_chunk_tokens=2048")
    args = ap.parse_args()
    dev = torch.device("cuda")
    hw = Hardware.probe()
    req = PlanRequest(1280, 704, 121, steps=args.steps)
    model = ModelFootprint.full_size("ti2v-5b")
    resident = plan(model, req, hw)
    small_hw = Hardware.fake(vram_gb=args.cap_gib + 0.5, ram_gb=hw.ram_total_gib, cc=hw.compute_capability,
                             gpu_name=hw.gpu_name, free_vram_gb=args.cap_gib,
                             available_ram_gb=hw.ram_available_gib)
    low = plan(model, req, small_hw)
    cases = [("low-vram", low, args.cap_gib), ("resident", resident, None)]
    for v in args.variant:
        base, fields = v.split(":", 1)
        forced = MemoryProfile(f"+ {fields}", "", force=tuple(parse_fields(fields).items()))
        cases.append((f"{base} + {fields}", plan(model, req, small_hw if base == "low-vram" else hw, profile=forced),
                      args.cap_gib if base == "low-vram" else None))
    t0 = time.perf_counter()
    pipe = build_pipeline(dev)
    build_s = time.perf_counter() - t0
    from wan_lite.runtime.attention_select import select_attention

    choice = select_attention(dev)  # the kernel the engine picks for these (bf16) plans
    pipe.set_attention(choice.fn)
    attention = choice.note
    records = []
    for case, the_plan, cap in cases:
        try:
            rec = run_job(pipe, the_plan, args.steps, cap)
        except Exception as err:  # record and go on: a failed case is a result too
            rec = {"error": f"{type(err).__name__}: {err}"}
        rec.update(case=f"ti2v-5b job 1280x704x121 {case}", planned_peak_vram_gib=the_plan.peak_vram_gib,
                   gpu=torch.cuda.get_device_name(0), torch=torch.__version__,
                   date=dt.date.today().isoformat(), build_s=build_s, attention=attention)
        records.append(rec)
        print(json.dumps(rec), flush=True)
        args.out.write_text(json.dumps(records, indent=2))
    base = next(r for r in records if r["case"].endswith(" resident"))
    for rec in records:
        if rec is not base and rec.get("s_per_step") and base.get("s_per_step"):
            rec["ratio_vs_resident"] = rec["s_per_step"] / base["s_per_step"]
            print(f"{rec['case']} / resident time per step: {rec['ratio_vs_resident']:.3f}")
    args.out.write_text(json.dumps(records, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
