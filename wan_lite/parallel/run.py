"""One job's parallelism on a loaded pipeline, entered on every rank around its run.

`ParallelRun(pg, pipe, job)` as a context manager (the engine enters it through `job_hooks`):
- the prompt embeddings are encoded once, on rank 0, and broadcast (the others never run the
  text encoder);
- with CFG parallelism the pipeline runs cond + uncond as one batch of 2 (`cfg_batch`), whose rows
  the DiT hook sends to the two CFG halves; guidance 1 is one pass, split over all ranks;
- each DiT gets its `SplitDiT` (sequence split, Ulysses self-attention, gather);
- a step hook makes every rank agree on a cancel before each DiT call (one all_reduce of a flag):
  a rank that stopped alone would leave the others waiting in an exchange. Once the last call
  returned, rank 0 decodes and writes the video alone, and the user's cancel reaches it at once
  (`AgreedCancel`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from wan_lite.api import CancelToken
from wan_lite.errors import Cancelled
from wan_lite.parallel.group import ParallelGroup
from wan_lite.parallel.sequence import SplitDiT

log = logging.getLogger(__name__)


def job_texts(job: Any) -> list[str]:
    """The texts the pipeline's denoise encodes for `job` (the negative prompt only with CFG)."""
    cfg = any(g != 1 for g in job.guidance)
    return [job.prompt, job.negative_prompt] if cfg else [job.prompt]


class AgreedCancel(CancelToken):
    """The token a rank's pipeline is given. While the ranks denoise together it is set on every
    rank at the same DiT call (`ParallelRun`); once the last call has returned (`alone`), nothing
    waits on this rank any more: rank 0 decodes and writes the video by itself, and the user's
    cancel (`requested`) stops it at once, as it would a one-GPU job."""

    def __init__(self, requested: CancelToken) -> None:
        super().__init__()
        self.requested = requested
        self.alone = False

    @property
    def cancelled(self) -> bool:
        return super().cancelled or (self.alone and self.requested.cancelled)


class ParallelRun:
    """`requested`: set locally when the user cancels; `agreed`: set on every rank at the same
    DiT call once any rank saw `requested` (the token the pipeline is given)."""

    def __init__(self, pg: ParallelGroup, pipe: Any, job: Any, requested: CancelToken | None = None,
                 agreed: AgreedCancel | None = None) -> None:
        self.pg, self.pipe, self.job = pg, pipe, job
        self.requested = requested or CancelToken()
        self.agreed = agreed or AgreedCancel(self.requested)
        self._splits: list[SplitDiT] = []
        self._cfg_batch = False

    def __enter__(self) -> ParallelRun:
        self.share_text()
        pipe = self.pipe
        self._cfg_batch = pipe.cfg_batch
        if self.pg.cfg == 2:
            pipe.cfg_batch = True
        self._splits = [SplitDiT(dit, self.pg).attach() for dit in pipe.dits.values()]
        pipe.step_hooks.append(self._step)
        self.job.notes.append(f"Ran on {self.pg.describe()}.")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._step in self.pipe.step_hooks:
            self.pipe.step_hooks.remove(self._step)
        for split in self._splits:
            split.detach()
        self._splits = []
        self.pipe.cfg_batch = self._cfg_batch

    def share_text(self) -> None:
        """Rank 0 encodes the job's texts; the others take its embeddings. On the default group:
        its long timeout covers a rank that is still loading."""
        texts = job_texts(self.job)
        box: list[Any] = [None]
        if self.pg.rank == 0:
            box = [[emb.cpu() for emb in self.pipe.encode_text(texts)]]
        dist.broadcast_object_list(box, src=0)
        if self.pg.rank != 0:
            self.pipe.remember_text(dict(zip(texts, box[0], strict=True)))

    def _step(self, info: Any, call: Any) -> torch.Tensor:
        flag = torch.tensor([1.0 if self.requested.cancelled else 0.0], device=self.pg.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.pg.all_group)
        if flag.item() > 0:
            self.agreed.cancel()
            raise Cancelled()
        out = call()
        if info.index == info.total - 1:  # the last exchange is over: what is left is rank 0's alone
            self.agreed.alone = True
        return out
