"""Tiled VAE decode/encode (wan_lite.runtime.tiled_vae) against the untiled VAE, on tiny random
Wan 2.1 / 2.2 VAEs written in the official layout (CPU, fp32): tiled ~= untiled, no seams, one
tile == untiled exactly, frame chunks == whole chunks, OOM retry == a direct small-tile run, and
the tile chooser (its memory model against traced allocations: test_vae_memory_traced.py)."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.tiny_ckpt.vae import write_vae
from wan_lite.errors import InputError
from wan_lite.errors import OutOfMemoryError as WanOutOfMemoryError
from wan_lite.loading.build import build_vae
from wan_lite.loading.tensors import open_source
from wan_lite.models.vae21 import WanVAE21
from wan_lite.models.vae22 import WanVAE22
from wan_lite.runtime import tiled_vae, vae_memory
from wan_lite.runtime.tiled_vae import (
    blend_weights,
    decode_with_retry,
    make_decode_fn,
    make_encode_fn,
    tiled_decode,
    tiled_encode,
)
from wan_lite.runtime.vae_frames import FrameAssembly, video_to_frames
from wan_lite.runtime.vae_memory import choose_tile, estimate_decode_bytes, tile_spans

log = logging.getLogger(__name__)
CLASSES = {"2.1": WanVAE21, "2.2": WanVAE22}
LATENT_HW = (16, 16)  # two tiles of 11 per axis overlapping by 6
TILE, OVERLAP = 11, 6


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    """{version: (vae, latent [1, z, 2, 16, 16], untiled video [1, 3, 5, H, W])}."""
    root = tmp_path_factory.mktemp("tiled_vae")
    out = {}
    for version in CLASSES:
        path = root / f"vae{version}.pth"
        write_vae(path, version, seed=3)
        vae = build_vae(open_source(path), version=version)
        z = torch.randn(1, vae.z_dim, 2, *LATENT_HW, generator=torch.Generator().manual_seed(1))
        out[version] = (vae, z, vae.decode(z))
    return out


def _step_profile(video: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean |difference| between neighbouring pixels along `dim` (-1 columns, -2 rows), per position."""
    diff = video.diff(dim=dim).abs()
    other = [d for d in range(video.dim()) if d != video.dim() + dim]
    return diff.mean(dim=other)


# ------------------------------------------------------------------------------------ layout
def test_tile_spans_cover_with_equal_tiles_and_enough_overlap():
    for size in range(1, 60):
        for tile in (4, 7, 11, 16, 32):
            for overlap in (0, 2, 4, 6):
                spans = tile_spans(size, tile, overlap)
                assert spans[0][0] == 0 and spans[-1][1] == size
                lengths = {b - a for a, b in spans}
                assert len(lengths) == 1 and (lengths.pop() <= tile or tile >= size)
                for (a0, b0), (a1, b1) in zip(spans, spans[1:]):
                    assert a0 < a1 and b0 < b1
                    assert b0 - a1 >= min(overlap, tile // 2)  # neighbours overlap enough
                if tile < size:  # the fewest tiles that can give that overlap
                    step = tile - min(overlap, tile // 2)
                    assert len(spans) == -(-(size - tile) // step) + 1
    assert tile_spans(44, 64, 4) == [(0, 44)]
    assert tile_spans(80, 32, 4) == [(0, 30), (25, 55), (50, 80)]


def test_blend_weights_partition_of_unity_and_smooth():
    for size, tile, overlap, scale in ((44, 32, 4, 16), (80, 24, 8, 8), (16, 11, 6, 1), (30, 8, 4, 16)):
        spans = tile_spans(size, tile, overlap)
        weights = blend_weights(spans, scale)
        total = torch.zeros(size * scale)
        for (a, b), w in zip(spans, weights):
            assert w.shape == ((b - a) * scale,) and (w >= 0).all() and (w <= 1).all()
            total[a * scale : b * scale] += w
        assert torch.allclose(total, torch.ones_like(total), atol=1e-6)
        for i, ((a, b), w) in enumerate(zip(spans, weights)):
            # a tile's own border pixels facing a neighbour get no weight (the dead margin)
            if i > 0:
                assert w[0] == 0
            if i + 1 < len(spans):
                assert w[-1] == 0
            # no jumps: the steepest step of a cosine ramp over half the overlap is ~pi/(overlap*scale)
            ramp = max(1, (min(overlap, tile // 2) * scale) // 2)
            assert w.diff().abs().max() <= 1.7 / ramp


# ---------------------------------------------------------------------------- decode accuracy
@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_tiled_decode_close_to_untiled(vaes, version):
    vae, z, ref = vaes[version]
    out = tiled_decode(vae, z, TILE, OVERLAP)
    assert out.shape == ref.shape and out.dtype == torch.float32
    err = (out - ref).abs()
    log.info("Wan %s tiled decode vs untiled: max %.4f mean %.5f (|video| mean %.3f)",
             version, err.max(), err.mean(), ref.abs().mean())
    # Measured: 2.1 max 0.12 mean 0.003; 2.2 max 0.13 mean 0.005 (random weights, 4 tiles).
    assert err.mean() < 1e-2
    assert err.max() < 0.25
    assert out.abs().max() <= 1.0  # clamped like the VAE's own output
    # Far from the tile borders (here the corners), decoding in tiles is exact up to rounding.
    s = vae.stride[1]
    assert (out - ref)[..., : 2 * s, : 2 * s].abs().max() < 1e-4


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_tiled_decode_has_no_seams(vaes, version):
    """The step between neighbouring pixels across tile borders is no larger than in the untiled
    video (a hard paste, overlap 0, shows the metric does see seams)."""
    vae, z, ref = vaes[version]
    excess = {}
    for name, overlap in (("blended", OVERLAP), ("hard", 0)):
        out = tiled_decode(vae, z, TILE if overlap else 8, overlap)
        worst = 0.0
        for dim in (-1, -2):
            step_ref = _step_profile(ref, dim)
            worst = max(worst, ((_step_profile(out, dim) - step_ref) / step_ref.median()).max().item())
        excess[name] = worst
    log.info("Wan %s seam excess (max extra step / median step): %s", version, excess)
    # Measured: 2.1 blended 0.002, hard 1.4; 2.2 blended 0.002, hard 0.06.
    assert excess["blended"] < 0.01
    assert excess["hard"] > 10 * excess["blended"]  # the metric does see a seam


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_one_tile_is_exactly_untiled(vaes, version):
    vae, z, ref = vaes[version]
    assert torch.equal(tiled_decode(vae, z, max(LATENT_HW), 4), ref)
    assert torch.equal(tiled_decode(vae, z, 100, 4, out_device="cpu"), ref)


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_tiled_frame_chunks_equal_whole_chunks(vaes, version):
    vae, z, _ = vaes[version]
    whole = tiled_decode(vae, z, TILE, OVERLAP, frame_chunk=None)
    for frames in (1, 2):
        # measured 1.2e-6 (2.1), 1.5e-6 (2.2): CPU convs over 1 or 4 frames round differently
        assert (tiled_decode(vae, z, TILE, OVERLAP, frame_chunk=frames) - whole).abs().max() <= 5e-6
    assert vae.decode_frame_chunk is None  # restored after the decode


def test_batch_decodes_each_item_like_alone(vaes):
    vae, z, _ = vaes["2.1"]
    z2 = torch.cat([z, z.flip(-1)])
    out = tiled_decode(vae, z2, TILE, OVERLAP)
    assert torch.equal(out[1:], tiled_decode(vae, z2[1:], TILE, OVERLAP))
    assert torch.equal(out[:1], tiled_decode(vae, z, TILE, OVERLAP))


# ------------------------------------------------------------------------- uint8 frames directly
@pytest.mark.parametrize("version", ["2.1", "2.2"])
@pytest.mark.parametrize(("hw", "tile"), [((16, 16), TILE), ((16, 16), 6), ((16, 8), TILE), ((8, 16), TILE),
                                          ((16, 16), 100)], ids=["2x2", "3x3", "rows", "columns", "untiled"])
@pytest.mark.parametrize("lean", [False, True], ids=["full", "lean"])
def test_frames_from_the_tiles_equal_the_float_videos_frames(vaes, version, hw, tile, lean):
    """The uint8 frames made straight from the tiles (no float32 video in RAM: pixels one tile
    covers truncated as they come, overlaps summed in float32 strips) are the float32 video's
    frames, bit for bit: tiles along both axes (4 tiles add up at the corners), along one, none."""
    vae, z, _ = vaes[version]
    z = z[..., : hw[0], : hw[1]].contiguous()
    video = tiled_decode(vae, z, tile, 4, lean=lean)
    frames = tiled_decode(vae, z, tile, 4, lean=lean, frames=True)
    assert frames.dtype == torch.uint8 and frames.device.type == "cpu"
    assert frames.shape == (1, video.shape[2], *video.shape[3:], 3)
    assert torch.equal(frames[0], torch.from_numpy(video_to_frames(video[0])))


def test_frames_of_a_batch_and_through_the_pipeline_hook(vaes):
    vae, z, ref = vaes["2.2"]
    s = vae.stride[1]
    z2 = torch.cat([z, z.flip(-1)])
    frames = tiled_decode(vae, z2, TILE, OVERLAP, frames=True)
    video = tiled_decode(vae, z2, TILE, OVERLAP)
    for i in range(2):
        assert torch.equal(frames[i], torch.from_numpy(video_to_frames(video[i])))
    fn = make_decode_fn(TILE * s, overlap_px=OVERLAP * s, out_device="cpu")
    assert torch.equal(fn.frames(vae, z), frames[:1])
    assert torch.equal(make_decode_fn(None).frames(vae, z)[0], torch.from_numpy(video_to_frames(ref[0])))


def test_frame_assembly_holds_only_the_overlaps_in_float32():
    """TI2V-5B 1280x704x121 in 1024 px tiles (2 columns of tiles): 3 uint8 bytes a pixel-frame
    plus float32 strips over the overlap columns, instead of 12 + 3."""
    from wan_lite.runtime.tiled_vae import _support

    spans = tile_spans(80, 1024 // 16, 64 // 16)
    cols = [(a * 16 + _support(w)[0], a * 16 + _support(w)[1]) for (a, _), w in zip(spans, blend_weights(spans, 16))]
    asm = FrameAssembly(121, 704, 1280, [(0, 704)], cols)
    pixels = 121 * 704 * 1280
    assert asm.out.numel() == pixels * 3 and asm.by_row is None
    assert asm.strip_bytes < 0.1 * pixels * 12, asm.strip_bytes / pixels


def test_bad_tiles_are_input_errors(vaes):
    vae, z, _ = vaes["2.1"]
    with pytest.raises(InputError, match="tile"):
        tiled_decode(vae, z, 0, 4)
    with pytest.raises(InputError, match="overlap"):
        tiled_decode(vae, z, 8, -1)


# ----------------------------------------------------------------------------------- OOM retry
class _Proxy:
    """`obj` with some attributes replaced."""

    def __init__(self, obj, **replaced) -> None:
        self._obj = obj
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(self._obj, name)


class OOMAbove:
    """The VAE, except that decoding (untiled `decode`, or a tile's `decoder.upsample`) raises
    torch.OutOfMemoryError for tiles above `max_side` latent px, as a GPU with little free memory
    would."""

    def __init__(self, vae, max_side: int) -> None:
        self.vae, self.max_side, self.calls = vae, max_side, []
        self.decoder = _Proxy(vae.decoder, upsample=self._upsample)

    def __getattr__(self, name):
        return getattr(self.vae, name)

    def _check(self, side):
        self.calls.append(side)
        if side > self.max_side:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def decode(self, latent):
        self._check(max(latent.shape[3:]))
        return self.vae.decode(latent)

    def _upsample(self, x, cache, start=0):
        # a tile's crop of the low-resolution features, after the first upsampling: 2x latent px
        self._check(max(x.shape[3:]) // (2 if start else 1))
        return self.vae.decoder.upsample(x, cache, start)


def test_oom_retry_halves_the_tile_and_matches_a_direct_run(vaes):
    vae, z, _ = vaes["2.1"]
    flaky = OOMAbove(vae, max_side=8)
    out = decode_with_retry(flaky, z, None, overlap=4, min_tile=4)
    # untiled (16) fails, then 8 (half the largest side) fits; retries decode in 1-frame chunks
    # with the lean global pass
    assert flaky.calls[0] == 16 and max(flaky.calls[1:]) <= 8
    assert torch.equal(out, tiled_decode(vae, z, 8, 4, frame_chunk=1, lean=True))
    flaky.calls.clear()
    out = decode_with_retry(flaky, z, 12, overlap=4, min_tile=4)  # 12 (two tiles of 10) fails, 6 fits
    assert flaky.calls[0] == 10 and max(flaky.calls[1:]) <= 6
    assert torch.equal(out, tiled_decode(vae, z, 6, 4, frame_chunk=1, lean=True))


def _record_tiled_decodes(monkeypatch) -> list[tuple[int, int | None, bool | None]]:
    """(tile, frame chunk, lean) of every tiled_decode call from now on, in a list that fills as
    they run."""
    calls, real = [], tiled_vae.tiled_decode

    def recording(*args, frame_chunk=None, lean=None, **kwargs):
        calls.append((args[2], frame_chunk, lean))
        return real(*args, frame_chunk=frame_chunk, lean=lean, **kwargs)

    monkeypatch.setattr(tiled_vae, "tiled_decode", recording)
    return calls


def test_oom_retry_drops_to_one_frame_chunks_and_the_lean_global_pass(vaes, monkeypatch):
    vae, z, _ = vaes["2.1"]
    calls = _record_tiled_decodes(monkeypatch)
    decode_with_retry(OOMAbove(vae, max_side=8), z, 12, overlap=4, min_tile=4, frame_chunk=None)
    assert calls == [(12, None, None), (6, 1, True)]


def test_weights_parked_by_an_oom_come_back_before_the_retry(vaes, monkeypatch):
    """A tile runs out of memory and moving the idle decoder weights back runs out too: they wait
    in CPU memory, and the retry moves them back before it decodes (as on a GPU; the moves are
    recorded here, the modules stay on the CPU)."""
    vae, z, _ = vaes["2.1"]
    flaky = OOMAbove(vae, max_side=8)
    moves, fail = [], [True]

    def move(module, device):
        if device == "cuda:0" and fail[0]:
            fail[0] = False
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 200.00 MiB")
        moves.append((module, device))

    monkeypatch.setattr(tiled_vae, "on_gpu", lambda p: True)
    monkeypatch.setattr(tiled_vae, "_module_device", lambda m: "cuda:0")
    monkeypatch.setattr(tiled_vae, "_move", move)
    out = decode_with_retry(flaky, z, 12, overlap=4, min_tile=4)  # 10 px tiles fail, 6 px tiles fit
    lean = [vae.decoder.conv1, vae.decoder.middle]
    idle = [*lean, *vae.decoder.upsamples[: vae.decoder.low_res_end]]
    parked, back = [(m, "cpu") for m in idle], [(m, "cuda:0") for m in idle]
    # park, (moving back fails), back at the retry's start, park again (the retry's global pass is
    # lean: conv1 and middle), back
    expected = parked + back + [(m, "cpu") for m in lean] + [(m, "cuda:0") for m in lean]
    assert moves == expected
    assert torch.equal(out, tiled_decode(vae, z, 6, 4, frame_chunk=1, lean=True))
    assert getattr(flaky, tiled_vae._PARKED) == []


def test_oom_retry_gives_up_with_a_wan_lite_error(vaes):
    vae, z, _ = vaes["2.1"]
    with pytest.raises(WanOutOfMemoryError) as info:
        decode_with_retry(OOMAbove(vae, max_side=2), z, None, overlap=2, min_tile=4)
    err = info.value
    assert "out of GPU memory" in err.message and "4 latent px" in err.message
    assert "python -m wan_lite decode" in err.hint and "latents were saved" in err.hint
    # raised after the except block: nothing of the torch error is chained to it
    assert err.__context__ is None and err.__cause__ is None


def test_make_decode_fn_is_a_pipeline_hook(vaes):
    vae, z, ref = vaes["2.2"]
    s = vae.stride[1]
    fn = make_decode_fn(TILE * s, overlap_px=OVERLAP * s, out_device="cpu")
    assert torch.equal(fn(vae, z), tiled_decode(vae, z, TILE, OVERLAP))
    assert torch.equal(make_decode_fn(None)(vae, z), ref)
    assert torch.equal(make_decode_fn("auto")(vae, z), ref)  # CPU: no device memory to budget


def test_make_decode_fn_chooses_by_free_memory(vaes, monkeypatch):
    """With device memory to budget (as on a GPU), the hook decodes with what choose_decode picks
    for the free memory: the untiled decode when it fits, else tiles and a frame chunk."""
    vae, z, ref = vaes["2.2"]
    s, shape = vae.stride[1], tuple(z.shape)
    real = tiled_vae.tiled_decode
    calls = _record_tiled_decodes(monkeypatch)
    monkeypatch.setattr(tiled_vae, "free_device_bytes", lambda _device: 2**40)
    assert torch.equal(make_decode_fn("auto")(vae, z), ref) and calls == []
    free = estimate_decode_bytes(vae, shape, None, vae.dtype) // 2  # the untiled decode does not fit
    monkeypatch.setattr(tiled_vae, "free_device_bytes", lambda _device: free)
    o = vae_memory.DEFAULT_OVERLAP_PX // s
    tile, chunk = vae_memory.choose_decode(vae, shape, free, vae.dtype, overlap=o)
    assert tile is not None
    out = make_decode_fn("auto", out_device="cpu")(vae, z)
    assert calls == [(tile, chunk, None)] and torch.equal(out, real(vae, z, tile, o, "cpu", frame_chunk=chunk))
    calls.clear()
    make_decode_fn(6 * s, out_device="cpu")(vae, z)  # a planned tile keeps its size
    assert calls == [(6, vae_memory.choose_decode(vae, shape, free, vae.dtype, overlap=o, tile=6)[1], None)]


# ------------------------------------------------------------------------------------- encode
@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_tiled_encode_close_to_untiled(vaes, version):
    vae, _, video = vaes[version]
    s = vae.stride[1]
    ref = vae.encode(video)
    out = tiled_encode(vae, video, TILE * s, OVERLAP * s)
    assert out.shape == ref.shape
    err = (out - ref).abs()
    log.info("Wan %s tiled encode vs untiled: max %.4f mean %.5f (|latent| mean %.3f)",
             version, err.max(), err.mean(), ref.abs().mean())
    # Measured: 2.1 max 0.06 mean 0.005 (|z| 0.25); 2.2 max 0.06 mean 0.003 (|z| 0.56).
    assert err.mean() < 1e-2
    assert err.max() < 0.15
    assert torch.equal(tiled_encode(vae, video, 10_000, 64), ref)  # one tile: exactly untiled
    fn = make_encode_fn(TILE * s, overlap_px=OVERLAP * s)
    assert torch.equal(fn(vae, video), out)


def test_tiled_encode_of_one_frame(vaes):
    """TI2V encodes the image alone (F = 1)."""
    vae, _, video = vaes["2.2"]
    s = vae.stride[1]
    image = video[:, :, :1]
    ref = vae.encode(image)
    out = tiled_encode(vae, image, TILE * s, OVERLAP * s)
    assert out.shape == ref.shape == (1, vae.z_dim, 1, *LATENT_HW)
    assert (out - ref).abs().mean() < 1e-2


# --------------------------------------------------------------------------------- tile chooser
@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_choose_tile_picks_the_largest_tile_that_fits(version):
    with torch.device("meta"):  # only the architecture matters
        vae = CLASSES[version]()
    s = vae.stride[1]
    shape = (1, vae.z_dim, 31, 704 // s, 1280 // s)
    gib = 2**30
    fixed, share = vae_memory.MARGIN
    untiled = estimate_decode_bytes(vae, shape, None, torch.bfloat16)
    assert untiled > estimate_decode_bytes(vae, shape, 32, torch.bfloat16)
    assert choose_tile(vae, shape, int(untiled * (1 + share) + fixed) + 1, torch.bfloat16) is None
    previous = max(shape[3:])
    for free_gib in (8, 4, 2, 1, 0.5):
        free = int(free_gib * gib)
        tile = choose_tile(vae, shape, free, torch.bfloat16)
        assert tile is not None and vae_memory.MIN_TILE <= tile <= previous
        need = estimate_decode_bytes(vae, shape, tile, torch.bfloat16)
        assert need * (1 + share) + fixed <= free or tile == vae_memory.MIN_TILE
        previous = tile
    # fp32 needs more than bf16; assembling the video on the device needs more than on the CPU
    assert choose_tile(vae, shape, 4 * gib, torch.float32) <= choose_tile(vae, shape, 4 * gib, torch.bfloat16)
    assert (estimate_decode_bytes(vae, shape, 16, torch.bfloat16, out_on_device=True)
            > estimate_decode_bytes(vae, shape, 16, torch.bfloat16))
    assert choose_tile(vae, shape, 1, torch.bfloat16) == vae_memory.MIN_TILE


def test_decode_cost_orders_tiles_and_frame_chunks():
    shape = (1, 48, 31, 44, 80)  # 1280x704
    assert vae_memory.decode_cost(shape, None, 4, None) == vae_memory.decode_cost(shape, 80, 4, 1) == 1.0
    assert 1.0 < vae_memory.decode_cost(shape, 44, 4, None) < vae_memory.decode_cost(shape, 32, 4, None)
    assert vae_memory.decode_cost(shape, 32, 2, None) < vae_memory.decode_cost(shape, 32, 4, None)
    costs = [vae_memory.decode_cost(shape, 32, 4, c) for c in (None, 2, 1)]
    assert costs == sorted(costs) and costs[0] < costs[-1]


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_choose_decode_takes_the_fastest_fit(version):
    """The untiled decode where it fits; else the cheapest (tile, frame chunk) among those that
    fit, never slower than choose_tile's largest 1-frame-chunk tile; a given tile keeps its size
    and gets the largest frame chunk that fits."""
    with torch.device("meta"):
        vae = CLASSES[version]()
    s = vae.stride[1]
    shape = (1, vae.z_dim, 31, 704 // s, 1280 // s)
    fixed, share = vae_memory.MARGIN
    o = vae_memory.DEFAULT_OVERLAP_PX // s

    def fits(tile, chunk, free):
        need = estimate_decode_bytes(vae, shape, tile, torch.bfloat16, o, frame_chunk=chunk)
        return need * (1 + share) + fixed <= free

    untiled = estimate_decode_bytes(vae, shape, None, torch.bfloat16)
    assert vae_memory.choose_decode(vae, shape, int(untiled * (1 + share) + fixed) + 1, torch.bfloat16) == (None, None)
    for free_gib in (4, 2, 1.5, 1):
        free = int(free_gib * 2**30)
        tile, chunk = vae_memory.choose_decode(vae, shape, free, torch.bfloat16)
        assert tile is not None and fits(tile, chunk, free)
        plain = choose_tile(vae, shape, free, torch.bfloat16, frame_chunk=1)
        assert vae_memory.decode_cost(shape, tile, o, chunk) <= vae_memory.decode_cost(shape, plain, o, 1)
    # a given tile: whole chunks where they fit, else 2 frames, else 1
    tile = 384 // s
    needs = {c: estimate_decode_bytes(vae, shape, tile, torch.bfloat16, o, frame_chunk=c) for c in (None, 2, 1)}
    assert needs[None] > needs[2] > needs[1] > vae_memory.estimate_low_res_bytes(vae, shape, torch.bfloat16)
    for chunk in (None, 2, 1):
        free = int(needs[chunk] * (1 + share) + fixed) + 1
        assert vae_memory.choose_decode(vae, shape, free, torch.bfloat16, tile=tile) == (tile, chunk)


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_lean_global_pass_where_the_full_one_does_not_fit(vaes, version, monkeypatch):
    """With free memory short of the full global pass, tiled_decode takes the lean one (conv1 and
    middle only; the tiles run the first level), which also matches the untiled decode closely,
    and choose_tile still finds a real tile for that memory."""
    vae, z, ref = vaes[version]
    lean = tiled_decode(vae, z, TILE, OVERLAP, lean=True)
    assert (lean - ref).abs().mean() < 1e-2 and not torch.equal(lean, tiled_decode(vae, z, TILE, OVERLAP))
    fixed, share = vae_memory.MARGIN
    shape = tuple(z.shape)
    short = int(vae_memory.estimate_low_res_bytes(vae, shape, vae.dtype) * (1 + share) + fixed) - 1
    monkeypatch.setattr(tiled_vae, "free_device_bytes", lambda _device: short)
    assert torch.equal(tiled_decode(vae, z, TILE, OVERLAP), lean)
    with torch.device("meta"):
        full = CLASSES[version]()
    s = full.stride[1]
    big = (1, full.z_dim, 31, 704 // s, 1280 // s)
    free = int(vae_memory.estimate_low_res_bytes(full, big, torch.bfloat16) * (1 + share) + fixed) - 1
    assert vae_memory.lean_needed(full, big, free, torch.bfloat16)
    tile = choose_tile(full, big, free, torch.bfloat16)
    assert tile is not None and tile > vae_memory.MIN_TILE


def test_tiles_get_the_idle_decoder_weights(monkeypatch):
    """choose_tile counts the weights tiled_decode moves out of the way during the tiles (on a
    CUDA VAE), but not for an untiled decode."""
    with torch.device("meta"):
        vae = WanVAE22()
    shape = (1, vae.z_dim, 31, 704 // 16, 1280 // 16)
    free = 2**30
    plain = choose_tile(vae, shape, free, torch.bfloat16)
    monkeypatch.setattr(vae_memory, "idle_decoder_bytes", lambda _vae, lean=False: 224 * 2**20)
    assert choose_tile(vae, shape, free, torch.bfloat16) > plain
    fixed, share = vae_memory.MARGIN
    untiled = estimate_decode_bytes(vae, shape, None, torch.bfloat16)
    assert choose_tile(vae, shape, int(untiled * (1 + share) + fixed) - 2**20, torch.bfloat16) is not None


@pytest.mark.gpu
@torch.inference_mode()
def test_cuda_tiled_decode_moves_idle_weights_out_and_back(vaes, monkeypatch):
    """On a GPU the decoder's conv1, middle and first upsampling level wait in CPU memory during the
    tiles: the same video bit for bit as with them left on the GPU, less memory at the peak,
    weights back afterwards."""
    import contextlib

    vae, z, _ = vaes["2.2"]
    vae = vae.to("cuda")
    z = z.cuda()
    before = {k: v.clone() for k, v in vae.decoder.middle.state_dict().items()}
    low = [vae.decoder.conv1, vae.decoder.middle, *vae.decoder.upsamples[: vae.decoder.low_res_end]]
    assert vae_memory.idle_decoder_bytes(vae) == sum(p.numel() * p.element_size() for m in low for p in m.parameters())

    def peak(run):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out = run()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated()

    moved, moved_peak = peak(lambda: tiled_decode(vae, z, TILE, OVERLAP))
    assert all(p.is_cuda and not p.is_inference() for p in vae.decoder.middle.parameters())
    assert all(torch.equal(v, before[k]) for k, v in vae.decoder.middle.state_dict().items())
    monkeypatch.setattr(tiled_vae, "_idle_on_host", lambda _vae, lean=False: contextlib.nullcontext())
    kept, kept_peak = peak(lambda: tiled_decode(vae, z, TILE, OVERLAP))
    assert torch.equal(moved, kept)
    assert (moved - vae.decode(z)).abs().mean() < 1e-2  # as on the CPU: close to the untiled decode
    # into CPU memory (through pinned staging): the same pixels
    assert torch.allclose(tiled_decode(vae, z, TILE, OVERLAP, out_device="cpu"), moved.cpu(), rtol=0, atol=1e-6)
    print(f"tiled decode peak {moved_peak / 2**20:.1f} MiB with the low-res part moved out, {kept_peak / 2**20:.1f} kept")
    assert moved_peak < kept_peak


@pytest.mark.gpu
def test_cuda_free_bytes_respect_the_process_memory_fraction():
    """Under `set_per_process_memory_fraction` (how the benchmarks cap the GPU) the free memory
    that tile choice sees is the cap's, not the device's."""
    _, total = torch.cuda.mem_get_info(0)
    held = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
    try:
        torch.cuda.set_per_process_memory_fraction(0.25, 0)
        capped = vae_memory.free_device_bytes("cuda:0")
        assert capped == int(0.25 * total) - torch.cuda.memory_allocated(0)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
    assert vae_memory.free_device_bytes("cuda:0") > capped
    del held


@pytest.mark.gpu
@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_cuda_frames_from_tiles_equal_the_float_videos_frames(vaes, version, tmp_path):
    """On a GPU the tiles' parts reach the CPU through pinned staging and the frame assembly
    writes them there as they arrive: the same frames as the float32 video made the same way,
    and the VAE half read from its file straight to the GPU decodes the same video."""
    import copy

    from wan_lite.loading.tensors import open_source
    from wan_lite.runtime import vae_parts

    vae, z, _ = vaes[version]
    vae = copy.deepcopy(vae).to("cuda")
    z = z.cuda()
    video = tiled_decode(vae, z, TILE, OVERLAP, out_device="cpu")
    frames = tiled_decode(vae, z, TILE, OVERLAP, frames=True)
    assert torch.equal(frames[0], torch.from_numpy(video_to_frames(video[0])))
    path = tmp_path / f"vae{version}.pth"
    write_vae(path, version, seed=3)  # the fixture's VAE file again
    vae_parts.register(vae, open_source(path))
    for half in vae_parts.HALVES:
        vae_parts.drop(vae, half)
    vae_parts.bring(vae, "decoder", "cuda")
    assert torch.equal(tiled_decode(vae, z, TILE, OVERLAP, frames=True), frames)


# ------------------------------------------------------------------------------------- cancel
@pytest.mark.parametrize("tile", [None, TILE], ids=["untiled", "tiled"])
def test_cancel_stops_a_decode_between_tiles_and_chunks(vaes, tile):
    """A Cancel during the decode stops it at the decoder's next part (the head of the tile or
    frame that runs), not at the end; the parked weights and the frame chunk are put back, and
    the next decode is the same as before."""
    from wan_lite.api import CancelToken
    from wan_lite.errors import Cancelled

    vae, z, ref = vaes["2.2"]
    s = vae.stride[1]
    fn = make_decode_fn(None if tile is None else tile * s, overlap_px=OVERLAP * s, out_device="cpu")
    heads = []
    count = vae.decoder.head.register_forward_hook(lambda *_: heads.append(1))
    try:
        full = fn(vae, z)
        per_decode = len(heads)
        heads.clear()
        token = CancelToken()
        press = vae.decoder.head.register_forward_hook(lambda *_: token.cancel() if len(heads) == 1 else None)
        try:
            with pytest.raises(Cancelled), tiled_vae.cancel_checks(vae, token):
                fn(vae, z)
        finally:
            press.remove()
        assert per_decode >= 2 and len(heads) == 1  # stopped right after the head that saw the Cancel
        assert not any(m._forward_pre_hooks for m in vae.modules())  # the checks came off
        assert vae.decode_frame_chunk is None and not getattr(vae, tiled_vae._PARKED, None)
        assert all(p.device.type == "cpu" for p in vae.parameters())
        assert torch.equal(fn(vae, z), full)
        if tile is None:
            assert torch.equal(full, ref)
    finally:
        count.remove()
