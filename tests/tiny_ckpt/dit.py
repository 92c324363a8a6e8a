"""A tiny random Wan 2.2 DiT in the official release layout.

The key list is written out from the official state-dict layout, not taken from wan_lite, so
loading these files checks our module's names against the official ones.
Layout of the official release: config.json, diffusion_pytorch_model.safetensors.index.json (weight_map and
metadata.total_size) and shards diffusion_pytorch_model-0000K-of-0000N.safetensors, float32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

PATCH = (1, 2, 2)


def official_dit_shapes(*, in_dim: int, out_dim: int, dim: int, ffn_dim: int, num_layers: int,
                        text_dim: int = 4096, freq_dim: int = 256) -> dict[str, tuple[int, ...]]:
    """Every official tensor name of the DiT with its shape (15 global + 27 per block)."""
    d = dim
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (d, in_dim, *PATCH),
        "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, text_dim),
        "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d),
        "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, freq_dim),
        "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d),
        "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d),
        "time_projection.1.bias": (6 * d,),
        "head.modulation": (1, 2, d),
        "head.head.weight": (math.prod(PATCH) * out_dim, d),
        "head.head.bias": (math.prod(PATCH) * out_dim,),
    }
    for n in range(num_layers):
        b = f"blocks.{n}"
        shapes[f"{b}.modulation"] = (1, 6, d)
        for attn in ("self_attn", "cross_attn"):
            for p in ("q", "k", "v", "o"):
                shapes[f"{b}.{attn}.{p}.weight"] = (d, d)
                shapes[f"{b}.{attn}.{p}.bias"] = (d,)
            shapes[f"{b}.{attn}.norm_q.weight"] = (d,)
            shapes[f"{b}.{attn}.norm_k.weight"] = (d,)
        shapes[f"{b}.norm3.weight"] = (d,)
        shapes[f"{b}.norm3.bias"] = (d,)
        shapes[f"{b}.ffn.0.weight"] = (ffn_dim, d)
        shapes[f"{b}.ffn.0.bias"] = (ffn_dim,)
        shapes[f"{b}.ffn.2.weight"] = (d, ffn_dim)
        shapes[f"{b}.ffn.2.bias"] = (d,)
    return shapes


def random_dit_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Random float32 weights scaled so activations stay O(1) through a few blocks."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=gen)
        if "norm" in name and name.endswith("weight"):
            value = 1.0 + 0.1 * noise  # norm gains near 1, but not exactly
        elif name.endswith("modulation") or name.endswith("bias"):
            value = 0.1 * noise
        else:  # weight matrices / conv kernels: std 1/sqrt(fan_in)
            value = noise / math.sqrt(math.prod(shape[1:]))
        state[name] = value.contiguous()
    return state


def write_dit(folder: Path, *, in_dim: int, out_dim: int, dim: int = 256, ffn_dim: int = 512,
              num_heads: int | None = None, num_layers: int = 2, model_type: str = "ti2v", seed: int = 0,
              shards: int = 2, text_dim: int = 64, freq_dim: int = 256) -> dict[str, torch.Tensor]:
    """Write a tiny DiT in the official layout into `folder`; returns its state dict.

    Heads are always 128 wide in Wan, so `dim` must be a multiple of 128 and num_heads = dim // 128.
    `text_dim` is the tiny T5's d_model (4096 in the real models).
    """
    if dim % 128 or (num_heads is not None and num_heads != dim // 128):
        raise ValueError(f"dim {dim} / num_heads {num_heads}: Wan heads are 128 wide, use num_heads = dim // 128")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = official_dit_shapes(in_dim=in_dim, out_dim=out_dim, dim=dim, ffn_dim=ffn_dim,
                                 num_layers=num_layers, text_dim=text_dim, freq_dim=freq_dim)
    state = random_dit_state(shapes, seed)

    names = list(state)
    per = math.ceil(len(names) / shards)
    weight_map: dict[str, str] = {}
    for k in range(shards):
        part = names[k * per:(k + 1) * per]
        fname = f"diffusion_pytorch_model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n] for n in part}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {
        "_class_name": "WanModel",
        "_diffusers_version": "0.33.0",
        "model_type": model_type,
        "text_len": 512,
        "in_dim": in_dim,
        "dim": dim,
        "ffn_dim": ffn_dim,
        "freq_dim": freq_dim,
        "out_dim": out_dim,
        "num_heads": dim // 128,
        "num_layers": num_layers,
        "eps": 1e-06,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return state
