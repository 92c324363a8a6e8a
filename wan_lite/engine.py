"""Engine: the one object the UI and the CLI drive. Finds model folders, keeps one pipeline
loaded, runs requests one at a time and writes the outputs (latents first, then the mp4 and its
sidecar JSON, all atomically).
"""

from __future__ import annotations

import json
import logging
import random
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from wan_lite.api import CancelToken, GenerateRequest, GenerateResult, Progress, ProgressCallback
from wan_lite.errors import InputError, WanLiteError
from wan_lite.registry import MODELS, get_spec
from wan_lite.runtime.planner import FP8_ATTENTION_ENV, fp8_attention_opted_in  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


@dataclass
class ModelStatus:
    name: str  # registry name, e.g. "ti2v-5b"
    title: str
    hf_repo: str
    folder: Path  # where it is (or is expected)
    state: str  # "installed", "partial" or "missing"
    size_bytes: int
    missing: list[str] = field(default_factory=list)  # files missing or broken, with the reason
    problems: list[str] = field(default_factory=list)
    components: dict[str, Path] = field(default_factory=dict)  # slot -> file used instead of the folder's


@dataclass
class FoundFile:
    """A model file (or component folder) found on this machine, in plain terms for the UI."""

    path: Path
    what: str  # "the DiT of Wan2.2 TI2V-5B", "the Wan 2.2 VAE", "a LoRA", ...
    role: str  # "dit", "vae", "text_encoder", "tokenizer", "lora", "unknown" or "broken"
    format: str  # "official", "diffusers", "comfy", "gguf"
    precision: str  # "bf16", "fp8_scaled", "gguf-Q4_K", ...
    size_bytes: int
    location: str  # "hf-cache", "comfyui", "wan_lite"
    repo: str | None = None  # the Hugging Face repo, for files in its cache
    serves: list[tuple[str, str]] = field(default_factory=list)  # (model, slot) pairs it can fill
    copies: list[Path] = field(default_factory=list)  # the same file (header and size) elsewhere
    problem: str | None = None  # why it cannot be used


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


def default_folder_name(name: str) -> str:
    return MODELS[name].hf_repo.split("/")[-1]


class Engine:
    def __init__(self, models_root: Path, output_dir: Path, device: str | None = None,
                 folders: dict[str, Path] | None = None,
                 components: dict[str, dict[str, Path]] | None = None) -> None:
        """folders: model name -> official-layout folder (default: models_root/<repo name>).
        components: model name -> {slot: file or folder in any format} replacing parts of the
        folder (slots "dit", "dit_high", "dit_low", "vae", "text_encoder", "tokenizer")."""
        self.models_root = Path(models_root)
        self.output_dir = Path(output_dir)
        self.device = device
        self.folders = {k: Path(v) for k, v in (folders or {}).items()}
        self.components = {k: dict(v) for k, v in (components or {}).items()}
        # Models the caller set up explicitly keep exactly that; the others get the component
        # files the user chose earlier (remembered in choices.json).
        self._explicit = set(self.folders) | set(self.components)
        self._scan: list = []  # the last discovery scan (wan_lite.loading.discovery.Found)
        self.refresh_components()
        self.cache_dir = self.models_root / ".cache"  # quantized weights, keyed by source file and format
        self._pipe = None
        self._pipe_key: tuple | None = None
        self._lock = threading.Lock()  # one job at a time, whatever the caller does
        # The attention kernel per kind of plan (False: bf16/int8; True: fp8 compute), chosen at the
        # first load on a GPU of a plan of that kind; each note goes with the first result after it.
        self._attention: dict[bool, Any] = {}
        self._attention_told: set[bool] = set()
        self._attention_kind = False

    # ------------------------------------------------------------------ models
    def model_folder(self, name: str) -> Path:
        spec = get_spec(name)
        return self.folders.get(spec.name) or self.models_root / default_folder_name(spec.name)

    def model_status(self) -> list[ModelStatus]:
        """Each model's state: its folder plus the chosen component files, checked from headers
        (nothing is loaded)."""
        from wan_lite.loading.layout import inspect_folder

        out = []
        for spec in MODELS.values():
            folder = self.model_folder(spec.name)
            report = inspect_folder(folder, spec.name)
            status = ModelStatus(name=spec.name, title=spec.title, hf_repo=spec.hf_repo, folder=report.root,
                                 state=report.state, size_bytes=report.size_bytes, missing=list(report.problems),
                                 problems=list(report.problems))
            parts = self.components.get(spec.name)
            if parts:
                status.components = dict(parts)
                # a file may fill two slots (umT5 + its tokenizer): count it once
                outside = {p.resolve() for p in parts.values() if not p.is_relative_to(folder)}
                status.size_bytes += sum(_disk_size(p) for p in outside)
                status.missing = status.problems = self._check_parts(spec.name, folder, parts)
                status.state = "partial" if status.problems else "installed"
            out.append(status)
        return out

    def _check_parts(self, name: str, folder: Path, parts: dict[str, Path]) -> list[str]:
        """Why the folder plus `parts` cannot make model `name` (empty when they can)."""
        from wan_lite.errors import CheckpointError
        from wan_lite.loading.components import resolve_sources

        try:
            resolve_sources(folder if folder.is_dir() else None, parts, name)
        except (CheckpointError, OSError, ValueError) as err:  # headers only: a bad file, not a bug
            return [str(err)]
        return []

    # ------------------------------------------------------------------ component files
    def refresh_components(self) -> None:
        """Take the remembered component choices into `self.components` (models set up
        explicitly by the caller are left alone). A remembered file that moved is found again
        by its header fingerprint among the last scan's results."""
        try:
            from wan_lite.loading.discovery import Choices

            choices = Choices()
            for name in MODELS:
                if name in self._explicit:
                    continue
                chosen = choices.resolve(name, self._scan)
                if chosen:
                    self.components[name] = chosen
                else:
                    self.components.pop(name, None)
        except (OSError, WanLiteError) as err:  # the engine must still start
            log.warning("Remembered component choices not applied: %s", err)

    def comfy_dirs(self) -> list[Path]:
        """The ComfyUI folders the user named (remembered)."""
        from wan_lite.loading.discovery import Choices

        return Choices().comfy_dirs

    def scan_components(self, comfy_dirs: list[str | Path] | None = None) -> list[FoundFile]:
        """Find model files in the Hugging Face cache, the ComfyUI folders and models_root.

        comfy_dirs: when given, they replace the remembered ComfyUI folders (an empty list
        forgets them); each must exist (InputError otherwise)."""
        from wan_lite.loading.discovery import Choices, candidates, default_places, find_copies, scan

        choices = Choices()
        if comfy_dirs is not None:
            choices.data["comfy_dirs"] = []
            for folder in comfy_dirs:
                choices.add_comfy_dir(Path(folder))
            choices.save()
        self._scan = scan(default_places(self.models_root, choices.comfy_dirs))
        serves: dict[int, list[tuple[str, str]]] = {}
        for name in MODELS:
            for slot, items in candidates(self._scan, name).items():
                for f in items:
                    serves.setdefault(id(f), []).append((name, slot))
        copies = {id(f): group for group in find_copies(self._scan).values() for f in group}
        self.refresh_components()  # remembered files that moved are found again
        return [FoundFile(path=f.component.path, what=f.component.what(), role=f.component.role,
                          format=f.component.format, precision=f.component.precision,
                          size_bytes=f.component.size_bytes, location=f.location, repo=f.repo,
                          serves=serves.get(id(f), []),
                          copies=[g.component.path for g in copies.get(id(f), []) if g is not f],
                          problem=f.component.problem)
                for f in self._scan]

    def chosen_components(self, name: str) -> dict[str, Path]:
        """The component files model `name` uses instead of its folder's (slot -> path)."""
        return dict(self.components.get(get_spec(name).name) or {})

    def choose_components(self, name: str, picks: dict[str, str | Path | None]) -> dict[str, Path]:
        """Check, remember and apply the files chosen for model `name` (slot -> file or folder in
        any supported format; empty = the model folder's own file). Nothing is saved unless every
        file fits its slot: a wrong one raises CheckpointError saying what it is and what was
        expected. Returns the components now in use."""
        from wan_lite.loading.discovery import Choices, config_dir, slot_names
        from wan_lite.loading.formats import detect, load_component, pick, tokenizer_folder

        spec = get_spec(name)
        chosen = {}
        for slot, raw in picks.items():
            if slot not in slot_names(spec.name):
                raise InputError(f"{spec.name} has no slot {slot!r}.",
                                 f"Use one of: {', '.join(slot_names(spec.name))}.")
            if raw is None or not str(raw).strip():
                continue
            path = Path(str(raw).strip()).expanduser()
            role = "dit" if slot.startswith("dit") else slot
            expert = slot.removeprefix("dit_") if slot.startswith("dit_") else None
            if role == "tokenizer":
                tokenizer_folder(path, config_dir() / "tokenizers")
            else:
                load_component(path, role, model=spec.name, expert=expert)  # opens headers only
            chosen[slot] = pick(detect(path), role, expert)
        choices = Choices()
        choices.data["models"].pop(spec.name, None)  # the new picks replace the old ones whole
        for slot, component in chosen.items():
            choices.choose(spec.name, slot, component)
        choices.save()
        self._explicit.discard(spec.name)
        self.refresh_components()
        log.info("Component files for %s: %s", spec.name,
                 ", ".join(f"{k}={v}" for k, v in self.chosen_components(spec.name).items()) or "the model folder's")
        return self.chosen_components(spec.name)

    # ------------------------------------------------------------------ requests
    def normalize(self, request: GenerateRequest) -> tuple[GenerateRequest, list[str]]:
        """Fill defaults, snap size/frames to valid values; returns the request and notes."""
        from wan_lite.job import resolve_job

        spec = get_spec(request.model)
        if request.image and spec.task == "t2v":  # an image with the A14B family selects I2V-A14B
            spec = get_spec("i2v-a14b")
        job = resolve_job(spec, request.prompt, negative_prompt=request.negative_prompt, image=request.image,
                          width=request.width, height=request.height, frames=request.frames, steps=request.steps,
                          guidance=request.guidance, guidance_low=request.guidance_low, shift=request.shift,
                          seed=request.seed, sampler=request.sampler)
        filled = replace(request, model=spec.name, width=job.width, height=job.height, frames=job.frames,
                         steps=job.steps, guidance=job.guidance[0], guidance_low=job.guidance[1], shift=job.shift,
                         seed=request.seed if request.seed is not None and request.seed >= 0 else None)
        if spec.name != request.model:
            job.notes.insert(0, f"An image was given, so {spec.name} is used.")
        return filled, job.notes

    def _plan(self, request: GenerateRequest, footprint=None):
        """The memory plan for `request` on this machine: for its CPU without a GPU or with device="cpu"."""
        try:
            from wan_lite.runtime.hardware import Hardware
            from wan_lite.runtime.planner import ModelFootprint, PlanRequest, plan
        except ImportError:
            return None
        spec = get_spec(request.model)
        w, h = (request.width or spec.default_size[0], request.height or spec.default_size[1])
        req = PlanRequest(w, h, request.frames or spec.frames, steps=request.steps or spec.steps,
                          image=bool(request.image) or spec.needs_image,
                          cfg=(request.guidance if request.guidance is not None else spec.guidance[0]) != 1,
                          fp8_attention=fp8_attention_opted_in())
        profile = None if request.memory_profile in (None, "", "auto") else request.memory_profile
        hw = Hardware.probe(self.models_root if self.models_root.is_dir() else ".")
        if not self._gpu():  # a run on the CPU (no GPU, or device="cpu") is planned for the CPU
            hw = hw.without_gpu()
        return plan(footprint or ModelFootprint.full_size(spec.name), req, hw, profile=profile)

    def preflight(self, request: GenerateRequest) -> Estimate:
        """What the request will use on this machine, before anything is loaded."""
        p = self._plan(request)
        if p is None:
            return Estimate(True, 0.0, 0.0, 0.0, "No memory planner in this build.")
        data = p.to_json()
        return Estimate(fits=data["fits"], peak_vram_gib=data["peak_vram_gib"], peak_ram_gib=data["peak_ram_gib"],
                        seconds=data["seconds_estimate"], summary=p.summary(), reason=data.get("reason"), plan=data)

    def pipeline(self, name: str, on_progress: ProgressCallback | None = None,
                 request: GenerateRequest | None = None, *, check_fit: bool = True):
        """The loaded pipeline for `name`, loading it (and unloading another) when needed.

        Every pipeline follows the memory plan for `request` (the model's defaults without one)
        on this machine, its GPU or its CPU alike: the plan `python -m wan_lite plan` prints.
        What is fixed at load time (weight formats) reloads when it changes; the rest is
        re-planned per request. A request that does not fit is refused before anything loads,
        unless `check_fit` is False (decoding saved latents runs only the decode stage, which
        retries in smaller tiles)."""
        from wan_lite.pipeline import WanPipeline

        folder = self.model_folder(name)
        parts = self.components.get(name, {})
        wanted = replace(request, model=name) if request is not None else GenerateRequest(prompt="", model=name)
        plan = self._plan(wanted, self._footprint(name, folder, parts))
        if request is not None and check_fit and not plan.fits:
            from wan_lite.errors import OutOfMemoryError

            raise OutOfMemoryError(f"This request does not fit this machine: {plan.reason}")
        fixed = (plan.quantization, plan.vae_dtype, plan.text_encoder_quant)
        key = (name, folder.resolve(), tuple(sorted((k, str(v)) for k, v in parts.items())), fixed)
        model_dir = folder if folder.is_dir() or not parts else None
        if self._pipe_key != key:
            self.unload()
            if on_progress:
                on_progress(Progress(stage="load", step=0, total=1, elapsed_s=0.0, message=f"Loading {name}"))
            t0 = time.perf_counter()
            self._pipe = WanPipeline.load_planned(model_dir, plan, components=parts, name=name, device=self.device,
                                                  cache_dir=self.cache_dir)
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
        from wan_lite.models.attention import set_attention_backend
        from wan_lite.runtime import attention_select

        fp8 = bool(plan is not None and plan.fp8_attention)
        if fp8 not in self._attention:
            pick = attention_select.select_fp8_attention if fp8 else attention_select.select_attention
            self._attention[fp8] = pick(self.device or "cuda")
        set_attention_backend(self._attention[fp8].backend)
        self._attention_kind = fp8

    def _gpu(self) -> bool:
        import torch

        return torch.cuda.is_available() and (self.device is None or str(self.device).startswith("cuda"))

    def _footprint(self, name: str, folder: Path, parts: dict[str, Path]):
        """Sizes of the model actually on disk (read from tensor shapes, no data)."""
        from wan_lite.loading.components import resolve_sources
        from wan_lite.models.dit import WanDiTConfig
        from wan_lite.runtime.planner import ModelFootprint

        spec = get_spec(name)
        _, sources, _ = resolve_sources(folder if folder.is_dir() or not parts else None, parts, name)
        cfg = WanDiTConfig.from_shapes(next(v for k, v in sources.items() if k.startswith("dit_")).shapes())
        if (cfg.dim, cfg.num_layers) in ((3072, 30), (5120, 40)):
            return ModelFootprint.full_size(name)
        return ModelFootprint.from_config(cfg, name=name, vae_version=spec.vae_version,
                                          experts=2 if spec.experts else 1)

    def generate(self, request: GenerateRequest, on_progress: ProgressCallback | None = None,
                 cancel: CancelToken | None = None, out_path: Path | None = None) -> GenerateResult:
        from wan_lite.output import output_stem, save_latents

        with self._lock:
            request, notes = self.normalize(request)
            if request.seed is None:  # drawn here so the file names carry the seed used
                request = replace(request, seed=random.randint(0, sys.maxsize))
            t0 = time.perf_counter()
            pipe = self.pipeline(request.model, on_progress, request)
            load_s = time.perf_counter() - t0
            stem = (out_path.with_suffix("") if out_path else
                    output_stem(self.output_dir, request.prompt, request.seed, request.model))
            stem.parent.mkdir(parents=True, exist_ok=True)
            latents_path = stem.with_name(stem.name + ".latents.safetensors")

            def keep_latents(latents, settings):
                save_latents(latents_path, latents, self._record(settings, request, pipe))

            fields = request.to_dict()
            for drop in ("model", "memory_profile"):
                fields.pop(drop)
            result = pipe.generate(**fields, on_progress=on_progress, cancel=cancel, on_latents=keep_latents)
            result.timings["load"] = load_s
            kind = self._attention_kind
            if kind in self._attention and kind not in self._attention_told:
                notes.append(self._attention[kind].note)  # which attention kernel runs, and why
                self._attention_told.add(kind)
            return self._write(stem, latents_path, result.frames, result.fps, result.settings, result.timings,
                               list(dict.fromkeys(notes + result.notes)), request, pipe, on_progress)

    def decode_latents(self, latents_path: Path, out_path: Path | None = None,
                       model_dir: Path | None = None) -> GenerateResult:
        """Decode saved latents into an mp4 again (after a failed decode, or with another VAE plan)."""
        from wan_lite.output import load_latents
        from wan_lite.pipeline import video_to_frames

        with self._lock:
            latents, meta = load_latents(Path(latents_path))
            settings = meta.get("settings") or {}
            name = settings.get("model")
            if name not in MODELS:
                raise InputError(f"{latents_path} does not say which model made it.")
            if model_dir is not None:
                self.folders[name] = Path(model_dir)
            elif meta.get("model_dir") and name not in self.folders:
                self.folders[name] = Path(meta["model_dir"])
                recorded = {k: Path(v) for k, v in (meta.get("components") or {}).items()}
                if name in self._explicit:
                    self.components.setdefault(name, recorded)
                else:  # what made these latents, not today's remembered choices
                    self.components[name] = recorded
                    self._explicit.add(name)
            request = GenerateRequest.from_dict(settings | {"model": name})
            pipe = self.pipeline(name, request=request, check_fit=False)  # planned for their own video
            t0 = time.perf_counter()
            frames = video_to_frames(pipe.decode(latents))
            timings = dict(settings.get("timings") or {})
            timings["decode"] = time.perf_counter() - t0
            stem = (out_path.with_suffix("") if out_path else
                    Path(str(latents_path).removesuffix(".latents.safetensors")))
            return self._write(stem, Path(latents_path), frames, pipe.spec.fps, settings, timings, [], request, pipe, None)

    def _record(self, settings: dict[str, Any], request: GenerateRequest, pipe) -> dict[str, Any]:
        import wan_lite

        name = pipe.spec.name
        return {"wan_lite": wan_lite.__version__, "settings": settings, "request": request.to_dict(),
                "model_dir": str(self.model_folder(name)),
                "components": {k: str(v) for k, v in self.components.get(name, {}).items()},
                "image": request.image}

    def _write(self, stem: Path, latents_path: Path, frames, fps: int, settings: dict[str, Any],
               timings: dict[str, float], notes: list[str], request: GenerateRequest, pipe,
               on_progress: ProgressCallback | None) -> GenerateResult:
        from wan_lite.output import write_json_atomic, write_mp4

        if on_progress:
            on_progress(Progress(stage="save", step=0, total=1, elapsed_s=sum(timings.values())))
        settings = dict(settings)
        settings["timings"] = {k: round(v, 3) for k, v in timings.items()}
        record = self._record(settings, request, pipe) | {"notes": notes}
        video_path = stem.with_name(stem.name + ".mp4")
        sidecar = stem.with_name(stem.name + ".json")
        write_mp4(video_path, frames, fps, record)
        record |= {"video": video_path.name, "latents": latents_path.name}
        write_json_atomic(sidecar, record)
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


def _disk_size(path: Path) -> int:
    """Bytes of a file, or of the files under a folder (0 when it is gone)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


__all__ = ["Engine", "Estimate", "FoundFile", "ModelStatus", "WanLiteError"]
