"""Start images for image-to-video: content checks before anything decodes them, normalisation
(EXIF orientation, alpha flattened, size bounded) and the exact frame the model will use.

Size rules of the official pipelines (computed by wan_lite.sizing):
- TI2V-5B: `best_output_size` picks a size of about the chosen area, multiples of 32, close
  to the image's aspect ratio; the image is scaled to cover it (Lanczos) and centre-cropped.
- I2V-A14B: the latent size comes from the area and the aspect ratio (multiples of 16 pixels);
  the image is resized to exactly that size, a slight stretch and no crop.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from wan_lite.errors import InputError
from wan_lite.registry import ModelSpec
from wan_lite.sizing import (
    MAX_IMAGE_PIXELS,
    best_output_size,
    centre_crop_box,
    i2v_a14b_size,
    image_output_size,
    video_size,
)

__all__ = ["CheckedImage", "Framing", "best_output_size", "check_image", "i2v_a14b_size", "model_frame",
           "model_framing", "sniff_format"]

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 50 * 1024 * 1024
MAX_SIDE = 4096  # larger images are scaled down on upload; the model never needs more than 1280
MAX_PIXELS = MAX_IMAGE_PIXELS  # refuse decompression bombs before decoding (job.load_image's cap)
FLATTEN_COLOUR = (255, 255, 255)
FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP"}


def sniff_format(head: bytes) -> str | None:
    """The image format from the file's first bytes ("PNG", "JPEG", "WEBP"), or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


@dataclass(frozen=True)
class CheckedImage:
    path: Path  # the normalised RGB PNG in the upload folder
    width: int
    height: int
    source_format: str
    notes: tuple[str, ...]


def check_image(src: Path, upload_dir: Path) -> CheckedImage:
    """Verify an upload by content, then save it as a plain RGB PNG in `upload_dir`.

    Raises InputError (with what to do) for anything that is not a usable PNG, JPEG or WebP.
    """
    src = Path(src)
    hint = "Upload a PNG, JPEG or WebP picture."
    try:
        size = src.stat().st_size
        with src.open("rb") as fh:
            head = fh.read(16)
    except OSError as err:
        raise InputError(f"The uploaded file cannot be read ({err.strerror}).", hint) from None
    if size > MAX_UPLOAD_BYTES:
        raise InputError(f"The image is {size / 2**20:.0f} MB; the limit is {MAX_UPLOAD_BYTES // 2**20} MB.", hint)
    kind = sniff_format(head)
    if kind is None:
        raise InputError(f"“{src.name}” is not a PNG, JPEG or WebP image (whatever its name says).", hint)

    notes: list[str] = []
    try:
        with Image.open(src, formats=[kind]) as probe:
            _check_pixels(probe, src)
            probe.verify()  # structural check; the image must be reopened afterwards
        with Image.open(src, formats=[kind]) as im:
            im.load()
            if im.getexif().get(0x0112, 1) not in (0, 1):  # 0x0112: the EXIF orientation tag
                notes.append("Turned upright according to the camera's orientation tag.")
            oriented = ImageOps.exif_transpose(im)
            rgb = _flatten(oriented, notes)
    except InputError:
        raise
    except Image.DecompressionBombError:  # PIL's own cap, met on open above 2x its limit
        raise _too_large(src) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InputError(f"“{src.name}” looks like a {FORMATS[kind]} file but cannot be decoded ({err}).", hint) from None

    if max(rgb.size) > MAX_SIDE:
        scale = MAX_SIDE / max(rgb.size)
        new = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        notes.append(f"Scaled down from {rgb.width}×{rgb.height} to {new[0]}×{new[1]}.")
        rgb = rgb.resize(new, Image.Resampling.LANCZOS)
    upload_dir.mkdir(parents=True, exist_ok=True)
    out = upload_dir / f"start-{uuid.uuid4().hex[:12]}.png"
    rgb.save(out, format="PNG")
    return CheckedImage(out, rgb.width, rgb.height, kind, tuple(notes))


def _flatten(im: Image.Image, notes: list[str]) -> Image.Image:
    """RGB with any transparency composited over white (the model has no alpha channel)."""
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            notes.append("Transparent parts were filled with white.")
        background = Image.new("RGBA", rgba.size, FLATTEN_COLOUR + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


# ---------------------------------------------------------------------------------------------
# The frame the pipelines derive from an image (the size rules live in wan_lite.sizing, shared
# with the engine, so the preview can never disagree with what the pipeline does)


@dataclass(frozen=True)
class Framing:
    width: int  # the video's size
    height: int
    box: tuple[int, int, int, int]  # the region of the (uploaded) image that is used: l, t, r, b
    cropped: bool  # False: the whole image is used, resized (possibly slightly stretched)


def model_framing(spec: ModelSpec, image_w: int, image_h: int, size: int | tuple[int, int]) -> Framing:
    """How `spec` turns a image_w x image_h picture into its first frame for the Size box's
    `size` (width, height), by `sizing.video_size`, the rule every request goes through; an int
    is an area already snapped (a square of that area's sides is not asked for)."""
    if isinstance(size, tuple):
        ow, oh, _ = video_size(spec, size[0], size[1], (image_w, image_h))
    else:
        ow, oh = image_output_size(spec, image_w, image_h, size, 1)  # only the area of the size is used
    if spec.crops_image:
        (sw, sh), (left, top, right, bottom) = centre_crop_box(image_w, image_h, ow, oh)
        scale = sw / image_w
        # The crop box in the uploaded image's pixels (for drawing; the frame itself is cut after scaling).
        box = (round(left / scale), round(top / scale), round(right / scale), round(bottom / scale))
        return Framing(ow, oh, box, cropped=(sw, sh) != (ow, oh))
    return Framing(ow, oh, (0, 0, image_w, image_h), cropped=False)


def _check_pixels(im: Image.Image, path: Path) -> None:
    """Refuse an image above MAX_PIXELS from its header, before any pixel is decoded."""
    if im.width * im.height > MAX_PIXELS:
        raise _too_large(path, f"{im.width}×{im.height} pixels")


def _too_large(path: Path, size: str = f"over {MAX_PIXELS / 1e6:.0f} megapixels") -> InputError:
    return InputError(f"“{Path(path).name}” is {size}, too large to open safely.",
                      f"Scale it below {MAX_PIXELS / 1e6:.0f} megapixels first.")


def model_frame(path: Path, spec: ModelSpec, area: int | tuple[int, int]) -> tuple[Image.Image, Framing]:
    """The exact first frame the model gets (TI2V: Lanczos + centre crop; I2V-A14B: a resize)."""
    try:
        with Image.open(path) as im:
            _check_pixels(im, path)
            rgb = im.convert("RGB")
    except Image.DecompressionBombError:
        raise _too_large(path) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InputError(f"“{Path(path).name}” cannot be decoded as a picture ({err}).",
                         "Upload a PNG, JPEG or WebP picture.") from None
    framing = model_framing(spec, rgb.width, rgb.height, area)
    if spec.crops_image:
        resized, box = centre_crop_box(rgb.width, rgb.height, framing.width, framing.height)
        return rgb.resize(resized, Image.Resampling.LANCZOS).crop(box), framing
    # The pipeline uses torch bicubic interpolation; PIL's bicubic is a faithful preview of it.
    return rgb.resize((framing.width, framing.height), Image.Resampling.BICUBIC), framing
