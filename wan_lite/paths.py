"""Where wan_lite keeps the user's own files, and how every file it writes is written.

- `config_dir()`: the user's wan_lite config folder (choices.json, settings.json, presets/,
  tokenizers/); `WAN_LITE_CONFIG_DIR` overrides it (tests, portable installs).
- `config_path(name)`: a file or folder in it, for reading: on Windows the UI used to keep its
  files one level deeper (platformdirs' default author, `%LOCALAPPDATA%/wan_lite/wan_lite`), and
  a user's files found only there are read from there.
- `atomic_path` / `write_json_atomic`: a file appears whole under its name or not at all.

Standard library and platformdirs only: the UI imports this without torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

APP_NAME = "wan_lite"
CONFIG_DIR_ENV = "WAN_LITE_CONFIG_DIR"


def config_dir() -> Path:
    """The user's wan_lite config folder (`%LOCALAPPDATA%/wan_lite` on Windows, ~/.config/wan_lite
    on Linux); WAN_LITE_CONFIG_DIR overrides it."""
    override = os.environ.get(CONFIG_DIR_ENV)
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False))


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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success move it onto `path`, on error delete it.

    The temporary name is hidden and does not end in the target's suffix, so galleries that list
    `*.mp4` never show a half-written video.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial")
    try:
        yield tmp
        if not tmp.is_file():
            raise OSError(f"writing {target.name} produced no file")
        with open(tmp, "r+b") as f:  # flush to disk before the rename makes it visible (r+: Windows)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


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


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write `obj` as UTF-8 JSON (indented, non-ASCII kept readable) atomically; returns the path."""
    text = json_text(obj, indent=2) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
