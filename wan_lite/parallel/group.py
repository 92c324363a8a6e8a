"""The process group of a multi-GPU job: who this rank is, its device, and the sub-groups.

World ranks are laid out `rank = cfg_rank * sp + sp_rank`: with CFG parallelism (cfg = 2) ranks
0..sp-1 run the conditional pass and sp..2sp-1 the unconditional one, each half splitting the
tokens of its pass (sequence parallelism, sp ranks); without it all ranks split one pass.

Two timeouts: the default group (start-up, text broadcast, the result at the end) waits through a
model load or a VAE decode on another rank (`WAN_LITE_DIST_LOAD_TIMEOUT`, 30 min); the groups of
the per-block exchanges wait at most `WAN_LITE_DIST_TIMEOUT` (5 min): ranks reach each exchange
within one block's compute of each other, so a longer wait means a rank died or hung, and the job
ends with a message instead of hanging.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

BACKEND_ENV = "WAN_LITE_DIST_BACKEND"  # "gloo": N CPU processes (tests, machines without GPUs)
TIMEOUT_ENV = "WAN_LITE_DIST_TIMEOUT"
LOAD_TIMEOUT_ENV = "WAN_LITE_DIST_LOAD_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_LOAD_TIMEOUT_S = 1800.0


def _seconds(env: str, default: float) -> float:
    try:
        return float(os.environ.get(env, default))
    except ValueError:
        return default


def step_timeout_s() -> float:
    return _seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)


def load_timeout_s() -> float:
    return _seconds(LOAD_TIMEOUT_ENV, DEFAULT_LOAD_TIMEOUT_S)


def backend(device: str | None = None) -> str:
    """NCCL on CUDA GPUs; gloo when asked (`WAN_LITE_DIST_BACKEND=gloo`), for `device` "cpu" or
    without CUDA: then each rank is a CPU process."""
    wanted = os.environ.get(BACKEND_ENV, "").strip().lower()
    if wanted in ("gloo", "nccl"):
        return wanted
    if (device is not None and str(device).startswith("cpu")) or not torch.cuda.is_available():
        return "gloo"
    return "nccl"


def launched_by_torchrun() -> bool:
    """This process is one rank of a job torchrun started (RANK and WORLD_SIZE set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def in_group() -> bool:
    """This process is already a rank of an initialised group (a worker, or torchrun's)."""
    return dist.is_available() and dist.is_initialized()


@dataclass
class ParallelGroup:
    """One rank's view of the job: world size and rank, the CFG x SP layout, its device and the
    process groups of the exchanges (sp_group: this rank's sequence-parallel ranks; all_group:
    every rank, for a pass that is not split by CFG)."""

    rank: int
    world: int
    cfg: int  # 2: the conditional and unconditional passes on different ranks; 1: not
    device: torch.device
    backend: str
    sp_group: Any = None
    all_group: Any = None
    # the host's available RAM when the ranks started, before any of them loaded a model: each
    # plans with its share of it (a rank probing later would see the others' weights as used)
    host_ram_available_gib: float | None = None

    @property
    def sp(self) -> int:
        return self.world // self.cfg

    @property
    def cfg_rank(self) -> int:
        return self.rank // self.sp

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp

    def describe(self) -> str:
        split = f"CFG 2 x sequence {self.sp}" if self.cfg == 2 else f"sequence {self.world}"
        return f"{self.world} ranks ({self.backend}, {split})"


def cfg_degree(world: int, cfg: bool) -> int:
    """CFG parallelism (2) where the job runs two passes per step and the ranks split evenly."""
    return 2 if cfg and world % 2 == 0 else 1


def init_group(rank: int, world: int, local_rank: int, *, device: str | None = None, cfg: bool = True,
               backend_name: str | None = None, init_method: str | None = None) -> ParallelGroup:
    """Join the job's process group (at `init_method`, else MASTER_ADDR / MASTER_PORT from the
    environment, as torchrun sets them) and create the exchange groups. On CUDA the rank's GPU is `cuda:local_rank` and becomes the current
    device; NVLink multicast (NVLS) stays off."""
    name = backend_name or backend(device)
    if name == "nccl":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a timed-out collective raises
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    kwargs: dict[str, Any] = {"timeout": datetime.timedelta(seconds=load_timeout_s())}
    if name == "nccl":
        kwargs["device_id"] = dev
    dist.init_process_group(name, init_method=init_method, rank=rank, world_size=world, **kwargs)
    pg = ParallelGroup(rank=rank, world=world, cfg=cfg_degree(world, cfg), device=dev, backend=name)
    step = datetime.timedelta(seconds=step_timeout_s())
    # every rank creates every group, in the same order (a requirement of new_group)
    for c in range(pg.cfg):
        ranks = list(range(c * pg.sp, (c + 1) * pg.sp))
        group = dist.new_group(ranks, timeout=step)
        if pg.cfg_rank == c:
            pg.sp_group = group
    pg.all_group = dist.new_group(list(range(world)), timeout=step) if pg.cfg == 2 else pg.sp_group
    from wan_lite.runtime.hardware import Hardware

    ram = torch.tensor([Hardware.probe(".").ram_available_gib], dtype=torch.float64, device=dev)
    dist.all_reduce(ram, op=dist.ReduceOp.MIN)  # every rank is here: nothing loaded yet
    pg.host_ram_available_gib = float(ram.item())
    global _current
    _current = pg
    log.info("Rank %d of %s on %s", rank, pg.describe(), dev)
    return pg


_current: ParallelGroup | None = None


def current_group() -> ParallelGroup | None:
    """This process's group while it is a rank (from `init_group` to `leave_group`)."""
    return _current if in_group() else None


def leave_group() -> None:
    global _current
    _current = None
    if in_group():
        dist.destroy_process_group()
