"""The Gradio page: layout and wiring (the handlers are in wan_lite/ui/handlers.py).

Every widget is registered under a name in `AppUI.w` (GenerateRequest field names where a widget
sets a field, see wan_lite/ui/form.py); handlers receive and return values by name, never by
position, so adding a widget never shifts another handler's arguments.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from wan_lite.engine import Engine
from wan_lite.paths import config_dir
from wan_lite.registry import DEFAULT_NEGATIVE_PROMPT, MODELS, get_spec
from wan_lite.ui import components_panel, form, history, images, models_panel, queue_panel
from wan_lite.ui.handlers import (
    AppUI,
    add_lora,
    crop_preview,
    discard_upload,
    estimate_updates,
    history_updates,
    lora_choices,
    model_updates,
    override,
    prompt_updates,
    reuse_history,
)
from wan_lite.ui.jobs import QUEUE_FILE, JobManager, error_message
from wan_lite.ui.presets import (
    Bundle,
    Presets,
    load_presets,
    memory_profiles,
    save_user_bundle,
    term_choices,
    user_presets_dir,
)
from wan_lite.ui.settings import MODES, SettingsStore, max_frames, size_choices

log = logging.getLogger(__name__)

CSS = """
.wl-progress { margin: 4px 0; }
.wl-bar { height: 14px; border-radius: 7px; background: var(--neutral-200); overflow: hidden; }
.wl-fill { height: 100%; background: var(--color-accent); transition: width .3s; }
.wl-failed .wl-fill, .wl-cancelled .wl-fill { background: var(--error-text-color, #c00); }
.wl-label { font-size: 0.9em; margin-top: 2px; }
#wl-status:empty { display: none; }
#wl-found code { overflow-wrap: anywhere; }  /* long paths wrap instead of squeezing the other columns */
"""
SAMPLERS = [("UniPC (official)", "unipc"), ("DPM++ 2M", "dpm++"), ("Euler", "euler")]
LANGUAGES = [("English", "en"), ("中文", "zh")]
# How the vocabulary's categories are grouped on the page; categories users add go to "More".
TERM_TABS = {
    "Light · 光线": ("light_source", "lighting_type", "time_of_day"),
    "Framing · 镜头": ("shot_size", "composition", "lens", "camera_angle", "shot_type"),
    "Colour & style · 风格": ("colour_tone", "visual_style", "special_effects"),
    "Motion & camera · 运动": ("camera_movement", "motion", "emotion"),
}


def term_tabs(presets: Presets) -> dict[str, list[str]]:
    tabs = {title: [k for k in keys if k in presets.categories] for title, keys in TERM_TABS.items()}
    placed = {k for keys in tabs.values() for k in keys}
    tabs["More · 更多"] = [k for k in presets.categories if k not in placed]
    return {title: keys for title, keys in tabs.items() if keys}


# ---------------------------------------------------------------------------------------------
# Layout


def build_ui(engine: Engine, upload_dir: Path, store: SettingsStore | None = None,
             presets: Presets | None = None, confine: bool = False) -> AppUI:
    """Build the page (not launched). `upload_dir` must also be Gradio's temp dir (GRADIO_TEMP_DIR).
    `confine`: the page is served beyond this computer, so Scan and Save accept only folders and
    files in the models folder and the remembered ComfyUI folders."""
    presets = presets or load_presets(user_dir=user_presets_dir())
    jobs = JobManager(engine, config_dir() / QUEUE_FILE)  # the app's jobs: they outlive any tab
    ui = AppUI(engine, presets, store or SettingsStore(), upload_dir, jobs, confine=confine)
    w = ui.w
    defaults = form.default_values()
    spec = get_spec(defaults["model"])
    with gr.Blocks(title="wan_lite", analytics_enabled=False) as demo:
        gr.Markdown("# wan_lite · Wan 2.2 video on your own GPU")
        if presets.problems:
            gr.Markdown("⚠️ Some preset files have problems and were partly skipped:\n"
                        + "\n".join(f"- `{p}`" for p in presets.problems), elem_id="wl-preset-problems")
        with gr.Tabs(selected="create") as w["tabs"]:
            with gr.Tab("Create", id="create"):
                _create_tab(ui, defaults, spec)
            with gr.Tab("History", id="history"):
                w["history"] = gr.Gallery(label="Past results (newest first)", columns=4, height=420,
                                          elem_id="wl-history", allow_preview=False)
                w["history_paths"] = gr.State([])
                w["history_index"] = gr.State(None)
                w["history_details"] = gr.Markdown(elem_id="wl-history-details")
                with gr.Row():
                    w["reuse"] = gr.Button("Reuse these settings", elem_id="wl-reuse")
                    w["history_refresh"] = gr.Button("Refresh", size="sm")
                queue_panel.latents_layout(ui)
            with gr.Tab("Models", id="models"):
                w["models_table"] = gr.Markdown(elem_id="wl-models")
                with gr.Row():
                    w["download_model"] = gr.Dropdown([(s.title, s.name) for s in MODELS.values()],
                                                      value=spec.name, label="Model to download")
                    w["download_btn"] = gr.Button("Download (only the files wan_lite needs)", elem_id="wl-download")
                    w["models_refresh"] = gr.Button("Check again", size="sm")
                w["download_status"] = gr.Markdown(elem_id="wl-download-status")
                _components_section(ui, spec.name)
        ui.demo = demo
        _wire(ui)
    return ui


def _components_section(ui: AppUI, model: str) -> None:
    """ "Use files you already have": scan, then pick a found file (or type a path) per slot."""
    w = ui.w
    with gr.Accordion("Use files you already have (ComfyUI, diffusers, GGUF…)", open=True):
        gr.Markdown("wan_lite can use the Wan 2.2 files other tools already downloaded, where they are, "
                    "without copying them. Scan finds them in the Hugging Face cache, your ComfyUI "
                    "`models` folder and wan_lite's own models folder.")
        with gr.Row():
            w["comfy_dir"] = gr.Textbox(label="ComfyUI models folder (remembered; several: separate with ;)",
                                        placeholder="/path/to/ComfyUI/models", scale=4, elem_id="wl-comfy-dir")
            w["scan_btn"] = gr.Button("Scan", scale=1, elem_id="wl-scan")
        w["found_table"] = gr.Markdown(elem_id="wl-found")
        w["found"] = gr.State([])
        w["comp_model"] = gr.Dropdown([(s.title, s.name) for s in MODELS.values()], value=model,
                                      label="Choose files for", elem_id="wl-comp-model")
        own = components_panel.slots_of(model)
        with gr.Row():
            for slot, label in components_panel.SLOT_LABELS.items():
                w[f"slot_{slot}"] = gr.Dropdown([components_panel.FROM_FOLDER], value="", label=label,
                                                allow_custom_value=True, visible=slot in own,
                                                elem_id=f"wl-slot-{slot}", info="Pick a found file or type a path.")
        w["comp_save"] = gr.Button("Save and use these files", elem_id="wl-comp-save")
        w["comp_status"] = gr.Markdown(elem_id="wl-comp-status")


def _create_tab(ui: AppUI, defaults: dict[str, Any], spec: Any) -> None:
    w, presets = ui.w, ui.presets
    with gr.Row():
        with gr.Column(scale=3):
            w["model"] = gr.Dropdown([(s.title, s.name) for s in MODELS.values()], value=spec.name,
                                     label="Model", elem_id="wl-model")
            w["user_prompt"] = gr.Textbox(lines=4, label="Prompt", elem_id="wl-prompt",
                                          placeholder="Subject, scene and motion, e.g. “A red fox trots "
                                                      "through fresh snow in a birch forest…”")
            w["final_prompt"] = gr.Textbox(label="Final prompt (exactly what the model gets)", lines=3,
                                           interactive=False, elem_id="wl-final")
            w["prompt_notes"] = gr.Markdown(elem_id="wl-prompt-notes")
            with gr.Accordion("Cinematic look · 影视级美学", open=True):
                with gr.Row():
                    w["bundle"] = gr.Dropdown([""] + list(presets.bundles), value="", label="Preset bundle",
                                              elem_id="wl-bundle")
                    w["style"] = gr.Dropdown([("No style template", "")] + [(n, n) for n in presets.styles],
                                             value="", label="Style template", elem_id="wl-style")
                    w["language"] = gr.Radio(LANGUAGES, value="en", label="Term language", elem_id="wl-language")
                with gr.Tabs():
                    for title, keys in term_tabs(presets).items():
                        with gr.Tab(title, elem_id=f"wl-tab-{keys[0]}"):
                            for key in keys:
                                cat = presets.categories[key]
                                w[form.term_widget(key)] = gr.CheckboxGroup(
                                    term_choices(cat), label=cat.label, elem_id=f"wl-terms-{key}")
                with gr.Row():
                    w["bundle_name"] = gr.Textbox(label="Save these terms and style as a preset named",
                                                  scale=3, elem_id="wl-bundle-name")
                    w["bundle_save"] = gr.Button("Save preset", scale=1, elem_id="wl-bundle-save")
            with gr.Accordion("Negative prompt", open=False):
                w["negative_prompt"] = gr.Textbox(DEFAULT_NEGATIVE_PROMPT, lines=3, label="Negative prompt",
                                                  elem_id="wl-negative")
                w["negative_restore"] = gr.Button("Restore the official default", size="sm")
        with gr.Column(scale=2):
            w["upload"] = gr.File(label="Start image (optional): PNG, JPEG or WebP",
                                  file_types=[".png", ".jpg", ".jpeg", ".webp"], elem_id="wl-upload")
            w["image"] = gr.State(None)
            w["crop"] = gr.Image(label="The model's first frame", interactive=False, height=200, elem_id="wl-crop")
            w["crop_note"] = gr.Markdown(elem_id="wl-crop-note")
            w["mode"] = gr.Radio([(m.title, m.key) for m in MODES.values()], value=defaults["mode"],
                                 label="Quality / Fast / Draft",
                                 info=" · ".join(f"{m.title}: {m.description}" for m in MODES.values()),
                                 elem_id="wl-mode")
            w["size"] = gr.Dropdown(size_choices(spec), value=defaults["size"], label="Size", elem_id="wl-size",
                                    allow_custom_value=True,
                                    info="Or type WIDTHxHEIGHT; it is rounded to what the model accepts.")
            w["frames"] = gr.Slider(5, max_frames(spec), value=defaults["frames"], step=4, label="Frames (4n+1)",
                                    elem_id="wl-frames")
            with gr.Row():
                w["cache"] = gr.Radio([("Off", "off"), ("Balanced", "balanced"), ("Fast", "fast")], value="off",
                                      label="Step cache", elem_id="wl-cache",
                                      info="Skips DiT steps that would change little: balanced about 2x faster, "
                                           "fast about 2.5x; off computes every step.")
                w["turbo"] = gr.Checkbox(False, label="Turbo (speed LoRA: 4 steps, guidance 1)", elem_id="wl-turbo",
                                         info="Switched on when you add a speed LoRA (Lightning, lightx2v).")
            with gr.Accordion("LoRAs", open=False, elem_id="wl-loras-box"):
                w["lora_add"] = gr.Dropdown([], value=None, label="Add a LoRA from models/loras or ComfyUI",
                                            allow_custom_value=True, elem_id="wl-lora-add",
                                            info="Or type the path of a .safetensors file.")
                w["loras"] = gr.Dataframe(headers=form.LORA_COLUMNS, datatype=["str", "number", "number"],
                                          value=[], row_count=0,
                                          label="Strength per expert (A14B: high- and low-noise; 0 leaves one alone)",
                                          interactive=True, elem_id="wl-loras")
            w["memory_profile"] = gr.Dropdown(memory_profiles(), value="auto", label="Memory profile",
                                              elem_id="wl-memory")
            w["estimate"] = gr.Markdown(elem_id="wl-estimate")
            with gr.Accordion("Advanced settings", open=False):
                w["steps"] = gr.Slider(1, 100, value=defaults["steps"], step=1, label="Steps", elem_id="wl-steps")
                w["guidance"] = gr.Slider(1, 10, value=defaults["guidance"], step=0.1, label="Guidance")
                w["guidance_low"] = gr.Slider(1, 10, value=defaults["guidance_low"], step=0.1,
                                              label="Guidance, low-noise expert", visible=spec.experts)
                w["shift"] = gr.Slider(1, 20, value=defaults["shift"], step=0.5, label="Shift")
                w["sampler"] = gr.Dropdown(SAMPLERS, value="unipc", label="Sampler")
            with gr.Row():
                w["generate"] = gr.Button("Generate", variant="primary", elem_id="wl-generate")
                w["queue_add"] = gr.Button("Add to queue", elem_id="wl-queue-add")
                w["cancel"] = gr.Button("Cancel", variant="stop", elem_id="wl-cancel")
            w["progress"] = gr.HTML(form.progress_html(None, "Ready.", "idle"), elem_id="wl-progress")
            w["status"] = gr.Markdown(elem_id="wl-status")
            w["preview"] = gr.Image(label="Live preview", interactive=False, height=160, elem_id="wl-preview")
            w["video"] = gr.Video(label="Result", interactive=False, elem_id="wl-video")
            w["download"] = gr.DownloadButton("Download video", visible=False, elem_id="wl-download-video")
            with gr.Row():
                # Text, not gr.Number: seeds reach 2**63 and a browser number keeps only 53 bits.
                w["seed"] = gr.Textbox("-1", label="Seed (-1 = random)", elem_id="wl-seed")
                w["last_seed"] = gr.Textbox("", label="Seed of the last video", interactive=False,
                                            elem_id="wl-last-seed")
                w["use_seed"] = gr.Button("Use this seed", size="sm")
            queue_panel.queue_layout(ui)


def _wire(ui: AppUI) -> None:
    w = ui.w
    form_names = ui.form_names
    # What the page derives from the form (final prompt, estimate, crop preview) is recomputed on
    # the user's own edits (.input, newest wins) and, after any handler that changes the form
    # itself, by chaining `refresh` with .then(). Listening to .change instead fires one request
    # per widget a handler touches, and their answers can arrive out of order (a stale prompt).
    prompt_inputs = ["user_prompt", "style", "language", "negative_prompt", *ui.term_names]
    estimate_inputs = ["size", "frames", "steps", "memory_profile", "guidance", "shift", "sampler", "cache", "turbo"]
    derived = ["final_prompt", "prompt_notes", "estimate", "crop", "crop_note"]
    mode_outputs = ["model", "size", "frames", "steps", "guidance", "guidance_low", "shift"]

    def named(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[Any, Any]]:
        def call(*args: Any, **values: Any) -> dict[Any, Any]:
            return ui.out(fn(*args, **values))
        return call

    def refresh(**values: Any) -> dict[Any, Any]:
        return ui.out({**prompt_updates(ui, values), **estimate_updates(ui, values),
                       **crop_preview(ui, values.get("image"), values["model"], values.get("size"))})

    then_refresh = {"fn": refresh, "inputs_kwargs": ui.kw(form_names), "outputs": ui.comps(derived), "queue": False}

    gr.on([w[n].input for n in prompt_inputs], named(lambda **v: prompt_updates(ui, v)),
          inputs_kwargs=ui.kw(prompt_inputs), outputs=ui.comps(["final_prompt", "prompt_notes"]), queue=False,
          trigger_mode="always_last")
    gr.on([w[n].input for n in estimate_inputs], named(lambda **v: estimate_updates(ui, v)),
          inputs_kwargs=ui.kw([*estimate_inputs, "model", "image"]), outputs=ui.comps(["estimate"]), queue=False,
          trigger_mode="always_last")
    w["size"].input(named(lambda image, model, size: crop_preview(ui, image, model, size)),
                    inputs_kwargs=ui.kw(["image", "model", "size"]), outputs=ui.comps(["crop", "crop_note"]),
                    queue=False, trigger_mode="always_last")

    w["lora_add"].input(named(lambda lora_add, loras, turbo: add_lora(ui, lora_add, loras, turbo)),
                        inputs_kwargs=ui.kw(["lora_add", "loras", "turbo"]),
                        outputs=ui.comps(["lora_add", "loras", "turbo", "status"]), queue=False).then(**then_refresh)

    def on_model(model: str, mode: str, size: str, image: str | None) -> dict[str, Any]:
        return model_updates(form.model_for_image(model, bool(image)), mode, size)

    w["model"].input(named(on_model), inputs_kwargs=ui.kw(["model", "mode", "size", "image"]),
                     outputs=ui.comps(mode_outputs), queue=False).then(**then_refresh)
    w["mode"].input(named(lambda model, mode, size: model_updates(model, mode, size)),
                    inputs_kwargs=ui.kw(["model", "mode", "size"]), outputs=ui.comps(mode_outputs),
                    queue=False).then(**then_refresh)

    def on_upload(upload: Any, model: str, mode: str, size: str) -> dict[str, Any]:
        path = getattr(upload, "name", upload)
        if not path:
            out = {"image": None, "status": ""}
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
        return out

    w["upload"].change(named(on_upload), inputs_kwargs=ui.kw(["upload", "model", "mode", "size"]),
                       outputs=ui.comps(["image", "status", "upload", *mode_outputs]), queue=False).then(**then_refresh)

    def apply_bundle(bundle: str) -> dict[str, Any]:
        b = ui.presets.bundles.get(bundle or "")
        if b is None:
            return {}
        return {**form.split_terms(list(b.terms), ui.presets), "style": b.style or ""}

    w["bundle"].input(named(apply_bundle), inputs_kwargs=ui.kw(["bundle"]),
                      outputs=ui.comps([*ui.term_names, "style"]), queue=False).then(**then_refresh)

    def save_bundle(bundle_name: str, style: str, **terms: Any) -> dict[str, Any]:
        try:
            b = Bundle(bundle_name.strip(), tuple(form.collect_terms(terms, ui.presets)), style or None)
            path = save_user_bundle(user_presets_dir(), b, ui.presets)
            ui.presets.bundles[b.name] = b
            return {"status": f"Preset “{b.name}” saved to {path}.",
                    "bundle": gr.update(choices=[""] + list(ui.presets.bundles), value=b.name)}
        except Exception as err:
            return {"status": f"⛔ {error_message(err)}"}

    w["bundle_save"].click(named(save_bundle), inputs_kwargs=ui.kw(["bundle_name", "style", *ui.term_names]),
                           outputs=ui.comps(["status", "bundle"]), queue=False)
    w["negative_restore"].click(lambda: DEFAULT_NEGATIVE_PROMPT, outputs=w["negative_prompt"],
                                queue=False).then(**then_refresh)
    w["use_seed"].click(lambda s: s if str(s).strip().isdigit() else "-1", inputs=w["last_seed"],
                        outputs=w["seed"], queue=False)

    # Generate, Add to queue, Cancel and the queue: the jobs run in the server (ui.jobs); every
    # tab watches them on load and on a timer, so a reload or a closed tab stops nothing.
    queue_panel.wire_jobs(ui, form_names)

    # History and models
    history_out = ui.comps(["history", "history_paths"])
    w["history_refresh"].click(named(lambda: history_updates(ui)), outputs=history_out, queue=False)

    def select_history(paths: list[str], evt: gr.SelectData) -> dict[Any, Any]:
        entry = history.parse_sidecar(Path(paths[evt.index]), ui.engine.output_dir) if paths else None
        return ui.out({"history_index": evt.index,
                       "history_details": history.describe(entry) if entry else "That result is gone."})

    w["history"].select(select_history, inputs=w["history_paths"],
                        outputs=ui.comps(["history_index", "history_details"]), queue=False)
    reuse_out = ["status", "image", "mode", "seed", "bundle", "tabs", "user_prompt", "negative_prompt", "style",
                 "sampler", "memory_profile", "cache", "turbo", "loras", *ui.term_names, *mode_outputs]
    w["reuse"].click(named(lambda history_paths, history_index: reuse_history(ui, history_paths, history_index)),
                     inputs_kwargs=ui.kw(["history_paths", "history_index"]), outputs=ui.comps(reuse_out),
                     queue=False).then(**then_refresh)

    def models_table() -> dict[Any, Any]:
        rows, note = models_panel.statuses(ui.engine)
        return ui.out({"models_table": models_panel.status_markdown(rows, note)})

    w["models_refresh"].click(models_table, outputs=ui.comps(["models_table"]), queue=False)

    def download(download_model: str) -> Iterator[dict[Any, Any]]:
        last = ""
        for last in models_panel.download_events(ui.engine, download_model):
            yield ui.out({"download_status": last})
        yield models_table() | ui.out({"download_status": last})  # the table shows the new state

    w["download_btn"].click(download, inputs_kwargs=ui.kw(["download_model"]),
                            outputs=ui.comps(["download_status", "models_table"]),
                            concurrency_limit=1, concurrency_id="download")

    _wire_components(ui, models_table)

    # A fresh page: the last settings, the history and the model folders.
    load_out = [n for n in form_names if n != "image"] + ["history", "history_paths", "models_table",
                                                         "final_prompt", "prompt_notes", "estimate", "lora_add"]

    def on_load() -> dict[Any, Any]:
        values = form.values_from_settings(ui.store.load(), ui.presets)
        # The saved values win over the mode's; the model decides the size choices and labels.
        mode_defaults = model_updates(values["model"], values.get("mode") or "quality", values.get("size"))
        updates = override(mode_defaults, values)
        updates.update(history_updates(ui))
        updates.update(prompt_updates(ui, values))
        updates.update(estimate_updates(ui, values))
        updates["lora_add"] = gr.update(choices=lora_choices(ui), value=None)
        return ui.out(updates) | models_table()

    ui.demo.load(on_load, outputs=ui.comps(load_out), queue=False)


def _wire_components(ui: AppUI, models_table: Callable[[], dict[Any, Any]]) -> None:
    w = ui.w
    slot_names = [f"slot_{s}" for s in components_panel.ALL_SLOTS]

    def slot_updates(found: list, model: str) -> dict[str, Any]:
        return {f"slot_{v.slot}": gr.update(choices=v.choices, value=v.value, visible=v.visible)
                for v in components_panel.slot_views(ui.engine, found, model)}

    def scan(comfy_dir: str, comp_model: str) -> dict[Any, Any]:
        found, table = components_panel.scan(ui.engine, comfy_dir, confine=ui.confine)
        return ui.out({"found": found, "found_table": table, **slot_updates(found, comp_model)}) | models_table()

    w["scan_btn"].click(scan, inputs_kwargs=ui.kw(["comfy_dir", "comp_model"]),
                        outputs=ui.comps(["found", "found_table", "models_table", *slot_names]),
                        concurrency_limit=1, concurrency_id="scan")
    w["comp_model"].input(lambda found, comp_model: ui.out(slot_updates(found, comp_model)),
                          inputs_kwargs=ui.kw(["found", "comp_model"]), outputs=ui.comps(slot_names), queue=False)

    def save(found: list, comp_model: str, **slots: str) -> dict[Any, Any]:
        picks = {name.removeprefix("slot_"): value for name, value in slots.items()}
        message = components_panel.save(ui.engine, comp_model, picks, confine=ui.confine)
        updates = {"comp_status": message}
        if not message.startswith("⛔"):  # a wrong file stays in its box so the user can fix it
            updates.update(slot_updates(found, comp_model))
        return ui.out(updates) | models_table()

    w["comp_save"].click(save, inputs_kwargs=ui.kw(["found", "comp_model", *slot_names]),
                         outputs=ui.comps(["comp_status", "models_table", *slot_names]),
                         concurrency_limit=1, concurrency_id="scan")  # reads file headers: can take seconds

    def on_load(comp_model: str) -> dict[Any, Any]:
        try:
            dirs = components_panel.dirs_text(ui.engine.comfy_dirs())
        except Exception as err:  # the page must still open
            log.warning("Remembered ComfyUI folders not read: %s", err)
            dirs = ""
        return ui.out({"comfy_dir": dirs, **slot_updates([], comp_model)})

    ui.demo.load(on_load, inputs_kwargs=ui.kw(["comp_model"]), outputs=ui.comps(["comfy_dir", *slot_names]),
                 queue=False)


def launch(ui: AppUI, *, host: str, port: int | None, share: bool, open_browser: bool,
           output_dir: Path, block: bool = True, auth: list[tuple[str, str]] | None = None) -> None:
    """Start serving: one job at a time, only the output and upload folders readable; `auth`:
    the (user, password) pairs the login page accepts (None: no login)."""
    if ui.demo is None:
        raise RuntimeError("build_ui() must run before launch()")
    ui.demo.queue(default_concurrency_limit=1)
    ui.demo.launch(
        server_name=host, server_port=port, share=share, inbrowser=open_browser, auth=auth,
        allowed_paths=[str(output_dir), str(ui.upload_dir)], css=CSS, prevent_thread_lock=not block,
        footer_links=[], show_error=False, quiet=False,
    )
