"""Valid sizes and frame counts, and the official image-to-video output size rules.

Everything here is pure arithmetic (no torch), shared by the engine, the CLI and the UI.
"""

from __future__ import annotations

import math

from wan_lite.registry import ModelSpec

# What wan_lite makes at most, whatever the machine: each side up to twice the model's largest
# trained side, sides within 4:1 of each other, up to twice the trained frame count (about 10 s),
# and start images up to 60 megapixels (a larger one is refused before it is decoded).
MAX_ASPECT = 4.0
MAX_IMAGE_PIXELS = 60_000_000
MAX_STEPS = 1000


def read_size(text: object) -> tuple[int, int] | None:
    """"1280x704" (or 1280X704, 1280×704, 1280*704) -> (1280, 704); None when it is not two whole
    numbers joined by one of those. The one reading of a size for the CLI, the app and batch files;
    each caller says in its own words what it accepts (positive sides, ...)."""
    text = str(text).strip().lower().replace("×", "x").replace("*", "x")
    parts = text.split("x")
    try:
        w, h = (int(p) for p in parts)
    except ValueError:
        return None
    return w, h


def max_side(spec: ModelSpec) -> int:
    return 2 * max(max(size) for size in spec.sizes)


def max_frames(spec: ModelSpec) -> int:
    return 2 * spec.frames - 1


def snap_multiple(value: int, multiple: int) -> int:
    """Nearest positive multiple of `multiple` (ties go up)."""
    return max(multiple, int(math.floor(value / multiple + 0.5)) * multiple)


def snap_frames(frames: float, low: int = 1, high: int | None = None) -> int:
    """Nearest frame count of the form 4n + 1 (the VAE packs 4 frames per latent after the first;
    ties go up), within [low, high] (both of the form 4n + 1)."""
    snapped = max(low, 4 * int(math.floor((frames - 1) / 4 + 0.5)) + 1)
    return snapped if high is None else min(snapped, high)


def check_size(spec: ModelSpec, width: int, height: int, frames: int,
               trained_note: bool = True) -> tuple[int, int, int, list[str]]:
    """Snap width/height to the model's granularity and frames to 4n+1, with notes for people
    (and one when the size is not a trained one, unless `trained_note` is False: image-to-video
    tells it of the size that follows the image)."""
    notes: list[str] = []
    m = spec.size_multiple
    w, h, f = snap_multiple(width, m), snap_multiple(height, m), snap_frames(frames)
    if (w, h) != (width, height):
        notes.append(f"Size {width}x{height} is not a multiple of {m} px for {spec.name}; using {w}x{h}.")
    if f != frames:
        notes.append(f"{frames} frames is not of the form 4n+1; using {f}.")
    return w, h, f, notes + (trained_size_note(spec, w, h) if trained_note else [])


def trained_size_note(spec: ModelSpec, w: int, h: int) -> list[str]:
    if (w, h) in spec.sizes:
        return []
    trained = ", ".join(f"{a}x{b}" for a, b in spec.sizes)
    return [f"{w}x{h} is not a trained size of {spec.name} ({trained}); quality may suffer."]


def best_output_size(w: int, h: int, dw: int, dh: int, expected_area: int) -> tuple[int, int]:
    """The official TI2V output size for an image of w x h: the (width, height) with the closest
    aspect ratio among two candidates of area <= expected_area divisible by (dw, dh). A side
    the official rule would round down to 0 (a small area for a long image) is one step instead."""
    ratio = w / h
    ow = math.sqrt(expected_area * ratio)
    oh = expected_area / ow
    ow1 = max(dw, int(ow // dw * dw))
    oh1 = max(dh, int(expected_area / ow1 // dh * dh))
    oh2 = max(dh, int(oh // dh * dh))
    ow2 = max(dw, int(expected_area / oh2 // dw * dw))

    def err(r: float) -> float:
        return max(ratio / r, r / ratio)

    return (ow1, oh1) if err(ow1 / oh1) < err(ow2 / oh2) else (ow2, oh2)


def i2v_a14b_size(image_w: int, image_h: int, max_area: int, stride: int = 8, patch: int = 2) -> tuple[int, int]:
    """The official I2V-A14B output (width, height): keeps the image's aspect within max_area,
    latent sides rounded down to even numbers (the image is then stretched, not cropped); a side
    rounded down to 0 is one patch instead."""
    ar = image_h / image_w
    lat_h = max(patch, round(math.floor(math.floor(math.sqrt(max_area * ar) / stride) / patch) * patch))
    lat_w = max(patch, round(math.floor(math.floor(math.sqrt(max_area / ar) / stride) / patch) * patch))
    return lat_w * stride, lat_h * stride


def image_output_size(spec: ModelSpec, image_w: int, image_h: int, width: int, height: int) -> tuple[int, int]:
    """Output (width, height) of image-to-video for a requested size (only its area is used)."""
    area = width * height
    if not spec.crops_image:  # I2V-A14B: the official size rule for the image's aspect ratio
        return i2v_a14b_size(image_w, image_h, area, spec.vae_stride[1], spec.patch_size[1])
    m = spec.size_multiple
    return best_output_size(image_w, image_h, m, m, area)


def video_size(spec: ModelSpec, width: int, height: int,
               image_size: tuple[int, int] | None = None) -> tuple[int, int, list[str]]:
    """THE output size rule, the one the Python API, the CLI and the app (its crop preview too)
    all go through (`wan_lite.job.resolve`, `wan_lite.ui.images.model_framing`): the requested
    size snapped to the model's multiple, then, for image-to-video, the official size for the
    image's aspect ratio at that snapped area. Returns (width, height, notes)."""
    m = spec.size_multiple
    w, h = snap_multiple(width, m), snap_multiple(height, m)
    notes = [] if (w, h) == (width, height) else [
        f"Size {width}x{height} is not a multiple of {m} px for {spec.name}; using {w}x{h}."]
    if image_size is not None:
        ow, oh = image_output_size(spec, image_size[0], image_size[1], w, h)
        if (ow, oh) != (w, h):
            notes.append(f"Output size follows the image's aspect ratio: {ow}x{oh}.")
        w, h = ow, oh
    return w, h, notes


def centre_crop_box(image_w: int, image_h: int, out_w: int, out_h: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """TI2V: resize the image so it covers (out_w, out_h), then crop the centre.
    Returns ((resized_w, resized_h), (left, top, right, bottom)) in resized pixels."""
    scale = max(out_w / image_w, out_h / image_h)
    rw, rh = round(image_w * scale), round(image_h * scale)
    left, top = (rw - out_w) // 2, (rh - out_h) // 2
    return (rw, rh), (left, top, left + out_w, top + out_h)
