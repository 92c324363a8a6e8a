"""Nothing a user made is overwritten; a read-only or full folder, a failed write, SIGTERM and
Cancel leave a clear message and no stray files (issue 23, items 3 and 4)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from wan_lite import output
from wan_lite.api import CancelToken, GenerateRequest
from wan_lite.cli import main as cli_main
from wan_lite.engine import Engine
from wan_lite.errors import Cancelled
from wan_lite.output import OutputError, check_output_folder, output_stem, read_mp4_metadata, write_mp4
from wan_lite.paths import atomic_path, clean_stale_partials, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(width=64, height=64, frames=5, steps=2, seed=3)
GEN = ["--size", "64x64", "--frames", "5", "--steps", "2", "--seed", "3"]


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _frames(n: int = 3):
    import numpy as np

    return np.full((n, 16, 16, 3), 128, np.uint8)


@pytest.fixture(scope="module")
def engine(tiny_models, tmp_path_factory):
    return Engine(tiny_models["ti2v-5b"].parent, tmp_path_factory.mktemp("out"), device="cpu",
                  folders={"ti2v-5b": tiny_models["ti2v-5b"]})


# ------------------------------------------------------------------------------ names and --out


def test_output_stem_counts_past_any_file_of_a_result(tmp_path):
    first = output_stem(tmp_path, "a cat", 1, "ti2v-5b")
    (first.parent / (first.name + ".latents.safetensors")).write_bytes(b"x")  # latents only, no video yet
    second = output_stem(tmp_path, "a cat", 1, "ti2v-5b")
    assert second != first and second.name.startswith(first.name)


def test_exclusive_write_keeps_an_existing_file(tmp_path):
    target = tmp_path / "x.json"
    target.write_text("{}")
    with pytest.raises(FileExistsError):
        write_json_atomic(target, {"a": 1}, overwrite=False)
    with pytest.raises(FileExistsError):
        write_mp4(tmp_path / "x.json", _frames(), 24, overwrite=False)
    assert target.read_text() == "{}" and _hidden(tmp_path) == []


def test_generate_refuses_an_existing_out_and_overwrites_when_asked(engine, tmp_path):
    out = tmp_path / "mine.mp4"
    first = engine.generate(GenerateRequest(prompt="a lamp", model="ti2v-5b", **SMALL), out_path=out)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"mine.mp4", "mine.json", "mine.latents.safetensors"}
    with pytest.raises(OutputError, match=r"mine\.(mp4|json|latents\.safetensors) already exists") as err:
        engine.generate(GenerateRequest(prompt="another", model="ti2v-5b", **SMALL), out_path=out)
    assert "--overwrite" in str(err.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    again = engine.generate(GenerateRequest(prompt="another", model="ti2v-5b", **SMALL), out_path=out, overwrite=True)
    assert again.video_path == first.video_path
    assert read_mp4_metadata(out)["settings"]["prompt"] == "another" and _hidden(tmp_path) == []


def test_out_never_replaces_a_file_that_is_not_ours(engine, tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"dim": 3072}')
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="config.json exists and is not a wan_lite settings file"):
            engine.generate(GenerateRequest(prompt="x", model="ti2v-5b", **SMALL),
                            out_path=tmp_path / "config.mp4", overwrite=overwrite)
    assert config.read_text() == '{"dim": 3072}' and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    with pytest.raises(OutputError, match="must name an .mp4 file"):
        engine.generate(GenerateRequest(prompt="x", model="ti2v-5b", **SMALL), out_path=tmp_path / "model.safetensors")


def test_same_prompt_and_seed_in_the_same_second_get_two_names(engine):
    request = GenerateRequest(prompt="twins", model="ti2v-5b", **SMALL)
    a, b = engine.generate(request), engine.generate(request)
    assert a.video_path != b.video_path and a.latents_path != b.latents_path
    assert json.loads(a.sidecar_path.read_text())["latents"] == a.latents_path.name
    assert json.loads(b.sidecar_path.read_text())["latents"] == b.latents_path.name


def test_a_name_taken_while_the_job_ran_goes_to_the_next_free_name(engine, monkeypatch):
    request = GenerateRequest(prompt="racing", model="ti2v-5b", **SMALL)
    stems = []
    real = output.output_stem

    def racing(*args, **kwargs):
        stem = real(*args, **kwargs)
        if not stems:  # another process writes the same name between the choice and the write
            stem.with_name(stem.name + ".latents.safetensors").write_bytes(b"theirs")
        stems.append(stem)
        return stem

    monkeypatch.setattr(output, "output_stem", racing)
    result = engine.generate(request)
    assert stems[0].with_name(stems[0].name + ".latents.safetensors").read_bytes() == b"theirs"
    assert result.latents_path.name.startswith(stems[1].name) and result.video_path.is_file()


def test_decode_keeps_the_original_video_and_record(engine, tmp_path):
    out = tmp_path / "orig.mp4"
    made = engine.generate(GenerateRequest(prompt="a boat", model="ti2v-5b", **SMALL), out_path=out)
    video, sidecar = out.read_bytes(), made.sidecar_path.read_text()
    first = engine.decode_latents(made.latents_path)
    second = engine.decode_latents(made.latents_path)
    assert first.video_path.name == "orig.decoded.mp4" and second.video_path.name == "orig.decoded-2.mp4"
    assert json.loads(first.sidecar_path.read_text())["latents"] == "orig.latents.safetensors"
    assert out.read_bytes() == video and made.sidecar_path.read_text() == sidecar
    with pytest.raises(OutputError, match=r"orig\.mp4 already exists"):
        engine.decode_latents(made.latents_path, out_path=out)
    assert out.read_bytes() == video
    again = engine.decode_latents(made.latents_path, overwrite=True)
    assert again.video_path == out and "decode" in json.loads(made.sidecar_path.read_text())["settings"]["timings"]


def test_cli_refuses_with_exit_2_and_overwrites_when_asked(tiny_models, tmp_path, capsys):
    out = tmp_path / "cli.mp4"
    args = ["generate", "--model-dir", str(tiny_models["ti2v-5b"]), "--prompt", "a cup", *GEN, "--out", str(out)]
    assert cli_main(args) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    capsys.readouterr()
    assert cli_main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert cli_main([*args, "--overwrite"]) == 0
    latents = str(tmp_path / "cli.latents.safetensors")
    assert cli_main(["decode", latents, "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["decode", latents]) == 0 and (tmp_path / "cli.decoded.mp4").is_file()
    assert cli_main(["decode", latents, "--out", str(out), "--overwrite"]) == 0


# ------------------------------------------------------------------------------ faults


def test_unwritable_or_full_folder_is_refused_before_any_model_loads(engine, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    loads = []
    monkeypatch.setattr(engine, "pipeline", lambda *a, **k: loads.append(a))
    with pytest.raises(OutputError, match="Cannot write to the output folder"):
        engine.generate(GenerateRequest(prompt="x", model="ti2v-5b", **SMALL), out_path=blocker / "v.mp4")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as m:
        m.setattr(output.tempfile, "mkstemp", read_only)
        with pytest.raises(OutputError, match="read-only disk"):
            check_output_folder(tmp_path)
    monkeypatch.setattr(output.shutil, "disk_usage", lambda p: _Usage(50 * 2**20))
    with pytest.raises(OutputError, match="has 50 MB free"):
        engine.generate(GenerateRequest(prompt="x", model="ti2v-5b", **SMALL), out_path=tmp_path / "v.mp4")
    assert loads == [] and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


class _Usage:
    def __init__(self, free: int) -> None:
        self.free = free


def test_a_failed_video_write_says_why_and_keeps_the_latents(engine, tmp_path, monkeypatch, capsys, tiny_models):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(output, "write_mp4", disk_full)
    out = tmp_path / "full.mp4"
    with pytest.raises(OutputError) as err:
        engine.generate(GenerateRequest(prompt="x", model="ti2v-5b", **SMALL), out_path=out)
    text = str(err.value)
    latents = tmp_path / "full.latents.safetensors"
    assert "Could not write full.mp4" in text and "the disk is full" in text and f"kept in {latents}" in text
    assert latents.is_file() and not out.exists() and _hidden(tmp_path) == []

    monkeypatch.setattr(output, "save_latents", disk_full)
    with pytest.raises(OutputError, match="Nothing of this result was saved"):
        engine.generate(GenerateRequest(prompt="x", model="ti2v-5b", **SMALL), out_path=tmp_path / "none.mp4")


def test_stale_partials_are_cleaned_at_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".video.mp4.{dead.stdout.strip()}-abcd1234.partial"
    orphan.write_bytes(b"half")
    old = tmp_path / ".other.mp4.1-deadbeef.partial"
    old.write_bytes(b"half")
    os.utime(old, (time.time() - 10 * 86400,) * 2)
    mine = tmp_path / f".mine.mp4.{os.getpid()}-00000000.partial"  # being written by this process
    mine.write_bytes(b"")
    write_json_atomic(tmp_path / "next.json", {})
    assert not orphan.exists() and not old.exists() and mine.exists()
    assert clean_stale_partials(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="SIGTERM")
def test_sigterm_during_the_video_write_leaves_no_partial(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        import numpy as np
        from wan_lite.cli import _sigterm_as_interrupt
        from wan_lite.output import write_mp4
        _sigterm_as_interrupt()
        def frames():
            for i in range(10_000):
                if i == 2:
                    print("writing", flush=True)
                time.sleep(0.01)
                yield np.full((16, 16, 3), i % 255, np.uint8)
        try:
            write_mp4({str(tmp_path / "v.mp4")!r}, frames(), 24)
        except KeyboardInterrupt:
            sys.exit(130)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    assert list(tmp_path.iterdir()) == []


def test_cancel_during_decode_writes_no_video(engine, tmp_path, monkeypatch):
    token = CancelToken()
    real_pipeline = engine.pipeline

    def pipeline(*args, **kwargs):  # the placement sets decode_fn as it binds: wrap it after that
        pipe = real_pipeline(*args, **kwargs)
        real = pipe.decode_fn

        def cancel_midway(vae, z):
            token.cancel()  # the user presses Cancel while the VAE runs
            return real(vae, z)

        pipe.decode_fn = cancel_midway
        return pipe

    monkeypatch.setattr(engine, "pipeline", pipeline)
    with pytest.raises(Cancelled, match="latents are kept in .*late.latents.safetensors"):
        engine.generate(GenerateRequest(prompt="x", model="ti2v-5b", **SMALL), cancel=token,
                        out_path=tmp_path / "late.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late.latents.safetensors"]
    with pytest.raises(Cancelled):
        engine.decode_latents(tmp_path / "late.latents.safetensors", cancel=token)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late.latents.safetensors"]


def test_atomic_path_cleans_up_after_an_error(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "x.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []
