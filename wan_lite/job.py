"""A request resolved once: `resolve(request) -> Job`, for the UI, the CLI and the Python API alike.

`resolve` is the one place where a user's request meets the model's facts: the model is chosen
(an image given to T2V-A14B selects I2V-A14B), sizes are snapped, the start image is opened once
and the output size follows it by the official rule, the seed is drawn, and every default is
filled in from the registry. The engine, the planner and the pipeline read the resulting `Job`
and never resolve again, so a new user-facing setting is one `GenerateRequest` field, its check
here, one widget and one CLI flag.
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from wan_lite.api import (
    CACHE_MIN_STEPS,
    CACHE_MODES,
    SAMPLERS,
    TURBO,
    TURBO_3_PHASES,
    TURBO_3_PHASES_SWITCH,
    GenerateRequest,
)
from wan_lite.errors import InputError
from wan_lite.registry import DEFAULT_NEGATIVE_PROMPT, ModelSpec, get_spec
from wan_lite.sizing import (
    MAX_ASPECT,
    MAX_IMAGE_PIXELS,
    MAX_STEPS,
    check_size,
    image_output_size,
    max_frames,
    max_side,
    trained_size_note,
)


@dataclass(frozen=True)
class Job:
    """A fully resolved request: `request` has every field filled (model, size, frames, steps,
    guidance of both experts, shift, seed, sampler); `image` is the opened start image."""

    request: GenerateRequest
    spec: ModelSpec
    image: Any | None = None  # PIL.Image (RGB) or None
    notes: list[str] = field(default_factory=list)

    # The fields the pipeline reads, by name (all filled in by `resolve`).
    @property
    def prompt(self) -> str:
        return self.request.prompt

    @property
    def negative_prompt(self) -> str:
        return self.request.negative_prompt or DEFAULT_NEGATIVE_PROMPT

    @property
    def width(self) -> int:
        return int(self.request.width)  # type: ignore[arg-type]

    @property
    def height(self) -> int:
        return int(self.request.height)  # type: ignore[arg-type]

    @property
    def frames(self) -> int:
        return int(self.request.frames)  # type: ignore[arg-type]

    @property
    def steps(self) -> int:
        return int(self.request.steps)  # type: ignore[arg-type]

    @property
    def guidance(self) -> tuple[float, float]:
        """(high-noise expert or the only DiT, low-noise expert)."""
        return float(self.request.guidance), float(self.request.guidance_low)  # type: ignore[arg-type]

    @property
    def shift(self) -> float:
        return float(self.request.shift)  # type: ignore[arg-type]

    @property
    def seed(self) -> int:
        return int(self.request.seed)  # type: ignore[arg-type]

    @property
    def sampler(self) -> str:
        return self.request.sampler

    @property
    def turbo_phases(self) -> int:
        return int(self.request.turbo_phases or 2)

    def phase_at(self, t: float) -> tuple[str, float, bool]:
        """(DiT role, guidance, LoRAs on) for the step at timestep t. Turbo in 3 phases: while
        t >= 965 the high-noise expert (or the one DiT) runs without the LoRAs at `guidance`,
        then with them at `guidance_low`, the experts switching at t = 800."""
        spec = self.spec
        if self.request.turbo and self.turbo_phases == 3:
            plain_from, switch = TURBO_3_PHASES_SWITCH
            role = spec.dits[0].role if not spec.experts or t >= switch else spec.dits[1].role
            first = t >= plain_from
            return role, self.guidance[0 if first else 1], not first
        role = spec.dit_role_at(t)
        return role, self.guidance[spec.guidance_index(role)], True

    def settings(self) -> dict[str, Any]:
        """What the job ran with, as recorded in the latents, the mp4 and the sidecar JSON."""
        r = self.request
        return {
            "model": self.spec.name,
            "mode": "i2v" if self.image is not None else "t2v",
            "prompt": r.prompt,
            "negative_prompt": self.negative_prompt,
            "width": self.width,
            "height": self.height,
            "frames": self.frames,
            "fps": self.spec.fps,
            "steps": self.steps,
            "guidance": self.guidance[0],
            "guidance_low": self.guidance[1],
            "shift": self.shift,
            "seed": self.seed,
            "sampler": r.sampler,
            "cache": r.cache,
            "turbo": bool(r.turbo),
            "turbo_phases": self.turbo_phases if r.turbo else None,
            "loras": [{"file": p, "strength_high": hi, "strength_low": lo} for p, hi, lo in r.loras],
        }


def load_image(image: Any) -> Any:
    """A PIL RGB image from a path or a PIL image; InputError when it cannot be read or is too
    large (checked from the header, before the pixels are decoded). 16-bit greyscale keeps its
    levels (scaled to 8 bits, not clipped); transparency is laid over white."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(image, Image.Image):
        img = image
        _check_pixels(img.width, img.height, "The image")
    else:
        try:
            with Image.open(Path(image)) as opened:
                _check_pixels(opened.width, opened.height, str(image))
                opened.load()
                img = ImageOps.exif_transpose(opened)
        except FileNotFoundError:
            raise InputError(f"Image not found: {image}") from None
        except IsADirectoryError:
            raise InputError(f"{image} is a folder, not an image.", "Give the path of a PNG, JPEG or WebP file.") from None
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
            raise InputError(f"Cannot read {image} as an image ({err}).",
                             "Use a PNG, JPEG or WebP picture.") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        import numpy as np

        levels = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or levels.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(levels / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "P", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def _check_pixels(width: int, height: int, what: str) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(f"{what} is {width}x{height} pixels ({width * height / 1e6:.0f} MP); wan_lite takes start "
                         f"images up to {MAX_IMAGE_PIXELS / 1e6:.0f} MP.", "Scale the image down first.")
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT * min(width, height):
        raise InputError(f"{what} is {width}x{height} pixels: its sides differ by more than {MAX_ASPECT:g}:1.",
                         f"Crop it to a shape within {MAX_ASPECT:g}:1 (a video frame is 16:9 or 9:16).")


def _whole(name: str, value: Any, low: int, high: int, unit: str = "") -> int:
    """`value` as a whole number in [low, high], or InputError naming the field and the range."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().lstrip("+").isdigit():
        number = int(value)
    if number is None or not low <= number <= high:
        raise InputError(f"{name} must be a whole number from {low} to {high}{unit}, got {value!r}.")
    return number


def _real(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    """`value` as a finite number in [low, high] ((low, high] with low_open), or InputError."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    ok = math.isfinite(number) and (number > low if low_open else number >= low) and number <= high
    if not ok or isinstance(value, bool):
        bound = f"above {low:g} and at most {high:g}" if low_open else f"from {low:g} to {high:g}"
        raise InputError(f"{name} must be a number {bound}, got {value!r}.")
    return number


def resolve(request: GenerateRequest) -> Job:
    """Fill in the registry defaults, open the image, draw the seed and check every field.
    Raises InputError for what cannot be used, before anything is allocated. A `Job` passed
    in again is not re-resolved (see `as_job`)."""
    spec = get_spec(request.model)
    notes: list[str] = []
    if request.image is not None and spec.image_variant:  # T2V-A14B: an image selects I2V-A14B
        spec = get_spec(spec.image_variant)
        notes.append(f"An image was given, so {spec.name} is used.")
    prompt = request.prompt
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("The prompt is empty.", "Describe the video you want, e.g. 'a red fox running through snow'.")
    if spec.needs_image and request.image is None:
        raise InputError(f"{spec.name} turns an image into a video: give a start image.")
    phases = request.turbo_phases
    if phases is not None and phases not in (2, 3) or isinstance(phases, bool):
        raise InputError(f"Turbo runs in 2 or 3 phases, got {phases!r}.",
                         "Use 3 for a first guided step without the speed LoRA (fuller motion), else 2.")
    if phases == 3 and request.turbo is False:
        raise InputError("Turbo in 3 phases is a Turbo setting, but Turbo is off.",
                         "Turn Turbo on (--turbo), or leave out the 3 phases.")
    turbo = bool(request.turbo) or phases == 3
    if turbo:  # the speed LoRA's own settings, for every field the user left unset
        three = phases == 3
        unset = {k: v for k, v in (TURBO_3_PHASES if three else TURBO).items() if getattr(request, k) is None}
        request = replace(request, **unset)
        if three:
            told = {"steps": request.steps, "shift": request.shift, "sampler": request.sampler}
            notes.append(f"Turbo in 3 phases: the first steps (t >= {TURBO_3_PHASES_SWITCH[0]:g}) without the speed "
                         f"LoRA at guidance {request.guidance:g}, then the LoRA at guidance {request.guidance_low:g}"
                         + (f", the experts switching at t = {TURBO_3_PHASES_SWITCH[1]:g}" if spec.experts else "")
                         + "; " + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in told.items()) + " (against the speed LoRAs' slow motion).")
        else:
            told = {k: v for k, v in unset.items() if spec.experts or k != "guidance_low"}  # one DiT: one guidance
            notes.append("Turbo: " + ", ".join(f"{k.replace('_', ' ')} {v:g}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in told.items()) + " (how speed LoRAs were trained).")
    side = max_side(spec)
    width, height = request.width, request.height
    if width is None and height is None:
        width, height = spec.default_size
    w0 = _whole("The width", width if width is not None else height, 1, side, f" px for {spec.name}")
    h0 = _whole("The height", height if height is not None else width, 1, side, f" px for {spec.name}")
    f0 = _whole("The frame count", spec.frames if request.frames is None else request.frames, 1, max_frames(spec),
                f" for {spec.name} (about 10 s)")
    w, h, f, size_notes = check_size(spec, w0, h0, f0, trained_note=False)
    notes += size_notes
    n = _whole("The step count", spec.steps if request.steps is None else request.steps, 1, MAX_STEPS)
    g_high = spec.guidance[0] if request.guidance is None else _real("The guidance", request.guidance, 0, 30)
    if request.guidance_low is not None:
        g_low = _real("The low-noise guidance", request.guidance_low, 0, 30)
    else:
        g_low = spec.guidance[1] if request.guidance is None else g_high
    if not spec.experts and not (turbo and phases == 3):  # 3 phases: the one DiT's guidance after the first
        g_low = g_high
    s = spec.shift if request.shift is None else _real("The shift", request.shift, 0, 100, low_open=True)
    sampler = request.sampler or "unipc"
    if sampler not in SAMPLERS:
        raise InputError(f"Unknown sampler {sampler!r}.", f"Use one of: {', '.join(SAMPLERS)}.")
    cache = request.cache or "off"
    if cache not in CACHE_MODES:
        raise InputError(f"Unknown step cache setting {cache!r}.", f"Use one of: {', '.join(CACHE_MODES)}.")
    if cache != "off" and n < CACHE_MIN_STEPS:
        notes.append(f"The step cache is off for runs of fewer than {CACHE_MIN_STEPS} steps: "
                     "every step matters there.")
        cache = "off"
    seed = request.seed
    if seed is None or (not isinstance(seed, str) and isinstance(seed, (int, float)) and seed < 0):
        seed = random.randint(0, sys.maxsize)
    seed = _whole("The seed", seed, 0, 2**64 - 1)
    loras = _loras(request.loras, spec)
    img = load_image(request.image) if request.image is not None else None
    if img is not None:
        ow, oh = image_output_size(spec, img.width, img.height, w, h)
        if (ow, oh) != (w, h):
            notes.append(f"Output size follows the image's aspect ratio: {ow}x{oh}.")
        w, h = ow, oh
    notes += trained_size_note(spec, w, h)
    filled = replace(request, model=spec.name, negative_prompt=request.negative_prompt or DEFAULT_NEGATIVE_PROMPT,
                     width=w, height=h, frames=f, steps=n, guidance=g_high, guidance_low=g_low, shift=s,
                     seed=seed, cache=cache, loras=loras, sampler=sampler, turbo=turbo,
                     turbo_phases=(phases or 2) if turbo else None)
    return Job(request=filled, spec=spec, image=img, notes=notes)


# ------------------------------------------------------------------------ LoRAs: FILE[:STRENGTH]
class LoRAArg(NamedTuple):
    """A LoRA as asked for: its file and its strength on the high- and low-noise experts (the
    single-DiT models use `high`). 0 leaves that expert alone."""

    path: Path
    high: float
    low: float


_EXTENSIONS = (".safetensors", ".sft", ".pt", ".pth", ".ckpt", ".bin")
_FORM = "FILE, FILE:STRENGTH or FILE:HIGH,LOW (e.g. style.safetensors:0.8, lightning.safetensors:1,0)"


def parse_lora_arg(arg: str) -> LoRAArg:
    """"FILE" -> (FILE, 1, 1); "FILE:0.8" -> (FILE, 0.8, 0.8); "FILE:1,0.5" -> per expert.

    The strength is split off at the last colon, and only when what follows it is no part of a
    path (no slash, no file extension), so `C:\\loras\\x.safetensors:0.8` keeps its drive letter.
    Raises InputError naming the argument for a strength that is not a finite number.
    """
    text = arg.strip()
    path, sep, suffix = text.rpartition(":")
    if not sep or "/" in suffix or "\\" in suffix or suffix.lower().endswith(_EXTENSIONS):
        path, suffix = text, None
    if not path:
        raise InputError(f"LoRA argument {arg!r} names no file.", f"Write {_FORM}.")
    if suffix is None:
        return LoRAArg(Path(path), 1.0, 1.0)
    parts = suffix.split(",")
    values = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or len(parts) > 2:
            raise InputError(f"LoRA argument {arg!r}: the strength {suffix!r} is not one or two finite numbers.",
                             f"Write {_FORM}.")
        values.append(value)
    return LoRAArg(Path(path), values[0], values[-1])


def lora_arg(item: Any) -> LoRAArg:
    """One of a request's LoRAs ("FILE[:S|:HIGH,LOW]", (FILE, S) or (FILE, HIGH, LOW)) as a LoRAArg."""
    if isinstance(item, str):
        return parse_lora_arg(item)
    if isinstance(item, (tuple, list)) and len(item) in (2, 3):
        strengths = [_real(f"LoRA {item[0]}: the strength", v, -10, 10) for v in item[1:]]
        return LoRAArg(Path(str(item[0])), strengths[0], strengths[-1])
    raise InputError(f"LoRA {item!r} is not FILE, (FILE, STRENGTH) or (FILE, HIGH, LOW).", f"Write {_FORM}.")


def _loras(value: Any, spec: ModelSpec) -> tuple[tuple[str, float, float], ...]:
    """The request's LoRAs as (absolute path, high-noise strength, low-noise strength): each given
    as "FILE[:S|:HIGH,LOW]", (path, strength) or (path, high, low). Only the file's presence and
    the strengths are checked here; the file itself is read, checked against the model and
    applied whole or not at all when the model loads."""
    out = []
    for item in value or ():
        arg = lora_arg(item)
        path = arg.path.expanduser()
        if not path.is_file():
            raise InputError(f"LoRA file not found: {path}", "Check the path; LoRA files end in .safetensors.")
        for v in (arg.high, arg.low):
            _real(f"LoRA {path.name}: the strength", v, -10, 10)
        low = arg.low if spec.experts else arg.high
        out.append((str(path.resolve()), float(arg.high), float(low)))
    return tuple(out)


def as_job(request: GenerateRequest | Job) -> Job:
    """A Job as it is; a request resolved (once)."""
    return request if isinstance(request, Job) else resolve(request)
