"""Start-image checks and the exact frame the models derive from an image."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from wan_lite.errors import InputError
from wan_lite.registry import get_spec
from wan_lite.ui import images
from wan_lite.ui.images import best_output_size, check_image, i2v_a14b_size, model_frame, model_framing


@pytest.mark.parametrize(("size", "expected"), [((1280, 720), (1248, 704)), ((720, 1280), (704, 1248)),
                                                ((1024, 1024), (960, 928)), ((832, 1104), (800, 1088))])
def test_best_output_size_matches_the_official_examples(size, expected):
    assert best_output_size(*size, 32, 32, 1280 * 704) == expected


def test_best_output_size_properties():
    for w, h in [(640, 480), (1920, 1080), (300, 2000), (4000, 3000), (1280, 704)]:
        ow, oh = best_output_size(w, h, 32, 32, 901120)
        assert ow % 32 == 0 and oh % 32 == 0 and ow * oh <= 901120


def test_i2v_a14b_size_matches_the_official_examples():
    assert i2v_a14b_size(1280, 720, 1280 * 720) == (1280, 720)
    assert i2v_a14b_size(832, 1104, 1280 * 720) == (832, 1104)
    w, h = i2v_a14b_size(1000, 1000, 832 * 480)
    assert w % 16 == 0 and h % 16 == 0 and w * h <= 832 * 480


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (64, 32), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 8, 32))  # a blue stripe on the left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    src = tmp_path / "photo.jpg"
    src.write_bytes(_save(im, "JPEG", exif=exif, quality=95))
    checked = check_image(src, tmp_path / "up")
    assert (checked.width, checked.height) == (32, 64)
    assert any("orientation" in n for n in checked.notes)
    with Image.open(checked.path) as out:
        assert out.format == "PNG" and out.mode == "RGB"
        r, g, b = out.getpixel((16, 2))  # the left stripe is now on top
        assert b > 200 and r < 60


def test_alpha_is_flattened_over_white(tmp_path):
    im = Image.new("RGBA", (20, 10), (0, 128, 0, 255))
    im.paste((0, 0, 0, 0), (0, 0, 10, 10))
    src = tmp_path / "cutout.webp"
    src.write_bytes(_save(im, "WEBP", lossless=True))
    checked = check_image(src, tmp_path / "up")
    with Image.open(checked.path) as out:
        assert out.mode == "RGB"
        assert out.getpixel((2, 2)) == (255, 255, 255) and out.getpixel((15, 5)) == (0, 128, 0)
    assert checked.source_format == "WEBP" and any("white" in n for n in checked.notes)


@pytest.mark.parametrize("payload", [b"this is not an image at all", b"GIF89a" + b"\x00" * 40,
                                     b"<svg xmlns='http://www.w3.org/2000/svg'/>"])
def test_non_images_with_a_png_name_are_refused(tmp_path, payload):
    src = tmp_path / "holiday.png"
    src.write_bytes(payload)
    with pytest.raises(InputError, match="not a PNG, JPEG or WebP"):
        check_image(src, tmp_path / "up")
    assert not (tmp_path / "up").exists() or not any((tmp_path / "up").iterdir())


def test_truncated_image_is_refused(tmp_path):
    data = _save(Image.new("RGB", (200, 200), (1, 2, 3)), "PNG")
    src = tmp_path / "cut.png"
    src.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cannot be decoded"):
        check_image(src, tmp_path / "up")


def test_oversized_images_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_SIDE", 100)
    src = tmp_path / "big.png"
    src.write_bytes(_save(Image.new("RGB", (400, 250), (9, 9, 9)), "PNG"))
    checked = check_image(src, tmp_path / "up")
    assert (checked.width, checked.height) == (100, 62)
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    with pytest.raises(InputError, match="too large"):
        check_image(src, tmp_path / "up")


def test_ti2v_frame_is_the_centre_crop_of_best_output_size(tmp_path):
    im = Image.new("RGB", (1600, 900), (0, 0, 0))
    im.paste((255, 255, 255), (790, 0, 810, 900))  # a white line in the middle
    path = tmp_path / "wide.png"
    im.save(path)
    spec = get_spec("ti2v-5b")
    frame, framing = model_frame(path, spec, 1280 * 704)
    assert frame.size == (framing.width, framing.height) == best_output_size(1600, 900, 32, 32, 1280 * 704)
    assert frame.getpixel((frame.width // 2, frame.height // 2))[0] > 200
    assert frame.getpixel((10, 10)) == (0, 0, 0)
    tall = model_framing(spec, 1000, 2500, 1280 * 704)
    assert tall.cropped and tall.box[1] > 0 and tall.box[0] == 0


def test_i2v_a14b_frame_is_a_resize_without_crop(tmp_path):
    path = tmp_path / "p.png"
    Image.new("RGB", (832, 1104), (10, 20, 30)).save(path)
    frame, framing = model_frame(path, get_spec("i2v-a14b"), 1280 * 720)
    assert frame.size == (832, 1104) and not framing.cropped and framing.box == (0, 0, 832, 1104)
