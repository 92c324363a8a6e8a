"""Start a multi-GPU job: N worker processes (one per GPU), or this process as one of torchrun's.

`generate_parallel` is what `Engine.generate` calls for a request with `gpus` > 1. It spawns
`gpus` processes (torch.multiprocessing, "spawn"); each joins the process group (NCCL on GPUs,
gloo for CPU processes: `WAN_LITE_DIST_BACKEND=gloo` or `--device cpu`), builds its own Engine
for its GPU from the factory the engine hands over and runs `run_rank`: rank 0 runs the whole
`Engine.generate` (encode, denoise, decode on its GPU, write the files) with the job's
`ParallelRun` attached; the others load the same plan and run the denoise with it, then stop
before the decode. Rank 0's progress events and its result come back to this process on a queue.

Failures: a rank that raises reports its error on the queue and exits; the parent then ends
every other rank (terminate, then kill) and raises that error here: a `WanLiteError` as it was
raised (the CLI prints its message), anything else as `ParallelError` naming the rank. A rank
that hangs is caught by the collectives' timeouts (`group.py`) on the others. A cancel reaches
the workers as an event; they agree on the step to stop at (`ParallelRun`), or, once the denoise
is over, rank 0 stops its decode or its mp4 write (`AgreedCancel`).

Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) nothing is spawned: this process is one rank,
and every rank's `Engine.generate` returns rank 0's result.
"""

from __future__ import annotations

import importlib
import logging
import os
import queue as queue_mod
import socket
import threading
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from wan_lite.api import CancelToken, GenerateRequest, ProgressCallback
from wan_lite.errors import Cancelled, InputError, WanLiteError
from wan_lite.parallel.group import (
    ParallelGroup,
    backend,
    init_group,
    launched_by_torchrun,
    leave_group,
    step_timeout_s,
)
from wan_lite.parallel.run import AgreedCancel, ParallelRun

log = logging.getLogger(__name__)

# How long a terminated rank gets to exit before it is killed.
GRACE_S = 5.0


class ParallelError(WanLiteError):
    """A rank of a multi-GPU job failed with an error that is not a user error (a bug, a driver
    or NCCL error, a timed-out exchange); the other ranks were stopped."""


def check_gpus(gpus: int, device: str | None) -> None:
    """Refuse a GPU count this machine cannot run, before anything starts."""
    if gpus < 1:
        raise InputError(f"--gpus {gpus} is not a GPU count.", "Give --gpus 1 or more.")
    if backend(device) == "nccl":
        have = torch.cuda.device_count()
        if gpus > have:
            raise InputError(f"--gpus {gpus} asks for {gpus} GPUs; this machine has {have}.",
                             f"Give --gpus {have} or fewer.")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate_parallel(engine: Any, factory: Callable[..., Any], job: Any, *,
                      on_progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
                      out_path: Path | None = None, overwrite: bool = False) -> Any:
    """Run `job` over `job.request.gpus` GPUs (or torchrun's ranks); returns rank 0's GenerateResult.
    `factory(device=...)` builds a rank's Engine; `engine` is this process's (torchrun's rank)."""
    request = replace(job.request, seed=job.seed)  # the seed drawn once: every rank draws the same noise
    cfg = any(g != 1 for g in job.guidance)
    if launched_by_torchrun():
        local = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
        pg = init_group(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local, device=engine.device, cfg=cfg)
        try:
            return run_rank(engine, pg, request, on_progress=on_progress if pg.rank == 0 else None,
                            requested=cancel, out_path=out_path, overwrite=overwrite)
        finally:
            leave_group()
    check_gpus(request.gpus, engine.device)
    # the ranks load their own models: what this process holds would stay on GPU 0 and in the RAM
    # the ranks share out between them (the app's engine after a one-GPU job)
    engine.unload()
    return spawn_job(factory, request, request.gpus, cfg=cfg, device=engine.device, on_progress=on_progress,
                     cancel=cancel, out_path=out_path, overwrite=overwrite)


def run_rank(engine: Any, pg: ParallelGroup, request: GenerateRequest, *, on_progress: ProgressCallback | None = None,
             requested: CancelToken | None = None, out_path: Path | None = None, overwrite: bool = False) -> Any:
    """This rank's part of the job; every rank returns rank 0's GenerateResult."""
    requested = requested or CancelToken()
    agreed = AgreedCancel(requested)

    def attach(pipe: Any, job: Any) -> ParallelRun:
        return ParallelRun(pg, pipe, job, requested, agreed)

    engine.job_hooks.append(attach)
    try:
        if pg.rank == 0:
            result = engine.generate(request, on_progress=on_progress, cancel=agreed, out_path=out_path,
                                     overwrite=overwrite)
        else:
            result = None
            _follow(engine, request, attach, agreed)
    finally:
        engine.job_hooks.remove(attach)
    box = [result]
    dist.broadcast_object_list(box, src=0)  # the default group: waits through rank 0's decode
    return box[0]


def _follow(engine: Any, request: GenerateRequest, attach: Callable[[Any, Any], ParallelRun],
            agreed: AgreedCancel) -> None:
    """A rank other than 0: the same plan and pipeline, the denoise only (it stops where the
    decode would start: the pipeline honours a cancel there)."""
    job = engine.resolve(request)
    pipe = engine.pipeline(job.spec.name, None, job)
    done: list[bool] = []

    def stop_before_decode(latents: torch.Tensor, settings: dict[str, Any]) -> None:
        done.append(True)
        agreed.cancel()

    with attach(pipe, job):
        try:
            pipe.generate(job, cancel=agreed, on_latents=stop_before_decode)
        except Cancelled:
            if not done:
                raise


# ---------------------------------------------------------------------------------------- spawning
def spawn_job(factory: Callable[..., Any], request: GenerateRequest, gpus: int, *, cfg: bool,
              device: str | None = None, on_progress: ProgressCallback | None = None,
              cancel: CancelToken | None = None, out_path: Path | None = None, overwrite: bool = False,
              poll_s: float = 0.05) -> Any:
    """Spawn `gpus` ranks, relay rank 0's progress, wait; rank 0's result, or the first error."""
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    stop = ctx.Event()
    init = f"tcp://127.0.0.1:{_free_port()}"
    level = logging.getLogger().getEffectiveLevel()  # -v reaches the ranks
    procs = mp.start_processes(_worker, args=(gpus, init, cfg, device, factory, request, out_path, overwrite,
                                              events, stop, level),
                               nprocs=gpus, join=False, start_method="spawn")
    found: dict[str, Any] = {}
    try:
        while True:
            _drain(events, on_progress, found)  # a progress callback may cancel: tell the ranks at once
            if cancel is not None and cancel.cancelled:
                stop.set()
            try:
                if procs.join(timeout=poll_s, grace_period=GRACE_S):
                    break
            except ProcessException as err:  # one rank failed: join ended the others
                found.setdefault("exit", err)
                break
    except BaseException:
        _end(procs)
        raise
    _drain(events, on_progress, found, wait_s=0.0 if ("result" in found or "error" in found) else 1.0)
    if "error" in found:
        raise _rebuild(found["error"], gpus)
    if "result" in found:
        return found["result"]
    raise ParallelError(f"The {gpus}-GPU job ended without a result: {found.get('exit')}.",
                        "Run again with -v to see each rank's log.")


def _end(procs: Any) -> None:
    for p in procs.processes:
        if p.is_alive():
            p.terminate()
    for p in procs.processes:
        p.join(GRACE_S)
        if p.is_alive():
            p.kill()


def _drain(events: Any, on_progress: ProgressCallback | None, found: dict[str, Any], wait_s: float = 0.0) -> None:
    while True:
        try:
            kind, payload = events.get(timeout=wait_s) if wait_s else events.get_nowait()
        except (queue_mod.Empty, EOFError, OSError):
            return
        if kind == "progress":
            if on_progress is not None:
                on_progress(payload)
        elif kind == "error":
            # the first error is the cause; a rank-0 cancel wins (its message names the kept latents)
            if "error" not in found or (payload["name"] == "Cancelled" and payload["rank"] == 0):
                found["error"] = payload
        else:
            found[kind] = payload


def _describe(err: BaseException, rank: int) -> dict[str, Any]:
    cls = type(err)
    return {"rank": rank, "module": cls.__module__, "name": cls.__qualname__,
            "message": getattr(err, "message", None) or str(err) or cls.__name__,
            "hint": getattr(err, "hint", None), "traceback": traceback.format_exc()}


def _rebuild(info: dict[str, Any], gpus: int) -> BaseException:
    """The error a rank reported, raised again here: a WanLiteError of its own class where it can
    be rebuilt (message and hint), else a ParallelError naming the rank and the cause."""
    try:
        cls = getattr(importlib.import_module(info["module"]), info["name"])
    except (ImportError, AttributeError):
        cls = None
    if cls is Cancelled:
        return Cancelled(info["message"])
    if isinstance(cls, type) and issubclass(cls, WanLiteError):
        try:
            return cls(info["message"], info["hint"])
        except TypeError:
            pass
    log.error("Rank %d failed:\n%s", info["rank"], info["traceback"])
    text = f"Rank {info['rank']} of the {gpus}-GPU job failed: {info['name']}: {info['message']}"
    if "timed out" in info["message"].lower() or "timeout" in info["message"].lower():
        hint = (f"A rank stopped answering (the exchanges wait {step_timeout_s():.0f} s: WAN_LITE_DIST_TIMEOUT). "
                "The other ranks were stopped; run again with -v to see each rank's log.")
    else:
        hint = "The other ranks were stopped; run again with -v to see each rank's log."
    return ParallelError(text, hint)


def _watch(stop: Any, requested: CancelToken) -> None:
    stop.wait()
    requested.cancel()


def _worker(index: int, world: int, init: str, cfg: bool, device: str | None, factory: Callable[..., Any],
            request: GenerateRequest, out_path: Path | None, overwrite: bool, events: Any, stop: Any,
            level: int = logging.WARNING) -> None:
    """One spawned rank (index = rank = local rank)."""
    logging.basicConfig(level=level, format=f"[rank {index}] %(levelname)s %(name)s: %(message)s")
    if backend(device) == "gloo":  # CPU processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    requested = CancelToken()
    threading.Thread(target=_watch, args=(stop, requested), daemon=True).start()
    try:
        pg = init_group(index, world, index, device=device, cfg=cfg, init_method=init)
        engine = factory(device=str(pg.device))
        progress = (lambda p: events.put(("progress", p))) if index == 0 else None
        result = run_rank(engine, pg, request, on_progress=progress, requested=requested, out_path=out_path,
                          overwrite=overwrite)
        if index == 0:
            events.put(("result", result))
    except Cancelled as err:
        if index != 0:  # every rank stopped at the same step; rank 0 tells (its message names the latents)
            return
        events.put(("error", _describe(err, index)))
        raise SystemExit(1) from None
    except BaseException as err:
        events.put(("error", _describe(err, index)))
        raise SystemExit(1) from None
    leave_group()
