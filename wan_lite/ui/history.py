"""The history gallery: past results read back from the sidecar JSON files in the output folder.

The sidecar is written by wan_lite.engine next to each video ({"settings": {... "timings"},
"request": {...}, "video": "name.mp4", ...}). This reader is deliberately
tolerant about its shape: the request may sit under "request" or "settings" (or at the top level),
the video under "video" / "video_path" (relative to the sidecar, or absolute), or simply next to
the sidecar with the same name and ".mp4". Files that do not describe a video are skipped.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wan_lite.api import GenerateRequest
from wan_lite.registry import MODELS

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv")


@dataclass(frozen=True)
class HistoryEntry:
    video: Path
    sidecar: Path
    prompt: str
    seed: int | None
    settings: dict[str, Any]  # GenerateRequest fields as saved
    timings: dict[str, float] = field(default_factory=dict)
    created: float = 0.0  # modification time of the video, seconds since the epoch

    def caption(self) -> str:
        text = self.prompt if len(self.prompt) <= 60 else self.prompt[:57] + "…"
        return f"{text} (seed {self.seed})" if self.seed is not None else text


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _video_for(sidecar: Path, data: dict[str, Any], root: Path) -> Path | None:
    for key in ("video", "video_path", "output", "file"):
        value = data.get(key)
        if isinstance(value, str) and value:
            candidate = Path(value)
            if not candidate.is_absolute():
                candidate = sidecar.parent / candidate
            # Only serve what lies inside the output folder, whatever a sidecar says.
            if candidate.is_file() and _inside(candidate, root):
                return candidate
    for suffix in VIDEO_SUFFIXES:
        candidate = sidecar.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def parse_sidecar(sidecar: Path, root: Path) -> HistoryEntry | None:
    """One history entry, or None when the file is not a readable sidecar of an existing video."""
    if not sidecar.is_file():  # a folder, or a FIFO that would block the UI
        return None
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # ValueError: JSON and Unicode errors
        log.info("Skipping %s in the history: %s", sidecar, type(err).__name__)
        return None
    if not isinstance(data, dict):
        return None
    video = _video_for(sidecar, data, root)
    if video is None:
        return None
    names = set(GenerateRequest.field_names())
    settings: dict[str, Any] = {k: v for k, v in data.items() if k in names}
    for key in ("request", "settings"):
        if isinstance(data.get(key), dict):
            settings.update({k: v for k, v in data[key].items() if k in names or k in ("fps",)})
    seed = data.get("seed", settings.get("seed"))
    # wan_lite.engine keeps the timings inside "settings"; older or other writers at the top level.
    nested = data.get("settings") if isinstance(data.get("settings"), dict) else {}
    timings = next((t for t in (data.get("timings"), nested.get("timings")) if isinstance(t, dict)), {})
    prompt = settings.get("prompt") if isinstance(settings.get("prompt"), str) else ""
    return HistoryEntry(
        video=video,
        sidecar=sidecar,
        prompt=prompt or "",
        seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
        settings=settings,
        timings={k: float(v) for k, v in timings.items() if isinstance(v, (int, float))},
        created=video.stat().st_mtime,
    )


def read_history(output_dir: Path, limit: int = 60) -> list[HistoryEntry]:
    """Newest first. Looks at the output folder and one level of subfolders (e.g. per-day folders)."""
    if not output_dir.is_dir():
        return []
    sidecars = list(output_dir.glob("*.json")) + list(output_dir.glob("*/*.json"))
    entries = [e for p in sidecars if (e := parse_sidecar(p, output_dir)) is not None]
    entries.sort(key=lambda e: e.created, reverse=True)
    return entries[:limit]


def describe(entry: HistoryEntry) -> str:
    """Markdown with the prompt, seed, settings and timings of one result."""
    import html

    s = entry.settings
    rows = [f"**Prompt:** {html.escape(entry.prompt) or '(none)'}", f"**Seed:** {entry.seed}"]
    keys = ("model", "width", "height", "frames", "steps", "guidance", "guidance_low", "shift", "sampler", "cache",
            "turbo", "memory_profile")
    shown = ", ".join(f"{k} {s[k]}" for k in keys if s.get(k) is not None)
    if shown:
        rows.append(f"**Settings:** {html.escape(shown)}")
    listed = s.get("loras") if isinstance(s.get("loras"), list) else []
    loras = [x for x in listed if isinstance(x, dict) and x.get("file")]
    if loras:
        rows.append("**LoRAs:** " + html.escape(", ".join(
            f"{Path(str(x['file'])).name} ×{x.get('strength_high')}"
            + (f"/{x.get('strength_low')}" if x.get("strength_low") != x.get("strength_high") else "") for x in loras)))
    if s.get("image"):
        rows.append(f"**Start image:** {html.escape(Path(str(s['image'])).name)}")
    if entry.timings:
        total = entry.timings.get("total", sum(v for k, v in entry.timings.items() if k != "total"))
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in entry.timings.items() if k != "total")
        rows.append(f"**Timings:** {parts} (total {total:.1f} s)")
    rows.append(f"**File:** {html.escape(entry.video.name)}")
    return "\n\n".join(rows)


def delete_result(entry: HistoryEntry, root: Path) -> list[Path]:
    """Delete one result's files inside `root`: the video, its sidecar and its latents
    (NAME.latents.safetensors, wan_lite.output's name for them); returns what was deleted."""
    stem = entry.video.with_suffix("")
    targets = [entry.video, entry.sidecar, stem.with_name(stem.name + ".latents.safetensors")]
    removed = []
    for path in dict.fromkeys(targets):
        if path.is_file() and _inside(path, root):
            path.unlink()
            removed.append(path)
    return removed


# ------------------------------------------------------------------------------ saved latents
# Latents without a video: a run cut short by a crash, or cancelled or failed in the decode. The
# engine writes them (wan_lite.output.save_latents) before the decode; "Make the video" decodes them.
LATENTS_SUFFIX = ".latents.safetensors"  # as wan_lite.output names them
_MAX_HEADER = 1_000_000


def latents_record(path: Path) -> dict[str, Any] | None:
    """The record the engine keeps in a latents file's header (settings, request, model folder),
    read without the tensor; None when the file is not readable wan_lite latents."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= _MAX_HEADER:
                return None
            header = json.loads(f.read(size))
        meta = header.get("__metadata__") if isinstance(header, dict) else None
        record = json.loads(meta["wan_lite"]) if isinstance(meta, dict) and isinstance(meta.get("wan_lite"), str) else None
    except (OSError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def pending_latents(output_dir: Path, limit: int = 30, skip: tuple[str, ...] = ()) -> list[Path]:
    """Saved latents with no video made from them (NAME.mp4, or NAME.decoded*.mp4 from a later
    decode), newest first, in the output folder and one level of subfolders; `skip`: paths to
    leave out (the running job's, whose decode goes on). Each folder is listed once."""
    if not output_dir.is_dir():
        return []
    skipped = {str(Path(p)) for p in skip}
    out = []
    for folder in [output_dir, *(d for d in output_dir.iterdir() if d.is_dir())]:
        try:
            names = {e.name for e in os.scandir(folder)}
        except OSError:
            continue
        videos = {n.split(".decoded", 1)[0] if ".decoded" in n else n.rsplit(".", 1)[0]
                  for n in names if n.endswith(VIDEO_SUFFIXES)}
        for name in names:
            if not name.endswith(LATENTS_SUFFIX) or name.startswith("."):
                continue
            path = folder / name
            if name[: -len(LATENTS_SUFFIX)] not in videos and str(path) not in skipped and path.is_file():
                out.append(path)
    out.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return out[:limit]


def find_latents(output_dir: Path, request: dict[str, Any], since: float = 0.0) -> Path | None:
    """The latents the engine saved for `request` (a resolved GenerateRequest as a dict, as in the
    file's record) no earlier than `since` (seconds since the epoch), newest first; None if none."""
    if not output_dir.is_dir() or not request:
        return None
    want = json.loads(json.dumps(request))  # tuples as lists, as the record holds them
    recent = []
    for path in [*output_dir.glob("*" + LATENTS_SUFFIX), *output_dir.glob("*/*" + LATENTS_SUFFIX)]:
        try:
            mtime = path.stat().st_mtime
        except OSError:
            continue
        if mtime >= since - 2:
            recent.append((mtime, path))
    for _, path in sorted(recent, reverse=True):
        record = latents_record(path)
        if record is not None and record.get("request") == want:
            return path
    return None


def describe_latents(path: Path) -> str:
    """One line for a latents file: its prompt, model, size and seed."""
    record = latents_record(path) or {}
    s = record.get("settings") if isinstance(record.get("settings"), dict) else {}
    prompt = str(s.get("prompt") or "")
    prompt = prompt if len(prompt) <= 50 else prompt[:47] + "…"
    size = f"{s.get('width')}×{s.get('height')}, {s.get('frames')} frames" if s.get("width") else ""
    model = MODELS.get(str(s.get("model")))
    return " · ".join(x for x in (prompt or path.name, model.label if model else str(s.get("model") or ""), size,
                                  f"seed {s['seed']}" if "seed" in s else "") if x)
