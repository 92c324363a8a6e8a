"""The command line as a user meets it: where videos go, the progress it prints, the plan line,
which folder each option takes, decoding saved latents. Real runs on the tiny checkpoints."""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from wan_lite import paths
from wan_lite.api import Progress
from wan_lite.cli import main as cli_main
from wan_lite.cli_run import StageProgress, progress_shown
from wan_lite.output import read_mp4

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--size", "64x64", "--frames", "5", "--steps", "2", "--seed", "3"]


def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wan_lite", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=os.environ | {"PYTHONPATH": str(ROOT)} | (env or {}))


# ------------------------------------------------------------------------------ progress
class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _a14b_run(progress: StageProgress, clock: FakeClock) -> None:
    """The events an A14B run sends (engine + pipeline): load, text, 3 high-noise and 3 low-noise
    steps each reported after it ran, decode start/end, save start."""
    progress(Progress("load", 0, 1, 0.0))
    clock.now += 4
    progress(Progress("text", 0, 1, 0.0))
    clock.now += 1
    for i in range(6):
        clock.now += 2
        progress(Progress("high_noise" if i < 3 else "low_noise", i + 1, 6, clock.now, eta_s=2.0 * (5 - i)))
    progress(Progress("decode", 0, 1, 0.0))
    clock.now += 3
    progress(Progress("decode", 1, 1, 0.0))
    progress(Progress("save", 0, 1, 0.0))
    clock.now += 0.5
    progress.finish()


def test_progress_without_a_terminal_is_plain_lines_ending_at_100_percent():
    out, clock = io.StringIO(), FakeClock()
    _a14b_run(StageProgress(out, tty=False, frames=9, clock=clock), clock)
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text  # nothing redrawn in a log file
    lines = text.splitlines()
    assert lines == ["Loading models: done in 4.0 s", "Text encoding: done in 1.0 s",
                     "Denoising: 100% 6/6 steps done in 12 s (2.0 s/step)",
                     "Decoding video: 100% 9/9 frames done in 3.0 s", "Saving: done in 0.5 s"]


def test_progress_on_a_terminal_redraws_one_line_and_logs_go_above_it():
    out, clock = io.StringIO(), FakeClock()
    progress = StageProgress(out, tty=True, frames=9, clock=clock)
    progress(Progress("denoise", 1, 50, 0.0, eta_s=49 * 30.0))
    progress.write_above("INFO wan_lite.engine: a log line")
    clock.now += 30
    progress(Progress("denoise", 2, 50, 0.0, eta_s=48 * 30.0))
    screen = _terminal(out.getvalue())
    assert screen[0] == "INFO wan_lite.engine: a log line"  # its own line, above the progress
    # the first step ran before its report: 2 steps of 30 s, 48 steps left
    assert re.fullmatch(r"Denoising: #\.{19}\s+4% 2/50 steps 60 s \(30\.0 s/step\) ~24 min left", screen[1])
    progress.finish()
    assert _terminal(out.getvalue())[-1] == "Denoising: " + "#" * 20 + " 100% 50/50 steps done in 60 s (30.0 s/step)"


def test_a_long_phase_without_a_terminal_prints_a_line_now_and_then():
    from wan_lite.cli_run import NON_TTY_EVERY_S

    out, clock = io.StringIO(), FakeClock()
    progress = StageProgress(out, tty=False, clock=clock)
    for step in range(1, 11):
        clock.now += NON_TTY_EVERY_S / 4
        progress(Progress("denoise", step, 10, 0.0, eta_s=(10 - step) * NON_TTY_EVERY_S / 4))
    lines = out.getvalue().splitlines()
    assert 2 <= len(lines) <= 3 and all("/10 steps" in line and "left" in line for line in lines)
    assert "\r" not in out.getvalue()


def test_the_elapsed_time_moves_on_between_events():
    """A model load or a decode sends no event for minutes: the line must not look stuck."""
    out, clock = io.StringIO(), FakeClock()
    progress = StageProgress(out, tty=True, clock=clock)
    progress(Progress("load", 0, 1, 0.0))
    clock.now += 75
    progress.tick()
    assert _terminal(out.getvalue()) == ["Loading models: ... 75 s"]


def test_a_failed_run_leaves_its_line_where_it_stopped():
    out, clock = io.StringIO(), FakeClock()
    progress = StageProgress(out, tty=False, clock=clock)
    progress(Progress("denoise", 3, 40, 0.0, eta_s=37.0))
    progress.close()
    assert out.getvalue() == "Denoising:   8% 3/40 steps 3.0 s (1.0 s/step) ~37 s left - stopped\n"


def test_log_records_go_above_the_progress_line_while_it_runs():
    out, clock = io.StringIO(), FakeClock()
    logging.basicConfig(level=logging.INFO)
    with progress_shown(StageProgress(out, tty=True, clock=clock)) as progress:
        progress(Progress("denoise", 1, 4, 0.0, eta_s=3.0))
        logging.getLogger("wan_lite.test").warning("in the middle")
        warnings.warn("a library's warning", UserWarning, stacklevel=1)
    screen = _terminal(out.getvalue())
    assert screen[0].startswith("WARNING") and screen[0].endswith("in the middle")  # a line of its own
    assert "a library's warning" in screen[1] and "Denoising" not in screen[1]
    assert screen[-1].startswith("Denoising: ") and "100% 4/4 steps done in" in screen[-1]


def _terminal(text: str) -> list[str]:
    """What a terminal shows after `text`: a carriage return goes back to the line's start."""
    lines = [""]
    col = 0
    for ch in text:
        if ch == "\n":
            lines.append("")
            col = 0
        elif ch == "\r":
            col = 0
        else:
            line = lines[-1]
            lines[-1] = line[:col] + ch + line[col + 1:]
            col += 1
    return [line.rstrip() for line in lines if line.strip()]


# ------------------------------------------------------------------------------ where videos go
def test_one_outputs_folder_and_one_cache_folder_for_the_cli_and_the_app(tmp_path, monkeypatch):
    from wan_lite.engine import Engine
    from wan_lite.ui.settings import default_output_dir, default_upload_dir

    monkeypatch.delenv(paths.OUTPUT_DIR_ENV, raising=False)
    monkeypatch.delenv(paths.CACHE_DIR_ENV, raising=False)
    assert default_output_dir() == paths.output_dir()
    assert default_upload_dir().parent == paths.cache_dir()
    assert Engine(tmp_path / "models", tmp_path / "out").cache_dir.parent == paths.cache_dir()
    monkeypatch.setenv(paths.OUTPUT_DIR_ENV, str(tmp_path / "videos"))
    assert default_output_dir() == paths.output_dir() == tmp_path / "videos"
    help_text = _cli("generate", "--help", env={paths.OUTPUT_DIR_ENV: str(tmp_path / "videos")}).stdout
    assert str(tmp_path / "videos") in "".join(help_text.split())  # --help says where videos go


@pytest.mark.slow
def test_generate_writes_to_the_apps_outputs_folder_with_a_plan_line_and_clean_progress(tiny_models, tmp_path):
    videos, elsewhere = tmp_path / "videos", tmp_path / "cwd"
    elsewhere.mkdir()
    r = _cli("generate", "--model-dir", str(tiny_models["ti2v-5b"]), "--prompt", "a lamp", *SMALL,
             env={paths.OUTPUT_DIR_ENV: str(videos)}, cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert not (elsewhere / "outputs").exists()  # not ./outputs: the app's History would never see it
    made = sorted(p.name for p in videos.iterdir())
    assert len(made) == 3 and any(n.endswith(".mp4") for n in made)
    err = r.stderr
    assert "\r" not in err  # stderr is not a terminal here: no redrawn bars
    assert err.index("plan: ti2v-5b 64x64x5") < err.index("Loading models: done")  # the plan before the load
    assert "plan: ti2v-5b 64x64x5 fits" in err  # the tiny model's own sizes, the plan the run follows
    assert "No CUDA GPU" in err or "cuda" in err.lower()
    assert "Denoising: 100% 2/2 steps done in" in err and "Decoding video: 100% 5/5 frames done in" in err
    assert "step/s" not in err.replace("steps/s", "")  # units kept: "steps/s" or "s/step"
    assert f"video:   {videos}" in r.stdout
    from wan_lite.engine import Engine
    from wan_lite.ui.settings import default_output_dir

    os.environ[paths.OUTPUT_DIR_ENV] = str(videos)  # as the app would start for this user
    try:
        history = Engine(tmp_path / "models", default_output_dir()).history()
    finally:
        del os.environ[paths.OUTPUT_DIR_ENV]
    assert [h["settings"]["prompt"] for h in history] == ["a lamp"]  # the app's History lists the CLI's video


def test_output_dir_option_is_kept_as_an_explicit_choice(tiny_models, tmp_path, capsys):
    out = tmp_path / "chosen"
    assert cli_main(["generate", "--model-dir", str(tiny_models["ti2v-5b"]), "--prompt", "a lamp", *SMALL,
                     "--outputs-dir", str(out)]) == 0
    assert len(list(out.glob("*.mp4"))) == 1


# ------------------------------------------------------------------------------ which folder
def test_model_dir_given_the_folder_of_model_folders_says_which_was_meant(tiny_models, capsys):
    parent = tiny_models["ti2v-5b"].parent  # holds ti2v-5b/, t2v-a14b/, i2v-a14b/
    assert cli_main(["generate", "--model-dir", str(parent), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "holds model folders" in err and "Did you mean --model-dir" in err
    assert cli_main(["generate", "--model-dir", str(parent), "--model", "t2v-a14b", "--prompt", "x"]) == 2
    assert f"Did you mean --model-dir {parent / 't2v-a14b'}?" in capsys.readouterr().err
    assert cli_main(["info", "--model-dir", str(parent)]) == 2
    assert "Did you mean --model-dir" in capsys.readouterr().err


def test_models_dir_given_one_models_folder_says_which_was_meant(tiny_models, capsys):
    folder = tiny_models["ti2v-5b"]
    assert cli_main(["generate", "--models-dir", str(folder), "--model", "ti2v-5b", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "one model's folder (TI2V-5B)" in err and f"Did you mean --model-dir {folder}?" in err


@pytest.mark.slow
def test_a_diffusers_pipeline_folder_is_a_model_dir(tiny_models, tmp_path, capsys):
    from tests.tiny_ckpt import formats as tf
    from wan_lite.loading.layout import find_model
    from wan_lite.loading.tensors import SafetensorsSource, open_source

    files = find_model(tiny_models["ti2v-5b"])
    root = tf.write_diffusers_pipeline(tmp_path / "Wan2.2-TI2V-5B-Diffusers", [dict(SafetensorsSource(files.dit["main"]))],
                                       dict(open_source(files.vae)), "2.2", dict(open_source(files.t5)), files.tokenizer)
    assert cli_main(["info", "--model-dir", str(root)]) == 0
    assert re.search(r"TI2V-5B .* — installed", capsys.readouterr().out)
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    assert cli_main(["generate", "--model-dir", str(root), "--prompt", "a lamp", *SMALL, "--out", str(a)]) == 0
    assert cli_main(["generate", "--model-dir", str(files.root), "--prompt", "a lamp", *SMALL, "--out", str(b)]) == 0
    assert np.array_equal(read_mp4(a)[0], read_mp4(b)[0])  # the same weights, the same video


# ------------------------------------------------------------------------------ decode
def test_decode_loads_only_the_vae_and_keeps_the_original(tiny_models, tmp_path, capsys):
    out = tmp_path / "run" / "fox.mp4"
    assert cli_main(["generate", "--model-dir", str(tiny_models["t2v-a14b"]), "--prompt", "a fox", *SMALL,
                     "--out", str(out)]) == 0
    original = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    vae_only = tmp_path / "vae-only"  # no text encoder, no tokenizer, no DiT: decode needs none of them
    vae_only.mkdir()
    shutil.copy(tiny_models["t2v-a14b"] / "Wan2.1_VAE.pth", vae_only)
    capsys.readouterr()
    assert cli_main(["decode", str(out.with_name("fox.latents.safetensors")), "--model-dir", str(vae_only)]) == 0
    assert {p.name: p.read_bytes() for p in out.parent.iterdir() if p.name in original} == original
    decoded = out.with_name("fox.decoded.mp4")
    shown = capsys.readouterr()
    assert f"video:   {decoded}" in shown.out and "Decoding video: done in" in shown.err
    # the same latents through the same VAE (planned without the DiT's size: maybe in bf16)
    difference = np.abs(read_mp4(decoded)[0].astype(int) - read_mp4(out)[0].astype(int))
    assert difference.mean() < 3


def test_decode_of_a_missing_file_says_so_before_any_progress(tmp_path, capsys):
    assert cli_main(["decode", str(tmp_path / "gone.latents.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "Latents file not found" in err and "Decoding video" not in err


# ------------------------------------------------------------------------------ plan
def test_plan_says_times_in_one_unit_style(capsys):
    assert cli_main(["plan", "--model", "t2v-a14b", "--vram-gb", "8", "--ram-gb", "32"]) == 0
    time_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("time:"))
    assert not re.search(r"\d+\.\d+ min|\d{4,} s", time_line), time_line  # no "327.3 min", no "19580 s"
    assert re.fullmatch(r"time:    about \d+ h \d+ min \(text \d+ s, denoise \d+ h \d+ min, decode \d+ s\)", time_line)


def test_the_apps_models_dir_given_one_models_folder_says_which_was_meant(tiny_models, capsys):
    import app

    folder = tiny_models["ti2v-5b"]
    assert app.main(["--models-dir", str(folder), "--no-browser"]) == 2
    err = capsys.readouterr().err
    assert "is one model's folder (TI2V-5B)" in err and f"Did you mean --models-dir {folder.parent}?" in err


def test_without_a_model_option_the_installed_model_runs(tiny_models, tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    assert cli_main(["generate", "--models-dir", str(models), "--prompt", "x"]) == 2
    assert f"{models} holds no model folder" in capsys.readouterr().err
    (models / "Wan2.2-T2V-A14B").symlink_to(tiny_models["t2v-a14b"])  # the folder name the app downloads to
    assert cli_main(["generate", "--models-dir", str(models), "--prompt", "a lamp", *SMALL,
                     "--out", str(tmp_path / "a.mp4")]) == 0
    assert "plan: t2v-a14b 64x64x5" in capsys.readouterr().err
    (models / "Wan2.2-TI2V-5B").symlink_to(tiny_models["ti2v-5b"])  # the app's default model wins
    assert cli_main(["generate", "--models-dir", str(models), "--prompt", "a lamp", *SMALL,
                     "--out", str(tmp_path / "b.mp4")]) == 0
    assert "plan: ti2v-5b 64x64x5" in capsys.readouterr().err
