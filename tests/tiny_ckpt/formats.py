"""Tiny checkpoints in the non-official formats, written from the same random official weights.

- diffusers: the real `WanTransformer3DModel` / `AutoencoderKLWan` / `UMT5EncoderModel` filled
  with the weights and written by their own `save_pretrained` (sharded); DiT and Wan 2.1 VAE
  names come from diffusers' own single-file converters, so the writer does not share code
  with the maps under test (the Wan 2.2 VAE has no diffusers converter: wan_lite's map, checked
  by a strict load and by comparing decoded video with diffusers').
- ComfyUI single files: fp16 / bf16, optional `model.diffusion_model.` prefix,
  plain fp8_e4m3fn, fp8_scaled (legacy `scale_weight` + `scaled_fp8` marker) and the newer
  `weight_scale` + `comfy_quant` layout; the umT5 file with HF names and `spiece_model`.
- GGUF through the gguf package's GGUFWriter: 5-D patch embedding flattened with
  `comfy.gguf.orig_shape`, small tensors F32, the rest in the requested type. gguf-py cannot
  quantize the K types, so Q4_K / Q5_K / Q6_K blocks are encoded here (simple min/max scales)
  and decoded by gguf's own dequantizer in the tests.
- Bad files: a LoRA, a Wan 2.1 I2V DiT (img_emb, k_img), a truncated copy.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from wan_lite.loading import keymaps

FP8_MAX = 448.0  # largest finite float8_e4m3fn
_K_TYPES = ("Q4_K", "Q5_K", "Q6_K")


# --------------------------------------------------------------------------------- diffusers
def diffusers_dit_config(official: dict[str, torch.Tensor]) -> dict:
    dim = official["head.modulation"].shape[-1]
    return dict(
        patch_size=(1, 2, 2), num_attention_heads=dim // 128, attention_head_dim=128,
        in_channels=official["patch_embedding.weight"].shape[1],
        out_channels=official["head.head.weight"].shape[0] // 4,
        text_dim=official["text_embedding.0.weight"].shape[1],
        freq_dim=official["time_embedding.0.weight"].shape[1],
        ffn_dim=official["blocks.0.ffn.0.weight"].shape[0],
        num_layers=len({k.split(".")[1] for k in official if k.startswith("blocks.")}),
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
    )


def write_diffusers_dit(folder: Path, official: dict[str, torch.Tensor], max_shard_size: str = "2MB") -> Path:
    """`transformer/`-style folder written by diffusers itself from official-named weights."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    model = WanTransformer3DModel(**diffusers_dit_config(official))
    model.load_state_dict(convert_wan_transformer_to_diffusers(dict(official)), strict=True)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    return Path(folder)


def diffusers_vae_config(version: str, official: dict[str, torch.Tensor]) -> dict:
    z = official["conv2.weight"].shape[0]
    base = official["encoder.conv1.weight"].shape[0]
    dec_base = official["decoder.head.2.weight"].shape[1]
    cfg = dict(base_dim=base, z_dim=z, latents_mean=[0.0] * z, latents_std=[1.0] * z)
    if version == "2.2":
        cfg.update(decoder_base_dim=dec_base, is_residual=True, in_channels=12, out_channels=12,
                   patch_size=2, scale_factor_spatial=16)
    return cfg


def write_diffusers_vae(folder: Path, official: dict[str, torch.Tensor], version: str) -> Path:
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    model = AutoencoderKLWan(**diffusers_vae_config(version, official))
    if version == "2.1":
        state = convert_wan_vae_to_diffusers(dict(official))
    else:
        state = {keymaps.vae_official_to_diffusers(k, "2.2"): v for k, v in official.items()}
    model.load_state_dict(state, strict=True)
    model.save_pretrained(folder)
    return Path(folder)


def write_diffusers_text_encoder(folder: Path, official: dict[str, torch.Tensor]) -> Path:
    """`text_encoder/` written by transformers' save_pretrained (HF UMT5 names)."""
    from wan_lite.loading.build import build_umt5
    from wan_lite.loading.tensors import DictSource

    build_umt5(DictSource(official), dtype=None).save_pretrained(folder, max_shard_size="200KB")
    return Path(folder)


def write_diffusers_pipeline(root: Path, dits: list[dict], vae: dict, vae_version: str,
                             t5: dict, tokenizer_dir: Path) -> Path:
    """A diffusers pipeline root: model_index.json, transformer/ (+ transformer_2/), vae/,
    text_encoder/, tokenizer/. `dits` is [single] or [high-noise, low-noise]."""
    root = Path(root)
    index = {"_class_name": "WanPipeline", "_diffusers_version": "0.42.1",
             "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": None,
             "vae": ["diffusers", "AutoencoderKLWan"], "text_encoder": ["transformers", "UMT5EncoderModel"],
             "tokenizer": ["transformers", "T5TokenizerFast"]}
    write_diffusers_dit(root / "transformer", dits[0])
    if len(dits) == 2:
        write_diffusers_dit(root / "transformer_2", dits[1])
        index["transformer_2"] = ["diffusers", "WanTransformer3DModel"]
        index["boundary_ratio"] = 0.875
    write_diffusers_vae(root / "vae", vae, vae_version)
    write_diffusers_text_encoder(root / "text_encoder", t5)
    shutil.copytree(tokenizer_dir, root / "tokenizer")
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root


# --------------------------------------------------------------------------------- ComfyUI
PREFIX = "model.diffusion_model."


def _is_linear_weight(name: str, t: torch.Tensor) -> bool:
    return name.endswith(".weight") and t.dim() == 2


def to_fp8(w: torch.Tensor, scaled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scale []): per-tensor absmax scaling, or a plain cast (scale 1)."""
    scale = (w.abs().amax().float() / FP8_MAX).clamp(min=1e-12) if scaled else torch.ones(())
    return (w.float() / scale).to(torch.float8_e4m3fn), scale.reshape(()).float()


def comfy_state(official: dict[str, torch.Tensor], *, dtype: torch.dtype = torch.float16,
                fp8: str | None = None, prefix: str = "",
                keep: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """ComfyUI tensors (and safetensors metadata) for official-named weights.

    fp8: None, "plain" (cast, no scales), "scale_weight" (legacy scaled + `scaled_fp8` marker)
    or "weight_scale" (newer: `weight_scale` + `comfy_quant` blob + `_quantization_metadata`).
    Every 2-D Linear weight becomes fp8 (except the names in `keep`); the rest is stored in `dtype`.
    """
    out: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for name, t in official.items():
        key = prefix + name
        if fp8 is None or not _is_linear_weight(name, t) or name in keep:
            out[key] = t.to(dtype).contiguous()
            continue
        w8, scale = to_fp8(t, scaled=fp8 != "plain")
        out[key] = w8
        module = key[: -len(".weight")]
        if fp8 == "scale_weight":
            out[f"{module}.scale_weight"] = scale
            out[f"{module}.scale_input"] = torch.ones((), dtype=torch.float32)  # 1.0 = no input scaling
        elif fp8 == "weight_scale":
            out[f"{module}.weight_scale"] = scale.reshape(1)
            blob = json.dumps({"format": "float8_e4m3fn"}).encode()
            out[f"{module}.comfy_quant"] = torch.tensor(list(blob), dtype=torch.uint8)
            layers[module] = {"format": "float8_e4m3fn"}
    metadata = {}
    if fp8 == "scale_weight":
        # The marker's dtype names the fp8 flavour; 2 elements = "dequantise for matmul".
        out[f"{prefix}scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    if layers:
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    return out, metadata


def write_comfy(path: Path, official: dict[str, torch.Tensor], **kw) -> Path:
    """A ComfyUI single file (DiT or VAE) from official-named weights; see `comfy_state`."""
    tensors, metadata = comfy_state(official, **kw)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata or None)
    return Path(path)


def write_comfy_t5(path: Path, official: dict[str, torch.Tensor], spiece: bytes | None,
                   *, dtype: torch.dtype = torch.float16, fp8: str | None = None) -> Path:
    """ComfyUI umT5 file: HF UMT5 names, optional fp8, the tokenizer as uint8 `spiece_model`."""
    hf = {keymaps.t5_official_to_hf(k): v for k, v in official.items()}
    # As in Comfy-Org's umt5_xxl_fp8_e4m3fn_scaled: every Linear fp8, the embedding 16-bit.
    tensors, metadata = comfy_state(hf, dtype=dtype, fp8=fp8, keep=("shared.weight",))
    if spiece is not None:
        tensors["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
    save_file(tensors, str(path), metadata=metadata or None)
    return Path(path)


# --------------------------------------------------------------------------------- GGUF
def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Pack 8 six-bit scales and mins per block into ggml's 12 bytes (inverse of get_scale_min)."""
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return out


def _q45_k(blocks: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Shared part of Q4_K (levels 15) and Q5_K (31): 8 sub-blocks of 32 with scale and min."""
    n = blocks.shape[0]
    x = blocks.reshape(n, 8, 32)
    lo = np.minimum(x.min(-1), 0.0)
    scale, mins = (x.max(-1) - lo) / levels, -lo
    d16, dm16 = _fp16(scale.max(-1, keepdims=True) / 63), _fp16(mins.max(-1, keepdims=True) / 63)
    d, dm = d16.astype(np.float32), dm16.astype(np.float32)
    sc = np.clip(np.round(scale / np.where(d > 0, d, 1)), 0, 63).astype(np.uint8)
    mn = np.clip(np.round(mins / np.where(dm > 0, dm, 1)), 0, 63).astype(np.uint8)
    step, offset = d * sc, dm * mn
    q = np.clip(np.round((x + offset[..., None]) / np.where(step > 0, step, 1)[..., None]), 0, levels)
    return q.astype(np.uint8), d16.view(np.uint8), dm16.view(np.uint8), _k_scales(sc, mn)


def quantize_k(data: np.ndarray, qtype: str) -> np.ndarray:
    """float32 [rows, cols] (cols % 256 == 0) -> ggml K-quant bytes [rows, cols/256*type_size]."""
    rows = data.shape[0]
    blocks = data.reshape(-1, 256).astype(np.float32)
    n = blocks.shape[0]
    if qtype in ("Q4_K", "Q5_K"):
        q, d, dm, scales = _q45_k(blocks, 15 if qtype == "Q4_K" else 31)
        low = q & 15
        qs = (low[:, 0::2, :] | (low[:, 1::2, :] << 4)).reshape(n, 128)
        parts = [d, dm, scales]
        if qtype == "Q5_K":
            hi = (q >> 4) & 1  # [n, 8 sub-blocks, 32]: bit j of qh[l] is the 5th bit of sub-block j
            parts.append(sum(hi[:, j, :] << j for j in range(8)).astype(np.uint8))
        out = np.concatenate([*parts, qs], axis=1)
    elif qtype == "Q6_K":
        x = blocks.reshape(n, 16, 16)
        scale = np.abs(x).max(-1) / 31
        d16 = _fp16(scale.max(-1, keepdims=True) / 127)
        d = d16.astype(np.float32)
        sc = np.clip(np.round(scale / np.where(d > 0, d, 1)), -128, 127).astype(np.int8)
        step = (d * sc)[..., None]
        q = np.clip(np.round(x / np.where(step != 0, step, 1)), -32, 31) + 32
        q = q.astype(np.uint8).reshape(n, 256)
        qr = q.reshape(n, 2, 2, 64)
        ql = ((qr[:, :, 0, :] & 15) | ((qr[:, :, 1, :] & 15) << 4)).reshape(n, 128)
        qh4 = (q >> 4).reshape(n, 2, 4, 32)
        qh = (qh4[:, :, 0] | (qh4[:, :, 1] << 2) | (qh4[:, :, 2] << 4) | (qh4[:, :, 3] << 6)).reshape(n, 64)
        out = np.concatenate([ql, qh, sc.view(np.uint8), d16.view(np.uint8)], axis=1)
    else:
        raise ValueError(qtype)
    return out.astype(np.uint8).reshape(rows, -1)


def gguf_encode(array: np.ndarray, qtype: str) -> tuple[np.ndarray, object]:
    """(data, raw ggml type) for GGUFWriter.add_tensor."""
    import gguf

    q = gguf.GGMLQuantizationType[qtype]
    if qtype == "F32":
        return array.astype(np.float32), None
    if qtype == "F16":
        return array.astype(np.float16), None
    if qtype in _K_TYPES:
        return quantize_k(array, qtype), q
    return gguf.quants.quantize(array.astype(np.float32), q), q


def write_gguf(path: Path, official: dict[str, torch.Tensor], qtype: str, *, arch: str = "wan",
               prefix: str = "", rename=None) -> Path:
    """A GGUF file the way ComfyUI-GGUF's converter lays it out.

    Tensors > 4-D are stored flattened to 2-D, F32, with `comfy.gguf.orig_shape.<name>`; 1-D tensors,
    tensors of <= 1024 values and `*modulation` stay F32; 2-D tensors whose rows fit the block size
    get `qtype`, others F16. rename: official name -> stored name (e.g. llama.cpp T5 names).
    """
    import gguf

    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]
    writer = gguf.GGUFWriter(str(path), arch)
    for name, t in official.items():
        key = prefix + (rename(name) if rename else name)
        array = t.float().numpy()
        flattened = array.ndim > 4
        if flattened:  # ggml has at most 4 dims: the converter re-inserts these as F32
            writer.add_array(f"comfy.gguf.orig_shape.{key}", list(array.shape))
            array = array.reshape(array.shape[0], -1)
        if flattened or array.ndim == 1 or array.size <= 1024 or name.endswith("modulation"):
            kind = "F32"
        elif array.ndim == 2 and array.shape[1] % block == 0:
            kind = qtype
        else:
            kind = "F16"
        data, raw = gguf_encode(array, kind)
        writer.add_tensor(key, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


# --------------------------------------------------------------------------------- bad files
def write_lora(path: Path, official: dict[str, torch.Tensor], rank: int = 4) -> Path:
    """A ComfyUI-style LoRA for the DiT's attention projections (lora_down / lora_up / alpha)."""
    gen = torch.Generator().manual_seed(7)
    out = {}
    for name, t in official.items():
        if ".self_attn." in name and name.endswith(".weight") and t.dim() == 2:
            base = "diffusion_model." + name[: -len(".weight")]
            out[f"{base}.lora_down.weight"] = torch.randn(rank, t.shape[1], generator=gen).half()
            out[f"{base}.lora_up.weight"] = torch.zeros(t.shape[0], rank).half()
            out[f"{base}.alpha"] = torch.tensor(float(rank))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path))
    return Path(path)


def wan21_i2v_state(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official Wan 2.1 I2V-14B names: a 2.2 I2V DiT plus the CLIP image layers."""
    dim = official["head.modulation"].shape[-1]
    out = dict(official)
    out["img_emb.proj.0.weight"] = torch.ones(1280)
    out["img_emb.proj.1.weight"] = torch.zeros(dim, 1280)
    for key in [k for k in official if k.endswith("cross_attn.k.weight")]:
        out[key.replace(".k.", ".k_img.")] = torch.zeros(dim, dim)
        out[key.replace(".k.weight", ".norm_k_img.weight")] = torch.ones(dim)
    return out


def truncate(src: Path, dst: Path, keep: float = 0.6) -> Path:
    """A copy of `src` cut to `keep` of its size (an interrupted download)."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: math.floor(len(data) * keep)])
    return Path(dst)
