"""The Wan 2.1 VAE (`Wan2.1_VAE.pth`, used by T2V-A14B and I2V-A14B): z 16, stride 4x8x8.

Encoder ladder 96, 96, 192, 384, 384 with flat `encoder.downsamples.{i}`; the decoder's upsample
convs halve the channels, so its levels 1..3 start from half the previous width.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from wan_lite.errors import CheckpointError
from wan_lite.models.vae_common import (
    CausalConv3d,
    Decoder3d,
    Encoder3d,
    Resample,
    ResidualBlock,
    VAEConfig,
    WanVAEBase,
    shape_of,
)

LATENT_MEAN_21 = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENT_STD_21 = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True)
class VAE21Config(VAEConfig):
    """Wan 2.1 VAE architecture; the defaults are the released model."""

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]]) -> VAE21Config:
        """Infer widths, z_dim, dim_mult, res blocks and the time schedule from tensor shapes."""
        dim = shape_of(shapes, "encoder.conv1.weight")[0]
        z_dim = shape_of(shapes, "conv2.weight")[0]
        # Walk the flat encoder list: runs of ResidualBlocks, each level closed by a Resample.
        widths, counts, temporal, run, width = [], [], [], 0, dim
        i = 0
        while True:
            prefix = f"encoder.downsamples.{i}."
            if prefix + "residual.2.weight" in shapes:
                width, run = shapes[prefix + "residual.2.weight"][0], run + 1
            elif prefix + "resample.1.weight" in shapes:
                widths.append(width)
                counts.append(run)
                temporal.append(prefix + "time_conv.weight" in shapes)
                run = 0
            elif any(k.startswith(prefix) for k in shapes):
                raise CheckpointError(
                    f"Unsupported Wan 2.1 VAE layout: {prefix[:-1]} is neither a ResidualBlock "
                    "nor a Resample.",
                    "Only the released Wan 2.1 VAE architecture (no attention in the encoder "
                    "levels) is supported.",
                )
            else:
                break
            i += 1
        widths.append(width)
        counts.append(run)
        if run == 0 or len(set(counts)) != 1 or any(w % dim for w in widths):
            raise CheckpointError(
                f"Cannot read the Wan 2.1 VAE layout from the encoder "
                f"(levels {widths}, res blocks {counts}).",
                "The file is not a Wan 2.1 VAE in the official layout.",
            )
        dim_mult = tuple(w // dim for w in widths)
        dec_dim = shape_of(shapes, "decoder.head.0.gamma")[0] // dim_mult[0]
        config = cls(dim, dec_dim, z_dim, dim_mult, counts[0], tuple(temporal))
        if z_dim != len(LATENT_MEAN_21):
            raise CheckpointError(
                f"This VAE has {z_dim} latent channels; the Wan 2.1 VAE has {len(LATENT_MEAN_21)}.",
                "The file is not the Wan 2.1 VAE.",
            )
        return config


def _encoder(c: VAE21Config) -> Encoder3d:
    dims = [c.dim * m for m in (1, *c.dim_mult)]
    layers: list[nn.Module] = []
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        for _ in range(c.num_res_blocks):
            layers.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if i != len(c.dim_mult) - 1:
            layers.append(Resample(out_dim, "downsample3d" if c.temporal_downsample[i] else "downsample2d"))
    return Encoder3d(3, dims[0], nn.Sequential(*layers), dims[-1], 2 * c.z_dim)


def _decoder(c: VAE21Config) -> Decoder3d:
    dims = [c.dec_dim * m for m in (c.dim_mult[-1], *c.dim_mult[::-1])]
    layers: list[nn.Module] = []
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        if i > 0:
            in_dim //= 2  # the previous level's upsample conv halved the channels
        for _ in range(c.num_res_blocks + 1):
            layers.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if i != len(c.dim_mult) - 1:
            mode = "upsample3d" if c.temporal_upsample[i] else "upsample2d"
            layers.append(Resample(out_dim, mode, out_dim // 2))
    return Decoder3d(c.z_dim, dims[0], nn.Sequential(*layers), dims[-1], 3)


class WanVAE21(WanVAEBase):
    """Wan 2.1 VAE. encode: [B, 3, F, H, W] -> [B, 16, 1+(F-1)//4, H/8, W/8] (normalised);
    decode: [B, 16, T, h, w] -> [B, 3, 1+4(T-1), 8h, 8w] in [-1, 1]. See `WanVAEBase`."""

    version = "2.1"
    latent_mean = LATENT_MEAN_21
    latent_std = LATENT_STD_21
    config_class = VAE21Config

    def __init__(self, config: VAE21Config | None = None) -> None:
        super().__init__()
        self.config = config = config or VAE21Config()
        self.encoder = _encoder(config)
        self.conv1 = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = _decoder(config)
