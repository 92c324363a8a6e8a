"""`python -m wan_lite generate --prompts-file FILE`: many videos from one command.

The file holds one job a line: a prompt (a .txt file; blank lines and lines starting with # are
skipped), or a JSON object of GenerateRequest fields (a .jsonl file, e.g.
`{"prompt": "a fox", "seed": 7, "size": "704x1280"}`) over the command line's options. Every
line is read and checked before the first job runs, so a typo on line 40 is told at once and
not after hours of work. The model loads once; a job that fails is reported and the next one
runs; Ctrl+C stops the batch, keeping what was made.

With `--gpus N` the multi-GPU planner (`parallel.plan.plan_gpus`, `Engine.gpu_plan`, planned
for the first job) says whether each job is split over the N GPUs, or the jobs run one per GPU
at a time (throughput mode, `Engine.generate_each`), and why.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from wan_lite.api import GenerateRequest
from wan_lite.errors import InputError, WanLiteError
from wan_lite.sizing import read_size

# What a .jsonl line may set besides the request's fields.
EXTRA_KEYS = ("size",)


def read_batch(path: Path, base: GenerateRequest) -> list[tuple[int, GenerateRequest]]:
    """(line number, request) for every job of the file; each a copy of `base` with its line's
    prompt (.txt) or fields (.jsonl). Raises InputError naming the file and line of a bad one."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"Prompts file not found: {path}", "Give a .txt file (a prompt a line) or a "
                         ".jsonl file (a JSON object a line).") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"Cannot read the prompts file {path}: {err}.",
                         "Save it as UTF-8 text, a prompt a line.") from None
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    names = set(GenerateRequest.field_names())
    jobs = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not jsonl:
            jobs.append((number, replace(base, prompt=line)))
            continue
        where = f"{path.name}, line {number}"
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{where} is not a JSON object: {err.msg} (column {err.colno}).",
                             'Write each line as {"prompt": "...", "seed": 7}.') from None
        if not isinstance(fields, dict) or not isinstance(fields.get("prompt"), str):
            raise InputError(f"{where} has no prompt.", 'Each line needs "prompt": "what the video shows".')
        unknown = sorted(set(fields) - names - set(EXTRA_KEYS))
        if unknown:
            raise InputError(f"{where} sets {', '.join(unknown)}, which is no request field.",
                             "Known fields: " + ", ".join(sorted(names | set(EXTRA_KEYS))) + ".")
        if "size" in fields:
            fields.update(_size(fields.pop("size"), where))
        try:
            jobs.append((number, replace(base, **fields)))
        except TypeError as err:
            raise InputError(f"{where}: {err}.", "Check the line's fields.") from None
    if not jobs:
        raise InputError(f"{path} holds no prompt.", "Write one prompt a line (lines starting with # are skipped).")
    return jobs


def _size(value: Any, where: str) -> dict[str, int]:
    size = read_size(value)
    if size is None:
        raise InputError(f"{where}: size {value!r} is not WIDTHxHEIGHT.", 'Write it as "size": "1280x704".')
    return {"width": size[0], "height": size[1]}


def run_batch(args: argparse.Namespace, engine: Any, base: GenerateRequest, progress_factory: Any,
              summary: Any, print_plan: Any) -> int:
    """Run every job of `args.prompts_file` on `engine`; 0 when all were made, 1 when one failed
    (each failure is told as it happens and again at the end). The CLI's own pieces are handed in
    (cli_run calls this): `progress_factory(job)` a context giving the progress callback,
    `summary(result, notes=False)`, `print_plan(job)`."""
    if args.out is not None:
        raise InputError("--out names one video; a prompts file makes one video a line.",
                         "Leave out --out: each video is named after its prompt in --output-dir.")
    lines = read_batch(args.prompts_file, base)
    jobs = []
    for number, request in lines:  # checked before anything runs: a bad line is told now
        try:
            jobs.append((number, engine.resolve(request)))
        except WanLiteError as err:
            raise InputError(f"{args.prompts_file.name}, line {number}: {err.message}", err.hint) from None
        except (TypeError, ValueError) as err:
            raise InputError(f"{args.prompts_file.name}, line {number}: {err}.", "Check the line's fields.") from None
    total, gpus = len(jobs), base.gpus
    print(f"{total} jobs from {args.prompts_file}", file=sys.stderr)
    made: list[Path] = []
    failed: list[str] = []

    def told(i: int, number: int, outcome: Any) -> None:
        if isinstance(outcome, BaseException):
            message = outcome.message if isinstance(outcome, WanLiteError) else str(outcome)
            failed.append(f"line {number}: {message}")
            print(f"[{i + 1}/{total}] line {number} failed: {message}", file=sys.stderr)
        else:
            made.append(outcome.video_path)
            print(f"[{i + 1}/{total}] line {number}: {outcome.video_path.resolve()} (seed {outcome.seed})")

    def one_by_one() -> None:
        for i, (number, job) in enumerate(jobs):
            print(f"[{i + 1}/{total}] line {number}: {job.prompt[:70]}", file=sys.stderr)
            try:
                with progress_factory(job) as progress:
                    result = engine.generate(job, on_progress=progress, overwrite=args.overwrite)
            except WanLiteError as err:
                told(i, number, err)
                continue
            summary(result, notes=False)
            made.append(result.video_path)

    try:
        split = engine.gpu_plan(jobs[0][1], gpus, jobs=total) if gpus > 1 else None
        if split is not None:
            print(f"GPUs: {split.reason}", file=sys.stderr)
        else:
            print_plan(jobs[0][1])
        if split is not None and split.mode == "throughput":
            requests = [replace(job.request, seed=job.seed) for _, job in jobs]
            engine.generate_each(requests, gpus, on_result=lambda i, r: told(i, jobs[i][0], r))
        else:
            one_by_one()
    except KeyboardInterrupt:
        print(f"Stopped: {len(made)} of {total} videos made.", file=sys.stderr)
        raise
    print(f"{len(made)} of {total} videos made." + (" Failed:" if failed else ""), file=sys.stderr)
    for line in failed:
        print(f"  {line}", file=sys.stderr)
    return 1 if failed else 0
