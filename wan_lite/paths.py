"""Where wan_lite keeps the user's own files, and how every file it writes is written.

- `config_dir()`: the user's wan_lite config folder (choices.json, settings.json, presets/,
  tokenizers/); `WAN_LITE_CONFIG_DIR` overrides it (tests, portable installs).
- `output_dir()`: where videos go, the same folder for the app and the CLI (so the app's History
  lists what the CLI made); `WAN_LITE_OUTPUT_DIR` overrides it, `--output-dir` / `--out` per run.
- `cache_dir()`: the one cache folder (quantized weights, uploads); `WAN_LITE_CACHE_DIR` overrides it.
- `models_dir()`: the folder that holds the model folders (models/ next to the package, where
  launch.sh and the app's downloads put them).
- `config_path(name)`: a file or folder in it, for reading: on Windows the UI used to keep its
  files one level deeper (platformdirs' default author, `%LOCALAPPDATA%/wan_lite/wan_lite`), and
  a user's files found only there are read from there.
- `cache_dir()`: the user's wan_lite cache folder (converted weights); `WAN_LITE_CACHE_DIR`
  overrides it.
- `atomic_path` / `write_json_atomic`: a file appears whole under its name or not at all.

Standard library and platformdirs only: the UI imports this without torch.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

APP_NAME = "wan_lite"
CONFIG_DIR_ENV = "WAN_LITE_CONFIG_DIR"
OUTPUT_DIR_ENV = "WAN_LITE_OUTPUT_DIR"
CACHE_DIR_ENV = "WAN_LITE_CACHE_DIR"


def config_dir() -> Path:
    """The user's wan_lite config folder (`%LOCALAPPDATA%/wan_lite` on Windows, ~/.config/wan_lite
    on Linux); WAN_LITE_CONFIG_DIR overrides it."""
    override = os.environ.get(CONFIG_DIR_ENV)
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False))


def output_dir() -> Path:
    """Where videos go unless a run says otherwise: the user's Videos folder / wan_lite where the
    system has one, else the app's data folder / outputs; WAN_LITE_OUTPUT_DIR overrides it. The
    app and the CLI both write here, so the app's History shows every video. Nothing is created."""
    override = os.environ.get(OUTPUT_DIR_ENV)
    if override:
        return Path(override).expanduser()
    import platformdirs

    videos = platformdirs.user_videos_path()
    if videos.is_dir() and videos != Path.home():
        return videos / APP_NAME
    return platformdirs.user_data_path(APP_NAME) / "outputs"


def cache_dir() -> Path:
    """The one wan_lite cache folder (~/.cache/wan_lite on Linux, %LOCALAPPDATA%/wan_lite/Cache on
    Windows): converted and quantized weights in `weights/`, the app's uploads in `uploads/`. Everything in it
    can be deleted (it is made again when needed); WAN_LITE_CACHE_DIR overrides it."""
    override = os.environ.get(CACHE_DIR_ENV)
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def models_dir() -> Path:
    """The folder that holds the model folders: models/ in the wan_lite folder (next to app.py),
    where the app's downloads and launch.sh put them, wherever the command is run from."""
    return Path(__file__).resolve().parents[1] / "models"


def weights_cache_dir() -> Path:
    """Where converted and quantized model weights are cached: `cache_dir() / "weights"`."""
    return cache_dir() / "weights"


def _older_config_dirs() -> list[Path]:
    """Config folders earlier versions used, where they differ from `config_dir()` (Windows only:
    the UI asked platformdirs without `appauthor=False`, which nests the app folder in an author
    folder of the same name)."""
    if os.environ.get(CONFIG_DIR_ENV):
        return []
    import platformdirs

    older = Path(platformdirs.user_config_dir(APP_NAME))
    return [older] if older != config_dir() else []


def config_path(name: str) -> Path:
    """`config_dir() / name`, unless only an earlier version's config folder has `name`: then that
    one, so the user's settings and presets are still found. Write new files to `config_dir()`."""
    path = config_dir() / name
    if not path.exists():
        for folder in _older_config_dirs():
            if (folder / name).exists():
                return folder / name
    return path


# ----------------------------------------------------------------------------------------------
# Atomic writes


PARTIAL_SUFFIX = ".partial"
STALE_PARTIAL_S = 6 * 3600  # a partial this old is never being written: a decode streams frames for minutes


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success move it onto `path`, on error delete it.

    The temporary name is hidden and does not end in the target's suffix, so galleries that list
    `*.mp4` never show a half-written video. It carries the writer's process id: partials that a
    killed process left (SIGKILL, a power cut) are deleted at the next write into the folder.
    With `overwrite=False` an existing `path` is never replaced: FileExistsError, also when
    another process made it while this one was writing (the move is a hard link, which fails on
    an existing name).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(target.parent)
    if not overwrite and target.exists():
        raise FileExistsError(errno.EEXIST, "File exists", str(target))
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}{PARTIAL_SUFFIX}")
    try:
        yield tmp
        if not tmp.is_file():
            raise OSError(f"writing {target.name} produced no file")
        with open(tmp, "r+b") as f:  # flush to disk before the rename makes it visible (r+: Windows)
            os.fsync(f.fileno())
        _plain_mode(tmp)
        if overwrite:
            os.replace(tmp, target)
        else:
            _move_exclusive(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _plain_mode(path: Path) -> None:
    """Give `path` the permissions a plainly created file gets (0644 under the usual umask 022):
    writers that go through a private temporary file (safetensors' save_file: 0600) would
    otherwise leave one of a result's files readable by its owner only."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """This process's umask, read without changing it (Linux: /proc), else set and restored."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _move_exclusive(tmp: Path, target: Path) -> None:
    """Give `tmp` the name `target` unless that name exists (FileExistsError)."""
    try:
        os.link(tmp, target)  # atomic and refuses an existing name
    except FileExistsError:
        raise
    except OSError:  # no hard links here (FAT, some network shares): check, then rename
        if target.exists():
            raise FileExistsError(errno.EEXIST, "File exists", str(target)) from None
        os.replace(tmp, target)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return True  # no cheap check: the age decides
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's process
        return True
    return True


def clean_stale_partials(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the hidden partial files in `folder` that no running writer owns (its process is
    gone, or the file is older than STALE_PARTIAL_S); returns what was deleted."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        name = entry.name
        if not (name.startswith(".") and name.endswith(PARTIAL_SUFFIX)):
            continue
        owner = name[:-len(PARTIAL_SUFFIX)].rsplit(".", 1)[-1].split("-", 1)[0]
        try:
            old = now - entry.stat().st_mtime > STALE_PARTIAL_S
            if old or (owner.isdigit() and not _pid_alive(int(owner))):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def _json_default(obj: Any) -> Any:
    """JSON for the few non-JSON types settings carry: paths, sets, and numpy scalars, arrays or
    torch tensors of one value (their `item()`; without importing either library)."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    item = getattr(obj, "item", None)
    if callable(item):
        with contextlib.suppress(ValueError, RuntimeError):  # more than one value: numpy, torch
            return item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def json_text(obj: Any, indent: int | None = None) -> str:
    """`obj` as JSON with non-ASCII kept readable (Chinese prompts stay legible)."""
    return json.dumps(obj, ensure_ascii=False, indent=indent, default=_json_default)


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, overwrite: bool = True) -> Path:
    """Write `obj` as UTF-8 JSON (indented, non-ASCII kept readable) atomically; returns the path.
    `overwrite=False`: an existing file is kept (FileExistsError)."""
    text = json_text(obj, indent=2) + "\n"
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
