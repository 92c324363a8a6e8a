"""Mistaken and hostile requests are refused at once by `wan_lite.job.resolve` with a message that
names the field and the allowed range, before anything is allocated; nothing silently becomes
something else (issue 23, items 1, 2 and the image cases of 5)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wan_lite.api import GenerateRequest
from wan_lite.errors import InputError
from wan_lite.job import load_image, resolve
from wan_lite.registry import get_spec
from wan_lite.sizing import image_output_size, max_frames, max_side

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("fields", "message"), [
    (dict(width=100000, height=100000), "width must be a whole number from 1 to 2560 px"),
    (dict(frames=10001), "frame count must be a whole number from 1 to 241"),
    (dict(frames=0), "frame count must be a whole number from 1"),
    (dict(steps=0), "step count must be a whole number from 1 to 1000"),
    (dict(steps=2.5), "step count must be a whole number"),
    (dict(guidance=math.nan), "guidance must be a number from 0 to 30"),
    (dict(guidance=math.inf), "guidance must be a number from 0 to 30"),
    (dict(guidance_low=-1.0, model="t2v-a14b"), "low-noise guidance must be a number from 0 to 30"),
    (dict(shift=0.0), "shift must be a number above 0 and at most 100"),
    (dict(shift=math.nan), "shift must be a number above 0"),
    (dict(seed=2**64), "seed must be a whole number from 0 to 18446744073709551615"),
    (dict(seed="abc"), "seed must be a whole number"),
    (dict(cache="turbo"), "Unknown step cache setting"),
])
def test_out_of_range_fields_are_refused_with_the_range(fields, message) -> None:
    with pytest.raises(InputError, match=message):
        resolve(GenerateRequest("a fox", **fields))


def test_the_largest_values_are_accepted() -> None:
    spec = get_spec("ti2v-5b")
    job = resolve(GenerateRequest("a fox", width=max_side(spec), height=max_side(spec) // 2,
                                  frames=max_frames(spec), seed=2**64 - 1))
    assert (job.width, job.height, job.frames, job.seed) == (2560, 1280, 241, 2**64 - 1)


@pytest.mark.parametrize("size", [(4000, 1), (300, 1), (1, 300), (3000, 400)])
def test_images_past_4_to_1_are_refused(size) -> None:
    with pytest.raises(InputError, match="differ by more than 4:1"):
        resolve(GenerateRequest("a fox", image=Image.new("RGB", size)))


def test_a_huge_image_is_refused_before_its_pixels_are_decoded(tmp_path) -> None:
    path = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(path)  # 81 MP, a few kB on disk
    with pytest.raises(InputError, match="up to 60 MP"):
        load_image(path)


def test_16_bit_greyscale_keeps_its_levels(tmp_path) -> None:
    path = tmp_path / "grey16.png"
    levels = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(levels).save(path)
    rgb = np.asarray(load_image(path))
    assert rgb.shape == (64, 64, 3) and rgb.min() == 0 and rgb.max() == 255
    assert len(np.unique(rgb[..., 0])) > 200  # a ramp, not clipped to white


def test_small_areas_never_give_a_side_of_zero() -> None:
    for name in ("ti2v-5b", "i2v-a14b"):
        spec = get_spec(name)
        for image in ((400, 100), (100, 400), (1000, 999)):
            w, h = image_output_size(spec, *image, spec.size_multiple, spec.size_multiple)
            assert w >= spec.size_multiple and h >= spec.size_multiple


def test_the_trained_size_note_names_the_size_made() -> None:
    job = resolve(GenerateRequest("a fox", model="i2v-a14b", image=Image.new("RGB", (100, 70)), width=176,
                                  height=128))
    made = f"{job.width}x{job.height}"
    assert made != "176x128"
    assert any(n.startswith(f"{made} is not a trained size") for n in job.notes)
    assert not any("176x128 is not a trained size" in n for n in job.notes)


def test_cli_refuses_an_absurd_size_at_once_with_exit_2() -> None:
    run = subprocess.run([sys.executable, "-m", "wan_lite", "generate", "--model", "ti2v-5b", "--dit", "nothing",
                          "--prompt", "x", "--size", "100000x100000"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "width must be a whole number from 1 to 2560 px" in run.stderr
