"""Throughput mode: a queue of jobs that each fit one GPU, one job per GPU at a time.

`run_queue(factory, requests, gpus)` starts one process per GPU (no process group: the jobs share
nothing), each with its own Engine from `factory(device=...)`; they take the next job from a
shared queue until it is empty. A job that fails is reported as its error and the queue goes on;
a process that dies takes only its running job with it. `plan.plan_gpus(..., jobs=N)` says when
this beats splitting each job over all GPUs.
"""

from __future__ import annotations

import logging
import queue as queue_mod
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.multiprocessing as mp

from wan_lite.api import GenerateRequest
from wan_lite.parallel.group import backend
from wan_lite.parallel.launch import ParallelError, _describe, _end, _rebuild, check_gpus

log = logging.getLogger(__name__)


def _queue_worker(index: int, factory: Callable[..., Any], device: str | None, jobs: Any, events: Any,
                  level: int) -> None:
    logging.basicConfig(level=level, format=f"[gpu {index}] %(levelname)s %(name)s: %(message)s")
    if backend(device) == "nccl":
        torch.cuda.set_device(index)
        dev = f"cuda:{index}"
    else:
        dev = "cpu"
    engine = factory(device=dev)
    while True:
        try:
            n, request = jobs.get_nowait()
        except queue_mod.Empty:
            return
        events.put(("start", n, index))
        try:
            events.put(("result", n, engine.generate(request)))
        except Exception as err:  # this job failed; the queue goes on
            events.put(("error", n, _describe(err, index)))


def run_queue(factory: Callable[..., Any], requests: Sequence[GenerateRequest], gpus: int, *,
              device: str | None = None, on_result: Callable[[int, Any], None] | None = None) -> list[Any]:
    """Each request on one GPU, `gpus` at a time; per request (in order) its GenerateResult or
    the error it raised (not raised here: the others still ran). `on_result(i, result_or_error)`
    as each ends."""
    check_gpus(gpus, device)
    ctx = mp.get_context("spawn")
    jobs, events = ctx.Queue(), ctx.Queue()
    for n, request in enumerate(requests):
        jobs.put((n, request))
    workers = min(gpus, len(requests))
    level = logging.getLogger().getEffectiveLevel()
    procs = mp.start_processes(_queue_worker, args=(factory, device, jobs, events, level), nprocs=workers,
                               join=False, start_method="spawn")
    results: dict[int, Any] = {}
    running: dict[int, int] = {}  # worker -> job
    try:
        while len(results) < len(requests):
            try:
                kind, n, payload = events.get(timeout=0.2)
            except queue_mod.Empty:
                dead = [w for w, p in enumerate(procs.processes) if not p.is_alive() and p.exitcode not in (0, None)]
                for w in dead:  # a crashed process: its running job is lost, the others go on
                    if w in running and running[w] not in results:
                        results[running.pop(w)] = ParallelError(f"The process of GPU {w} died (exit code "
                                                                f"{procs.processes[w].exitcode}) during this job.")
                if all(not p.is_alive() for p in procs.processes) and events.empty():
                    break
                continue
            if kind == "start":
                running[payload] = n
                continue
            results[n] = payload if kind == "result" else _rebuild(payload, 1)
            if on_result is not None:
                on_result(n, results[n])
    except BaseException:  # Ctrl+C, or on_result raised: no process is left running
        _end(procs)
        raise
    for p in procs.processes:
        p.join(5)
    missing = [n for n in range(len(requests)) if n not in results]
    for n in missing:
        results[n] = ParallelError("This job never ran: every GPU's process ended first.")
    return [results[n] for n in range(len(requests))]
