"""The page's side of the server's jobs (wan_lite.ui.jobs.JobManager): Generate, "Add to queue",
Cancel, the queue list with its buttons, and the watcher that every open tab runs.

A tab never runs a job: it sends a command and shows what the manager says. `watch` runs on
page load and on a timer (`TICK_S`); it compares the manager's state with what this tab last
showed (`seen`, one per tab) and updates only what changed, so an unchanged page costs nothing
and a preview picture or a video is sent once, not at every tick.
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

import gradio as gr

from wan_lite.errors import InputError
from wan_lite.registry import MODELS
from wan_lite.ui import form, history
from wan_lite.ui.handlers import AppUI, history_updates, model_missing_text
from wan_lite.ui.jobs import QueuedJob, Snapshot, error_message, progress_words

TICK_S = 0.5
STOPPING = "Stopping after this step…"
SHOWN_FINISHED = 5  # finished jobs listed under the queue
# What `watch` updates: the current job, the queue, the saved-latents list of the History.
JOB_OUTPUTS = ["progress", "status", "preview", "video", "download", "last_seed", "history", "history_paths"]
QUEUE_OUTPUTS = ["queue_table", "queue_tools", "queue_pick", "queue_run", "latents_box", "latents_pick"]
WATCH_OUTPUTS = [*JOB_OUTPUTS, *QUEUE_OUTPUTS, "jobs_seen"]
BADGES = {"queued": "waiting", "running": "running", "cancelling": "stopping", "done": "done", "failed": "failed",
          "cancelled": "cancelled", "interrupted": "interrupted"}


# ------------------------------------------------------------------------------ layout
def queue_layout(ui: AppUI) -> None:
    """The queue under the progress and result: the list, a job picker with its buttons."""
    w = ui.w
    w["jobs_seen"] = gr.State({})
    w["jobs_timer"] = gr.Timer(TICK_S)
    with gr.Group(elem_id="wl-queue-box"):
        w["queue_table"] = gr.HTML(queue_html(None), elem_id="wl-queue")
        with gr.Row(equal_height=True, visible=False) as w["queue_tools"]:  # shown when the list has jobs
            w["queue_pick"] = gr.Dropdown([], value=None, label="Job", scale=3, elem_id="wl-queue-pick",
                                          info="Pick a job of the list to move or remove it.")
            w["queue_up"] = gr.Button("↑ Earlier", size="sm", scale=1, min_width=80, elem_id="wl-queue-up")
            w["queue_down"] = gr.Button("↓ Later", size="sm", scale=1, min_width=80, elem_id="wl-queue-down")
            w["queue_remove"] = gr.Button("Remove", size="sm", scale=1, min_width=80, elem_id="wl-queue-remove")
        w["queue_run"] = gr.Button("▶ Run the queue", visible=False, elem_id="wl-queue-run")
        w["queue_note"] = gr.Markdown(elem_id="wl-queue-note")


def latents_layout(ui: AppUI) -> None:
    """In the History: saved latents that have no video yet (a crash, a Cancel during the decode)."""
    w = ui.w
    with gr.Column(visible=False, elem_id="wl-latents-box") as w["latents_box"]:
        gr.Markdown("**Runs that kept their latents but have no video** (the app stopped, or the run was "
                    "cancelled while decoding): make the video from them, no denoising again.")
        with gr.Row(equal_height=True):
            w["latents_pick"] = gr.Dropdown([], value=None, label="Saved latents", scale=4, elem_id="wl-latents-pick")
            w["latents_decode"] = gr.Button("Make the video", scale=1, elem_id="wl-latents-decode")
    # outside the box: the box hides once its last latents are being decoded, the note stays to say so
    w["latents_note"] = gr.Markdown(elem_id="wl-latents-note")


# ------------------------------------------------------------------------------ wiring
def wire_jobs(ui: AppUI, form_names: list[str]) -> None:
    """Generate, Add to queue, Cancel, the queue buttons, the History's "Make the video", and the
    watcher (on load and on the timer). Every handler here is quick and skips Gradio's queue:
    the jobs run on the manager's thread, not in a request."""
    w = ui.w

    def generate(**values: Any) -> dict[Any, Any]:
        return ui.out(submit_form(ui, values, start=True))

    def add_to_queue(**values: Any) -> dict[Any, Any]:
        return ui.out(submit_form(ui, values, start=False))

    submit_outputs = ui.comps(["status", "progress", "preview", "video", "download", "queue_note",
                               *QUEUE_OUTPUTS, "jobs_seen"])
    w["generate"].click(generate, inputs_kwargs=ui.kw(form_names), outputs=submit_outputs, queue=False)
    if "queue_add" in w:
        w["queue_add"].click(add_to_queue, inputs_kwargs=ui.kw(form_names), outputs=submit_outputs, queue=False)

    def cancel(jobs_seen: dict) -> dict[Any, Any]:
        return ui.out(cancel_updates(ui, jobs_seen))

    w["cancel"].click(cancel, inputs_kwargs=ui.kw(["jobs_seen"]),
                      outputs=ui.comps(["status", "progress", "jobs_seen"]), queue=False)

    def queue_action(action: str):
        def act(queue_pick: str | None, jobs_seen: dict) -> dict[Any, Any]:
            return ui.out(queue_command(ui, action, queue_pick, jobs_seen))
        act.__name__ = f"queue_{action}"
        return act

    for action in ("up", "down", "remove", "run"):
        w[f"queue_{action}"].click(queue_action(action), inputs_kwargs=ui.kw(["queue_pick", "jobs_seen"]),
                                   outputs=ui.comps(["queue_note", *QUEUE_OUTPUTS, "jobs_seen"]), queue=False)

    def make_video(latents_pick: str | None) -> dict[Any, Any]:
        return ui.out(decode_latents(ui, latents_pick))

    w["latents_decode"].click(make_video, inputs_kwargs=ui.kw(["latents_pick"]),
                              outputs=ui.comps(["latents_note", "latents_pick"]), queue=False)
    if "history_refresh" in w:
        w["history_refresh"].click(lambda: ui.out(latents_updates(ui, ui.jobs.view())),
                                   outputs=ui.comps(["latents_box", "latents_pick"]), queue=False)

    def watch(jobs_seen: dict) -> dict[Any, Any]:
        return ui.out(watch_updates(ui, jobs_seen))

    outputs = ui.comps(WATCH_OUTPUTS)
    w["jobs_timer"].tick(watch, inputs_kwargs=ui.kw(["jobs_seen"]), outputs=outputs, queue=False,
                         show_progress="hidden")
    ui.demo.load(watch, inputs_kwargs=ui.kw(["jobs_seen"]), outputs=outputs, queue=False, show_progress="hidden")


# ------------------------------------------------------------------------------ handlers
def submit_form(ui: AppUI, values: dict[str, Any], start: bool) -> dict[str, Any]:
    """Generate (`start`: run the queue now) or Add to queue: the form checked and resolved once,
    then handed to the manager. The page answers at once; `watch` shows the run."""
    failed = {"progress": form.progress_html(None, "", "failed"), "video": None, "download": gr.update(visible=False)}
    try:
        request, comp = form.request_from_values(values, ui.presets)
        if not comp.prompt.strip() and not request.image:
            raise InputError("The prompt is empty.", "Write what the video should show, or upload a start image.")
    except Exception as err:
        return {**failed, "status": f"⛔ {error_message(err)}"}
    ui.store.save(form.settings_from_values(values, ui.presets))
    try:
        job = ui.engine.resolve(request)  # once: the manager and the engine take this Job as it is
    except Exception as err:
        return {**failed, "status": f"⛔ {error_message(err)}"}
    entry = ui.jobs.submit(job, start=start)
    view = ui.jobs.view()
    out = queue_updates(ui, view)
    ahead = next((i for i, j in enumerate(view.queued) if j.id == entry.id), None)
    if start and (view.running is None or view.running.id == entry.id) and not ahead:
        # it starts now: this tab shows it from the first moment
        return {**out, "status": job_status(entry), "progress": form.progress_html(None, "Starting…", "running"),
                "preview": None, "video": None, "download": gr.update(visible=False), "queue_note": ""}
    where = f"#{ahead + 1} in the queue" if ahead is not None else "in the queue"
    if start or view.active or view.running is not None:
        note = f"Added as {where}; it runs when the jobs before it are done."
    else:
        note = f"Added as {where}. The queue waits: click Generate or “Run the queue” to start it."
    return {**out, "queue_note": note}


def cancel_updates(ui: AppUI, seen: dict) -> dict[str, Any]:
    """Cancel: the running job is told to stop, and this tab says so at once; `watch` then shows
    "Cancelled" when it has stopped (the decode and the video write stop too)."""
    told = ui.jobs.cancel()
    if told is None:
        return {"status": "Nothing is running."}
    seen = dict(seen or {})
    seen.pop("job", None)  # the next tick shows the job's own state again, whatever this answer raced
    return {"status": f"⏹ {STOPPING}", "progress": form.progress_html(told.progress, STOPPING, "cancelling"),
            "jobs_seen": seen}


def queue_command(ui: AppUI, action: str, job_id: str | None, seen: dict) -> dict[str, Any]:
    jobs = ui.jobs
    note = ""
    if action == "run":
        jobs.start()
    elif not job_id:
        note = "Pick a job in the list first."
    elif action in ("up", "down"):
        if not jobs.move(job_id, -1 if action == "up" else 1):
            note = "Only waiting jobs move, within the queue."
    elif action == "remove" and not jobs.remove(job_id):
        note = "A running job is not removed: cancel it." if jobs.get(job_id) else "That job is gone."
    out = queue_updates(ui, jobs.view())
    if action == "remove" and not note:
        out["queue_pick"] = gr.update(choices=out["queue_pick"]["choices"], value=None)
    return {**out, "queue_note": note, "jobs_seen": {**(seen or {}), "queue": None}}


def decode_latents(ui: AppUI, path: str | None) -> dict[str, Any]:
    """The History's "Make the video": a decode job for saved latents, run by the manager."""
    if not path:
        return {"latents_note": "Pick saved latents first."}
    latents = Path(path)
    choices = [str(p) for p in history.pending_latents(ui.engine.output_dir)]
    if str(latents) not in choices:  # only what the list offers: no other file is opened
        return {"latents_note": "⛔ Those latents are not in the output folder (or have a video now)."}
    record = history.latents_record(latents) or {}
    settings = record.get("settings") if isinstance(record.get("settings"), dict) else {}
    entry = ui.jobs.submit_decode(latents, settings)
    running = ui.jobs.view().running
    when = "it is running now" if running is not None and running.id == entry.id else "it runs after the queue's jobs"
    return {"latents_note": f"Making the video from {html.escape(latents.name)}: {when} (see Create). "
                            "It appears in the History when done."}


# ------------------------------------------------------------------------------ watching
def watch_updates(ui: AppUI, seen: dict | None) -> dict[str, Any]:
    """What this tab must change to show the manager's state (`seen`: what it shows now)."""
    seen = dict(seen or {})
    view = ui.jobs.view()
    out: dict[str, Any] = {}
    if seen.get("version") == view.version:
        return {name: gr.skip() for name in WATCH_OUTPUTS}
    seen["version"] = view.version
    job = shown_job(ui, view)
    key = (job.id, job.version) if job else None
    if seen.get("job", "none") != key:
        seen["job"] = key
        out.update(job_updates(job, ui))
    preview = (job.id, job.preview_version) if job else None
    if seen.get("preview", "none") != preview:
        seen["preview"] = preview
        out["preview"] = job.progress.preview if job and job.progress and job.progress.preview is not None else None
    result = job.id if job and job.state == "done" and job.result else None
    if seen.get("result", "none") != result:
        first = "result" not in seen
        seen["result"] = result
        out.update(result_updates(ui, job if result else None, refresh_history=not first))
    queue_key = queue_signature(view)
    if seen.get("queue") != queue_key:
        seen["queue"] = queue_key
        out.update(queue_updates(ui, view))
    elif view.running is not None:
        out["queue_table"] = queue_html(view)  # the running row's step
    out["jobs_seen"] = seen
    return {name: out.get(name, gr.skip()) for name in WATCH_OUTPUTS}


def shown_job(ui: AppUI, view: Snapshot) -> QueuedJob | None:
    """The job a tab shows: the running one, else the last one that finished since the app started
    (an older one from the file only when it was interrupted: that is news)."""
    if view.running is not None:
        return view.running
    for job in view.finished:
        if (job.finished or 0) >= ui.jobs.started_at or job.state == "interrupted":
            return job
    return None


def job_status(job: QueuedJob) -> str:
    return "\n".join(f"- {n}" for n in job.notes)


def job_updates(job: QueuedJob | None, ui: AppUI | None = None) -> dict[str, Any]:
    """Progress bar and status of the shown job. A job that failed because its model is not on
    this computer says so and points to the Models tab, not the loader's layout lecture."""
    if job is None:
        return {"progress": form.progress_html(None, "Ready.", "idle"), "status": ""}
    p = job.progress
    if job.state == "running":
        return {"progress": form.progress_html(p, "", "running") if p else
                form.progress_html(None, "Starting…", "running"), "status": job_status(job)}
    if job.state == "cancelling":
        return {"progress": form.progress_html(p, STOPPING, "cancelling"), "status": f"⏹ {STOPPING}"}
    if job.state == "done":
        r = job.result or {}
        timings = r.get("timings") or {}
        total = timings.get("total", sum(timings.values()))
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items() if k != "total")
        size = f"{r.get('width')}×{r.get('height')}, {r.get('frames')} frames at {r.get('fps')} fps"
        lines = [f"✅ Done: {size}, seed **{r.get('seed')}**" + (f" ({parts}; total {total:.1f} s)." if parts else ".")]
        lines += [f"- {n}" for n in dict.fromkeys([*job.notes, *(r.get("notes") or []), job.message]) if n]
        return {"progress": form.progress_html(None, "Finished", "done"), "status": "\n".join(lines)}
    if job.state == "cancelled":
        return {"progress": form.progress_html(None, "Cancelled", "cancelled"), "status": f"⏹ {job.message}"}
    if job.state == "interrupted":
        return {"progress": form.progress_html(None, "Interrupted", "failed"), "status": f"⚠️ {job.message}"}
    message = job.message
    model = job.request.get("model") if isinstance(job.request, dict) else None
    if ui is not None and model in MODELS and message and str(ui.engine.model_folder(model)) in message:
        message = model_missing_text(ui, model) or message
    return {"progress": form.progress_html(None, "Failed", "failed"), "status": f"⛔ {message}"}


def result_updates(ui: AppUI, job: QueuedJob | None, refresh_history: bool) -> dict[str, Any]:
    """The video of a job that finished (none: no video shown), and the History with it."""
    r = job.result if job is not None else None
    if not r or not Path(r["video"]).is_file():
        return {"video": None, "download": gr.update(visible=False)}
    out = {"video": r["video"], "download": gr.update(value=r["video"], visible=True), "last_seed": str(r["seed"])}
    if refresh_history:
        out.update(history_updates(ui))
    return out


# ------------------------------------------------------------------------------ the queue list
def queue_signature(view: Snapshot) -> tuple:
    """What the list and its picker show, without the running job's progress."""
    rows = [(j.id, j.state, bool(j.latents)) for j in [*([view.running] if view.running else []),
                                                      *view.queued, *view.finished[:SHOWN_FINISHED]]]
    return (view.active, tuple(rows))


def queue_updates(ui: AppUI, view: Snapshot) -> dict[str, Any]:
    choices = [(pick_label(i + 1, j), j.id) for i, j in enumerate(view.queued)]
    choices += [(pick_label(None, j), j.id) for j in view.finished[:SHOWN_FINISHED]]
    waiting = len(view.queued)
    run = gr.update(value=f"▶ Run the queue ({waiting} waiting)", visible=bool(waiting and not view.active))
    return {"queue_table": queue_html(view), "queue_tools": gr.update(visible=bool(choices)),
            "queue_pick": gr.update(choices=choices), "queue_run": run, **latents_updates(ui, view)}


def latents_updates(ui: AppUI, view: Snapshot) -> dict[str, Any]:
    """The History's list of saved latents without a video (shown only when there are some)."""
    skip = (view.running.latents,) if view.running is not None and view.running.latents else ()
    pending = history.pending_latents(ui.engine.output_dir, skip=skip)
    latents = [(history.describe_latents(p), str(p)) for p in pending]
    return {"latents_box": gr.update(visible=bool(latents)),
            "latents_pick": gr.update(choices=latents, value=latents[0][1] if latents else None)}


def pick_label(position: int | None, job: QueuedJob) -> str:
    where = f"#{position}" if position is not None else BADGES[job.state]
    return f"{where} · {excerpt(job.prompt, 40)}"


def excerpt(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1].rstrip() + "…"


def _facts(job: QueuedJob) -> str:
    """Model · size · frames · steps of a job's request."""
    r = job.request
    spec = MODELS.get(str(r.get("model")))
    parts = [spec.label if spec else str(r.get("model") or "")]
    if r.get("width") and r.get("height"):
        parts.append(f"{r['width']}×{r['height']}")
    if r.get("frames"):
        parts.append(f"{r['frames']} frames")
    if r.get("steps") and job.kind == "generate":
        parts.append(f"{r['steps']} steps")
    return " · ".join(p for p in parts if p)


ROW = ('<div class="wl-q-row wl-q-{cls}" data-id="{id}" style="display:flex;gap:10px;padding:6px 8px;'
       'border-top:1px solid var(--border-color-primary);{extra}">'
       '<div style="min-width:4.5em;font-weight:600">{badge}</div>'
       '<div style="flex:1;min-width:0"><div style="overflow:hidden;text-overflow:ellipsis;white-space:nowrap">'
       '{prompt}</div><div style="font-size:.85em;opacity:.75">{state} · {facts}</div></div></div>')


def _row(job: QueuedJob, badge: str, state: str, extra: str = "") -> str:
    prompt = job.prompt or Path(job.latents or "").name
    if job.kind == "decode":
        prompt = f"Video from saved latents: {prompt}"
    return ROW.format(cls=job.state, id=html.escape(job.id), extra=extra, badge=html.escape(badge),
                      prompt=html.escape(excerpt(prompt, 120)), state=html.escape(state),
                      facts=html.escape(_facts(job)))


def queue_html(view: Snapshot | None) -> str:
    """The queue as a list: the running job, the waiting ones in order, the last finished."""
    rows = []
    if view is not None and view.running is not None:
        j = view.running
        state = "stopping after this step" if j.state == "cancelling" else (progress_words(j.progress) or "starting")
        rows.append(_row(j, "▶ now", state, "background:var(--background-fill-secondary);"))
    for i, j in enumerate(view.queued if view is not None else []):
        rows.append(_row(j, f"#{i + 1}", "waiting"))
    for j in view.finished[:SHOWN_FINISHED] if view is not None else []:
        when = time.strftime("%H:%M", time.localtime(j.finished)) if j.finished else ""
        state = BADGES[j.state] + (" · latents kept (History)" if j.latents and j.state != "done" else "")
        rows.append(_row(j, when, state, "opacity:.65;"))
    waiting = len(view.queued) if view is not None else 0
    if view is None or not (view.running or waiting):
        title = "Queue: empty. Generate runs a job now; “Add to queue” keeps one for later."
    elif view.running and not waiting:
        title = "Queue: one job running, none waiting. “Add to queue” adds one to run after it."
    elif view.active or view.running:
        title = f"Queue: {waiting} waiting, run one after another."
    else:
        title = f"Queue: {waiting} waiting, held: “Run the queue” starts it."
    return (f'<div class="wl-queue"><div class="wl-queue-title" style="padding:6px 8px;font-weight:600">'
            f'{html.escape(title)}</div>{"".join(rows)}</div>')
