"""Output files: truncation rule, mp4 round trip with embedded settings, atomic writes, latents, names."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from wan_lite.errors import InputError
from wan_lite.output import (
    LATENTS_SUFFIX,
    load_latents,
    output_stem,
    read_mp4,
    read_mp4_metadata,
    save_latents,
    video_to_uint8,
    write_json_atomic,
    write_mp4,
)

SETTINGS = {
    "prompt": "一只橘猫在月光下弹钢琴, cinematic; a=b #not-a-comment \\ back\\slash\nsecond line",
    "negative_prompt": "色调艳丽，过曝",
    "model": "ti2v-5b",
    "seed": 1234567890123,
    "steps": 50,
    "shift": 5.0,
    "guidance": [5.0, 5.0],
    "size": {"width": 64, "height": 48},
    "emoji": "🎹",
}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".partial"))


def _smooth_frames(f: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colour content. At crf 10 the codec itself loses ~1 level; yuv420p's half-resolution
    chroma (the reference's format too) adds a little more where colours change quickly."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = []
    for i in range(f):
        r = 128 + 90 * np.sin(xx / 20 + i / 5)
        g = 128 + 90 * np.cos(yy / 17 - i / 6)
        b = 128 + 70 * np.sin((xx + yy) / 25 + rng.uniform(0, 0.1))
        frames.append(np.stack([r, g, b], -1))
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


def test_video_to_uint8_truncates_like_the_reference():
    # channel 0 .. 2 hold different values; 0.0 maps to 127.5 -> 127 (rounding would give 128)
    nan = float("nan")
    values = torch.tensor([[-5.0, -1.0, -0.999, 0.0], [0.0, 0.999, 1.0, 5.0], [0.5, -0.5, 0.25, nan]])
    video = values[:, None, None, :].expand(3, 2, 1, 4)  # [3, F=2, H=1, W=4]
    out = video_to_uint8(video)
    assert out.dtype == np.uint8 and out.shape == (2, 1, 4, 3)
    assert out[0, 0, :, 0].tolist() == [0, 0, 0, 127]
    assert out[0, 0, :, 1].tolist() == [127, 254, 255, 255]
    assert out[0, 0, :, 2].tolist() == [191, 63, 159, 127]  # 191.25, 63.75, 159.375; NaN -> grey

    x = torch.rand(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2
    got = video_to_uint8(x).astype(np.int64)
    exact = ((np.clip(x.double().numpy(), -1, 1) + 1) / 2 * 255).transpose(1, 2, 3, 0)
    # float32 vs float64 may only disagree on values within rounding distance of an integer
    clear = (np.abs(exact - np.round(exact)) > 1e-4) | (exact == 0) | (exact == 255)
    assert clear.mean() > 0.99
    assert np.array_equal(got[clear], np.floor(exact[clear]).astype(np.int64))
    assert video_to_uint8(x[None]).shape == (4, 8, 8, 3)  # [1, 3, F, H, W] accepted too


@pytest.mark.parametrize("fps", [24, 16])
def test_mp4_round_trip(tmp_path, fps):
    frames = _smooth_frames(9, 48, 64)
    path = write_mp4(tmp_path / "clip.mp4", frames, fps, SETTINGS)
    assert path == tmp_path / "clip.mp4" and path.stat().st_size > 0
    back, got_fps = read_mp4(path)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert got_fps == pytest.approx(fps)
    diff = np.abs(back.astype(np.int32) - frames.astype(np.int32))
    assert diff.mean() < 2.5, f"mean abs diff {diff.mean():.3f}"
    assert read_mp4_metadata(path) == SETTINGS
    assert _leftovers(tmp_path) == []
    # x264 records its settings in the stream: the reference's quality 8 is crf 10, yuv420p.
    assert b"crf=10.0" in path.read_bytes()
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    reader.close()
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")


def test_mp4_from_decoded_video_and_frame_iterator(tmp_path):
    video = torch.linspace(-1, 1, 5 * 32 * 32).reshape(1, 5, 32, 32).expand(3, -1, -1, -1)  # grey ramp
    frames = video_to_uint8(video)
    path = write_mp4(tmp_path / "gen.mp4", (f for f in frames), 16, {"seed": 1})
    back, _ = read_mp4(path)
    assert back.shape == (5, 32, 32, 3)
    # grey content has no chroma to subsample: only the codec's loss remains
    assert np.abs(back.astype(np.int32) - frames.astype(np.int32)).mean() < 1.0
    assert read_mp4_metadata(path) == {"seed": 1}


def test_sizes_are_never_rescaled(tmp_path):
    even = _smooth_frames(3, 24, 40)  # even, not multiples of 16: kept exactly
    back, _ = read_mp4(write_mp4(tmp_path / "even.mp4", even, 24))
    assert back.shape == (3, 24, 40, 3)
    odd = _smooth_frames(3, 17, 33)  # odd: edge-padded by one pixel, never resampled
    back, _ = read_mp4(write_mp4(tmp_path / "odd.mp4", odd, 24))
    assert back.shape == (3, 18, 34, 3)
    assert np.abs(back[:, :17, :33].astype(np.int32) - odd.astype(np.int32)).mean() < 3.0


def test_failed_write_leaves_no_partial_file(tmp_path):
    frames = _smooth_frames(6, 32, 32)

    def broken():
        yield from frames[:3]
        raise RuntimeError("decoder crashed")

    target = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="decoder crashed"):
        write_mp4(target, broken(), 24, SETTINGS)
    assert not target.exists() and list(tmp_path.iterdir()) == []

    # An existing video survives a failed overwrite untouched.
    write_mp4(target, frames, 24, {"v": 1})
    before = target.read_bytes()
    with pytest.raises(ValueError):
        write_mp4(target, [frames[0], frames[1][:16]], 24)  # second frame has the wrong size
    assert target.read_bytes() == before
    assert read_mp4_metadata(target) == {"v": 1}
    assert _leftovers(tmp_path) == []


def test_video_without_settings_and_bad_files(tmp_path):
    plain = write_mp4(tmp_path / "plain.mp4", _smooth_frames(2, 16, 16), 24)
    assert read_mp4_metadata(plain) == {}
    with pytest.raises(InputError, match="not found"):
        read_mp4_metadata(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 10)
    with pytest.raises(InputError):
        read_mp4_metadata(junk)
    with pytest.raises(InputError):
        read_mp4(junk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_latents_round_trip(tmp_path, dtype):
    lat = torch.randn(48, 3, 4, 6, generator=torch.Generator().manual_seed(2)).to(dtype)
    path = save_latents(tmp_path / f"x{LATENTS_SUFFIX}", lat, SETTINGS)
    back, meta = load_latents(path)
    assert back.dtype == dtype and torch.equal(back, lat)
    assert meta == SETTINGS
    assert _leftovers(tmp_path) == []


def test_load_latents_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(InputError, match="not found"):
        load_latents(tmp_path / "nope.latents.safetensors")
    foreign = tmp_path / "model.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign))
    with pytest.raises(InputError, match="not wan_lite latents"):
        load_latents(foreign)
    garbage = tmp_path / "garbage.latents.safetensors"
    garbage.write_bytes(b"\x00\x01garbage" * 7)
    with pytest.raises(InputError, match="not a readable latents file"):
        load_latents(garbage)


def test_write_json_atomic(tmp_path):
    target = tmp_path / "sub" / "settings.json"
    write_json_atomic(target, {**SETTINGS, "image": Path("/in/cat.png"), "n": np.int64(3)})
    text = target.read_text(encoding="utf-8")
    assert "一只橘猫" in text  # readable, not \\u-escaped
    data = json.loads(text)
    assert data["image"] == "/in/cat.png" and data["n"] == 3 and data["prompt"] == SETTINGS["prompt"]

    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object()})
    assert json.loads(target.read_text(encoding="utf-8")) == data  # the old file is intact
    assert _leftovers(target.parent) == []


def test_output_stem(tmp_path):
    now = datetime(2025, 1, 31, 14, 25, 1)
    stem = output_stem(tmp_path, "A cat, playing the PIANO!  (slowly)", 42, "ti2v-5b", now=now)
    assert stem == tmp_path / "20250131-142501_ti2v-5b_s42_a-cat-playing-the-piano-slowly"

    chinese = output_stem(tmp_path, "一只猫", 7, "t2v-a14b", now=now)
    assert chinese.name == "20250131-142501_t2v-a14b_s7_untitled"
    assert output_stem(tmp_path, "Café crème", 1, "i2v-a14b", now=now).name.endswith("_cafe-creme")

    long = output_stem(tmp_path, "word " * 100, 1, "ti2v-5b", now=now).name
    assert long.isascii() and len(long) < 100 and not long.endswith("-")

    # Never reuse a stem that any existing file starts with.
    stem.with_suffix(".mp4").write_bytes(b"x")
    second = output_stem(tmp_path, "A cat, playing the PIANO!  (slowly)", 42, "ti2v-5b", now=now)
    assert second.name == stem.name + "-2"
    Path(str(second) + LATENTS_SUFFIX).write_bytes(b"x")
    third = output_stem(tmp_path, "A cat, playing the PIANO!  (slowly)", 42, "ti2v-5b", now=now)
    assert third.name == stem.name + "-3"
