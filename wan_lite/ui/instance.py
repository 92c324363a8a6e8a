"""One app per config folder.

The config folder holds one user's queue (`queue.json`), settings and history choices, and the
app behind it owns the GPU. A second start on the same folder (the launcher double-clicked
twice) would run the queue file's jobs a second time beside the first app and both would fill
the GPU; so the second start finds the first one's lock and opens its page instead. The lock is
the operating system's (the `filelock` package: fcntl on Linux and macOS, msvcrt on Windows), so it
goes with its process: a crash or a killed app leaves nothing to clean up. Another, separate app
runs with its own config folder (WAN_LITE_CONFIG_DIR).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from wan_lite.paths import write_json_atomic

LOCK_FILE = "app.lock"
INFO_FILE = "app.json"  # the running app's process id and address, for the next start to open


class AppLock:
    """The claim of one app on `folder` (its config folder)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._lock = FileLock(str(self.folder / LOCK_FILE))

    def claim(self) -> dict[str, Any] | None:
        """Take the folder: None when taken, else what the app holding it wrote (`announce`:
        {"pid", "url"}, or {} while it is still starting)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            return self.holder()
        return None

    def holder(self) -> dict[str, Any]:
        try:
            data = json.loads((self.folder / INFO_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def announce(self, url: str) -> None:
        """Say where this app is, for a second start to open (after `claim`)."""
        try:
            write_json_atomic(self.folder / INFO_FILE, {"pid": os.getpid(), "url": url})
        except OSError:  # the lock still holds; a second start then only says it runs
            pass

    def release(self) -> None:
        self._lock.release()


def already_running(info: dict[str, Any], folder: Path, opening: bool) -> str:
    """The message of a second start (`opening`: its page is being opened in the browser)."""
    where = f" at {info['url']}" if isinstance(info.get("url"), str) else ""
    pid = f" (process {info['pid']})" if isinstance(info.get("pid"), int) else ""
    use = "opening it" if opening and where else "use that one"
    return (f"wan_lite is already running{where}{pid} with the config folder {folder}: {use} instead of "
            "starting a second app on the same queue and GPU. To run a separate one, give it its own "
            "folder: set WAN_LITE_CONFIG_DIR.")
