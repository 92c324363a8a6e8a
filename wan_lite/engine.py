"""Engine: the one object the UI and CLI drive. Finds model folders, keeps one pipeline loaded,
runs requests one at a time and writes the outputs.

(Interface fixed here; the implementation lands with the pipeline.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wan_lite.api import CancelToken, GenerateRequest, GenerateResult, ProgressCallback


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


class Engine:
    def __init__(self, models_root: Path, output_dir: Path, device: str | None = None) -> None:
        self.models_root = Path(models_root)
        self.output_dir = Path(output_dir)
        self.device = device

    def model_status(self) -> list[ModelStatus]:
        raise NotImplementedError

    def model_folder(self, name: str) -> Path:
        raise NotImplementedError

    def preflight(self, request: GenerateRequest) -> Estimate:
        raise NotImplementedError

    def normalize(self, request: GenerateRequest) -> tuple[GenerateRequest, list[str]]:
        """Fill defaults, snap size/frames to valid values; returns the request and notes."""
        raise NotImplementedError

    def generate(
        self,
        request: GenerateRequest,
        on_progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> GenerateResult:
        raise NotImplementedError

    def unload(self) -> None:
        """Free every loaded model and the GPU memory they held."""
        raise NotImplementedError
