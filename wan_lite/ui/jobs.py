"""Runs one engine job in a worker thread and turns its progress callbacks into a stream of events
the UI can show, with per-session cancellation.

Gradio's queue guarantees one job at a time; this module only has to connect the engine's
callbacks (called on the worker thread) to the UI's generator (on Gradio's thread) and let a
Cancel click from the same browser session reach the running job's `CancelToken`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from wan_lite.api import CancelToken, GenerateRequest, GenerateResult, Progress
from wan_lite.engine import Engine, Job
from wan_lite.errors import Cancelled, WanLiteError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finished:
    result: GenerateResult


@dataclass(frozen=True)
class Failed:
    message: str  # plain words for the page
    cancelled: bool = False


Event = Progress | Finished | Failed


def error_message(err: BaseException) -> str:
    """What the page shows for an exception: the WanLiteError text, or a short note for bugs."""
    if isinstance(err, WanLiteError):
        return str(err)
    if isinstance(err, NotImplementedError):
        return "This part of wan_lite is not finished yet (the engine does not implement it)."
    return f"Something went wrong inside wan_lite ({type(err).__name__}: {err}). Details are in the terminal log."


class JobRunner:
    """One per app. `run()` is a generator of events; `cancel(session)` stops that session's job."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._tokens: dict[str, CancelToken] = {}  # running (or about to run) job per session
        self._pending_cancel: set[str] = set()  # Cancel clicked while the job still waited in the queue

    def cancel(self, session: str) -> bool:
        """True when a running job was told to stop; otherwise the next job of the session is skipped."""
        with self._lock:
            token = self._tokens.get(session)
            if token is not None:
                token.cancel()
                return True
            self._pending_cancel.add(session)
            return False

    def cancelling(self, session: str) -> bool:
        """True while the session's job has been told to stop but has not stopped yet."""
        with self._lock:
            token = self._tokens.get(session)
            return token is not None and token.cancelled

    def clear_pending(self, session: str) -> None:
        """Forget a Cancel that came when nothing ran (called when a new Generate is clicked)."""
        with self._lock:
            self._pending_cancel.discard(session)

    def run(self, session: str, request: GenerateRequest | Job, min_interval_s: float = 0.2) -> Iterator[Event]:
        """Yield Progress events (at most one per `min_interval_s`, the newest wins, previews kept),
        then exactly one Finished or Failed."""
        token = CancelToken()
        with self._lock:
            if session in self._pending_cancel:
                self._pending_cancel.discard(session)
                yield Failed("Cancelled before it started.", cancelled=True)
                return
            self._tokens[session] = token
        events: queue.Queue[Event] = queue.Queue()

        def work() -> None:
            try:
                result = self.engine.generate(request, on_progress=events.put, cancel=token)
                events.put(Finished(result))
            except Cancelled as err:
                events.put(Failed(str(err), cancelled=True))
            except BaseException as err:  # shown in the page; the app stays usable
                if not isinstance(err, WanLiteError):
                    log.exception("Generation failed")
                events.put(Failed(error_message(err), cancelled=token.cancelled))

        worker = threading.Thread(target=work, name="wan-lite-job", daemon=True)
        worker.start()
        last_sent = 0.0
        latest: Progress | None = None
        try:
            while True:
                try:
                    event = events.get(timeout=min_interval_s)
                except queue.Empty:
                    event = None
                if isinstance(event, Progress):
                    if latest is not None and event.preview is None and latest.preview is not None:
                        event.preview = latest.preview  # keep the last picture until a newer one comes
                    latest = event
                elif event is not None:
                    if latest is not None:
                        yield latest
                    yield event
                    return
                if latest is not None and time.monotonic() - last_sent >= min_interval_s:
                    yield latest
                    last_sent = time.monotonic()
                    latest = None
        finally:
            # The browser went away (generator closed) or we finished: never leave a job running.
            if worker.is_alive():
                token.cancel()
            with self._lock:
                if self._tokens.get(session) is token:
                    del self._tokens[session]
