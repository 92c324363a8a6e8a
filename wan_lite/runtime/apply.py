"""Apply a memory plan (wan_lite.runtime.planner.Plan) to a pipeline, from the outside.

Loading: DiT weights in the plan's format (bf16, or int8 / fp8 through the quantized disk cache),
the VAE in the plan's dtype, the text encoder quantized when asked. Running: a `PlannedPlacement`
puts each component where the plan says for its stage (whole on the GPU, blocks streamed with
prefetch, or on the CPU), keeps only one A14B expert on the GPU and sends the idle one to RAM or
back to its memory-mapped file, decodes the VAE in tiles, and after an out-of-memory error
switches to the planner's next leaner plan and carries on from the same step.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wan_lite.runtime import streaming
from wan_lite.runtime.planner import Plan, leaner
from wan_lite.runtime.quant import release_kept_weights

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class PlannedPlacement:
    """The `Placement` the pipeline asks before and after each stage, following a Plan."""

    def __init__(self, plan: Plan, device: torch.device | str) -> None:
        self.plan = plan
        self.device = torch.device(device)
        self.pipe: Any = None
        self._bound: Any = None  # the choices last bound to a pipeline

    # ------------------------------------------------------------------ binding
    def bind(self, pipe: Any) -> None:
        """Set the pipeline-wide knobs of the plan (cfg batching, token chunks, VAE tiles). A DiT
        an earlier, different plan left on the GPU (kept resident, an idle expert there, or streamed)
        goes back to RAM first: the new plan places it from there."""
        before = getattr(getattr(pipe, "placement", None), "_bound", None)
        if before is not None and before != self.plan.choices:
            for dit in pipe.dits.values():
                if streaming.where_is(dit) in ("gpu", "mixed") or streaming.streamer_of(dit) is not None:
                    streaming.move_expert(dit, "ram")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self._bound = self.plan.choices
        self.pipe = pipe
        pipe.placement = self
        pipe.cfg_batch = bool(self.plan.cfg_batch)
        for dit in pipe.dits.values():
            for block in dit.blocks:
                block.chunk_tokens = self.plan.ffn_chunk_tokens
        self._set_vae_fns()

    def _set_vae_fns(self) -> None:
        from wan_lite.runtime.tiled_vae import make_decode_fn, make_encode_fn

        tile = self.plan.vae_tile
        self.pipe.decode_fn = make_decode_fn(tile, out_device="cpu")
        self.pipe.encode_fn = make_encode_fn(tile)

    # ------------------------------------------------------------------ stages
    def activate(self, name: str, module: nn.Module) -> None:
        p, dev = self.plan, self.device
        if name == "text_encoder":
            if p.text_encoder == "gpu":
                module.to(dev)
            elif p.text_encoder == "stream":
                streaming.attach(module, dev, resident=0, prefetch=max(1, p.prefetch), pinned=p.pinned,
                                 host_modules=streaming.T5_HOST_MODULES)
            return  # "cpu": runs where it is
        if name.startswith("vae"):
            # only the half in use: the Wan2.2 encoder is 0.28 GiB in bf16 that a decode never needs
            parts = ("decoder", "conv2") if name == "vae_decoder" else ("encoder", "conv1")
            for part in parts:
                getattr(module, part).to(dev)
            return
        if streaming.where_is(module) == "disk":
            streaming.move_expert(module, "ram")
        if p.resident_blocks >= len(module.blocks):
            streaming.move_expert(module, "gpu", device=dev)
        elif streaming.streamer_of(module) is None:
            streaming.attach(module, dev, resident=p.resident_blocks, prefetch=max(1, p.prefetch), pinned=p.pinned)

    def release(self, name: str, module: nn.Module) -> None:
        p = self.plan
        release_kept_weights()
        if name == "text_encoder":
            streaming.detach_streamer(module)
            module.to("cpu")
            streaming.trim_host_memory()  # the streamer's page-locked copy is gone
        elif name.startswith("vae"):
            if self.device.type != "cpu":
                module.to("cpu")
        elif name in ("high", "low"):
            where = p.idle_expert if p.idle_expert in ("gpu", "ram", "disk") else "ram"
            if where == "gpu":
                return
            if where == "disk" and module not in streaming._SOURCES:
                where = "ram"
            streaming.move_expert(module, where)
        elif not p.keep_resident:
            streaming.move_expert(module, "ram")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def on_oom(self, name: str, module: nn.Module) -> bool:
        """Drop to the next leaner plan for denoising and re-place `module` accordingly."""
        new = leaner(self.plan, "denoise")
        if new is None:
            return False
        log.warning("Out of memory: switching to a leaner plan: %s", new.summary())
        release_kept_weights()
        old, self.plan = self.plan, new
        streaming.move_expert(module, "ram")
        if new.quantization != old.quantization and new.quantization in ("int8", "fp8"):
            from wan_lite.runtime.quant import quantize_model

            quantize_model(module, new.quantization, getattr(module, "no_quantize_patterns", ()))
        if self.pipe is not None:
            self.bind(self.pipe)
        self.activate(name, module)
        return True


def load_planned(model_dir: Path | None, plan: Plan, *, components: dict[str, Path] | None = None,
                 name: str | None = None, device: torch.device | str | None = None,
                 cache_dir: Path | None = None) -> Any:
    """Load a pipeline with weights in the plan's formats and a PlannedPlacement bound to it."""
    from wan_lite.loading import build
    from wan_lite.loading.components import (
        build_dit,
        check_compatible,
        dit_roles,
        load_text_encoder,
        load_vae,
        resolve_sources,
    )
    from wan_lite.models.dit import WanDiT, WanDiTConfig, name_matches
    from wan_lite.pipeline import WanPipeline
    from wan_lite.runtime.gguf_linear import stored_format
    from wan_lite.runtime.quant import quantize_model
    from wan_lite.runtime.quant_cache import load_or_quantize

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    spec, sources, tokenizer = resolve_sources(model_dir, components or {}, name)
    text_encoder = load_text_encoder(sources["text_encoder"], tokenizer, torch.bfloat16)
    if plan.text_encoder_quant in ("int8", "fp8"):
        quantize_model(text_encoder.model, plan.text_encoder_quant)  # layers stored as fp8 stay so
    vae = load_vae(sources["vae"], spec, _DTYPES.get(plan.vae_dtype, torch.bfloat16))
    dits: dict[str, nn.Module] = {}
    roles = dit_roles(spec)
    to_disk = {"low"} if spec.experts and plan.idle_expert == "disk" else set()
    # The expert that waits on disk is loaded (and its quantized cache made) first and dropped at
    # once, so that the two experts are never in RAM together, not even while loading.
    for role in sorted(roles, key=lambda r: r not in to_disk):
        source = sources[f"dit_{role}"]
        stored = stored_format(source)
        if stored is not None:
            # The file's own quantization is kept (no float copy, no re-quantization): it wins
            # over the plan's choice for the layers it covers; the rest load in bf16.
            log.info("%s DiT: weights stay %s as stored in %s; the plan's quantization (%s) is not applied",
                     role, stored, source.describe(), plan.quantization)
            model, refill = build_dit(source, torch.bfloat16)
            streaming.set_expert_source(model, refill)
        elif plan.quantization in ("int8", "fp8"):
            with torch.device("meta"):
                model = WanDiT(WanDiTConfig.from_shapes(source.shapes()))
            keep = lambda n: name_matches(n, WanDiT.keep_fp32_patterns)  # noqa: E731
            model, cache = load_or_quantize(model, source, plan.quantization, dtype=torch.bfloat16,
                                            cache_dir=cache_dir, keep_fp32=keep, skip=WanDiT.no_quantize_patterns,
                                            what=f"{role} DiT")
            model.requires_grad_(False).eval()
            if cache is not None:
                from wan_lite.loading.tensors import SafetensorsSource

                streaming.set_expert_source(model, SafetensorsSource([cache]))
        else:
            model = build.build_dit(source, torch.bfloat16)
            streaming.set_expert_source(model, source)
        dits[role] = model
        if role in to_disk:
            streaming.move_expert(model, "disk")
    dits = {role: dits[role] for role in roles}
    streaming.trim_host_memory()
    check_compatible(spec, dits, vae, text_encoder)
    placement = PlannedPlacement(plan, device)
    pipe = WanPipeline(spec, text_encoder, vae, dits, placement=placement, device=device)
    placement.bind(pipe)
    log.info("Plan: %s", plan.summary())
    return pipe
