"""LoRA cost on the GPU: time per DiT forward without a LoRA, merged and unmerged, and the time to
put a LoRA on (and take it off) a resident expert, full size with random weights.

    python bench/bench_lora.py --out lora.json [--models 5b,a14b] [--rank 64]
    python bench/bench_lora.py --out /tmp/l.json --smoke        # the same code on the CPU, tiny

For each model: a random bf16 DiT on the GPU (built on meta, filled N(0, 0.02)), its weights also
kept in host memory as the base source (what the loader registers: a LoRA taken off is read back
from there), and a random LoRA of rank `--rank` on every Linear of every block (q, k, v, o of both
attentions, ffn.0, ffn.2), written as a ComfyUI-style safetensors file and read by wan_lite's own
reader. Cases (one forward each after a warm-up, median of `--repeats`):
  none        the plain forward
  merged      runtime.lora.use_loras on the float expert (the tensors re-read from the base with the
              LoRA merged, on the GPU): the forward itself is the plain one
  unmerged    runtime.lora.attach_loras (a low-rank add per Linear, what quantized experts get)
and the seconds use_loras takes to merge the LoRA into the resident expert and to take it off.
Sizes: TI2V-5B 1280x704x121 (27,280 tokens); A14B expert 832x480x81 (32,760 tokens).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wan_lite.loading.lora import read_lora  # noqa: E402
from wan_lite.loading.tensors import DictSource  # noqa: E402
from wan_lite.models.dit import WanDiT, WanDiTConfig  # noqa: E402
from wan_lite.runtime import lora as lora_rt  # noqa: E402
from wan_lite.runtime import streaming  # noqa: E402

GIB = 1024**3
BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                 "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
SHAPES = {  # config, latent [C, T, h, w]
    "5b": (dict(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48), (48, 31, 44, 80)),
    "a14b": (dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=16, out_dim=16), (16, 21, 60, 104)),
}
TINY = (dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=16, out_dim=16), (16, 3, 8, 8))


def random_dit(cfg: dict, device: torch.device) -> WanDiT:
    with torch.device("meta"):
        model = WanDiT(WanDiTConfig(**cfg))
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if p.ndim == 1 and "norm" in name else 0.0, 0.02)
    model.to(torch.bfloat16)
    for name, p in model.named_parameters():  # the modulation tables stay float32, as loaded
        if name.endswith("modulation"):
            p.data = p.data.float()
    return model.requires_grad_(False).eval()


def write_random_lora(path: Path, model: WanDiT, rank: int) -> Path:
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for n in range(len(model.blocks)):
        for m in BLOCK_LINEARS:
            out_f, in_f = model.get_submodule(f"blocks.{n}.{m}").weight.shape
            key = f"diffusion_model.blocks.{n}.{m}"
            tensors[f"{key}.lora_down.weight"] = (torch.randn(rank, in_f, generator=gen) / in_f**0.5).to(torch.bfloat16)
            tensors[f"{key}.lora_up.weight"] = (torch.randn(out_f, rank, generator=gen) * 0.01).to(torch.bfloat16)
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return path


def timed(fn, repeats: int, cuda: bool) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_model(name: str, cfg: dict, latent: tuple, args, device: torch.device, tmp: Path) -> list[dict]:
    cuda = device.type == "cuda"
    model = random_dit(cfg, device)
    base = DictSource({k: v.detach().to("cpu") for k, v in model.state_dict().items()})
    streaming.set_expert_source(model, base)
    lora = read_lora(write_random_lora(tmp / f"{name}-rank{args.rank}.safetensors", model, args.rank))
    x = torch.randn(1, *latent, device=device)
    ctx = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
    t = torch.tensor([500.0], device=device)

    def forward() -> None:
        with torch.inference_mode():
            model(x, t, ctx)

    meta = {"gpu": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
            "date": dt.date.today().isoformat(), "rank": args.rank, "tokens": latent[1] * latent[2] * latent[3] // 4}
    plain = timed(forward, args.repeats, cuda)
    t0 = time.perf_counter()
    how = lora_rt.use_loras(model, [lora], [1.0])
    if cuda:
        torch.cuda.synchronize()
    apply_s = time.perf_counter() - t0
    merged = timed(forward, args.repeats, cuda)
    t0 = time.perf_counter()
    lora_rt.use_loras(model, [], [])
    if cuda:
        torch.cuda.synchronize()
    remove_s = time.perf_counter() - t0
    attachment = lora_rt.attach_loras(model, [lora], [1.0])
    unmerged = timed(forward, args.repeats, cuda)
    lora_rt.detach_loras(model)
    rows = []
    for case, s, extra in (("none", plain, {}),
                           ("merged", merged, {"apply_s": apply_s, "remove_s": remove_s, "how": how}),
                           ("unmerged", unmerged, {"factor_gib": attachment.factor_bytes() / GIB})):
        rows.append({"case": f"LoRA {name} rank {args.rank} {case}", "s_per_forward": s, "ratio_vs_plain": s / plain,
                     "ratio_vs_resident": s / plain,  # the report's column: against the plain resident forward
                     **extra, **meta})
    del model
    if cuda:
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", default="5b,a14b")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="a tiny DiT on the CPU (checks the script)")
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    tmp = Path(tempfile.mkdtemp())
    records: list[dict] = []
    for name in args.models.split(","):
        cfg, latent = TINY if args.smoke else SHAPES[name]
        try:
            records += run_model(name, cfg, latent, args, device, tmp)
        except Exception as err:  # a failed case is a result too
            records.append({"case": f"LoRA {name} rank {args.rank}", "error": f"{type(err).__name__}: {err}"})
        for r in records[-3:]:
            print(json.dumps(r), flush=True)
        args.out.write_text(json.dumps(records, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
