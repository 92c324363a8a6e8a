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


# ----------------------------------------------------------------------------------------------
# Latents files whose record is mis-shaped, damaged tokenizers


@pytest.mark.parametrize(("record", "words"), [
    ({"settings": [1, 2]}, "'settings' is a list"),
    ({"settings": {"model": "ti2v-5b", "timings": [1]}}, "'timings' is not an object"),
    ({"settings": {"model": "ti2v-5b", "timings": {"decode": "slow"}}}, "'timings' is not an object"),
    ({"settings": {"model": "ti2v-5b", "seed": "abc"}}, "the seed is 'abc'"),
    ({"settings": {"model": ["ti2v-5b"]}}, "the model is"),
    ({"settings": {"model": "ti2v-5b"}, "components": ["a"]}, "'components'"),
])
def test_latents_with_a_mis_shaped_record_are_refused(tmp_path: Path, record: dict, words: str) -> None:
    from wan_lite.errors import InputError
    from wan_lite.output import load_latents, save_latents

    path = save_latents(tmp_path / "x.latents.safetensors", torch.zeros(1, 4, 1, 2, 2), record)
    with pytest.raises(InputError, match="damaged") as err:
        load_latents(path)
    assert words in str(err.value) and "x.latents.safetensors" in str(err.value)


def test_cli_decode_of_damaged_latents_exits_2(tmp_path: Path) -> None:
    from wan_lite.output import save_latents

    path = save_latents(tmp_path / "x.latents.safetensors", torch.zeros(1, 4, 1, 2, 2),
                        {"settings": {"model": "ti2v-5b", "seed": "abc"}})
    run = subprocess.run([sys.executable, "-m", "wan_lite", "decode", str(path), "--device", "cpu"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "the seed is 'abc'" in run.stderr


@pytest.mark.parametrize("files", [
    {"tokenizer.json": "{not json"},
    {"spiece.model": "\0garbage\xff" * 10},
    {"tokenizer.json": "[]"},
])
def test_a_damaged_tokenizer_folder_is_named(tmp_path: Path, files: dict[str, str]) -> None:
    from wan_lite.models.text_encoder import load_tokenizer

    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="latin-1")
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(err.value)


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width x height pixels, with one tiny IDAT: a decompression bomb's header."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_a_30000_square_png_is_refused_by_the_upload_and_the_preview(tmp_path: Path) -> None:
    from wan_lite.errors import InputError
    from wan_lite.registry import MODELS
    from wan_lite.sizing import MAX_IMAGE_PIXELS
    from wan_lite.ui import images

    assert images.MAX_PIXELS == MAX_IMAGE_PIXELS
    within_pil = _png_header_only(tmp_path / "wide.png", 12000, 6000)  # under PIL's own limit, over ours
    with pytest.raises(InputError, match="12000×6000 pixels, too large"):
        images.check_image(within_pil, tmp_path / "up")
    src = _png_header_only(tmp_path / "bomb.png", 30000, 30000)
    with pytest.raises(InputError, match="is over 60 megapixels, too large to open safely") as err:
        images.check_image(src, tmp_path / "up")
    assert "bomb.png" in str(err.value) and not (tmp_path / "up").exists()
    with pytest.raises(InputError, match="too large"):
        images.model_frame(src, MODELS["ti2v-5b"], 1280 * 704)


def test_gguf_and_pth_readers_refuse_non_regular_files(tmp_path: Path) -> None:
    from wan_lite.loading.sources import GGUFSource

    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    for call in (GGUFSource, formats.detect):
        with pytest.raises(CheckpointError, match="not a regular file"):
            call(fifo)
    os.mkfifo(tmp_path / "pipe.pth")
    with pytest.raises(CheckpointError, match="not a regular file"):
        open_source(tmp_path / "pipe.pth")
