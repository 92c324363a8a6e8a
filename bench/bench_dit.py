"""One DiT forward at full size with random weights: wan_lite's placements and formats against diffusers.

    python bench/bench_dit.py --out results/dit.json [--models 5b,a14b] [--a14b-size 832x480]

For each model (TI2V-5B at 1280x704x121, an A14B expert at 832x480x81 by default) it measures,
after a warm-up, the median seconds per forward, the peak GPU memory
(`torch.cuda.max_memory_allocated`) and the relative L2 error against wan_lite's all-resident bf16
output, for:

    bf16-resident, bf16-streamed          wan_lite WanDiT, all blocks on the GPU / streamed from pinned RAM
    int8-resident, int8-streamed          int8 weights, dequantized per layer, bf16 GEMMs
    fp8-dequant-resident                  fp8 weights, dequantized per layer
    fp8-compute-resident, -streamed       fp8 x fp8 torch._scaled_mm (cc >= 8.9)
    fp8-attn-resident, -streamed          the same with the attention the engine picks for fp8
                                          compute with WAN_LITE_FP8_ATTENTION=1 (FlashAttention-3
                                          or cuDNN fp8 attention where available)
    int4-resident, int4-streamed          int4 weights (NF4 levels, groups of 64), dequantized per layer
    diffusers-resident                    diffusers WanTransformer3DModel with the same weights
    diffusers-group-offload               + enable_group_offload(block_level, 1 block/group, use_stream)

The other wan_lite cases run the attention kernel the engine picks for them (SDPA unless an
optional kernel is installed, correct and faster: `wan_lite.runtime.attention_select`; `--sdpa`
forces SDPA); each record's `attention` says which. diffusers runs SDPA.

Weights: built on `meta`, `to_empty` on the GPU, matrices/biases/modulation ~ N(0, 0.02); norm
gains 1 + N(0, 0.02) (gains of ~0.02 would make every attention uniform). Streamed cases run the FFN
in token chunks (`--stream-chunk`), as the low-VRAM plans do. Records go to `--out` as JSON after
every case, so a run cut short keeps what it measured; cases past `--budget-s` are skipped.
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

from common import bench_device, host_rss_gib, parse_size, random_dit, rel_l2, run_meta  # noqa: E402

from wan_lite.loading.keymaps import dit_official_to_diffusers  # noqa: E402
from wan_lite.models.attention import sdpa_attention  # noqa: E402
from wan_lite.models.dit import WanDiT, WanDiTConfig  # noqa: E402
from wan_lite.runtime.attention_select import select_attention, select_fp8_attention  # noqa: E402
from wan_lite.runtime.quant import quantize_model, quantized_modules, set_compute, weight_bytes  # noqa: E402
from wan_lite.runtime.streaming import attach  # noqa: E402

log = logging.getLogger("bench_dit")
GIB = 1024**3
DEVICE = torch.device("cuda")  # `--smoke` runs the same code on the CPU with tiny models

MODELS = {
    # name: (config, vae stride (t, h, w), default size (W, H), frames)
    "5b": (WanDiTConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48),
           (4, 16, 16), (1280, 704), 121),
    "a14b": (WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=16, out_dim=16),
             (4, 8, 8), (832, 480), 81),
}
WAN_CASES = {  # name: (weight format, quantized matmul path, streamed, fp8 attention)
    "bf16-resident": (None, None, False, False),
    "bf16-streamed": (None, None, True, False),
    "int8-resident": ("int8", "dequant", False, False),
    "int8-streamed": ("int8", "dequant", True, False),
    "fp8-dequant-resident": ("fp8", "dequant", False, False),
    "fp8-compute-resident": ("fp8", "fp8", False, False),
    "fp8-compute-streamed": ("fp8", "fp8", True, False),
    "fp8-attn-resident": ("fp8", "fp8", False, True),
    "fp8-attn-streamed": ("fp8", "fp8", True, True),
    "int4-resident": ("int4", "dequant", False, False),
    "int4-streamed": ("int4", "dequant", True, False),
}
DIFFUSERS_CASES = ("diffusers-resident", "diffusers-group-offload")
TINY = {  # --smoke: same code paths, tiny shapes (text_dim stays 4096: the contexts are real-sized)
    "5b": (WanDiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=3, in_dim=48, out_dim=48), (4, 16, 16), (128, 64), 9),
    "a14b": (WanDiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=3, in_dim=16, out_dim=16), (4, 8, 8), (64, 64), 5),
}


def build_wan(cfg: WanDiTConfig, seed: int) -> WanDiT:
    """Full-size WanDiT in bf16 (modulation fp32) on the GPU with seeded random weights."""
    return random_dit(cfg, DEVICE, torch.bfloat16, seed)


def to_diffusers(model: WanDiT):
    """The same weights in diffusers' WanTransformer3DModel (tensors moved, not copied)."""
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    cfg = model.config
    with torch.device("meta"):
        dm = WanTransformer3DModel(
            patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
            in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
            ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=cfg.eps)
    dm.rope = WanRotaryPosEmbed(cfg.head_dim, cfg.patch_size, 1024).to(DEVICE)  # buffers computed, not loaded
    state = {dit_official_to_diffusers(k): v for k, v in model.state_dict().items()}
    dm.load_state_dict(state, strict=True, assign=True)
    # As from_pretrained(torch_dtype=bf16) does: bf16, except diffusers' declared fp32 modules.
    dm.to(torch.bfloat16)
    keep = set(WanTransformer3DModel._keep_in_fp32_modules)
    for name, module in dm.named_modules():
        if keep & set(name.split(".")):
            module.float()
    return dm.eval()


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def measure(fn: Callable[[], torch.Tensor], warmup: int, repeats: int) -> tuple[torch.Tensor, list[float], int]:
    """(last output, wall seconds per repeat, peak allocated bytes during the timed repeats)."""
    out = None
    for _ in range(warmup):
        out = fn()
    sync()
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        del out
        t0 = time.perf_counter()
        out = fn()
        sync()  # the host clock may only stop once the GPU is done
        times.append(time.perf_counter() - t0)
    return out, times, torch.cuda.max_memory_allocated() if DEVICE.type == "cuda" else 0


def release() -> None:
    gc.collect()
    if DEVICE.type != "cuda":
        return
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    host_empty = getattr(torch._C, "_host_emptyCache", None)  # pinned blocks cached by torch
    if host_empty is not None:
        host_empty()


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.start = time.perf_counter()
        self.records: list[dict] = []
        cuda = DEVICE.type == "cuda"
        self.meta = run_meta(cuda)
        self.choices: dict = {}  # fp8 attention or not -> AttentionChoice

    def attention(self, model: WanDiT, fp8: bool) -> str:
        """Give `model` the attention kernel the engine would pick (chosen once per kind; `--sdpa`:
        PyTorch SDPA for every case that is not fp8-attn); returns its note."""
        if not fp8 and self.args.sdpa:
            model.set_attention(sdpa_attention)
            return "PyTorch SDPA (--sdpa)"
        if fp8 not in self.choices:
            self.choices[fp8] = (select_fp8_attention if fp8 else select_attention)(DEVICE)
        model.set_attention(self.choices[fp8].fn)
        return self.choices[fp8].note

    def wanted(self, case: str) -> bool:
        return self.args.cases is None or case in self.args.cases

    def over_budget(self) -> bool:
        return time.perf_counter() - self.start > self.args.budget_s

    def save(self) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps({"meta": self.meta, "records": self.records}, indent=1))
        os.replace(tmp, out)

    def record(self, base: dict, case: str, run: Callable[[], dict], current: list[str] | None = None) -> None:
        rec = {**base, "case": case}
        if current is not None:
            current[0] = case
        if self.over_budget():
            rec["skipped"] = f"time budget of {self.args.budget_s:.0f} s spent"
        else:
            try:
                rec.update(run())
            except torch.cuda.OutOfMemoryError as err:
                rec["error"] = f"out of memory: {err}".splitlines()[0]
            except Exception as err:  # keep measuring the other cases; the record says what failed
                log.exception("%s %s failed", base["model"], case)
                rec["error"] = f"{type(err).__name__}: {err}".splitlines()[0]
        rec["host_rss_gib"] = host_rss_gib()
        self.records.append(rec)
        self.save()
        shown = {k: rec.get(k) for k in ("s_per_forward", "peak_vram_gib", "rel_l2_vs_bf16", "error", "skipped")}
        log.info("%s %-24s %s", base["model"], case, {k: v for k, v in shown.items() if v is not None})

    def run_model(self, name: str) -> None:
        a = self.args
        cfg, stride, size, frames = (TINY if a.smoke else MODELS)[name]
        w, h = getattr(a, f"size_{name}") or size
        frames = getattr(a, f"frames_{name}") or frames
        latent = (cfg.in_dim, (frames - 1) // stride[0] + 1, h // stride[1], w // stride[2])
        tokens = latent[1] * (latent[2] // 2) * (latent[3] // 2)
        base = {"model": name, "size": f"{w}x{h}", "frames": frames, "latent": list(latent), "tokens": tokens}
        gen = torch.Generator(device=DEVICE).manual_seed(1234)
        x = torch.randn(1, *latent, device=DEVICE, generator=gen)
        ctx = torch.randn(1, 512, cfg.text_dim, device=DEVICE, generator=gen)
        t = torch.tensor([500.0], device=DEVICE)
        ref: dict = {}
        current = [""]  # the case being measured, for the reference's label

        def forward(model: torch.nn.Module) -> Callable[[], torch.Tensor]:
            fn = lambda: model(x, t, ctx)  # noqa: E731
            fn.model = model  # type: ignore[attr-defined]
            return fn

        def model_of(fn: Callable) -> torch.nn.Module | None:
            return getattr(fn, "model", None)

        def timed(fn: Callable[[], torch.Tensor], extra: dict) -> dict:
            weights = torch.cuda.memory_allocated() if DEVICE.type == "cuda" else 0
            with torch.inference_mode():
                out, times, peak = measure(fn, a.warmup, a.repeats)
            res = {"s_per_forward": statistics.median(times), "times_s": times, "peak_vram_gib": peak / GIB,
                   "gpu_before_forward_gib": weights / GIB, **extra}
            broken = [n for n, m in quantized_modules(model_of(fn)).items() if m._fp8_broken] if model_of(fn) else []
            if broken:  # the fp8 GEMM was refused for these layers: they ran dequantized
                res["fp8_fallback_layers"] = len(broken)
            if "bf16" in ref:
                res["rel_l2_vs_bf16"] = rel_l2(out, ref["bf16"])
                res["bit_identical_to_bf16"] = bool(torch.equal(out.float(), ref["bf16"]))
                res["reference_case"] = ref["case"]
            else:  # the first case measured (bf16-resident unless filtered out) is the reference
                ref["bf16"], ref["case"] = out.float(), current[0]
            return res

        for fmt in (None, "int8", "fp8", "int4"):
            cases = [c for c, spec in WAN_CASES.items() if spec[0] == fmt and self.wanted(c)]
            if not cases:
                continue
            model = build_wan(cfg, a.seed)
            if fmt is not None:
                quantize_model(model, fmt)  # on the GPU: seconds
                used, n = weight_bytes(model)
                base_q = {"bytes_per_quantized_weight": used / n}
            else:
                base_q = {}
            for case in cases:
                _, compute, streamed, fp8_attention = WAN_CASES[case]
                if compute is not None:
                    set_compute(model, compute)
                # As the engine does: the kernel it picks for this kind of plan (fp8 attention only
                # where fp8 compute is on and the case asks for it, as WAN_LITE_FP8_ATTENTION=1 does).
                base_q["attention"] = self.attention(model, fp8_attention)
                if not streamed:
                    self.record(base, case, lambda m=model: timed(forward(m), {**base_q, "format": fmt or "bf16"}),
                                current)
                    base_q.pop("attention", None)
                    continue

                def run_streamed(m: WanDiT = model) -> dict:
                    for block in m.blocks:
                        block.chunk_tokens = a.stream_chunk or None
                    t0 = time.perf_counter()
                    streamer = attach(m, DEVICE, resident=a.resident, prefetch=a.prefetch, pinned=True)
                    setup = time.perf_counter() - t0
                    try:
                        return timed(forward(m), {**base_q, "format": fmt or "bf16", "resident_blocks": a.resident,
                                                  "prefetch": a.prefetch, "chunk_tokens": a.stream_chunk,
                                                  "pinned_blocks": streamer.pinned_blocks,
                                                  "slot_gib": streamer.slot_bytes / GIB, "attach_s": setup})
                    finally:
                        streamer.detach()

                self.record(base, case, run_streamed, current)
                base_q.pop("attention", None)
            del model
            release()

        dcases = [c for c in DIFFUSERS_CASES if self.wanted(c)]
        if dcases and not self.over_budget():
            try:
                dm = to_diffusers(build_wan(cfg, a.seed))
            except ImportError as err:
                for case in dcases:
                    self.record(base, case, lambda err=err: {"error": f"diffusers not importable: {err}"})
                return
            release()

            def dforward() -> torch.Tensor:
                return dm(hidden_states=x.to(torch.bfloat16), timestep=t, encoder_hidden_states=ctx.to(torch.bfloat16),
                          return_dict=False)[0]

            # diffusers runs SDPA (its default) either way
            if "diffusers-resident" in dcases:
                self.record(base, "diffusers-resident", lambda: timed(dforward, {"format": "bf16"}), current)

            def offload() -> dict:
                import importlib.util

                if importlib.util.find_spec("accelerate") is None:  # diffusers' group offload imports it
                    return {"error": "diffusers' group offloading needs the `accelerate` package"}
                dm.to("cpu")
                release()
                dm.enable_group_offload(onload_device=DEVICE, offload_type="block_level",
                                        num_blocks_per_group=1, use_stream=DEVICE.type == "cuda")
                return timed(dforward, {"format": "bf16", "num_blocks_per_group": 1, "use_stream": True})

            if "diffusers-group-offload" in dcases:
                self.record(base, "diffusers-group-offload", offload, current)
            del dm
            release()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file for the records")
    p.add_argument("--models", default="5b,a14b")
    p.add_argument("--size-5b", type=parse_size, default=None, help="WxH, default 1280x704")
    p.add_argument("--frames-5b", type=int, default=None)
    p.add_argument("--size-a14b", type=parse_size, default=None, help="WxH, default 832x480 (1280x720: ~4x longer)")
    p.add_argument("--frames-a14b", type=int, default=None)
    p.add_argument("--cases", type=lambda s: set(s.split(",")), default=None,
                   help=f"subset of: {', '.join([*WAN_CASES, *DIFFUSERS_CASES])}")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--prefetch", type=int, default=1)
    p.add_argument("--resident", type=int, default=0, help="blocks kept on the GPU in streamed cases")
    p.add_argument("--stream-chunk", type=int, default=8192, help="FFN token chunk in streamed cases (0: off)")
    p.add_argument("--budget-s", type=float, default=540.0, help="skip cases once this much time has passed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sdpa", action="store_true",
                   help="PyTorch SDPA in every case but fp8-attn (default: the kernel the engine picks)")
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script, measures nothing")
    args = p.parse_args(argv)
    global DEVICE
    DEVICE = bench_device(args.smoke, "bench_dit")
    if DEVICE is None:
        return 2
    bench = Bench(args)
    log.info("%s", bench.meta)
    for name in args.models.split(","):
        bench.run_model(name.strip())
    table = [f"{'model':6} {'case':24} {'s/fwd':>7} {'peak GiB':>9} {'rel err':>8}"]
    for r in bench.records:
        s, m, e = r.get("s_per_forward"), r.get("peak_vram_gib"), r.get("rel_l2_vs_bf16")
        table.append(f"{r['model']:6} {r['case']:24} {s or float('nan'):7.3f} {m or float('nan'):9.2f} "
                     f"{e if e is not None else float('nan'):8.4f} {r.get('error') or r.get('skipped') or ''}")
    log.info("results (%s, torch %s):\n%s", bench.meta["gpu"], bench.meta["torch"], "\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
