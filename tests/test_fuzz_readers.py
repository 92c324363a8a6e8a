"""Random headers and JSON files through the real readers: each gives a clean WanLiteError or a
successful read, never another exception type (issue 23, item 5). Seeded and bounded (a few
seconds): safetensors headers (random JSON values, lengths and offsets), GGUF files (a valid
tiny file with random bytes overwritten in its header, and random headers after the magic),
and config.json / safetensors index / choices.json files of random JSON."""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from wan_lite.errors import WanLiteError
from wan_lite.loading import discovery, formats, layout
from wan_lite.loading.files import weight_map
from wan_lite.loading.sources import GGUFSource
from wan_lite.loading.tensors import SafetensorsSource

CASES = 300
DTYPES = ["F32", "F16", "BF16", "F8_E4M3", "I64", "U8", "BOOL", "Q4_K", "", "f32"]


def random_json(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, 1, -1, 7, 2**31, 2**63, -(2**64), rng.randrange(-100, 100)])
    if kind == 3:
        return rng.choice([0.5, -1e308, 1e308, float(rng.random())])
    if kind == 4:
        return rng.choice(["", "weight_map", "__metadata__", "F32", "../x", "a.safetensors", "\u00e9\u4e2d"])
    if kind == 5:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["weight_map", "models", "comfy_dirs", "model_type", "dim", "in_dim", "path", "fingerprint",
            "ti2v-5b", "vae", "dit", "x"]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def random_entry(rng: random.Random) -> object:
    """A tensor entry that is often nearly valid, so the checks past the first one are reached."""
    if rng.random() < 0.2:
        return random_json(rng)
    shape = [rng.choice([0, 1, 2, 3, -1, 2**40]) for _ in range(rng.randrange(4))]
    start = rng.choice([0, 4, 8, 16, -4, 2**62])
    entry = {"dtype": rng.choice(DTYPES), "shape": shape,
             "data_offsets": [start, start + rng.choice([0, 4, 8, 12, 16, -8])]}
    for key in rng.sample(list(entry), rng.randrange(2)):  # sometimes a field is missing or wrong
        entry[key] = random_json(rng) if rng.random() < 0.5 else entry.pop(key) and None
    return entry


def random_safetensors(path: Path, rng: random.Random) -> None:
    if rng.random() < 0.2:
        header: object = random_json(rng)
    else:
        header = {f"t{i}": random_entry(rng) for i in range(rng.randrange(4))}
        if rng.random() < 0.3:
            header["__metadata__"] = random_json(rng) if rng.random() < 0.5 else {"format": "pt"}
    raw = json.dumps(header).encode()
    if rng.random() < 0.1:
        raw = raw[: rng.randrange(len(raw) + 1)]  # cut JSON
    n = len(raw) if rng.random() < 0.8 else rng.choice([0, 3, len(raw) + 5, 2**63])
    path.write_bytes(struct.pack("<Q", n) + raw + bytes(rng.randrange(40)))


def clean(call: Callable[[], object]) -> None:
    """`call` either succeeds or raises a WanLiteError; anything else fails the test."""
    try:
        call()
    except WanLiteError:
        pass


def test_random_safetensors_headers(tmp_path: Path) -> None:
    rng = random.Random(23)
    for i in range(CASES):
        path = tmp_path / f"f{i % 10}.safetensors"
        random_safetensors(path, rng)
        comps = formats.detect(path)  # never raises for a bad file: it lists it as broken
        assert len(comps) == 1 and (comps[0].role != "broken" or comps[0].problem)

        def read_all(path: Path = path) -> None:
            source = SafetensorsSource([path])
            for name in source:
                source.read(name)

        clean(read_all)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    gguf = pytest.importorskip("gguf")
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "wan")
    writer.add_string("comfy.gguf.orig_shape.w", "x")
    writer.add_array("comfy.gguf.orig_shape.v", [2, 3])
    writer.add_tensor("w", np.arange(8, dtype=np.float32).reshape(2, 4))
    writer.add_tensor("v", np.ones(6, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def test_random_gguf_headers(tmp_path: Path, tiny_gguf: bytes) -> None:
    rng = random.Random(5)
    path = tmp_path / "f.gguf"
    header_end = len(tiny_gguf) - 64  # the tensor data sits at the end
    for _ in range(CASES):
        if rng.random() < 0.7:
            data = bytearray(tiny_gguf)
            for _ in range(rng.randrange(1, 6)):
                data[rng.randrange(4, header_end)] = rng.randrange(256)
        else:
            data = bytearray(b"GGUF" + struct.pack("<IQQ", rng.choice([1, 2, 3, 99]), rng.choice([0, 1, 2**40]),
                                                   rng.choice([0, 1, 5, 2**40])) + rng.randbytes(rng.randrange(64)))
        path.write_bytes(bytes(data))
        comps = formats.detect(path)
        assert len(comps) == 1 and (comps[0].role != "broken" or comps[0].problem)

        def read_all() -> None:
            source = GGUFSource(path)
            for name in source:
                source[name]

        clean(read_all)


def test_random_config_index_and_choices_json(tmp_path: Path) -> None:
    rng = random.Random(7)
    folder = tmp_path / "model"
    folder.mkdir()
    for _ in range(CASES):
        text = json.dumps(random_json(rng))
        if rng.random() < 0.1:
            text = text[: rng.randrange(len(text) + 1)] + rng.choice(["", "[" * 5000, "\x00"])
        (folder / "config.json").write_text(text)
        (folder / layout.INDEX_FILE).write_text(text)
        clean(lambda: layout.detect_spec(folder))
        clean(lambda: weight_map(folder / layout.INDEX_FILE))
        assert all(c.role == "broken" or c.usable is not None for c in formats.detect(folder))
        (tmp_path / "choices.json").write_text(text)
        choices = discovery.RememberedChoices(tmp_path / "choices.json")
        assert isinstance(choices.comfy_dirs, list)
        for model in ("ti2v-5b", "t2v-a14b"):
            choices.resolve(model)
            choices.chosen(model)
