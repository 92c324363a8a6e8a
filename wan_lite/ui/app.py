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
from wan_lite.ui import components_panel, form, history, models_panel, queue_panel
from wan_lite.ui.handlers import (
    FRAMES_INFO,
    SIZE_INFO,
    AppUI,
    add_lora,
    apply_bundle,
    crop_preview,
    delete_history,
    estimate_updates,
    first_run_hint,
    history_updates,
    image_model_note,
    model_menu,
    model_updates,
    page_values,
    prompt_updates,
    reuse_history,
    snap_frames_box,
    snap_size_box,
    undo_bundle,
    upload_image,
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
#wl-models th, #wl-found th { white-space: nowrap; word-break: normal; }  /* headers never wrap mid-word */
#wl-models td, #wl-found td { word-break: normal; }
#wl-models code { overflow-wrap: anywhere; }
/* The cinematic term tabs: compact, so that all of them fit the column (Gradio moves tabs that do
   not fit into a "..." menu, where nobody finds them). */
#wl-look .tab-container button { padding: 4px 7px; font-size: 0.82em; }
#wl-look .tab-wrapper { padding-bottom: 0; }
/* Cancel is small and secondary; it looks disabled while nothing runs. */
#wl-cancel { align-self: stretch; }
body:not(:has(#wl-progress [data-state="running"])) #wl-cancel { opacity: .45; }
/* History: whole thumbnails (no crop), the prompt readable under each. */
#wl-history img, #wl-history video { object-fit: contain !important; background: var(--neutral-900, #111); }
#wl-history .grid-container { grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)) !important; }
#wl-history .caption-label { white-space: normal !important; overflow: visible !important;
                             display: -webkit-box; -webkit-line-clamp: 3; -webkit-box-orient: vertical; }
"""
# Ctrl+Enter (Cmd+Enter on a Mac) anywhere on the page clicks Generate.
JS = """() => {
    document.addEventListener('keydown', (e) => {
        if ((e.ctrlKey || e.metaKey) && e.key === 'Enter') {
            const button = document.querySelector('#wl-generate');
            if (button && !button.disabled) { e.preventDefault(); button.click(); }
        }
    });
}"""
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
                with gr.Row():
                    w["history_filter"] = gr.Textbox(label="Filter", placeholder="Words of the prompt or file name",
                                                     scale=3, elem_id="wl-history-filter")
                    w["history_refresh"] = gr.Button("Refresh", size="sm", scale=1)
                with gr.Row(equal_height=False):
                    with gr.Column(scale=3):
                        w["history"] = gr.Gallery(label="Past results (newest first; click one)", columns=4,
                                                  height=560, object_fit="contain", elem_id="wl-history",
                                                  allow_preview=False, show_label=True)
                    with gr.Column(scale=2):
                        w["history_details"] = gr.Markdown("Click a result to see its prompt and settings.",
                                                           elem_id="wl-history-details")
                        with gr.Row():
                            w["reuse"] = gr.Button("Reuse these settings", variant="primary", elem_id="wl-reuse")
                            w["history_delete"] = gr.Button("Delete", variant="stop", size="sm",
                                                            elem_id="wl-history-delete")
                w["history_paths"] = gr.State([])
                w["history_index"] = gr.State(None)
                w["history_armed"] = gr.State(None)
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
    """Three columns, so that at 1920x1080 (and 1366x768) Generate, the progress and the result
    are on screen without scrolling: what to make (prompt, start image, look) | how (mode, size,
    frames, seed, estimate, memory, LoRAs) | Generate, progress and the result."""
    w, presets = ui.w, ui.presets
    w["first_run"] = gr.Markdown(elem_id="wl-first-run")
    with gr.Row(equal_height=False):
        with gr.Column(scale=5, min_width=360):
            w["model"] = gr.Dropdown([(s.title, s.name) for s in MODELS.values()], value=spec.name,
                                     label="Model", elem_id="wl-model")
            w["user_prompt"] = gr.Textbox(lines=3, label="Prompt (Ctrl+Enter generates)", elem_id="wl-prompt",
                                          placeholder="Subject, scene and motion, e.g. “A red fox trots "
                                                      "through fresh snow in a birch forest…”")
            w["final_prompt"] = gr.Textbox(label="Final prompt (exactly what the model gets)", lines=2,
                                           interactive=False, elem_id="wl-final")
            w["prompt_notes"] = gr.Markdown(elem_id="wl-prompt-notes")
            with gr.Row(equal_height=False):
                w["upload"] = gr.File(label="Start image (optional): PNG, JPEG or WebP", height=120,
                                      file_types=[".png", ".jpg", ".jpeg", ".webp"], elem_id="wl-upload")
                w["crop"] = gr.Image(label="The model's first frame", interactive=False, height=120,
                                     elem_id="wl-crop")
            w["image"] = gr.State(None)
            w["crop_note"] = gr.Markdown(elem_id="wl-crop-note")
            with gr.Accordion("Cinematic look · 影视级美学", open=True, elem_id="wl-look"):
                with gr.Row():
                    w["bundle"] = gr.Dropdown(list(presets.bundles), value=None, label="Preset bundle",
                                              elem_id="wl-bundle", info="Ticks a set of terms and a style.")
                    w["style"] = gr.Dropdown([("No style template", "")] + [(n, n) for n in presets.styles],
                                             value="", label="Style template", elem_id="wl-style")
                    w["language"] = gr.Radio(LANGUAGES, value="en", label="Term language", elem_id="wl-language")
                with gr.Row():
                    w["bundle_note"] = gr.Markdown(elem_id="wl-bundle-note")
                    w["bundle_undo"] = gr.Button("Undo the preset", size="sm", visible=False,
                                                 elem_id="wl-bundle-undo")
                w["bundle_before"] = gr.State(None)
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
        with gr.Column(scale=4, min_width=320):
            w["mode"] = gr.Radio([(m.title, m.key) for m in MODES.values()], value=defaults["mode"],
                                 label="Quality / Fast / Draft",
                                 info=" · ".join(f"{m.title}: {m.description}" for m in MODES.values()),
                                 elem_id="wl-mode")
            with gr.Row():
                w["size"] = gr.Dropdown(size_choices(spec), value=defaults["size"], label="Size", elem_id="wl-size",
                                        allow_custom_value=True, info=SIZE_INFO)
                # Text, not gr.Number: seeds reach 2**63 and a browser number keeps only 53 bits.
                w["seed"] = gr.Textbox("-1", label="Seed (-1 = random)", elem_id="wl-seed",
                                       info="The same seed and settings make the same video.")
            w["frames"] = gr.Slider(5, max_frames(spec), value=defaults["frames"], step=4, label="Frames",
                                    elem_id="wl-frames", info=FRAMES_INFO)
            w["estimate"] = gr.Markdown(elem_id="wl-estimate")
            gpus = ui.engine.gpu_count()
            with gr.Row():
                w["memory_profile"] = gr.Dropdown(memory_profiles(), value="auto", label="Memory profile",
                                                  elem_id="wl-memory", scale=3)
                # only where there are several: one video split over them (docs/multigpu.md)
                w["gpus"] = gr.Dropdown(form.gpu_choices(gpus), value=1, label="GPUs for one video", elem_id="wl-gpus",
                                        visible=gpus > 1, scale=2, min_width=140)
            with gr.Row():
                w["cache"] = gr.Radio([("Off", "off"), ("Balanced", "balanced"), ("Fast", "fast")], value="off",
                                      label="Step cache", elem_id="wl-cache",
                                      info="Skips DiT steps that would change little: balanced about 2x faster, "
                                           "fast about 2.5x; off computes every step.")
                w["turbo"] = gr.Checkbox(False, label="Turbo (speed LoRA: 4 steps, guidance 1)", elem_id="wl-turbo",
                                         info="Switched on when you add a speed LoRA (Lightning, lightx2v).")
                w["turbo_phases"] = gr.Checkbox(False, label="Turbo in 3 phases (fuller motion)", elem_id="wl-turbo-3",
                                                info="8 steps, the first guided and without the speed LoRA, "
                                                     "against its slow motion: about twice Turbo's time.")
            with gr.Accordion("LoRAs", open=False, elem_id="wl-loras-box"):
                w["lora_add"] = gr.Dropdown([], value=None, label="Add a LoRA from models/loras or ComfyUI",
                                            allow_custom_value=True, elem_id="wl-lora-add",
                                            info="Or type the path of a .safetensors file.")
                w["loras"] = gr.Dataframe(headers=form.LORA_COLUMNS, datatype=["str", "number", "number"],
                                          value=[], row_count=0,
                                          label="Strength per expert (A14B: high- and low-noise; 0 leaves one alone)",
                                          interactive=True, elem_id="wl-loras")
                w["loras_by_model"] = gr.State({})  # the rows per model, remembered in the settings
            with gr.Accordion("Advanced settings", open=False):
                w["steps"] = gr.Slider(1, 100, value=defaults["steps"], step=1, label="Steps", elem_id="wl-steps")
                w["guidance"] = gr.Slider(1, 10, value=defaults["guidance"], step=0.1, label="Guidance")
                w["guidance_low"] = gr.Slider(1, 10, value=defaults["guidance_low"], step=0.1,
                                              label="Guidance, low-noise expert", visible=spec.experts)
                w["shift"] = gr.Slider(1, 20, value=defaults["shift"], step=0.5, label="Shift")
                w["sampler"] = gr.Dropdown(SAMPLERS, value="unipc", label="Sampler")
        with gr.Column(scale=4, min_width=320):
            with gr.Row(elem_id="wl-run-row"):
                w["generate"] = gr.Button("Generate", variant="primary", size="lg", elem_id="wl-generate")
            with gr.Row():  # small, under Generate: a job for later, and Cancel (dim while nothing runs)
                w["queue_add"] = gr.Button("Add to queue", variant="secondary", size="sm", min_width=100,
                                           elem_id="wl-queue-add")
                w["cancel"] = gr.Button("Cancel", variant="secondary", size="sm", min_width=80, elem_id="wl-cancel")
            w["progress"] = gr.HTML(form.progress_html(None, "Ready.", "idle"), elem_id="wl-progress")
            w["status"] = gr.Markdown(elem_id="wl-status")
            w["preview"] = gr.Image(label="Live preview", interactive=False, height=160, elem_id="wl-preview")
            w["video"] = gr.Video(label="Result", interactive=False, height=300, elem_id="wl-video")
            with gr.Row(equal_height=False):
                w["last_seed"] = gr.Textbox("", label="Seed of the last video", interactive=False, scale=3,
                                            elem_id="wl-last-seed")
                with gr.Column(scale=1, min_width=140):
                    w["use_seed"] = gr.Button("Use this seed", size="sm")
                    w["download"] = gr.DownloadButton("Download video", visible=False, size="sm",
                                                      elem_id="wl-download-video")
            queue_panel.queue_layout(ui)


def _wire(ui: AppUI) -> None:
    w = ui.w
    form_names = ui.form_names
    # What the page derives from the form (final prompt, estimate, crop preview) is recomputed on
    # the user's own edits (.input, newest wins) and, after any handler that changes the form
    # itself, by chaining `refresh` with .then(). Listening to .change instead fires one request
    # per widget a handler touches, and their answers can arrive out of order (a stale prompt).
    prompt_inputs = ["user_prompt", "style", "language", "negative_prompt", *ui.term_names]
    estimate_inputs = ["steps", "memory_profile", "guidance", "shift", "sampler", "cache", "turbo", "turbo_phases",
                       "gpus"]
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

    # The text boxes on .change: Gradio's Textbox sends .input on keypress only, so Backspace,
    # Delete, select-all + Delete, cut and paste left the final prompt stale. Their .change also
    # fires when a handler sets them (Reuse), which computes the same text as the refresh after it.
    text_boxes = ("user_prompt", "negative_prompt")
    gr.on([w[n].change if n in text_boxes else w[n].input for n in prompt_inputs],
          named(lambda **v: prompt_updates(ui, v)),
          inputs_kwargs=ui.kw(prompt_inputs), outputs=ui.comps(["final_prompt", "prompt_notes"]), queue=False,
          trigger_mode="always_last")
    gr.on([w[n].input for n in estimate_inputs], named(lambda **v: estimate_updates(ui, v)),
          inputs_kwargs=ui.kw([*estimate_inputs, "size", "frames", "model", "image", "loras"]),
          outputs=ui.comps(["estimate"]), queue=False,
          trigger_mode="always_last")
    # A typed size or frame count is rounded in its box (with the reason), then everything follows it.
    w["size"].input(named(lambda model, size: snap_size_box(model, size)), inputs_kwargs=ui.kw(["model", "size"]),
                    outputs=ui.comps(["size"]), queue=False, trigger_mode="always_last").then(**then_refresh)
    w["frames"].input(named(lambda model, frames: snap_frames_box(model, frames)),
                      inputs_kwargs=ui.kw(["model", "frames"]), outputs=ui.comps(["frames"]), queue=False,
                      trigger_mode="always_last").then(**then_refresh)

    w["lora_add"].input(named(lambda lora_add, loras, turbo: add_lora(ui, lora_add, loras, turbo)),
                        inputs_kwargs=ui.kw(["lora_add", "loras", "turbo"]),
                        outputs=ui.comps(["lora_add", "loras", "turbo", "status"]), queue=False).then(**then_refresh)

    def on_model(model: str, mode: str, size: str, image: str | None, loras_by_model: dict) -> dict[str, Any]:
        used = form.model_for_image(model, bool(image))
        return {**model_updates(used, mode, size), "status": image_model_note(model, used, bool(image)),
                "loras": form.loras_for_model(used, loras_by_model)}  # each model keeps its own LoRAs

    w["model"].input(named(on_model), inputs_kwargs=ui.kw(["model", "mode", "size", "image", "loras_by_model"]),
                     outputs=ui.comps([*mode_outputs, "status", "loras"]), queue=False).then(**then_refresh)
    w["loras"].change(named(lambda model, loras, loras_by_model: {
        "loras_by_model": form.remember_loras(model, loras, loras_by_model)}),
        inputs_kwargs=ui.kw(["model", "loras", "loras_by_model"]), outputs=ui.comps(["loras_by_model"]), queue=False)
    w["mode"].input(named(lambda model, mode, size: model_updates(model, mode, size)),
                    inputs_kwargs=ui.kw(["model", "mode", "size"]), outputs=ui.comps(mode_outputs),
                    queue=False).then(**then_refresh)

    # .upload and .clear, not .change: a refused file is taken out of the box by the handler, and
    # .change would fire again for that and erase the error it had just shown.
    upload_outputs = ui.comps(["image", "status", "upload", *mode_outputs])
    w["upload"].upload(named(lambda upload, model, mode, size: upload_image(ui, upload, model, mode, size)),
                       inputs_kwargs=ui.kw(["upload", "model", "mode", "size"]), outputs=upload_outputs,
                       queue=False).then(**then_refresh)
    w["upload"].clear(named(lambda model, mode, size: upload_image(ui, None, model, mode, size)),
                      inputs_kwargs=ui.kw(["model", "mode", "size"]), outputs=upload_outputs,
                      queue=False).then(**then_refresh)

    bundle_outputs = [*ui.term_names, "style", "bundle", "bundle_note", "bundle_undo", "bundle_before"]

    def on_bundle(bundle: str, style: str, **terms: Any) -> dict[str, Any]:
        return apply_bundle(ui, bundle, style, terms)

    w["bundle"].input(named(on_bundle), inputs_kwargs=ui.kw(["bundle", "style", *ui.term_names]),
                      outputs=ui.comps(bundle_outputs), queue=False).then(**then_refresh)
    w["bundle_undo"].click(named(lambda bundle_before: undo_bundle(ui, bundle_before)),
                           inputs_kwargs=ui.kw(["bundle_before"]), outputs=ui.comps(bundle_outputs),
                           queue=False).then(**then_refresh)

    def save_bundle(bundle_name: str, style: str, **terms: Any) -> dict[str, Any]:
        try:
            b = Bundle(bundle_name.strip(), tuple(form.collect_terms(terms, ui.presets)), style or None)
            path = save_user_bundle(user_presets_dir(), b, ui.presets)
            ui.presets.bundles[b.name] = b
            return {"status": f"Preset “{b.name}” saved to {path}.",
                    "bundle": gr.update(choices=list(ui.presets.bundles), value=b.name)}
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
    history_out = ui.comps(["history", "history_paths", "history_index"])
    def filtered(history_filter: str) -> dict[str, Any]:  # the gallery changes: nothing is selected now
        return {**history_updates(ui, history_filter), "history_index": None}

    w["history_refresh"].click(named(filtered),
                               inputs_kwargs=ui.kw(["history_filter"]), outputs=history_out, queue=False)
    w["history_filter"].change(named(filtered),  # .change: a Textbox sends .input on keypress only
                              inputs_kwargs=ui.kw(["history_filter"]), outputs=history_out, queue=False,
                              trigger_mode="always_last")
    w["history_delete"].click(
        named(lambda history_paths, history_index, history_armed, history_filter: delete_history(
            ui, history_paths, history_index, history_armed, history_filter)),
        inputs_kwargs=ui.kw(["history_paths", "history_index", "history_armed", "history_filter"]),
        outputs=ui.comps(["history", "history_paths", "history_index", "history_armed", "history_details"]),
        queue=False)

    def select_history(paths: list[str], evt: gr.SelectData) -> dict[Any, Any]:
        entry = history.parse_sidecar(Path(paths[evt.index]), ui.engine.output_dir) if paths else None
        return ui.out({"history_index": evt.index, "history_armed": None,
                       "history_details": history.describe(entry) if entry else "That result is gone."})

    w["history"].select(select_history, inputs=w["history_paths"],
                        outputs=ui.comps(["history_index", "history_details", "history_armed"]), queue=False)
    reuse_out = ["status", "history_details", "image", "mode", "seed", "bundle", "tabs", "user_prompt",
                 "negative_prompt", "style", "language",
                 "sampler", "memory_profile", "cache", "turbo", "turbo_phases", "loras", *ui.term_names,
                 *mode_outputs]
    w["reuse"].click(named(lambda history_paths, history_index: reuse_history(ui, history_paths, history_index)),
                     inputs_kwargs=ui.kw(["history_paths", "history_index"]), outputs=ui.comps(reuse_out),
                     queue=False).then(**then_refresh)

    def models_table() -> dict[Any, Any]:
        rows, note = models_panel.statuses(ui.engine)
        ui.states = {r.name: r.state for r in rows} if not note else None
        return ui.out({"models_table": models_panel.status_markdown(rows, note)})

    # After anything that changes what is on disk: the model menu, the first-run word and the estimate follow.
    def model_menu_updates(**values: Any) -> dict[Any, Any]:
        return ui.out({"model": gr.update(choices=model_menu(ui)), "first_run": first_run_hint(ui),
                       **estimate_updates(ui, values)})

    then_menu = {"fn": model_menu_updates, "inputs_kwargs": ui.kw(form_names),
                 "outputs": ui.comps(["model", "first_run", "estimate"]), "queue": False}
    w["models_refresh"].click(models_table, outputs=ui.comps(["models_table"]), queue=False).then(**then_menu)

    def download(download_model: str) -> Iterator[dict[Any, Any]]:
        last = ""
        for last in models_panel.download_events(ui.engine, download_model):
            yield ui.out({"download_status": last})
        yield models_table() | ui.out({"download_status": last})  # the table shows the new state

    w["download_btn"].click(download, inputs_kwargs=ui.kw(["download_model"]),
                            outputs=ui.comps(["download_status", "models_table"]),
                            concurrency_limit=1, concurrency_id="download").then(**then_menu)

    _wire_components(ui, models_table, then_menu)

    # A fresh page: the last settings, the history and the model folders.
    load_out = [n for n in form_names if n != "image"] + ["history", "history_paths", "models_table", "first_run",
                                                         "final_prompt", "prompt_notes", "estimate", "lora_add"]

    def on_load() -> dict[Any, Any]:
        return ui.out(page_values(ui)) | models_table()

    ui.demo.load(on_load, outputs=ui.comps(load_out), queue=False)


def _wire_components(ui: AppUI, models_table: Callable[[], dict[Any, Any]], then_menu: dict[str, Any]) -> None:
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
                        concurrency_limit=1, concurrency_id="scan").then(**then_menu)
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
                         concurrency_limit=1, concurrency_id="scan").then(**then_menu)  # reads headers: seconds

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
           output_dir: Path, block: bool = True, auth: list[tuple[str, str]] | None = None,
           on_ready: Callable[[str], None] | None = None) -> None:
    """Start serving: one job at a time, only the output and upload folders readable (uploads
    other than images only as downloads); `auth`:
    the (user, password) pairs the login page accepts (None: no login); `on_ready(url)` once it
    serves (app.py tells a second start where to find it)."""
    if ui.demo is None:
        raise RuntimeError("build_ui() must run before launch()")
    ui.demo.queue(default_concurrency_limit=1)
    # quiet: Gradio's own start-up text tells to "set share=True in launch()"; ours is --share, so
    # the address (and the public one with --share) is printed here instead.
    ui.demo.launch(
        server_name=host, server_port=port, share=share, inbrowser=open_browser, auth=auth,
        # the upload folder is Gradio's own (GRADIO_TEMP_DIR): it serves its images inline and
        # anything else as a download. Listed as allowed, an .html POSTed to /upload came back
        # inline as text/html from the app's origin (stored cross-site scripting).
        allowed_paths=[str(output_dir)], css=CSS, js=JS, prevent_thread_lock=True,
        footer_links=[], show_error=False, quiet=True,
    )
    url = getattr(ui.demo, "local_url", None) or f"http://{host}:{port}/"
    print(f"wan_lite is running at {url}" + ("" if share else "  (--share makes a public link)"), flush=True)
    if on_ready is not None:
        on_ready(url)
    if block and hasattr(ui.demo, "block_thread"):
        ui.demo.block_thread()  # serve until Ctrl+C
