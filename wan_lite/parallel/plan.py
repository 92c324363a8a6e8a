"""What N GPUs of one host do with a job, and why: one job split over them, or (a queue of jobs
that each fit one GPU) one job per GPU. Pure, like `runtime.planner.plan`.

Every rank is its own process with its own copy of what its plan keeps in host memory (an idle
expert, streamed blocks, the text encoder), so each plans with its share of the RAM
(`share_of_host`); the GPU is its own. Each rank runs the active expert in the format the
one-GPU planner picks for that share (resident, quantized or streamed); its activations are
those of its 1/sp of the tokens, which the per-rank plan does not count yet (it plans the whole
sequence: on the safe side). Sharding the weights themselves (FSDP2) is not implemented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch.distributed as dist

from wan_lite.parallel.group import cfg_degree, current_group, in_group
from wan_lite.runtime.hardware import Hardware
from wan_lite.runtime.planner import Plan, PlanRequest, plan
from wan_lite.units import duration

# A job split over N GPUs runs a step in (1 / N) / efficiency of one GPU's time: the exchanges
# (two all-to-alls per block, a gather per forward) and the uneven head groups. The issue's
# targets (1.9x on 2, 3.6x on 4, 6.8x on 8) are ~0.9; measured on GPUs: not yet (bench_multigpu.py).
SPLIT_EFFICIENCY = 0.9


@dataclass(frozen=True)
class GpuPlan:
    mode: str  # "one": one GPU; "split": one job over all; "throughput": one job per GPU
    gpus: int
    cfg: int  # 2: cond and uncond passes on different GPUs
    sp: int  # GPUs that split one pass's tokens
    per_gpu: Plan  # what each rank runs (its memory plan)
    reason: str  # one sentence for people

    @property
    def seconds(self) -> float:
        """One job's time: split over the GPUs, or as one GPU runs it (one job per GPU)."""
        return split_seconds(self.per_gpu, self.gpus) if self.mode == "split" else self.per_gpu.seconds_estimate

    def summary(self) -> str:
        return f"{self.mode}: {self.reason}"

    def to_json(self) -> dict[str, Any]:
        """The decision without the per-GPU plan (that one has its own `to_json`)."""
        return {"mode": self.mode, "gpus": self.gpus, "cfg": self.cfg, "sp": self.sp,
                "seconds_estimate": round(self.seconds, 1), "reason": self.reason}


def split_seconds(p: Plan, gpus: int) -> float:
    """A job's time over `gpus` GPUs: the denoise shared (at SPLIT_EFFICIENCY); the text encoding,
    the image encoding and the decode on rank 0, as on one GPU."""
    if gpus <= 1:
        return p.seconds_estimate
    denoise = dict(p.stage_seconds).get("denoise", p.seconds_estimate)
    return p.seconds_estimate - denoise + denoise / (gpus * SPLIT_EFFICIENCY)


def share_of_host(hw: Hardware, ranks: int) -> Hardware:
    """The machine as one of `ranks` processes sees it: its own GPU, 1/ranks of the RAM."""
    if ranks <= 1:
        return hw
    return replace(hw, ram_total_gib=hw.ram_total_gib / ranks, ram_available_gib=hw.ram_available_gib / ranks,
                   cpu_cores=max(1, hw.cpu_cores // ranks))


def rank_hardware(hw: Hardware) -> Hardware:
    """`hw` as this process sees it: its share of the host when it is one rank of a job (of the
    RAM that was available when the ranks started, before any of them loaded a model)."""
    if not in_group():
        return hw
    pg = current_group()
    if pg is not None and pg.host_ram_available_gib is not None:
        hw = replace(hw, ram_available_gib=min(hw.ram_total_gib, pg.host_ram_available_gib))
    return share_of_host(hw, dist.get_world_size())


def rank_plan(p: Plan, rank: int | None = None) -> Plan:
    """`p` for this rank (`rank`: this process's in a job, None outside one). A rank other than 0
    never runs the text encoder (rank 0 broadcasts the embeddings), so it leaves it in its file
    instead of holding it in RAM for the job (umT5-XXL: 11 GB per rank); everything else is the
    plan every rank runs, so that they all compute in the same formats."""
    if rank is None:
        pg = current_group()
        rank = pg.rank if pg is not None else 0
    if rank == 0 or not p.keep_text_encoder:
        return p
    return replace(p, keep_text_encoder=False, notes=(*p.notes, "The text encoder stays in its file: rank 0 "
                                                      "encodes the prompt for every rank."))


def plan_gpus(model: Any, request: Any, hw: Hardware, gpus: int, *, jobs: int = 1,
              profile: Any = None) -> GpuPlan:
    """How `gpus` GPUs of a host like `hw` (its GPU is one of them) run `jobs` jobs like `request`."""
    r = PlanRequest.of(request)
    if gpus <= 1:
        p = plan(model, r, hw, profile)
        return GpuPlan("one", 1, 1, 1, p, "One GPU.")
    p = plan(model, r, share_of_host(hw, gpus), profile)
    if not p.fits:
        return GpuPlan("split", gpus, cfg_degree(gpus, r.cfg), gpus // cfg_degree(gpus, r.cfg), p,
                       f"Does not fit: each of the {gpus} GPUs runs the active expert as one GPU would, "
                       f"with 1/{gpus} of the RAM: {p.reason}")
    if jobs > 1:
        per_job = p.seconds_estimate
        rounds = math.ceil(jobs / gpus)
        split = jobs * split_seconds(p, gpus)
        if rounds * per_job <= split:
            return GpuPlan("throughput", gpus, 1, 1, p,
                           f"{jobs} jobs that each fit one GPU ({p.peak_vram_gib:.1f} of "
                           f"{p.usable_vram_gib:.1f} GiB): one job per GPU finishes the queue in "
                           f"{rounds} job time(s), about {duration(rounds * per_job)}, against "
                           f"{duration(split)} splitting each job (no exchanges).")
    cfg = cfg_degree(gpus, r.cfg)
    sp = gpus // cfg
    how = []
    if cfg == 2:
        how.append("the conditional and unconditional passes on different GPUs")
    if sp > 1:
        how.append(f"each pass's tokens over {sp} GPUs (Ulysses all-to-all over the heads)")
    return GpuPlan("split", gpus, cfg, sp, p,
                   f"One job over {gpus} GPUs: {' and '.join(how)}; each GPU holds the active expert "
                   f"({p.quantization}, {p.resident_blocks} blocks resident), about "
                   f"{duration(split_seconds(p, gpus))} a video.")
