"""Memory planner: from a model's sizes, a request and a machine, decide how to run (a `Plan`).

`plan(model, request, hw, profile=None)` is pure (no torch, no probing): it picks the quantization,
the DiT blocks kept on the GPU (the rest streamed `prefetch` ahead from pinned or pageable RAM),
where the idle A14B expert waits, the text encoder's placement, VAE tile and dtype, FFN chunk and
CFG batching, and estimates peak VRAM, peak RAM and seconds (the preflight estimate). Choices are
greedy: quality first (bf16 unless it does not fit or is >25 % slower), then the token chunk and
CFG batching whose denoise is fastest with as many resident blocks as fit beside them, then the
largest VAE tile. `leaner(plan)` is the next plan to drop to after an out-of-memory error mid-run.

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
  int8/fp8 weights are dequantized per layer (not with fp8 compute); + the other expert when
  idle_expert == "gpu". Block bytes: bf16 2/param; int8/fp8 1/weight + an fp32 scale per output
  row, biases/norms bf16, modulation fp32.
- VAE = weights + tile^2 (or H*W) * per-pixel bytes of one latent frame (K.vae_decode_px, causal
  cache included; ~8 kB/px bf16) + the tile's fp32 output frames (untiled: the whole video); a
  tiled decode first runs the decoder's low-resolution part over the whole frame (weights +
  H*W * K.vae_low_res_px), then holds the decoder without that part (K.vae_decoder_idle_share)
  during the tiles, that part's output in RAM (K.vae_low_res_ram_px per pixel-frame).
- umT5 (5.68e9 params; bf16 11.4 GB, int8 blocks + bf16 embedding 6.7 GB): "gpu" whole, "stream"
  two blocks (embedding lookup on the CPU), "cpu" nothing; + K.t5_act.
- RAM = K.ram_base + active expert (none with keep_resident: loaded straight to the GPU) + idle
  expert if "ram" + VAE + umT5 (the streamer's packed copy while encoding, kept after only with
  keep_text_encoder; a memory-mapped file otherwise) + the decoded video (fp32 + uint8).
- Usable = free VRAM - (0.25 GiB + 4 % of total); available RAM - (1 GiB + 3 % of total).
Time model. Per forward 2*L*(6D^2+2DF)*n (Linear; x1.6 with fp8 compute) + 4*L^2*D*n (attention;
x1.3 with fp8 attention) FLOP at `Hardware.speed()`; in token chunks + per block K.chunked_token_s
per token of the batch and K.chunk_block_s per chunk past the first; 2 forwards per step with CFG
(one with a batch of 2, x K.batch2_cost); streaming costs max(compute, transfer) + one block.
VAE and umT5 from measured seconds scaled by throughput (a tiled decode x `_tiled_time`,
vae_memory's time model); disk reads at DISK_GBPS.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from wan_lite.errors import InputError
from wan_lite.runtime.footprint import QUANTS, VAE_PARAMS, K, ModelFootprint  # noqa: F401  (re-exported)
from wan_lite.runtime.hardware import DISK_GBPS, GIB, Hardware, MemoryProfile, get_profile

log = logging.getLogger(__name__)



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
class _Geo:
    lat: tuple[int, int, int]  # latent frames, height, width
    tokens: int

    @classmethod
    def of(cls, m: ModelFootprint, r: PlanRequest) -> _Geo:
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
    text_encoder: str = "stream"  # "gpu" | "cpu" | "stream"
    text_encoder_quant: str = "bf16"
    keep_text_encoder: bool = False  # stays in RAM between prompts (else re-read from disk)
    vae_tile: int | None = None  # tile side in output pixels; None = untiled
    vae_dtype: str = "bf16"
    ffn_chunk_tokens: int | None = None
    cfg_batch: bool = False


_CHOICE_FIELDS = tuple(f.name for f in fields(Choices))


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
    profile: str | None = None
    model: ModelFootprint | None = field(default=None, repr=False)
    request: PlanRequest | None = field(default=None, repr=False)
    hardware: Hardware | None = field(default=None, repr=False)

    @property
    def choices(self) -> Choices:
        return Choices(**{k: getattr(self, k) for k in _CHOICE_FIELDS})

    def summary(self) -> str:
        """One log line: the request, the choices, peaks against what is usable, time, device."""
        m, r, hw = self.model, self.request, self.hardware
        n = m.num_layers if m else 0
        parts = [self.quantization + (" (fp8 compute" + (", fp8 attention)" if self.fp8_attention else ")")
                                      if self.fp8_compute else ""),
                 f"{self.resident_blocks}/{n} blocks resident" + (
                     f", prefetch {self.prefetch} from {'pinned' if self.pinned else 'pageable'} RAM"
                     if self.resident_blocks < n else ""),
                 f"idle expert on {self.idle_expert}" if self.idle_expert != "none" else "",
                 "cond+uncond batched" if self.cfg_batch else "",
                 f"chunks of {self.ffn_chunk_tokens} tokens" if self.ffn_chunk_tokens else "",
                 f"VAE {f'tiles {self.vae_tile}px' if self.vae_tile else 'untiled'} {self.vae_dtype}",
                 f"text encoder {self.text_encoder} {self.text_encoder_quant}"]
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
                    request=asdict(self.request) if self.request else None,
                    hardware=self.hardware.to_json() if self.hardware else None, summary=self.summary())
        return data


def _human_s(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    return f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


# ------------------------------------------------------------------------------ estimates
def _usable(hw: Hardware) -> tuple[float, float]:
    """(usable VRAM, usable RAM) in bytes."""
    vram = hw.vram_free_gib * GIB - (K.vram_margin[0] + K.vram_margin[1] * hw.vram_total_gib * GIB)
    ram = hw.ram_available_gib * GIB - (K.ram_margin[0] + K.ram_margin[1] * hw.ram_total_gib * GIB)
    return (max(0.0, vram) if hw.has_gpu else 0.0), max(0.0, ram)


def _act(m: ModelFootprint, g: _Geo, batch: int, chunk: int | None, fp8_attention: bool = False) -> float:
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


def default_chunk(m: ModelFootprint, g: _Geo) -> int | None:
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


def _tiled_time(r: PlanRequest, tile: int | None, stride: int) -> float:
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


def _estimate(m: ModelFootprint, r: PlanRequest, hw: Hardware, ch: Choices) -> dict[str, Any]:
    """Stage VRAM (bytes), RAM peak (bytes) and stage seconds of fully specified choices."""
    g, gpu, sp = _Geo.of(m, r), hw.has_gpu, hw.speed()
    fp8c = ch.quantization == "fp8" and hw.fp8_tensor_cores
    fp8a = fp8c and r.fp8_attention
    batch = 2 if ch.cfg_batch and r.cfg else 1
    act = _act(m, g, batch, ch.ffn_chunk_tokens, fp8a)
    latents = K.latent_copies * math.prod(g.lat) * max(m.in_dim, m.out_dim) * 4
    dit_all = (m.expert_bytes(ch.quantization) * (2 if ch.idle_expert == "gpu" else 1)) if ch.keep_resident else 0
    vram: dict[str, float] = {}
    if gpu:
        t5_gpu = {"gpu": m.text_bytes(ch.text_encoder_quant), "stream": 2 * m.text_block_bytes(ch.text_encoder_quant)}
        vram["text"] = (t5_gpu[ch.text_encoder] + K.t5_act if ch.text_encoder in t5_gpu else 0.0) + dit_all
        if r.image:
            vram["encode"] = _vae_vram(m, r, ch, "encoder") + dit_all
        vram["denoise"] = _dit_vram(m, ch, fp8c) + act + latents
        vram["decode"] = _vae_vram(m, r, ch, "decoder") + dit_all + latents
    # RAM: what lives in host memory through the job, plus each stage's own
    expert = m.expert_bytes(ch.quantization)
    held = K.ram_base + (0 if ch.keep_resident and gpu else expert) + (expert if ch.idle_expert == "ram" else 0)
    held += m.vae_bytes("encoder", ch.vae_dtype) + m.vae_bytes("decoder", ch.vae_dtype)
    t5 = m.text_bytes(ch.text_encoder_quant)
    kept = t5 if ch.keep_text_encoder else 0
    # a streamed encoder is packed into its own RAM buffers; one loaded straight to the GPU, or a
    # bf16 one run on the CPU, is read through the memory-mapped file (reclaimable page cache)
    copied = ch.text_encoder == "stream" or (ch.text_encoder == "cpu" and ch.text_encoder_quant != "bf16")
    while_encoding = max(kept, t5 if copied else 0)
    video = r.frames * r.width * r.height * K.video_ram_px
    if ch.vae_tile and gpu:  # the tiles' input: the global pass's features, in CPU memory
        low_res_px = K.vae_low_res_ram_px[m.vae_version] * (4 if ch.vae_dtype == "fp32" else 2)
        video += r.frames * r.width * r.height * low_res_px
    cpu_act = 0.0 if gpu else act + latents
    cpu_vae = 0.0 if gpu else _vae_vram(m, r, ch, "decoder") - m.vae_bytes("decoder", ch.vae_dtype)
    ram = held + max(while_encoding, kept + cpu_act, kept + video + cpu_vae)

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
    compute = passes * fwd * (K.batch2_cost if batch == 2 else 1.0) + passes // batch * chunk_s
    b, streamed = m.block_bytes(ch.quantization), max(0, n - ch.resident_blocks) if gpu else 0
    link = (sp.pinned_gbps if ch.pinned else sp.pageable_gbps) * 1e9 or 1.0
    copies = passes // batch
    step = compute
    if streamed:
        step = max(compute, streamed * b * copies / link) + copies * b / link  # first slot is never hidden
    steps = r.steps or m.steps
    resident = (expert - streamed * b) / link if gpu else 0.0  # seconds to put the resident part on the GPU
    upload = 0.0 if ch.keep_resident else resident  # once per job, unless it never leaves the GPU
    switch = 0.0
    if m.experts > 1 and ch.idle_expert != "gpu":
        on_disk = expert if ch.quantization != "bf16" else m.params * m.source_bytes  # cache or source
        switch = resident + (on_disk / (DISK_GBPS * 1e9) if ch.idle_expert == "disk" else 0.0)
    text_flops = 2 * (m.text_params - m.text_embed_params) * 512 * 2
    text_s = text_flops / ((sp.tflops if ch.text_encoder != "cpu" else sp.cpu_tflops) * 1e12)
    if ch.text_encoder != "cpu":
        text_s += t5 / link
    if not ch.keep_text_encoder:
        text_s += t5 / (DISK_GBPS * 1e9)
    tile = _tiled_time(r, ch.vae_tile, m.vae_stride[1])
    scale = K.ref_tflops / sp.tflops * tile * r.width * r.height / 1e6
    secs = {"text": text_s, "denoise": steps * step + upload + switch,
            "decode": scale * r.frames * K.vae_decode_s[m.vae_version, ch.vae_dtype]}
    if r.image:
        secs["encode"] = scale * (r.frames if m.encodes_video else 1) * K.vae_encode_s[m.vae_version, ch.vae_dtype]
    return {"vram": vram, "ram": ram, "secs": secs, "fp8c": fp8c, "fp8a": fp8a}


def _evaluate(m: ModelFootprint, r: PlanRequest, hw: Hardware, ch: Choices, profile: str | None = None) -> Plan:
    e = _estimate(m, r, hw, ch)
    uv, ur = _usable(hw)
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


# ------------------------------------------------------------------------------ choosing
_TEXT_OPTIONS = (("gpu", "bf16"), ("stream", "bf16"), ("gpu", "int8"), ("stream", "int8"), ("cpu", "bf16"))


def _stage(m: ModelFootprint, r: PlanRequest, hw: Hardware, ch: Choices, stage: str) -> float:
    return _estimate(m, r, hw, ch)["vram"].get(stage, 0.0)


def _max_resident(m: ModelFootprint, r: PlanRequest, hw: Hardware, ch: Choices, usable: float) -> int:
    """Most blocks the denoise stage can keep on the GPU; -1 when even full streaming does not fit."""
    n = m.num_layers
    if _stage(m, r, hw, replace(ch, resident_blocks=n), "denoise") <= usable:
        return n
    base = _stage(m, r, hw, replace(ch, resident_blocks=0), "denoise")
    return -1 if base > usable else min(n - 1, int((usable - base) // m.block_bytes(ch.quantization)))


def _choose_for(m: ModelFootprint, r: PlanRequest, hw: Hardware, quant: str, forced: dict[str, Any]) -> Choices:
    """Greedy choices for one quantization: resident blocks first, then CFG batching, VAE, text
    encoder, keeping the DiT on the GPU, and what RAM allows (idle expert, kept encoder, pinning)."""
    uv, ur = _usable(hw)
    n = m.num_layers

    def fix(ch: Choices) -> Choices:  # forced fields win, then what the request and n allow
        ch = replace(ch, **forced)
        if not r.cfg or r.cfg_batch is False:
            ch = replace(ch, cfg_batch=False)
        return replace(ch, keep_resident=False) if ch.resident_blocks < n else ch

    def ram_ok(ch: Choices) -> bool:
        return _estimate(m, r, hw, ch)["ram"] <= ur

    ch = fix(Choices(quantization=quant, idle_expert="disk" if m.experts > 1 else "none",
                     ffn_chunk_tokens=default_chunk(m, _Geo.of(m, r)), pinned=False))
    if not hw.has_gpu:
        ch = fix(replace(ch, resident_blocks=n, prefetch=0, text_encoder="cpu", vae_dtype="fp32"))
        if m.experts > 1 and "idle_expert" not in forced and ram_ok(replace(ch, idle_expert="ram")):
            ch = replace(ch, idle_expert="ram")
        return ch if ram_ok(ch) or "vae_dtype" in forced else replace(ch, vae_dtype="bf16")

    def pin(ch: Choices) -> Choices:  # streamed blocks wait in pinned RAM unless they would take too much
        if "pinned" in forced or ch.resident_blocks >= n:
            return ch
        streamed = (n - ch.resident_blocks) * m.block_bytes(ch.quantization)
        return replace(ch, pinned=streamed <= K.pin_fraction * hw.ram_available_gib * GIB)

    def denoise(ch: Choices, chunk: int | None, batch: bool) -> Choices | None:
        """The most resident blocks with `chunk` and CFG batching or not, then the idle expert on
        the GPU where it fits; None when the denoise stage does not fit even with every block streamed."""
        ch = replace(ch, ffn_chunk_tokens=chunk, cfg_batch=batch)
        best = _max_resident(m, r, hw, ch, uv)
        if best < 0:
            return None
        res = min(n, forced.get("resident_blocks", best))
        ch = fix(replace(ch, resident_blocks=res, prefetch=1 if res < n else 0))
        if m.experts > 1 and res == n and _stage(m, r, hw, replace(ch, idle_expert="gpu"), "denoise") <= uv:
            ch = fix(replace(ch, idle_expert="gpu"))
        return ch

    # The token chunk and CFG batching: the fastest denoise that fits (chunks cost time; resident
    # blocks save transfers, and so does a batch of 2, which streams each block once per step),
    # from the lowest-activation chunk unbatched on; forced ones are taken as given, a requested
    # batch where it fits.
    start = ch.ffn_chunk_tokens
    chunks = [start] if "ffn_chunk_tokens" in forced else [start] + [
        c for c in CHUNKS if c != start and (c is None or c < _Geo.of(m, r).tokens)]
    batches = ([forced["cfg_batch"]] if "cfg_batch" in forced else [False] if not r.cfg or r.cfg_batch is False
               else [True, False] if r.cfg_batch else [False, True])
    found, best_s = None, math.inf
    for batch in batches:
        for c in chunks:
            o = denoise(ch, c, batch)
            s = _estimate(m, r, hw, pin(o))["secs"]["denoise"] if o else math.inf
            if s < best_s * 0.999:
                found, best_s = o, s
        if found is not None and r.cfg_batch and batch:
            break  # batching was asked for, and it fits
    if found is None:  # nothing fits: the smallest activations, every block streamed
        c = start if "ffn_chunk_tokens" in forced else CHUNKS[-1]
        res = min(n, forced.get("resident_blocks", 0))
        found = fix(replace(ch, ffn_chunk_tokens=c, resident_blocks=res, prefetch=1 if res < n else 0,
                            cfg_batch=False))
    ch = found
    res = ch.resident_blocks

    def pick(ch: Choices) -> Choices:
        """VAE (untiled fp32 ... smallest tile) and text encoder options that fit their stages."""
        big = max(r.width, r.height)
        tiles = [t for t in K.vae_tiles if t < big]
        vaes = [("fp32", None), ("bf16", None)] + [("bf16", t) for t in tiles] + [("fp32", t) for t in tiles]
        vaes = [v for v in vaes if forced.get("vae_dtype", v[0]) == v[0] and forced.get("vae_tile", v[1]) == v[1]]
        for dtype, tile in vaes or [(ch.vae_dtype, ch.vae_tile)]:
            ch = fix(replace(ch, vae_dtype=dtype, vae_tile=tile))
            if max(_stage(m, r, hw, ch, "decode"), _stage(m, r, hw, ch, "encode")) <= uv:
                break
        texts = [t for t in _TEXT_OPTIONS if forced.get("text_encoder", t[0]) == t[0]
                 and forced.get("text_encoder_quant", t[1]) == t[1]]
        options = [fix(replace(ch, text_encoder=te, text_encoder_quant=tq)) for te, tq in texts] or [ch]
        fit = [o for o in options if _stage(m, r, hw, o, "text") <= uv] or options[-1:]
        return next((o for o in fit if ram_ok(o)), min(fit, key=lambda o: _estimate(m, r, hw, o)["ram"]))

    ch = pick(replace(ch, keep_resident=False))
    if res == n and forced.get("keep_resident", True):
        stages = ("text", "encode", "decode")
        kept = replace(ch, keep_resident=True)
        if all(_stage(m, r, hw, kept, s) <= uv for s in stages):
            ch = kept  # the other stages fit beside the DiT: no RAM copy, no re-upload
        elif not ram_ok(ch):
            kept = pick(kept)
            if all(_stage(m, r, hw, kept, s) <= uv for s in stages) and ram_ok(kept):
                ch = kept
    if not ram_ok(ch) and "vae_dtype" not in forced and ch.vae_dtype == "fp32":
        ch = replace(ch, vae_dtype="bf16")
    if m.experts > 1 and ch.idle_expert == "disk" and "idle_expert" not in forced:
        if ram_ok(replace(ch, idle_expert="ram")):
            ch = replace(ch, idle_expert="ram")
    if "keep_text_encoder" not in forced and ram_ok(replace(ch, keep_text_encoder=True)):
        ch = replace(ch, keep_text_encoder=True)
    return pin(ch)


def _plan(m: ModelFootprint, r: PlanRequest, hw: Hardware, forced: dict[str, Any], profile: str | None) -> Plan:
    fast = "fp8" if hw.fp8_tensor_cores else "int8"
    order = [forced["quantization"]] if "quantization" in forced else ["bf16", fast]
    plans = [_evaluate(m, r, hw, _choose_for(m, r, hw, q, forced), profile) for q in order]
    fitting = [p for p in plans if p.fits]
    if not fitting:
        return plans[-1]
    # quality first: bf16 unless it is much slower than the quantized plan
    if len(fitting) > 1 and fitting[0].seconds_estimate > K.bf16_slack * fitting[1].seconds_estimate:
        return fitting[1]
    return fitting[0]


def plan(model: ModelFootprint, request: Any, hw: Hardware, profile: str | MemoryProfile | None = None) -> Plan:
    """The plan for `request` ((width, height, frames[, cfg_batch]) or a PlanRequest) on `hw`.

    profile: a memory profile (name or object; None / "auto": plan for `hw` as it is) whose
    hardware caps `hw` and whose forced fields are taken as given. Pure: no probing, no torch.
    """
    r = PlanRequest.of(request)
    prof = get_profile(profile) if profile is None or isinstance(profile, str) else profile
    if prof is not None:
        hw = prof.apply(hw)
    forced = prof.forced if prof else {}
    p = _plan(model, r, hw, forced, prof.name if prof else None)
    if not p.fits:
        p = replace(p, reason=_reason(p, model, r, hw, forced))
    log.debug("plan: %s", p.summary())
    return p


def _reason(p: Plan, m: ModelFootprint, r: PlanRequest, hw: Hardware, forced: dict[str, Any]) -> str:
    """Why `p` does not fit, in numbers, and what would make it fit."""
    need, fixes = [], []
    if p.peak_vram_gib > p.usable_vram_gib:
        stages = dict(p.stage_vram_gib)
        need.append(f"needs {p.peak_vram_gib:.1f} GiB of GPU memory ({max(stages, key=stages.get)}), "
                    f"this GPU has {p.usable_vram_gib:.1f} GiB usable ({hw.vram_free_gib:.1f} of "
                    f"{hw.vram_total_gib:.1f} GiB free)")
        if hw.vram_free_gib < hw.vram_total_gib - 1.0:
            fixes.append("close other programs using the GPU")
    if p.peak_ram_gib > p.usable_ram_gib:
        need.append(f"needs {p.peak_ram_gib:.1f} GiB RAM, this machine has {p.usable_ram_gib:.1f} GiB usable "
                    f"({hw.ram_available_gib:.1f} of {hw.ram_total_gib:.1f} GiB available)")
        if hw.ram_available_gib < hw.ram_total_gib - max(3.0, 0.2 * hw.ram_total_gib):
            fixes.append("close other programs")
    if forced and _plan(m, r, hw, {}, None).fits:
        fixes.append("choose the Auto memory profile" + (
            f" (int8/fp8 instead of {forced['quantization']})" if forced.get("quantization") == "bf16" else ""))
    area = r.width * r.height
    for w, h in sorted(m.sizes, key=lambda s: -s[0] * s[1]):
        if w * h < area and _plan(m, replace(r, width=w, height=h), hw, forced, None).fits:
            fixes.append(f"a smaller size ({w}x{h} fits)")
            break
    lo, hi = 0, (r.frames - 2) // 4  # frame counts 4k+1 below the request
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _plan(m, replace(r, frames=4 * mid + 1), hw, forced, None).fits:
            lo = mid
        else:
            hi = mid - 1
    if r.frames > 1 and _plan(m, replace(r, frames=4 * lo + 1), hw, forced, None).fits:
        fixes.append(f"fewer frames ({4 * lo + 1} fit at {r.width}x{r.height})")
    if not any(f.startswith(("a smaller", "fewer", "choose")) for f in fixes):
        more = [w for w, short in (("a GPU with more memory", p.peak_vram_gib > p.usable_vram_gib),
                                   ("more RAM", p.peak_ram_gib > p.usable_ram_gib)) if short]
        fixes.append(" and ".join(more))
    tail = fixes[0] if len(fixes) == 1 else ", ".join(fixes[:-1]) + " or " + fixes[-1]
    return "; ".join(need) + ": " + tail + "."


# ------------------------------------------------------------------------------ after an OOM
def _moves(p: Plan, hw: Hardware, stage: str) -> list[Choices]:
    """Leaner variants of `p` for `stage`, cheapest first."""
    ch, out = p.choices, list[Choices]()
    if stage != "denoise" and ch.keep_resident:
        out.append(replace(ch, keep_resident=False))
    if stage == "denoise":
        if ch.cfg_batch:
            out.append(replace(ch, cfg_batch=False))
        if ch.idle_expert == "gpu":
            out.append(replace(ch, idle_expert="ram", keep_resident=False))
        # smaller token chunks (a few % slower) before streaming more blocks
        tokens = _Geo.of(p.model, p.request).tokens if p.model and p.request else 1 << 30
        smaller = [c for c in CHUNKS[1:] if c < min(ch.ffn_chunk_tokens or tokens, tokens)]
        if smaller:
            out.append(replace(ch, ffn_chunk_tokens=smaller[0]))
        step = max(1, math.ceil(ch.resident_blocks / 4))
        out += [replace(ch, resident_blocks=k, prefetch=max(1, ch.prefetch), keep_resident=False)
                for k in range(ch.resident_blocks - step, -1, -step)]
        if ch.quantization == "bf16":
            out.append(replace(ch, quantization="fp8" if hw.fp8_tensor_cores else "int8"))
        if ch.prefetch > 1:
            out.append(replace(ch, prefetch=ch.prefetch - 1))
    elif stage in ("decode", "encode"):
        if ch.vae_dtype == "fp32":
            out.append(replace(ch, vae_dtype="bf16"))
        # every smaller tile: neighbours in K.vae_tiles can cut the frame into the same tiles
        out += [replace(ch, vae_tile=t) for t in K.vae_tiles if t < (ch.vae_tile or 1 << 30)]
    elif stage == "text":
        for te, tq in _TEXT_OPTIONS[_TEXT_OPTIONS.index((ch.text_encoder, ch.text_encoder_quant)) + 1:]:
            out.append(replace(ch, text_encoder=te, text_encoder_quant=tq))
    return out


def leaner(p: Plan, stage: str | None = None) -> Plan | None:
    """The next plan to drop to after an out-of-memory error: for `stage` ("denoise", "decode",
    "encode", "text") a plan whose peak there is strictly lower; for None one whose overall peak
    is strictly lower. None when nothing leaner exists."""
    if p.model is None or p.request is None or p.hardware is None or not p.hardware.has_gpu:
        return None
    m, r, hw, cur = p.model, p.request, p.hardware, p

    def settle(ch: Choices) -> Choices:  # blocks newly streamed: pin them if RAM allows
        if p.resident_blocks >= m.num_layers > ch.resident_blocks:
            streamed = (m.num_layers - ch.resident_blocks) * m.block_bytes(ch.quantization)
            ch = replace(ch, pinned=streamed <= K.pin_fraction * hw.ram_available_gib * GIB)
        if ch.idle_expert == "ram" and _estimate(m, r, hw, ch)["ram"] > _usable(hw)[1]:
            ch = replace(ch, idle_expert="disk")
        return ch

    for _ in range(4 * len(_CHOICE_FIELDS)):
        stages = dict(cur.stage_vram_gib)
        target = stage or max(stages, key=lambda s: stages[s])
        nxt = next((q for q in (_evaluate(m, r, hw, settle(c), p.profile) for c in _moves(cur, hw, target))
                    if dict(q.stage_vram_gib).get(target, 0.0) < stages.get(target, 0.0)
                    and (q.peak_ram_gib <= max(q.usable_ram_gib, cur.peak_ram_gib))), None)
        if nxt is None:
            return None
        if stage is not None or nxt.peak_vram_gib < p.peak_vram_gib:
            return nxt if nxt.fits else replace(nxt, reason=_reason(nxt, m, r, hw, {}))
        cur = nxt
    return None
