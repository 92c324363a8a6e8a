"""Find the Wan 2.2 model files already on this machine and remember which ones the user chose.

Scanned places: the Hugging Face cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
~/.cache/huggingface/hub), ComfyUI `models/` folders the user names, and wan_lite's own models/
folder. Only headers are read (a few KB per file), so scanning 100+ GB of checkpoints takes
seconds. Files are identified by size, header and samples of their data (`fingerprint`), so a
renamed or moved copy is recognised and nothing needs downloading twice, while two files that
share a header (the high- and low-noise experts of one release) never pass for each other; a full
`content_hash` is computed only on request.

The user's choices (`RememberedChoices`: which file fills which slot of which model, and the
ComfyUI folders to scan) are kept in `choices.json` in the user's config folder
(`wan_lite.paths.config_dir`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from wan_lite.errors import CheckpointError, InputError
from wan_lite.loading.formats import WEIGHT_SUFFIXES, Component, detect, detect_folder
from wan_lite.paths import config_dir, write_json_atomic
from wan_lite.registry import MODELS

log = logging.getLogger(__name__)

# ComfyUI sub-folders that can hold Wan files (unet/ and clip/ are the older names).
COMFY_SUBDIRS = ("diffusion_models", "unet", "vae", "text_encoders", "clip", "loras")
_SKIP_DIRS = {".git", "blobs", ".locks", "__pycache__", "refs", ".cache"}


@dataclass(frozen=True)
class Found:
    """A component found by a scan: where it was found ("hf-cache", "comfyui", "wan_lite",
    "user") and, in the HF cache, which repository it came from."""

    component: Component
    location: str
    repo: str | None = None

    def describe(self) -> str:
        where = f"{self.location}:{self.repo}" if self.repo else self.location
        return f"{self.component.describe()} ({where})"


# --------------------------------------------------------------------------------------------
# Identity


SAMPLE = 2**20  # bytes of data read at the start and at the end of a safetensors file


def _header_bytes(path: Path, data: bool = True) -> bytes:
    """The bytes that tell files apart cheaply: the safetensors JSON header and (`data`) the first
    and last MiB of its tensor data, since two experts of one release have the same header; the
    start of a GGUF file (metadata, tensor table and data); the first and last MiB of other files
    (a .pth zip keeps its pickle and the first tensors at the front, its directory at the end)."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        if path.suffix == ".safetensors":
            head = fh.read(8)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
            header = head + fh.read(min(n, 100_000_000))
            if not data:
                return header
            first = fh.read(SAMPLE)
            fh.seek(max(fh.tell(), size - SAMPLE))
            return header + first + fh.read(SAMPLE)
        if path.suffix == ".gguf":
            return fh.read(16 * 2**20)
        first = fh.read(2**20)
        fh.seek(max(0, size - 2**20))
        return first + fh.read(2**20)


def fingerprint(files: Iterable[Path], data: bool = True) -> str:
    """A hash of the sizes, headers and data samples of `files`: equal for copies, different for
    other files, including files with the same header. `data=False`: the header-only hash that
    choices.json held before, still accepted for a file at its remembered place."""
    h = hashlib.sha256()
    for f in files:
        f = Path(f)
        h.update(struct.pack("<Q", f.stat().st_size))
        h.update(_header_bytes(f, data))
    return h.hexdigest()[:24]


def _stat_key(files: Iterable[Path]) -> list[list[int]]:
    """[size, mtime in ns, inode] per file: a remembered file at its place with these unchanged
    is taken without reading it (two files swapped by renaming keep their own inodes)."""
    return [[st.st_size, st.st_mtime_ns, st.st_ino] for st in (Path(f).stat() for f in files)]


def content_hash(path: Path, chunk: int = 16 * 2**20) -> str:
    """sha256 of the whole file. Reads every byte: only on request."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Places


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def default_places(models_dir: Path | None = None, comfy_dirs: Iterable[Path] = ()) -> list[tuple[str, Path]]:
    """(location, folder) pairs to scan: the HF cache, the ComfyUI folders, wan_lite's models/."""
    places = [("hf-cache", hf_cache_dir())]
    places += [("comfyui", Path(p).expanduser()) for p in comfy_dirs]
    if models_dir is not None:
        places.append(("wan_lite", Path(models_dir)))
    return [(loc, p) for loc, p in places if p.is_dir()]


def _repo_of(path: Path, cache: Path) -> str | None:
    """`models--Org--Name/snapshots/<rev>/...` -> "Org/Name"."""
    try:
        top = path.relative_to(cache).parts[0]
    except (ValueError, IndexError):
        return None
    return top.split("--", 1)[1].replace("--", "/") if top.startswith("models--") else None


def _folders(root: Path, max_depth: int) -> Iterable[Path]:
    """`root` and its sub-folders down to `max_depth`, skipping caches and git internals.

    Directory symlinks are followed (the HF cache and ComfyUI setups use them), but never into a
    folder already visited (by its real path): symlink loops cost one visit per real folder
    instead of growing as (links)^depth. Folders that cannot be listed are skipped.
    """
    visited: set[str] = set()
    for dirpath, dirnames, _files in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        depth = len(Path(dirpath).relative_to(root).parts)
        keep = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        dirnames[:] = [] if depth >= max_depth else sorted(
            d for d in keep if os.path.realpath(os.path.join(dirpath, d)) not in visited)
        yield Path(dirpath)


def _has_weights(folder: Path) -> bool:
    try:
        return any(f.suffix in WEIGHT_SUFFIXES or f.name == "spiece.model" for f in folder.iterdir())
    except OSError as err:  # a folder this user may not list hides only its own files
        log.warning("Model scan: skipping %s (%s)", folder, err.strerror or err)
        return False


def _broken(path: Path, err: Exception) -> Component:
    return Component(path, (path,), "?", "broken", problem=f"{path} cannot be read ({err}).")


def _scan_folder(folder: Path) -> list[Component]:
    """The components in one folder; a folder that cannot be read comes back as one "broken"
    component instead of stopping the scan of every other folder."""
    try:
        return detect_folder(folder)
    except (CheckpointError, OSError) as err:
        return [_broken(folder, err)]


def _with_fingerprint(c: Component) -> Component:
    if c.role == "broken":
        return c
    try:
        return replace(c, fingerprint=fingerprint(c.files))
    except OSError as err:
        return replace(c, role="broken", problem=f"{c.path} cannot be read ({err.strerror or err}).")


def scan(places: Iterable[tuple[str, Path]], max_depth: int = 6) -> list[Found]:
    """Every component in `places`, each file once (copies reached by symlinks are merged).

    Unreadable files are listed too (role "broken", with the reason), so a truncated download
    shows up instead of silently missing; one bad file never stops the scan of the others.
    """
    places = list(places)
    found: list[Found] = []
    seen: set[Path] = set()
    cache = hf_cache_dir()
    for location, root in places:
        for folder in _folders(Path(root), max_depth):
            if not _has_weights(folder):
                continue
            for c in _scan_folder(folder):
                key = tuple(sorted(Path(os.path.realpath(f)) for f in c.files))
                if any(k in seen for k in key):
                    continue
                seen.update(key)
                c = _with_fingerprint(c)
                repo = _repo_of(folder, cache) if location == "hf-cache" else None
                found.append(Found(c, location, repo))
    log.info("Model scan: %d component(s) in %d place(s)", len(found), len(places))
    return found


def candidates(found: Iterable[Found], model: str) -> dict[str, list[Found]]:
    """Usable components per slot of `model` (`ModelSpec.slots`): "dit", or one slot per expert
    ("dit_high" / "dit_low"; an expert of unknown side is offered for each), "vae",
    "text_encoder", "tokenizer"."""
    spec = MODELS[model]
    slots: dict[str, list[Found]] = {s: [] for s in spec.slots}
    for f in found:
        c = f.component
        if model not in c.models or not c.usable:
            continue
        if c.role == "dit":
            for part in spec.dits:
                if not spec.experts or c.expert in (part.role, None):
                    slots[part.slot].append(f)
        elif c.role in slots:
            slots[c.role].append(f)
        if c.has_tokenizer:
            slots["tokenizer"].append(f)
    return slots


def slot_names(model: str) -> tuple[str, ...]:
    return MODELS[model].slots


def find_copies(found: Iterable[Found]) -> dict[str, list[Found]]:
    """Components present more than once (same fingerprint), e.g. in the HF cache and in ComfyUI."""
    groups: dict[str, list[Found]] = {}
    for f in found:
        if f.component.fingerprint:
            groups.setdefault(f.component.fingerprint, []).append(f)
    return {k: v for k, v in groups.items() if len(v) > 1}


# --------------------------------------------------------------------------------------------
# Remembered choices


class RememberedChoices:
    """The user's component choices per model and the ComfyUI folders to scan, kept as JSON:

        {"comfy_dirs": ["/data/ComfyUI/models"],
         "models": {"t2v-a14b": {"dit_high": {"path": "...", "fingerprint": "..."}, ...}}}

    A remembered file that moved is found again by its fingerprint (`resolve`).
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else config_dir() / "choices.json"
        self.data: dict = {"comfy_dirs": [], "models": {}}
        if self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
            except (ValueError, OSError, RecursionError) as err:
                log.warning("Ignoring unreadable %s (%s); starting with no remembered choices.",
                            self.path, type(err).__name__ if isinstance(err, RecursionError) else err)
            else:
                self.data.update(_repaired(loaded, self.path))

    def save(self) -> None:
        write_json_atomic(self.path, self.data)

    @property
    def comfy_dirs(self) -> list[Path]:
        return [Path(p) for p in self.data.get("comfy_dirs", [])]

    def add_comfy_dir(self, folder: Path) -> None:
        folder = Path(folder).expanduser().resolve()
        if not folder.is_dir():
            raise InputError(f"ComfyUI folder not found: {folder}", "Name the ComfyUI 'models' folder.")
        if str(folder) not in self.data["comfy_dirs"]:
            self.data["comfy_dirs"].append(str(folder))

    def choose(self, model: str, slot: str, component: Component) -> None:
        """Remember `component` for `slot` of `model` (slots: see `slot_names`)."""
        if slot not in slot_names(model):
            raise InputError(f"{model} has no slot {slot!r}.",
                             f"Choose one of: {', '.join(slot_names(model))}.")
        fp = component.fingerprint or fingerprint(component.files)
        entry = {"path": str(component.path), "fingerprint": fp, "files": [str(f) for f in component.files]}
        try:
            entry["stat"] = _stat_key(component.files)
        except OSError:
            pass
        self.data["models"].setdefault(model, {})[slot] = entry

    def chosen(self, model: str) -> dict[str, Path]:
        """The remembered path per slot of `model` (as stored; see `resolve` for moved files)."""
        return {slot: Path(e["path"]) for slot, e in self.data["models"].get(model, {}).items()}

    def resolve(self, model: str, found: Iterable[Found] = ()) -> dict[str, Path]:
        """Remembered paths that still hold the remembered file (same path, size and mtime, or
        the same fingerprint); a file that moved is looked up by fingerprint among `found`.
        Slots whose file is gone are left out (the user is asked again), and so are slots that
        would end up on one file although different files were remembered for them: a file
        never fills a slot that was not chosen for it."""
        by_fp: dict[str, list[Path]] = {}
        for f in found:
            paths = by_fp.setdefault(f.component.fingerprint, [])
            if f.component.fingerprint and f.component.path not in paths:
                paths.append(f.component.path)
        entries = self.data["models"].get(model, {})
        out: dict[str, Path] = {}
        for slot, entry in entries.items():
            path = Path(entry["path"])
            fp = entry.get("fingerprint")
            if path.exists() and (_unchanged(entry) or _same(path, fp)):
                out[slot] = path
            elif fp and by_fp.get(fp):
                out[slot] = by_fp[fp][0]  # several: copies of one file (size, header and data agree)
                log.info("%s %s: remembered file moved to %s", model, slot, out[slot])
        remembered = {slot: Path(e["path"]) for slot, e in entries.items()}
        for slot in list(out):
            clash = [s for s in out if s != slot and out[s] == out[slot] and remembered[s] != remembered[slot]]
            if clash:
                log.warning("%s: %s and %s would both use %s; choose their files again.", model, slot,
                            ", ".join(clash), out[slot])
                for s in (slot, *clash):
                    out.pop(s, None)
        return out


def _repaired(loaded: object, path: Path) -> dict:
    """The parts of a loaded choices.json that have the right shape (see `RememberedChoices`);
    each part dropped is named in a log warning, so a hand-edited or damaged file never stops
    the CLI or the app from starting."""
    if not isinstance(loaded, dict):
        _warn_once("Ignoring %s: it is a JSON %s, not an object.", path, type(loaded).__name__)
        return {}
    out = dict(loaded)
    dirs = loaded.get("comfy_dirs", [])
    if not isinstance(dirs, list) or not all(isinstance(d, str) for d in dirs):
        _warn_once("Ignoring the comfy_dirs of %s: not a list of folder names.", path)
        out["comfy_dirs"] = [d for d in dirs if isinstance(d, str)] if isinstance(dirs, list) else []
    models = loaded.get("models", {})
    if not isinstance(models, dict):
        _warn_once("Ignoring the remembered models of %s: not an object.", path)
        models = {}
    kept: dict = {}
    for model, slots in models.items():
        good = {slot: e for slot, e in slots.items() if _entry_ok(e)} if isinstance(slots, dict) else {}
        if not isinstance(slots, dict) or len(good) != len(slots):
            _warn_once("Ignoring damaged entries for %s in %s.", model, path)
        if good:
            kept[model] = good
    out["models"] = kept
    return out


_WARNED: set[str] = set()


def _warn_once(message: str, *args: object) -> None:
    """A warning about choices.json, once per process: the file is read at every refresh."""
    text = message % args
    if text not in _WARNED:
        _WARNED.add(text)
        log.warning(text)


def _entry_ok(entry: object) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("path"), str) and bool(entry["path"])
            and isinstance(entry.get("fingerprint"), (str, type(None))))


def _unchanged(entry: dict) -> bool:
    """The remembered files are where they were with the size and mtime they had."""
    files, stat = entry.get("files"), entry.get("stat")
    if not isinstance(files, list) or not isinstance(stat, list) or len(files) != len(stat) or not files:
        return False
    try:
        return _stat_key(files) == stat
    except (OSError, TypeError):
        return False


def _same(path: Path, fp: str | None) -> bool:
    if fp is None:
        return True
    try:
        comps = detect(path)
    except Exception:  # a file that cannot be read is not the remembered one
        return False
    # The header-only fingerprint of older choices.json files still identifies a file at its place.
    return any(c.role != "broken" and fp in (fingerprint(c.files), fingerprint(c.files, data=False)) for c in comps)
