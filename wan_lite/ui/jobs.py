"""Jobs live in the server, not in a browser tab: one `JobManager` per app owns them.

A job is added (Generate, "Add to queue", "Make the video" of saved latents) and runs on the
manager's one worker thread, one after another through the Engine; the page only watches
(`JobManager.view`, polled by every open tab) and sends commands (cancel, reorder, remove). So
closing or reloading a tab never stops a job, and any tab shows the running one and the queue.

The queue is kept in a JSON file in the user's config folder (`queue.json`, written atomically
at every change of state): after a restart the queued jobs are there again (held until the user
runs the queue), and a job the file still calls running was cut short by a crash: it is listed as
interrupted, with its latents when the engine had saved them (they are decoded from the History).
"""

from __future__ import annotations

import atexit
import json
import logging
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from wan_lite.api import STAGE_TITLES, CancelToken, GenerateRequest, GenerateResult, Progress
from wan_lite.engine import Engine, Job
from wan_lite.errors import Cancelled, WanLiteError
from wan_lite.paths import write_json_atomic
from wan_lite.ui.history import find_latents

log = logging.getLogger(__name__)

QUEUE_FILE = "queue.json"
FORMAT = "wan_lite.queue"
STATES = ("queued", "running", "cancelling", "done", "failed", "cancelled", "interrupted")
ACTIVE = ("running", "cancelling")
FINISHED = ("done", "failed", "cancelled", "interrupted")
KEEP_FINISHED = 20  # finished jobs kept in the list (and the file), newest first
LATENTS_KEPT = " Its latents were saved: make the video from them in the History tab."
SAVE_EVERY_S = 5.0  # progress is written to the file at most this often (stage changes at once)


_MANAGERS: weakref.WeakSet[JobManager] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """At exit (Ctrl+C on the app): stop the running job within a step, so the process ends
    cleanly instead of inside a torch call on a daemon thread; it is listed as interrupted."""
    for manager in list(_MANAGERS):
        manager.shutdown()


def error_message(err: BaseException) -> str:
    """What the page shows for an exception: the WanLiteError text, or a short note for bugs."""
    if isinstance(err, WanLiteError):
        return str(err)
    if isinstance(err, NotImplementedError):
        return "This part of wan_lite is not finished yet (the engine does not implement it)."
    return f"Something went wrong inside wan_lite ({type(err).__name__}: {err}). Details are in the terminal log."


def progress_words(p: Progress | None) -> str:
    """Where a job is, in words: "Denoising, step 12/50"."""
    if p is None:
        return ""
    stage = STAGE_TITLES.get(p.stage, p.stage)
    return f"{stage}, step {p.step}/{p.total}" if p.total > 1 else stage


@dataclass(eq=False)  # one job is one object (its preview is an array: no field-wise ==)
class QueuedJob:
    """One job of the manager. `request`: the resolved GenerateRequest as a dict (every field
    filled, the seed drawn); a decode job has `latents` and the latents' settings as `request`.
    `result` (done): video, sidecar, latents, seed, width, height, frames, fps, timings, notes."""

    id: str
    request: dict[str, Any]
    kind: str = "generate"  # or "decode"
    notes: list[str] = field(default_factory=list)
    state: str = "queued"
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    message: str = ""  # why it failed, was cancelled or interrupted
    result: dict[str, Any] | None = None
    latents: str | None = None  # its saved latents, once the engine wrote them
    where: str = ""  # the last progress in words (kept in the file: an interrupted job says where)
    progress: Progress | None = None  # the latest, with the latest preview (not kept in the file)
    version: int = 0  # +1 at every change of this job
    preview_version: int = 0  # +1 at every new preview picture

    PERSISTED = ("id", "request", "kind", "notes", "state", "created", "started", "finished", "message",
                 "result", "latents", "where")

    @property
    def prompt(self) -> str:
        text = self.request.get("prompt")
        return text if isinstance(text, str) else ""

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.PERSISTED}

    @classmethod
    def from_json(cls, data: Any) -> QueuedJob | None:
        """A job read back from the file; None for an entry of the wrong shape."""
        if not isinstance(data, dict) or not isinstance(data.get("id"), str) or not isinstance(data.get("request"), dict):
            return None
        if data.get("state") not in STATES or data.get("kind", "generate") not in ("generate", "decode"):
            return None
        values: dict[str, Any] = {k: data[k] for k in cls.PERSISTED if k in data}
        checks = {"notes": list, "created": (int, float), "started": (int, float), "finished": (int, float),
                  "message": str, "result": dict, "latents": str, "where": str}
        for key, kind in checks.items():
            if key in values and values[key] is not None and not isinstance(values[key], kind):
                del values[key]
        values["notes"] = [str(n) for n in values.get("notes") or []]
        return cls(**values)


@dataclass(frozen=True)
class Snapshot:
    """The manager's state at one moment (copies: read without a lock). `version` changes with
    every change; `current`: the running job, else the one that finished last."""

    version: int
    running: QueuedJob | None
    queued: list[QueuedJob]
    finished: list[QueuedJob]  # newest first
    active: bool  # the queue runs (False: queued jobs wait for "Run the queue" or Generate)

    @property
    def current(self) -> QueuedJob | None:
        return self.running or (self.finished[0] if self.finished else None)


def result_dict(r: GenerateResult) -> dict[str, Any]:
    return {"video": str(r.video_path), "sidecar": str(r.sidecar_path), "latents": str(r.latents_path),
            "seed": r.seed, "width": r.width, "height": r.height, "frames": r.frames, "fps": r.fps,
            "timings": dict(r.timings), "notes": list(r.notes)}


class JobManager:
    """Owns the app's jobs and runs them one at a time on one worker thread (the Engine also runs
    one job at a time). `path`: the queue file (None: nothing is kept across restarts)."""

    def __init__(self, engine: Engine, path: Path | None = None) -> None:
        self.engine = engine
        self.path = Path(path) if path is not None else None
        self._cond = threading.Condition()
        self._jobs: list[QueuedJob] = []  # queued ones in run order, then the finished ones, newest first
        self._running: QueuedJob | None = None
        self._resolved: dict[str, Job] = {}  # jobs resolved on this run of the app (image opened)
        self._tokens: dict[str, CancelToken] = {}
        self._active = False
        self._version = 0
        self._closed = False
        self._saved_at = 0.0
        self._save_failed = False
        self._thread: threading.Thread | None = None
        self.started_at = time.time()  # jobs that finished before are from an earlier run of the app
        self._exiting = False
        self._load()
        _MANAGERS.add(self)

    # ------------------------------------------------------------------ commands
    def submit(self, job: Job, *, start: bool = True) -> QueuedJob:
        """Queue a resolved job (`Engine.resolve`) at the end. `start`: run the queue now if it
        waits (Generate); False leaves a waiting queue waiting ("Add to queue")."""
        entry = QueuedJob(self._new_id(), job.request.to_dict(), notes=list(job.notes), created=time.time())
        with self._cond:
            self._resolved[entry.id] = job
            return self._add(entry, start)

    def submit_decode(self, latents: Path, settings: dict[str, Any] | None = None, *, start: bool = True) -> QueuedJob:
        """Queue "make the video from these saved latents" (`Engine.decode_latents`)."""
        request = {k: v for k, v in (settings or {}).items() if k in GenerateRequest.field_names()}
        entry = QueuedJob(self._new_id(), request, kind="decode", latents=str(latents), created=time.time())
        with self._cond:
            return self._add(entry, start)

    def cancel(self, job_id: str | None = None) -> QueuedJob | None:
        """Tell the running job (or `job_id`, if that is the running one) to stop; it stops after
        the step or decode part in progress. Returns it (state "cancelling"), or None."""
        with self._cond:
            job = self._running
            if job is None or (job_id is not None and job.id != job_id):
                return None
            self._tokens[job.id].cancel()
            if job.state == "running":
                job.state = "cancelling"
                self._changed(job)
            return replace(job)

    def remove(self, job_id: str) -> bool:
        """Take a queued or finished job off the list (its files stay); the running one: False."""
        with self._cond:
            job = self._find(job_id)
            if job is None or job.state in ACTIVE:
                return False
            self._jobs.remove(job)
            self._resolved.pop(job_id, None)
            self._changed(None, save=True)
            return True

    def move(self, job_id: str, delta: int) -> bool:
        """Move a queued job `delta` places (negative: earlier) among the queued ones."""
        with self._cond:
            queued = [j for j in self._jobs if j.state == "queued"]
            job = self._find(job_id)
            if job is None or job not in queued:
                return False
            i = queued.index(job)
            k = max(0, min(len(queued) - 1, i + delta))
            if k == i:
                return False
            queued.insert(k, queued.pop(i))
            self._jobs = queued + [j for j in self._jobs if j.state != "queued"]
            self._changed(None, save=True)
            return True

    def start(self) -> None:
        """Run the queued jobs, one after another, until none is left."""
        with self._cond:
            if any(j.state == "queued" for j in self._jobs):
                self._active = True
                self._ensure_worker()
                self._changed(None, save=True)
                self._cond.notify_all()

    def hold(self) -> None:
        """Let the running job finish, then wait (the queued jobs stay)."""
        with self._cond:
            if self._active:
                self._active = False
                self._changed(None, save=True)

    # ------------------------------------------------------------------ reading
    def view(self) -> Snapshot:
        with self._cond:
            return Snapshot(self._version, replace(self._running) if self._running else None,
                            [replace(j) for j in self._jobs if j.state == "queued"],
                            [replace(j) for j in self._jobs if j.state in FINISHED], self._active)

    @property
    def version(self) -> int:
        return self._version

    def get(self, job_id: str) -> QueuedJob | None:
        with self._cond:
            job = self._find(job_id)
            return replace(job) if job else None

    def wait(self, job_id: str, timeout: float = 60.0, states: tuple[str, ...] = FINISHED) -> QueuedJob:
        """Block until the job is in one of `states` (default: finished); TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                job = self._find(job_id)
                if job is not None and job.state in states:
                    return replace(job)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"job {job_id} is {job.state if job else 'gone'} after {timeout} s")
                self._cond.wait(left)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker once the running job (if any) ends; the queue file stays as it is."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def shutdown(self, timeout: float = 30.0) -> None:
        """The app stops: the running job is stopped (listed as interrupted, its latents kept)
        and the worker ends; queued jobs stay in the file for the next start."""
        with self._cond:
            self._exiting = True
            for token in self._tokens.values():
                token.cancel()
        self.close(timeout)

    # ------------------------------------------------------------------ the worker
    def _ensure_worker(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="wan-lite-jobs", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        while True:
            with self._cond:
                job = None
                while not self._closed:
                    job = next((j for j in self._jobs if j.state == "queued"), None) if self._active else None
                    if job is not None:
                        break
                    self._cond.wait()
                if self._closed:
                    return
                assert job is not None
                token = CancelToken()
                self._tokens[job.id] = token
                self._running = job
                job.state, job.started, job.where = "running", time.time(), "Starting"
                self._changed(job, save=True)
            state, message, result = self._run(job, token)
            if self._exiting and state == "cancelled":
                where = f" ({job.where})" if job.where else ""
                state, message = "interrupted", f"The app stopped while this job ran{where}."
            with self._cond:
                self._running = None
                self._tokens.pop(job.id, None)
                self._resolved.pop(job.id, None)
                job.state, job.message, job.result, job.finished = state, message, result, time.time()
                if result:
                    job.latents = result.get("latents") or job.latents
                self._jobs.remove(job)
                self._jobs.insert(sum(j.state == "queued" for j in self._jobs), job)  # newest finished first
                self._trim()
                if not any(j.state == "queued" for j in self._jobs):
                    self._active = False  # the queue ran dry: the next job waits for Generate or "Run"
                self._changed(job, save=True)
            if state != "done" and job.latents is None and job.kind == "generate":
                self._note_latents(job.id)
            if state == "interrupted" and job.latents:
                with self._cond:
                    job.message += LATENTS_KEPT
                    self._changed(job, save=True)

    def _run(self, job: QueuedJob, token: CancelToken) -> tuple[str, str, dict[str, Any] | None]:
        """(state, message, result) of running `job` through the engine."""
        report = self._reporter(job.id)
        try:
            if job.kind == "decode":
                report(Progress("decode", 0, 1, 0.0, message=Path(job.latents or "").name))
                result = self.engine.decode_latents(Path(job.latents or ""), cancel=token)
            else:
                resolved = self._resolved.get(job.id) or self.engine.resolve(GenerateRequest.from_dict(job.request))
                result = self.engine.generate(resolved, on_progress=report, cancel=token)
        except Cancelled as err:
            return "cancelled", str(err), None
        except BaseException as err:  # shown in the page; the worker goes on with the next job
            if not isinstance(err, WanLiteError):
                log.exception("Job %s failed", job.id)
            return ("cancelled" if token.cancelled else "failed"), error_message(err), None
        late = "The Cancel came after the video was written; it is kept." if token.cancelled else ""
        return "done", late, result_dict(result)

    def _reporter(self, job_id: str) -> Callable[[Progress], None]:
        def report(p: Progress) -> None:
            with self._cond:
                job = self._find(job_id)
                if job is None:
                    return
                before = job.progress
                if p.preview is None and before is not None and before.preview is not None:
                    p.preview = before.preview  # keep the last picture until a newer one comes
                elif p.preview is not None:
                    job.preview_version += 1
                job.progress = p
                job.where = progress_words(p)
                stage_changed = before is None or before.stage != p.stage
                due = time.monotonic() - self._saved_at >= SAVE_EVERY_S
                self._changed(job, save=stage_changed or due)
                look = p.stage == "decode" and job.latents is None and job.kind == "generate"
            if look:  # the engine saves the latents before it reports the decode
                self._note_latents(job_id)

        return report

    def _note_latents(self, job_id: str) -> None:
        """Record where the engine saved the job's latents (found by its request), in the file too."""
        with self._cond:
            job = self._find(job_id)
            request, since = (dict(job.request), job.started or job.created) if job else ({}, 0.0)
        found = find_latents(self.engine.output_dir, request, since) if request else None
        if found is not None:
            with self._cond:
                job = self._find(job_id)
                if job is not None and job.latents is None:
                    job.latents = str(found)
                    self._changed(job, save=True)

    # ------------------------------------------------------------------ bookkeeping
    def _new_id(self) -> str:
        return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)

    def _find(self, job_id: str) -> QueuedJob | None:
        return next((j for j in self._jobs if j.id == job_id), None)

    def _add(self, entry: QueuedJob, start: bool) -> QueuedJob:
        queued = sum(j.state == "queued" for j in self._jobs)
        self._jobs.insert(queued, entry)
        if start:
            self._active = True
            self._ensure_worker()
        self._changed(entry, save=True)
        return replace(entry)

    def _trim(self) -> None:
        finished = [j for j in self._jobs if j.state in FINISHED]
        for old in finished[KEEP_FINISHED:]:
            self._jobs.remove(old)

    def _changed(self, job: QueuedJob | None, save: bool = False) -> None:
        """Called with the lock held after any change: new versions, waiting threads woken."""
        self._version += 1
        if job is not None:
            job.version += 1
        if save:
            self._save()
        self._cond.notify_all()

    def _save(self) -> None:
        if self.path is None:
            return
        self._saved_at = time.monotonic()
        data = {"format": FORMAT, "version": 1, "active": self._active,
                "jobs": [j.to_json() for j in self._jobs]}
        try:
            write_json_atomic(self.path, data)
            self._save_failed = False
        except OSError as err:  # the jobs still run; only the restart would forget them
            if not self._save_failed:
                log.warning("Could not save the queue to %s: %s", self.path, err)
            self._save_failed = True

    def _load(self) -> None:
        """The jobs of the file: queued ones wait (held), one still "running" was interrupted."""
        if self.path is None or not self.path.is_file():
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            entries = data.get("jobs") if isinstance(data, dict) else None
            if not isinstance(entries, list):
                raise ValueError("no list of jobs")
        except (OSError, ValueError, RecursionError) as err:
            broken = self.path.with_name(self.path.name + ".broken")
            log.warning("The queue file %s cannot be read (%s); it is kept as %s and the queue starts empty.",
                        self.path, err, broken.name)
            try:
                self.path.replace(broken)
            except OSError:
                pass
            return
        jobs = [j for j in map(QueuedJob.from_json, entries) if j is not None]
        now = time.time()
        for job in jobs:
            if job.state in ACTIVE:
                job.state, job.finished = "interrupted", now
                if job.latents is None and job.kind == "generate":
                    found = find_latents(self.engine.output_dir, job.request, job.started or job.created)
                    job.latents = str(found) if found else None
                if job.latents and not Path(job.latents).is_file():
                    job.latents = None
                where = f" ({job.where})" if job.where else ""
                kept = LATENTS_KEPT if job.latents and job.kind == "generate" else ""
                job.message = f"The app stopped while this job ran{where}.{kept}"
        queued = [j for j in jobs if j.state == "queued"]
        finished = sorted((j for j in jobs if j.state in FINISHED), key=lambda j: j.finished or 0, reverse=True)
        self._jobs = queued + finished
        self._trim()
        if len(jobs) != len(entries) or any(j.state == "interrupted" and j.finished == now for j in jobs):
            self._save()
