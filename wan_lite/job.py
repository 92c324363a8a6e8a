"""A request resolved against a model's defaults: every field filled in and checked."""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wan_lite.errors import InputError
from wan_lite.registry import DEFAULT_NEGATIVE_PROMPT, ModelSpec
from wan_lite.sizing import check_size, image_output_size


@dataclass
class Job:
    """A fully resolved request: every default filled in, sizes valid."""

    prompt: str
    negative_prompt: str
    image: Any | None  # PIL.Image (RGB) or None
    width: int
    height: int
    frames: int
    steps: int
    guidance: tuple[float, float]  # (high-noise / only, low-noise)
    shift: float
    seed: int
    sampler: str
    notes: list[str]

    def settings(self, spec: ModelSpec) -> dict[str, Any]:
        return {
            "model": spec.name,
            "mode": "i2v" if self.image is not None else "t2v",
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "width": self.width,
            "height": self.height,
            "frames": self.frames,
            "fps": spec.fps,
            "steps": self.steps,
            "guidance": self.guidance[0],
            "guidance_low": self.guidance[1],
            "shift": self.shift,
            "seed": self.seed,
            "sampler": self.sampler,
        }


def load_image(image: Any) -> Any:
    """A PIL RGB image from a path or a PIL image; InputError when it cannot be read."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(image, Image.Image):
        img = image
    else:
        try:
            with Image.open(Path(image)) as opened:
                opened.load()
                img = ImageOps.exif_transpose(opened)
        except FileNotFoundError:
            raise InputError(f"Image not found: {image}") from None
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise InputError(f"Cannot read {image} as an image ({err}).",
                             "Use a PNG, JPEG or WebP picture.") from None
    if img.mode in ("RGBA", "LA", "P"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def resolve_job(
    spec: ModelSpec,
    prompt: str,
    *,
    negative_prompt: str | None = None,
    image: Any = None,
    width: int | None = None,
    height: int | None = None,
    frames: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    guidance_low: float | None = None,
    shift: float | None = None,
    seed: int | None = None,
    sampler: str = "unipc",
) -> Job:
    """Fill in the registry defaults and check every field; InputError for what cannot be used."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("The prompt is empty.", "Describe the video you want, e.g. 'a red fox running through snow'.")
    if spec.needs_image and image is None:
        raise InputError(f"{spec.name} turns an image into a video: give a start image.")
    w0, h0 = spec.default_size if width is None and height is None else (width or height, height or width)
    w, h, f, notes = check_size(spec, int(w0), int(h0), int(frames or spec.frames))
    n = int(steps or spec.steps)
    if n < 1 or n > 1000:
        raise InputError(f"steps must be between 1 and 1000, got {n}.")
    g_high = spec.guidance[0] if guidance is None else float(guidance)
    g_low = (spec.guidance[1] if guidance is None else g_high) if guidance_low is None else float(guidance_low)
    if not spec.experts:
        g_low = g_high
    s = spec.shift if shift is None else float(shift)
    if s <= 0:
        raise InputError(f"shift must be positive, got {s}.")
    if seed is None or int(seed) < 0:
        seed = random.randint(0, sys.maxsize)
    img = load_image(image) if image is not None else None
    if img is not None:
        ow, oh = image_output_size(spec, img.width, img.height, w, h)
        if (ow, oh) != (w, h):
            notes.append(f"Output size follows the image's aspect ratio: {ow}x{oh}.")
        w, h = ow, oh
    return Job(prompt=prompt, negative_prompt=negative_prompt or DEFAULT_NEGATIVE_PROMPT, image=img,
               width=w, height=h, frames=f, steps=n, guidance=(g_high, g_low), shift=s, seed=int(seed),
               sampler=sampler, notes=notes)
