"""One app per config folder (wan_lite/ui/instance.py): a second start opens the running app's
page instead of serving beside it, and a killed app leaves no lock behind."""

from __future__ import annotations

import subprocess
import sys
import webbrowser
from pathlib import Path

from wan_lite.ui.instance import AppLock

ROOT = Path(__file__).resolve().parents[1]
HOLDER = """
import sys, time
from pathlib import Path
from wan_lite.ui.instance import AppLock
lock = AppLock(Path(sys.argv[1]))
assert lock.claim() is None
lock.announce("http://127.0.0.1:7999/")
print("ready", flush=True)
time.sleep(120)
"""


def test_a_second_start_opens_the_first_and_a_killed_app_leaves_no_lock(tmp_path, monkeypatch, capsys):
    config = tmp_path / "config"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(config)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        for name, value in (("WAN_LITE_CONFIG_DIR", config), ("XDG_CACHE_HOME", tmp_path / "cache"),
                            ("GRADIO_TEMP_DIR", tmp_path / "gradio")):
            monkeypatch.setenv(name, str(value))
        monkeypatch.delenv("CI", raising=False)
        opened: list[str] = []
        monkeypatch.setattr(webbrowser, "open", opened.append)
        sys.path.insert(0, str(ROOT))
        import app

        rc = app.main(["--models-dir", str(tmp_path / "models"), "--output-dir", str(tmp_path / "out")])
        out = capsys.readouterr().out
        assert rc == 0 and opened == ["http://127.0.0.1:7999/"], out
        assert "already running at http://127.0.0.1:7999/" in out and "opening it" in out
        assert "WAN_LITE_CONFIG_DIR" in out
        assert AppLock(config).claim() is not None  # still held by the running one
    finally:
        holder.kill()
        holder.wait()
    lock = AppLock(config)
    assert lock.claim() is None  # the killed app's lock went with it
    lock.release()
