"""Tiny random Wan 2.1 / 2.2 VAE checkpoints in the official `.pth` layout and key names.

The key list is written out from the official module trees of the two VAEs, independently of wan_lite's modules, so a naming slip in the model shows up as
a load error. Structure is the real one (dim_mult [1, 2, 4, 4], 2 res blocks, time schedule
[False, True, True], real z_dim); only the base widths are small.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

DIM_MULT = (1, 2, 4, 4)
NUM_RES = 2
TEMPORAL_DOWN = (False, True, True)
Z_DIM = {"2.1": 16, "2.2": 48}
DEFAULT_DIMS = {"2.1": (8, 8), "2.2": (16, 32)}  # (encoder base, decoder base)


def _resblock(keys: dict, prefix: str, cin: int, cout: int) -> None:
    keys[f"{prefix}.residual.0.gamma"] = (cin, 1, 1, 1)
    keys[f"{prefix}.residual.2.weight"] = (cout, cin, 3, 3, 3)
    keys[f"{prefix}.residual.2.bias"] = (cout,)
    keys[f"{prefix}.residual.3.gamma"] = (cout, 1, 1, 1)
    keys[f"{prefix}.residual.6.weight"] = (cout, cout, 3, 3, 3)
    keys[f"{prefix}.residual.6.bias"] = (cout,)
    if cin != cout:
        keys[f"{prefix}.shortcut.weight"] = (cout, cin, 1, 1, 1)
        keys[f"{prefix}.shortcut.bias"] = (cout,)


def _resample(keys: dict, prefix: str, dim: int, mode: str, out: int) -> None:
    conv_out = out if mode.startswith("up") else dim
    keys[f"{prefix}.resample.1.weight"] = (conv_out, dim, 3, 3)
    keys[f"{prefix}.resample.1.bias"] = (conv_out,)
    if mode == "upsample3d":
        keys[f"{prefix}.time_conv.weight"] = (2 * dim, dim, 3, 1, 1)
        keys[f"{prefix}.time_conv.bias"] = (2 * dim,)
    elif mode == "downsample3d":
        keys[f"{prefix}.time_conv.weight"] = (dim, dim, 3, 1, 1)
        keys[f"{prefix}.time_conv.bias"] = (dim,)


def _conv(keys: dict, prefix: str, cout: int, cin: int, k: int) -> None:
    keys[f"{prefix}.weight"] = (cout, cin, k, k, k)
    keys[f"{prefix}.bias"] = (cout,)


def _middle(keys: dict, part: str, dim: int) -> None:
    _resblock(keys, f"{part}.middle.0", dim, dim)
    keys[f"{part}.middle.1.norm.gamma"] = (dim, 1, 1)
    keys[f"{part}.middle.1.to_qkv.weight"] = (3 * dim, dim, 1, 1)
    keys[f"{part}.middle.1.to_qkv.bias"] = (3 * dim,)
    keys[f"{part}.middle.1.proj.weight"] = (dim, dim, 1, 1)
    keys[f"{part}.middle.1.proj.bias"] = (dim,)
    _resblock(keys, f"{part}.middle.2", dim, dim)


def _head(keys: dict, part: str, dim: int, out: int) -> None:
    keys[f"{part}.head.0.gamma"] = (dim, 1, 1, 1)
    _conv(keys, f"{part}.head.2", out, dim, 3)


def vae_key_shapes(version: str, dim: int, dec_dim: int) -> dict[str, tuple[int, ...]]:
    """Official key -> shape of a Wan `version` VAE with the given base widths."""
    z, keys = Z_DIM[version], {}
    enc = [dim * m for m in (1, *DIM_MULT)]
    dec = [dec_dim * m for m in (DIM_MULT[-1], *DIM_MULT[::-1])]
    temporal_up = TEMPORAL_DOWN[::-1]
    last = len(DIM_MULT) - 1
    pix = 3 if version == "2.1" else 12
    _conv(keys, "encoder.conv1", enc[0], pix, 3)

    def name(part: str, flat: int, i: int, j: int) -> str:
        # 2.1: one flat Sequential per part; 2.2: one block per level with its own Sequential
        inner = "downsamples" if part == "encoder" else "upsamples"
        return f"{part}.{inner}.{flat}" if version == "2.1" else f"{part}.{inner}.{i}.{inner}.{j}"

    flat = 0
    for i in range(len(DIM_MULT)):
        cin, cout = enc[i], enc[i + 1]
        for j in range(NUM_RES):
            _resblock(keys, name("encoder", flat, i, j), cin if j == 0 else cout, cout)
            flat += 1
        if i != last:
            mode = "downsample3d" if TEMPORAL_DOWN[i] else "downsample2d"
            _resample(keys, name("encoder", flat, i, NUM_RES), cout, mode, cout)
            flat += 1
    _middle(keys, "encoder", enc[-1])
    _head(keys, "encoder", enc[-1], 2 * z)
    _conv(keys, "conv1", 2 * z, 2 * z, 1)
    _conv(keys, "conv2", z, z, 1)
    _conv(keys, "decoder.conv1", dec[0], z, 3)
    _middle(keys, "decoder", dec[0])
    flat = 0
    for i in range(len(DIM_MULT)):
        cin, cout = dec[i], dec[i + 1]
        if version == "2.1" and i > 0:
            cin //= 2  # Wan 2.1's upsample convs halve the width
        for j in range(NUM_RES + 1):
            _resblock(keys, name("decoder", flat, i, j), cin if j == 0 else cout, cout)
            flat += 1
        if i != last:
            mode = "upsample3d" if temporal_up[i] else "upsample2d"
            out = cout // 2 if version == "2.1" else cout
            _resample(keys, name("decoder", flat, i, NUM_RES + 1), cout, mode, out)
            flat += 1
    _head(keys, "decoder", dec[-1], pix)
    return keys


def random_vae_state(version: str, *, base_dim: int | None = None, dec_dim: int | None = None,
                     seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    """Random fp32 tensors under the official names: conv weights ~ N(0, 1/fan_in) (so
    activations keep a unit scale), biases ~ N(0, 0.05), norm gammas ~ 1 + N(0, 0.1)."""
    if version not in Z_DIM:
        raise ValueError(f"version must be '2.1' or '2.2', not {version!r}")
    dim = base_dim or DEFAULT_DIMS[version][0]
    if dec_dim is None:  # the defaults' ratio: 2.1 shares the width, 2.2's decoder is twice as wide
        dec_dim = dim * DEFAULT_DIMS[version][1] // DEFAULT_DIMS[version][0]
    shapes = vae_key_shapes(version, dim, dec_dim)
    gen = torch.Generator().manual_seed(seed)
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, shape in shapes.items():
        if key.endswith("gamma"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif key.endswith("bias"):
            t = 0.05 * torch.randn(shape, generator=gen)
        else:
            fan_in = 1
            for n in shape[1:]:
                fan_in *= n
            t = torch.randn(shape, generator=gen) / fan_in**0.5
        state[key] = t.float()
    return state


def write_vae(path: Path, version: str, *, base_dim: int | None = None, dec_dim: int | None = None,
              seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a tiny random Wan `version` VAE as the official `.pth` (torch.save of an fp32
    OrderedDict) and return its tensors. Defaults: 2.1 base 8; 2.2 encoder 16, decoder 32."""
    state = random_vae_state(version, base_dim=base_dim, dec_dim=dec_dim, seed=seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return dict(state)
