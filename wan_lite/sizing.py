"""Valid sizes and frame counts, and the official image-to-video output size rules.

Everything here is pure arithmetic (no torch), shared by the engine, the CLI and the UI.
"""

from __future__ import annotations

import math

from wan_lite.registry import ModelSpec


def snap_multiple(value: int, multiple: int) -> int:
    """Nearest positive multiple of `multiple` (ties go up)."""
    return max(multiple, int(math.floor(value / multiple + 0.5)) * multiple)


def snap_frames(frames: int) -> int:
    """Nearest frame count of the form 4n + 1 (ties go up), at least 1."""
    return max(1, 4 * int(math.floor((frames - 1) / 4 + 0.5)) + 1)


def check_size(spec: ModelSpec, width: int, height: int, frames: int) -> tuple[int, int, int, list[str]]:
    """Snap width/height to the model's granularity and frames to 4n+1, with notes for people."""
    notes: list[str] = []
    m = spec.size_multiple
    w, h, f = snap_multiple(width, m), snap_multiple(height, m), snap_frames(frames)
    if (w, h) != (width, height):
        notes.append(f"Size {width}x{height} is not a multiple of {m} px for {spec.name}; using {w}x{h}.")
    if f != frames:
        notes.append(f"{frames} frames is not of the form 4n+1; using {f}.")
    if (w, h) not in spec.sizes:
        trained = ", ".join(f"{a}x{b}" for a, b in spec.sizes)
        notes.append(f"{w}x{h} is not a trained size of {spec.name} ({trained}); quality may suffer.")
    return w, h, f, notes


def best_output_size(w: int, h: int, dw: int, dh: int, expected_area: int) -> tuple[int, int]:
    """The official TI2V output size for an image of w x h: the (width, height) with the closest
    aspect ratio among two candidates of area <= expected_area divisible by (dw, dh)."""
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


def i2v_a14b_size(image_w: int, image_h: int, max_area: int, stride: int = 8, patch: int = 2) -> tuple[int, int]:
    """The official I2V-A14B output (width, height): keeps the image's aspect within max_area,
    latent sides rounded down to even numbers (the image is then stretched, not cropped)."""
    ar = image_h / image_w
    lat_h = round(math.floor(math.floor(math.sqrt(max_area * ar) / stride) / patch) * patch)
    lat_w = round(math.floor(math.floor(math.sqrt(max_area / ar) / stride) / patch) * patch)
    return lat_w * stride, lat_h * stride


def image_output_size(spec: ModelSpec, image_w: int, image_h: int, width: int, height: int) -> tuple[int, int]:
    """Output (width, height) of image-to-video for a requested size (only its area is used)."""
    area = width * height
    if not spec.crops_image:  # I2V-A14B: the official size rule for the image's aspect ratio
        return i2v_a14b_size(image_w, image_h, area, spec.vae_stride[1], spec.patch_size[1])
    m = spec.size_multiple
    return best_output_size(image_w, image_h, m, m, area)


def centre_crop_box(image_w: int, image_h: int, out_w: int, out_h: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """TI2V: resize the image so it covers (out_w, out_h), then crop the centre.
    Returns ((resized_w, resized_h), (left, top, right, bottom)) in resized pixels."""
    scale = max(out_w / image_w, out_h / image_h)
    rw, rh = round(image_w * scale), round(image_h * scale)
    left, top = (rw - out_w) // 2, (rh - out_h) // 2
    return (rw, rh), (left, top, left + out_w, top + out_h)
