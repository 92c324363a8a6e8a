"""The small public API the UI, the CLI and scripts use: a request in, progress events and a
result out. Nothing here imports Gradio; the UI maps widgets to `GenerateRequest` fields by name.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

STAGE_TITLES = {
    "load": "Loading models",
    "text": "Text encoding",
    "denoise": "Denoising",
    "high_noise": "High-noise expert",
    "low_noise": "Low-noise expert",
    "decode": "Decoding video",
    "save": "Saving",
}


SAMPLERS = ("unipc", "dpm++", "euler")  # wan_lite.sampling's flow samplers; unipc is the official default
# Step cache settings (wan_lite.runtime.step_cache): "off" runs every DiT forward.
CACHE_MODES = ("off", "balanced", "fast")
# Below this many steps the step cache has too little to skip and stays off.
CACHE_MIN_STEPS = 10
# How the step-distilled speed LoRAs (Wan2.2-Lightning, lightx2v distill) were trained to run: 4
# steps (the expert switch stays at the model's boundary), no classifier-free guidance, shift 5,
# the Euler flow sampler.
TURBO = {"steps": 4, "guidance": 1.0, "guidance_low": 1.0, "shift": 5.0, "sampler": "euler"}
# Turbo in 3 phases, against the slow motion of the 4-step speed LoRAs (Wan2GP's published
# "Lightning 3 Phases - 8 Steps" profiles): 8 Euler steps at shift 3; while t >= 965 the
# high-noise expert runs WITHOUT the LoRAs and with guidance 3.5 (`guidance`), then the LoRAs come
# on with guidance 1 (`guidance_low`), and the experts switch at t = 800 instead of the model's
# boundary. TI2V-5B (one DiT): the same first phase, then the LoRAs at guidance 1.
TURBO_3_PHASES = {"steps": 8, "guidance": 3.5, "guidance_low": 1.0, "shift": 3.0, "sampler": "euler"}
TURBO_3_PHASES_SWITCH = (965.0, 800.0)  # (LoRAs on below, experts switch below)


@dataclass(frozen=True)
class GenerateRequest:
    """One video to make. Fields left as None take the model's defaults from the registry."""

    prompt: str
    model: str = "ti2v-5b"
    negative_prompt: str | None = None  # None or "" -> the official default negative prompt
    image: str | None = None  # path of the start image (image-to-video)
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    steps: int | None = None
    guidance: float | None = None  # TI2V: the scale; A14B: the high-noise expert's scale
    guidance_low: float | None = None  # A14B only: the low-noise expert's scale
    shift: float | None = None
    seed: int | None = None  # None or negative -> random
    sampler: str | None = None  # "unipc" (the default), "dpm++" or "euler"; Turbo runs Euler
    memory_profile: str = "auto"
    cache: str = "off"  # step cache: "off", "balanced" or "fast" (CACHE_MODES)
    # LoRAs: "FILE[:STRENGTH|:HIGH,LOW]", (FILE, STRENGTH) or (FILE, HIGH, LOW); resolved to
    # (absolute path, high-noise strength, low-noise strength). 0 leaves that expert alone.
    loras: tuple = ()
    # Turbo: run a speed (step-distilled) LoRA as it was trained: 4 steps, guidance 1, shift 5,
    # Euler, for every one of those fields left unset. None: on when the engine recognises a
    # speed LoRA among `loras` (Engine.resolve), else off.
    turbo: bool | None = None
    # 2 (or None): Turbo as the speed LoRAs were trained. 3: a first guided phase without the
    # LoRAs, against their slow motion (TURBO_3_PHASES; implies Turbo).
    turbo_phases: int | None = None
    # GPUs of this machine that run the job together (wan_lite.parallel: sequence and CFG
    # parallelism over torch.distributed, one process per GPU); 1 runs it in this process.
    gpus: int = 1
    # The user's own words, which name the output files (a composed prompt opens with the style
    # template's and the chosen terms' words); None: the prompt names them.
    title: str | None = None

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerateRequest:
        """Build from a dict, ignoring unknown keys (old history entries, UI extras)."""
        names = set(cls.field_names())
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Progress:
    """A progress event. `step`/`total` count denoising steps; other stages report 0/1 and 1/1."""

    stage: str
    step: int
    total: int
    elapsed_s: float
    eta_s: float | None = None
    message: str = ""
    preview: np.ndarray | None = None  # small uint8 [H, W, 3] image of the current latent

    @property
    def fraction(self) -> float:
        return 0.0 if self.total <= 0 else min(1.0, self.step / self.total)


@dataclass
class GenerateResult:
    video_path: Path
    sidecar_path: Path
    latents_path: Path
    fps: int
    seed: int
    width: int
    height: int
    frames: int
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


ProgressCallback = Callable[[Progress], None]


class CancelToken:
    """Set from another thread to stop a running job at the next step boundary."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()
