"""Apply a memory plan (wan_lite.runtime.planner.Plan) to a pipeline, from the outside.

Loading in the plan's formats is wan_lite.runtime.loader's. Running: a `PlannedPlacement` puts
each component where the plan says for its stage (whole on the GPU, blocks streamed with
prefetch, or on the CPU), keeps only one A14B expert on the GPU and sends the idle one to RAM or
back to its memory-mapped file, decodes the VAE in tiles, and after an out-of-memory error
switches to the planner's next leaner plan and carries on from the same step.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from wan_lite.runtime import streaming, vae_parts
from wan_lite.runtime.planner import Plan, leaner
from wan_lite.runtime.quant import FORMATS, release_kept_weights

log = logging.getLogger(__name__)


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
                    disk = self.plan.blocks_from == "disk" and streaming.expert_source(dit) is not None
                    streaming.move_expert(dit, "disk" if disk else "ram")
            if self.plan.vae_on_disk and vae_parts.has_file(pipe.vae):  # a VAE an earlier plan kept
                for half in vae_parts.HALVES:
                    vae_parts.drop(pipe.vae, half)
            if before.text_encoder == "resident" and self.plan.text_encoder != "resident":
                from wan_lite.loading.components import module_of

                module_of(pipe.text_encoder).to("cpu")
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
        self.pipe.decode_fn = make_decode_fn(tile, out_device="cpu", lean=True if self.plan.vae_lean else None)
        self.pipe.encode_fn = make_encode_fn(tile)

    # ------------------------------------------------------------------ stages
    def activate(self, name: str, module: nn.Module) -> None:
        p, dev = self.plan, self.device
        if name == "text_encoder":
            on_disk = streaming.where_is(module) in ("disk", "mixed") and streaming.expert_source(module)
            if p.text_encoder in ("gpu", "resident"):
                streaming.move_expert(module, "gpu", device=dev)  # from disk block by block
            elif p.text_encoder == "stream":
                src, key_map = streaming.expert_source(module) if on_disk else (None, None)
                streaming.attach(module, dev, resident=0, prefetch=max(1, p.prefetch), pinned=p.pinned,
                                 host_modules=streaming.T5_HOST_MODULES, source=src, key_map=key_map)
            elif on_disk:
                streaming.move_expert(module, "ram")
            return  # "cpu": runs where it is
        if name.startswith("vae"):
            # only the half in use: the Wan2.2 encoder is 0.28 GiB in bf16 that a decode never
            # needs; read from the VAE file straight there where it waits on disk (vae_on_disk)
            vae_parts.bring(module, "decoder" if name == "vae_decoder" else "encoder", dev)
            return
        src = streaming.expert_source(module) if p.blocks_from == "disk" else None
        if p.resident_blocks >= len(module.blocks):
            streaming.move_expert(module, "gpu", device=dev)  # from disk block by block
        elif streaming.streamer_of(module) is None:
            if src is None and streaming.where_is(module) in ("disk", "mixed"):
                streaming.move_expert(module, "ram")
            streaming.attach(module, dev, resident=p.resident_blocks, prefetch=max(1, p.prefetch), pinned=p.pinned,
                             source=src[0] if src else None, key_map=src[1] if src else None)

    def release(self, name: str, module: nn.Module) -> None:
        p = self.plan
        release_kept_weights(module)
        if name == "text_encoder":
            if p.text_encoder == "resident":  # it stays for the next prompt
                return
            streaming.detach_streamer(module)
            if not p.keep_text_encoder and streaming.expert_source(module) is not None:
                streaming.move_expert(module, "disk")  # read again for the next new prompt
            else:
                streaming.move_expert(module, "ram")
            streaming.trim_host_memory()  # the streamer's page-locked copy is gone
        elif name.startswith("vae"):
            keep = not (p.vae_on_disk and vae_parts.has_file(module))
            for half in vae_parts.HALVES:  # in RAM (read back there if an earlier plan let it go), or gone
                if keep:
                    vae_parts.bring(module, half, "cpu")
                else:
                    vae_parts.drop(module, half)
        elif p.blocks_from == "disk" and module in streaming._SOURCES:
            streaming.move_expert(module, "disk")  # nothing of it stays in RAM
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

    @property
    def step_cache_device(self) -> torch.device | None:
        """Where a step cache keeps its residuals: with the DiT's blocks on the GPU, there (None:
        beside the tokens); with streamed blocks, in host memory, leaving the GPU to the plan."""
        streamed = self.plan.model is None or self.plan.resident_blocks < self.plan.model.num_layers
        return torch.device("cpu") if self.device.type == "cuda" and streamed else None

    def on_oom(self, name: str, module: nn.Module) -> bool:
        """Drop to the next leaner plan for denoising and re-place `module` accordingly."""
        new = leaner(self.plan, "denoise")
        if new is None:
            return False
        log.warning("Out of memory: switching to a leaner plan: %s", new.summary())
        release_kept_weights(module)
        old, self.plan = self.plan, new
        disk = new.blocks_from == "disk" and streaming.expert_source(module) is not None
        streaming.move_expert(module, "disk" if disk else "ram")
        if new.quantization != old.quantization and new.quantization in FORMATS:
            from wan_lite.runtime.quant import quantize_model

            quantize_model(module, new.quantization, getattr(module, "no_quantize_patterns", ()))
        if self.pipe is not None:
            self.bind(self.pipe)
        self.activate(name, module)
        return True
