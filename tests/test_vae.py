"""Wan 2.1 / 2.2 VAEs against diffusers' AutoencoderKLWan as an independent oracle (tiny random
weights, fp32, CPU), plus loading, config inference and error reporting."""

from __future__ import annotations

import re

import pytest
import torch

from tests.tiny_ckpt.vae import random_vae_state, write_vae
from wan_lite.errors import CheckpointError, InputError
from wan_lite.loading.build import build_vae
from wan_lite.loading.tensors import DictSource, PthSource, open_source
from wan_lite.models.vae21 import VAE21Config, WanVAE21
from wan_lite.models.vae22 import VAE22Config, WanVAE22

CLASSES = {"2.1": WanVAE21, "2.2": WanVAE22}
TINY = {
    "2.1": VAE21Config(dim=8, dec_dim=8, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
                       temporal_downsample=(False, True, True)),
    "2.2": VAE22Config(dim=16, dec_dim=32, z_dim=48, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
                       temporal_downsample=(False, True, True)),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---- official -> diffusers key names ------------------------------------------------------------

_RES = {"residual.0.gamma": "norm1.gamma", "residual.2.": "conv1.", "residual.3.gamma": "norm2.gamma",
        "residual.6.": "conv2.", "shortcut.": "conv_shortcut."}


def _block_path(version: str, part: str, rest: str) -> str:
    """The diffusers path of one encoder/decoder sub-key such as `downsamples.5.time_conv.weight`."""
    if m := re.fullmatch(r"middle\.([012])\.(.*)", rest):
        idx, sub = m.groups()
        if idx == "1":
            return f"mid_block.attentions.0.{sub}"
        return f"mid_block.resnets.{int(idx) // 2}.{sub}"
    if rest.startswith("head.0.gamma"):
        return "norm_out.gamma"
    if rest.startswith("head.2."):
        return "conv_out." + rest[len("head.2."):]
    if rest.startswith("conv1."):
        return "conv_in." + rest[len("conv1."):]
    if version == "2.1" and part == "encoder":
        return re.sub(r"^downsamples\.", "down_blocks.", rest)
    if version == "2.1":  # decoder: 4 entries per level (3 resnets + upsampler)
        k, sub = re.fullmatch(r"upsamples\.(\d+)\.(.*)", rest).groups()
        level, j = divmod(int(k), 4)
        return f"up_blocks.{level}." + (f"resnets.{j}." if j < 3 else "upsamplers.0.") + sub
    name, inner = ("downsamples", 2) if part == "encoder" else ("upsamples", 3)
    i, j, sub = re.fullmatch(rf"{name}\.(\d+)\.{name}\.(\d+)\.(.*)", rest).groups()
    kind = "down" if part == "encoder" else "up"
    return f"{kind}_blocks.{i}." + (f"resnets.{j}." if int(j) < inner else f"{kind}sampler.") + sub


def to_diffusers(version: str, key: str) -> str:
    top = {"conv1.": "quant_conv.", "conv2.": "post_quant_conv."}
    for old, new in top.items():
        if key.startswith(old):
            return new + key[len(old):]
    part, rest = key.split(".", 1)
    path = _block_path(version, part, rest)
    for old, new in _RES.items():
        path = path.replace(old, new)
    return f"{part}.{path}"


def diffusers_vae(version: str, state: dict[str, torch.Tensor]):
    from diffusers import AutoencoderKLWan

    cfg = TINY[version]
    kwargs = dict(base_dim=cfg.dim, decoder_base_dim=cfg.dec_dim, z_dim=cfg.z_dim,
                  dim_mult=list(cfg.dim_mult), num_res_blocks=cfg.num_res_blocks, attn_scales=[],
                  temperal_downsample=list(cfg.temporal_downsample))
    if version == "2.2":
        kwargs.update(is_residual=True, in_channels=12, out_channels=12, patch_size=2,
                      scale_factor_spatial=16, latents_mean=list(WanVAE22.latent_mean),
                      latents_std=list(WanVAE22.latent_std))
    model = AutoencoderKLWan(**kwargs).eval()
    model.load_state_dict({to_diffusers(version, k): v for k, v in state.items()}, strict=True)
    return model


# ---- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["2.1", "2.2"])
def tiny(request, tmp_path_factory):
    """(version, state dict, .pth path, our model built from the .pth)."""
    version = request.param
    path = tmp_path_factory.mktemp("vae") / f"Wan{version}_VAE.pth"
    state = write_vae(path, version, seed=1)
    model = build_vae(PthSource(path), torch.float32, version=version)
    return version, state, path, model


def _video(seed: int, frames: int = 9, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # smooth content plus noise, in [-1, 1]
    base = torch.nn.functional.interpolate(torch.rand(1, 3, frames, 8, 8, generator=g) * 2 - 1,
                                           size=(frames, size, size), mode="trilinear")
    return (0.8 * base + 0.2 * (torch.rand(1, 3, frames, size, size, generator=g) * 2 - 1)).clamp(-1, 1)


# ---- oracle -----------------------------------------------------------------------------------

def test_encode_matches_diffusers(tiny):
    version, state, _, model = tiny
    oracle = diffusers_vae(version, state)
    s = model.stride[1]
    x = _video(2, frames=9, size=4 * s)  # 32x32 (2.1) / 64x64 (2.2): a 4x4 latent
    ours = model.encode(x)
    assert ours.shape == (1, model.z_dim, 3, 4, 4) and ours.dtype == torch.float32
    with torch.no_grad():
        mu = oracle.encode(x).latent_dist.mean
    mean = torch.tensor(model.latent_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(model.latent_std).view(1, -1, 1, 1, 1)
    ref = (mu - mean) * (1.0 / std)
    err = rel_err(ours, ref)
    print(f"VAE {version} encode: rel {err:.2e}, max abs {(ours - ref).abs().max().item():.2e}")
    assert err < 1e-4
    assert ref.std() > 0.05  # the random weights give a non-degenerate latent


def test_decode_matches_diffusers(tiny):
    version, state, _, model = tiny
    oracle = diffusers_vae(version, state)
    z = torch.randn(1, model.z_dim, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    ours = model.decode(z)
    s = model.stride[1]
    assert ours.shape == (1, 3, 1 + 4 * 2, 4 * s, 4 * s) and ours.dtype == torch.float32
    mean = torch.tensor(model.latent_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(model.latent_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        ref = oracle.decode(z / (1.0 / std) + mean).sample
    err = rel_err(ours, ref)
    clamped = (ref.abs() >= 1).float().mean().item()
    print(f"VAE {version} decode: rel {err:.2e}, max abs {(ours - ref).abs().max().item():.2e}, "
          f"clamped {clamped:.1%}")
    assert err < 1e-4
    assert ours.abs().max() <= 1.0 and clamped < 0.2 and ref.std() > 0.05


# ---- loading, config, shapes ------------------------------------------------------------------

def test_from_shapes_infers_tiny_config(tiny):
    version, state, path, model = tiny
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert CLASSES[version].config_class.from_shapes(shapes) == TINY[version]
    assert model.config == TINY[version]
    assert model.version == version and model.z_dim == {"2.1": 16, "2.2": 48}[version]
    assert model.stride == {"2.1": (4, 8, 8), "2.2": (4, 16, 16)}[version]
    assert list(model.buffers()) == []
    # state_dict keys are exactly the official ones, in the file's order
    assert list(model.state_dict()) == list(state)


def test_pth_source_loads_identical(tiny):
    version, state, path, model = tiny
    src = open_source(path)
    assert isinstance(src, PthSource)
    from_dict = build_vae(DictSource(state), torch.float32, version=version)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    z = torch.randn(1, model.z_dim, 2, 3, 2, generator=torch.Generator().manual_seed(4))
    assert torch.equal(model.decode(z), from_dict.decode(z))


def test_shape_mismatch_names_key_and_shapes(tiny):
    version, state, _, _ = tiny
    bad = dict(state)
    key = "decoder.middle.0.residual.2.weight"
    good_shape = list(bad[key].shape)
    bad[key] = torch.zeros(good_shape[0] + 1, *good_shape[1:])
    with pytest.raises(CheckpointError) as err:
        build_vae(DictSource(bad), torch.float32, version=version)
    msg = str(err.value)
    assert key in msg and str(good_shape) in msg and str([good_shape[0] + 1, *good_shape[1:]]) in msg


def test_detect_version(tiny):
    version, state, _, _ = tiny
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert WanVAE21.detect_version(shapes) == version == WanVAE22.detect_version(shapes)
    other = WanVAE22 if version == "2.1" else WanVAE21
    with pytest.raises(CheckpointError, match=f"Wan {version} VAE"):
        build_vae(DictSource(state), torch.float32, version=other.version)
    with pytest.raises(CheckpointError, match="not a Wan VAE"):
        WanVAE21.detect_version({"blocks.0.self_attn.q.weight": (8, 8)})


def test_real_sizes_build_on_meta():
    """The released configs reproduce the published tensor and parameter counts."""
    for cls, tensors, params in ((WanVAE21, 194, 126_892_531), (WanVAE22, 196, 704_688_668)):
        with torch.device("meta"):
            model = cls()
        sd = model.state_dict()
        assert (len(sd), sum(t.numel() for t in sd.values())) == (tensors, params)
        assert cls.config_class.from_shapes({k: tuple(t.shape) for k, t in sd.items()}) == model.config


# ---- behaviour of encode / decode -------------------------------------------------------------

def test_batch_equals_single_samples(tiny):
    version, _, _, model = tiny
    x = torch.cat([_video(5, frames=5, size=32), _video(6, frames=5, size=32)])
    both = model.encode(x)
    assert torch.allclose(both[1:], model.encode(x[1:]), rtol=0, atol=1e-6)
    z = torch.randn(2, model.z_dim, 2, 2, 2, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(model.decode(z)[:1], model.decode(z[:1]), rtol=0, atol=1e-6)


def test_decode_any_crop_size_and_frame_count(tiny):
    """A tiling wrapper decodes crops of any size; 1 latent frame gives 1 video frame."""
    version, _, _, model = tiny
    s = model.stride[1]
    z = torch.randn(1, model.z_dim, 1, 3, 5, generator=torch.Generator().manual_seed(8))
    assert model.decode(z).shape == (1, 3, 1, 3 * s, 5 * s)
    z = torch.randn(1, model.z_dim, 4, 2, 1, generator=torch.Generator().manual_seed(9))
    assert model.decode(z).shape == (1, 3, 13, 2 * s, s)


def test_decode_in_frame_chunks_equals_whole_chunks(tiny):
    """The runtime's `decode_frame_chunk` (full-resolution levels a few frames at a time through the
    causal caches) changes memory, not the result; bf16 too."""
    version, state, _, model = tiny
    z = torch.randn(1, model.z_dim, 3, 3, 4, generator=torch.Generator().manual_seed(12))
    half = build_vae(DictSource(state), torch.bfloat16, version=version)
    for vae in (model, half):
        ref = vae.decode(z)
        for frames in (1, 2, 3):
            vae.decode_frame_chunk = frames
            try:
                out = vae.decode(z)
            finally:
                vae.decode_frame_chunk = None
            assert (out - ref).abs().max() <= 1e-6, (vae.dtype, frames)
    assert model.decoder.frame_chunk is None
    with pytest.raises(InputError, match="frame chunk"):
        model.decode_frame_chunk = 0


def test_encode_drops_incomplete_chunk_and_rejects_bad_sizes(tiny):
    version, _, _, model = tiny
    s = model.stride[1]
    x = _video(10, frames=7, size=2 * s)  # 1 + 4 + 2 leftover frames
    full = model.encode(x)
    assert full.shape[2] == 2
    assert torch.equal(full, model.encode(x[:, :, :5]))
    with pytest.raises(InputError, match=f"multiples of {s}"):
        model.encode(torch.zeros(1, 3, 5, s + s // 2, s))
    with pytest.raises(InputError):
        model.decode(torch.zeros(1, model.z_dim + 1, 1, 2, 2))


def test_bfloat16_close_to_float32(tiny):
    version, state, _, model = tiny
    half = build_vae(DictSource(state), torch.bfloat16, version=version)
    assert half.dtype == torch.bfloat16
    z = torch.randn(1, model.z_dim, 2, 2, 2, generator=torch.Generator().manual_seed(11))
    out = half.decode(z)
    assert out.dtype == torch.float32
    assert rel_err(out, model.decode(z)) < 0.05


def test_random_state_is_deterministic():
    a, b = random_vae_state("2.2", seed=3), random_vae_state("2.2", seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- the fused RMS norm + SiLU (models/rms_silu_kernel.py) ------------------------------------

def test_norm_kernel_takes_channels_last_rows_only():
    """The kernel's [B, rows, C] view: channels-last activations and the time slice of a padded
    buffer (batch 1 and 2) qualify; NCDHW does not; on the CPU the eager form always runs."""
    from wan_lite.models import rms_silu_kernel as k
    cl = torch.channels_last_3d
    x = torch.randn(2, 8, 3, 4, 5).contiguous(memory_format=cl)
    view = k._rows_view(x)
    assert view is not None and view.shape == (2, 60, 8) and view.stride()[1:] == (8, 1)
    assert torch.equal(view[1, 7], x[1, :, 0, 1, 2])  # pixel 7 = (t 0, h 1, w 2)
    buf = torch.empty(2, 8, 5, 4, 5).contiguous(memory_format=cl)
    assert k._rows_view(buf[:, :, 2:]) is not None
    assert k._rows_view(x.contiguous()) is None and k._rows_view(buf[:, :, :, 1:]) is None
    assert not k.takes(x)  # CPU


@pytest.mark.gpu
@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_cuda_fused_kernels_encode_and_decode_as_the_eager_ops(version):
    """Encode and decode with the fused norm + SiLU and the biases folded into the kernels, against
    the same with the eager ops (fusion off): in float32 (TF32 off) the same to float32 rounding;
    in bf16 no farther from the float32 result than the eager bf16 ops (fewer roundings). The
    biases are scaled up so that a bias added twice or lost would show."""
    from wan_lite.models.fused import set_fusion
    state = random_vae_state(version, seed=5)
    for key in state:
        if key.endswith("bias"):
            state[key] = state[key] * 10
    z = torch.randn(1, 16 if version == "2.1" else 48, 3, 6, 5, generator=torch.Generator().manual_seed(4)).cuda()
    s = 8 if version == "2.1" else 16
    video = (torch.rand(1, 3, 5, 4 * s, 3 * s, generator=torch.Generator().manual_seed(1)) * 2 - 1).cuda()
    out = {}
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        for dtype in (torch.float32, torch.bfloat16):
            model = build_vae(DictSource(state), dtype, version=version).cuda()
            for fused in (True, False):
                old = set_fusion(fused)
                try:
                    out[dtype, fused] = model.decode(z), model.encode(video)
                finally:
                    set_fusion(old)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    # the conv weights took the activations' channels-last layout at their first use, values unchanged
    conv = model.decoder.head[2]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d) and not conv.weight.is_contiguous()
    cpu = build_vae(DictSource(state), torch.float32, version=version)
    assert rel_err(out[torch.float32, False][0].cpu(), cpu.decode(z.cpu())) < 1e-5
    for i, name in enumerate(("decode", "encode")):
        ref = out[torch.float32, False][i]
        assert rel_err(out[torch.float32, True][i], ref) < 1e-5
        fused_err, eager_err = rel_err(out[torch.bfloat16, True][i], ref), rel_err(out[torch.bfloat16, False][i], ref)
        print(f"VAE {version} bf16 {name} vs fp32: fused kernels {fused_err:.2e}, eager {eager_err:.2e}")
        assert fused_err <= eager_err * 1.05


@pytest.mark.gpu
def test_cuda_norm_kernel_writes_the_padded_slice_of_a_batch():
    """silu(norm(x)) written into the time slice of a padded channels-last buffer, batch 2, the
    Wan 2.2 decoder's widest rows (1024 channels): equal to the float64 result to bf16 rounding,
    and the padding frames untouched."""
    from wan_lite.models import rms_silu_kernel as k
    from wan_lite.models.vae_common import RMS_norm
    torch.manual_seed(0)
    cl = torch.channels_last_3d
    for c in (12, 96, 1024):
        norm = RMS_norm(c, images=False).cuda()
        norm.gamma.data.normal_()
        x = (torch.randn(2, c, 3, 9, 7, device="cuda") * 3).bfloat16().contiguous(memory_format=cl)
        x[0, :, 1, 2, 3] = 0  # an all-zero pixel: the norm's 1e-12 floor, silu(0) = 0
        buf = torch.full((2, c, 5, 9, 7), 7.0, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=cl)
        assert k.takes(x, buf[:, :, 2:])
        norm.silu(x, out=buf[:, :, 2:])
        xd = x.double()
        want = torch.nn.functional.silu(
            xd / torch.linalg.vector_norm(xd, dim=1, keepdim=True).clamp_min(1e-12) * c**0.5
            * norm.gamma.double().view(-1, 1, 1, 1))
        got = buf[:, :, 2:].double()
        assert (got - want).abs().max() <= 2**-7 * want.abs().max()
        assert torch.equal(got[0, :, 1, 2, 3], torch.zeros(c, device="cuda", dtype=torch.float64))
        assert (buf[:, :, :2] == 7).all()


@pytest.mark.gpu
def test_cuda_residual_sum_kernel_adds_the_bias_once():
    """h += s + bias in one pass (the folded conv biases), batch 2, a padded buffer's slice as s."""
    from wan_lite.models import rms_silu_kernel as k
    torch.manual_seed(0)
    cl = torch.channels_last_3d
    h = torch.randn(2, 96, 3, 5, 4, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=cl)
    buf = torch.randn(2, 96, 5, 5, 4, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=cl)
    bias = torch.randn(96, device="cuda")
    want = h.double() + buf[:, :, 2:].double() + bias.double().view(-1, 1, 1, 1)
    assert k.takes_sum(h, buf[:, :, 2:])
    got = k.add_rows(h, buf[:, :, 2:], bias)
    assert got is h and (h.double() - want).abs().max() <= 2**-8 * want.abs().max()
