"""What a plan is and what it costs: the request (`PlanRequest`), the decisions (`Choices`), a
plan with its estimates (`Plan`), and the memory and time model that `evaluate` applies to
fully specified choices. Pure arithmetic, no torch; planner.py makes the choices.

Stages run one after another and each gets the whole GPU (the runtime drops the DiT's GPU copies
between stages unless `keep_resident`): text -> (VAE encode) -> denoise -> decode; the peaks are
maxima over stages. Bytes below, GiB in the Plan. Constants live in `K`, measured on an H200 with
full-size random-weight models (see K).

Memory model. L = F_lat*(h/2)*(w/2) tokens (F_lat = 1+(frames-1)//4, h, w = H, W / VAE stride),
c = min(ffn_chunk_tokens or L, L), B = 2 with cfg_batch, D = dim, F = ffn_dim:
- DiT activations = B*(max(sdpa, proj, ffn) + 512*(4096+D)*2) + L*1024 (float64 RoPE tables), with
  base = 4*D*L (fp32 residual; +2*D*L for block 0's bf16 input unless `chunked_attention`),
  sdpa = base + 8*D*L (q, k, v and the output in bf16; flash/SDPA needs no L^2; +3*D*L for their
  fp8 copies with `PlanRequest.fp8_attention` and fp8 compute),
  proj = base + 6*D*L + D*(13.1*c + 14.7*min(c, 4096)) (chunked projections, fp64 RoPE chunk;
  c -> L where the attention is not chunked), ffn = base + c*(6*D + 4*F) (hidden + GELU in bf16).
- DiT weights on the GPU = non-block (bf16) + all n blocks, or r resident + (prefetch+1) streaming
  slots; + the largest Linear in bf16 (or q, k and v, kept for reuse across token chunks) when
  int8/fp8/int4 weights are dequantized per layer (not with fp8 compute); + the other expert when
  idle_expert == "gpu". Block bytes: bf16 2/param; int8/fp8 1/weight + an fp32 scale per output
  row; int4 0.5/weight + a bf16 scale per 64 inputs; biases/norms bf16, modulation fp32.
- VAE = weights + tile^2 (or H*W) * per-pixel bytes of one latent frame (K.vae_decode_px, causal
  cache included; ~8 kB/px bf16) + the tile's fp32 output frames (untiled: the whole video); a
  tiled decode first runs the decoder's low-resolution part over the whole frame (weights +
  H*W * K.vae_low_res_px), then holds the decoder without that part (K.vae_decoder_idle_share)
  during the tiles, that part's output in RAM (K.vae_low_res_ram_px per pixel-frame).
- umT5 (5.68e9 params; bf16 11.4 GB, int8 blocks + bf16 embedding 6.7 GB): "gpu" whole, "stream"
  two blocks (embedding lookup on the CPU), "cpu" nothing; + K.t5_act.
- RAM = K.ram_base + active expert + idle expert if "ram" (with keep_resident or blocks_from
  "disk" instead: one block in flight from the file to the GPU, + (prefetch+1) page-locked
  staging blocks when streamed from disk) + VAE + the largest of: umT5 (whole when
  keep_text_encoder, for the whole job; else while encoding: whole on the CPU, its embedding +
  one block going to the GPU, + 3 blocks streamed), the first start's conversion (two blocks),
  the decoded video (fp32 + uint8, the tiled decode's features).
- Usable = free VRAM - (0.25 GiB + 4 % of total); available RAM - (1 GiB + 3 % of total).
Time model. Per forward 2*L*(6D^2+2DF)*n (Linear; x K.fp8_gain faster with fp8 compute) +
4*L^2*D*n (attention; x K.fp8_attention_gain with fp8 attention) FLOP at `Hardware.speed()`; in
token chunks + per block K.chunked_token_s per token of the batch and K.chunk_block_s per chunk past
the first; 2 forwards per step with CFG (one with a batch of 2: x K.batch2_cost, x
K.batch2_cost_short for short sequences); streaming costs max(compute, transfer) + one block.
VAE and umT5 from measured seconds scaled by throughput (a tiled decode x `tiled_time`,
vae_memory's time model); disk reads at `Hardware.disk_gbps` (probed once per disk, remembered),
blocks streamed from disk at min(disk, link) per forward.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from wan_lite.errors import InputError
from wan_lite.runtime.footprint import K, ModelFootprint
from wan_lite.runtime.hardware import GIB, Hardware
from wan_lite.runtime.refill import ROW_CHUNK_BYTES
from wan_lite.units import duration


@dataclass(frozen=True)
class PlanRequest:
    """What to make. cfg: guidance > 1 (two DiT passes per step); cfg_batch None lets the planner
    decide, False forbids batching; image: an input image is encoded (image-to-video)."""

    width: int
    height: int
    frames: int
    cfg_batch: bool | None = None
    steps: int | None = None
    cfg: bool = True
    image: bool = False
    fp8_attention: bool = False  # the user opted in (WAN_LITE_FP8_ATTENTION=1): fp8 q, k, v with fp8 compute
    cache: str = "off"  # the step cache setting (runtime/step_cache.py)
    cache_share: float = 1.0  # the share of DiT forwards the step cache computes (step_cache.computed_share)
    lora_names: tuple[str, ...] = ()  # the LoRAs of the job (file names, for the plan line)
    lora_bytes: int = 0  # their low-rank factors in bf16 where they run unmerged (LoRAFile.unmerged_bytes)
    lora_rank: int = 0  # their ranks added up: an unmerged LoRA's cost grows with it
    speed_first: bool = False  # Turbo: speed before the official precision (the VAE in bf16 where fp32 fits too)

    @classmethod
    def of(cls, request: Any) -> PlanRequest:
        """Accept a PlanRequest, (width, height, frames[, cfg_batch]) or a dict of the fields."""
        if isinstance(request, PlanRequest):
            req = request
        elif isinstance(request, dict):
            req = cls(**request)
        else:
            req = cls(*request)
        if min(req.width, req.height, req.frames) < 1:
            raise InputError(f"Cannot plan a {req.width}x{req.height} video of {req.frames} frames.",
                             "Give a positive width, height and frame count.")
        return req


@dataclass(frozen=True)
class Geo:
    lat: tuple[int, int, int]  # latent frames, height, width
    tokens: int

    @classmethod
    def of(cls, m: ModelFootprint, r: PlanRequest) -> Geo:
        st, sh, sw = m.vae_stride
        t, h, w = 1 + (r.frames - 1) // st, max(1, r.height // sh), max(1, r.width // sw)
        return cls((t, h, w), t * max(1, h // m.patch[1]) * max(1, w // m.patch[2]))


# ------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class Choices:
    """The decisions of a plan (what a profile may force, what `leaner` changes)."""

    quantization: str = "bf16"
    resident_blocks: int = 0
    prefetch: int = 1
    pinned: bool = True
    idle_expert: str = "none"  # "gpu" | "ram" | "disk"; "none" for one-model checkpoints
    keep_resident: bool = False  # DiT stays on the GPU across stages: no copy in RAM
    text_encoder: str = "stream"  # "resident" (on the GPU for good) | "gpu" (there while encoding) | "cpu" | "stream"
    text_encoder_quant: str = "bf16"
    keep_text_encoder: bool = False  # stays in RAM between prompts (else re-read from disk)
    vae_tile: int | None = None  # tile side in output pixels; None = untiled
    vae_dtype: str = "bf16"
    # a tiled decode's global pass stops after the decoder's middle: its output, the tiles' input
    # in RAM, is an eighth (Wan 2.2; a quarter for 2.1), the tiles run the first upsampling level
    vae_lean: bool = False
    # the VAE waits in its file: each half read straight to the GPU for its stage, dropped after
    # (runtime/vae_parts.py; no copy in RAM, a read of its file per encode and decode)
    vae_on_disk: bool = False
    ffn_chunk_tokens: int | None = None
    cfg_batch: bool = False
    # "disk": the DiT's copy is not kept in RAM: its streamed blocks are read from the file (the
    # converted-weights cache) each forward, the rest straight to the GPU when it runs
    blocks_from: str = "ram"


CHOICE_FIELDS = tuple(f.name for f in fields(Choices))


@dataclass(frozen=True)
class Plan(Choices):
    """A Choices with its estimates. Sizes in GiB, times in seconds."""

    fits: bool = False
    reason: str | None = None
    fp8_compute: bool = False
    fp8_attention: bool = False  # fp8 compute with the fp8 attention the request opted into
    peak_vram_gib: float = 0.0
    peak_ram_gib: float = 0.0
    stage_vram_gib: tuple[tuple[str, float], ...] = ()
    usable_vram_gib: float = 0.0
    usable_ram_gib: float = 0.0
    seconds_estimate: float = 0.0
    stage_seconds: tuple[tuple[str, float], ...] = ()
    notes: tuple[str, ...] = ()
    quant_note: str | None = None  # why int4, where the planner stepped down to it (planner._int4_instead)
    profile: str | None = None
    model: ModelFootprint | None = field(default=None, repr=False)
    request: PlanRequest | None = field(default=None, repr=False)
    hardware: Hardware | None = field(default=None, repr=False)

    @property
    def choices(self) -> Choices:
        return Choices(**{k: getattr(self, k) for k in CHOICE_FIELDS})

    def summary(self) -> str:
        """One log line: the request, the choices, peaks against what is usable, time, device."""
        m, r, hw = self.model, self.request, self.hardware
        n = m.num_layers if m else 0
        parts = [self.quantization + (" (fp8 compute" + (", fp8 attention)" if self.fp8_attention else ")")
                                      if self.fp8_compute else "") + (f" ({self.quant_note})" if self.quant_note else ""),
                 f"{self.resident_blocks}/{n} blocks resident" + (
                     f", prefetch {self.prefetch} from "
                     + ("disk" if self.blocks_from == "disk" else f"{'pinned' if self.pinned else 'pageable'} RAM")
                     if self.resident_blocks < n else ""),
                 f"idle expert on {self.idle_expert}" if self.idle_expert != "none" else "",
                 "cond+uncond batched" if self.cfg_batch else "",
                 f"chunks of {self.ffn_chunk_tokens} tokens" if self.ffn_chunk_tokens else "",
                 f"VAE {f'tiles {self.vae_tile}px' if self.vae_tile else 'untiled'} {self.vae_dtype}"
                 + (", lean global pass" if self.vae_lean and self.vae_tile else "")
                 + (", read from its file" if self.vae_on_disk else ""),
                 f"text encoder {self.text_encoder} {self.text_encoder_quant}",
                 f"step cache {r.cache} ({r.cache_share:.0%} of DiT forwards computed)" if r and r.cache != "off"
                 else "",
                 (f"LoRA {' + '.join(r.lora_names)} " + ("merged into the weights" if self.quantization == "bf16"
                                                       else "unmerged beside the quantized weights"))
                 if r and r.lora_names else ""]
        head = f"{m.name} {r.width}x{r.height}x{r.frames}" if m and r else "plan"
        return (f"{head} {'fits' if self.fits else 'does NOT fit'}: {', '.join(p for p in parts if p)} -> "
                f"peak {self.peak_vram_gib:.1f}/{self.usable_vram_gib:.1f} GiB VRAM, {self.peak_ram_gib:.1f}/"
                f"{self.usable_ram_gib:.1f} GiB RAM, ~{_human_s(self.seconds_estimate)}"
                + (f" on {hw.gpu_name or 'the CPU'}" if hw else ""))

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict: every choice, the estimates, the request and the machine."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("model", "request", "hardware")}
        data.update(stage_vram_gib=dict(self.stage_vram_gib), stage_seconds=dict(self.stage_seconds),
                    notes=list(self.notes), model=self.model.name if self.model else None,
                    request={k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.request).items()}
                    if self.request else None,
                    hardware=self.hardware.to_json() if self.hardware else None, summary=self.summary())
        return data


def _human_s(s: float) -> str:
    return duration(s)


# ------------------------------------------------------------------------------ estimates
def usable(hw: Hardware) -> tuple[float, float]:
    """(usable VRAM, usable RAM) in bytes."""
    vram = hw.vram_free_gib * GIB - (K.vram_margin[0] + K.vram_margin[1] * hw.vram_total_gib * GIB)
    ram = hw.ram_available_gib * GIB - (K.ram_margin[0] + K.ram_margin[1] * hw.ram_total_gib * GIB)
    return (max(0.0, vram) if hw.has_gpu else 0.0), max(0.0, ram)


def _act(m: ModelFootprint, g: Geo, batch: int, chunk: int | None, fp8_attention: bool = False) -> float:
    """DiT activation peak of one forward in bytes: the largest of the attention (SDPA) moment
    (with `fp8_attention`, the fp8 copies of q, k and v beside the bf16 ones), the chunked q/k/v
    projection and the chunked FFN, + RoPE tables and the text context."""
    L, d, f = g.tokens, m.dim, m.ffn_dim
    c = min(chunk or L, L)
    # a lean DiT casts the patch embedding to fp32 once, so block 0 holds no bf16 copy beside x
    base = L * d * (K.residual_d + (0.0 if m.chunked_attention else K.input_d))
    sdpa = base + L * d * (K.qkv_d + K.attn_out_d + (K.qkv_fp8_d if fp8_attention else 0.0))
    proj = base + L * d * K.qkv_d + d * ((c if m.chunked_attention else L) * K.attn_chunk_d
                                         + min(c, K.rope_chunk) * K.rope_chunk_d)
    ffn = base + c * (d * K.ffn_chunk_d + f * K.ffn_chunk_f)
    return batch * (max(sdpa, proj, ffn) + 512 * (m.text_dim + d) * 2) + L * K.rope_per_token


CHUNKS = (None, 32768, 16384, 8192, 4096, 2048, 1024)


def default_chunk(m: ModelFootprint, g: Geo) -> int | None:
    """The largest chunk (None = whole sequence) whose activation peak is within 2 % of the lowest
    any chunk reaches: chunks below that only cost time."""
    acts = {c: _act(m, g, 1, c) for c in CHUNKS if c is None or c < g.tokens}
    low = min(acts.values())
    return next(c for c, a in acts.items() if a <= low * 1.02)


def _dit_vram(m: ModelFootprint, ch: Choices, fp8c: bool) -> float:
    """DiT weights on the GPU while denoising (both experts when the idle one waits there)."""
    n, r, b = m.num_layers, min(ch.resident_blocks, m.num_layers), m.block_bytes(ch.quantization)
    blocks = n * b if r >= n else (r + ch.prefetch + 1) * b
    # One layer's bf16 weight while it runs. In token chunks up to 3 are kept (quant._WeightReuse):
    # q, k, v through the attention, the activation peak; the FFN pair when activations are far lower.
    square = (3 if ch.ffn_chunk_tokens else 1) * m.dim * m.dim
    dequant = 0 if ch.quantization == "bf16" or fp8c else 2 * max(m.ffn_dim * m.dim, square)
    other = m.expert_bytes(ch.quantization) if ch.idle_expert == "gpu" else 0
    return m.nonblock_bytes() + blocks + dequant + other


def _tiles(size: int, tile: int, stride: int) -> tuple[int, int]:
    """(count, pixels) of the equal tiles vae_memory.tile_spans cuts `size` into (tiles of at most `tile`)."""
    n, t, o = size // stride, max(1, tile // stride), K.vae_tile_overlap // stride
    if t >= n:
        return 1, size
    o = min(o, t // 2)
    count = math.ceil((n - o) / (t - o))
    return count, math.ceil((n + (count - 1) * o) / count) * stride


def _overlap_px(m: ModelFootprint, r: PlanRequest, tile: int) -> int:
    """Pixels of one frame that two or more tiles cover (at most: the tiles' whole overlaps)."""
    s = m.vae_stride[1]
    (nh, th), (nw, tw) = _tiles(r.height, tile, s), _tiles(r.width, tile, s)
    rows = nh * th - r.height if nh > 1 else 0
    cols = nw * tw - r.width if nw > 1 else 0
    return rows * r.width + cols * r.height


def tiled_time(r: PlanRequest, tile: int | None, stride: int) -> float:
    """A tiled decode's time over the untiled one, as vae_memory.decode_cost models it with whole
    frame chunks (what the decode takes where they fit): pixels decoded, overlaps counted twice,
    over the frame's, plus K.vae_tile_cost per tile."""
    if not tile:
        return 1.0
    (nh, sh), (nw, sw) = _tiles(r.height, tile, stride), _tiles(r.width, tile, stride)
    if nh == nw == 1:
        return 1.0
    return nh * sh * nw * sw / (r.height * r.width) + K.vae_tile_cost * nh * nw


def _vae_vram(m: ModelFootprint, r: PlanRequest, ch: Choices, part: str) -> float:
    if part == "decoder" and ch.vae_tile:  # no tile video on the GPU: pixels leave per latent frame
        s = m.vae_stride[1]
        px = _tiles(r.height, ch.vae_tile, s)[1] * _tiles(r.width, ch.vae_tile, s)[1]
        weights = m.vae_bytes(part, ch.vae_dtype)  # all of them for the global pass; a part off for the tiles
        low_res = weights + r.height * r.width * K.vae_low_res_px[m.vae_version, ch.vae_dtype]
        tiles = weights * (1 - K.vae_decoder_idle_share[m.vae_version])
        return max(low_res, tiles + px * K.vae_tiled_decode_px[m.vae_version, ch.vae_dtype])
    px = (min(ch.vae_tile, r.height) * min(ch.vae_tile, r.width)) if ch.vae_tile else r.height * r.width
    frames = r.frames if part == "decoder" or m.encodes_video else 1
    per_px = (K.vae_decode_px if part == "decoder" else K.vae_encode_px)[m.vae_version, ch.vae_dtype]
    io = frames * px * 3 * 4  # the fp32 output video (decode) or input frames (encode) of the tile
    return m.vae_bytes(part, ch.vae_dtype) + px * per_px + io


def estimate(m: ModelFootprint, r: PlanRequest, hw: Hardware, ch: Choices) -> dict[str, Any]:
    """Stage VRAM (bytes), RAM peak (bytes) and stage seconds of fully specified choices."""
    g, gpu, sp = Geo.of(m, r), hw.has_gpu, hw.speed()
    fp8c = ch.quantization == "fp8" and hw.fp8_tensor_cores
    fp8a = fp8c and r.fp8_attention
    batch = 2 if ch.cfg_batch and r.cfg else 1
    act = _act(m, g, batch, ch.ffn_chunk_tokens, fp8a)
    latents = K.latent_copies * math.prod(g.lat) * max(m.in_dim, m.out_dim) * 4
    dit_all = (m.expert_bytes(ch.quantization) * (2 if ch.idle_expert == "gpu" else 1)) if ch.keep_resident else 0
    vram: dict[str, float] = {}
    if gpu:
        t5_gpu = {"gpu": m.text_bytes(ch.text_encoder_quant), "stream": 2 * m.text_block_bytes(ch.text_encoder_quant),
                  "resident": m.text_bytes(ch.text_encoder_quant)}
        vram["text"] = (t5_gpu[ch.text_encoder] + K.t5_act if ch.text_encoder in t5_gpu else 0.0) + dit_all
        t5_kept = t5_gpu["resident"] if ch.text_encoder == "resident" else 0.0  # beside every other stage
        if r.image:
            vram["encode"] = _vae_vram(m, r, ch, "encoder") + dit_all + t5_kept
        vram["denoise"] = _dit_vram(m, ch, fp8c) + act + latents + t5_kept
        vram["decode"] = _vae_vram(m, r, ch, "decoder") + dit_all + latents + t5_kept
    # a step cache keeps one residual [L, D] per guidance branch in bf16: on the GPU where every
    # block is resident there, else in host memory (runtime/apply.py step_cache_device)
    residuals = (2 if r.cfg else 1) * g.tokens * m.dim * 2 if r.cache != "off" else 0.0
    on_gpu = gpu and ch.resident_blocks >= m.num_layers
    if on_gpu:
        vram["denoise"] += residuals
    # LoRAs merge into bf16 weights (no memory, no time: 1.004-1.006x measured, run 2026-12-06-b);
    # beside quantized weights their factors sit on the device and each adds a low-rank product
    unmerged = ch.quantization != "bf16" and r.lora_bytes > 0
    if unmerged and gpu:
        vram["denoise"] += r.lora_bytes
    # RAM: what lives in host memory through the job, plus each stage's own. An upper bound of
    # what the loader and the placement do (runtime/loader.py, apply.py):
    expert, b = m.expert_bytes(ch.quantization), m.block_bytes(ch.quantization)
    disk = ch.blocks_from == "disk" and gpu
    if disk or (ch.keep_resident and gpu):
        # read from the file block by block straight to the GPU (one block, or the non-block
        # parts, in RAM at a time); streamed blocks through page-locked staging, one per slot
        dit_ram = max(m.nonblock_bytes(), b) + ((ch.prefetch + 1) * b if disk and ch.resident_blocks < m.num_layers
                                                 else 0)
    else:
        dit_ram = expert + (expert if ch.idle_expert == "ram" else 0)
    held = K.ram_base + dit_ram
    vae_disk = ch.vae_on_disk and gpu
    if not vae_disk:
        held += m.vae_bytes("encoder", ch.vae_dtype) + m.vae_bytes("decoder", ch.vae_dtype)
    t5 = m.text_bytes(ch.text_encoder_quant)
    t5_block = m.text_block_bytes(ch.text_encoder_quant)
    # kept: loaded whole into RAM with the model and held there; else read from its file at its
    # prompt and dropped after: on the CPU whole, to the GPU block by block (its token embedding
    # first), streamed with a page-locked copy of two blocks and the token embedding left in its
    # file, each prompt reading its rows (a bf16 or fp32 table, as released and in the cache)
    kept = t5 if ch.keep_text_encoder else 0
    if kept or ch.text_encoder == "cpu" or not gpu:
        while_encoding = t5
    elif ch.text_encoder == "stream":  # the embedding's rows of the prompts only (embedding_rows)
        while_encoding = 2 * 512 * m.text_dim * 2 + 3 * t5_block
    else:  # to the GPU a tensor at a time, the embedding a chunk at a time (refill.Rows)
        while_encoding = ROW_CHUNK_BYTES + t5_block
    # converting a checkpoint into the cache at the first start: one source tensor (fp32 at most)
    # and its converted copy, within two blocks; umT5's token embedding a chunk at a time
    converting = kept + max(2 * m.block_bytes("bf16"), 2 * ROW_CHUNK_BYTES)
    # the decoded video: on a GPU only its uint8 frames come to RAM (an untiled video stays on
    # the GPU, a tiled one is assembled as frames with float32 strips over the overlaps:
    # vae_frames.FrameAssembly); on the CPU the float32 video and its frames
    video = r.frames * r.width * r.height * (K.frames_ram_px if gpu else K.video_ram_px)
    if ch.vae_tile and gpu:
        video += r.frames * _overlap_px(m, r, ch.vae_tile) * 3 * 4
        # the tiles' input: the global pass's features, in CPU memory, per latent frame
        low_res_px = (K.vae_low_res_lean_ram_px if ch.vae_lean else K.vae_low_res_ram_px)[m.vae_version]
        video += 4 * g.lat[0] * r.width * r.height * low_res_px * (4 if ch.vae_dtype == "fp32" else 2)
    cpu_act = 0.0 if gpu else act + latents
    cpu_vae = 0.0 if gpu else _vae_vram(m, r, ch, "decoder") - m.vae_bytes("decoder", ch.vae_dtype)
    vae_read = 2 * ROW_CHUNK_BYTES if vae_disk else 0.0  # a tensor of it in flight to the GPU, cast
    ram = held + max(while_encoding, converting, kept + cpu_act + (0 if on_gpu else residuals),
                     kept + video + cpu_vae + vae_read, vae_read)

    # time
    n, L, d, f = m.num_layers, g.tokens, m.dim, m.ffn_dim
    tflops = sp.tflops * 1e12
    lin = (2 * L * (6 * d * d + 2 * d * f) + 2 * 512 * 2 * d * d) * n
    attn = (4 * L * L * d + 4 * L * 512 * d) * n
    fwd = lin / (tflops * (K.fp8_gain if fp8c else 1.0)) + attn / (tflops * (K.fp8_attention_gain if fp8a else 1.0))
    fwd *= (K.dequant_cost if ch.quantization != "bf16" and not fp8c else 1.0)
    passes = 2 if r.cfg else 1
    # token chunks cost time per block and forward: once per token of the batch for chunking at
    # all, and per chunk past the first (a batch of 2 runs both prompts' chunks together); as
    # measured on the reference GPU, scaled by speed
    chunks = math.ceil(L / min(ch.ffn_chunk_tokens or L, L))
    chunk_s = 0.0 if chunks == 1 else n * (K.chunked_token_s * batch * L + K.chunk_block_s * (chunks - 1))
    chunk_s *= K.ref_tflops / sp.tflops
    # too little work per kernel to fill the GPU: a length that scales with the GPU's speed
    short = L <= K.batch2_short_tokens * sp.tflops / K.ref_tflops
    batch_cost = K.batch2_cost_short if short else K.batch2_cost
    compute = passes * fwd * (batch_cost if batch == 2 else 1.0) + passes // batch * chunk_s
    if unmerged:
        compute *= 1.0 + K.lora_rank_cost * r.lora_rank
    streamed = max(0, n - ch.resident_blocks) if gpu else 0
    link = (sp.pinned_gbps if ch.pinned else sp.pageable_gbps) * 1e9 or 1.0
    disk_bps = hw.disk_gbps * 1e9
    if disk:  # streamed blocks come from the disk each forward, then over the link (overlapped)
        link = min(disk_bps, sp.pinned_gbps * 1e9 or 1.0)
    copies = passes // batch
    step = compute
    if streamed:
        step = max(compute, streamed * b * copies / link) + copies * b / link  # first slot is never hidden
    steps = r.steps or m.steps
    resident = (expert - streamed * b) / link if gpu else 0.0  # seconds to put the resident part on the GPU
    if disk or (ch.keep_resident and gpu):  # read from the cache file on its way there
        resident = (expert - streamed * b) / min(disk_bps, link)
    upload = 0.0 if ch.keep_resident else resident  # once per job, unless it never leaves the GPU
    switch = 0.0
    if m.experts > 1 and ch.idle_expert != "gpu":
        on_disk = expert  # the converted-weights cache (a bf16 source is its own)
        switch = resident + (on_disk / disk_bps if ch.idle_expert == "disk" and not disk else 0.0)
    text_flops = 2 * (m.text_params - m.text_embed_params) * 512 * 2
    text_s = text_flops / ((sp.tflops if ch.text_encoder != "cpu" else sp.cpu_tflops) * 1e12)
    if ch.text_encoder not in ("cpu", "resident"):  # a resident encoder was uploaded once, by the first job
        text_s += t5 / link
    if not ch.keep_text_encoder and ch.text_encoder != "resident":
        text_s += t5 / disk_bps
    tile = tiled_time(r, ch.vae_tile, m.vae_stride[1])
    scale = K.ref_tflops / sp.tflops * tile * r.width * r.height / 1e6
    # a skipped forward runs no block and streams none: the step costs its share of forwards
    secs = {"text": text_s, "denoise": steps * step * r.cache_share + upload + switch,
            "decode": scale * r.frames * K.vae_decode_s[m.vae_version, ch.vae_dtype]}
    if r.image:
        secs["encode"] = scale * (r.frames if m.encodes_video else 1) * K.vae_encode_s[m.vae_version, ch.vae_dtype]
    if vae_disk:  # each half read from its file (fp32 as released) at its stage
        secs["decode"] += m.vae_bytes("decoder", "fp32") / disk_bps
        if r.image:
            secs["encode"] += m.vae_bytes("encoder", "fp32") / disk_bps
    return {"vram": vram, "ram": ram, "secs": secs, "fp8c": fp8c, "fp8a": fp8a}


def evaluate(m: ModelFootprint, r: PlanRequest, hw: Hardware, ch: Choices, profile: str | None = None) -> Plan:
    e = estimate(m, r, hw, ch)
    uv, ur = usable(hw)
    peak_v = max(e["vram"].values(), default=0.0)
    fits = peak_v <= uv and e["ram"] <= ur
    extra = []
    if ch.quantization == "fp8" and hw.has_gpu and not e["fp8c"]:
        extra.append("fp8 on a GPU without fp8 tensor cores (compute capability < 8.9): storage only.")
    if not hw.has_gpu:
        extra.append("No CUDA GPU: everything runs on the CPU, which takes hours.")
    return Plan(**asdict(ch), fits=fits, fp8_compute=e["fp8c"], fp8_attention=e["fp8a"], peak_vram_gib=round(peak_v / GIB, 3),
                peak_ram_gib=round(e["ram"] / GIB, 3),
                stage_vram_gib=tuple((k, round(v / GIB, 3)) for k, v in e["vram"].items()),
                usable_vram_gib=round(uv / GIB, 3), usable_ram_gib=round(ur / GIB, 3),
                seconds_estimate=round(sum(e["secs"].values()), 1),
                stage_seconds=tuple((k, round(v, 1)) for k, v in e["secs"].items()),
                notes=tuple(dict.fromkeys(extra)), profile=profile, model=m, request=r, hardware=hw)
