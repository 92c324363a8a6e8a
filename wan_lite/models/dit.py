"""The Wan 2.2 diffusion transformer (official `WanModel`) for TI2V-5B, T2V-A14B and I2V-A14B.

Parameter names are exactly the official checkpoint keys, so released files load unrenamed.
Numerics follow the reference run under bf16 autocast without using autocast: the fp32 islands
of the reference (time embedding, modulation arithmetic, modulated norm outputs, gated residual
adds, norm statistics, head; RoPE in float64) are fp32 here by explicit casts, and every other
matmul runs in the parameters' dtype (read from `patch_embedding.weight`). An fp32 model is
therefore plain fp32 and a bf16 model matches the reference's autocast run. On CUDA the
elementwise steps (LayerNorm + modulation, RMSNorm + RoPE, residual adds: models/dit_ops.py) run
as one kernel each (models/fused.py) with the same roundings; only a norm statistic summed in
another order can flip a rare last bit.

Timesteps: the reference embeds t per token ([B, L, 6, D] in fp32, ~9 GB for A14B at 720p). Here
the embedding and the modulation are computed once per distinct timestep value ("table" rows) and
applied per contiguous token run sharing one value per batch row ("runs"): O(runs x D) memory.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from wan_lite.errors import CheckpointError, InputError
from wan_lite.models.attention import AttentionFn, sdpa_attention, takes_fp8_qk
from wan_lite.models.dit_ops import (
    Run,
    affine_multiplier,
    apply_rope,
    clip_runs,
    e4m3_multiplier,
    gated_add_,
    layer_norm,
    layer_norm_fp8,
    norm_modulate,
    rms_norm,
    rms_norm_rope_fp8_into,
    rms_norm_rope_into,
    rope_table,
    sinusoid,
    timestep_runs,
)
from wan_lite.models.fp8_rows import Fp8Rows, takes_fp8_rows

logger = logging.getLogger(__name__)

HEAD_DIM = 128  # every released Wan model uses 128-channel heads; num_heads = dim // 128


def name_matches(name: str, patterns: Iterable[str]) -> bool:
    """True when a glob pattern matches the dotted parameter / module name or any dotted run
    inside it (the one rule for the name patterns models declare, used by the runtime too).

    "modulation" matches "blocks.3.modulation", "blocks.*.ffn.2" matches "blocks.7.ffn.2",
    "head" matches "head.head" but not "heads".
    """
    return any(fnmatchcase(name, candidate) for pat in patterns
               for candidate in (pat, f"*.{pat}", f"{pat}.*", f"*.{pat}.*"))


@dataclass(frozen=True)
class WanDiTConfig:
    """DiT architecture; `from_shapes` reads it off a checkpoint (config.json is not needed)."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int
    out_dim: int
    text_dim: int = 4096
    freq_dim: int = 256
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]]) -> WanDiTConfig:
        """Infer the architecture from official tensor names and shapes (no data read)."""
        need = ("head.modulation", "head.head.weight", "patch_embedding.weight", "blocks.0.ffn.0.weight",
                "text_embedding.0.weight", "time_embedding.0.weight")
        missing = [k for k in need if k not in shapes]
        if missing:
            raise CheckpointError(
                f"Not a Wan DiT checkpoint in the official layout: no {', '.join(missing)}.",
                "Point to a Wan 2.2 model folder or DiT file (not a VAE or text encoder file).",
            )
        dim = shapes["head.modulation"][-1]
        if dim % HEAD_DIM:
            raise CheckpointError(
                f"DiT width {dim} (from head.modulation) is not a multiple of the head size {HEAD_DIM}.",
                "The file is not a Wan 2.2 DiT.",
            )
        patch = tuple(shapes["patch_embedding.weight"][2:])
        parts = (k.split(".") for k in shapes if k.startswith("blocks."))
        # max + 1, not a count: a missing block then shows up as missing tensors when filling
        layers = max(int(p[1]) for p in parts if p[1].isdigit()) + 1
        return cls(
            dim=dim,
            ffn_dim=shapes["blocks.0.ffn.0.weight"][0],
            num_heads=dim // HEAD_DIM,
            num_layers=layers,
            in_dim=shapes["patch_embedding.weight"][1],
            out_dim=shapes["head.head.weight"][0] // math.prod(patch),
            text_dim=shapes["text_embedding.0.weight"][1],
            freq_dim=shapes["time_embedding.0.weight"][1],
            patch_size=patch,  # type: ignore[arg-type]
        )


# ----------------------------------------------------------------------------------- modules
class WanRMSNorm(nn.Module):
    """RMSNorm over all heads together: fp32 statistics, cast back to x's dtype, then * weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class WanLayerNorm(nn.LayerNorm):
    """Affine LayerNorm (the cross-attention input `norm3`), fp32 math, result in x's dtype, or
    that result cast to `dtype` (the same numbers as `.to(dtype)` after it, in the same kernel).
    fp8: the result as `Fp8Rows` standing for `dtype`, written in e4m3 by the same kernel with one
    scale from a bound of its values (`dit_ops.affine_multiplier`), for an fp8 GEMM that takes it."""

    def forward(self, x: torch.Tensor, dtype: torch.dtype | None = None,
                fp8: bool = False) -> torch.Tensor | Fp8Rows:
        if not fp8:
            return layer_norm(x, self.weight, self.bias, self.eps, dtype or x.dtype)
        mult = affine_multiplier(self.weight, self.bias)
        rows = math.prod(x.shape[:-1])
        scale = mult.reciprocal().reshape(1, 1).expand(rows, 1).contiguous()
        return Fp8Rows(layer_norm_fp8(x, self.weight, self.bias, self.eps, mult), scale, dtype or x.dtype)


class WanSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)

    def qkv(self, u: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """u [B, c, D] modulated tokens (compute dtype), their RoPE angles [c, Dh/2]
        -> q, k (RMS-normed over all heads, then rotated) and v, each [B, c, D] in u's dtype."""
        q, k = torch.empty_like(u), torch.empty_like(u)
        self.qkv_into(u, cos, sin, q, k, None)
        return q, k, self.v(u)

    def qkv_into(self, u: torch.Tensor | Fp8Rows, cos: torch.Tensor, sin: torch.Tensor, q: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor | None,
                 fp8_mult: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """`qkv` written into q, k, v [B, c, D] (views of the caller's buffers; v None: skipped).
        u may be an `Fp8Rows` where the projections take one (`norm_modulate(..., fp8=True)`).
        A 16-bit RMSNorm and RoPE run as one kernel on CUDA; fp32 keeps the float64 rotation.
        fp8_mult: (for q, for k) from `fp8_qk_scales`: q and k are float8_e4m3fn buffers, written
        as the rotated values times these multipliers (16-bit u only)."""
        mults = fp8_mult or (None, None)
        for proj, norm, out, mult in ((self.q, self.norm_q, q, mults[0]), (self.k, self.norm_k, k, mults[1])):
            y = proj(u)
            if u.dtype == torch.float32:
                out.copy_(apply_rope(norm(y).unflatten(2, (self.num_heads, -1)), cos, sin, u.dtype).flatten(2))
            elif mult is not None:
                rms_norm_rope_fp8_into(out, y, norm.weight, norm.eps, cos, sin, mult)
            else:
                rms_norm_rope_into(out, y, norm.weight, norm.eps, cos, sin)
        if v is not None:
            v.copy_(self.v(u))

    def fp8_qk_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Static e4m3 scales for q and k, one per head, from the RMSNorm weights alone:
        (multipliers [2, D], descales [2, H]) float32, rows (q, k).

        Why a bound and not the max-abs of q: RMSNorm over all D channels leaves every token with
        sum(n^2) <= D, so |n_i| <= sqrt(D); the weight and RoPE's rotation of channel pairs then
        keep each value of head h within sqrt(D) * max|w_h| (with bf16's two roundings: the
        (1 + 2^-6) factor). So q * (448 / bound) is always a finite e4m3 number, and no pass over
        q is needed to find its scale: the RoPE kernel writes e4m3 directly. The bound lies some
        10-20x above a head's largest value on random data, which e4m3 absorbs: it keeps its
        relative precision at any scale, and only values below 2^-6 / multiplier (about 0.2 % of
        the RMS there) become subnormal."""
        w = torch.stack([self.norm_q.weight, self.norm_k.weight]).float()
        dim = w.shape[1]
        head_max = w.abs().unflatten(1, (self.num_heads, -1)).amax(dim=2)  # [2, H]
        mult = e4m3_multiplier(head_max * math.sqrt(dim))
        return mult.repeat_interleave(dim // self.num_heads, dim=1), mult.reciprocal()


class WanCrossAttention(WanSelfAttention):
    """Video tokens attend to the text: no RoPE and no mask, all 512 rows (zero padding included)
    are keys, as in the reference."""

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context [B, 512, D] embedded text -> k (RMS-normed), v: [B, 512, heads, Dh]."""
        heads = self.num_heads
        return self.norm_k(self.k(context)).unflatten(2, (heads, -1)), self.v(context).unflatten(2, (heads, -1))

    def forward(self, u: torch.Tensor | Fp8Rows, k: torch.Tensor, v: torch.Tensor,
                attention: AttentionFn = sdpa_attention) -> torch.Tensor:
        """u [B, c, D] video tokens (compute dtype; `Fp8Rows` where q takes it), k/v from
        `context_kv` -> [B, c, D], through the attention kernel `attention`."""
        q = self.norm_q(self.q(u)).unflatten(2, (self.num_heads, -1))
        return self.o(attention(q.to(v.dtype), k.to(v.dtype), v).flatten(2))


class WanAttentionBlock(nn.Module):
    """Self-attention (modulated, gated), cross-attention, FFN (modulated, gated).

    `chunk_tokens`: set by the runtime to do all per-token work (norms, modulation, projections,
    RoPE, cross-attention, FFN, residual adds) in token chunks of that size; only the
    self-attention itself sees all tokens at once. Same result (same math per token), while the
    temporaries shrink from [B, L, ...] to [B, chunk, ...] (the FFN hidden is [B, chunk, ffn_dim]).
    `attention`: the attention kernel, set for the whole model by `WanDiT.set_attention`.
    `self_attention`: where set (from outside), what the self-attention calls instead of
    `attention`: sequence parallelism's exchange of q, k, v around `attention` (wan_lite.parallel).
    """

    chunk_tokens: int | None = None
    attention: AttentionFn = staticmethod(sdpa_attention)
    self_attention: AttentionFn | None = None

    def __init__(self, cfg: WanDiTConfig) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.modulation = nn.Parameter(torch.zeros(1, 6, cfg.dim))
        self.self_attn = WanSelfAttention(cfg.dim, cfg.num_heads, cfg.eps)
        self.cross_attn = WanCrossAttention(cfg.dim, cfg.num_heads, cfg.eps)
        self.norm3 = WanLayerNorm(cfg.dim, eps=cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor, e0: torch.Tensor, runs: list[Run],
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [B, L, D] residual stream (fp32; bf16 patch embeddings in block 0 of a bf16 model);
        context [B, 512, D] embedded text, whose dtype is the compute dtype; e0 [U, 6, D] fp32
        projected time embeddings, one row per distinct timestep -> residual [B, L, D] fp32.

        An fp32 x is updated in place and returned: the DiT owns its residual stream.
        """
        dtype = context.dtype
        m = self.modulation.float() + e0  # [U, 6, D]: shift, scale, gate (attn); shift, scale, gate (ffn)
        L = x.shape[1]
        n = self.chunk_tokens or L
        spans = [(s, min(s + n, L), clip_runs(runs, s, min(s + n, L))) for s in range(0, L, n)]
        x = self._self_attention(x, m, spans, rope, dtype)
        ffn_fp8 = dtype == torch.bfloat16 and takes_fp8_rows(self.ffn[0], x.device)
        cross_fp8 = dtype == torch.bfloat16 and takes_fp8_rows(self.cross_attn.q, x.device)
        k, v = self.cross_attn.context_kv(context)
        for s, e, r in spans:
            xs = x[:, s:e]
            y = self.cross_attn(self.norm3(xs, dtype, fp8=cross_fp8), k, v, self.attention)
            u = norm_modulate(xs, m, r, 3, 4, self.eps, dtype, add=y, fp8=ffn_fp8)  # xs += y, the FFN's input
            gated_add_(xs, xs, self.ffn(u), m, r, 5)
        return x

    def _self_attention(self, x: torch.Tensor, m: torch.Tensor, spans: list[tuple[int, int, list[Run]]],
                        rope: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """x + o(attention) * gate, into x itself when fp32 (else a new fp32 tensor)."""
        out = self._attend(x, m, spans, rope, dtype)  # [B, L, heads, Dh]
        res = x if x.dtype == torch.float32 else torch.empty(x.shape, dtype=torch.float32, device=x.device)
        for s, e, r in spans:
            # contiguous: a strided [B, c, D] input sends the matmul down another (differently rounding) path
            y = self.self_attn.o(out[:, s:e].flatten(2).contiguous())
            gated_add_(res[:, s:e], x[:, s:e], y, m, r, 2)
        return res

    def _attend(self, x: torch.Tensor, m: torch.Tensor, spans: list[tuple[int, int, list[Run]]],
                rope: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Self-attention over all L tokens, q/k/v built chunk by chunk -> [B, L, heads, Dh] in dtype."""
        sa, (cos, sin) = self.self_attn, rope
        attention = self.self_attention or self.attention
        # an fp8 kernel that takes q and k in e4m3 gets them so from the RoPE kernel (half the bytes)
        fp8 = dtype != torch.float32 and takes_fp8_qk(attention)
        mults, descales = sa.fp8_qk_scales() if fp8 else (None, None)
        qk_dtype = torch.float8_e4m3fn if fp8 else dtype
        q, k = (torch.empty(x.shape, dtype=qk_dtype, device=x.device) for _ in range(2))
        # in one span (unchunked) v is its projection's own output, not a copy of it in a buffer
        v = torch.empty(x.shape, dtype=dtype, device=x.device) if len(spans) > 1 else None
        # fp8 GEMMs get their input in e4m3 from the modulation kernel
        rows = dtype == torch.bfloat16 and all(takes_fp8_rows(p, x.device) for p in (sa.q, sa.k, sa.v))
        for s, e, r in spans:
            # norm1's output is rounded to x's dtype before modulation, as in the reference (bf16 in
            # block 0); the fp32 modulated result is rounded to the compute dtype by the projections.
            u = norm_modulate(x[:, s:e], m, r, 0, 1, self.eps, dtype, fp8=rows)
            sa.qkv_into(u, cos[s:e], sin[s:e], q[:, s:e], k[:, s:e], None if v is None else v[:, s:e],
                        fp8_mult=None if mults is None else (mults[0], mults[1]))
            if v is None:
                v = sa.v(u)
        q, k, v = (z.unflatten(2, (sa.num_heads, -1)) for z in (q, k, v))
        if descales is None:
            return attention(q, k, v)
        dq, dk = (d.expand(x.shape[0], -1).contiguous() for d in descales)  # [B, H] each
        return attention.fp8_qk(q, k, v, dq, dk)  # type: ignore[attr-defined]


class Head(nn.Module):
    def __init__(self, cfg: WanDiTConfig) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))

    def forward(self, x: torch.Tensor, e: torch.Tensor, runs: list[Run]) -> torch.Tensor:
        """x [B, L, D], e [U, D] time embeddings (before the projection) -> [B, L, 4*out_dim] fp32."""
        m = self.modulation.float() + e[:, None]  # [U, 2, D]: shift, scale
        u = norm_modulate(x.float(), m, runs, 0, 1, self.eps, torch.float32)
        return F.linear(u, self.head.weight.float(), self.head.bias.float())


@dataclass
class DiTState:
    """What `WanDiT.embed` hands the block loop and the head: x [B, L, D] the residual stream,
    context [B, 512, D] embedded text, e [U, D] time embeddings and e0 [U, 6, D] their
    projections (one row per distinct timestep value), the token runs sharing a timestep, the
    RoPE table [L, Dh/2] (cos, sin), the token grid (f, h, w) and the latent shape (B, T, H, W)."""

    x: torch.Tensor | None  # None while the blocks run (they own the residual stream then)
    context: torch.Tensor
    e: torch.Tensor
    e0: torch.Tensor
    runs: list[Run]
    rope: tuple[torch.Tensor, torch.Tensor]
    grid: tuple[int, int, int]
    shape: tuple[int, int, int, int]


# hook(state, inner) -> x after the blocks; `inner(state)` runs the next hook or the blocks.
BlockLoopHook = Callable[..., torch.Tensor]


class WanDiT(nn.Module):
    """x [B, C_in, F, h, w], t [B] or [B, L], context [B, 512, text_dim], y=None
    -> velocity [B, C_out, F, h, w] float32.

    The forward is three steps, `embed` -> `run_blocks` -> `unembed`; the block loop is the seam
    where runtime features attach (`register_block_loop_hook`), and `set_attention` hands the
    blocks their attention kernel. Streaming and token chunking attach per block from outside."""

    # fnmatch patterns over parameter / module names (see `name_matches`).
    no_quantize_patterns: tuple[str, ...] = ("patch_embedding*", "text_embedding*", "time_embedding*",
                                             "time_projection*", "head*", "*modulation", "*norm*")
    # The modulation tables are added to fp32 time embeddings; kept fp32 as in the reference's
    # default (float32-loaded) run. They are tiny (6 x D per block).
    keep_fp32_patterns: tuple[str, ...] = ("*modulation",)

    def __init__(self, cfg: WanDiTConfig) -> None:
        super().__init__()
        self.config = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"),
                                            nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(WanAttentionBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.requires_grad_(False)  # inference only: the blocks update the residual stream in place
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._block_loop_hooks: OrderedDict[int, BlockLoopHook] = OrderedDict()
        self._inner_block_loop_hooks: OrderedDict[int, BlockLoopHook] = OrderedDict()  # innermost=True
        # Batch rows that went through the blocks (one DiT forward each): a forward whose blocks a
        # hook skipped does not count, so the pipeline can report computed and skipped forwards.
        self.rows_through_blocks = 0

    def _rope(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, *grid)
        if key not in self._rope_cache:
            if len(self._rope_cache) >= 8:  # sizes rarely change; keep the cache from growing unbounded
                self._rope_cache.clear()
            self._rope_cache[key] = rope_table(grid, self.config.head_dim, device)
        return self._rope_cache[key]

    # ------------------------------------------------------------------ forward: embed / blocks / head
    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        state = self.embed(x, t, context, y)
        state.x = self.run_blocks(state)
        return self.unembed(state)

    def embed(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
              y: torch.Tensor | None = None) -> DiTState:
        """Patches, time embedding (once per distinct timestep value), text embedding, RoPE table."""
        cfg = self.config
        if y is not None:  # I2V: [noise | mask | image latent] on channels
            x = torch.cat([x, y.expand(x.shape[0], *y.shape[1:])], dim=1)
        self._check_inputs(x, context)
        dtype = self.patch_embedding.weight.dtype
        B, _, T, H, W = x.shape
        pt, ph, pw = cfg.patch_size
        grid = (T // pt, H // ph, W // pw)
        L = math.prod(grid)

        tokens = self.patch_embedding(x.to(dtype)).flatten(2).transpose(1, 2).contiguous()  # [B, L, D], (f, h, w)

        values, runs = timestep_runs(t, B, L)
        te = self.time_embedding
        e = F.linear(sinusoid(values, cfg.freq_dim), te[0].weight.float(), te[0].bias.float())
        e = F.linear(F.silu(e), te[2].weight.float(), te[2].bias.float())  # [U, D]
        proj = self.time_projection[1]
        e0 = F.linear(F.silu(e), proj.weight.float(), proj.bias.float()).unflatten(1, (6, cfg.dim))

        if context.shape[1] < cfg.text_len:  # zero rows are what the reference pads with
            context = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
        context = self.text_embedding(context.to(self.text_embedding[0].weight.dtype)).to(dtype)
        return DiTState(x=tokens, context=context, e=e, e0=e0, runs=runs, rope=self._rope(grid, x.device),
                        grid=grid, shape=(B, T, H, W))

    def run_blocks(self, state: DiTState) -> torch.Tensor:
        """The block loop, through the registered block-loop hooks (the first registered is the
        outermost): each is called as `hook(state, inner)` and returns the residual stream after
        the blocks, by calling `inner(state)` (the next hook, then the blocks themselves) or not."""
        call: Callable[[DiTState], torch.Tensor] = self._blocks
        for hook in reversed([*self._block_loop_hooks.values(), *self._inner_block_loop_hooks.values()]):
            call = functools.partial(hook, inner=call)
        return call(state)

    def _blocks(self, state: DiTState) -> torch.Tensor:
        # The blocks own the residual stream from here: a bf16 model's patch embeddings are freed
        # once block 0 has made the fp32 stream (held by `state` they were 0.77 GB of an A14B 720p
        # forward's peak). A hook that needs the input keeps its own reference (the step cache).
        x, state.x = state.x, None
        for block in self.blocks:
            x = block(x, state.context, state.e0, state.runs, state.rope)
        self.rows_through_blocks += x.shape[0]
        return x

    def unembed(self, state: DiTState) -> torch.Tensor:
        """Head and unpatchify: [B, L, D] -> velocity [B, C_out, F, h, w] float32."""
        cfg = self.config
        B, T, H, W = state.shape
        pt, ph, pw = cfg.patch_size
        out = self.head(state.x, state.e, state.runs)  # [B, L, pt*ph*pw*C]
        out = out.view(B, *state.grid, pt, ph, pw, cfg.out_dim).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(B, cfg.out_dim, T, H, W)

    # ------------------------------------------------------------------ seams for the runtime
    def register_block_loop_hook(self, hook: BlockLoopHook, *, innermost: bool = False) -> RemovableHandle:
        """Wrap the block loop with `hook(state, inner) -> x` (a step cache skips `inner` and adds
        a cached residual; sequence parallelism shards `state` before `inner` and gathers after).
        `innermost`: inside every hook without it, even those registered later (sequence
        parallelism, so the others see the whole batch and sequence as on one GPU).
        Returns a handle whose `remove()` takes the hook off again."""
        hooks = self._inner_block_loop_hooks if innermost else self._block_loop_hooks
        handle = RemovableHandle(hooks)
        hooks[handle.id] = hook
        return handle

    def set_attention(self, fn: AttentionFn) -> None:
        """The attention kernel this model's blocks run (self- and cross-attention)."""
        for block in self.blocks:
            block.attention = fn

    def _check_inputs(self, x: torch.Tensor, context: torch.Tensor) -> None:
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_dim:
            raise InputError(
                f"The DiT takes {cfg.in_dim} input channels (latent + image condition), got {list(x.shape)}.",
                "Use a model of the right kind: t2v and ti2v take the latent only, i2v also an image.",
            )
        if any(s % p for s, p in zip(x.shape[2:], cfg.patch_size, strict=True)):
            raise InputError(
                f"Latent size {list(x.shape[2:])} is not divisible by the patch {list(cfg.patch_size)}.",
                "Choose a width and height that are multiples of 32 (16 for A14B models).",
            )
        if context.ndim != 3 or context.shape[-1] != cfg.text_dim or context.shape[1] > cfg.text_len:
            raise InputError(
                f"Text context of shape {list(context.shape)} does not fit this DiT "
                f"([B, <= {cfg.text_len}, {cfg.text_dim}] expected).",
                "The text encoder does not belong to this model.",
            )
