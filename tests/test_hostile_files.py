"""Mis-shaped, unreadable and non-regular files give a CheckpointError naming the file, never a
traceback (issue 23, item 5). Every bad file is written here; the real readers are called."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from wan_lite.errors import CheckpointError
from wan_lite.loading import formats, layout
from wan_lite.loading.tensors import SafetensorsSource, open_source, read_safetensors_header

ROOT = Path(__file__).resolve().parents[1]


def raw_safetensors(path: Path, header: object | bytes, data: bytes = b"") -> Path:
    """A file with `header` (JSON value, or raw bytes) as its safetensors header."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def refused(path: Path, *words: str) -> str:
    """The CheckpointError message of every safetensors reader for `path`, checked to name it."""
    with pytest.raises(CheckpointError) as err:
        read_safetensors_header(path)
    message = str(err.value)
    assert str(path) in message and all(w in message for w in words), message
    with pytest.raises(CheckpointError):
        SafetensorsSource([path])
    assert formats.detect(path)[0].role == "broken"  # a scan lists it instead of failing
    return message


GOOD = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


@pytest.mark.parametrize(("header", "words"), [
    ([1, 2, 3], ("JSON list",)),
    ({"w": 5}, ("'w'", "not an object")),
    ({"w": {"dtype": "F32", "shape": [2]}}, ("data_offsets",)),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, ("data_offsets",)),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": ["0", 8]}}, ("data_offsets",)),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, ("data_offsets",)),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, ("needs 8",)),
    ({"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, ("shape",)),
    ({"w": {"shape": [2], "data_offsets": [0, 8]}}, ("dtype",)),
    ({"__metadata__": ["a"], **GOOD}, ("__metadata__",)),
    ({"__metadata__": {"a": 1}, **GOOD}, ("__metadata__",)),
])
def test_mis_shaped_safetensors_headers_are_named(tmp_path: Path, header: object, words: tuple[str, ...]) -> None:
    refused(raw_safetensors(tmp_path / "bad.safetensors", header, b"\0" * 8), *words)


def test_offsets_past_the_end_read_as_truncated(tmp_path: Path) -> None:
    header = {"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}
    refused(raw_safetensors(tmp_path / "short.safetensors", header, b"\0" * 8), "truncated")


def test_deeply_nested_header_is_refused_not_a_recursion_error(tmp_path: Path) -> None:
    raw = b"[" * 200_000 + b"]" * 200_000
    refused(raw_safetensors(tmp_path / "deep.safetensors", raw), "nested too deeply")


def test_a_good_file_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "good.safetensors"
    save_file({"w": torch.arange(6.0).reshape(2, 3), "e": torch.zeros(0)}, str(path), metadata={"k": "v"})
    source = SafetensorsSource([path])
    assert torch.equal(source["w"], torch.arange(6.0).reshape(2, 3)) and source.metadata == {"k": "v"}


def test_index_whose_weight_map_is_a_list(tmp_path: Path) -> None:
    folder = tmp_path / "dit"
    folder.mkdir()
    (folder / layout.INDEX_FILE).write_text(json.dumps({"weight_map": ["a.safetensors"]}))
    with pytest.raises(CheckpointError, match="weight_map") as err:
        layout.find_model(tmp_path / "dit", "ti2v-5b")
    assert layout.INDEX_FILE in str(err.value)
    broken = [c for c in formats.detect(folder) if c.role == "broken"]
    assert len(broken) == 1 and "weight_map" in broken[0].problem
    (folder / layout.INDEX_FILE).write_text(json.dumps({"weight_map": {"w": "../../etc/passwd"}}))
    with pytest.raises(CheckpointError, match="not a file name"):
        layout.find_model(tmp_path / "dit", "ti2v-5b")


@pytest.mark.parametrize("text", ["[]", "[" * 100_000, "\xff"])
def test_config_json_of_the_wrong_shape_is_ignored_with_a_message(tmp_path: Path, text: str) -> None:
    (tmp_path / "config.json").write_text(text, encoding="latin-1")
    with pytest.raises(CheckpointError, match="does not look like a Wan 2.2 model folder"):
        layout.detect_spec(tmp_path)


# ----------------------------------------------------------------------------------------------
# Not regular files, unreadable files


def test_devices_fifos_and_folders_are_refused_before_reading(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes
    for path in (Path("/dev/zero"), fifo):
        for call in (read_safetensors_header, lambda p: SafetensorsSource([p]), open_source,
                     lambda p: formats.load_component(p, "vae")):
            with pytest.raises(CheckpointError, match="not a regular file") as err:
                call(path)
            assert str(path) in str(err.value)
    with pytest.raises(CheckpointError, match="is a folder"):
        read_safetensors_header(tmp_path)
    (tmp_path / "x.pth").mkdir()
    with pytest.raises(CheckpointError, match="is a folder"):
        open_source(tmp_path / "x.pth")


def test_permission_denied_is_a_checkpoint_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "locked.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    real_open = Path.open

    def deny(self: Path, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", deny)  # tests run as root: chmod would not stop them
    with pytest.raises(CheckpointError, match="Permission denied") as err:
        SafetensorsSource([path])
    assert str(path) in str(err.value)
    assert formats.detect(path)[0].role == "broken"


def test_cli_refuses_dev_zero_as_vae_with_exit_2() -> None:
    run = subprocess.run([sys.executable, "-m", "wan_lite", "generate", "--model", "ti2v-5b", "--prompt", "x",
                          "--dit", "/dev/zero", "--vae", "/dev/zero", "--text-encoder", "/dev/zero",
                          "--tokenizer", "/dev/zero"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "/dev/zero is not a regular file" in run.stderr
