"""The Wan 2.2 VAE (`Wan2.2_VAE.pth`, used by TI2V-5B): z 48, stride 4x16x16.

Differences from Wan 2.1: pixels are patchified 2x2 into 12 channels around the network; each
encoder level adds a parameter-free average-pool shortcut (AvgDown3D) and each decoder level a
replication shortcut (DupUp3D); upsample convs keep their width; encoder width 160, decoder 256.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wan_lite.errors import CheckpointError
from wan_lite.models.vae_common import (
    CausalConv3d,
    Decoder3d,
    Encoder3d,
    FeatureCache,
    Resample,
    ResidualBlock,
    VAEConfig,
    WanVAEBase,
    shape_of,
)

LATENT_MEAN_22 = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
LATENT_STD_22 = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, C*p*p, T, H/p, W/p]; channel c*p*p + r*p + q holds pixel (p*i+q, p*j+r):
    the width offset r is the more significant sub-index (official `b c f (h q) (w r) -> b (c r q) f h w`)."""
    b, c, t, h, w = x.shape
    x = x.view(b, c, t, h // p, p, w // p, p)  # b c t h q w r
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * p * p, t, h // p, w // p)


def unpatchify_view(dst: torch.Tensor, p: int) -> torch.Tensor:
    """A view of `dst` [B, C, T, H, W] shaped like its patchified form [B, C, p(r), p(q), T, H/p, W/p]."""
    b, c, t, h, w = dst.shape
    return dst.view(b, c, t, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)


def avg_down(x: torch.Tensor, out_dim: int, ft: int, fs: int) -> torch.Tensor:
    """AvgDown3D: [B, C, T, H, W] -> [B, out, ceil(T/ft), H/fs, W/fs].

    Time is front-padded with zeros to a multiple of ft; channel k = c*F + a*fs*fs + b*fs + d
    (F = ft*fs*fs) holds input (c, t*ft+a, h*fs+b, w*fs+d); output o is the mean of the group
    of G = C*F/out consecutive channels starting at o*G.
    """
    b, c, t, h, w = x.shape
    if ft == 1 and fs == 1 and c == out_dim:
        return x
    if t % ft:
        x = F.pad(x, (0, 0, 0, 0, ft - t % ft, 0))
        t = x.shape[2]
    x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, out_dim, c * ft * fs * fs // out_dim, t // ft, h // fs, w // fs).mean(dim=2)


def add_dup_up(main: torch.Tensor, x: torch.Tensor, ft: int, fs: int, first_chunk: bool) -> torch.Tensor:
    """`main += DupUp3D(x)`, returning `main` [B, out, T', H*fs, W*fs] (T' = T*ft, or T*ft-ft+1 on
    the first chunk, whose first ft-1 time copies are dropped).

    DupUp3D: out[o, t*ft+a, h*fs+b, w*fs+d] = x[(o*F + a*fs*fs + b*fs + d) // R, t, h, w] with
    F = ft*fs*fs, R = out*F/C. The replication is a broadcast view of x added in place into
    `main` (our own temporary), so no output-sized copy of the shortcut is made.
    """
    b, c, t, h, w = x.shape
    out = main.shape[1]
    r = out * ft * fs * fs // c
    # repeat_interleave(r) over channels, split into (out, a, b, d); a view whenever r tiles F.
    src = x.unsqueeze(2).expand(b, c, r, t, h, w).reshape(b, out, ft, fs, fs, t, h, w)
    src = src.permute(0, 1, 5, 2, 6, 3, 7, 4)  # [B, out, T, ft, H, fs, W, fs]
    if first_chunk and ft > 1:
        full = src.reshape(b, out, t * ft, h * fs, w * fs)
        return main.add_(full[:, :, ft - 1 :])
    main.view(b, out, t, ft, h, fs, w, fs).add_(src)
    return main


class DownResidualBlock(nn.Module):
    """Encoder level: `downsamples` = ResidualBlocks (+ Resample at index num_res_blocks);
    output = downsamples(x) + AvgDown3D(x)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, down: bool) -> None:
        super().__init__()
        self.out_dim, self.ft, self.fs = out_dim, 2 if temporal else 1, 2 if down else 1
        layers: list[nn.Module] = [
            ResidualBlock(in_dim if j == 0 else out_dim, out_dim) for j in range(num_res_blocks)
        ]
        if down:
            layers.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """[B, in, T, H, W] -> [B, out, T', H/fs, W/fs] (T' = T on the first chunk or ft 1, else T/2)."""
        h = x
        for layer in self.downsamples:
            h = layer(h, cache)
        return h.add_(avg_down(x, self.out_dim, self.ft, self.fs))


class UpResidualBlock(nn.Module):
    """Decoder level: `upsamples` = ResidualBlocks (+ Resample without channel halving);
    output = upsamples(x) + DupUp3D(x) when the level upsamples, else upsamples(x)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, up: bool) -> None:
        super().__init__()
        self.up, self.ft, self.fs = up, 2 if temporal else 1, 2
        layers: list[nn.Module] = [
            ResidualBlock(in_dim if j == 0 else out_dim, out_dim) for j in range(num_res_blocks)
        ]
        if up:
            layers.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d", out_dim))
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """[B, in, T, H, W] -> [B, out, T', 2H, 2W] (T' = T on the first chunk or ft 1, else 2T)."""
        h = x
        for layer in self.upsamples:
            h = layer(h, cache)
        return add_dup_up(h, x, self.ft, self.fs, cache.first_chunk) if self.up else h


@dataclass(frozen=True)
class VAE22Config(VAEConfig):
    """Wan 2.2 VAE architecture; the defaults are the released model (note the time schedule
    [False, True, True] of the wrapper, not the inner factory's default)."""

    dim: int = 160
    dec_dim: int = 256
    z_dim: int = 48

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]]) -> VAE22Config:
        """Infer widths, z_dim, dim_mult, res blocks and the time schedule from tensor shapes."""
        conv_in = shape_of(shapes, "encoder.conv1.weight")
        if conv_in[1] != 3 * WanVAE22.patch_size**2:
            raise CheckpointError(
                f"encoder.conv1.weight has {conv_in[1]} input channels; "
                "the Wan 2.2 VAE has 12 (2x2 patches).",
                "The file is not the Wan 2.2 VAE.",
            )
        dim, z_dim = conv_in[0], shape_of(shapes, "conv2.weight")[0]
        widths, counts, temporal = [], [], []
        while f"encoder.downsamples.{len(widths)}.downsamples.0.residual.2.weight" in shapes:
            prefix = f"encoder.downsamples.{len(widths)}.downsamples."
            widths.append(shapes[prefix + "0.residual.2.weight"][0])
            n = 0
            while f"{prefix}{n}.residual.2.weight" in shapes:
                n += 1
            counts.append(n)
            if f"{prefix}{n}.resample.1.weight" in shapes:
                temporal.append(f"{prefix}{n}.time_conv.weight" in shapes)
        consistent = len(set(counts)) == 1 and len(temporal) == len(widths) - 1
        if not widths or not consistent or any(w % dim for w in widths):
            raise CheckpointError(
                f"Cannot read the Wan 2.2 VAE layout from the encoder "
                f"(levels {widths}, res blocks {counts}).",
                "The file is not a Wan 2.2 VAE in the official layout.",
            )
        dim_mult = tuple(w // dim for w in widths)
        dec_dim = shape_of(shapes, "decoder.head.0.gamma")[0] // dim_mult[0]
        if z_dim != len(LATENT_MEAN_22):
            raise CheckpointError(
                f"This VAE has {z_dim} latent channels; the Wan 2.2 VAE has {len(LATENT_MEAN_22)}.",
                "The file is not the Wan 2.2 VAE.",
            )
        return cls(dim, dec_dim, z_dim, dim_mult, counts[0], tuple(temporal))


def _encoder(c: VAE22Config) -> Encoder3d:
    dims = [c.dim * m for m in (1, *c.dim_mult)]
    last = len(c.dim_mult) - 1
    levels = [
        DownResidualBlock(dims[i], dims[i + 1], c.num_res_blocks,
                          temporal=i < last and c.temporal_downsample[i], down=i != last)
        for i in range(len(c.dim_mult))
    ]
    return Encoder3d(3 * WanVAE22.patch_size**2, dims[0], nn.Sequential(*levels), dims[-1], 2 * c.z_dim)


def _decoder(c: VAE22Config) -> Decoder3d:
    dims = [c.dec_dim * m for m in (c.dim_mult[-1], *c.dim_mult[::-1])]
    last = len(c.dim_mult) - 1
    levels = [
        UpResidualBlock(dims[i], dims[i + 1], c.num_res_blocks + 1,
                        temporal=i < last and c.temporal_upsample[i], up=i != last)
        for i in range(len(c.dim_mult))
    ]
    return Decoder3d(c.z_dim, dims[0], nn.Sequential(*levels), dims[-1], 3 * WanVAE22.patch_size**2)


class WanVAE22(WanVAEBase):
    """Wan 2.2 VAE. encode: [B, 3, F, H, W] -> [B, 48, 1+(F-1)//4, H/16, W/16] (normalised);
    decode: [B, 48, T, h, w] -> [B, 3, 1+4(T-1), 16h, 16w] in [-1, 1]. See `WanVAEBase`."""

    version = "2.2"
    latent_mean = LATENT_MEAN_22
    latent_std = LATENT_STD_22
    config_class = VAE22Config
    patch_size = 2

    def __init__(self, config: VAE22Config | None = None) -> None:
        super().__init__()
        self.config = config = config or VAE22Config()
        self.encoder = _encoder(config)
        self.conv1 = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = _decoder(config)

    def _to_network(self, x: torch.Tensor) -> torch.Tensor:
        return patchify(x, self.patch_size)

    def _write_frames(self, dst: torch.Tensor, y: torch.Tensor) -> None:
        # Unpatchify straight into the output video: one copy, no intermediate tensor.
        p = self.patch_size
        b, cp, t, h, w = y.shape
        unpatchify_view(dst, p).copy_(y.view(b, cp // (p * p), p, p, t, h, w))

