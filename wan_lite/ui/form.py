"""The form's logic without Gradio: widget values (a dict keyed by widget name) <-> GenerateRequest,
saved settings and history entries; and the small texts the page shows (estimate, progress).

Widget names are the GenerateRequest field names where a widget sets a field directly, plus the
UI-only names in UI_ONLY. Nothing here depends on widget order.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from wan_lite.api import STAGE_TITLES, GenerateRequest, Progress
from wan_lite.engine import Estimate
from wan_lite.errors import WanLiteError
from wan_lite.registry import DEFAULT_MODEL, DEFAULT_NEGATIVE_PROMPT, MODELS, get_spec
from wan_lite.registry import model_for_image as _registry_model_for_image
from wan_lite.ui.composer import Composition, compose
from wan_lite.ui.presets import Presets, ordered
from wan_lite.ui.settings import DEFAULT_MODE, mode_values, offered_frames, parse_size
from wan_lite.units import duration, human_bytes

TERM_PREFIX = "terms__"  # one CheckboxGroup per vocabulary category: "terms__light_source", ...
# Widgets that set a GenerateRequest field of the same name.
REQUEST_WIDGETS = ("model", "negative_prompt", "image", "frames", "steps", "guidance", "guidance_low",
                   "shift", "seed", "sampler", "memory_profile", "cache", "turbo", "turbo_phases", "loras", "gpus")
# The request fields a widget sets as it is, with how its value is read (empty: the default).
PLAIN_FIELDS = {"steps": int, "guidance": float, "shift": float, "sampler": str, "memory_profile": str,
                "cache": str}
# What Turbo fills in itself (the speed LoRA's own settings): the form leaves them unset.
TURBO_FIELDS = ("steps", "guidance", "guidance_low", "shift", "sampler")
LORA_COLUMNS = ["LoRA file", "Strength", "Low-noise strength (A14B)"]
UI_ONLY = ("user_prompt", "size", "style", "language", "mode", "loras_by_model")


def term_widget(category: str) -> str:
    return TERM_PREFIX + category


def collect_terms(values: Mapping[str, Any], presets: Presets) -> list[str]:
    chosen: list[str] = []
    for name, value in values.items():
        if name.startswith(TERM_PREFIX) and isinstance(value, (list, tuple)):
            chosen.extend(str(v) for v in value)
    return ordered(chosen, presets)


def split_terms(term_ids: list[str], presets: Presets) -> dict[str, list[str]]:
    """Term ids -> the value of every category's CheckboxGroup (empty lists clear the others)."""
    out: dict[str, list[str]] = {term_widget(key): [] for key in presets.categories}
    for tid in ordered(term_ids, presets):
        out[term_widget(tid.split(".", 1)[0])].append(tid)
    return out


def model_for_image(model: str, has_image: bool) -> str:
    """An image turns T2V-A14B into I2V-A14B and back; TI2V-5B does both itself."""
    return _registry_model_for_image(model, has_image) if model in MODELS else model


def _number(value: Any, kind: type) -> Any:
    if value is None or value == "":
        return None
    return kind(value)


def parse_seed(value: Any) -> int | None:
    """The seed box holds text: seeds go up to 2**63, beyond what a browser number keeps exactly.
    Empty, "random" or a negative number -> None (random)."""
    from wan_lite.errors import InputError

    text = str(value if value is not None else "").strip().lower()
    if text in ("", "random", "none"):
        return None
    try:
        seed = int(float(text)) if "e" in text or "." in text else int(text)
    except ValueError:
        raise InputError(f"Seed {value!r} is not a whole number.", "Type a number, or -1 for a random seed.") from None
    return seed if seed >= 0 else None


def composition_for(values: Mapping[str, Any], presets: Presets) -> Composition:
    return compose(
        presets,
        values.get("user_prompt") or "",
        collect_terms(values, presets),
        values.get("style") or None,
        image_to_video=bool(values.get("image")),
        language=values.get("language") or "en",
        negative_prompt=values.get("negative_prompt"),
    )


def request_from_values(values: Mapping[str, Any], presets: Presets) -> tuple[GenerateRequest, Composition]:
    """The request the Generate button sends. Raises InputError for values that cannot be used."""
    model = model_for_image(values.get("model") or DEFAULT_MODEL, bool(values.get("image")))
    spec = get_spec(model)
    comp = composition_for(values, presets)
    width = height = None
    if values.get("size"):
        width, height = parse_size(values["size"])
    seed = parse_seed(values.get("seed"))
    frames = _number(values.get("frames"), float)
    plain = {name: _number(values.get(name), kind) for name, kind in PLAIN_FIELDS.items()}
    plain = {name: v for name, v in plain.items() if v is not None}  # unset: the request's default
    turbo = bool(values.get("turbo"))
    request = GenerateRequest(
        prompt=comp.prompt,
        model=spec.name,
        negative_prompt=comp.negative_prompt,
        image=values.get("image") or None,
        width=width,
        height=height,
        frames=offered_frames(frames, spec) if frames is not None else None,
        guidance_low=_number(values.get("guidance_low"), float) if spec.experts else None,
        seed=seed,
        loras=loras_from_rows(values.get("loras")),
        turbo=True if turbo else None,
        turbo_phases=3 if turbo and values.get("turbo_phases") else None,  # the checkbox: Turbo in 3 phases
        title=values.get("user_prompt") or None,  # the files are named after the user's own words
        gpus=int(_number(values.get("gpus"), float) or 1),  # the GPUs menu, shown where there are several
        **plain,
    )
    if turbo:  # the speed LoRA's own settings, not the sliders'
        request = replace(request, **dict.fromkeys(TURBO_FIELDS))
    return request, comp


def gpu_choices(count: int) -> list[tuple[str, int]]:
    """The GPUs menu: ("1 GPU", 1) ... (f"{count} GPUs", count)."""
    return [(f"{n} GPU" + ("s" if n > 1 else ""), n) for n in range(1, max(1, count) + 1)]


def _rows(table: Any) -> list[list[Any]]:
    """A Dataframe's value (a pandas frame, {"data": rows}, or rows) as a list of rows."""
    if table is None:
        return []
    if hasattr(table, "values") and hasattr(table, "columns"):
        return [list(r) for r in table.values.tolist()]
    if isinstance(table, Mapping):
        return [list(r) for r in table.get("data") or []]
    return [list(r) for r in table]


def loras_from_rows(table: Any) -> tuple[tuple[str, Any, Any], ...]:
    """The LoRA table's rows (file, strength, low-noise strength) as the request's LoRAs; rows
    with no file are skipped, an empty strength is 1 and an empty low-noise one is the strength.
    The strengths are checked where every request is (job.resolve)."""
    out = []
    for row in _rows(table):
        row = [*row, None, None, None][:3]
        path = str(row[0] or "").strip()
        if not path:
            continue
        high = 1.0 if row[1] in (None, "") or row[1] != row[1] else row[1]
        low = high if row[2] in (None, "") or row[2] != row[2] else row[2]
        out.append((path, high, low))
    return tuple(out)


def lora_rows(loras: Any) -> list[list[Any]]:
    """Recorded LoRAs (the sidecar's [{"file", "strength_high", "strength_low"}] or the request's
    tuples) as the LoRA table's rows."""
    rows = []
    for item in loras or []:
        if isinstance(item, Mapping):
            rows.append([item.get("file", ""), item.get("strength_high", 1.0), item.get("strength_low", 1.0)])
        elif isinstance(item, (list, tuple)) and item:
            rows.append([str(item[0]), *(list(item[1:]) + [1.0, 1.0])[:2]])
    return rows


def settings_from_values(values: Mapping[str, Any], presets: Presets) -> dict[str, Any]:
    """What is remembered for the next start (the start image is not: it may be gone by then)."""
    saved = {k: values[k] for k in (*REQUEST_WIDGETS, *UI_ONLY) if k in values and k != "image"}
    saved["terms"] = collect_terms(values, presets)
    saved["final_prompt"] = composition_for(values, presets).prompt  # not kept in settings.json: see SettingsStore
    saved["loras"] = lora_rows(loras_from_rows(values.get("loras")))
    saved["loras_by_model"] = remember_loras(values.get("model") or DEFAULT_MODEL, values.get("loras"),
                                             values.get("loras_by_model"))
    if saved.get("negative_prompt", "").strip() == DEFAULT_NEGATIVE_PROMPT:
        saved["negative_prompt"] = ""  # keep following the official default if it ever changes
    for key in ("frames", "steps"):
        if isinstance(saved.get(key), float):
            saved[key] = int(saved[key])
    if "seed" in saved:
        try:
            seed = parse_seed(saved["seed"])
        except WanLiteError:  # a typo in the seed box is not worth remembering
            seed = None
        saved["seed"] = -1 if seed is None else seed
    return saved


def default_values(model: str = DEFAULT_MODEL) -> dict[str, Any]:
    spec = get_spec(model)
    return {
        "model": spec.name, "user_prompt": "", "negative_prompt": DEFAULT_NEGATIVE_PROMPT, "seed": "-1",
        "sampler": "unipc", "memory_profile": "auto", "mode": DEFAULT_MODE, "style": None, "language": "en",
        "cache": "off", "turbo": False, "turbo_phases": False, "loras": [], "gpus": 1,
        **mode_values(DEFAULT_MODE, spec),
    }


def values_from_settings(saved: Mapping[str, Any], presets: Presets) -> dict[str, Any]:
    """Widget values for a fresh page: defaults, overridden by the saved settings."""
    model = saved.get("model") if saved.get("model") in MODELS else DEFAULT_MODEL
    model = model_for_image(model, False)  # the start image is not restored: the text model
    values = default_values(model)
    values.update({k: v for k, v in saved.items() if k != "terms" and k != "model"})
    values["seed"] = str(values.get("seed", -1))
    if not values.get("negative_prompt"):
        values["negative_prompt"] = DEFAULT_NEGATIVE_PROMPT
    if values.get("style") not in presets.styles:
        values["style"] = None
    values.update(split_terms(list(saved.get("terms", [])), presets))
    by_model = saved.get("loras_by_model") if isinstance(saved.get("loras_by_model"), Mapping) else {}
    values["loras_by_model"] = dict(by_model)
    if model in by_model:  # the LoRAs used last with this model
        values["loras"] = lora_rows(loras_from_rows(by_model[model]))
    return values


def remember_loras(model: str, table: Any, by_model: Mapping[str, Any] | None) -> dict[str, list[list[Any]]]:
    """The LoRA rows per model, with `model`'s rows set to `table` (issue 19: LoRA choices are
    remembered per model; a LoRA for TI2V-5B does not fit A14B)."""
    out = {k: v for k, v in (by_model or {}).items() if k in MODELS and isinstance(v, list)}
    out[model] = lora_rows(loras_from_rows(table))
    return out


def loras_for_model(model: str, by_model: Mapping[str, Any] | None) -> list[list[Any]]:
    """The LoRA rows remembered for `model` (none the first time)."""
    return lora_rows(loras_from_rows((by_model or {}).get(model) or []))


def values_from_history(settings: Mapping[str, Any], presets: Presets,
                        parts: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Reuse a past result. `parts`: how its final prompt was composed (SettingsStore.composition):
    the prompt box, terms, style and language come back as they were, if they still compose the
    same final prompt; otherwise (unknown, or the vocabulary changed) the final prompt goes into
    the prompt box and the term pickers are cleared (the terms are already part of that prompt)."""
    model = settings.get("model") if settings.get("model") in MODELS else DEFAULT_MODEL
    final = settings.get("prompt") or ""
    values: dict[str, Any] = {"model": model, "style": None, "user_prompt": final, "language": "en"}
    values.update(split_terms([], presets))
    if parts:
        composed = {"user_prompt": parts.get("user_prompt") or "", "style": parts.get("style") or None,
                    "language": parts.get("language") or "en", **split_terms(list(parts.get("terms") or []), presets)}
        again = compose(presets, composed["user_prompt"], collect_terms(composed, presets), composed["style"],
                        image_to_video=bool(settings.get("image")), language=composed["language"])
        if again.prompt == final:
            values.update(composed)
    for key in ("frames", "guidance_low", *PLAIN_FIELDS):
        if settings.get(key) is not None:
            values[key] = settings[key]
    values["turbo"] = bool(settings.get("turbo"))
    values["turbo_phases"] = settings.get("turbo_phases") == 3
    values["loras"] = lora_rows(settings.get("loras"))
    values["negative_prompt"] = settings.get("negative_prompt") or DEFAULT_NEGATIVE_PROMPT
    if isinstance(settings.get("seed"), int):
        values["seed"] = str(settings["seed"])
    if settings.get("width") and settings.get("height"):
        values["size"] = f"{int(settings['width'])}x{int(settings['height'])}"
    return values


# ---------------------------------------------------------------------------------------------
# Texts shown in the page


def clock(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "–"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


GIB = 2**30


def no_gpu(estimate: Estimate) -> bool:
    """True when the estimate was planned for this computer's processor: no GPU found (a memory
    profile's "hypothetical GPU" is not one this computer has)."""
    hw = (estimate.plan or {}).get("hardware") or {}
    return bool(hw) and hw.get("gpu_name") in (None, "", "hypothetical GPU")


def estimate_text(estimate: Estimate, *, model_ready: bool = True, profile: str | None = None) -> str:
    """The estimate in plain words with units: what the video needs, how long it takes, whether
    it fits. `profile`: the title of the memory profile chosen (None: Auto, this computer);
    `model_ready`: False while the model is not on this computer (then nothing can "fit")."""
    hw = (estimate.plan or {}).get("hardware") or {}
    split = (estimate.plan or {}).get("gpus") or {}  # one video over several GPUs (Engine.preflight)
    cpu = hw and not hw.get("gpu_name")  # planned for the processor: GPU memory means nothing
    each = f" on each of {split['gpus']} GPUs" if split else ""
    memory = (f"**{human_bytes(estimate.peak_ram_gib * GIB)}** of RAM" if cpu else
              f"**{human_bytes(estimate.peak_vram_gib * GIB)}** of GPU memory{each} and "
              f"**{human_bytes(estimate.peak_ram_gib * GIB)}** of RAM")
    time = f"**{duration(estimate.seconds)}**"
    where = "this computer" if profile is None else f"a computer like the memory profile “{html.escape(profile)}”"
    if not model_ready:
        head = ("⬇️ This model is not on this computer yet: download it in the **Models** tab (or point "
                f"wan_lite at files you already have there). This video would need about {memory} "
                f"and take about {time}.")
    elif estimate.fits:
        head = f"✅ Fits {where}. It needs about {memory} and takes about {time}."
    else:
        head = f"⛔ Too big for {where}. It would need about {memory} and take about {time}."
    parts = [head]
    if split and estimate.fits:
        parts.append(html.escape(split["reason"]))
    if no_gpu(estimate):
        parts.append("No GPU found: this computer runs the model on its processor (CPU), which takes hours; "
                     "an NVIDIA GPU takes minutes.")
    if profile is not None and model_ready:
        parts.append("The memory profile describes another computer; choose Auto to check this one.")
    if estimate.reason and not estimate.fits:
        parts.append("Why: " + html.escape(_plain_reason(estimate.reason)))
    return "\n\n".join(parts)


def _plain_reason(reason: str) -> str:
    """The planner's reason with its units spelled for people ("GiB RAM" -> "GB of RAM" style)."""
    import re

    def gb(m: re.Match) -> str:
        return human_bytes(float(m.group(1)) * GIB)

    return re.sub(r"(\d+(?:\.\d+)?) GiB", gb, reason).replace("VRAM", "GPU memory")


# Where each stage sits on the progress bar (percent of the whole job): denoising is most of it.
JOB_SHARE = {"load": (0.0, 2.0), "text": (2.0, 4.0), "image_encode": (4.0, 5.0), "denoise": (5.0, 90.0),
             "high_noise": (5.0, 90.0), "low_noise": (5.0, 90.0), "decode": (90.0, 98.0), "save": (98.0, 100.0)}


def progress_html(p: Progress | None, note: str = "", state: str = "running") -> str:
    """The progress bar: stage, step, elapsed and ETA (+ `note`). `state`: idle, running, done, failed,
    cancelled."""
    if p is None:
        pct, label = (100.0 if state == "done" else 0.0), html.escape(note)
    else:
        # the whole job's share, not the stage's: the bar never drops back to 0 for the decode
        start, end = JOB_SHARE.get(p.stage, (0.0, 100.0))
        pct = start + (end - start) * p.fraction
        stage = STAGE_TITLES.get(p.stage, p.stage)
        steps = f" · step {p.step}/{p.total}" if p.total > 1 else ""
        eta = f" · about {clock(p.eta_s)} left" if p.eta_s is not None else ""
        extra = "".join(f" · {html.escape(m)}" for m in (p.message, note) if m)
        label = f"{html.escape(stage)}{steps} · {clock(p.elapsed_s)} elapsed{eta}{extra}"
    return (
        f'<div class="wl-progress wl-{state}" data-state="{state}" data-pct="{pct:.0f}">'
        f'<div class="wl-bar"><div class="wl-fill" style="width:{pct:.1f}%"></div></div>'
        f'<div class="wl-label">{label}</div></div>'
    )
