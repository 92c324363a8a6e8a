"""ModelLibrary: the model files on this machine. Each model's folder (official layout), the
component files chosen to replace parts of it (remembered between runs in choices.json), the scan
that finds model files in the Hugging Face cache, ComfyUI folders and models/, and each model's
status. Only headers are read: nothing here loads a model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from wan_lite.errors import CheckpointError, InputError, WanLiteError
from wan_lite.paths import config_dir
from wan_lite.registry import MODELS, get_spec

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


def default_folder_name(name: str) -> str:
    return MODELS[name].hf_repo.split("/")[-1]


class ModelLibrary:
    """Where each model's files are: its folder under `models_root` (or one given), and the
    component files replacing parts of it, given by the caller or remembered (`components`)."""

    def __init__(self, models_root: Path, folders: dict[str, Path] | None = None,
                 components: dict[str, dict[str, Path]] | None = None) -> None:
        """folders: model name -> official-layout folder (default: models_root/<repo name>).
        components: model name -> {slot: file or folder in any format} replacing parts of the
        folder (slots "dit", "dit_high", "dit_low", "vae", "text_encoder", "tokenizer")."""
        self.models_root = Path(models_root)
        self.folders = {k: Path(v) for k, v in (folders or {}).items()}
        self.components = {k: dict(v) for k, v in (components or {}).items()}
        # Models the caller set up explicitly keep exactly that; the others get the component
        # files the user chose earlier (remembered in choices.json).
        self.explicit = set(self.folders) | set(self.components)
        self._scan: list = []  # the last discovery scan (wan_lite.loading.discovery.Found)
        self._renamed: tuple[int, dict[str, Path]] | None = None  # see _renamed_folders
        self.refresh_components()

    # ------------------------------------------------------------------ models
    def model_folder(self, name: str) -> Path:
        """The model's folder: the one given, else models_root/<repo name>, else a folder under
        models_root with another name that holds this model (Scan finds such folders too)."""
        spec = get_spec(name)
        if spec.name in self.folders:
            return self.folders[spec.name]
        default = self.models_root / default_folder_name(spec.name)
        if default.is_dir():
            return default
        return self._renamed_folders().get(spec.name, default)

    def _renamed_folders(self) -> dict[str, Path]:
        """Model name -> a folder under models_root, not named as the official repo, that holds
        that model (detected from its files, config.json and headers only). Cached until the
        models folder changes (a folder added, renamed or removed changes its mtime)."""
        from wan_lite.loading.layout import detect_spec

        try:
            stamp = self.models_root.stat().st_mtime_ns
            subs = sorted(p for p in self.models_root.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return {}
        if self._renamed is not None and self._renamed[0] == stamp:
            return self._renamed[1]
        standard = {default_folder_name(n) for n in MODELS}
        found: dict[str, Path] = {}
        for sub in subs:
            if sub.name in standard or sub.name == "loras":
                continue
            try:
                found.setdefault(detect_spec(sub).name, sub)
            except (CheckpointError, OSError, ValueError):
                continue
        self._renamed = (stamp, found)
        return found

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
            from wan_lite.loading.discovery import RememberedChoices

            choices = RememberedChoices()
            for name in MODELS:
                if name in self.explicit:
                    continue
                chosen = choices.resolve(name, self._scan)
                if chosen:
                    self.components[name] = chosen
                else:
                    self.components.pop(name, None)
        except (OSError, WanLiteError) as err:  # the engine (and the UI) must still start
            log.warning("Remembered component choices not applied: %s", err)

    def lora_files(self) -> list[Path]:
        """LoRA files (.safetensors) in models/loras and in each remembered ComfyUI folder's
        loras/ (a ComfyUI "models" folder or its root), newest first; names only, nothing read."""
        folders = [self.models_root / "loras"]
        for comfy in self.comfy_dirs():
            folders += [Path(comfy) / "loras", Path(comfy) / "models" / "loras"]
        found: dict[Path, float] = {}
        for folder in folders:
            try:
                for path in folder.rglob("*.safetensors"):
                    if path.is_file():
                        found[path.resolve()] = path.stat().st_mtime
            except OSError:  # an unreadable folder hides only its own files
                continue
        return sorted(found, key=lambda p: -found[p])

    def comfy_dirs(self) -> list[Path]:
        """The ComfyUI folders the user named (remembered)."""
        from wan_lite.loading.discovery import RememberedChoices

        return RememberedChoices().comfy_dirs

    def scan_components(self, comfy_dirs: list[str | Path] | None = None) -> list[FoundFile]:
        """Find model files in the Hugging Face cache, the ComfyUI folders and models_root.

        comfy_dirs: when given, they replace the remembered ComfyUI folders (an empty list
        forgets them); each must exist (InputError otherwise)."""
        from wan_lite.loading import discovery

        choices = discovery.RememberedChoices()
        if comfy_dirs is not None:
            choices.data["comfy_dirs"] = []
            for folder in comfy_dirs:
                choices.add_comfy_dir(Path(folder))
            choices.save()
        self._scan = discovery.scan(discovery.default_places(self.models_root, choices.comfy_dirs))
        serves: dict[int, list[tuple[str, str]]] = {}
        for name in MODELS:
            for slot, items in discovery.candidates(self._scan, name).items():
                for f in items:
                    serves.setdefault(id(f), []).append((name, slot))
        copies = {id(f): group for group in discovery.find_copies(self._scan).values() for f in group}
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
        from wan_lite.loading.discovery import RememberedChoices, slot_names
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
        choices = RememberedChoices()
        choices.data["models"].pop(spec.name, None)  # the new picks replace the old ones whole
        for slot, component in chosen.items():
            choices.choose(spec.name, slot, component)
        choices.save()
        self.explicit.discard(spec.name)
        self.refresh_components()
        log.info("Component files for %s: %s", spec.name,
                 ", ".join(f"{k}={v}" for k, v in self.chosen_components(spec.name).items()) or "the model folder's")
        return self.chosen_components(spec.name)


def _disk_size(path: Path) -> int:
    """Bytes of a file, or of the files under a folder (0 when it is gone)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0
