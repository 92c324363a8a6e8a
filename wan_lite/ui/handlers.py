"""Event handlers of the page, as plain functions of named values (widget name -> value) that
return named updates; wan_lite/ui/app.py lays out the widgets and wires these to them.

`AppUI` holds what the handlers share: the engine, presets, settings store, upload folder, the
job manager and the widgets by name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from wan_lite.engine import Engine
from wan_lite.errors import WanLiteError
from wan_lite.registry import MODELS, get_spec
from wan_lite.ui import form, history, images
from wan_lite.ui.jobs import JobManager, error_message
from wan_lite.ui.presets import Presets, memory_profiles
from wan_lite.ui.settings import (
    SettingsStore,
    infer_mode,
    max_frames,
    mode_values,
    offered_frames,
    parse_size,
    quality_notes,
    seconds_for_frames,
    size_choices,
    snap_size,
)

log = logging.getLogger(__name__)


@dataclass
class AppUI:
    """Everything the handlers share; `w` maps widget names to Gradio components."""

    engine: Engine
    presets: Presets
    store: SettingsStore
    upload_dir: Path
    jobs: JobManager  # the app's jobs, run in the server whatever the tabs do
    w: dict[str, Any] = field(default_factory=dict)  # widgets by name
    demo: gr.Blocks | None = None
    confine: bool = False  # served beyond this computer: Scan and Save stay in the known folders
    states: dict[str, str] | None = None  # model name -> state (see model_states)

    def out(self, values: dict[str, Any]) -> dict[Any, Any]:
        """Name -> value to component -> value, for a handler's return."""
        return {self.w[k]: v for k, v in values.items() if k in self.w}

    def comps(self, names: Iterable[str]) -> list[Any]:
        return [self.w[n] for n in names]

    def kw(self, names: Iterable[str]) -> dict[str, Any]:
        return {n: self.w[n] for n in names}

    @property
    def term_names(self) -> list[str]:
        return [form.term_widget(k) for k in self.presets.categories]

    @property
    def form_names(self) -> list[str]:
        return [*form.REQUEST_WIDGETS, *form.UI_ONLY, *self.term_names]


def discard_upload(path: Path, upload_dir: Path) -> bool:
    """Delete a rejected upload that Gradio stored in the upload folder (an .html or .svg posted
    straight to the upload route never reaches the image check, but one that did is not kept
    where the app serves files from). Files elsewhere are never touched."""
    try:
        resolved, folder = Path(path).resolve(), Path(upload_dir).resolve()
        if resolved.is_file() and resolved.is_relative_to(folder):
            resolved.unlink()
            return True
    except OSError as err:
        log.warning("Could not delete the rejected upload %s: %s", path, err)
    return False


def model_updates(model: str, mode: str, size: str | None) -> dict[str, Any]:
    """Switching model or mode resets the settings the mode controls, keeping the orientation."""
    spec = get_spec(model)
    portrait = False
    if size:
        try:
            w, h = parse_size(size)
            portrait = h > w
        except WanLiteError:  # a half-typed custom size: keep landscape
            portrait = False
    values = mode_values(mode, spec, portrait)
    return {
        "model": spec.name,
        "size": gr.update(choices=size_choices(spec), value=values["size"]),
        "frames": gr.update(maximum=max_frames(spec), value=values["frames"]),
        "steps": values["steps"],
        "guidance": gr.update(value=values["guidance"],
                              label="Guidance, high-noise expert" if spec.experts else "Guidance"),
        "guidance_low": gr.update(value=values["guidance_low"], visible=spec.experts),
        "shift": values["shift"],
    }


def crop_preview(ui: AppUI, image: str | None, model: str, size: str | None) -> dict[str, Any]:
    """The exact first frame the model gets and the video's size (by `sizing.video_size`, the
    rule the request follows), with a word where the image changes what the Size box says."""
    if not image or not Path(image).is_file():
        return {"crop": None, "crop_note": ""}
    spec = get_spec(form.model_for_image(model, True))
    try:
        w, h = parse_size(size) if size else spec.default_size
        frame, framing = images.model_frame(Path(image), spec, (w, h))
        with Image.open(image) as im:
            iw, ih = im.size
    except Exception as err:
        return {"crop": None, "crop_note": f"⛔ {error_message(err)}"}
    how = "centre crop" if framing.cropped else ("whole image" if spec.crops_image else "resized, no crop")
    lines = [f"The video will be **{framing.width}×{framing.height}** ({how}); "
             "this is exactly the first frame the model gets."]
    lines += [f"- ⚠️ {n}" for n in image_warnings(spec, (iw, ih), (w, h), (framing.width, framing.height))]
    return {"crop": frame, "crop_note": "\n".join(lines)}


def image_warnings(spec: Any, image: tuple[int, int], asked: tuple[int, int], made: tuple[int, int]) -> list[str]:
    """What image-to-video changes silently otherwise: a small image enlarged, a video of
    another size or shape than the Size box says."""
    (iw, ih), (aw, ah), (w, h) = image, asked, made
    out = []
    scale = max(w / iw, h / ih)
    if scale >= 2:
        out.append(f"Your image is {iw}×{ih}: it is enlarged {scale:.0f}× to {w}×{h}, so the video starts "
                   "blurry. A larger image gives a sharper video.")
    if (ah > aw) != (ih > iw) and aw != ah and iw != ih:
        shape = "portrait" if ah > aw else "landscape"
        out.append(f"The Size box is {shape} but the image is {'portrait' if ih > iw else 'landscape'}: the video "
                   "takes the image's shape. Crop or rotate the image for a " + shape + " video.")
    elif (w, h) != (aw, ah):
        out.append(f"The Size box says {aw}×{ah}; the video follows the image's shape instead: {w}×{h} "
                   "(about the same number of pixels).")
    return out


def prompt_updates(ui: AppUI, values: dict[str, Any]) -> dict[str, Any]:
    comp = form.composition_for(values, ui.presets)
    notes = "\n".join(f"- {w}" for w in comp.warnings)
    return {"final_prompt": comp.prompt, "prompt_notes": notes}


def model_states(ui: AppUI, refresh: bool = False) -> dict[str, str]:
    """Model name -> "installed" / "partial" / "missing" ("unknown" when the engine cannot tell),
    checked from headers and kept until `refresh` (the Models tab, Scan, Save and Download
    refresh it): the estimate asks on every keystroke."""
    if refresh or ui.states is None:
        try:
            ui.states = {s.name: s.state for s in ui.engine.model_status()}
        except Exception as err:  # the page must still open
            log.warning("Model folders not checked: %s", err)
            ui.states = {}
    return ui.states


def model_menu(ui: AppUI, refresh: bool = False) -> list[tuple[str, str]]:
    """The model menu's (label, name) choices; a model not on this computer says so."""
    states = model_states(ui, refresh)
    labels = {"missing": " · not downloaded (Models tab)", "partial": " · incomplete (Models tab)"}
    return [(s.title + labels.get(states.get(s.name, ""), ""), s.name) for s in MODELS.values()]


def first_run_hint(ui: AppUI) -> str:
    """A word on the Create tab while no model is ready: where to get one."""
    states = model_states(ui)
    if not states or any(v == "installed" for v in states.values()):
        return ""
    return ("### First, get a model\n"
            "No Wan 2.2 model is on this computer yet. Open the **Models** tab to download one "
            "(TI2V-5B is the smallest and makes text-to-video and image-to-video), or to use the files "
            "ComfyUI or diffusers already downloaded. You can compose a prompt meanwhile.")


def estimate_updates(ui: AppUI, values: dict[str, Any]) -> dict[str, Any]:
    try:
        # The estimate does not depend on the prompt; a placeholder keeps an empty box from failing.
        placeholder = {**values, "user_prompt": values.get("user_prompt") or "-"}
        request, _ = form.request_from_values(placeholder, ui.presets)
        spec = get_spec(request.model)
        frames = request.frames or spec.frames
        lines = [f"{frames} frames = **{seconds_for_frames(frames, spec.fps):.1f} s** of video at {spec.fps} fps."]
        lines += [f"- {n}" for n in quality_notes(spec, request.width or 0, request.height or 0,
                                                   request.steps or spec.steps, frames)]
        state = model_states(ui).get(spec.name)
        profile = values.get("memory_profile") or "auto"
        title = None if profile == "auto" else dict((k, t) for t, k in memory_profiles()).get(profile, profile)
        lines.append(form.estimate_text(ui.engine.preflight(request), model_ready=state not in ("missing", "partial"),
                                        profile=title))
        return {"estimate": "\n\n".join(lines)}
    except Exception as err:
        return {"estimate": f"⛔ {error_message(err)}"}


def lora_choices(ui: AppUI) -> list[tuple[str, str]]:
    """(file name, path) of the LoRA files found, for the "Add a LoRA" menu."""
    try:
        return [(p.name, str(p)) for p in ui.engine.lora_files()]
    except OSError:
        return []


def add_lora(ui: AppUI, path: str | None, table: Any, turbo: bool) -> dict[str, Any]:
    """"Add a LoRA": a new row at strength 1 (a file already listed is not added twice); a speed
    LoRA switches Turbo on, with a word saying so."""
    rows = form.lora_rows(form.loras_from_rows(table))
    path = str(path or "").strip()
    if not path:
        return {"lora_add": None}
    if not Path(path).expanduser().is_file():
        return {"lora_add": None, "status": f"⛔ LoRA file not found: {path}"}
    status = f"LoRA {Path(path).name} added at strength 1; change the strength in the table."
    if all(r[0] != path for r in rows):
        rows.append([path, 1.0, 1.0])
    why = ui.engine.speed_lora(path)
    if why and not turbo:
        turbo = True
        status += f" It is a speed LoRA ({why}), so Turbo is on: 4 steps, guidance 1."
    return {"lora_add": None, "loras": rows, "turbo": turbo, "status": status}




def override(updates: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Put `values` over `updates`, keeping the choices/labels of gr.update entries."""
    out = dict(updates)
    for key, value in values.items():
        prev = out.get(key)
        out[key] = gr.update(**{**prev, "value": value}) if isinstance(prev, dict) else value
    return out


def reuse_history(ui: AppUI, paths: list[str], index: int | None) -> dict[str, Any]:
    """"Reuse these settings": the result's settings back in the form, its prompt as it was
    composed (prompt box, terms, style, language) when that is known, and the mode radio set to
    the mode these settings are (none when they are no mode's)."""
    if index is None or not paths or index >= len(paths):
        text = "Pick a result in the gallery first (click its picture), then Reuse."
        return {"status": text, "history_details": f"⚠️ {text}"}
    entry = history.parse_sidecar(Path(paths[index]), ui.engine.output_dir)
    if entry is None:
        return {"status": "⛔ That result is no longer in the output folder.",
                "history_details": "⛔ That result is no longer in the output folder."}
    values = form.values_from_history(entry.settings, ui.presets, ui.store.composition(entry.prompt))
    image = entry.settings.get("image")
    image = image if isinstance(image, str) and Path(image).is_file() else None
    values["model"] = form.model_for_image(values["model"], bool(image))
    mode = infer_mode(get_spec(values["model"]), values.get("size"), values.get("frames"), values.get("steps"))
    updates = override(model_updates(values["model"], mode or "quality", values.get("size")), values)
    updates.update({"image": image, "mode": mode, "bundle": None, "tabs": gr.Tabs(selected="create"),
                    "status": f"Settings of {entry.video.name} loaded (seed {entry.seed}). "
                              "Click Generate to run it again."})
    return updates


def history_updates(ui: AppUI, query: str = "") -> dict[str, Any]:
    """The gallery (newest first), only results whose prompt or file name has every word of `query`."""
    words = [w for w in str(query or "").lower().split() if w]
    entries = [e for e in history.read_history(ui.engine.output_dir)
               if all(w in f"{e.prompt} {e.video.name}".lower() for w in words)]
    return {"history": [(str(e.video), e.caption()) for e in entries],
            "history_paths": [str(e.sidecar) for e in entries]}


def delete_history(ui: AppUI, paths: list[str], index: int | None, armed: str | None,
                   query: str = "") -> dict[str, Any]:
    """"Delete": the first click asks, the second deletes the result's video, settings file and
    latents (files in the output folder only)."""
    if index is None or not paths or index >= len(paths):
        return {"history_details": "⚠️ Pick a result in the gallery first (click its picture), then Delete.",
                "history_armed": None}
    sidecar = Path(paths[index])
    entry = history.parse_sidecar(sidecar, ui.engine.output_dir)
    if entry is None:
        return {"history_details": "⛔ That result is no longer in the output folder.", "history_armed": None}
    if armed != str(sidecar):
        return {"history_details": f"Delete **{entry.video.name}** and its settings? Click Delete again to confirm.",
                "history_armed": str(sidecar)}
    removed = history.delete_result(entry, ui.engine.output_dir)
    return {**history_updates(ui, query), "history_index": None, "history_armed": None,
            "history_details": f"Deleted {', '.join(p.name for p in removed)}."}


SIZE_INFO = "Or type WIDTHxHEIGHT; it is rounded to what the model accepts."
FRAMES_INFO = "4n+1 frames (5, 9, 13…): the model packs 4 frames after the first one; other counts are rounded."


def snap_size_box(model: str, size: str | None) -> dict[str, Any]:
    """A typed size is rounded in the box itself (not only when the video is made), with a word
    saying to what and why; one that is no size at all says so."""
    spec = get_spec(form.model_for_image(model, False))
    if not size:
        return {"size": gr.update(info=SIZE_INFO)}
    try:
        w, h = parse_size(size)
    except WanLiteError as err:
        return {"size": gr.update(info=f"⛔ {err.message}")}
    sw, sh = snap_size(w, h, spec)
    if (sw, sh) == (w, h):
        return {"size": gr.update(value=f"{w}x{h}", info=SIZE_INFO)}
    return {"size": gr.update(value=f"{sw}x{sh}", info=f"{w}×{h} was rounded to {sw}×{sh}: {spec.name} makes "
                                                       f"sides in multiples of {spec.size_multiple} px.")}


def snap_frames_box(model: str, frames: Any) -> dict[str, Any]:
    """A typed frame count that is not 4n+1 (8, say) is rounded in the box, with the reason."""
    spec = get_spec(form.model_for_image(model, False))
    try:
        value = float(frames)
    except (TypeError, ValueError):
        return {"frames": gr.update(info=FRAMES_INFO)}
    snapped = offered_frames(value, spec)
    if snapped == value:
        return {"frames": gr.update(value=snapped, info=FRAMES_INFO)}
    return {"frames": gr.update(value=snapped, info=f"{value:g} is not 4n+1 frames (or is out of range): using "
                                                      f"{snapped}. The model packs 4 frames after the first one.")}


def apply_bundle(ui: AppUI, bundle: str | None, style: str | None, terms: dict[str, Any]) -> dict[str, Any]:
    """A preset bundle replaces the ticked terms and the style; what they were is kept so that
    "Undo the preset" brings them back, and the bundle's description is shown."""
    b = ui.presets.bundles.get(bundle or "")
    if b is None:
        return {"bundle_note": "", "bundle_undo": gr.update(visible=False)}
    before = {"style": style or "", "terms": form.collect_terms(terms, ui.presets)}
    note = f"**{b.name}**" + (f": {b.description}" if b.description else "") + " The terms you had were replaced."
    return {**form.split_terms(list(b.terms), ui.presets), "style": b.style or "", "bundle_note": note,
            "bundle_undo": gr.update(visible=True), "bundle_before": before}


def undo_bundle(ui: AppUI, before: dict[str, Any] | None) -> dict[str, Any]:
    """Bring back the terms and style a preset bundle replaced."""
    if not before:
        return {"bundle_note": "Nothing to undo.", "bundle_undo": gr.update(visible=False)}
    return {**form.split_terms(list(before.get("terms") or []), ui.presets), "style": before.get("style") or "",
            "bundle": None, "bundle_note": "The preset was undone: your terms and style are back.",
            "bundle_undo": gr.update(visible=False), "bundle_before": None}


def image_model_note(chosen: str, used: str, has_image: bool) -> str:
    """Say it when the start image (or its removal) changes the model: T2V-A14B makes video from
    text only, I2V-A14B from an image."""
    if chosen == used:
        return ""
    a, b = get_spec(chosen).label, get_spec(used).label
    if has_image:
        return f"ℹ️ {a} makes videos from text only; with a start image, {b} is used (its files are separate)."
    return f"ℹ️ {a} needs a start image; without one, {b} is used."


def upload_image(ui: AppUI, upload: Any, model: str, mode: str, size: str | None) -> dict[str, Any]:
    """A start image uploaded (checked by content and normalised) or removed (`upload` None); a
    refused file leaves the box with its error shown, and a model the image changes is named."""
    path = getattr(upload, "name", upload)
    if not path:
        out: dict[str, Any] = {"image": None, "status": ""}
    else:
        try:
            checked = images.check_image(Path(path), ui.upload_dir)
            out = {"image": str(checked.path), "status": "\n".join(f"- {n}" for n in checked.notes)}
        except Exception as err:
            discard_upload(Path(path), ui.upload_dir)  # not an image: nothing serves it from our origin
            return {"image": None, "status": f"⛔ {error_message(err)}", "upload": None}
    new_model = form.model_for_image(model, bool(out["image"]))
    if new_model != model:
        out.update(model_updates(new_model, mode, size))
        note = image_model_note(model, new_model, bool(out["image"]))
        out["status"] = "\n".join(x for x in (out["status"], note) if x)
    return out


def page_values(ui: AppUI) -> dict[str, Any]:
    """A fresh page: the last settings (the mode radio showing the mode they are, none when they
    are no mode's), the history, the model menu and what is derived from the form."""
    values = form.values_from_settings(ui.store.load(), ui.presets)
    if not 1 <= values.get("gpus", 1) <= max(1, ui.engine.gpu_count()):  # remembered on another machine
        values["gpus"] = 1
    values["style"] = values.get("style") or ""  # the menu's "No style template" (None shows a blank box)
    # The saved values win over the mode's; the model decides the size choices and labels.
    mode_defaults = model_updates(values["model"], values.get("mode") or "quality", values.get("size"))
    updates = override(mode_defaults, values)
    try:
        updates["mode"] = infer_mode(get_spec(values["model"]), values.get("size"),
                                     values.get("frames"), values.get("steps"))
    except WanLiteError:  # a saved size that is no size: no mode
        updates["mode"] = None
    model_states(ui, refresh=True)
    updates["model"] = gr.update(choices=model_menu(ui), value=values["model"])
    updates["first_run"] = first_run_hint(ui)
    updates.update(history_updates(ui))
    updates.update(prompt_updates(ui, values))
    updates.update(estimate_updates(ui, values))
    updates["lora_add"] = gr.update(choices=lora_choices(ui), value=None)
    return updates


def model_missing_text(ui: AppUI, model: str) -> str:
    """Why `model` cannot run because it is not on this computer, pointing to the Models tab;
    empty when it is there (or the engine cannot tell)."""
    spec = get_spec(form.model_for_image(model, False) if model not in MODELS else model)
    state = model_states(ui, refresh=True).get(spec.name)
    if state not in ("missing", "partial"):
        return ""
    what = "is not downloaded yet" if state == "missing" else "is incomplete"
    return (f"{spec.label} {what}. Open the **Models** tab to download it, or to use the files another "
            "tool (ComfyUI, diffusers) already has.")
