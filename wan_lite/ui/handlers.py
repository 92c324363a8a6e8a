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

from wan_lite.engine import Engine
from wan_lite.errors import WanLiteError
from wan_lite.registry import get_spec
from wan_lite.ui import form, history, images
from wan_lite.ui.jobs import JobManager, error_message
from wan_lite.ui.presets import Presets
from wan_lite.ui.settings import (
    SettingsStore,
    infer_mode,
    max_frames,
    mode_values,
    parse_size,
    quality_notes,
    seconds_for_frames,
    size_choices,
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
    if not image or not Path(image).is_file():
        return {"crop": None, "crop_note": ""}
    spec = get_spec(form.model_for_image(model, True))
    try:
        w, h = parse_size(size) if size else spec.default_size
        frame, framing = images.model_frame(Path(image), spec, w * h)
    except Exception as err:
        return {"crop": None, "crop_note": f"⛔ {error_message(err)}"}
    how = "centre crop" if framing.cropped else ("whole image" if spec.crops_image else "resized, no crop")
    return {"crop": frame, "crop_note": f"The video will be **{framing.width}×{framing.height}** ({how}); "
                                         "this is exactly the first frame the model gets."}


def prompt_updates(ui: AppUI, values: dict[str, Any]) -> dict[str, Any]:
    comp = form.composition_for(values, ui.presets)
    notes = "\n".join(f"- {w}" for w in comp.warnings)
    return {"final_prompt": comp.prompt, "prompt_notes": notes}


def estimate_updates(ui: AppUI, values: dict[str, Any]) -> dict[str, Any]:
    try:
        # The estimate does not depend on the prompt; a placeholder keeps an empty box from failing.
        placeholder = {**values, "user_prompt": values.get("user_prompt") or "-"}
        request, _ = form.request_from_values(placeholder, ui.presets)
        spec = get_spec(request.model)
        frames = request.frames or spec.frames
        lines = [f"{frames} frames = **{seconds_for_frames(frames, spec.fps):.1f} s** at {spec.fps} fps."]
        lines += [f"- {n}" for n in quality_notes(spec, request.width or 0, request.height or 0,
                                                   request.steps or spec.steps, frames)]
        lines.append(form.estimate_text(ui.engine.preflight(request)))
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


def history_updates(ui: AppUI) -> dict[str, Any]:
    entries = history.read_history(ui.engine.output_dir)
    return {"history": [(str(e.video), e.caption()) for e in entries],
            "history_paths": [str(e.sidecar) for e in entries]}


def override(updates: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Put `values` over `updates`, keeping the choices/labels of gr.update entries."""
    out = dict(updates)
    for key, value in values.items():
        prev = out.get(key)
        out[key] = gr.update(**{**prev, "value": value}) if isinstance(prev, dict) else value
    return out


def reuse_history(ui: AppUI, paths: list[str], index: int | None) -> dict[str, Any]:
    if index is None or not paths or index >= len(paths):
        return {"status": "Pick a result in the gallery first."}
    entry = history.parse_sidecar(Path(paths[index]), ui.engine.output_dir)
    if entry is None:
        return {"status": "⛔ That result is no longer in the output folder."}
    values = form.values_from_history(entry.settings, ui.presets)
    image = entry.settings.get("image")
    image = image if isinstance(image, str) and Path(image).is_file() else None
    values["model"] = form.model_for_image(values["model"], bool(image))
    mode = infer_mode(get_spec(values["model"]), values.get("size"), values.get("frames"), values.get("steps"))
    updates = override(model_updates(values["model"], mode or "quality", values.get("size")), values)
    updates.update({"image": image, "mode": mode, "bundle": "", "tabs": gr.Tabs(selected="create"),
                    "status": f"Settings of {entry.video.name} loaded (seed {entry.seed}). "
                              "Click Generate to run it again."})
    return updates
