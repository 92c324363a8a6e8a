"""Sequence and CFG parallelism of one DiT: a block-loop hook and a self-attention exchange.

The hook (`SplitDiT.hook`, registered with `WanDiT.register_block_loop_hook`) runs after `embed`
on every rank with the whole batch. It keeps this rank's share and hands the blocks only that:

- CFG parallel: a batch of 2 (conditional, unconditional: the pipeline's `cfg_batch`) keeps the
  row of this rank's CFG half (`ParallelGroup.cfg_rank`); its sequence ranks split that row.
- sequence parallel: the L tokens are split in `ceil(L / n)` token pieces, one per rank; the last
  pieces are padded with zero tokens (their outputs are dropped at the gather, and they are never
  keys of the self-attention). Each token keeps its global RoPE angles and timestep run.

In each block the self-attention kernel (`WanAttentionBlock.self_attention`, set here) exchanges
q, k and v with one `all_to_all_single` (Ulysses): every rank then holds all tokens for a group of
heads, runs the model's own attention kernel on them (`block.attention`: SDPA, SageAttention,
FlashAttention-3), and a second all-to-all returns each rank its own tokens with all heads. Head
groups may be uneven (24 heads on 5 ranks: 5, 5, 5, 5, 4; fewer heads than ranks leaves some
ranks none), since all_to_all_single takes per-rank sizes: nothing is padded there.
Cross-attention (the 512 text keys), FFN, norms and modulation are per token: they run on the
local tokens unchanged. After the blocks one all_gather over all ranks rebuilds [B, L, D].
`WAN_LITE_SP_ATTENTION=ring` exchanges k and v around a ring instead (`ring.py`).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from wan_lite.errors import InputError
from wan_lite.models.dit_ops import Run, clip_runs
from wan_lite.parallel.group import ParallelGroup
from wan_lite.parallel.ring import ring_attention

SP_ATTENTION_ENV = "WAN_LITE_SP_ATTENTION"
SP_ATTENTIONS = ("ulysses", "ring")


def sp_attention() -> str:
    """The sequence-parallel self-attention: "ulysses" (the default) or "ring" (WAN_LITE_SP_ATTENTION)."""
    kind = os.environ.get(SP_ATTENTION_ENV, "").strip().lower() or "ulysses"
    if kind not in SP_ATTENTIONS:
        raise InputError(f"{SP_ATTENTION_ENV}={kind!r} is not a sequence-parallel attention.",
                         f"Use one of: {', '.join(SP_ATTENTIONS)}.")
    return kind


def head_split(heads: int, ranks: int) -> list[int]:
    """Heads per rank, as even as possible, the larger groups first: (24, 5) -> [5, 5, 5, 5, 4]."""
    return [heads // ranks + (1 if i < heads % ranks else 0) for i in range(ranks)]


def _all_gather(x: torch.Tensor, group: Any) -> torch.Tensor:
    """x [m, ...] from every rank of `group` -> [ranks * m, ...] in rank order."""
    n = dist.get_world_size(group)
    out = x.new_empty((n * x.shape[0], *x.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x.contiguous(), group=group)
    return out


@dataclass
class _Split:
    """How the running forward is split: its sequence group, ranks and this rank's index, the
    real token count and the tokens per rank."""

    group: Any
    ranks: int
    index: int
    tokens: int
    piece: int


def local_runs(runs: list[Run], start: int, end: int, piece: int, rows: slice) -> list[Run]:
    """The timestep runs of tokens [start, end) re-based to 0, for batch rows `rows`, the last one
    stretched over the zero padding up to `piece` tokens (a piece of padding only: the last run)."""
    local = [(s, e, idx[rows]) for s, e, idx in clip_runs(runs, start, end)]
    if not local:
        return [(0, piece, runs[-1][2][rows])]
    s, _e, idx = local[-1]
    local[-1] = (s, piece, idx)
    return local


class SplitDiT:
    """One DiT's sequence / CFG parallelism for the ranks of `pg`; `attach` and `detach` per job."""

    def __init__(self, dit: Any, pg: ParallelGroup, kind: str | None = None) -> None:
        self.dit = dit
        self.pg = pg
        self.kind = kind or sp_attention()
        self._split: _Split | None = None
        self._handle: Any = None

    def attach(self) -> SplitDiT:
        # innermost: features that wrap the block loop (the step cache) see the whole batch and
        # sequence, as on one GPU
        self._handle = self.dit.register_block_loop_hook(self.hook, innermost=True)
        for block in self.dit.blocks:
            block.self_attention = functools.partial(self.attention, block)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        for block in self.dit.blocks:
            block.self_attention = None

    # ------------------------------------------------------------------ the block loop
    def hook(self, state: Any, inner: Callable[[Any], torch.Tensor]) -> torch.Tensor:
        """state.x [B, L, D] -> this rank's [b, piece, D] through the blocks -> gathered [B, L, D]."""
        pg = self.pg
        B, L, _ = state.x.shape
        if pg.cfg == 2 and B == 2:  # the cond / uncond batch: one row per CFG half
            rows, halves = slice(pg.cfg_rank, pg.cfg_rank + 1), 2
            group, ranks, index = pg.sp_group, pg.sp, pg.sp_rank
        else:
            rows, halves = slice(0, B), 1
            group, ranks, index = pg.all_group, pg.world, pg.rank
        piece = math.ceil(L / ranks)
        start, end = min(index * piece, L), min((index + 1) * piece, L)
        pad = piece - (end - start)
        cos, sin = state.rope
        local = replace(
            state,
            x=F.pad(state.x[rows, start:end], (0, 0, 0, pad)),
            context=state.context[rows],
            runs=local_runs(state.runs, start, end, piece, rows),
            # zero angles for the padding: cos 1, sin 0 (any finite value would do)
            rope=(F.pad(cos[start:end], (0, 0, 0, pad), value=1.0), F.pad(sin[start:end], (0, 0, 0, pad))),
        )
        self._split = _Split(group, ranks, index, L, piece)
        try:
            out = inner(local)  # [b, piece, D]
        finally:
            self._split = None
        # the blocks counted this rank's rows; the job ran all B (the other CFG half ran the rest)
        self.dit.rows_through_blocks += B - out.shape[0]
        # one gather over all ranks: [halves * ranks * b, piece, D] in rank order (cfg_rank, sp_rank)
        full = _all_gather(out, pg.all_group)
        b = out.shape[0]
        full = full.view(halves, ranks, b, piece, -1).permute(0, 2, 1, 3, 4).reshape(halves * b, ranks * piece, -1)
        return full[:, :L]

    # ------------------------------------------------------------------ self-attention (Ulysses)
    def attention(self, block: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v [b, piece, H, Dh] of this rank's tokens -> attention over all tokens [b, piece, H, Dh]."""
        split = self._split
        if split is None or split.ranks == 1:
            return block.attention(q, k, v)
        if self.kind == "ring":
            return ring_attention(q, k, v, group=split.group, ranks=split.ranks, index=split.index,
                                  tokens=split.tokens)
        n, (b, c, H, Dh) = split.ranks, q.shape
        heads = head_split(H, n)
        mine = heads[split.index]
        # head-major, so each destination's heads are one contiguous run of rows: [H, 3, b, c, Dh]
        send = torch.stack([q, k, v]).permute(3, 0, 1, 2, 4).contiguous()
        recv = send.new_empty((n * mine, 3, b, c, Dh))
        dist.all_to_all_single(recv, send, output_split_sizes=[mine] * n, input_split_sizes=heads,
                               group=split.group)
        # [source rank, mine, 3, b, c, Dh] -> [3, b, n * c tokens in order, mine, Dh]
        qkv = recv.view(n, mine, 3, b, c, Dh).permute(2, 3, 0, 4, 1, 5).reshape(3, b, n * c, mine, Dh)
        L = split.tokens
        if mine:
            out = block.attention(qkv[0], qkv[1, :, :L], qkv[2, :, :L])  # padded tokens are never keys
        else:
            out = qkv[0]  # no heads here: an empty [b, n * c, 0, Dh]
        # back: [n destinations, mine, b, c, Dh] -> every rank its c tokens with all H heads
        back = out.reshape(b, n, c, mine, Dh).permute(1, 3, 0, 2, 4).reshape(n * mine, b, c, Dh)
        res = back.new_empty((H, b, c, Dh))
        dist.all_to_all_single(res, back, output_split_sizes=heads, input_split_sizes=[mine] * n,
                               group=split.group)
        return res.permute(1, 2, 0, 3)
