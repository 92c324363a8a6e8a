"""Tiny LoRA files for the tiny DiT, in each naming convention people use.

A LoRA is first made in official terms ({official module: {"down", "up", "alpha", "diff",
"diff_b"}}) by `make_lora`, then written by `write_lora` under one convention's key names. The
names are spelled out here from the conventions themselves (ComfyUI / lightx2v, kohya / musubi,
PEFT / diffusers), not taken from wan_lite, so reading them back checks wan_lite's key table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.tiny_ckpt.dit import official_dit_shapes, random_dit_state

DIM, FFN, LAYERS, TEXT_DIM, CH = 256, 512, 2, 64, 48  # 2 heads of 128; TI2V-like 48 channels
GRID = (3, 4, 6)  # 3 x 2 x 3 = 18 tokens

# official module -> diffusers module (WanTransformer3DModel), inside a block and outside.
DIFFUSERS_IN_BLOCK = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "norm3": "norm2", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2", "modulation": "scale_shift_table",
}
DIFFUSERS_OUTSIDE = {
    "patch_embedding": "patch_embedding", "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj", "head.head": "proj_out", "head.modulation": "scale_shift_table",
}
BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                 "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
OUTSIDE_LINEARS = ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
                   "time_projection.1", "head.head")

Lora = dict[str, dict[str, torch.Tensor]]


def diffusers_module(module: str) -> str:
    if module.startswith("blocks."):
        _, n, rest = module.split(".", 2)
        return f"blocks.{n}.{DIFFUSERS_IN_BLOCK[rest]}"
    return DIFFUSERS_OUTSIDE[module]


def make_lora(state: dict[str, torch.Tensor], modules: Iterable[str], *, rank: int = 3, alpha: float | None = 2.0,
              diffs: Iterable[str] = (), diff_bs: Iterable[str] = (), seed: int = 0, size: float = 0.3) -> Lora:
    """Low-rank pairs for `modules` (official module names of Linear / Conv3d layers), full
    deltas `diffs` (module names, or parameters such as `blocks.0.modulation`) and bias deltas
    `diff_bs`; values make each delta about `size` times its weight's norm."""
    gen = torch.Generator().manual_seed(seed)
    lora: Lora = {}
    for module in modules:
        w = state[f"{module}.weight"]
        fan_in = math.prod(w.shape[1:])
        down = torch.randn(rank, *w.shape[1:], generator=gen) / math.sqrt(fan_in)
        up_shape = (w.shape[0], rank, *([1] * (w.dim() - 2)))  # a Conv3d LoRA's up is a 1x1x1 conv
        up = torch.randn(up_shape, generator=gen) * size * w.norm() / math.sqrt(w.numel())
        lora[module] = {"down": down, "up": up}
        if alpha is not None:
            lora[module]["alpha"] = torch.tensor(float(alpha))
    for name in diffs:
        param = name if name.endswith("modulation") else f"{name}.weight"
        lora.setdefault(name, {})["diff"] = size * torch.randn(state[param].shape, generator=gen) * state[param].std()
    for module in diff_bs:
        bias = state[f"{module}.bias"]
        lora.setdefault(module, {})["diff_b"] = size * torch.randn(bias.shape, generator=gen) * bias.std()
    return lora


def combine(*loras: Lora) -> Lora:
    """One LoRA holding all parts of `loras` (a module's parts from several of them together)."""
    out: Lora = {}
    for lora in loras:
        for module, parts in lora.items():
            out.setdefault(module, {}).update(parts)
    return out


def hand_merge(state: dict[str, torch.Tensor], lora: Lora, strength: float = 1.0) -> dict[str, torch.Tensor]:
    """W + strength * alpha / rank * up @ down, + strength * diff, bias + strength * diff_b (float32)."""
    out = {k: v.clone().float() for k, v in state.items()}
    for module, parts in lora.items():
        param = module if module.endswith("modulation") else f"{module}.weight"
        if "down" in parts:
            down, up = parts["down"].float(), parts["up"].float()
            rank = down.shape[0]
            scale = strength * (float(parts["alpha"]) / rank if "alpha" in parts else 1.0)
            out[param] += scale * (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape(out[param].shape)
        if "diff" in parts:
            out[param] += strength * parts["diff"].float()
        if "diff_b" in parts:
            out[f"{module}.bias"] += strength * parts["diff_b"].float()
    return out


_SUFFIXES = {
    # convention: (prefix, module spelling, down, up, alpha, diff, diff_b)
    "comfy": ("diffusion_model.", "official", ".lora_down.weight", ".lora_up.weight", ".alpha", ".diff", ".diff_b"),
    "comfy_ab": ("diffusion_model.", "official", ".lora_A.weight", ".lora_B.weight", ".alpha", ".diff", ".diff_b"),
    "bare": ("", "official", ".lora_A.weight", ".lora_B.weight", ".alpha", ".diff", ".diff_b"),
    "kohya": ("lora_unet_", "underscored", ".lora_down.weight", ".lora_up.weight", ".alpha", ".diff", ".diff_b"),
    "peft": ("transformer.", "diffusers", ".lora_A.weight", ".lora_B.weight", ".alpha", ".diff", ".diff_b"),
    "peft_default": ("base_model.model.", "diffusers", ".lora_A.default.weight", ".lora_B.default.weight",
                     ".alpha", ".diff", ".diff_b"),
}


def lora_keys(lora: Lora, convention: str) -> dict[str, torch.Tensor]:
    """The tensors of `lora` under `convention`'s key names."""
    prefix, spelling, *suffixes = _SUFFIXES[convention]
    out = {}
    for module, parts in lora.items():
        name = {"official": module, "underscored": module.replace(".", "_"),
                "diffusers": diffusers_module(module)}[spelling]
        for part, suffix in zip(("down", "up", "alpha", "diff", "diff_b"), suffixes):
            if part in parts:
                out[f"{prefix}{name}{suffix}"] = parts[part]
    return out


def write_lora(path: Path, lora: Lora, convention: str = "comfy", *, dtype: torch.dtype = torch.float32,
               peft_alpha: float | None = None, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `lora` as a safetensors file under `convention`'s names. peft_alpha: write diffusers'
    `lora_adapter_metadata` (PEFT's LoraConfig: r, lora_alpha) instead of alpha tensors."""
    tensors = {k: (v if v.dim() == 0 else v.to(dtype)).contiguous() for k, v in lora_keys(lora, convention).items()}
    tensors.update(extra or {})
    metadata = {"format": "pt"}
    if peft_alpha is not None:
        rank = next(p["down"].shape[0] for p in lora.values() if "down" in p)
        metadata["lora_adapter_metadata"] = json.dumps({"r": rank, "lora_alpha": peft_alpha})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return Path(path)


# ----------------------------------------------------------------- the tiny DiT the tests use
def tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    shapes = official_dit_shapes(in_dim=CH, out_dim=CH, dim=DIM, ffn_dim=FFN, num_layers=LAYERS, text_dim=TEXT_DIM)
    return random_dit_state(shapes, seed=seed)


def tiny_inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latent [1, CH, *GRID], t [1], context [1, 512, TEXT_DIM] with 9 real rows)."""
    gen = torch.Generator().manual_seed(seed)
    ctx = torch.zeros(1, 512, TEXT_DIM)
    ctx[0, :9] = torch.randn(9, TEXT_DIM, generator=gen)
    return torch.randn(1, CH, *GRID, generator=gen), torch.tensor([700.0]), ctx


def full_lora(state: dict[str, torch.Tensor], seed: int = 0) -> Lora:
    """Every kind of layer a LoRA can change: block Linears (with alpha), embeddings, time
    projection, head (scale 1), patch embedding, norm / modulation / bias deltas."""
    return combine(
        make_lora(state, [f"blocks.{n}.{m}" for n in range(LAYERS) for m in BLOCK_LINEARS], seed=seed,
                  diff_bs=["blocks.0.self_attn.q", "blocks.1.ffn.2"]),
        make_lora(state, [*OUTSIDE_LINEARS, "patch_embedding"], alpha=None, seed=seed + 1,
                  diffs=["blocks.0.norm3", "blocks.1.self_attn.norm_q", "blocks.0.cross_attn.norm_k",
                         "blocks.1.modulation", "head.modulation"], diff_bs=["blocks.0.norm3", "head.head"]))


def run(model, inputs) -> torch.Tensor:
    """The DiT's output for `inputs` (tiny_inputs), float32."""
    with torch.inference_mode():
        return model(*inputs).float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def dit(source_or_state, dtype: torch.dtype = torch.float32):
    """The tiny DiT built from a TensorSource or a state dict."""
    from wan_lite.loading.build import build_dit
    from wan_lite.loading.tensors import DictSource

    src = source_or_state if not isinstance(source_or_state, dict) else DictSource(source_or_state)
    return build_dit(src, dtype)


def two_loras(folder: Path, state: dict[str, torch.Tensor]):
    """Two LoRAs sharing a layer (blocks.0.self_attn.q), in two conventions, written to `folder`
    and read back: (lora a, lora b, file a, file b)."""
    from wan_lite.loading.lora import read_lora

    a = make_lora(state, ["blocks.0.self_attn.q", "blocks.1.ffn.0", "text_embedding.0"], seed=7,
                  diffs=["blocks.0.norm3"])
    b = make_lora(state, ["blocks.0.self_attn.q", "blocks.0.cross_attn.v", "head.head"], rank=2, alpha=4.0, seed=8,
                  diff_bs=["blocks.0.self_attn.q"])
    return a, b, read_lora(write_lora(folder / "a.safetensors", a, "comfy")), \
        read_lora(write_lora(folder / "b.safetensors", b, "peft_default"))

