"""encode -> denoise -> decode for the three Wan 2.2 models.

TI2V-5B: text-to-video, or image-to-video with latent frame 0 held to the image latent (its
tokens get timestep 0). T2V-A14B / I2V-A14B: two experts switched at a timestep boundary, a
guidance scale per expert; I2V feeds mask + image latent as `y`.

The pipeline decides nothing about memory: a `Placement` (plain moves by default, the planned
runtime in wan_lite.runtime) is asked to make each component usable before a stage and may
release it after. Initial noise is drawn exactly like the official code: one
`torch.Generator(device)` seeded with the seed, one `randn(shape, float32)` on the device.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wan_lite.api import CancelToken, GenerateRequest, Progress, ProgressCallback
from wan_lite.errors import Cancelled
from wan_lite.job import Job, as_job, load_image, resolve
from wan_lite.loading.components import module_of
from wan_lite.registry import ModelSpec
from wan_lite.runtime.loader import Formats, LoadedParts, load_parts, load_planned_parts
from wan_lite.runtime.planner import Plan
from wan_lite.runtime.tiled_vae import cancel_checks
from wan_lite.runtime.vae_frames import video_to_frames
from wan_lite.sampling import StepInfo
from wan_lite.sizing import centre_crop_box

log = logging.getLogger(__name__)


class Placement(Protocol):
    """Makes components usable on the compute device. `activate` before use, `release` after."""

    device: torch.device

    def activate(self, name: str, module: nn.Module) -> None: ...

    def release(self, name: str, module: nn.Module) -> None: ...

    def on_oom(self, name: str, module: nn.Module) -> bool:
        """Switch to a leaner way of running `module` after an out-of-memory error.
        Returns False when nothing leaner exists."""
        ...


class MovePlacement:
    """Whole modules moved to the device for their stage and, with `offload`, back to the CPU
    after it (the official single-GPU behaviour)."""

    def __init__(self, device: torch.device | str, offload: bool = True) -> None:
        self.device = torch.device(device)
        self.offload = offload and self.device.type != "cpu"

    def activate(self, name: str, module: nn.Module) -> None:
        module.to(self.device)

    def release(self, name: str, module: nn.Module) -> None:
        if self.offload:
            module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def on_oom(self, name: str, module: nn.Module) -> bool:
        return False


# hook(info, call) -> velocity of that DiT call; `call()` runs the next hook or the DiT itself.
StepHook = Callable[[StepInfo, Callable[[], torch.Tensor]], torch.Tensor]


@dataclass
class PipelineResult:
    frames: np.ndarray  # uint8 [F, H, W, 3]
    fps: int
    seed: int
    latents: torch.Tensor  # float32 [z, T, h, w] on the CPU
    timings: dict[str, float]
    settings: dict[str, Any]  # incl. "dit_forwards": {"computed": N, "skipped": M}
    notes: list[str] = field(default_factory=list)


def image_to_tensor(img: Any) -> torch.Tensor:
    """PIL RGB -> float32 [3, H, W] in [-1, 1] (to_tensor, then (x - 0.5) / 0.5)."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return (arr - 0.5) / 0.5


def latent_preview(x0: torch.Tensor, max_side: int = 160) -> np.ndarray:
    """A cheap RGB look at a latent [z, T, h, w]: the middle frame's three main channel
    directions (PCA), scaled to uint8. Shows layout and motion, not true colours."""
    frame = x0[:, x0.shape[1] // 2].float()  # [z, h, w]
    z, h, w = frame.shape
    flat = frame.reshape(z, -1).T  # [h*w, z]
    flat = flat - flat.mean(0, keepdim=True)
    k = min(3, z)
    _, _, v = torch.pca_lowrank(flat, q=k, center=False)
    rgb = (flat @ v[:, :k]).T.reshape(k, h, w)
    if k < 3:
        rgb = torch.cat([rgb, rgb[:1].expand(3 - k, h, w)])
    lo, hi = rgb.amin(dim=(1, 2), keepdim=True), rgb.amax(dim=(1, 2), keepdim=True)
    rgb = (rgb - lo) / (hi - lo).clamp_min(1e-6)
    scale = max_side / max(h, w)
    if scale > 1:
        rgb = F.interpolate(rgb[None], scale_factor=math.floor(scale), mode="nearest")[0]
    return (rgb.permute(1, 2, 0) * 255).to(torch.uint8).cpu().numpy()


class _Clock:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.start = time.perf_counter()

    def add(self, stage: str, seconds: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class WanPipeline:
    """One loaded model: text encoder, VAE and one DiT (TI2V-5B) or two experts (A14B)."""

    def __init__(
        self,
        spec: ModelSpec,
        text_encoder: Any,
        vae: nn.Module,
        dits: dict[str, nn.Module],
        placement: Placement | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.spec = spec
        self.text_encoder = text_encoder
        self.vae = vae
        self.dits = dits  # {"main": dit} or {"high": ..., "low": ...}
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.placement: Placement = placement or MovePlacement(device)
        self.cfg_batch = False  # cond + uncond as one batch of 2 (the runtime may switch it on)
        # Around every DiT call of the denoising loop, first registered outermost (see StepHook).
        self.step_hooks: list[StepHook] = []
        self._forwards = 0  # DiT forwards (batch rows) of the running denoise, skipped ones included
        self._lora_files: dict[tuple, Any] = {}  # (path, size, mtime) -> a read LoRA file
        self._loras: dict[str, list[tuple[Any, float]]] = {}  # role -> the job's (LoRA, strength) pairs
        self.lora_use: dict[str, str] = {}  # role -> how its LoRAs were applied: "merged", "unmerged", "none"
        self.decode_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lambda vae, z: vae.decode(z)
        self.encode_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lambda vae, x: vae.encode(x)
        self._text_cache: dict[str, torch.Tensor] = {}
        self.part_keys: dict[str, tuple] = {}  # what the text encoder and VAE were built from (LoadedParts.keys)

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def dit(self) -> nn.Module:
        return self.dits[self.spec.dit_roles[0]]

    def set_attention(self, fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """The attention kernel of this pipeline's DiTs (another pipeline keeps its own)."""
        for dit in self.dits.values():
            dit.set_attention(fn)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        model_dir: str | Path | None = None,
        *,
        components: dict[str, str | Path] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
        vae_dtype: torch.dtype = torch.float32,
        text_dtype: torch.dtype = torch.bfloat16,
        name: str | None = None,
        placement: Placement | None = None,
    ) -> WanPipeline:
        """Load a model: an official-layout folder, and/or per-component files or folders in
        any supported format (`components` slots: "dit" or "dit_high"/"dit_low", "vae",
        "text_encoder", "tokenizer"), in the dtypes given (fp8 / GGUF DiT weights stay as
        stored). Weights stay on the CPU until a stage needs them; `placement` (plain moves by
        default) puts them where they run. Raises CheckpointError naming any missing, broken or
        mismatched file."""
        parts = load_parts(model_dir, Formats(dit_dtype=dtype, vae_dtype=vae_dtype, text_dtype=text_dtype),
                           components=components, name=name)
        return cls.of_parts(parts, placement=placement, device=device)

    @classmethod
    def load_planned(cls, model_dir: str | Path | None, plan: Plan, *, components: dict[str, str | Path] | None = None,
                     name: str | None = None, device: torch.device | str | None = None,
                     cache_dir: Path | None = None, after: WanPipeline | None = None) -> WanPipeline:
        """Load a model in the formats of `plan` (for a GPU or the CPU alike), run as the plan
        says by its PlannedPlacement (int8 / fp8 weights cached in `cache_dir`). `after`: the
        pipeline loaded before; its text encoder (with its prompt cache) and VAE are taken over
        where they come from the same files in the same formats."""
        reuse = {}
        if after is not None:
            reuse = {after.part_keys.get("text_encoder"): after.text_encoder, after.part_keys.get("vae"): after.vae}
        parts = load_planned_parts(model_dir, plan, components=components, name=name, device=device,
                                   cache_dir=cache_dir, reuse=reuse)
        pipe = cls.of_parts(parts)
        if after is not None and parts.text_encoder is after.text_encoder:
            pipe._text_cache = after._text_cache
        return pipe

    @classmethod
    def of_parts(cls, parts: LoadedParts, *, placement: Placement | None = None,
                 device: torch.device | str | None = None) -> WanPipeline:
        """The pipeline of loaded parts, run by their own PlannedPlacement (bound here) when they
        bring one, else by `placement` (default: plain moves to `device`)."""
        pipe = cls(parts.spec, parts.text_encoder, parts.vae, parts.dits, placement=parts.placement or placement,
                   device=device)
        pipe.part_keys = dict(parts.keys)
        if parts.placement is not None:
            parts.placement.bind(pipe)
            log.info("Plan: %s", parts.placement.plan.summary())
        return pipe

    # ------------------------------------------------------------------ stages
    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> list[torch.Tensor]:
        """Trimmed embeddings, cached by text (a new seed or setting re-encodes nothing)."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if todo:
            module = module_of(self.text_encoder)
            self.placement.activate("text_encoder", module)
            try:
                for text, emb in zip(todo, self.text_encoder.encode(todo), strict=True):
                    self._text_cache[text] = emb.detach().to("cpu")
            finally:
                self.placement.release("text_encoder", module)
        return [self._text_cache[t] for t in texts]

    def remember_text(self, embeddings: dict[str, torch.Tensor]) -> None:
        """Prompt embeddings encoded elsewhere (rank 0 of a multi-GPU job, wan_lite.parallel):
        `encode_text` takes them from its cache instead of running the text encoder."""
        self._text_cache.update({text: emb.detach().to("cpu") for text, emb in embeddings.items()})

    @torch.no_grad()
    def vae_encode(self, video: torch.Tensor) -> torch.Tensor:
        """[3, F, H, W] in [-1, 1] -> normalised latent [z, T, h, w] float32 on the device."""
        self.placement.activate("vae_encoder", self.vae)
        dtype = next(self.vae.parameters()).dtype
        z = self.encode_fn(self.vae, video[None].to(self.device, dtype))
        return z[0].float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, cancel: CancelToken | None = None) -> torch.Tensor:
        """Normalised latent [z, T, h, w] -> video [3, F, H, W] float32 in [-1, 1] on the CPU."""
        return self._decode(latents, cancel).cpu()

    def decode_frames(self, latents: torch.Tensor, cancel: CancelToken | None = None) -> np.ndarray:
        """Normalised latent [z, T, h, w] -> uint8 frames [F, H, W, 3] (`video_to_frames` of
        `decode`): through the decode_fn's own `frames` where it has one (a tiled decode then
        never holds the float32 video in RAM), else from the video where the decode left it."""
        return self._decode(latents, cancel, frames=True)

    def _decode(self, latents: torch.Tensor, cancel: CancelToken | None = None, frames: bool = False) -> Any:
        """`decode`, the video left where the decode made it (an untiled decode: on the GPU), or
        with `frames` the uint8 frames as a numpy array.

        `cancel` is honoured before the decode starts, between the decoder's parts as it runs
        (every latent frame, frame chunk and tile: `tiled_vae.cancel_checks`) and once it ends,
        so a cancelled job stops within moments and never goes on to write its video."""
        if cancel is not None and cancel.cancelled:
            raise Cancelled()
        self.placement.activate("vae_decoder", self.vae)
        try:
            # float32 in: the VAE de-normalises in float32 and casts to its own dtype after that;
            # out: float32 clamped to [-1, 1] (both the plain and the tiled decode)
            z = latents[None].to(self.device, torch.float32)
            own_frames = getattr(self.decode_fn, "frames", None) if frames else None
            with cancel_checks(self.vae, cancel):
                out = own_frames(self.vae, z)[0] if own_frames else self.decode_fn(self.vae, z)[0]
        finally:
            self.placement.release("vae", self.vae)
        if cancel is not None and cancel.cancelled:
            raise Cancelled()
        if not frames:
            return out
        return out.numpy() if own_frames else video_to_frames(out)

    def _velocity(self, role: str, info: StepInfo, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor,
                  ctx_null: torch.Tensor | None, y: torch.Tensor | None, g: float) -> torch.Tensor:
        """Classifier-free guided velocity for latent x [z, T, h, w]. Guidance 1 is one pass of
        the prompt alone (no unconditional pass, not one weighted by 0)."""
        dit = self.dits[role]
        xb, yb = x[None], (y[None] if y is not None else None)
        if g == 1:
            return self._call(replace(info, branches=("cond",)), lambda: dit(xb, t, ctx, y=yb))[0].float()
        if self.cfg_batch:
            two = torch.cat([xb, xb])
            out = self._call(replace(info, branches=("cond", "uncond")),
                             lambda: dit(two, torch.cat([t, t]), torch.cat([ctx, ctx_null]),
                                         y=torch.cat([yb, yb]) if yb is not None else None))
            v_c, v_u = out[:1], out[1:]
        else:
            v_c = self._call(replace(info, branches=("cond",)), lambda: dit(xb, t, ctx, y=yb))
            v_u = self._call(replace(info, branches=("uncond",)), lambda: dit(xb, t, ctx_null, y=yb))
        return (v_u + g * (v_c - v_u))[0].float()

    def _call(self, info: StepInfo, call: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One DiT call through the step hooks, counted (per batch row) once it returned."""
        for hook in reversed(self.step_hooks):
            call = functools.partial(hook, info, call)
        out = call()
        self._forwards += len(info.branches)
        return out

    def _guarded_velocity(self, role: str, *args: Any) -> torch.Tensor:
        """_velocity, retried with a leaner placement after an out-of-memory error."""
        dit = self.dits[role]
        while True:
            try:
                return self._velocity(role, *args)
            except torch.OutOfMemoryError:
                pass  # handled below, outside the except block, so the failed tensors are freed
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if not self.placement.on_oom(role, dit):
                from wan_lite.errors import OutOfMemoryError

                raise OutOfMemoryError(
                    "The GPU ran out of memory during denoising, even with the leanest plan.",
                    "Choose a smaller size or fewer frames, or close other programs using the GPU.",
                )
            log.warning("Out of GPU memory at a denoising step; continuing with a leaner plan.")

    # ------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(
        self,
        job: Job | GenerateRequest | str,
        *,
        on_progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        on_latents: Callable[[torch.Tensor, dict[str, Any]], None] | None = None,
        preview_every: int = 5,
        **fields: Any,
    ) -> PipelineResult:
        """Make one video from a resolved `Job` (`wan_lite.job.resolve`). For scripts, a prompt
        and GenerateRequest fields as keywords (`generate("a fox", seed=7, steps=30)`) or a
        GenerateRequest are resolved here, once, for this pipeline's model.
        `on_latents(latents, settings)` runs after denoising and before the decode (the engine
        saves the latents there, so a failed decode loses nothing)."""
        if isinstance(job, str):
            job = resolve(GenerateRequest(prompt=job, model=self.spec.name, **fields))
        job = as_job(job)
        if job.spec.name != self.spec.name:
            from wan_lite.errors import InputError

            raise InputError(f"This job is for {job.spec.name}, but this pipeline runs {self.spec.name}.",
                             f"Load {job.spec.name}, or leave out what selects it (an image selects I2V-A14B).")
        lora_notes = self._prepare_loras(job)
        latents, clock, forwards = self.denoise(job, on_progress=on_progress, cancel=cancel,
                                                preview_every=preview_every)
        settings = job.settings() | {"dit_forwards": forwards}
        for entry in settings["loras"]:
            entry["applied"] = {role: self.lora_use.get(role, "none") for role in self.dits}
        if on_latents is not None:
            on_latents(latents, settings)
        self._report(on_progress, "decode", 0, 1, clock)
        t0 = time.perf_counter()
        frames = self.decode_frames(latents, cancel=cancel)
        clock.add("decode", time.perf_counter() - t0)
        self._report(on_progress, "decode", 1, 1, clock)
        settings["timings"] = dict(clock.timings)
        return PipelineResult(frames=frames, fps=self.spec.fps, seed=job.seed,
                              latents=latents, timings=dict(clock.timings), settings=settings,
                              notes=list(job.notes) + lora_notes)

    def _prepare_loras(self, job: Job) -> list[str]:
        """Read the job's LoRA files (once per file version) and check each against every DiT
        before any of them changes: a LoRA that does not fit stops the job with nothing applied.
        Each expert takes them on when it becomes active (`_use_loras`)."""
        if not job.request.loras and not any(self._loras.values()):
            return []
        from wan_lite.loading.lora import read_lora
        from wan_lite.runtime.lora import layer_shapes

        files = []
        for path, _hi, _lo in job.request.loras:
            stat = Path(path).stat()
            key = (path, stat.st_size, stat.st_mtime_ns)
            if key not in self._lora_files:
                self._lora_files[key] = read_lora(path)
            files.append(self._lora_files[key])
        for role, dit in self.dits.items():
            shapes = layer_shapes(dit)
            for lora in files:
                lora.check(shapes, what=f"{role} DiT" if role != "main" else "DiT")
        self._loras = {role: [(lora, (hi, lo)[self.spec.guidance_index(role)])
                              for lora, (_p, hi, lo) in zip(files, job.request.loras, strict=True)]
                       for role in self.dits}
        notes = [n for lora in files for n in lora.notes]
        return list(dict.fromkeys(notes))

    def _use_loras(self, role: str, on: bool = True) -> None:
        """The job's LoRAs on expert `role` (none when `on` is False: Turbo's first phase in 3),
        merged or unmerged (runtime/lora.py use_loras), before the placement puts it on the device.
        An unmerged LoRA needs the expert's tensors: an expert waiting on disk is read first
        (activate would do it anyway)."""
        pairs = self._loras.get(role, []) if on else []
        from wan_lite.runtime import lora as lora_rt
        from wan_lite.runtime import streaming

        dit = self.dits[role]
        if pairs and streaming.where_is(dit) == "disk" and not lora_rt.mergeable(dit):
            streaming.move_expert(dit, "ram")
        how = lora_rt.use_loras(dit, [lora for lora, _s in pairs], [s for _l, s in pairs])
        self.lora_use[role] = how

    def _report(self, cb: ProgressCallback | None, stage: str, step: int, total: int, clock: _Clock,
                eta: float | None = None, preview: np.ndarray | None = None) -> None:
        if cb is not None:
            cb(Progress(stage=stage, step=step, total=total, elapsed_s=clock.elapsed(), eta_s=eta, preview=preview))

    @torch.no_grad()
    def denoise(self, job: Job, *, on_progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
                preview_every: int = 5) -> tuple[torch.Tensor, _Clock, dict[str, int]]:
        """Run the sampler; returns the final latent [z, T, h, w] (float32, CPU), the clock and
        the DiT forwards {"computed": N, "skipped": M} (one per guidance branch and step; a
        forward whose blocks a hook skipped counts as skipped)."""
        from wan_lite.models.text_encoder import pad_context
        from wan_lite.sampling import make_sampler

        spec, dev, clock = self.spec, self.device, _Clock()
        sampler = make_sampler(job.sampler, job.steps, job.shift)
        s_t, s_h = spec.vae_stride[0], spec.vae_stride[1]
        lat_shape = (spec.z_dim, (job.frames - 1) // s_t + 1, job.height // s_h, job.width // s_h)
        gen = torch.Generator(device=dev).manual_seed(job.seed)
        noise = torch.randn(lat_shape, dtype=torch.float32, device=dev, generator=gen)

        self._report(on_progress, "text", 0, 1, clock)
        t0 = time.perf_counter()
        # guidance 1 everywhere: no unconditional pass, so the negative prompt is not encoded
        cfg = any(g != 1 for g in job.guidance)
        texts = [job.prompt, job.negative_prompt] if cfg else [job.prompt]
        embedded = [pad_context([e]).to(dev) for e in self.encode_text(texts)]
        ctx, ctx_null = embedded[0], (embedded[1] if cfg else None)
        clock.add("text", time.perf_counter() - t0)

        y = z0 = mask = None
        latent = noise
        if job.image is not None:
            t0 = time.perf_counter()
            y, z0, mask = self._image_condition(job, lat_shape)
            clock.add("image_encode", time.perf_counter() - t0)
            if z0 is not None:
                latent = (1 - mask) * z0 + mask * noise
        self.placement.release("vae", self.vae)

        rows_before = sum(d.rows_through_blocks for d in self.dits.values())
        self._forwards = 0
        cache = self._step_cache(job, [job.phase_at(int(t))[0] for t in sampler.timesteps])
        try:
            latent = self._loop(job, sampler, latent, ctx, ctx_null, y, z0, mask, lat_shape, clock,
                                on_progress, cancel, preview_every)
        finally:
            if cache is not None:
                cache.detach()
        computed = sum(d.rows_through_blocks for d in self.dits.values()) - rows_before
        return latent.float().cpu(), clock, {"computed": computed, "skipped": self._forwards - computed}

    def _step_cache(self, job: Job, experts: list[str]) -> Any:
        """The job's step cache attached to this pipeline (None when off). Residuals stay on the
        compute device where the plan keeps the DiT's blocks there, else in host memory."""
        if job.request.cache == "off":
            return None
        from wan_lite.runtime.step_cache import StepCache

        device = getattr(self.placement, "step_cache_device", None)
        return StepCache(self.spec.name, job.request.cache, experts, image=job.image is not None,
                         residual_device=device).attach(self)

    def _loop(self, job: Job, sampler: Any, latent: torch.Tensor, ctx: torch.Tensor, ctx_null: torch.Tensor | None,
              y: torch.Tensor | None, z0: torch.Tensor | None, mask: torch.Tensor | None,
              lat_shape: tuple[int, ...], clock: _Clock, on_progress: ProgressCallback | None,
              cancel: CancelToken | None, preview_every: int) -> torch.Tensor:
        """The denoising steps, from `latent` (noise, or noise with the image frame held)."""
        spec, dev = self.spec, self.device
        tokens_per_frame = (lat_shape[2] // spec.patch_size[1]) * (lat_shape[3] // spec.patch_size[2])
        active: str | None = None
        loras_on = True
        denoise_start = time.perf_counter()
        n = len(sampler.timesteps)
        for i in range(n):
            if cancel is not None and cancel.cancelled:
                for role in filter(None, [active]):
                    self.placement.release(role, self.dits[role])
                raise Cancelled()
            t = int(sampler.timesteps[i])
            role, g, on = job.phase_at(t)
            if role != active or (on != loras_on and self._loras.get(role)):
                if active is not None:
                    self.placement.release(active, self.dits[active])
                if role in self._loras:
                    self._use_loras(role, on)
                self.placement.activate(role, self.dits[role])
                active = role
            loras_on = on
            if z0 is not None:  # TI2V image-to-video: frame-0 tokens are clean (t = 0)
                tt = torch.full((1, lat_shape[1] * tokens_per_frame), float(t), device=dev)
                tt[:, :tokens_per_frame] = 0.0
            else:
                tt = torch.tensor([t], device=dev, dtype=getattr(torch, spec.timestep_dtype))
            step_start = time.perf_counter()
            info = StepInfo(index=i, total=n, timestep=t, expert=role, branches=())
            v = self._guarded_velocity(role, info, latent, tt, ctx, ctx_null, y, g)
            x0_pred = latent - float(sampler.sigmas[i]) * v if preview_every and (i + 1) % preview_every == 0 else None
            latent = sampler.step(v, latent)
            if z0 is not None:
                latent = (1 - mask) * z0 + mask * latent
            stage = {"main": "denoise", "high": "high_noise", "low": "low_noise"}[role]
            if latent.device.type == "cuda":  # the step's GPU work into its own time, not the next stage's
                torch.cuda.synchronize(latent.device)
            clock.add(stage, time.perf_counter() - step_start)
            done = time.perf_counter() - denoise_start
            eta = done / (i + 1) * (n - i - 1)
            preview = latent_preview(x0_pred) if x0_pred is not None else None
            self._report(on_progress, stage, i + 1, n, clock, eta=eta, preview=preview)
        if active is not None:
            self.placement.release(active, self.dits[active])
        return latent

    def _image_condition(self, job: Job, lat_shape: tuple[int, ...]):
        """TI2V: (None, z0, mask) with latent frame 0 held to the image latent.
        I2V-A14B: (y, None, None) with y = [mask (4) | VAE latent of image + zero frames (16)]."""
        from PIL import Image

        dev, img = self.device, job.image
        if self.spec.conditioning == "first_latent":
            (rw, rh), box = centre_crop_box(img.width, img.height, job.width, job.height)
            img = img.resize((rw, rh), Image.LANCZOS).crop(box)
            z = self.vae_encode(image_to_tensor(img)[:, None])  # [z, 1, h, w]
            mask = torch.ones(lat_shape, device=dev)
            mask[:, 0] = 0
            return None, z, mask
        pixels = image_to_tensor(img)[None]  # CPU bicubic resize, like the reference
        pixels = F.interpolate(pixels, size=(job.height, job.width), mode="bicubic", align_corners=False)[0]
        video = torch.cat([pixels[:, None], torch.zeros(3, job.frames - 1, job.height, job.width)], dim=1)
        z = self.vae_encode(video)
        m = torch.zeros(self.spec.mask_channels, lat_shape[1], lat_shape[2], lat_shape[3], device=dev)
        m[:, 0] = 1
        return torch.cat([m, z]), None, None


__all__ = ["Job", "MovePlacement", "Placement", "PipelineResult", "StepHook", "WanPipeline", "load_image", "resolve"]
