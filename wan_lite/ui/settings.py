"""UI settings: where things live, the Quality / Fast / Draft modes, valid sizes and frame counts,
and the last-used settings remembered between runs (a JSON file in the user's config folder).

Nothing here imports Gradio; the values are plain dicts keyed by widget name, which are the
`GenerateRequest` field names plus a few UI-only extras (see `SETTINGS_SCHEMA`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wan_lite.paths import cache_dir, config_dir, config_path, output_dir, write_json_atomic
from wan_lite.registry import MODELS, ModelSpec
from wan_lite.sizing import read_size, snap_frames

log = logging.getLogger(__name__)

MIN_FRAMES = 5


def default_output_dir() -> Path:
    """Where videos go: the same folder as the CLI's (`wan_lite.paths.output_dir`)."""
    return output_dir()


def default_upload_dir() -> Path:
    return cache_dir() / "uploads"


# ---------------------------------------------------------------------------------------------
# Sizes and frames


def size_value(width: int, height: int) -> str:
    return f"{width}x{height}"


def parse_size(value: str) -> tuple[int, int]:
    """"1280x704" -> (1280, 704). Raises InputError for anything else."""
    from wan_lite.errors import InputError

    size = read_size(value) if isinstance(value, str) else None
    if size is None:
        raise InputError(f"Size {value!r} is not of the form WIDTHxHEIGHT.", "Pick a size from the list.")
    w, h = size
    if w <= 0 or h <= 0:
        raise InputError(f"Size {value!r} must be positive.", "Pick a size from the list.")
    return w, h


def draft_size(spec: ModelSpec, portrait: bool = False) -> tuple[int, int]:
    """The smallest size offered (`spec.draft_size`: 480p for A14B, trained there; about 360p for
    TI2V-5B, a quick look only)."""
    w, h = spec.draft_size
    return (min(w, h), max(w, h)) if portrait else (max(w, h), min(w, h))


def size_choices(spec: ModelSpec) -> list[tuple[str, str]]:
    """(label, value) pairs: the trained sizes first, then the draft sizes if they differ."""
    out: list[tuple[str, str]] = []
    for w, h in spec.sizes:
        out.append((f"{w}×{h} ({'portrait' if h > w else 'landscape'})", size_value(w, h)))
    for portrait in (False, True):
        w, h = draft_size(spec, portrait)
        if (w, h) not in spec.sizes:
            out.append((f"{w}×{h} (draft, lower quality)", size_value(w, h)))
    return out


def snap_size(width: int, height: int, spec: ModelSpec) -> tuple[int, int]:
    """Round each side to the nearest multiple the model accepts (VAE stride x patch), at least one."""
    m = spec.size_multiple
    return max(m, round(width / m) * m), max(m, round(height / m) * m)


def max_frames(spec: ModelSpec) -> int:
    """About ten seconds; longer clips leave the trained range and need much more memory."""
    return 2 * spec.frames - 1


def offered_frames(frames: float, spec: ModelSpec) -> int:
    """`sizing.snap_frames` within what the UI offers: [MIN_FRAMES, max_frames(spec)]."""
    return snap_frames(frames, MIN_FRAMES, max_frames(spec))


def seconds_for_frames(frames: int, fps: int) -> float:
    """121 frames at 24 fps and 81 at 16 fps are the official "5 second" clips."""
    return (frames - 1) / fps


def frames_for_seconds(seconds: float, spec: ModelSpec) -> int:
    return offered_frames(seconds * spec.fps + 1, spec)


# ---------------------------------------------------------------------------------------------
# Quality / Fast / Draft


@dataclass(frozen=True)
class Mode:
    key: str
    title: str
    description: str
    steps_factor: float  # times the official step count
    min_steps: int
    size: str  # "default" (keep the trained size) or "draft"
    seconds: float | None  # None: the official clip length


MODES: dict[str, Mode] = {
    m.key: m
    for m in (
        Mode("quality", "Quality", "The official settings: all steps, trained size, 5 seconds.", 1.0, 1, "default", None),
        Mode("fast", "Fast", "Half the steps: about twice as fast, a little less detail.", 0.5, 8, "default", None),
        Mode("draft", "Draft", "Small, short and few steps: a quick look at motion and framing.", 0.0, 12, "draft", 2.0),
    )
}
DEFAULT_MODE = "quality"


def mode_values(mode: str, spec: ModelSpec, portrait: bool = False) -> dict[str, Any]:
    """The widget values a mode sets for a model: size, frames, steps, guidance, guidance_low, shift."""
    m = MODES.get(mode, MODES[DEFAULT_MODE])
    if m.size == "draft":
        width, height = draft_size(spec, portrait)
    else:
        width, height = spec.sizes[0]
        if portrait != (height > width):
            width, height = height, width
    return {
        "size": size_value(width, height),
        "frames": spec.frames if m.seconds is None else frames_for_seconds(m.seconds, spec),
        "steps": max(m.min_steps, round(spec.steps * m.steps_factor)),
        "guidance": spec.guidance[0],
        "guidance_low": spec.guidance[1],
        "shift": spec.shift,
    }


def infer_mode(spec: ModelSpec, size: str | None, frames: int | None, steps: int | None) -> str | None:
    """The mode whose values these are (so a reused result shows the right mode), else None."""
    portrait = False
    if size:
        w, h = parse_size(size)
        portrait = h > w
    for key in MODES:
        v = mode_values(key, spec, portrait)
        if (size in (None, v["size"])) and frames in (None, v["frames"]) and steps in (None, v["steps"]):
            return key
    return None


def quality_notes(spec: ModelSpec, width: int, height: int, steps: int, frames: int) -> list[str]:
    """Gentle warnings for settings known to give poor results (the models' quirks)."""
    notes = []
    if spec.quality_floor is not None:
        area, min_steps = spec.quality_floor
        if width * height < area:
            w, h = spec.default_size
            notes.append(f"{spec.label} looks much worse below its trained size; use {w}×{h} for the final video.")
        if steps < min_steps:
            notes.append(f"{spec.label} needs about {min_steps}–{spec.steps} steps for clean detail; "
                         "fewer steps are fine for a draft.")
    if frames > spec.frames:
        notes.append(f"More than {spec.frames} frames is beyond what {spec.short_title} was trained on.")
    return notes


# ---------------------------------------------------------------------------------------------
# Last-used settings

# Name -> accepted types. Names are GenerateRequest fields, except the UI extras below
# (size is split into width/height, user_prompt is the text before the composer, etc.).
SETTINGS_SCHEMA: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "user_prompt": (str,),
    "negative_prompt": (str,),
    "size": (str,),
    "frames": (int,),
    "steps": (int,),
    "guidance": (int, float),
    "guidance_low": (int, float),
    "shift": (int, float),
    "seed": (int,),
    "sampler": (str,),
    "cache": (str,),
    "turbo": (bool,),
    "turbo_phases": (bool,),
    "loras": (list,),
    "loras_by_model": (dict,),
    "memory_profile": (str,),
    "gpus": (int,),
    "mode": (str, type(None)),  # None: the settings are no mode's (after "Reuse these settings")
    "terms": (list,),
    "style": (str, type(None)),
    "language": (str,),
}


def clean_settings(data: Any) -> dict[str, Any]:
    """Keep only known names with values of the right type (an old or hand-edited file may have others)."""
    if not isinstance(data, dict):
        return {}
    out: dict[str, Any] = {}
    for name, types in SETTINGS_SCHEMA.items():
        if name not in data:
            continue
        value = data[name]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):  # True is no int
            log.warning("Ignoring saved setting %s=%r (expected %s)", name, value, "/".join(t.__name__ for t in types))
            continue
        if name == "terms":
            value = [v for v in value if isinstance(v, str)]
        if name == "loras_by_model":
            value = {k: v for k, v in value.items() if k in MODELS and isinstance(v, list)}
        if name == "model" and value not in MODELS:
            continue
        out[name] = value
    return out


class SettingsStore:
    """Last-used settings in one JSON file. A corrupt file is set aside (renamed) and ignored.

    By default they are saved in the config folder and read from there, or from where an earlier
    version kept them until they are first saved (`wan_lite.paths.config_path`)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else config_dir() / "settings.json"
        self.source = path if path is not None else config_path("settings.json")

    def load(self) -> dict[str, Any]:
        if not self.source.is_file():
            return {}
        try:
            data = json.loads(self.source.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            aside = self.source.with_name(f"{self.source.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
            log.warning("Settings file %s is unreadable (%s); starting with defaults, kept it as %s", self.source, err, aside)
            try:
                os.replace(self.source, aside)
            except OSError:
                pass
            return {}
        return clean_settings(data)

    def save(self, values: dict[str, Any]) -> None:
        """Remember `values` for the next start; with a "final_prompt" (the composed prompt sent
        to the model), also how it was composed, for "Reuse these settings" (`composition`)."""
        data = {"version": 1, **clean_settings(values)}
        try:
            write_json_atomic(self.path, data)
            self.source = self.path
        except OSError as err:  # a read-only config folder must not break generation
            log.warning("Could not save settings to %s: %s", self.path, err)
        final = values.get("final_prompt")
        if isinstance(final, str) and final.strip():
            self.remember_composition(final, data)

    # How each final prompt was composed (prompt box, terms, style, language, mode): a result's
    # sidecar holds only the final prompt, and reusing it should give back the parts, not flatten them.
    COMPOSITION_KEYS = ("user_prompt", "terms", "style", "language", "mode")
    MAX_COMPOSITIONS = 500

    @property
    def compositions_path(self) -> Path:
        return self.path.with_name("compositions.json")

    def _compositions(self) -> dict[str, Any]:
        try:
            data = json.loads(self.compositions_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def remember_composition(self, final_prompt: str, values: dict[str, Any]) -> None:
        data = self._compositions()
        data.pop(final_prompt, None)  # newest last
        data[final_prompt] = {k: values[k] for k in self.COMPOSITION_KEYS if k in values}
        while len(data) > self.MAX_COMPOSITIONS:
            data.pop(next(iter(data)))
        try:
            write_json_atomic(self.compositions_path, data)
        except OSError as err:
            log.warning("Could not save %s: %s", self.compositions_path, err)

    def composition(self, final_prompt: str) -> dict[str, Any] | None:
        """How `final_prompt` was composed (its parts, cleaned like the settings), or None."""
        parts = self._compositions().get(final_prompt)
        return clean_settings(parts) if isinstance(parts, dict) else None
