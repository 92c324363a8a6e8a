"""The work behind `python -m wan_lite generate` and `decode`: the plan line, the progress line, the
summary of what was written and how long each stage took."""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from wan_lite.api import STAGE_TITLES, GenerateRequest, Progress
from wan_lite.units import duration

# Phases of a run as the progress line shows them: the A14B experts' stages are one "Denoising"
# phase (its steps count on from one expert to the other, so it ends at 100 %).
_PHASES = {"high_noise": "denoise", "low_noise": "denoise"}
_EXPERT = {"high_noise": "high-noise expert", "low_noise": "low-noise expert"}
_UNITS = {"denoise": "steps", "decode": "frames"}
NON_TTY_EVERY_S = 60.0  # without a terminal, a long phase prints a line this often


class StageProgress:
    """The CLI's progress: one line per phase (loading, text encoding, denoising, decoding,
    saving), with its unit (steps, frames), speed, elapsed time and what is left.

    On a terminal the line is redrawn in place and log lines go above it (`log_handler`); without
    one (a pipe, a log file) nothing is redrawn: a line when a phase ends, and every
    NON_TTY_EVERY_S seconds during a long one. A phase ends at 100 % when the next begins or the
    run finishes (`finish`); a run that fails leaves its line where it stopped (`close`).
    """

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None, frames: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.frames = frames  # the video's frame count: the decode phase's total
        self.clock = clock
        self.phase: str | None = None
        self.title = ""
        self.step = self.total = 0
        self.started = self.last_line = 0.0
        self.eta: float | None = None
        self.per_step: float | None = None
        self._shown = 0  # characters of the line now on screen (TTY)
        self._drawn_at = -1.0
        self._bar = "#." if not _can_encode(self.stream, "█░") else "█░"
        self._lock = threading.RLock()  # events, log records and the ticker write from different threads
        self._stop = threading.Event()

    # ------------------------------------------------------------------ events
    def __call__(self, p: Progress) -> None:
        with self._lock:
            self._event(p)

    def _event(self, p: Progress) -> None:
        phase = _PHASES.get(p.stage, p.stage)
        now = self.clock()
        new_phase = phase != self.phase
        if new_phase:
            start = now
            if p.step and p.eta_s is not None and p.total > p.step:  # reported after its first step ran
                start = max(self.started, now - p.step * p.eta_s / (p.total - p.step))
            self._end_phase(start)
            self.phase, self.started, self.last_line = phase, start, now
            self.step, self.total, self.eta, self.per_step = 0, 0, None, None
        self.title = STAGE_TITLES.get("denoise" if phase == "denoise" else p.stage, p.stage)
        if p.stage in _EXPERT:
            self.title += f" ({_EXPERT[p.stage]})"
        if phase == "denoise":
            self.step, self.total, self.eta = p.step, p.total, p.eta_s
            if p.eta_s is not None and p.total > p.step:
                self.per_step = p.eta_s / (p.total - p.step)  # the loop's own average
            elif p.step:
                self.per_step = (now - self.started) / p.step if self.per_step is None else self.per_step
        elif phase == "decode" and p.total and p.step >= p.total:
            self.step = self.total = self.frames or 0
        if self.tty:
            if new_phase or now - self._drawn_at >= 0.1 or self.step == self.total:
                self._draw(now)
        else:
            self._periodic(now)

    def tick(self) -> None:
        """Between events: the elapsed time moves on (a model load or a decode can take minutes
        with no event), and without a terminal a line is printed now and then."""
        with self._lock:
            if self.phase is None:
                return
            now = self.clock()
            if self.tty:
                self._draw(now)
            else:
                self._periodic(now)

    def start_ticking(self, every_s: float = 0.5) -> None:
        """`tick` from a background thread until `close`."""
        def run() -> None:
            while not self._stop.wait(every_s):
                self.tick()

        threading.Thread(target=run, name="wan_lite-progress", daemon=True).start()

    def finish(self) -> None:
        """The run succeeded: the last phase ends at 100 %."""
        with self._lock:
            self._end_phase(self.clock())
            self.phase = None

    def close(self) -> None:
        """The run stopped (an error, Ctrl+C): the line stays as it was, and the cursor moves on."""
        self._stop.set()
        with self._lock:
            if self.phase is not None and self.tty and self._shown:
                self.stream.write("\n")
                self.stream.flush()
            elif self.phase is not None and not self.tty:
                self._println(self._text(self.clock()) + " - stopped")
            self.phase, self._shown = None, 0

    def _periodic(self, now: float) -> None:
        if now - self.last_line >= NON_TTY_EVERY_S:
            self._println(self._text(now))
            self.last_line = now

    # ------------------------------------------------------------------ log lines
    def log_handler(self, fmt: str = "%(levelname)s %(name)s: %(message)s") -> logging.Handler:
        """A logging handler that prints each record above the progress line."""
        handler = _AboveProgress(self)
        handler.setFormatter(logging.Formatter(fmt))
        return handler

    def write_above(self, text: str) -> None:
        with self._lock:
            if self.tty and self._shown:
                self._clear()
                self.stream.write(text + "\n")
                self._draw(self.clock())
            else:
                self._println(text)

    # ------------------------------------------------------------------ drawing
    def _end_phase(self, now: float) -> None:
        if self.phase is None:
            return
        if self.phase == "denoise" and self.total:
            self.step, self.eta = self.total, 0.0
        elif self.phase == "decode" and self.frames:
            self.step = self.total = self.frames
        text = self._text(now, done=True)
        if self.tty:
            self._clear()
            self.stream.write(text + "\n")
            self.stream.flush()
        else:
            self._println(text)

    def _text(self, now: float, done: bool = False) -> str:
        elapsed = now - self.started
        unit = _UNITS.get(self.phase or "", "")
        parts = [f"{STAGE_TITLES['denoise'] if done and self.phase == 'denoise' else self.title}:"]
        if self.total and unit:
            fraction = min(1.0, self.step / self.total)
            if self.tty:
                fill = round(fraction * 20)
                parts.append(self._bar[0] * fill + self._bar[1] * (20 - fill))
            parts.append(f"{fraction:4.0%} {self.step}/{self.total} {unit}")
        elif not done:
            parts.append("...")
        if done:
            parts.append(f"done in {_seconds(elapsed)}")
        else:
            parts.append(_seconds(elapsed))
        if self.phase == "denoise" and self.per_step:
            parts.append(f"({_rate(self.per_step)})")
        if not done and self.eta is not None and self.eta >= 1:
            parts.append(f"~{duration(self.eta)} left")
        return " ".join(parts)

    def _draw(self, now: float) -> None:
        width = max(20, shutil.get_terminal_size((100, 20)).columns - 1)
        text = self._text(now)[:width]  # never wrap: a wrapped line cannot be redrawn in place
        self.stream.write("\r" + text + " " * max(0, self._shown - len(text)))
        self.stream.flush()
        self._shown, self._drawn_at = len(text), now

    def _clear(self) -> None:
        if self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self._shown = 0

    def _println(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


class _AboveProgress(logging.Handler):
    def __init__(self, progress: StageProgress) -> None:
        super().__init__()
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.progress.write_above(self.format(record))
        except Exception:  # a log line must never stop a run
            self.handleError(record)


def _can_encode(stream: TextIO, text: str) -> bool:
    try:
        text.encode(getattr(stream, "encoding", None) or "ascii")
    except (LookupError, UnicodeEncodeError):
        return False
    return True


def _seconds(s: float) -> str:
    """Elapsed time on a progress line: tenths below 10 s, then `duration`'s words."""
    return f"{s:.1f} s" if s < 10 else duration(s)


def _rate(per_step: float) -> str:
    return f"{per_step:.1f} s/step" if per_step >= 1 else f"{1 / max(per_step, 1e-9):.1f} steps/s"


@contextlib.contextmanager
def progress_shown(progress: StageProgress) -> Iterator[StageProgress]:
    """Log records (and Python warnings) go above the progress line while the block runs; the
    line ends with it: at 100 % when the block succeeds, where it stopped when it raises."""
    root = logging.getLogger()
    before = list(root.handlers)
    fmt = next((h.formatter._fmt for h in before if h.formatter is not None and h.formatter._fmt), None)
    handler = progress.log_handler(fmt or "%(levelname)s %(name)s: %(message)s")
    handler.setLevel(min((h.level for h in before), default=logging.NOTSET))
    root.handlers = [h for h in before if not _is_console(h)] + [handler]
    logging.captureWarnings(True)  # Python warnings too go above the line, not into it
    progress.start_ticking()
    try:
        yield progress
        progress.finish()
    finally:
        progress.close()
        root.handlers = before
        logging.captureWarnings(False)


def _is_console(handler: logging.Handler) -> bool:
    return (isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            and getattr(handler, "stream", None) in (sys.stderr, sys.stdout))


_TIMING_ORDER = ("load", "text", "image_encode", "denoise", "high_noise", "low_noise", "decode")


def _summary(result, notes: bool = True) -> None:
    print(f"video:   {result.video_path.resolve()}")
    print(f"latents: {result.latents_path.resolve()}")
    print(f"seed:    {result.seed}   size: {result.width}x{result.height}, {result.frames} frames @ {result.fps} fps")
    print("timings:")
    order = {stage: i for i, stage in enumerate(_TIMING_ORDER)}
    for stage, seconds in sorted(result.timings.items(), key=lambda kv: order.get(kv[0], len(order))):
        print(f"  {STAGE_TITLES.get(stage, 'Encoding the image' if stage == 'image_encode' else stage):<20} "
              f"{seconds:8.1f} s")
    print(f"  {'total':<20} {sum(result.timings.values()):8.1f} s")
    for note in result.notes if notes else []:
        print(f"note: {note}")


def _engine(args: argparse.Namespace, output_dir: Path, name: str | None = None,
            components: dict[str, Path] | None = None):
    from wan_lite.engine import Engine
    from wan_lite.paths import models_dir

    model_dir = getattr(args, "model_dir", None)
    folders = {name: model_dir} if (model_dir and name) else {}
    return Engine(models_root=getattr(args, "models_dir", None) or models_dir(), output_dir=output_dir,
                  device=args.device, folders=folders, components={name: components} if components else None)


def check_folder_options(args: argparse.Namespace) -> None:
    """--model-dir is one model's folder, --models-dir (as in the app) the folder that holds them:
    given the other kind of folder, say which option was meant."""
    from wan_lite.errors import InputError
    from wan_lite.loading.layout import model_folders_in, model_in

    model_dir, models = getattr(args, "model_dir", None), getattr(args, "models_dir", None)
    if model_dir is not None and model_dir.is_dir() and model_in(model_dir) is None:
        inside = model_folders_in(model_dir)
        if inside:
            from wan_lite.library import default_folder_name

            names = ", ".join(f"{p.name} ({spec.label})" for p, spec in inside)
            folder, spec = next(((p, s) for p, s in inside if s.name == getattr(args, "model", None)), inside[0])
            also = (f" (--models-dir {model_dir} --model {spec.name} also finds it, as the app's --models-dir does.)"
                    if folder.name == default_folder_name(spec.name) else "")
            raise InputError(f"--model-dir takes one model's folder, and {model_dir} holds model folders: {names}.",
                             f"Did you mean --model-dir {folder}?{also}")
    if models is not None and models.is_dir():
        spec = model_in(models)
        if spec is not None:
            raise InputError(f"--models-dir takes the folder that holds the model folders, and {models} is "
                             f"one model's folder ({spec.label}).", f"Did you mean --model-dir {models}?")


def _which_model(args: argparse.Namespace, components: dict[str, Path]) -> str:
    from wan_lite.loading.components import resolve_sources
    from wan_lite.loading.layout import detect_spec

    if args.model:
        return args.model
    if args.model_dir is not None and not components:
        return detect_spec(args.model_dir).name
    if args.model_dir is None and not components:
        return _installed_model(args)
    return resolve_sources(args.model_dir, components)[0].name


def _installed_model(args: argparse.Namespace) -> str:
    """Without --model or --model-dir: the model installed in the models folder (TI2V-5B, the
    app's default, where it is there); several others: the user says which."""
    from wan_lite.errors import InputError
    from wan_lite.library import default_folder_name
    from wan_lite.loading.layout import model_in
    from wan_lite.paths import models_dir
    from wan_lite.registry import DEFAULT_MODEL, MODELS

    root = getattr(args, "models_dir", None) or models_dir()
    installed = [name for name in MODELS if model_in(root / default_folder_name(name)) is not None]
    if DEFAULT_MODEL in installed or len(installed) == 1:
        return DEFAULT_MODEL if DEFAULT_MODEL in installed else installed[0]
    if installed:
        raise InputError(f"Say which model to run: {root} has {', '.join(installed)}.",
                         f"Add --model {installed[0]} (or another of them).")
    raise InputError(f"Say which model to run: {root} holds no model folder.",
                     "Give --model-dir FOLDER (one model's folder), or download a model in the app's Models tab "
                     "(models/README.md says what goes where).")


def components_from_args(args: argparse.Namespace) -> dict[str, Path]:
    """The component files given on the command line (`cli._add_component_args`), slot -> path."""
    pairs = {"dit": args.dit, "dit_high": args.high_noise, "dit_low": args.low_noise, "vae": args.vae,
             "text_encoder": args.text_encoder, "tokenizer": args.tokenizer}
    return {slot: path for slot, path in pairs.items() if path is not None}


def run_generate(args: argparse.Namespace) -> int:
    from wan_lite.loading.discovery import RememberedChoices
    from wan_lite.paths import output_dir

    check_folder_options(args)
    components = components_from_args(args)
    choices = RememberedChoices()
    name = _which_model(args, components)
    if not components and args.model_dir is None:
        components = choices.resolve(name)  # the files remembered for this model
    if args.remember and components:
        from wan_lite.loading.formats import detect, pick

        for slot, path in components.items():
            found = pick(detect(path), "dit" if slot.startswith("dit") else slot)
            if found is not None:
                choices.choose(name, slot, found)
        choices.save()

    width, height = args.size if args.size else (None, None)
    request = GenerateRequest(prompt=args.prompt or "", model=name, negative_prompt=args.negative_prompt,
                              image=str(args.image) if args.image else None, width=width, height=height,
                              frames=args.frames, steps=args.steps, guidance=args.guidance,
                              guidance_low=args.guidance_low, shift=args.shift, seed=args.seed,
                              sampler=args.sampler, memory_profile=args.profile, cache=args.cache,
                              loras=tuple(args.lora), turbo=args.turbo,
                              turbo_phases=args.turbo_phases, gpus=args.gpus)
    folder = args.out.parent if args.out else (args.output_dir or output_dir())
    engine = _engine(args, folder, name, components)
    if getattr(args, "prompts_file", None) is not None:
        from wan_lite.cli_batch import run_batch

        return run_batch(args, engine, request, lambda job: progress_shown(StageProgress(frames=job.frames)),
                         _summary, lambda job: _print_plan(engine, job))
    job = engine.resolve(request)
    for note in job.notes:
        print(f"note: {note}", file=sys.stderr)
    _print_plan(engine, job)
    with progress_shown(StageProgress(frames=job.frames)) as progress:
        result = engine.generate(job, on_progress=progress, out_path=args.out, overwrite=args.overwrite)
    _summary(result, notes=False)
    return 0


def _print_plan(engine, job) -> None:
    """The plan before anything loads, on a GPU and on the CPU alike: what runs where, the peaks
    and the time it will take (a CPU run takes hours: the user should know before it starts)."""
    estimate = engine.preflight(job)
    print(f"plan: {estimate.summary}", file=sys.stderr)
    for note in estimate.plan.get("notes", []):
        print(f"note: {note}", file=sys.stderr)


def run_decode(args: argparse.Namespace) -> int:
    from wan_lite.errors import InputError

    if not args.latents.is_file():  # said before any progress line starts
        raise InputError(f"Latents file not found: {args.latents}",
                         "Give a NAME.latents.safetensors file that wan_lite saved next to a video.")
    engine = _engine(args, (args.out or args.latents).parent)
    print(f"Decoding {args.latents.name}: only the VAE is loaded.", file=sys.stderr)
    with progress_shown(StageProgress()) as progress:
        progress(Progress("decode", 0, 1, 0.0))  # the decode sends no events: its time is shown moving
        result = engine.decode_latents(args.latents, out_path=args.out, model_dir=args.model_dir,
                                       overwrite=args.overwrite)
    _summary(result)
    return 0
