"""Quality of the quantized formats over a whole generation: tiny models, int8, fp8 and int4 against bf16.

    python bench/bench_quality.py --out results/quality.json [--steps 4] [--device cuda|cpu]

For TI2V-5B and T2V-A14B it writes tiny random models in the official layout (the tests' writer,
architecture read back from tensor shapes), generates one 64x64, 9-frame video with 4 steps in
bf16, then again with int8, fp8 and int4 experts (the planner's quantized plan, everything
resident), same prompt and seed, and records the relative L2 error of the final latents and of
the decoded video (its uint8 frames) against the bf16 run. On a GPU with fp8 tensor cores the
fp8 run computes in fp8 (fp8 x fp8 matmuls: case fp8-compute); elsewhere fp8 is storage only,
dequantized per layer (fp8-dequant). One DiT forward at full size is measured by bench_dit.py
(its rel_error column); this is the end-to-end counterpart.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import rel_l2, run_meta  # noqa: E402

import wan_lite  # noqa: E402
from tests.tiny_ckpt import write_model  # noqa: E402
from wan_lite.pipeline import WanPipeline  # noqa: E402
from wan_lite.registry import get_spec  # noqa: E402
from wan_lite.runtime.hardware import Hardware  # noqa: E402
from wan_lite.runtime.plan_model import evaluate  # noqa: E402
from wan_lite.runtime.planner import ModelFootprint, PlanRequest, plan  # noqa: E402

MODELS = ("ti2v-5b", "t2v-a14b")
PROMPT, SEED = "a boat at dawn", 3


def quantized_plan(pipe, name: str, fmt: str, size: dict):
    """The planner's plan for a roomy machine, in `fmt`, everything resident and in one place."""
    spec = get_spec(name)
    fp = ModelFootprint.from_config(pipe.dit.config, name=name, vae_version=spec.vae_version,
                                    experts=2 if spec.experts else 1)
    hw = Hardware.probe()  # fp8 computes in fp8 where this GPU can
    req = PlanRequest(size["width"], size["height"], size["frames"], steps=size["steps"])
    n = pipe.dit.config.num_layers
    choices = replace(plan(fp, req, hw).choices, quantization=fmt, resident_blocks=n, prefetch=0, vae_tile=None,
                      cfg_batch=False, idle_expert="ram" if spec.experts else "none", text_encoder="cpu",
                      text_encoder_quant="bf16", vae_dtype="fp32")
    return evaluate(fp, req, hw, choices)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    meta = run_meta(cuda) | ({} if cuda else {"gpu": "cpu", "capability": None})
    size = dict(width=64, height=64, frames=9, steps=args.steps)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            path = write_model(Path(tmp) / name, name)
            pipe = wan_lite.load_pipeline(path, device=device)
            ref = pipe.generate(PROMPT, seed=SEED, **size)
            for fmt in ("int8", "fp8", "int4"):
                p = quantized_plan(pipe, name, fmt, size)
                q = WanPipeline.load_planned(path, p, device=device, cache_dir=Path(tmp) / f"cache-{name}-{fmt}")
                out = q.generate(PROMPT, seed=SEED, **size)
                label = fmt if fmt != "fp8" else ("fp8-compute" if p.fp8_compute else "fp8-dequant")
                records.append({
                    "case": f"tiny generation {name} {size['width']}x{size['height']}x{size['frames']} {label}",
                    "plan": p.summary(), "fp8_compute": p.fp8_compute,
                    "rel_error": rel_l2(out.latents, ref.latents),
                    "rel_error_video": rel_l2(torch.from_numpy(out.frames), torch.from_numpy(ref.frames)),
                    "steps": args.steps, "gpu": meta["gpu"], "torch": meta["torch"], "date": meta["date"][:10],
                })
                print(f"{records[-1]['case']}: latents {records[-1]['rel_error']:.4f}, "
                      f"video {records[-1]['rel_error_video']:.4f}", flush=True)
                del q
            del pipe
    args.out.write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
