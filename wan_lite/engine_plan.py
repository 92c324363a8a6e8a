"""How the Engine plans a request on this machine, before and as it runs: the memory plan
(`runtime.planner.plan`, with what the job's LoRAs and step cache add), the preflight estimate the
app and the CLI show, the split over several GPUs (`parallel.plan`), and the model's footprint
read from its files on disk. `EnginePlans` is a part of `Engine` (wan_lite.engine), which
inherits it: its methods use the engine's library, device and footprint memo.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from wan_lite.api import GenerateRequest
from wan_lite.errors import InputError, WanLiteError
from wan_lite.job import Job
from wan_lite.registry import get_spec
from wan_lite.runtime.planner import fp8_attention_opted_in


@dataclass
class Estimate:
    """Preflight: what a request will use on this machine (from the planner)."""

    fits: bool
    peak_vram_gib: float
    peak_ram_gib: float
    seconds: float
    summary: str  # one line for people
    reason: str | None = None  # why it does not fit and what would make it fit
    plan: dict[str, Any] = field(default_factory=dict)


def _part_sizes(sources: dict[str, Any]) -> dict[str, Any]:
    """ModelFootprint fields of the text encoder and the VAE counted from their tensors' shapes."""
    import math
    import re

    sizes: dict[str, Any] = {}
    te = sources.get("text_encoder")
    if te is not None:
        shapes = te.shapes()
        embed = next((s for k, s in shapes.items() if k.endswith(("token_embedding.weight", "shared.weight"))), None)
        blocks = {m.group(1) for k in shapes if (m := re.search(r"(?:^|\.)(?:blocks|block)\.(\d+)\.", k))}
        if embed is not None and blocks:
            sizes.update(text_params=sum(math.prod(s) for s in shapes.values()), text_embed_params=math.prod(embed),
                         text_blocks=len(blocks))
    vae = sources.get("vae")
    if vae is not None:
        shapes = vae.shapes()
        enc = sum(math.prod(s) for k, s in shapes.items() if k.startswith(("encoder.", "conv1.")))
        dec = sum(math.prod(s) for k, s in shapes.items() if k.startswith(("decoder.", "conv2.")))
        if enc and dec:
            sizes["vae_params"] = (enc, dec)
    return sizes


class EnginePlans:
    """The planning part of `Engine` (which sets `library`, `models_root`, `device`, `_footprints`
    and provides `resolve` and `_gpu`)."""

    def _plan(self, job: Job | None, name: str | None = None, footprint=None, plan_request=None):
        """The memory plan on this machine (its CPU without a GPU or with device="cpu") for `job`;
        without one, for `plan_request` (a PlanRequest) or the model's defaults."""
        from wan_lite.parallel.plan import rank_plan
        from wan_lite.runtime.planner import plan

        model, req, hw, profile = self._plan_inputs(job, name, footprint, plan_request)
        return rank_plan(plan(model, req, hw, profile=profile))

    def _plan_inputs(self, job: Job | None, name: str | None = None, footprint=None, plan_request=None):
        """What `_plan` plans: (ModelFootprint, PlanRequest, Hardware, profile or None)."""
        from wan_lite.parallel.plan import rank_hardware  # a rank of a multi-GPU job: its share of the RAM
        from wan_lite.runtime.hardware import Hardware
        from wan_lite.runtime.planner import ModelFootprint, PlanRequest
        from wan_lite.runtime.step_cache import computed_share

        spec = job.spec if job is not None else get_spec(name or "")
        profile = job.request.memory_profile if job is not None else None
        if job is not None:
            cache = job.request.cache
            share = computed_share(spec.name, cache, job.steps, job.shift, job.sampler, image=job.image is not None)
            if job.request.turbo and job.turbo_phases == 3:  # guidance (two passes) in the first phase only
                from wan_lite.sampling import make_sampler

                passes = sum(1 + (job.phase_at(int(t))[1] != 1)
                             for t in make_sampler(job.sampler, job.steps, job.shift).timesteps)
                share *= passes / (2 * job.steps)
            names, lora_bytes, rank = self._lora_facts(job)
            req = PlanRequest(job.width, job.height, job.frames, steps=job.steps,
                              image=job.image is not None or spec.needs_image,
                              cfg=any(g != 1 for g in job.guidance), fp8_attention=fp8_attention_opted_in(),
                              cache=cache, cache_share=share, lora_names=names, lora_bytes=lora_bytes,
                              lora_rank=rank, speed_first=bool(job.request.turbo))
        else:
            w, h = spec.default_size
            req = plan_request or PlanRequest(w, h, spec.frames, steps=spec.steps, image=spec.needs_image,
                                              fp8_attention=fp8_attention_opted_in())
        profile = None if profile in (None, "", "auto") else profile
        hw = rank_hardware(Hardware.probe(self.models_root if self.models_root.is_dir() else "."))
        if not self._gpu():  # a run on the CPU (no GPU, or device="cpu") is planned for the CPU
            hw = hw.without_gpu()
        return footprint or ModelFootprint.full_size(spec.name), req, hw, profile

    @staticmethod
    def _lora_facts(job: Job) -> tuple[tuple[str, ...], int, int]:
        """(file names, unmerged factor bytes, ranks added up) of the job's LoRAs with a strength,
        from their headers; a file that cannot be read counts nothing here (the job refuses it)."""
        from wan_lite.errors import CheckpointError
        from wan_lite.loading.lora import read_lora

        names, size, rank = [], 0, 0
        for path, high, low in job.request.loras:
            if not (high or low):
                continue
            try:
                lora = read_lora(path)
            except (CheckpointError, OSError):
                continue
            names.append(Path(path).name)
            size += lora.unmerged_bytes()
            rank += max((layer.rank for layer in lora.layers.values()), default=0)
        return tuple(names), size, rank

    def preflight(self, request: GenerateRequest | Job) -> Estimate:
        """What the request will use on this machine, before anything is loaded: the plan of the
        model as it is on disk (a custom or test model's own sizes; the released ones where its
        files are not there yet), the plan the run will follow."""
        job = self.resolve(request)
        if job.request.gpus > 1:
            return self._preflight_split(job)
        p = self._plan(job, footprint=self._disk_footprint(job))
        data = p.to_json()
        return Estimate(fits=data["fits"], peak_vram_gib=data["peak_vram_gib"], peak_ram_gib=data["peak_ram_gib"],
                        seconds=data["seconds_estimate"], summary=p.summary(), reason=data.get("reason"), plan=data)

    def _disk_footprint(self, job: Job) -> Any:
        """The footprint of the job's model as it is on disk; None where it is not installed (yet),
        which plans the released sizes."""
        name = job.spec.name
        try:
            return self._footprint(name, self.model_folder(name), self.library.components.get(name, {}))
        except (WanLiteError, OSError, StopIteration):
            return None

    def gpu_plan(self, request: GenerateRequest | Job, gpus: int, jobs: int = 1):
        """How `gpus` GPUs of this machine run `jobs` jobs like `request` (a GpuPlan: each job split
        over them, or one job per GPU, and why), each rank planned with its share of the RAM."""
        from wan_lite.parallel.plan import plan_gpus

        job = self.resolve(request)
        model, req, hw, profile = self._plan_inputs(job, footprint=self._disk_footprint(job))
        return plan_gpus(model, req, hw, gpus, jobs=jobs, profile=profile)

    def _preflight_split(self, job: Job) -> Estimate:
        """The estimate of a job split over `gpus` GPUs: each rank's plan (its own GPU, its share of
        the RAM), the RAM of all of them, the split job's time; a count beyond this machine's GPUs
        does not fit."""
        from wan_lite.parallel.launch import check_gpus

        gpus = job.request.gpus
        split = self.gpu_plan(job, gpus)
        data = split.per_gpu.to_json()
        fits, reason = bool(data["fits"]), data.get("reason")
        try:
            check_gpus(gpus, self.device)
        except InputError as err:
            fits, reason = False, f"{err.message} {err.hint or ''}".strip()
        data["gpus"] = split.to_json()
        return Estimate(fits=fits, peak_vram_gib=data["peak_vram_gib"], peak_ram_gib=round(data["peak_ram_gib"] * gpus, 3),
                        seconds=split.seconds, summary=split.reason, reason=reason, plan=data)

    def _footprint(self, name: str, folder: Path, parts: dict[str, Path]):
        """Sizes of the model actually on disk (read from tensor shapes, no data), remembered
        while its files stay as they are."""
        files = [folder, *map(Path, parts.values())]
        key = (name, tuple(str(f) for f in files), tuple(f.stat().st_mtime_ns if f.exists() else 0 for f in files))
        if key not in self._footprints:  # the app's estimate asks at every change of the form
            self._footprints[key] = self._read_footprint(name, folder, parts)
        return self._footprints[key]

    def _read_footprint(self, name: str, folder: Path, parts: dict[str, Path]):
        from wan_lite.loading.components import resolve_sources
        from wan_lite.models.dit import WanDiTConfig
        from wan_lite.runtime.planner import ModelFootprint

        _, sources, _ = resolve_sources(folder if folder.is_dir() or not parts else None, parts, name)
        cfg = WanDiTConfig.from_shapes(next(v for k, v in sources.items() if k.startswith("dit_")).shapes())
        footprint = ModelFootprint.of_model(name, cfg)  # the released sizes when the DiT has them
        if footprint == ModelFootprint.full_size(name):
            return footprint
        # another size (a custom or a test model): its text encoder and VAE as they are on disk too,
        # not the released ones (umT5-XXL alone would put 11 GB into every RAM figure)
        return replace(footprint, **_part_sizes(sources))
