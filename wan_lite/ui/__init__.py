"""The desktop app's page (Gradio) and its Gradio-free parts.

- presets.py   the cinematic vocabulary, style templates and bundles (JSON in presets/ and the
               user's own folder)
- composer.py  user text + terms + style -> the exact prompt, by the official Wan 2.2 rules
- settings.py  sizes, frames, Quality/Fast/Draft, remembered settings
- images.py    upload checks and the exact first frame the model will use
- form.py      widget values (by name) <-> GenerateRequest, page texts
- jobs.py      one engine job in a worker thread: progress stream, per-session cancel
- history.py   past results from the sidecar JSON files
- downloads.py / models_panel.py   the Models tab
- components_panel.py  its "Use files you already have" section (scan, choices per slot)
- handlers.py / app.py   the page's handlers, layout and wiring (the only modules importing Gradio)

Only wan_lite.api, wan_lite.engine, wan_lite.registry, wan_lite.errors, wan_lite.sizing (pure
arithmetic shared with the engine) and wan_lite.paths (the config folder, atomic writes) are
imported from the rest of wan_lite; never torch.
"""
