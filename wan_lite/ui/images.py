"""Start images for image-to-video: content checks before anything decodes them, normalisation
(EXIF orientation, alpha flattened, size bounded) and the exact frame the model will use.

Size rules (../shared/reference/wan22-dit-pipelines-schedulers.md):
- TI2V-5B (5.3, 8): `best_output_size` picks a size of about the chosen area, multiples of 32, close
  to the image's aspect ratio; the image is scaled to cover it (Lanczos) and centre-cropped.
- I2V-A14B (5.2): the latent size comes from the area and the aspect ratio (multiples of 16 pixels);
  the image is resized to exactly that size, a slight stretch and no crop.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from wan_lite.errors import InputError
from wan_lite.registry import ModelSpec

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 50 * 1024 * 1024
MAX_SIDE = 4096  # larger images are scaled down on upload; the model never needs more than 1280
MAX_PIXELS = 60_000_000  # refuse decompression bombs before decoding
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
            if probe.width * probe.height > MAX_PIXELS:
                raise InputError(f"The image is {probe.width}×{probe.height} pixels, too large to open safely.",
                                 "Scale it below 60 megapixels first.")
            probe.verify()  # structural check; the image must be reopened afterwards
        with Image.open(src, formats=[kind]) as im:
            im.load()
            if im.getexif().get(0x0112, 1) not in (0, 1):  # 0x0112: the EXIF orientation tag
                notes.append("Turned upright according to the camera's orientation tag.")
            oriented = ImageOps.exif_transpose(im)
            rgb = _flatten(oriented, notes)
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
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
# Sizes the pipelines derive from an image


def best_output_size(w: int, h: int, dw: int, dh: int, expected_area: int) -> tuple[int, int]:
    """(out_w, out_h): multiples of (dw, dh), area <= expected_area, aspect ratio closest to w/h.
    Ties go to the height-first candidate, as in the official code."""
    ratio = w / h
    ow = math.sqrt(expected_area * ratio)
    oh = expected_area / ow
    ow1 = int(ow // dw * dw)
    oh1 = int(expected_area / ow1 // dh * dh)
    oh2 = int(oh // dh * dh)
    ow2 = int(expected_area / oh2 // dw * dw)

    def err(r: float) -> float:
        return max(ratio / r, r / ratio)

    return (ow1, oh1) if err(ow1 / oh1) < err(ow2 / oh2) else (ow2, oh2)


def i2v_a14b_size(w: int, h: int, max_area: int, stride: int = 8, patch: int = 2) -> tuple[int, int]:
    """(W, H) of I2V-A14B's video for a w x h image: latent sides floored to even numbers."""
    ar = h / w
    lat_h = round(math.floor(math.floor(math.sqrt(max_area * ar) / stride) / patch) * patch)
    lat_w = round(math.floor(math.floor(math.sqrt(max_area / ar) / stride) / patch) * patch)
    return lat_w * stride, lat_h * stride


@dataclass(frozen=True)
class Framing:
    width: int  # the video's size
    height: int
    box: tuple[int, int, int, int]  # the region of the (uploaded) image that is used: l, t, r, b
    cropped: bool  # False: the whole image is used, resized (possibly slightly stretched)


def model_framing(spec: ModelSpec, image_w: int, image_h: int, area: int) -> Framing:
    """How `spec` turns a image_w x image_h picture into its first frame, for a size of `area` pixels."""
    if spec.task == "ti2v":
        d = spec.size_multiple  # 32 = VAE stride 16 x patch 2
        ow, oh = best_output_size(image_w, image_h, d, d, area)
        scale = max(ow / image_w, oh / image_h)
        sw, sh = round(image_w * scale), round(image_h * scale)
        left, top = (sw - ow) // 2, (sh - oh) // 2
        # The crop box in the uploaded image's pixels (for drawing; the frame itself is cut after scaling).
        box = (round(left / scale), round(top / scale), round((left + ow) / scale), round((top + oh) / scale))
        return Framing(ow, oh, box, cropped=(sw, sh) != (ow, oh))
    w, h = i2v_a14b_size(image_w, image_h, area, spec.vae_stride[1], spec.patch_size[1])
    return Framing(w, h, (0, 0, image_w, image_h), cropped=False)


def model_frame(path: Path, spec: ModelSpec, area: int) -> tuple[Image.Image, Framing]:
    """The exact first frame the model gets (TI2V: Lanczos + centre crop; I2V-A14B: a resize)."""
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    framing = model_framing(spec, rgb.width, rgb.height, area)
    if spec.task == "ti2v":
        scale = max(framing.width / rgb.width, framing.height / rgb.height)
        scaled = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.Resampling.LANCZOS)
        left, top = (scaled.width - framing.width) // 2, (scaled.height - framing.height) // 2
        return scaled.crop((left, top, left + framing.width, top + framing.height)), framing
    # The pipeline uses torch bicubic interpolation; PIL's bicubic is a faithful preview of it.
    return rgb.resize((framing.width, framing.height), Image.Resampling.BICUBIC), framing
