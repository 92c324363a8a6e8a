"""Engine: the one object the UI and the CLI drive. Its `library` (wan_lite.library.ModelLibrary)
knows where each model's files are; the engine plans memory per request, keeps one pipeline
loaded, runs requests one at a time and writes the outputs (latents first, then the mp4 and its
sidecar JSON, all atomically).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from wan_lite.api import CancelToken, GenerateRequest, GenerateResult, Progress, ProgressCallback
from wan_lite.engine_plan import EnginePlans, Estimate  # noqa: F401  (Estimate re-exported)
from wan_lite.errors import Cancelled, InputError, WanLiteError
from wan_lite.job import Job, as_job
from wan_lite.library import FoundFile, ModelLibrary, ModelStatus
from wan_lite.paths import weights_cache_dir
from wan_lite.registry import MODELS, get_spec
from wan_lite.runtime.planner import FP8_ATTENTION_ENV, fp8_attention_opted_in  # noqa: F401  (re-exported)
from wan_lite.version import __version__

log = logging.getLogger(__name__)


class Engine(EnginePlans):
    def __init__(self, models_root: Path, output_dir: Path, device: str | None = None,
                 folders: dict[str, Path] | None = None,
                 components: dict[str, dict[str, Path]] | None = None) -> None:
        """folders: model name -> official-layout folder (default: models_root/<repo name>).
        components: model name -> {slot: file or folder in any format} replacing parts of the
        folder (slots "dit", "dit_high", "dit_low", "vae", "text_encoder", "tokenizer")."""
        self.models_root = Path(models_root)
        self.output_dir = Path(output_dir)
        self.device = device
        self.library = ModelLibrary(self.models_root, folders, components)
        self.cache_dir = weights_cache_dir()  # converted weights, keyed by source content and format
        old_cache = self.models_root / ".cache"  # where earlier versions kept them
        if old_cache.is_dir() and any(old_cache.glob("*.safetensors")):
            log.info("Quantized weights made by an earlier version are in %s; they are now kept in %s. "
                     "Delete the old folder to free its space.", old_cache, self.cache_dir)
        self._pipe = None
        self._pipe_key: tuple | None = None
        self._footprints: dict[tuple, Any] = {}  # (model, its files and their dates) -> ModelFootprint
        # one job at a time, whatever the caller does; re-entrant: under torchrun the job's own
        # rank runs Engine.generate again inside the call that joined the group
        self._lock = threading.RLock()
        # The attention kernel per kind of plan (False: bf16/int8; True: fp8 compute), chosen at the
        # first load on a GPU of a plan of that kind; each note goes with the first result after it.
        self._attention: dict[bool, Any] = {}
        self._attention_told: set[bool] = set()
        self._attention_kind = False
        # Per-job features entered around the pipeline's run: `hook(pipe, job)` -> a context
        # manager (each rank of a multi-GPU job attaches its exchanges here: wan_lite.parallel).
        self.job_hooks: list[Callable[[Any, Job], contextlib.AbstractContextManager]] = []

    # ------------------------------------------------------------------ model files (the library's)
    def model_folder(self, name: str) -> Path:
        return self.library.model_folder(name)

    def model_status(self) -> list[ModelStatus]:
        return self.library.model_status()

    def comfy_dirs(self) -> list[Path]:
        return self.library.comfy_dirs()

    def scan_components(self, comfy_dirs: list[str | Path] | None = None) -> list[FoundFile]:
        return self.library.scan_components(comfy_dirs)

    def chosen_components(self, name: str) -> dict[str, Path]:
        return self.library.chosen_components(name)

    def choose_components(self, name: str, picks: dict[str, str | Path | None]) -> dict[str, Path]:
        return self.library.choose_components(name, picks)

    # ------------------------------------------------------------------ requests
    def lora_files(self) -> list[Path]:
        """The LoRA files found in models/loras and the ComfyUI folders (see ModelLibrary)."""
        return self.library.lora_files()

    @staticmethod
    def speed_lora(path: str | Path) -> str | None:
        """Why a LoRA file looks like a speed (step-distilled) LoRA, or None (header only)."""
        from wan_lite.loading.lora import speed_lora

        return speed_lora(path)

    def resolve(self, request: GenerateRequest | Job) -> Job:
        """The request resolved once (`wan_lite.job.resolve`): defaults filled, sizes snapped, the
        image opened and the size following it, the seed drawn. Pass the Job on to `generate`.
        Turbo left open (None) is switched on when a LoRA of the request is a speed LoRA."""
        if isinstance(request, Job):
            return request
        note = None
        if request.turbo is None and request.loras:
            from wan_lite.job import lora_arg
            from wan_lite.loading.lora import speed_lora

            for item in request.loras:
                arg = lora_arg(item)
                why = speed_lora(arg.path) if max(abs(arg.high), abs(arg.low)) > 0 else None
                if why:
                    note = f"{arg.path.name} is a speed LoRA ({why}): Turbo is on."
                    request = replace(request, turbo=True)
                    break
        job = as_job(request)
        if note:
            job.notes.insert(0, note)
        return job

    def pipeline(self, name: str, on_progress: ProgressCallback | None = None, job: Job | None = None,
                 *, plan_request=None, check_fit: bool = True):
        """The loaded pipeline for `name`, loading it (and unloading another) when needed.

        Every pipeline follows the memory plan for `job` (without one, for `plan_request` or the
        model's defaults) on this machine, its GPU or its CPU alike: the plan `python -m wan_lite
        plan` prints. What is fixed at load time (weight formats) reloads when it changes; the rest
        is re-planned per job. A job that does not fit is refused before anything loads, unless
        `check_fit` is False (decoding saved latents runs only the decode stage, which retries in
        smaller tiles)."""
        from wan_lite.pipeline import WanPipeline

        folder = self.model_folder(name)
        parts = self.library.components.get(name, {})
        plan = self._plan(job, name, self._footprint(name, folder, parts), plan_request)
        if job is not None and check_fit and not plan.fits:
            from wan_lite.errors import OutOfMemoryError

            raise OutOfMemoryError(f"This request does not fit this machine: {plan.reason}")
        fixed = (plan.quantization, plan.vae_dtype, plan.text_encoder_quant)
        key = (name, folder.resolve(), tuple(sorted((k, str(v)) for k, v in parts.items())), fixed)
        model_dir = folder if folder.is_dir() or not parts else None
        if self._pipe_key != key:
            before = self._pipe  # its text encoder and VAE go to the next model where they are the same
            if before is not None:
                from wan_lite.loading.components import module_of
                from wan_lite.runtime import vae_parts

                before.dits = {}  # the DiTs go now, before the next model's are read
                encoder = module_of(before.text_encoder)
                if not any(p.is_meta for p in encoder.parameters()):  # one dropped to disk stays there
                    encoder.to("cpu")  # the next plan places them itself
                if not vae_parts.waiting(before.vae):  # one waiting in its file stays there
                    before.vae.to("cpu")
            self.unload()
            if on_progress:
                on_progress(Progress(stage="load", step=0, total=1, elapsed_s=0.0, message=f"Loading {name}"))
            t0 = time.perf_counter()
            self._pipe = WanPipeline.load_planned(model_dir, plan, components=parts, name=name, device=self.device,
                                                  cache_dir=self.cache_dir, after=before)
            del before
            self._pipe_key = key
            log.info("Loaded %s from %s in %.1f s", name, folder, time.perf_counter() - t0)
        else:
            self._pipe.placement.plan = plan
            self._pipe.placement.bind(self._pipe)
            log.info("Plan: %s", plan.summary())
        self._use_attention(plan)
        return self._pipe

    def _use_attention(self, plan: Any) -> None:
        """Activate the attention kernel for `plan` on a GPU: SDPA, SageAttention or
        FlashAttention-3 as `select_attention` decides; with WAN_LITE_FP8_ATTENTION=1 and the fp8
        compute path, an fp8 attention kernel (FlashAttention-3's or cuDNN's) where one is
        installed, correct and faster (opt-in: it doubles the fp8 path's error,
        docs/benchmarks.md). Each choice is made once per engine."""
        if not self._gpu():
            return
        from wan_lite.runtime import attention_select

        fp8 = bool(plan is not None and plan.fp8_attention)
        if fp8 not in self._attention:
            pick = attention_select.select_fp8_attention if fp8 else attention_select.select_attention
            self._attention[fp8] = pick(self.device or "cuda")
        self._pipe.set_attention(self._attention[fp8].fn)
        self._attention_kind = fp8

    def _gpu(self) -> bool:
        import torch

        return torch.cuda.is_available() and (self.device is None or str(self.device).startswith("cuda"))

    def gpu_count(self) -> int:
        """The GPUs a job of this engine may be split over (`GenerateRequest.gpus`): 0 on the CPU."""
        import torch

        return torch.cuda.device_count() if self._gpu() else 0

    def generate(self, request: GenerateRequest | Job, on_progress: ProgressCallback | None = None,
                 cancel: CancelToken | None = None, out_path: Path | None = None,
                 overwrite: bool = False) -> GenerateResult:
        """Run one job: a request is resolved here; a Job from `resolve` runs as it is.

        `out_path` (an .mp4) names the result; without it a new name in the output folder is
        chosen. An existing file of that name (video, sidecar JSON, latents) is refused before
        anything loads unless `overwrite`; a JSON that wan_lite did not write is never replaced.
        The folder is checked (writable, room) before anything loads as well."""
        from wan_lite.output import (
            OutputError,
            check_output_folder,
            check_targets,
            output_files,
            output_stem,
            save_latents,
            stem_for_out,
            write_failed,
        )
        from wan_lite.parallel import generate_parallel, in_group, launched_by_torchrun

        with self._lock:
            job = self.resolve(request)
            if (job.request.gpus != 1 or launched_by_torchrun()) and not in_group():
                # one process per GPU, each with an Engine like this one (a rank is in_group)
                return generate_parallel(self, self._factory(), job, on_progress=on_progress, cancel=cancel,
                                         out_path=out_path, overwrite=overwrite)
            notes = list(job.notes)
            given = stem_for_out(out_path) if out_path else None
            if given is not None:
                check_targets(given, overwrite)
            check_output_folder(given.parent if given is not None else self.output_dir)
            t0 = time.perf_counter()
            pipe = self.pipeline(job.spec.name, on_progress, job)
            load_s = time.perf_counter() - t0
            words = job.request.title or job.prompt  # the user's own words name the files
            chosen = [given or output_stem(self.output_dir, words, job.seed, job.spec.name)]

            def keep_latents(latents, settings):
                record = self._record(settings, job.request, pipe)
                while True:
                    target = output_files(chosen[0])["latents"]
                    try:
                        save_latents(target, latents, record, overwrite=overwrite)
                        return
                    except FileExistsError:  # made while this job ran (another run, same second)
                        if given is not None:
                            raise OutputError(f"{target} appeared while this job ran; it is kept.",
                                              "Run again with another --out name, or with --overwrite.") from None
                        chosen[0] = output_stem(self.output_dir, words, job.seed, job.spec.name)
                    except OSError as err:
                        raise write_failed(err, target, None) from err

            try:
                with contextlib.ExitStack() as stack:
                    for hook in self.job_hooks:
                        stack.enter_context(hook(pipe, job))
                    result = pipe.generate(job, on_progress=on_progress, cancel=cancel, on_latents=keep_latents)
                result.timings["load"] = load_s
                kind = self._attention_kind
                if kind in self._attention and kind not in self._attention_told:
                    notes.append(self._attention[kind].note)  # which attention kernel runs, and why
                    self._attention_told.add(kind)
                stem = chosen[0]
                return self._write(stem, output_files(stem)["latents"], result.frames, result.fps, result.settings,
                                   result.timings, list(dict.fromkeys(notes + result.notes)), job.request, pipe,
                                   on_progress, overwrite, cancel)
            except Cancelled:  # during the denoise, the decode or the mp4 write
                latents_path = output_files(chosen[0])["latents"]
                if latents_path.is_file():
                    raise Cancelled(f"Cancelled by the user; the latents are kept in {latents_path} "
                                    f"(`python -m wan_lite decode {latents_path}` makes the video).") from None
                raise

    def _factory(self) -> Callable[..., Engine]:
        """`factory(device=...)`: an Engine like this one, in another process (one per GPU)."""
        return functools.partial(Engine, self.models_root, self.output_dir, folders=dict(self.library.folders),
                                 components=dict(self.library.components))

    def generate_each(self, requests: list[GenerateRequest], gpus: int,
                      on_result: Callable[[int, Any], None] | None = None) -> list[Any]:
        """Throughput mode: each request on one GPU, `gpus` jobs at a time (each must fit one GPU;
        `wan_lite.parallel.plan.plan_gpus(..., jobs=len(requests))` says when this beats splitting).
        Per request, in order: its GenerateResult, or the error it raised."""
        from wan_lite.parallel.throughput import run_queue

        jobs = [self.resolve(r) for r in requests]  # seeds drawn here, once
        fixed = [replace(j.request, seed=j.seed, gpus=1) for j in jobs]
        return run_queue(self._factory(), fixed, gpus, device=self.device, on_result=on_result)

    def decode_latents(self, latents_path: Path, out_path: Path | None = None,
                       model_dir: Path | None = None, overwrite: bool = False,
                       cancel: CancelToken | None = None) -> GenerateResult:
        """Decode saved latents into an mp4 again (after a failed decode, or with another VAE plan).

        Without `out_path` the video is NAME.decoded.mp4 (then -2, -3, ...) next to the latents,
        so the original video and its record stay; `overwrite` without `out_path` replaces the
        original NAME.mp4 and NAME.json instead. An existing `out_path` is refused unless `overwrite`."""
        from wan_lite.output import (
            LATENTS_SUFFIX,
            check_output_folder,
            check_targets,
            free_stem,
            load_latents,
            stem_for_out,
        )

        with self._lock:
            latents, meta = load_latents(Path(latents_path))
            settings = meta.get("settings") or {}
            name = settings.get("model")
            if name not in MODELS:
                raise InputError(f"{latents_path} does not say which model made it.")
            base = Path(str(latents_path).removesuffix(LATENTS_SUFFIX))
            if out_path:
                stem = stem_for_out(out_path)
            else:
                stem = base if overwrite else free_stem(base.with_name(base.name + ".decoded"))
            check_targets(stem, overwrite, kinds=("video", "sidecar"))
            check_output_folder(stem.parent)
            if model_dir is not None:
                self.library.folders[name] = Path(model_dir)
            elif meta.get("model_dir") and name not in self.library.folders:
                self.library.folders[name] = Path(meta["model_dir"])
                recorded = {k: Path(v) for k, v in (meta.get("components") or {}).items()}
                if name in self.library.explicit:
                    self.library.components.setdefault(name, recorded)
                else:  # what made these latents, not today's remembered choices
                    self.library.components[name] = recorded
                    self.library.explicit.add(name)
            from wan_lite.runtime.planner import PlanRequest

            spec = get_spec(name)
            size = [settings.get(k) for k in ("width", "height", "frames")]
            if not all(isinstance(v, int) and v > 0 for v in size):
                size = [*spec.default_size, spec.frames]
            request = GenerateRequest.from_dict(settings | {"model": name})
            pipe = self._decoder(name, PlanRequest(*size, image=False))  # planned for their own video
            t0 = time.perf_counter()
            frames = pipe.decode_frames(latents, cancel=cancel)
            timings = dict(settings.get("timings") or {})
            timings["decode"] = time.perf_counter() - t0
            return self._write(stem, Path(latents_path), frames, pipe.spec.fps, settings, timings, [], request, pipe,
                               None, overwrite, cancel)

    def _decoder(self, name: str, plan_request: Any):
        """A pipeline that can decode `name`'s latents: the loaded one when it is this model's,
        else the VAE alone (no text encoder, no DiT is read), placed by the plan for the video."""
        folder = self.model_folder(name)
        parts = self.library.components.get(name, {})
        if self._pipe is not None and self._pipe_key is not None and self._pipe_key[:2] == (name, folder.resolve()):
            return self.pipeline(name, plan_request=plan_request, check_fit=False)
        import torch

        from wan_lite.loading.components import load_vae, vae_source
        from wan_lite.pipeline import WanPipeline
        from wan_lite.runtime.apply import PlannedPlacement
        from wan_lite.runtime.loader import Formats

        model_dir = folder if folder.is_dir() or not parts else None
        source = vae_source(model_dir, parts, name)
        try:  # the DiT's size counts in the plan (its VAE choices) when its file is there
            footprint = self._footprint(name, folder, parts)
        except (WanLiteError, OSError, StopIteration):
            footprint = None
        plan = self._plan(None, name, footprint, plan_request)
        vae = load_vae(source, get_spec(name), Formats.of_plan(plan).vae_dtype)
        device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        pipe = WanPipeline(get_spec(name), None, vae, {}, placement=PlannedPlacement(plan, device))
        pipe.placement.bind(pipe)
        return pipe

    def _record(self, settings: dict[str, Any], request: GenerateRequest, pipe) -> dict[str, Any]:
        name = pipe.spec.name
        return {"wan_lite": __version__, "settings": settings, "request": request.to_dict(),
                "model_dir": str(self.model_folder(name)),
                "components": {k: str(v) for k, v in self.library.components.get(name, {}).items()},
                "image": request.image if isinstance(request.image, str) else None}

    def _write(self, stem: Path, latents_path: Path, frames, fps: int, settings: dict[str, Any],
               timings: dict[str, float], notes: list[str], request: GenerateRequest, pipe,
               on_progress: ProgressCallback | None, overwrite: bool = False,
               cancel: CancelToken | None = None) -> GenerateResult:
        """Write the mp4, then the sidecar JSON. `cancel` is checked before each frame goes to
        the encoder: a Cancel during the write leaves no video (the partial file is deleted)."""
        from wan_lite.output import (
            OutputError,
            check_targets,
            output_files,
            write_failed,
            write_json_atomic,
            write_mp4,
        )

        if on_progress:
            on_progress(Progress(stage="save", step=0, total=1, elapsed_s=sum(timings.values())))
        settings = dict(settings)
        settings["timings"] = {k: round(v, 3) for k, v in timings.items()}
        record = self._record(settings, request, pipe) | {"notes": notes}
        files = output_files(stem)
        video_path, sidecar = files["video"], files["sidecar"]
        check_targets(stem, True, kinds=("sidecar",))  # a JSON not ours may have appeared meanwhile
        target = video_path
        try:
            write_mp4(video_path, _until_cancelled(frames, cancel), fps, record, overwrite=overwrite)
            record |= {"video": video_path.name, "latents": latents_path.name}
            target = sidecar
            write_json_atomic(sidecar, record, overwrite=overwrite)
        except FileExistsError:
            raise OutputError(f"{target} appeared while this job ran; it is kept.",
                              f"The latents are in {latents_path}: decode them with --out another name.") from None
        except OSError as err:
            raise write_failed(err, target, latents_path) from err
        h, w = frames.shape[1:3]
        return GenerateResult(video_path=video_path, sidecar_path=sidecar, latents_path=latents_path, fps=fps,
                              seed=int(settings.get("seed", -1)), width=w, height=h, frames=len(frames),
                              timings=timings, settings=settings, notes=notes)

    def history(self, limit: int = 100) -> list[dict[str, Any]]:
        """Past results (newest first) from the sidecar JSON files in the output folder."""
        items = []
        if not self.output_dir.is_dir():
            return items
        for path in sorted(self.output_dir.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            video = path.with_name(record.get("video", ""))
            if "settings" in record and video.is_file():
                items.append(record | {"video_path": str(video), "sidecar_path": str(path)})
            if len(items) >= limit:
                break
        return items

    def unload(self) -> None:
        """Free every loaded model and the GPU memory they held."""
        self._pipe = None
        self._pipe_key = None
        import gc

        gc.collect()
        try:
            import torch

            from wan_lite.runtime.streaming import trim_host_memory

            trim_host_memory()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


def _until_cancelled(frames: Any, cancel: CancelToken | None) -> Any:
    """`frames` one by one, raising Cancelled before the next one once `cancel` is set."""
    if cancel is None:
        return frames

    def each() -> Any:
        for frame in frames:
            if cancel.cancelled:
                raise Cancelled()
            yield frame

    return each()


__all__ = ["Engine", "Estimate", "FoundFile", "Job", "ModelStatus", "WanLiteError"]
