"""Sizes of a model for the planner (`ModelFootprint`) and every constant of the memory and time
models (`K`), measured on an H200 with full-size random-weight models. See plan_model.py for how
they are used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from wan_lite.registry import VAES, get_spec, vae_for
from wan_lite.runtime.hardware import GIB

QUANTS = ("bf16", "int8", "fp8", "int4")


class K:
    """Every constant of the memory and time models, measured on an H200 (torch 2.11, 2026-11-21).

    DiT activations in bytes per token as multiples of D (or F), fitted to forward peaks of a block
    that chunks all per-token work (A14B 480p/720p and 5B, chunks 1k-16k, B = 1, 2: -1 %..+8 %).
    Checked end to end with dit.py + BlockStreamer + int8/fp8 QuantizedLinear at full size: the
    denoise estimate (weights + activations) was within -4 %..+2.5 % of max_memory_allocated
    (5B 720p bf16 r=10 4.86 GiB, int8 r=6 2.42, fp8 r=0 1.51; A14B 720p fp8 r=0 5.57, int8 5.56)."""

    residual_d = 4.0  # the fp32 residual stream x [B, L, D]
    input_d = 2.0  # block 0's bf16 input (the patch embedding) alive beside it
    qkv_d, attn_out_d = 6.0, 2.0  # q, k, v and the attention output, bf16, whole sequence
    # fp8 attention: q, k, v quantized beside them, as cuDNN's fp8 kernel takes them (A14B 720p
    # measured +1.08 GiB, run q). An upper bound: FlashAttention-3 fp8 takes q and k written in
    # e4m3 instead of bf16, 1 D less than bf16 attention (A14B 720p streamed peak 6.69 -> 5.23 GiB,
    # runs ze, zf), but which kernel runs is known only after its self-check at the first start
    qkv_fp8_d = 3.0
    attn_chunk_d = 13.1  # per chunk token: modulated input, projections, norms
    rope_chunk_d, rope_chunk = 14.7, 4096  # float64 RoPE temporaries of dit.py's 4096-token chunk
    ffn_chunk_d, ffn_chunk_f = 6.0, 4.0  # per chunk token: input, gated add (x D); hidden + GELU (x F)
    rope_per_token = 1024.0  # cos, sin float64 [L, 64]
    # VAE: bytes per output pixel of one latent frame (4 video frames), and seconds per megapixel-
    # frame on the H200 (ref_tflops), both measured with wan_lite's VAEs (random weights)
    # untiled (whole 4-frame chunks, the whole fp32 video on the GPU besides); tiled: tiled_vae's
    # 1-frame chunks, each latent frame's pixels sent out at once (vae_memory.DECODE_PX_PER_BYTE_CHUNKED)
    vae_decode_px = {("2.2", "bf16"): 7100, ("2.2", "fp32"): 14100, ("2.1", "bf16"): 8400, ("2.1", "fp32"): 16800}
    vae_tiled_decode_px = {("2.2", "bf16"): 5550, ("2.2", "fp32"): 10980, ("2.1", "bf16"): 6540,
                           ("2.1", "fp32"): 12980}
    vae_encode_px = {("2.2", "bf16"): 3200, ("2.2", "fp32"): 6500, ("2.1", "bf16"): 6700, ("2.1", "fp32"): 13400}
    vae_decode_s = {("2.2", "bf16"): 0.038, ("2.2", "fp32"): 0.071, ("2.1", "bf16"): 0.037, ("2.1", "fp32"): 0.072}
    vae_encode_s = {("2.2", "bf16"): 0.013, ("2.2", "fp32"): 0.029, ("2.1", "bf16"): 0.026, ("2.1", "fp32"): 0.047}
    ref_tflops = 450.0  # our DiT's measured rate on that H200 (410-480)
    # share of the decoder's weights (conv1, middle, first upsampling level) a tiled decode keeps in
    # CPU memory during the tiles (2.2: 609 of 1110 MB; 2.1: 84 of 147 MB)
    vae_decoder_idle_share = {"2.2": 0.548, "2.1": 0.574}
    # a tiled decode's global pass over the whole frame (vae_memory.LOW_RES_PX_PER_BYTE x dtype bytes)
    vae_low_res_px = {("2.2", "bf16"): 360, ("2.2", "fp32"): 720, ("2.1", "bf16"): 470, ("2.1", "fp32"): 940}
    # its output, the tiles' input, in RAM per video pixel-frame and dtype byte (2.2: 1024 channels
    # x 2 frames at 1/8 scale per 4 video frames; 2.1: 192 channels at 1/4 scale)
    vae_low_res_ram_px = {"2.2": 8.0, "2.1": 6.0}
    # the lean global pass's (the middle's output: 2.2: 1024 channels at 1/16 scale, 2.1: 384 at 1/8)
    vae_low_res_lean_ram_px = {"2.2": 1.0, "2.1": 1.5}
    vae_tiles = (1024, 768, 512, 384, 256, 192, 128)
    vae_tile_overlap = 64  # pixels a tiler overlaps
    vae_tile_cost = 0.02  # a tiled decode's time per tile, over the untiled decode's (vae_memory.TILE_COST)
    t5_act = 0.35 * GIB  # two prompts of 512 tokens, 64 heads: scores and hidden states
    latent_copies = 8.0  # fp32 latents alive while denoising: x, noise, sampler history, output
    video_ram_px = 15.0  # decoded video in RAM per pixel-frame: 3 channels x (fp32 + uint8)
    frames_ram_px = 3.0  # only its uint8 frames (a decode on the GPU: vae_frames)
    ram_base = 2.5 * GIB  # Python, torch, CUDA libraries, tokenizer, UI
    vram_margin, ram_margin = (0.25 * GIB, 0.04), (1.0 * GIB, 0.03)  # fixed + share of the total
    pin_fraction = 0.5  # pin at most this share of available RAM (pinned pages stall the OS)
    # fp8 tensor cores on the Linear layers, and fp8 attention over bf16: the rates that make this
    # model's forward give the measured ratios to a bf16 forward (H200, runs 2026-12-04-zf, -zh; fp8
    # GEMMs 0.918x (A14B 720p) and 0.898x (5B); with FlashAttention-3 fp8 0.731x and 0.759x; fitted
    # gains 1.42 / 1.28 and 1.35 / 1.35). The GEMMs' gain includes the elementwise work around them
    fp8_gain = 1.35
    fp8_attention_gain = 1.35
    dequant_cost = 1.03  # int8/fp8 weights dequantized per layer before a bf16 GEMM
    # one batch of 2 over two passes (bench/profile_chunks.py, H200, bench/results/2026-12-03-v: 5B
    # 720p unchunked 1.045, in 2048-token chunks 1.00; the whole 5B job, run w: 1.027): it pays only
    # where it halves the streamed transfers. Below `batch2_short_tokens` it is faster than two
    # passes (run 2026-12-04-zi, SDPA, unchunked: 5B 12090 tokens 0.97 in bf16 and fp8, 6820 tokens
    # 1.00 bf16 / 0.79 fp8; A14B 32760 tokens 1.025): each kernel has too little work to fill the GPU.
    # That length is the H200's (ref_tflops); plan_model scales it with the GPU's speed
    batch2_cost = 1.02
    batch2_cost_short, batch2_short_tokens = 0.97, 16384
    # an unmerged LoRA on every block Linear, per rank: rank 64 cost 1.077x (5B 720p) and 1.059x
    # (A14B 832x480) the plain forward on an H100 (bench_lora.py, run 2026-12-06-b)
    lora_rank_cost = 0.0011
    # token chunks, per block and forward: chunking at all costs per token of the batch, each chunk
    # past the first a fixed time (profile_chunks: 5B 720p +1.0 ms per block for 2 chunks at batch 1,
    # +3.2 at batch 2, +0.2 ms per further chunk; A14B 720p +1.6..5 ms)
    chunked_token_s = 3.7e-8
    chunk_block_s = 1.5e-4
    bf16_slack = 1.25  # bf16 is chosen over int8/fp8 unless it is this much slower
    # int4 (error 3-10x int8's) is chosen over a bf16 / 8-bit plan that streams the DiT from disk
    # only when that plan is this much slower; its dequantization is counted as int8's
    # (dequant_cost: one pass, 0.53 bytes read a weight instead of 1; not measured on a GPU yet)
    int4_slack = 1.5


# ------------------------------------------------------------------------------ model sizes
T5_PARAMS, T5_EMBED, T5_BLOCKS = 5_680_910_336, 256_384 * 4096, 24
VAE_PARAMS = {version: vae.params for version, vae in VAES.items()}  # (encoder, decoder)


@dataclass(frozen=True)
class ModelFootprint:
    """The sizes that decide memory and time (per expert for A14B)."""

    name: str
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int
    out_dim: int
    text_dim: int = 4096
    freq_dim: int = 256
    patch: tuple[int, int, int] = (1, 2, 2)
    experts: int = 1
    vae_version: str = "2.2"
    vae_stride: tuple[int, int, int] = (4, 16, 16)
    vae_params: tuple[int, int] = VAE_PARAMS["2.2"]  # (encoder, decoder)
    text_params: int = T5_PARAMS
    text_embed_params: int = T5_EMBED
    text_blocks: int = T5_BLOCKS
    steps: int = 50
    encodes_video: bool = False  # i2v-a14b encodes every frame (image + zeros), ti2v one image
    sizes: tuple[tuple[int, int], ...] = ()  # trained (width, height), for suggestions
    source_bytes: float = 4.0  # bytes per DiT parameter in the files on disk (official: fp32)
    # The DiT does all per-token work (norms, modulation, q/k/v projections, RoPE, gated adds) in
    # token chunks, as dit.py does with `chunk_tokens`. False: a DiT that chunks only its FFN
    # (~10 x D more per token at the attention; measured 24-25 x D against 12-14).
    chunked_attention: bool = True

    @property
    def block_linear_params(self) -> int:
        d, f = self.dim, self.ffn_dim
        return 8 * d * d + 2 * d * f

    @property
    def block_params(self) -> int:  # 27 tensors: q k v o x2, norms, modulation, FFN
        return self.block_linear_params + 21 * self.dim + self.ffn_dim

    @property
    def nonblock_params(self) -> int:
        d, p = self.dim, math.prod(self.patch)
        return (d * self.in_dim * p + d  # patch_embedding
                + self.text_dim * d + d * d + 2 * d  # text_embedding: two Linear
                + self.freq_dim * d + d * d + 2 * d  # time_embedding: two Linear
                + 6 * d * d + 6 * d  # time_projection
                + 2 * d + self.out_dim * p * (d + 1))  # head: modulation, Linear

    @property
    def params(self) -> int:
        return self.num_layers * self.block_params + self.nonblock_params

    def block_bytes(self, quant: str) -> int:
        """Bytes of one block: its Linear weights in `quant` (bf16 2 per weight; int8 / fp8 1 +
        an fp32 scale per output row; int4 0.5 + a bf16 scale per 64 inputs of a row, every DiT
        width being a multiple of 64), the rest bf16, modulation fp32."""
        d, lin = self.dim, self.block_linear_params
        rest = (self.block_params - lin - 6 * d) * 2 + 6 * d * 4  # biases, norms bf16; modulation fp32
        if quant == "bf16":
            return 2 * lin + rest
        if quant == "int4":
            return lin // 2 + lin // 64 * 2 + rest
        return lin + (9 * d + self.ffn_dim) * 4 + rest

    def nonblock_bytes(self) -> int:
        return 2 * self.nonblock_params  # embeddings, time projection and head are never quantized

    def expert_bytes(self, quant: str) -> int:
        return self.num_layers * self.block_bytes(quant) + self.nonblock_bytes()

    def text_block_bytes(self, quant: str) -> int:
        per = (self.text_params - self.text_embed_params - self.text_dim) // max(1, self.text_blocks)
        return 2 * per if quant == "bf16" else per + 9 * self.text_dim * 4

    def text_bytes(self, quant: str) -> int:
        return self.text_blocks * self.text_block_bytes(quant) + 2 * (self.text_embed_params + self.text_dim)

    def vae_bytes(self, part: str, dtype: str) -> int:
        return self.vae_params[0 if part == "encoder" else 1] * (4 if dtype == "fp32" else 2)

    @classmethod
    def full_size(cls, name: str) -> ModelFootprint:
        """A model of the registry at its released size, by name (ti2v-5b, t2v-a14b, i2v-a14b)."""
        spec = get_spec(name)
        d = spec.dit
        return cls(spec.name, d.dim, d.ffn_dim, d.num_heads, d.num_layers, spec.dit_in_dim, spec.dit_out_dim,
                   text_dim=d.text_dim, freq_dim=d.freq_dim, patch=spec.patch_size, experts=len(spec.dits),
                   vae_version=spec.vae_version, vae_stride=spec.vae_stride, vae_params=spec.vae.params,
                   steps=spec.steps, encodes_video=spec.encodes_video, sizes=spec.sizes)

    @classmethod
    def of_model(cls, name: str, cfg: Any = None) -> ModelFootprint:
        """A registry model whose DiT on disk has config `cfg`: the released footprint when the DiT
        has the released size (or `cfg` is None), else one counted from `cfg` with the model's
        VAE and experts."""
        spec = get_spec(name)
        if cfg is None or spec.dit.same_size(cfg):
            return cls.full_size(spec.name)
        return cls.from_config(cfg, name=spec.name, vae_version=spec.vae_version, experts=len(spec.dits))

    @classmethod
    def from_config(cls, cfg: Any, *, name: str = "custom", vae_version: str = "2.2", **sizes: Any) -> ModelFootprint:
        """From a loaded DiT's config (anything with dim, ffn_dim, num_heads, num_layers, in_dim,
        out_dim; text_dim, freq_dim, patch_size optional). `sizes` sets any other field (experts,
        vae_params, text_params, ...); the VAE and text encoder default to the released ones."""
        vae = vae_for(vae_version)
        sizes.setdefault("vae_params", vae.params)
        sizes.setdefault("source_bytes", 2.0)
        return cls(name, cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.num_layers, cfg.in_dim, cfg.out_dim,
                   text_dim=getattr(cfg, "text_dim", 4096), freq_dim=getattr(cfg, "freq_dim", 256),
                   patch=tuple(getattr(cfg, "patch_size", (1, 2, 2))), vae_version=vae_version,
                   vae_stride=vae.stride, **sizes)
