"""Tiled VAE decode and encode: spatial tiles with overlap and smooth blending, OOM retry.

A Wan VAE decodes a video one latent frame at a time, carrying a feature cache through time, and
its peak memory grows with the frame's area. Here the latent is cut into overlapping spatial
tiles; each tile is decoded over ALL latent frames with its own cache (the causal chunking kept
exactly), and every latent frame's pixels are blended straight into a preallocated output, which
may live in CPU memory: the GPU holds one tile's activations and one latent frame's output only.
While tiling, the decoder's full-resolution levels run one frame at a time (`Decoder3d.frame_chunk`,
exact): its causal caches are then most of a tile's memory.

Two things make tiles match the untiled decode closely (tests: tiny random VAEs, both versions):
- Global attention. The decoder's `middle` (ResidualBlock, per-frame spatial self-attention over
  the whole frame, ResidualBlock) runs at latent resolution, where it is cheap. It is computed
  once over the whole latent, with conv1 before it and the first upsampling level after it
  (`Decoder3d.low_res`, kept in CPU memory), and each tile runs the rest of the decoder
  (`Decoder3d.upsample` from `low_res_end`) from its crop: otherwise every tile would attend over
  itself only and differ everywhere, not just near its border. (Running the first level once
  also saves time: in tiles its small convolutions took 3x their untiled time on an H200, and
  the overlap made them redundant work.) The encoder's attention is at its end: tiles run
  the encoder up to `middle[0]` (captured by a hook), those features are blended, and the rest of
  the encoder (attention, ResidualBlock, head) runs once over the whole latent.
- Blending. Along each axis a tile's weight is 0 in the outer quarter of each overlap (the part
  most affected by the tile's zero padding), rises along a cosine ramp across the middle half and
  is 1 inside; the ramps of neighbours are mirror images, so weights sum to 1 everywhere and no
  step is left at a border. Tiles are equal-sized (at most `tile`), spread so that neighbours
  overlap by at least `overlap`.

Units: `tiled_decode`, `decode_with_retry` and `vae_memory.choose_tile` take tiles in latent pixels;
`tiled_encode`, `make_decode_fn` and `make_encode_fn` in video pixels (as `Plan.vae_tile`),
converted with the VAE's spatial stride (8 for Wan 2.1, 16 for Wan 2.2).
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from wan_lite.api import CancelToken
from wan_lite.errors import Cancelled, InputError
from wan_lite.errors import OutOfMemoryError as WanOutOfMemoryError
from wan_lite.models.vae_common import FeatureCache
from wan_lite.runtime.host_copies import HostSink, to_device, to_host
from wan_lite.runtime.vae_frames import FrameAssembly, video_to_frames
from wan_lite.runtime.vae_memory import (
    DEFAULT_FRAME_CHUNK,
    DEFAULT_OVERLAP_PX,
    MIN_TILE,
    choose_decode,
    free_device_bytes,
    global_levels,
    idle_parts,
    lean_needed,
    on_gpu,
    tile_spans,
    vae_part,
)

log = logging.getLogger(__name__)

DEAD_FRACTION = 0.25  # of each overlap, per side, where the tile whose edge it is gets weight 0

VAEFn = Callable[[Any, torch.Tensor], torch.Tensor]  # the pipeline's decode_fn / encode_fn


# ---------------------------------------------------------------------------------------- layout
def blend_weights(spans: list[tuple[int, int]], scale: int) -> list[torch.Tensor]:
    """Per span, float32 weights [(stop - start) * scale] over its pixels in units of `1/scale`
    span units (scale = VAE stride for decoded pixels, 1 for latents). They sum to 1 at every
    pixel: cosine ramps across the middle of each overlap (see DEAD_FRACTION), mirrored between
    neighbours."""
    size = spans[-1][1] * scale
    centers = torch.arange(size, dtype=torch.float64) + 0.5
    raw = []
    for i, (a, b) in enumerate(spans):
        w = torch.zeros(size, dtype=torch.float64)
        w[a * scale : b * scale] = 1.0
        sides = []
        if i > 0:
            sides.append((a, spans[i - 1][1], True))
        if i + 1 < len(spans):
            sides.append((spans[i + 1][0], b, False))
        for lo, hi, rising in sides:
            dead = DEAD_FRACTION * (hi - lo) * scale
            r0, r1 = lo * scale + dead, hi * scale - dead
            t = ((centers - r0) / (r1 - r0)).clamp(0.0, 1.0)
            ramp = 0.5 - 0.5 * torch.cos(math.pi * t)
            w *= ramp if rising else 1.0 - ramp
        raw.append(w)
    total = torch.stack(raw).sum(0)
    return [(w / total)[a * scale : b * scale].float() for w, (a, b) in zip(raw, spans, strict=True)]


def _support(w: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) of the nonzero weights (pixels a tile actually contributes)."""
    nz = torch.nonzero(w).flatten()
    return int(nz[0]), int(nz[-1]) + 1


def _check_tiles(tile: int, overlap: int) -> None:
    if not isinstance(tile, int) or tile < 1 or overlap < 0:
        raise InputError(
            f"VAE tiles must be a positive whole number of latent pixels with overlap >= 0; "
            f"got tile {tile!r}, overlap {overlap!r}.",
            "Use a tile such as 32 (latent px) and an overlap such as 4, or no tiling.",
        )


# -------------------------------------------------------------------------------- the VAE's parts
def _device_of(vae: Any, fallback: torch.device) -> torch.device:
    """Where the VAE's weights are (`fallback` for a VAE without parameters)."""
    params = getattr(vae, "parameters", None)
    p = next(iter(params()), None) if params is not None else None
    return p.device if p is not None else fallback


def _module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _move(module: nn.Module, device: torch.device | str) -> None:
    # Outside inference mode: moved there, the parameters would come back as inference tensors,
    # which later in-place updates (a weight reload) outside inference mode may not touch.
    with torch.inference_mode(False):
        if torch.device(device).type == "cpu":
            module._apply(to_host)
        else:
            module.to(device, non_blocking=True)


_PARKED = "_wan_lite_parked"  # attribute of a VAE: [(module, device)] still waiting in CPU memory


def restore_parked(vae: Any, *, strict: bool = True) -> None:
    """Move back the decoder weights an interrupted tiled decode left in CPU memory (see
    `_idle_on_host`). strict=False: on an out-of-memory error leave the rest parked (the caller
    is already handling one) instead of raising."""
    parked = getattr(vae, _PARKED, None) or []
    while parked:
        module, device = parked[0]
        try:
            _move(module, device)
        except torch.OutOfMemoryError:
            if strict:
                raise
            log.info("VAE decoder weights stay in CPU memory until the next decode (GPU memory is full)")
            return
        parked.pop(0)


@contextmanager
def _idle_on_host(vae: Any, lean: bool = False) -> Iterator[None]:
    """While active, the weights of the global pass's part of the decoder (`idle_parts`) live in
    CPU memory (a CUDA VAE only): the tiles have their GPU memory. They come back exactly as they were afterwards; when a tile
    ran out of memory and moving them back does too, they stay parked until the next decode
    (`restore_parked`, called by `tiled_decode` and `decode_with_retry`) once memory is freed."""
    restore_parked(vae)
    parts = [m for m in idle_parts(vae, lean) if all(on_gpu(p) for p in m.parameters())]
    devices = [_module_device(m) for m in parts]
    for m in parts:
        _move(m, "cpu")
    try:
        yield
    finally:
        setattr(vae, _PARKED, list(zip(parts, devices, strict=True)))
        restore_parked(vae, strict=False)


def _latent_stats(vae: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1/std) float32 [1, z, 1, 1, 1], as WanVAEBase computes them."""
    mean = torch.tensor(vae.latent_mean, dtype=torch.float32, device=device)
    inv_std = 1.0 / torch.tensor(vae.latent_std, dtype=torch.float32, device=device)
    return mean.view(1, -1, 1, 1, 1), inv_std.view(1, -1, 1, 1, 1)


@torch.no_grad()
def decoder_low_res(vae: Any, latent: torch.Tensor, lean: bool = False) -> list[torch.Tensor]:
    """The decoder's `low_res` part (conv1, middle, the first upsampling level; `lean`: conv1 and
    middle) over the whole latent [1, z, T, h, w]: per latent frame, its output [1, C, 1 or 2, 2h,
    2w] ([1, C, 1, h, w] when lean) in the VAE dtype and activation layout, in (pageable) CPU
    memory. Mirrors the start of WanVAEBase._decode_one: decoder_input, then one cache through the
    latent frames. Wan 2.2 at 1280x704, 121 frames: 1.76 GB in bf16. From a GPU each frame goes
    out through pinned staging while the next one is computed (`HostSink`): pinning all of it
    would lock that much RAM (torch's pinned allocator keeps what it pinned) or cost its pinning
    at every decode."""
    x = vae.decoder_input(latent)
    cache, out, sink = FeatureCache(), [], HostSink()
    levels = global_levels(vae, lean)
    for i in range(x.shape[2]):
        y = vae.decoder.low_res(x[:, :, i : i + 1], cache, levels)
        cache.first_chunk = False
        if y.device.type == "cpu":
            out.append(y)
            continue
        out.append(torch.empty_like(y, device="cpu"))
        sink.add(out[-1], y, accumulate=False)
    sink.flush()
    return out


@contextmanager
def _frame_chunk(vae: Any, frames: int | None) -> Iterator[None]:
    """While active, the VAE decodes its upsampling levels `frames` frames at a time."""
    old = vae.decode_frame_chunk
    vae.decode_frame_chunk = frames
    try:
        yield
    finally:
        vae.decode_frame_chunk = old


def _decode_tile(vae: Any, low: list[torch.Tensor], start: int, scale: int, box: tuple[int, int, int, int],
                 weight: torch.Tensor, support: tuple[int, int, int, int],
                 device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
    """Decode one tile latent frame by latent frame from its crops of the global `low`
    (`decoder_low_res`, CPU; `scale` of its pixels per latent px), the decoder from
    `upsamples[start]` on; yields (first video frame,
    weighted frames [1, 3, n, y1-y0, x1-x0] float32 on `device`) for the pixels of `support`
    (y0, y1, x0, x1) with `weight` [y1-y0, x1-x0] on `device`. Only one latent frame's
    activations and output frames are on the device at a time."""
    h0, h1, w0, w1 = box
    y0, y1, x0, x1 = support
    s = vae.stride[1]
    cache, done = FeatureCache(), 0
    for feats in low:
        crop = to_device(feats[..., h0 * scale : h1 * scale, w0 * scale : w1 * scale], device, vae.activation_layout)
        y = vae.decoder.upsample(crop, cache, start)
        del crop
        cache.first_chunk = False
        frames = torch.empty((1, 3, y.shape[2], (h1 - h0) * s, (w1 - w0) * s), device=device)
        vae.write_frames(frames, y)
        yield done, frames[..., y0:y1, x0:x1] * weight
        done += frames.shape[2]


# ----------------------------------------------------------------------------------- tiled decode
@torch.no_grad()
def tiled_decode(vae: Any, latent: torch.Tensor, tile: int, overlap: int | None = None,
                 out_device: torch.device | str | None = None,
                 frame_chunk: int | None = DEFAULT_FRAME_CHUNK, lean: bool | None = None,
                 frames: bool = False) -> torch.Tensor:
    """Normalised latent [B, z, T, h, w] -> video [B, 3, 1+4(T-1), h*s, w*s] float32 in [-1, 1]
    on `out_device` (default: the latent's), decoded in spatial tiles of at most `tile` x `tile`
    latent px overlapping by >= `overlap` latent px (default DEFAULT_OVERLAP_PX / stride), the
    decoder's full-resolution levels `frame_chunk` frames at a time (`Decoder3d.frame_chunk`).
    `frames` True: the uint8 frames [B, F, H, W, 3] on the CPU instead, the same as `to_uint8` of
    that video, made without it (`vae_frames.FrameAssembly`: a fifth of its RAM).

    A tile at least the latent's size decodes untiled (exactly `vae.decode`). Otherwise the
    decoder's low-resolution part (conv1, middle with its attention, the first upsampling level)
    runs once over the whole latent into CPU memory, each tile runs the rest of the decoder from
    its crop, and every latent frame's weighted pixels go straight into the output: with
    `out_device` "cpu" and a CUDA latent they are copied out asynchronously and added on the CPU
    while the GPU decodes the next frame, so the device never holds a tile's video. While the
    tiles run, the weights of that low-resolution part wait in CPU memory (`idle_decoder_bytes`
    says how much GPU memory that frees). `lean` True: the global pass stops after the middle,
    for less memory (Wan 2.2 at 720p: 0.12 instead of 0.29 GiB), the tiles run the first level;
    None: lean only on a GPU whose free memory is short of the full global pass.
    """
    s = vae.stride[1]
    overlap = DEFAULT_OVERLAP_PX // s if overlap is None else overlap
    _check_tiles(tile, overlap)
    restore_parked(vae)  # weights an interrupted tiled decode left in CPU memory
    b, _, t, h, w = latent.shape
    out_device = torch.device(out_device) if out_device is not None else latent.device
    spans_h, spans_w = tile_spans(h, tile, overlap), tile_spans(w, tile, overlap)
    if len(spans_h) == len(spans_w) == 1:
        video = vae.decode(latent)
        return _as_frames(video) if frames else video.to(out_device)
    if lean is None:
        lean = lean_needed(vae, tuple(latent.shape), free_device_bytes(latent.device), vae.dtype)
    log.info("VAE decode in %d x %d tiles of %d x %d latent px (overlap >= %d, frame chunk %s%s)",
             len(spans_h), len(spans_w), spans_h[0][1] - spans_h[0][0], spans_w[0][1] - spans_w[0][0],
             min(overlap, tile // 2), frame_chunk, ", lean global pass" if lean else "")
    weights_h, weights_w = blend_weights(spans_h, s), blend_weights(spans_w, s)
    size = (1 + vae.stride[0] * (t - 1), h * s, w * s)
    sink = HostSink()
    if frames:  # each tile row's / column's pixels with nonzero weight
        rows, cols = ([(a * s + lo, a * s + hi) for (a, _b), (lo, hi) in zip(spans, map(_support, weights), strict=True)]
                      for spans, weights in ((spans_h, weights_h), (spans_w, weights_w)))
        results = []
    else:
        out = torch.zeros((b, 3, *size), dtype=torch.float32, device=out_device)
    with _frame_chunk(vae, frame_chunk):
        for i in range(b):
            if frames:
                assembly = FrameAssembly(*size, rows, cols)

                def emit(f: int, r: slice, c: slice, part: torch.Tensor, asm: FrameAssembly = assembly) -> None:
                    sink.put(part, lambda p: asm.add(f, r, c, p))
            else:
                def emit(f: int, r: slice, c: slice, part: torch.Tensor, i: int = i) -> None:
                    sink.add(out[i : i + 1, :, f : f + part.shape[2], r, c], part)
            low = decoder_low_res(vae, latent[i : i + 1], lean)
            scale = low[0].shape[-1] // w
            with _idle_on_host(vae, lean):
                _decode_tiles(vae, low, global_levels(vae, lean), scale, spans_h, spans_w, weights_h, weights_w,
                              latent.device, emit)
            del low
            if frames:
                sink.flush()
                results.append(assembly.frames())
    sink.flush()
    if frames:
        return torch.stack(results)
    return out.clamp_(-1.0, 1.0)  # weights sum to 1 only up to float rounding


def _as_frames(video: torch.Tensor) -> torch.Tensor:
    """Video [B, 3, F, H, W] (wherever it is) -> uint8 frames [B, F, H, W, 3] on the CPU."""
    return torch.stack([torch.from_numpy(video_to_frames(v)) for v in video])


def _decode_tiles(vae: Any, low: list[torch.Tensor], start: int, scale: int, spans_h: list[tuple[int, int]],
                  spans_w: list[tuple[int, int]],
                  weights_h: list[torch.Tensor], weights_w: list[torch.Tensor], device: torch.device,
                  emit: Callable[[int, slice, slice, torch.Tensor], None]) -> None:
    """Every tile of one sample, each latent frame's weighted pixels [1, 3, n, y, x] given to
    emit(first video frame, pixel rows, pixel columns, part)."""
    s = vae.stride[1]
    for (h0, h1), wh in zip(spans_h, weights_h, strict=True):
        for (w0, w1), ww in zip(spans_w, weights_w, strict=True):
            # only the pixels with nonzero weight are weighted and moved
            y0, y1 = _support(wh)
            x0, x1 = _support(ww)
            weight = (wh[y0:y1, None] * ww[None, x0:x1]).to(device)
            rows = slice(h0 * s + y0, h0 * s + y1)
            cols = slice(w0 * s + x0, w0 * s + x1)
            for f, part in _decode_tile(vae, low, start, scale, (h0, h1, w0, w1), weight, (y0, y1, x0, x1),
                                        device):
                emit(f, rows, cols, part)


# ----------------------------------------------------------------------------------- tiled encode
@torch.no_grad()
def tiled_encode(vae: Any, video: torch.Tensor, tile_px: int, overlap_px: int = DEFAULT_OVERLAP_PX,
                 out_device: torch.device | str | None = None) -> torch.Tensor:
    """Video [B, 3, F, H, W] in [-1, 1] -> normalised latent [B, z, 1+(F-1)//4, H/s, W/s] float32 on
    `out_device` (default: the VAE's device), encoded in spatial tiles of at most `tile_px` x
    `tile_px` pixels overlapping by >= `overlap_px` (both rounded down to the stride s).

    The video may stay in CPU memory: each tile's crop is moved to the VAE's device. Tiles run the
    encoder up to its middle attention; their features are blended and the attention and head run
    once over the whole frame (see the module docstring). One tile: exactly `vae.encode`.
    """
    s = vae.stride[1]
    tile, overlap = tile_px // s, overlap_px // s
    _check_tiles(tile, overlap)
    device = _device_of(vae, video.device)
    out_device = torch.device(out_device) if out_device is not None else device
    b, c, f, h_px, w_px = video.shape if video.dim() == 5 else (0,) * 5
    h, w = h_px // s, w_px // s
    spans_h, spans_w = tile_spans(h, tile, overlap), tile_spans(w, tile, overlap)
    if len(spans_h) == len(spans_w) == 1 or h_px % s or w_px % s or c != 3:
        return vae.encode(video.to(device)).to(out_device)  # (the VAE reports bad shapes)
    if vae_part(vae, "encoder", "middle") is None:
        raise InputError("Tiled encoding needs a Wan VAE (encoder.middle).", "Encode without tiles.")
    log.info("VAE encode in %d x %d tiles of %d x %d latent px", len(spans_h), len(spans_w),
             spans_h[0][1] - spans_h[0][0], spans_w[0][1] - spans_w[0][0])
    weights_h, weights_w = blend_weights(spans_h, 1), blend_weights(spans_w, 1)
    latents = []
    for i in range(b):
        feats = torch.empty(0)  # blended encoder features before the attention, CPU fp32
        for (h0, h1), wh in zip(spans_h, weights_h, strict=True):
            for (w0, w1), ww in zip(spans_w, weights_w, strict=True):
                crop = video[i : i + 1, :, :, h0 * s : h1 * s, w0 * s : w1 * s].to(device)
                part = _encoder_features(vae, crop, wh[:, None] * ww[None, :])
                if feats.numel() == 0:
                    feats = torch.zeros((1, part.shape[1], part.shape[2], h, w), dtype=torch.float32)
                feats[:, :, :, h0:h1, w0:w1].add_(part)
        latents.append(_encoder_tail(vae, feats, device).to(out_device))
    return torch.cat(latents)


def _encoder_features(vae: Any, crop: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`weight` [h, w] x the encoder's `middle[0]` output of every chunk of `crop` [1, 3, F, H, W]
    -> [1, C, T, h, w] float32 on the CPU, captured by a hook while `vae.encode` runs (the tile's
    own latent, made with tile-local attention, is not used)."""
    weight = weight.to(crop.device)
    chunks: list[torch.Tensor] = []

    def capture(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        chunks.append((out.float() * weight).cpu())

    handle = vae.encoder.middle[0].register_forward_hook(capture)
    try:
        vae.encode(crop)
    finally:
        handle.remove()
    return torch.cat(chunks, dim=2)


def _encoder_tail(vae: Any, feats: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rest of the encoder over the whole latent from the blended `middle[0]` features [1, C, T, h, w]:
    attention, ResidualBlock and head per chunk with one cache, then conv1, mean and normalisation
    (mirrors Encoder3d.forward and WanVAEBase._encode_one)."""
    enc, cache, outs = vae.encoder, FeatureCache(), []
    for t in range(feats.shape[2]):
        x = feats[:, :, t : t + 1].to(device, vae.dtype).contiguous(memory_format=vae.activation_layout)
        for layer in list(enc.middle)[1:]:
            x = layer(x, cache)
        outs.append(enc.head(x, cache))
        cache.first_chunk = False
    mu = vae.conv1(torch.cat(outs, dim=2))[:, : vae.z_dim].float()
    mean, inv_std = _latent_stats(vae, mu.device)
    return (mu - mean) * inv_std


# ------------------------------------------------------------------------------------ cancel
def decoder_stops(vae: Any) -> list[nn.Module]:
    """The decoder's parts a decode calls once per latent frame or chunk, in every way it runs
    (untiled, the global low-resolution pass, each tile): conv1, middle, each upsampling level and
    the head; the whole VAE when it has no such decoder."""
    decoder = getattr(vae, "decoder", None)
    if not isinstance(decoder, nn.Module):
        return [vae] if isinstance(vae, nn.Module) else []
    levels = getattr(decoder, "upsamples", None)
    return [*decoder.children(), *(levels.children() if isinstance(levels, nn.Module) else ())]


@contextmanager
def cancel_checks(vae: Any, cancel: CancelToken | None) -> Iterator[None]:
    """While active, a decode of `vae` raises wan_lite.errors.Cancelled at the next part of the
    decoder (`decoder_stops`) once `cancel` is set: between latent frames, frame chunks and
    tiles, so a Cancel during a minutes-long decode answers within one part's time. Attached from
    outside as forward pre-hooks (the model holds no flag); a tiled decode's own `finally`s put
    its parked weights and frame chunk back as it unwinds."""
    if cancel is None:
        yield
        return

    def check(module: nn.Module, args: Any) -> None:
        if cancel.cancelled:
            raise Cancelled()

    handles = [m.register_forward_pre_hook(check) for m in decoder_stops(vae)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------------ OOM retry
def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _retry_tiles(run: Callable[[int | None], torch.Tensor], tile: int | None, size: int, min_tile: int,
                 device: torch.device, what: str, hint: str) -> torch.Tensor:
    """run(tile); after torch.OutOfMemoryError, run(tile / 2) (untiled first: half the largest
    side) until below `min_tile`, then wan_lite.errors.OutOfMemoryError."""
    while True:
        try:
            return run(tile)
        except torch.OutOfMemoryError as err:
            failed = str(err).splitlines()[0] if str(err) else "out of memory"
        # Outside the except block: the exception and its frames (holding the failed tile's
        # tensors) are gone, so emptying the cache really returns that memory.
        _release_memory(device)
        smaller = size // 2 if tile is None or tile >= size else tile // 2
        if smaller < min_tile:
            tried = "untiled" if tile is None else f"in tiles of {tile} latent px"
            raise WanOutOfMemoryError(f"VAE {what} ran out of GPU memory, last {tried} ({failed}).", hint)
        log.warning("VAE %s out of memory with %s; retrying with %d latent px tiles", what,
                    "no tiles" if tile is None else f"{tile} latent px tiles", smaller)
        tile = smaller


def decode_with_retry(vae: Any, latent: torch.Tensor, tile: int | None = None, *, overlap: int | None = None,
                      out_device: torch.device | str | None = None, min_tile: int = MIN_TILE,
                      frame_chunk: int | None = DEFAULT_FRAME_CHUNK, lean: bool | None = None,
                      frames: bool = False) -> torch.Tensor:
    """`tiled_decode` into `out_device` (or `vae.decode` with tile None: its video stays on the
    device it was made on, where the plan counted it, so the caller moves only what it needs);
    `frames`: uint8 frames on the CPU instead (made where the video is); on a CUDA out-of-memory
    error, again with half the tile, 1-frame chunks and the lean global pass, down to `min_tile`
    latent px; then wan_lite.errors.OutOfMemoryError."""
    first = [True]

    def run(t: int | None) -> torch.Tensor:
        restore_parked(vae)  # weights an interrupted tiled decode left in CPU memory
        chunk, lean_now = (frame_chunk, lean) if first[0] else (1, True)
        first[0] = False
        if t is None:
            video = vae.decode(latent)
            return _as_frames(video) if frames else video
        return tiled_decode(vae, latent, t, overlap, out_device, frame_chunk=chunk, lean=lean_now, frames=frames)

    hint = ("The latents were saved first: free GPU memory (close other programs using the GPU) and "
            "re-decode them with `python -m wan_lite decode <file>.latents.safetensors`, "
            "or add `--device cpu` to decode on the CPU (slow).")
    return _retry_tiles(run, tile, max(latent.shape[3:]), min_tile, latent.device, "decode", hint)


class DecodeFn:
    """A `WanPipeline.decode_fn`: `(vae, latent [B, z, T, h, w]) -> video` decoding in tiles of
    `tile_px` output pixels (as `Plan.vae_tile`; None: untiled, "auto": the fastest tiles that
    fit the free memory at call time, `choose_decode`), retrying smaller tiles after an
    out-of-memory error; `.frames(vae, latent)` -> the uint8 frames [B, F, H, W, 3] on the CPU,
    the same bytes without the float32 video in RAM (what the pipeline writes). On a GPU the
    frame chunk is chosen at call time too: the largest (fastest) whose estimate fits the free
    memory. `lean` True: a tiled decode's global pass stops after the middle (its output in RAM
    an eighth, Wan 2.2: the plan's `vae_lean` where RAM is short); None: decided by GPU memory."""

    def __init__(self, tile_px: int | str | None = None, overlap_px: int = DEFAULT_OVERLAP_PX,
                 out_device: torch.device | str | None = "cpu", lean: bool | None = None) -> None:
        self.tile_px, self.overlap_px, self.out_device, self.lean = tile_px, overlap_px, out_device, lean

    def __call__(self, vae: Any, latent: torch.Tensor) -> torch.Tensor:
        return self._decode(vae, latent, frames=False)

    def frames(self, vae: Any, latent: torch.Tensor) -> torch.Tensor:
        return self._decode(vae, latent, frames=True)

    def _decode(self, vae: Any, latent: torch.Tensor, frames: bool) -> torch.Tensor:
        s = vae.stride[1]
        overlap = self.overlap_px // s
        out_dev = torch.device(self.out_device) if self.out_device is not None else latent.device
        tile_px = self.tile_px
        tile = None if tile_px in (None, "auto") else max(1, int(tile_px) // s)
        chunk = DEFAULT_FRAME_CHUNK
        free = free_device_bytes(latent.device)
        if free is not None and (tile_px == "auto" or tile is not None):
            tile, chunk = choose_decode(vae, tuple(latent.shape), free, vae.dtype, overlap=overlap,
                                        out_on_device=out_dev == latent.device and not frames, tile=tile)
            log.info("VAE decode: %s (%.2f GiB free on the GPU)", "untiled" if tile is None else
                     f"tiles of {tile} latent px, frame chunk {chunk or 'whole'}", free / 2**30)
        return decode_with_retry(vae, latent, tile, overlap=overlap, out_device=out_dev, frame_chunk=chunk,
                                 lean=self.lean, frames=frames)


def make_decode_fn(tile_px: int | str | None = None, overlap_px: int = DEFAULT_OVERLAP_PX,
                   out_device: torch.device | str | None = "cpu", lean: bool | None = None) -> DecodeFn:
    """`DecodeFn(tile_px, overlap_px, out_device, lean)`."""
    return DecodeFn(tile_px, overlap_px, out_device, lean)


def make_encode_fn(tile_px: int | None = None, overlap_px: int = DEFAULT_OVERLAP_PX,
                   out_device: torch.device | str | None = None) -> VAEFn:
    """A `WanPipeline.encode_fn`: `(vae, video [B, 3, F, H, W]) -> latent` encoding in tiles of
    `tile_px` pixels (None: untiled), retrying smaller tiles after an out-of-memory error."""
    def encode_fn(vae: Any, video: torch.Tensor) -> torch.Tensor:
        s = vae.stride[1]
        device = _device_of(vae, video.device)
        out_dev = torch.device(out_device) if out_device is not None else device

        def run(t: int | None) -> torch.Tensor:
            if t is None:
                return vae.encode(video.to(device)).to(out_dev)
            return tiled_encode(vae, video, t * s, overlap_px, out_dev)

        tile = None if tile_px is None else max(1, int(tile_px) // s)
        hint = "Free GPU memory (close other programs using the GPU), or use a smaller video size."
        return _retry_tiles(run, tile, max(video.shape[3:]) // s, MIN_TILE, device, "encode", hint)

    return encode_fn
