"""Scans survive bad neighbours (issue 23, item 6): symlink loops, malformed files in a ComfyUI
folder, a choices.json of the wrong shape, a bad JSON file in the outputs folder."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from wan_lite.library import ModelLibrary
from wan_lite.loading import discovery
from wan_lite.ui.history import describe, read_history

ROOT = Path(__file__).resolve().parents[1]


def test_symlink_loops_are_visited_once(tmp_path: Path) -> None:
    root = tmp_path / "comfy"
    (root / "vae").mkdir(parents=True)
    for i in range(9):  # 9 loops made a depth-6 walk visit 9^6 folders
        (root / f"loop{i}").symlink_to(root, target_is_directory=True)
        (root / "vae" / f"up{i}").symlink_to(root, target_is_directory=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    save_file({"w": torch.zeros(2)}, str(elsewhere / "x.safetensors"))
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)  # a link out is still followed
    t0 = time.perf_counter()
    folders = list(discovery._folders(root, 6))
    found = discovery.scan([("comfyui", root)])
    assert time.perf_counter() - t0 < 5
    assert sorted(os.path.realpath(f) for f in folders) == sorted(
        os.path.realpath(p) for p in (root, root / "vae", elsewhere))
    assert [f.component.path.name for f in found] == ["x.safetensors"]


def _raw_safetensors(path: Path, header: object) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def test_one_malformed_file_does_not_stop_a_comfyui_scan(tmp_path: Path) -> None:
    vae = tmp_path / "models" / "vae"
    vae.mkdir(parents=True)
    _raw_safetensors(vae / "list.safetensors", [1, 2])
    _raw_safetensors(vae / "int_entry.safetensors", {"w": 3})
    (vae / "junk.gguf").write_bytes(b"GGUF" + os.urandom(64))
    (vae / "junk.pth").write_bytes(os.urandom(64))
    (vae / "model.safetensors.index.json").write_text('{"weight_map": []}')
    os.mkfifo(vae / "pipe.safetensors")  # never opened: it would block
    (vae / "folder.safetensors").mkdir()
    save_file({"w": torch.zeros(2)}, str(vae / "good.safetensors"))
    found = {f.component.path.name: f.component for f in discovery.scan([("comfyui", tmp_path / "models")])}
    broken = {"list.safetensors", "int_entry.safetensors", "junk.gguf", "junk.pth", "model.safetensors.index.json"}
    assert {n for n, c in found.items() if c.role == "broken"} == broken
    assert all(n in found[n].problem for n in broken)
    assert found["good.safetensors"].role != "broken"
    assert "pipe.safetensors" not in found


@pytest.mark.parametrize("content", [
    {"models": []},
    {"models": {"ti2v-5b": []}},
    {"models": {"ti2v-5b": {"vae": 3, "dit": {"path": 5}}}},
    {"comfy_dirs": "abc", "models": None},
    {"comfy_dirs": [1, "/nowhere"]},
    [],
    "text",
])
def test_choices_of_the_wrong_shape_are_repaired(tmp_path: Path, content: object,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "choices.json"
    path.write_text(json.dumps(content))
    choices = discovery.RememberedChoices(path)
    assert isinstance(choices.data["models"], dict) and isinstance(choices.data["comfy_dirs"], list)
    assert all(isinstance(d, Path) for d in choices.comfy_dirs)
    assert choices.resolve("ti2v-5b") == {} and choices.chosen("ti2v-5b") == {}
    assert "Ignoring" in caplog.text
    choices.save()  # and it writes back a good file
    assert isinstance(json.loads(path.read_text())["models"], dict)


def test_a_good_choices_file_keeps_its_entries(tmp_path: Path) -> None:
    path = tmp_path / "choices.json"
    entry = {"path": "/some/vae.safetensors", "fingerprint": "abc"}
    path.write_text(json.dumps({"comfy_dirs": ["/x"], "models": {"ti2v-5b": {"vae": entry}}, "other": 1}))
    choices = discovery.RememberedChoices(path)
    assert choices.data == {"comfy_dirs": ["/x"], "models": {"ti2v-5b": {"vae": entry}}, "other": 1}


def test_the_library_and_the_cli_start_with_a_wrong_choices_file(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config"
    config.mkdir()
    (config / "choices.json").write_text('{"models": [], "comfy_dirs": {"a": 1}}')
    monkeypatch.setenv("WAN_LITE_CONFIG_DIR", str(config))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    library = ModelLibrary(tmp_path / "models")
    assert library.comfy_dirs() == [] and library.scan_components() == []
    run = subprocess.run([sys.executable, "-m", "wan_lite", "models", "--scan", str(tmp_path)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert "No Wan 2.2 files found" in run.stdout


def test_bad_json_in_the_outputs_folder_does_not_break_the_history(tmp_path: Path) -> None:
    out = tmp_path / "outputs"
    out.mkdir()
    (out / "good.mp4").write_bytes(b"\0")
    (out / "good.json").write_text(json.dumps({"settings": {"prompt": "a fox", "loras": 5, "seed": 3},
                                               "timings": {"total": "x", "decode": 1}}))
    for name, text in {"list.json": "[]", "deep.json": "[" * 100_000, "bin.json": "\udcff"}.items():
        (out / name).write_text(text, errors="surrogateescape")
        (out / name.replace(".json", ".mp4")).write_bytes(b"\0")
    (out / "dir.json").mkdir()
    os.mkfifo(out / "fifo.json")  # reading it would block the UI
    entries = read_history(out)
    assert [e.prompt for e in entries] == ["a fox"]
    assert "a fox" in describe(entries[0]) and entries[0].timings == {"decode": 1.0}


def test_a_folder_that_cannot_be_listed_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wan_lite.errors import CheckpointError
    from wan_lite.loading import formats

    locked, fine = tmp_path / "locked", tmp_path / "fine"
    locked.mkdir()
    fine.mkdir()
    save_file({"w": torch.zeros(2)}, str(fine / "x.safetensors"))
    real = Path.iterdir

    def deny(self: Path):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", deny)  # tests run as root: chmod would not stop them
    assert [f.component.path.name for f in discovery.scan([("comfyui", tmp_path)])] == ["x.safetensors"]
    with pytest.raises(CheckpointError, match="Permission denied") as err:
        formats.detect(locked)
    assert str(locked) in str(err.value)
