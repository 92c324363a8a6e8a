"""Memory and time model of a VAE decode, tiled or not: the tile layout, the peak device bytes
of each pass, the free memory to fit them in, and the choice of tile and frame chunk.

`tiled_vae` runs what is chosen here; the planner (runtime/footprint.py, `K.vae_*`) keeps its own
torch-free copy of the figures, which tests hold equal. Tiles are in latent pixels.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_OVERLAP_PX = 64  # output pixels: 4 latent px for Wan 2.2, 8 for Wan 2.1 (diffusers uses 64 too)
MIN_TILE = 8  # latent px: below this, tiles are mostly overlap and OOM retry gives up
DEFAULT_FRAME_CHUNK = 1  # frames the decoder's full-resolution levels process at a time when tiling
# Memory model of one decode, bytes: activations of one latent frame through the decoder (causal
# caches included) per output pixel, per byte of the VAE dtype. From a trace of every allocation
# of a full-size decode on `meta` tensors (tests/test_tiled_vae.py::live_bytes), scaled by the
# ratio measured on an H200 for the untiled decode (7221 B/px bf16 measured, 7178 traced) + 1 %.
# Untiled / whole chunks (2.2 traced 3461 per dtype byte, 2.1 4105):
DECODE_PX_PER_BYTE = {"2.2": 3550.0, "2.1": 4200.0}
# With the full-resolution levels in frame chunks of 1 or 2 frames (2.2 traced 2666 / 2983; 2.1
# 3172 / 3553): the causal caches (2.2: ~1830 per byte, mostly the 2-frame caches of the last
# level's convs) then dominate, and they do not shrink with the chunk.
DECODE_PX_PER_BYTE_CHUNKED = {1: {"2.2": 2720.0, "2.1": 3220.0}, 2: {"2.2": 3030.0, "2.1": 3600.0}}
CHUNK_OUT_PX = 2 * 4 * 3 * 4  # a tiled latent frame's fp32 output frames and their weighted copy
# The global pass of a tiled decode (`decoder_low_res`: conv1, middle, the first upsampling level
# over the whole frame), per output pixel of the whole frame: traced on meta (2.2 169 per dtype
# byte, 2.1 223, the attention's score matrix left out: on CUDA, SDPA's memory-efficient kernel,
# the one for the VAE's head sizes of 384 and 1024, keeps none) + 5 %.
LOW_RES_PX_PER_BYTE = {"2.2": 180.0, "2.1": 235.0}
# The lean global pass (conv1 and middle only, `lean=True`), traced the same way (2.2 69, 2.1 103):
# where even the full one does not fit, and in retries after an out-of-memory error.
LEAN_PX_PER_BYTE = {"2.2": 75.0, "2.1": 110.0}
ENCODE_PX_PER_BYTE = {"2.2": 2150.0, "2.1": 4700.0}  # planner K.vae_encode_px / 2
FIXED_BYTES = 128 * 2**20  # cuDNN workspaces, allocator rounding (measured fit: 33 MB)
# Time model of a tiled decode relative to the untiled one, for choosing among what fits:
# (pixels decoded, overlaps counted twice) / frame pixels x FRAME_CHUNK_COST + TILE_COST per tile.
# Fitted to the H200 runs 2026-12-03-s and -t (Wan 2.2, 1280x704x121), all within -4 %..+6 %:
# tiles 2x3 of 24x30 (overlap 4) 1.35 / 1.43 / 1.53 for whole, 2- and 1-frame chunks (measured
# 1.33-1.35 / 1.39 / 1.50); 2x4 of 24x23 1.41 (1.47); 1x2 of 44x42 1.09 (1.10); overlap 2: 2x3
# of 23x28 1.22 (1.21-1.30), 2x2 of 23x41 1.15 (1.15-1.17).
FRAME_CHUNK_COST = {None: 1.0, 2: 1.07, 1: 1.15}
TILE_COST = 0.02
MARGIN = (256 * 2**20, 0.10)  # keep this much free: fixed bytes + a share of the estimate


# ---------------------------------------------------------------------------------------- layout
def tile_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Cut [0, size) into the fewest equal tiles of at most `tile` that overlap by >= `overlap`.

    One span when `tile >= size`. The overlap is capped at half the tile, so that only
    neighbours overlap. Returns [(start, stop)], starts spread evenly from 0 to size - tile'.
    """
    if tile >= size:
        return [(0, size)]
    overlap = min(overlap, tile // 2)
    n = math.ceil((size - overlap) / (tile - overlap))
    t = math.ceil((size + (n - 1) * overlap) / n)  # equal tiles of t <= tile cover size
    starts = [round(i * (size - t) / (n - 1)) for i in range(n)]
    return [(a, a + t) for a in starts]



# -------------------------------------------------------------------------------- the VAE's parts
def vae_part(vae: Any, *path: str) -> Any:
    """vae.path[0].path[1]... or None (a VAE without that structure is tiled without the global
    attention pass)."""
    obj = vae
    for name in path:
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def global_levels(vae: Any, lean: bool) -> int:
    """How many of the decoder's `upsamples` the global pass runs (none when `lean`)."""
    return 0 if lean else getattr(vae_part(vae, "decoder"), "low_res_end", 0)


def idle_parts(vae: Any, lean: bool = False) -> list[nn.Module]:
    """The decoder parts a tiled decode runs once, before the tiles (`decoder_low_res`): conv1,
    middle and (unless `lean`) the levels up to the first upsampling (`Decoder3d.low_res`)."""
    decoder = vae_part(vae, "decoder")
    if decoder is None:
        return []
    low = list(decoder.upsamples[: global_levels(vae, lean)])
    return [m for m in (vae_part(vae, "decoder", "conv1"), vae_part(vae, "decoder", "middle"), *low)
            if isinstance(m, nn.Module)]


def on_gpu(p: torch.Tensor) -> bool:
    return p.is_cuda


def idle_decoder_bytes(vae: Any, lean: bool = False) -> int:
    """Device bytes `tiled_decode` frees while it decodes the tiles of a CUDA VAE: the weights of
    the decoder's conv1, middle and first upsampling level (Wan 2.2: 610 MB in bf16, over half of
    the decoder; `lean`: conv1 and middle, 240 MB), which only the global pass uses."""
    parts = idle_parts(vae, lean)
    if not parts or not all(on_gpu(p) for m in parts for p in m.parameters()):
        return 0
    return sum(p.numel() * p.element_size() for m in parts for p in m.parameters())


# ---------------------------------------------------------------------------------- memory model
def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _decode_px_bytes(version: str, frame_chunk: int | None, dtype: torch.dtype) -> float:
    """Activation bytes per output pixel of one latent frame's decode (see DECODE_PX_PER_BYTE)."""
    table = DECODE_PX_PER_BYTE_CHUNKED.get(frame_chunk) if frame_chunk else None  # 3, 4+: whole chunks
    return (table or DECODE_PX_PER_BYTE)[version] * _elem(dtype)


def estimate_decode_bytes(vae: Any, latent_shape: tuple[int, ...], tile: int | None, dtype: torch.dtype,
                          overlap: int | None = None, out_on_device: bool = False,
                          frame_chunk: int | None = DEFAULT_FRAME_CHUNK, lean: bool = False) -> int:
    """Peak device bytes of decoding `latent_shape` [B, z, T, h, w] with `tile` latent px (None:
    untiled, whole chunks, the whole fp32 video on the device), the VAE weights not included.
    Tiled (`tiled_decode` with `frame_chunk`): one tile's activations, one latent frame's output
    frames and crop of the low-resolution features, the whole video when it is assembled on the
    device, and FIXED_BYTES (`lean`: the tiles after a lean global pass); the global pass before
    the tiles needs `estimate_low_res_bytes`."""
    s = vae.stride[1]
    _, _, t, h, w = latent_shape
    frames = 1 + vae.stride[0] * (t - 1)
    video_px = 3 * frames * 4  # fp32 output bytes per output pixel
    if tile is None or (tile >= h and tile >= w):
        px = h * w * s * s
        return int(px * (_decode_px_bytes(vae.version, None, dtype) + video_px) + FIXED_BYTES)
    overlap = DEFAULT_OVERLAP_PX // s if overlap is None else overlap
    th = max(b - a for a, b in tile_spans(h, tile, overlap))
    tw = max(b - a for a, b in tile_spans(w, tile, overlap))
    px = th * tw * s * s
    # one latent frame's crop of the low-resolution features: <= 2 frames at twice the latent's
    # resolution (lean: the middle's one frame), at most the decoder's top width
    mid = vae.config.dec_dim * vae.config.dim_mult[-1] * (1 if lean else 2 * 4) * th * tw * _elem(dtype)
    whole = h * w * s * s * video_px if out_on_device else 0
    per_px = _decode_px_bytes(vae.version, frame_chunk, dtype) + CHUNK_OUT_PX
    return int(px * per_px + mid + whole + FIXED_BYTES)


def estimate_low_res_bytes(vae: Any, latent_shape: tuple[int, ...], dtype: torch.dtype, lean: bool = False) -> int:
    """Peak device bytes of a tiled decode's global pass (`decoder_low_res`, `lean` or not) over the
    whole latent [B, z, T, h, w], the VAE weights (all on the device then) not included."""
    s = vae.stride[1]
    h, w = latent_shape[3], latent_shape[4]
    per_px = (LEAN_PX_PER_BYTE if lean else LOW_RES_PX_PER_BYTE)[vae.version]
    return int(h * w * s * s * per_px * _elem(dtype) + FIXED_BYTES)


def lean_needed(vae: Any, latent_shape: tuple[int, ...], free_bytes: int | None, dtype: torch.dtype) -> bool:
    """Whether the full global pass would not fit in `free_bytes` (None: no device to budget)."""
    if free_bytes is None:
        return False
    fixed, share = MARGIN
    return estimate_low_res_bytes(vae, latent_shape, dtype) * (1 + share) + fixed > free_bytes


def choose_tile(vae: Any, latent_shape: tuple[int, ...], free_bytes: int, dtype: torch.dtype, *,
                overlap: int | None = None, out_on_device: bool = False,
                frame_chunk: int | None = DEFAULT_FRAME_CHUNK, quiet: bool = False) -> int | None:
    """The largest tile (latent px) whose estimated decode peak fits in `free_bytes` (free device
    memory with the VAE's weights already placed; tiles also get the weights `tiled_decode` moves
    out of their way, `idle_decoder_bytes`) with MARGIN kept free; None when the untiled decode
    fits; the global pass before the tiles must fit without the idle weights' memory, in full or
    else lean (as `tiled_decode` decides). When nothing fits, MIN_TILE (decode_with_retry then
    handles an OOM)."""
    fixed, share = MARGIN
    lean = lean_needed(vae, latent_shape, free_bytes, dtype)
    idle = idle_decoder_bytes(vae, lean)
    low_res = estimate_low_res_bytes(vae, latent_shape, dtype, lean) * (1 + share) + fixed <= free_bytes

    def fits(tile: int | None) -> bool:
        need = estimate_decode_bytes(vae, latent_shape, tile, dtype, overlap, out_on_device, frame_chunk,
                                     lean=lean and tile is not None)
        if tile is None:
            return need * (1 + share) + fixed <= free_bytes
        return low_res and need * (1 + share) + fixed <= free_bytes + idle

    if fits(None):
        return None
    h, w = latent_shape[3], latent_shape[4]
    for tile in range(max(h, w) - 1, MIN_TILE - 1, -1):
        if fits(tile):
            return tile
    if not quiet:
        log.warning("VAE decode: even %d latent px tiles may not fit in %.2f GiB free",
                    MIN_TILE, free_bytes / 2**30)
    return MIN_TILE


def decode_cost(latent_shape: tuple[int, ...], tile: int | None, overlap: int, frame_chunk: int | None) -> float:
    """Estimated time of a decode relative to the untiled one (see FRAME_CHUNK_COST)."""
    h, w = latent_shape[3], latent_shape[4]
    if tile is None or (tile >= h and tile >= w):
        return 1.0
    spans_h, spans_w = tile_spans(h, tile, overlap), tile_spans(w, tile, overlap)
    area = sum(b - a for a, b in spans_h) * sum(b - a for a, b in spans_w) / (h * w)
    return area * FRAME_CHUNK_COST.get(frame_chunk, 1.0) + TILE_COST * len(spans_h) * len(spans_w)


def choose_decode(vae: Any, latent_shape: tuple[int, ...], free_bytes: int, dtype: torch.dtype, *,
                  overlap: int | None = None, out_on_device: bool = False,
                  tile: int | None = None) -> tuple[int | None, int | None]:
    """(tile, frame chunk) of the fastest decode (`decode_cost`) that fits in `free_bytes`: the
    untiled decode where it fits, else for each frame chunk (whole, 2, 1) the largest tile that
    fits (`choose_tile`), or with `tile` given, that tile with the largest frame chunk that fits."""
    s = vae.stride[1]
    overlap = DEFAULT_OVERLAP_PX // s if overlap is None else overlap
    options = []
    for chunk in FRAME_CHUNK_COST:
        t = choose_tile(vae, latent_shape, free_bytes, dtype, overlap=overlap, out_on_device=out_on_device,
                        frame_chunk=chunk, quiet=True)
        if t is None and tile is None:
            return None, None
        if tile is not None:
            if t is None or t >= tile:
                return tile, chunk
            continue
        if t is not None and t > MIN_TILE:
            options.append((decode_cost(latent_shape, t, overlap, chunk), t, chunk))
    if not options:  # nothing fits: the least memory there is (decode_with_retry handles an OOM)
        log.warning("VAE decode: even %s latent px tiles may not fit in %.2f GiB free",
                    tile or MIN_TILE, free_bytes / 2**30)
        return tile or MIN_TILE, min(c for c in FRAME_CHUNK_COST if c is not None)
    _, t, chunk = min(options, key=lambda o: o[0])
    return t, chunk


def free_device_bytes(device: torch.device | str) -> int | None:
    """Bytes a new allocation can get on `device` (CUDA: free memory plus what torch's cache
    holds unused, within `torch.cuda.set_per_process_memory_fraction`'s cap); None for the CPU
    (no tiling needed)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    available = free + torch.cuda.memory_reserved(device) - allocated
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _d: 1.0)(device)
    if fraction < 1.0:  # the allocator refuses to reserve past fraction x total
        available = min(available, int(fraction * total) - allocated)
    return max(0, available)
