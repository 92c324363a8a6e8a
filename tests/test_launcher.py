"""The launchers' logic where it can run here: plain-word refusals, the torch build choice, the
install stamp, and a fresh clone reaching a served page (reusing this checkout's venv through
WAN_LITE_VENV, since a real first install downloads gigabytes)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch.sh"
VENV = Path(sys.prefix)  # the venv running these tests has everything installed

pytestmark = pytest.mark.skipif(os.name == "nt", reason="launch.sh is for Linux and macOS")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAN_LITE_")}
    env.update({"CI": "true", "WAN_LITE_CONFIG_DIR": str(tmp_path / "config"), "XDG_CACHE_HOME": str(tmp_path / "cache"),
                "GRADIO_ANALYTICS_ENABLED": "False"})
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str], script: Path = LAUNCH, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _fake_bin(tmp_path: Path, name: str, body: str) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return folder


def test_check_chooses_cuda_torch_when_nvidia_smi_answers(tmp_path):
    fake = _fake_bin(tmp_path, "nvidia-smi", 'echo "GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-1234)"')
    env = _env(tmp_path, WAN_LITE_VENV=str(VENV), PATH=f"{fake}:{os.environ['PATH']}")
    out = _run(["--check"], env)
    assert out.returncode == 0, out.stderr
    assert "build cu128 (NVIDIA GPU found: GPU 0: NVIDIA GeForce RTX 4090" in out.stdout


def test_check_explains_cpu_build_without_a_gpu(tmp_path):
    fake = _fake_bin(tmp_path, "nvidia-smi", "exit 9")  # driver missing: nvidia-smi fails
    env = _env(tmp_path, WAN_LITE_VENV=str(VENV), PATH=f"{fake}:{os.environ['PATH']}")
    out = _run(["--check"], env)
    assert out.returncode == 0 and "build cpu (No NVIDIA GPU answered" in out.stdout and "hours" in out.stdout
    assert "Free disk:" in out.stdout


def test_old_python_is_refused_in_plain_words(tmp_path):
    old = _fake_bin(tmp_path, "python3.8", 'case "$2" in *sys.exit*) exit 1;; *) echo 3.8.10;; esac')
    env = _env(tmp_path, WAN_LITE_VENV=str(tmp_path / "venv"), WAN_LITE_PYTHON=str(old / "python3.8"))
    out = _run([], env)
    assert out.returncode == 1
    assert "wan_lite needs Python 3.10 or newer, but" in out.stderr and "Python 3.8.10" in out.stderr
    assert "python.org" in out.stderr and not (tmp_path / "venv").exists()


def test_missing_python_is_explained(tmp_path):
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("dirname",):  # the launcher needs nothing else before looking for Python
        (tools / tool).symlink_to(subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True,
                                                 text=True).stdout.strip())
    env = _env(tmp_path, WAN_LITE_VENV=str(tmp_path / "venv"), PATH=str(tools))
    out = subprocess.run(["/bin/bash", str(LAUNCH)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "Python is not installed" in out.stderr


def test_too_little_disk_is_refused_before_installing(tmp_path):
    env = _env(tmp_path, WAN_LITE_VENV=str(tmp_path / "new-venv"), WAN_LITE_PYTHON=sys.executable,
               WAN_LITE_MIN_FREE_GB="100000000")
    out = _run([], env)
    assert out.returncode == 1 and "GB of disk space is free" in out.stderr and "needs about 100000000 GB" in out.stderr
    assert not (tmp_path / "new-venv").exists()


def test_unknown_torch_build_is_refused(tmp_path):
    out = _run(["--check"], _env(tmp_path, WAN_LITE_VENV=str(VENV), WAN_LITE_TORCH="rocm"))
    assert out.returncode == 1 and "WAN_LITE_TORCH=rocm" in out.stderr


def _clone(tmp_path: Path) -> Path:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", "--depth", "1", f"file://{ROOT}", str(clone)], check=True, timeout=120)
    if not (clone / "launch.sh").is_file():
        pytest.skip("launch.sh is not committed yet")
    return clone


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fresh_clone_sets_up_and_serves_the_app(tmp_path):
    clone = _clone(tmp_path)
    port = _free_port()
    env = _env(tmp_path, WAN_LITE_VENV=str(VENV))
    log = (tmp_path / "launch.log").open("w")
    proc = subprocess.Popen(["bash", str(clone / "launch.sh"), "--port", str(port), "--models-dir", str(tmp_path / "models"),
                             "--output-dir", str(tmp_path / "out")], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        body, deadline = "", time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                    body = resp.read().decode("utf-8", "replace")
                    break
            except OSError:
                time.sleep(1)
        text = (tmp_path / "launch.log").read_text()
        assert body, f"the app did not answer on port {port}:\n{text[-3000:]}"
        assert "<title>wan_lite</title>" in body or "wan_lite" in body
        # the address is printed once the server is up: it may answer a moment before
        while f"127.0.0.1:{port}" not in text and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            text = (tmp_path / "launch.log").read_text()
        assert "Starting wan_lite" in text and f"127.0.0.1:{port}" in text, text[-3000:]
        assert (tmp_path / "out").is_dir() and (tmp_path / "cache" / "wan_lite" / "uploads").is_dir()
        # Only the output and upload folders are served: not the app's own files, not the system's.
        (tmp_path / "out" / "clip.mp4").write_bytes(b"not really a video")
        assert _status(f"http://127.0.0.1:{port}/gradio_api/file={tmp_path / 'out' / 'clip.mp4'}") == 200
        for secret in ("/etc/passwd", clone / "app.py", tmp_path / "config" / "settings.json"):
            assert _status(f"http://127.0.0.1:{port}/gradio_api/file={secret}") in (403, 404), secret
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    # The stamp written by the first launch makes the next one skip every install.
    check = _run(["--check"], env, script=clone / "launch.sh")
    assert "Installed and up to date: yes" in check.stdout


@pytest.mark.slow
def test_test_mode_sets_up_and_runs_pytest_with_the_given_arguments(tmp_path):
    clone = _clone(tmp_path)
    out = _run(["--test", "tests/test_ui_composer.py", "-q", "-p", "no:cacheprovider"], _env(tmp_path, WAN_LITE_VENV=str(VENV)),
               script=clone / "launch.sh", timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Running the tests" in out.stdout and " passed" in out.stdout


# ------------------------------------------------------------------------------ launch.sh: --help, odd paths
def test_help_prints_the_comment_block_only(tmp_path):
    out = _run(["--help"], _env(tmp_path))
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert lines[0] == "wan_lite launcher for Linux and macOS."
    assert lines[-1] == "CI=true (no browser, nothing interactive)."  # not the script's first command
    assert not any(line.startswith(("set ", "#")) for line in lines)


def _fake_venv(tmp_path: Path) -> Path:
    """A venv whose stamp says everything is installed and whose python prints the app's arguments
    as JSON instead of starting it (everything else runs in the real Python)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    real = sys.executable
    python.write_text(f'#!/bin/sh\nif [ "$1" = app.py ]; then shift; exec "{real}" -c '
                      f'"import json, sys; print(json.dumps(sys.argv[1:]))" "$@"; fi\nexec "{real}" "$@"\n')
    python.chmod(0o755)
    digest = subprocess.run(["sha256sum", str(ROOT / "requirements.txt")], capture_output=True, text=True).stdout.split()[0]
    (venv / ".wan_lite_stamp").write_text(f"torch=2.13.0+cpu requirements={digest}\n")
    return venv


def test_launch_sh_in_a_folder_with_an_apostrophe_and_a_bang_passes_arguments_as_typed(tmp_path):
    import json

    folder = tmp_path / "it's a !test & more"
    (folder / "tests").mkdir(parents=True)
    for name in ("launch.sh", "requirements.txt", "tests/requirements.txt"):
        (folder / name).write_bytes((ROOT / name).read_bytes())
    env = _env(tmp_path, WAN_LITE_VENV=str(_fake_venv(tmp_path)), WAN_LITE_TORCH="cpu")
    check = _run(["--check"], env, script=folder / "launch.sh")
    assert check.returncode == 0, check.stderr
    assert re.search(r"Free disk: [1-9]\d* GB", check.stdout), check.stdout  # the disk was measured
    args = ["--prompt", "it's a fox! with \"quotes\" & $HOME", "--x", "!seed!"]
    out = _run(args, env, script=folder / "launch.sh")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == args


# ------------------------------------------------------------------------------ launch.bat, read as cmd.exe reads it
# No Windows here: these read launch.bat for the rules that cmd.exe's parsing imposes.
BAT = ROOT / "launch.bat"


def _bat_lines() -> list[str]:
    return BAT.read_text(encoding="utf-8").splitlines()


def _code_lines() -> list[tuple[int, str]]:
    return [(i, line.strip()) for i, line in enumerate(_bat_lines())
            if line.strip() and not line.strip().lower().startswith(("rem", "::", "@echo"))]


def test_bat_keeps_crlf_line_ends():
    data = BAT.read_bytes()
    assert data.count(b"\r\n") == data.count(b"\n")  # cmd.exe misreads labels in LF-only files


def test_bat_stores_the_arguments_before_delayed_expansion_is_on():
    """With delayed expansion on, cmd.exe's phase 5 reads the "!" in a value being stored
    (`set ARGS=!ARGS! %1`) as a variable marker and drops it. So %* is stored while it is off,
    and used afterwards as !ARGS! (a delayed expansion's result is not parsed again)."""
    lines = _code_lines()
    enable = next(i for i, line in lines if re.match(r"(?i)setlocal\b.*\benabledelayedexpansion", line))
    disable = next(i for i, line in lines if re.match(r"(?i)setlocal\b.*\bdisabledelayedexpansion", line))
    stored = [i for i, line in lines if re.match(r"(?i)set \"?ARGS=", line)]
    assert disable < enable and stored and all(disable < i < enable for i in stored)
    assert not any("%1" in line or "%~1" in line for i, line in lines if i > enable)
    used = [line for i, line in lines if i > enable and "ARGS" in line]
    assert used and all("%ARGS" not in line and "!ARGS!" in line for line in used)
    assert any(line == "set ARGS=%*" for _, line in lines)  # unquoted: a quoted "&" in an argument stays quoted


def test_bat_gives_paths_to_python_through_the_environment():
    """An apostrophe in the install path ended the Python string the path was pasted into
    (r'%ROOT%'), the disk check printed nothing, and `if  LSS 10` aborted the script with no
    message. No path variable may be pasted into Python source."""
    paths = ("%ROOT%", "%VENV%", "%CD%", "%~dp0", "!ROOT!", "!VENV!", "%PY%")
    for _, line in _code_lines():
        for code in re.findall(r'-c "([^"]*)"', line):
            assert not any(p in code for p in paths), line


def test_bat_disk_check_runs_in_a_folder_with_an_apostrophe(tmp_path):
    line = next(line for _, line in _code_lines() if "disk_usage" in line)
    code = re.search(r'-c "([^"]*)"', line).group(1)
    folder = tmp_path / "Bob's files"
    folder.mkdir()
    out = subprocess.run([sys.executable, "-c", code], env=os.environ | {"ROOT": str(folder)},
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().isdigit(), out.stderr


def test_bat_refuses_with_a_message_when_the_disk_check_says_nothing():
    lines = [line for _, line in _code_lines()]
    compare = next(i for i, line in enumerate(lines) if "FREE_GB" in line and " LSS " in line)
    guard = next(i for i, line in enumerate(lines) if line.lower().startswith("if not defined free_gb"))
    assert guard < compare and "!FREE_GB!" in lines[compare]
    assert any("PROBLEM=" in line for line in lines[guard:guard + 3])


# ------------------------------------------------------------------------------ the README a newcomer reads
def test_readme_starts_with_what_you_need_and_shows_two_commands_for_a_fresh_machine():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    sections = re.findall(r"^## (.+)$", text, flags=re.M)
    assert sections[0] == "What you need"  # hardware and download sizes before anything else
    assert sections.index("Models") < sections.index("Test") and "Where your videos go" in sections
    before_cli = text[:text.index("## Command line")]
    commands = [line.split("#")[0].strip() for block in re.findall(r"```bash\n(.*?)```", before_cli, flags=re.S)
                for line in block.splitlines() if line.strip()]
    assert commands == ["./launch.sh", "./launch.sh --test"]
    need = text[text.index("## What you need"):text.index("## Start")]
    assert "GB" in need and "RAM" in need and "Download" in need
    memory = text[text.index("## Memory"):text.index("## Python")]
    assert "docs/memory.md" in memory and "GiB" not in memory and "H200" not in memory  # plain words
