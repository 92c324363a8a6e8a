"""A scripted stand-in for wan_lite.engine.Engine, for UI tests only.

It follows the Engine interface exactly (model_status, model_folder, preflight, resolve,
generate, unload) and produces real files (an H.264 mp4 and a sidecar JSON) so the page can be
exercised end to end before the real engine exists. It does no model math at all: the UI is what
is under test here. The real-engine variant of the browser test uses wan_lite.engine.Engine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import imageio.v2 as imageio
import numpy as np

from wan_lite.api import CancelToken, GenerateRequest, GenerateResult, Progress, ProgressCallback
from wan_lite.engine import Engine, Estimate, ModelStatus
from wan_lite.errors import Cancelled, InputError
from wan_lite.job import Job
from wan_lite.registry import MODELS, get_spec


class FakeEngine(Engine):
    """`step_s`: seconds per denoising step (so a test can cancel mid-run)."""

    def __init__(self, models_root: Path, output_dir: Path, step_s: float = 0.05, max_steps: int | None = None) -> None:
        super().__init__(models_root, output_dir)
        self.step_s = step_s
        self.max_steps = max_steps
        self.requests: list[GenerateRequest] = []
        self.cancelled_at: int | None = None

    def model_folder(self, name: str) -> Path:
        return self.models_root / get_spec(name).hf_repo.split("/")[-1]

    def model_status(self) -> list[ModelStatus]:
        out = []
        for spec in MODELS.values():
            folder = self.model_folder(spec.name)
            files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
            missing = [] if files else [f"{spec.vae_file}: not found"]
            state = "installed" if files else "missing"
            out.append(ModelStatus(spec.name, spec.title, spec.hf_repo, folder, state,
                                   sum(p.stat().st_size for p in files), missing,
                                   components=self.chosen_components(spec.name)))
        return out

    def preflight(self, request: GenerateRequest) -> Estimate:
        spec = get_spec(request.model)
        pixels = (request.width or spec.default_size[0]) * (request.height or spec.default_size[1])
        frames = request.frames or spec.frames
        vram = 2.0 + pixels * frames / 1e8
        return Estimate(fits=vram < 24, peak_vram_gib=vram, peak_ram_gib=12.0,
                        seconds=(request.steps or spec.steps) * 3.0, summary=f"fake plan for {spec.name}",
                        reason=None if vram < 24 else "Too big for the fake 24 GiB GPU: choose a smaller size.")

    def generate(self, request: GenerateRequest | Job, on_progress: ProgressCallback | None = None,
                 cancel: CancelToken | None = None) -> GenerateResult:
        job = self.resolve(request)  # the real, model-free resolution
        request, notes = job.request, job.notes
        self.requests.append(request)
        if "FAIL" in request.prompt:
            raise InputError("The fake engine was asked to fail.", "Remove FAIL from the prompt.")
        spec = get_spec(request.model)
        report = on_progress or (lambda p: None)
        t0 = time.monotonic()
        report(Progress("text", 0, 1, 0.0, message="encoding the prompt"))
        steps = min(request.steps, self.max_steps or request.steps)
        stages = ["high_noise", "low_noise"] if spec.experts else ["denoise"]
        for i in range(steps):
            if cancel is not None and cancel.cancelled:
                self.cancelled_at = i
                raise Cancelled()
            time.sleep(self.step_s)
            stage = stages[0] if i < steps // 2 or len(stages) == 1 else stages[1]
            elapsed = time.monotonic() - t0
            preview = None
            if i % 2 == 0:  # a tiny RGB picture, as the real latent preview would be
                preview = np.full((36, 64, 3), (40 + 200 * i // max(1, steps), 80, 160), dtype=np.uint8)
            report(Progress(stage, i + 1, steps, elapsed, eta_s=elapsed / (i + 1) * (steps - i - 1), preview=preview))
        report(Progress("decode", 0, 1, time.monotonic() - t0))
        stem = f"wan_{spec.name}_{request.seed}_{int(time.time() * 1000)}"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        video = self.output_dir / f"{stem}.mp4"
        w, h, n = 160, 96, 9
        frames = [np.full((h, w, 3), (20 * k, 100, 255 - 20 * k), dtype=np.uint8) for k in range(n)]
        imageio.mimwrite(video, frames, fps=spec.fps, codec="libx264", quality=8, macro_block_size=16)
        timings = {"text": 0.1, "denoise": time.monotonic() - t0, "decode": 0.1}
        sidecar = video.with_suffix(".json")
        sidecar.write_text(json.dumps({"request": request.to_dict(), "seed": request.seed, "timings": timings,
                                       "video": video.name, "fps": spec.fps}), encoding="utf-8")
        report(Progress("save", 1, 1, time.monotonic() - t0))
        return GenerateResult(video, sidecar, video.with_suffix(".latents.pt"), spec.fps, request.seed,
                              request.width, request.height, request.frames, timings, request.to_dict(), notes)

    def unload(self) -> None:
        pass
