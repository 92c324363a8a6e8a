"""Ring attention: the alternative to Ulysses for a sequence-parallel self-attention.

Each rank keeps its q and passes its k and v around the ring (`batch_isend_irecv` to the next
rank, from the previous one), attending to one piece of keys per hop while the next piece is on
its way; the partial results merge by their log-sum-exp (the online softmax). It moves 2 of
Ulysses' 4 tensors per rank but in n - 1 hops, needs no head split (any rank count), and runs
its own kernel: PyTorch's flash attention with the log-sum-exp (`attention_lse`), not the
kernel chosen for the model (SageAttention, FlashAttention-3). `WAN_LITE_SP_ATTENTION=ring`
picks it; which is faster is for bench/bench_multigpu.py to say on GPUs (not measured yet).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

_MATH_CHUNK = 1024  # query rows per chunk of the plain-math fallback (its scores are [b, h, chunk, Lk])


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [b, Lq, h, Dh], k and v [b, Lk, h, Dh] -> (out [b, Lq, h, Dh] float32, lse [b, h, Lq] float32):
    softmax attention (scale 1/sqrt(Dh)) and the log-sum-exp of each query's scores."""
    qt, kt, vt = (z.transpose(1, 2) for z in (q, k, v))  # [b, h, L, Dh]
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt)[:2]
        return out.transpose(1, 2).float(), lse.float()
    if q.dtype in (torch.float16, torch.bfloat16):
        try:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt)[:2]
            return out.transpose(1, 2).float(), lse[..., : q.shape[1]].float()
        except RuntimeError:  # no flash kernel for this GPU: the plain math below
            pass
    scale = q.shape[-1] ** -0.5
    outs, lses = [], []
    for s in range(0, qt.shape[2], _MATH_CHUNK):
        scores = (qt[:, :, s:s + _MATH_CHUNK].float() @ kt.float().transpose(-1, -2)) * scale
        lses.append(torch.logsumexp(scores, dim=-1))
        outs.append(torch.softmax(scores, dim=-1) @ vt.float())
    return torch.cat(outs, dim=2).transpose(1, 2), torch.cat(lses, dim=2)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: Any, ranks: int, index: int,
                   tokens: int) -> torch.Tensor:
    """q, k, v [b, piece, H, Dh] of this rank's tokens (rank `index` of `ranks` in `group`, pieces
    of `piece` tokens in rank order, `tokens` real ones: the rest is padding, never a key)
    -> attention over all tokens [b, piece, H, Dh] in q's dtype."""
    piece = q.shape[1]
    kv = torch.stack([k, v]).contiguous()  # [2, b, piece, H, Dh]: one message per hop
    nxt = dist.get_global_rank(group, (index + 1) % ranks)
    prv = dist.get_global_rank(group, (index - 1) % ranks)
    out = lse = None
    for hop in range(ranks):
        src = (index - hop) % ranks  # whose keys this rank holds now
        reqs = []
        if hop < ranks - 1:
            nxt_kv = torch.empty_like(kv)
            reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, kv, nxt, group),
                                           dist.P2POp(dist.irecv, nxt_kv, prv, group)])
        valid = min(piece, max(0, tokens - src * piece))
        if valid:
            part, part_lse = attention_lse(q, kv[0][:, :valid], kv[1][:, :valid])
            if out is None:
                out, lse = part, part_lse
            else:  # the online softmax: weights exp(lse_i - lse_new) per query and head
                new = torch.logaddexp(lse, part_lse)
                out = (out * (lse - new).exp().transpose(1, 2)[..., None]
                       + part * (part_lse - new).exp().transpose(1, 2)[..., None])
                lse = new
        for req in reqs:
            req.wait()
        if hop < ranks - 1:
            kv = nxt_kv
    # every piece passed by in the n hops, rank 0's with real tokens among them: out is set
    return out.to(q.dtype)  # type: ignore[union-attr]
