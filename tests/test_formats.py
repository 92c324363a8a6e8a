"""Other checkpoint formats load to the same tensors and the same model outputs as the official ones.

Every format is written here from one set of random official weights (tests/tiny_ckpt/formats.py):
diffusers folders by diffusers' / transformers' own save_pretrained, ComfyUI single files
(16-bit, fp8, fp8_scaled in both layouts), GGUF by the gguf package's writer. Lossless formats
must give bit-identical tensors and outputs; fp8 and GGUF stay within their quantization error.
Diffusers' own models and converters serve as the independent oracle for the key maps.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.tiny_ckpt import formats as tf
from tests.tiny_ckpt.dit import official_dit_shapes, random_dit_state
from tests.tiny_ckpt.t5 import official_t5_state_dict, write_tokenizer
from tests.tiny_ckpt.vae import random_vae_state
from wan_lite.errors import CheckpointError
from wan_lite.loading import discovery, formats, keymaps, sources
from wan_lite.loading.build import build_dit, build_text_encoder, build_vae
from wan_lite.loading.tensors import DictSource

DIM, FFN, LAYERS, TEXT_DIM = 256, 512, 2, 256  # rows of 256: every Linear can take K-quants
GRID = (2, 4, 4)  # latent frames, height, width -> 2 x 2 x 2 tokens


def dit_state(in_dim: int = 16, out_dim: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    shapes = official_dit_shapes(in_dim=in_dim, out_dim=out_dim, dim=DIM, ffn_dim=FFN, num_layers=LAYERS,
                                 text_dim=TEXT_DIM)
    return random_dit_state(shapes, seed)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def same_tensors(source, official: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> None:
    """The source presents exactly the official names and shapes, with bit-identical values."""
    assert set(source) == set(official)
    for k, v in official.items():
        want = v if dtype is None else v.to(dtype)
        assert source.shape(k) == tuple(v.shape), k
        assert torch.equal(source[k], want), k


def diffusers_from_folder(cls, folder: Path):
    """A diffusers model from its saved folder: config.json + all safetensors shards, strictly.
    (from_pretrained would need `accelerate` for models with fp32-kept modules.)"""
    from safetensors.torch import load_file

    model = cls.from_config(cls.load_config(folder))
    state = {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def only(path: Path) -> formats.Component:
    found = formats.detect(path)
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def t2v(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    return tmp_path_factory.mktemp("t2v"), dit_state()


# ------------------------------------------------------------------------------ key maps
def test_dit_map_agrees_with_diffusers_converter_and_model() -> None:
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    official = dit_state()
    theirs = convert_wan_transformer_to_diffusers(dict(official))
    ours = {keymaps.dit_official_to_diffusers(k): v for k, v in official.items()}
    assert ours.keys() == theirs.keys() and all(ours[k] is theirs[k] for k in ours)
    model_keys = WanTransformer3DModel(**tf.diffusers_dit_config(official)).state_dict().keys()
    assert set(ours) == set(model_keys)
    assert {keymaps.dit_diffusers_to_official(k) for k in ours} == set(official)
    assert keymaps.dit_official_to_diffusers("blocks.7.norm3.bias") == "blocks.7.norm2.bias"
    assert keymaps.dit_diffusers_to_official("blocks.7.norm2.weight") == "blocks.7.norm3.weight"
    assert keymaps.dit_official_to_diffusers("img_emb.proj.0.weight") is None


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_vae_maps_cover_diffusers_model_both_ways(version: str) -> None:
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    official = random_vae_state(version)
    ours = {keymaps.vae_official_to_diffusers(k, version): v for k, v in official.items()}
    model = AutoencoderKLWan(**tf.diffusers_vae_config(version, official)).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in model.items()}
    assert {keymaps.vae_diffusers_to_official(k, version) for k in ours} == set(official)
    if version == "2.1":  # diffusers converts only the flat Wan 2.1 layout itself
        theirs = convert_wan_vae_to_diffusers(dict(official))
        assert ours.keys() == theirs.keys() and all(ours[k] is theirs[k] for k in ours)


def test_t5_maps_round_trip() -> None:
    official = official_t5_state_dict(d_model=64, heads=4, d_ff=128, layers=2, vocab=384)
    for forward, backward in ((keymaps.t5_official_to_hf, keymaps.t5_hf_to_official),
                              (keymaps.t5_official_to_gguf, keymaps.t5_gguf_to_official)):
        assert {backward(forward(k)) for k in official} == set(official)
    assert keymaps.t5_gguf_to_official("enc.blk.3.ffn_gate.weight") == "blocks.3.ffn.gate.0.weight"
    assert keymaps.t5_hf_to_official("decoder.block.0.layer.0.SelfAttention.q.weight") is None


# ------------------------------------------------------------------------------ DiT formats
def test_diffusers_dit_folder_is_bit_identical(t2v) -> None:
    root, official = t2v
    folder = tf.write_diffusers_dit(root / "transformer", official)
    assert len(list(folder.glob("*.safetensors"))) > 1  # sharded, with an index
    c = only(folder)
    assert (c.format, c.role, c.variant, c.naming, c.precision) == (
        "diffusers", "dit", "t2v-a14b", "diffusers", "fp32")
    same_tensors(formats.open_component(c), official)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prefix", ["", tf.PREFIX])
def test_comfy_dit_is_bit_identical(t2v, dtype: torch.dtype, prefix: str) -> None:
    root, official = t2v
    path = tf.write_comfy(root / f"wan2.2_t2v_low_noise_14B_{dtype}{bool(prefix)}.safetensors", official,
                          dtype=dtype, prefix=prefix)
    c = only(path)
    assert (c.format, c.role, c.expert, c.prefix) == ("comfy", "dit", "low", prefix)
    assert c.precision == {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    same_tensors(formats.load_component(path, "dit", model="t2v-a14b", expert="low"), official, dtype)


@pytest.mark.parametrize("layout", ["plain", "scale_weight", "weight_scale"])
def test_fp8_dequantises_on_read_and_keeps_fp8_on_request(t2v, layout: str) -> None:
    root, official = t2v
    path = tf.write_comfy(root / f"fp8_{layout}.safetensors", official, fp8=layout, prefix=tf.PREFIX)
    c = only(path)
    assert c.precision == ("fp8_e4m3fn" if layout == "plain" else "fp8_scaled")
    name = "blocks.1.ffn.2.weight"
    src = formats.open_component(c)
    assert set(src) == set(official)  # scales and the marker are hidden
    w8, scale = tf.to_fp8(official[name], scaled=layout != "plain")
    assert src.dtype(name) == torch.float32 and torch.equal(src[name], w8.float() * scale)
    for k, v in official.items():
        assert rel_err(src[k], v) < (0.03 if v.dim() == 2 else 1e-3), k
    raw = formats.open_component(c, fp8_dequantize=False)
    stored = sources.fp8_weight(raw, name)
    assert stored.weight.dtype == torch.float8_e4m3fn and raw.dtype(name) == torch.float8_e4m3fn
    assert stored.weight.untyped_storage().nbytes() == official[name].numel()  # 1 byte per weight
    assert torch.equal(stored.scale, scale)
    assert torch.equal(stored.weight.view(torch.uint8), w8.view(torch.uint8))
    assert sources.fp8_weight(raw, "blocks.1.ffn.2.bias") is None  # biases are 16-bit


GGUF_TOL = {"Q8_0": 0.01, "Q6_K": 0.03, "Q5_K": 0.05, "Q4_K": 0.1}


@pytest.mark.parametrize("qtype", list(GGUF_TOL))
def test_gguf_dequantises_per_tensor(t2v, qtype: str) -> None:
    root, official = t2v
    path = tf.write_gguf(root / f"Wan2.2-T2V-A14B-HighNoise-{qtype}.gguf", official, qtype)
    c = only(path)
    assert (c.format, c.role, c.variant, c.expert, c.precision) == (
        "gguf", "dit", "t2v-a14b", "high", f"gguf-{qtype}")
    src = formats.open_component(c)
    assert set(src) == set(official)
    assert src.shape("patch_embedding.weight") == (DIM, 16, 1, 2, 2)  # from comfy.gguf.orig_shape
    assert torch.equal(src["patch_embedding.weight"], official["patch_embedding.weight"])  # F32
    assert torch.equal(src["blocks.0.modulation"], official["blocks.0.modulation"])
    errors = {k: rel_err(src[k], v) for k, v in official.items() if v.dim() == 2}
    print(f"{qtype}: worst weight rel err {max(errors.values()):.4f}")
    assert max(errors.values()) < GGUF_TOL[qtype]
    raw = sources.quantized(src, "blocks.0.ffn.0.weight")
    assert raw.qtype == qtype and raw.data.dtype == torch.uint8 and raw.shape == (FFN, DIM)
    assert raw.data.numel() < official["blocks.0.ffn.0.weight"].numel() * (1.1 if qtype == "Q8_0" else 0.85)


@torch.inference_mode()
def test_every_dit_format_gives_the_official_output(t2v) -> None:
    from diffusers import WanTransformer3DModel

    root, official = t2v
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, *GRID, generator=gen)
    t = torch.tensor([700.0])
    ctx = torch.zeros(1, 512, TEXT_DIM)
    ctx[0, :9] = torch.randn(9, TEXT_DIM, generator=gen)

    def run(source) -> torch.Tensor:
        return build_dit(source, torch.float32)(x, t, ctx)

    want = run(DictSource(official))
    folder = tf.write_diffusers_dit(root / "out_transformer", official)
    assert torch.equal(run(formats.load_component(folder, "dit")), want)
    oracle = diffusers_from_folder(WanTransformer3DModel, folder)(x, t, ctx, return_dict=False)[0]
    assert rel_err(oracle, want) < 1e-4  # diffusers' own model on the same folder
    half = tf.write_comfy(root / "out_fp16.safetensors", official, prefix=tf.PREFIX)
    want16 = run(DictSource({k: v.half() for k, v in official.items()}))
    assert torch.equal(run(formats.load_component(half, "dit")), want16)
    errs = {}
    for name, path in (
        ("fp8_scaled", tf.write_comfy(root / "out_fp8.safetensors", official, fp8="scale_weight")),
        ("Q8_0", tf.write_gguf(root / "out_q8.gguf", official, "Q8_0")),
        ("Q4_K", tf.write_gguf(root / "out_q4k.gguf", official, "Q4_K")),
    ):
        errs[name] = rel_err(run(formats.load_component(path, "dit")), want)
    print("DiT output rel err:", errs)
    # Weight errors (see the tests above: ~0.5%, ~2.7%, ~8%) grow < 2.5x through the tiny DiT; a
    # wrong dequantisation or a swapped tensor would give errors of order 1.
    assert errs["Q8_0"] < 0.02 and errs["fp8_scaled"] < 0.08 and errs["Q4_K"] < 0.2
    assert errs["Q8_0"] < errs["fp8_scaled"] < errs["Q4_K"]


def test_fp8_dit_stays_fp8_in_memory(t2v) -> None:
    root, official = t2v
    path = tf.write_comfy(root / "keep_fp8.safetensors", official, fp8="scale_weight", prefix=tf.PREFIX)
    source = formats.load_component(path, "dit", fp8_dequantize=False)
    model = build_dit(source, None)
    q = model.blocks[0].self_attn.q.weight
    assert q.dtype == torch.float8_e4m3fn and q.untyped_storage().nbytes() == q.numel()
    fp8_bytes = sum(p.numel() for p in model.parameters() if p.dtype == torch.float8_e4m3fn)
    linear = sum(v.numel() for k, v in official.items() if v.dim() == 2)
    assert fp8_bytes == linear  # every Linear weight, no upcast copy
    assert model.blocks[0].modulation.dtype == torch.float32  # kept fp32 by the model's own rule


# ------------------------------------------------------------------------------ VAE formats
@pytest.mark.parametrize("version", ["2.1", "2.2"])
@torch.inference_mode()
def test_vae_formats_decode_like_official(tmp_path, version: str) -> None:
    from diffusers import AutoencoderKLWan

    from wan_lite.models.vae21 import WanVAE21
    from wan_lite.models.vae22 import WanVAE22

    cls = WanVAE21 if version == "2.1" else WanVAE22
    official = random_vae_state(version)
    z = torch.randn(1, official["conv2.weight"].shape[0], 2, 2, 2, generator=torch.Generator().manual_seed(4))
    want = build_vae(DictSource(official), version=version).decode(z)
    folder = tf.write_diffusers_vae(tmp_path / "vae", official, version)
    c = only(folder)
    assert (c.format, c.role, c.variant) == ("diffusers", "vae", version)
    same_tensors(formats.open_component(c), official)
    ours = build_vae(formats.load_component(folder, "vae"), version=version).decode(z)
    assert torch.equal(ours, want)
    # diffusers' decoder on the folder (no latent normalisation configured: mean 0, std 1)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1, 1) for v in (cls.latent_mean, cls.latent_std))
    oracle = diffusers_from_folder(AutoencoderKLWan, folder).decode(z * std + mean).sample
    assert rel_err(oracle, want) < 1e-4
    comfy = tf.write_comfy(tmp_path / f"wan{version}_vae.safetensors", official, dtype=torch.bfloat16)
    assert only(comfy).precision == "bf16"
    same_tensors(formats.load_component(comfy, "vae", model="ti2v-5b" if version == "2.2" else "t2v-a14b"),
                 official, torch.bfloat16)


# ------------------------------------------------------------------------------ text encoder formats
@pytest.fixture(scope="module")
def t5(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor], Path]:
    root = tmp_path_factory.mktemp("t5")
    tok = write_tokenizer(root / "google" / "umt5-xxl")
    return root, official_t5_state_dict(d_model=64, heads=4, d_ff=256, layers=2, vocab=384), tok


def test_t5_formats_present_official_tensors(t5) -> None:
    root, official, tok = t5
    folder = tf.write_diffusers_text_encoder(root / "text_encoder", official)
    c = only(folder)
    assert (c.format, c.role, c.naming) == ("diffusers", "text_encoder", "hf")
    same_tensors(formats.open_component(c), official)
    spiece = (tok / "spiece.model").read_bytes()
    half = tf.write_comfy_t5(root / "umt5_xxl_fp16.safetensors", official, spiece)
    c = only(half)
    assert (c.format, c.precision, c.has_tokenizer) == ("comfy", "fp16", True)
    same_tensors(formats.open_component(c), official, torch.float16)
    fp8_file = tf.write_comfy_t5(root / "umt5_fp8.safetensors", official, spiece, fp8="scale_weight")
    fp8 = formats.load_component(fp8_file, "text_encoder")
    assert sources.fp8_weight(fp8, "token_embedding.weight") is None  # the embedding stays 16-bit
    assert all(rel_err(fp8[k], v) < 0.03 for k, v in official.items())
    gguf = tf.write_gguf(root / "umt5-Q8_0.gguf", official, "Q8_0", arch="t5encoder",
                         rename=keymaps.t5_official_to_gguf)
    c = only(gguf)
    assert (c.format, c.role, c.naming, c.precision) == ("gguf", "text_encoder", "llama.cpp", "gguf-Q8_0")
    src = formats.open_component(c)
    assert set(src) == set(official) and all(rel_err(src[k], v) < 0.01 for k, v in official.items())


@torch.inference_mode()
def test_comfy_umt5_file_encodes_like_official(t5, tmp_path) -> None:
    from wan_lite.models.text_encoder import load_tokenizer

    root, official, tok = t5
    half = {k: v.half() for k, v in official.items()}
    spiece = (tok / "spiece.model").read_bytes()
    path = tf.write_comfy_t5(root / "umt5_xxl_fp16_enc.safetensors", official, spiece)
    built = formats.tokenizer_folder(path, tmp_path / "cache")
    assert formats.tokenizer_folder(path, tmp_path / "cache") == built  # written once, then reused
    prompts = ["a red fox jumps over the lazy dog, cinematic 4k", "一只猫在草地上奔跑，城市夜晚"]
    reference, from_file = load_tokenizer(tok), load_tokenizer(built)
    for p in prompts:
        assert from_file(p).input_ids == reference(p).input_ids
    want = build_text_encoder(DictSource(half), tok, dtype=torch.float32).encode(prompts)
    source = formats.load_component(path, "text_encoder")
    got = build_text_encoder(source, built, dtype=torch.float32).encode(prompts)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_expert_sides_come_from_folders_and_names(tmp_path, t5) -> None:
    from tests.tiny_ckpt.dit import write_dit

    _root, t5_official, tok = t5
    high, low = dit_state(seed=1), dit_state(seed=2)
    root = tf.write_diffusers_pipeline(tmp_path / "pipe", [high, low], random_vae_state("2.1"), "2.1",
                                       t5_official, tok)
    for side, want in (("high", high), ("low", low)):
        same_tensors(formats.load_component(root, "dit", model="t2v-a14b", expert=side), want)
    assert only(root / "transformer_2").expert == "low"  # also when the subfolder is named directly
    assert "Swap" in message(root / "transformer_2", "dit", model="t2v-a14b", expert="high")
    assert formats.tokenizer_folder(root, tmp_path / "cache") == root / "tokenizer"
    same_tensors(formats.load_component(root, "text_encoder"), t5_official)
    official = tmp_path / "Wan2.2-T2V-A14B"
    write_dit(official / "high_noise_model", in_dim=16, out_dim=16, model_type="t2v", text_dim=TEXT_DIM)
    write_dit(official / "low_noise_model", in_dim=16, out_dim=16, model_type="t2v", text_dim=TEXT_DIM,
              seed=1)
    found = formats.detect(official)
    assert sorted((c.format, c.variant, c.expert) for c in found) == [
        ("official", "t2v-a14b", "high"), ("official", "t2v-a14b", "low")]


# ------------------------------------------------------------------------------ wrong files
def message(path: Path, role: str, **kw) -> str:
    with pytest.raises(CheckpointError) as info:
        formats.load_component(path, role, **kw)
    return str(info.value)


def test_each_wrong_file_is_named_with_what_it_is(tmp_path) -> None:
    from safetensors.torch import save_file

    from tests.tiny_ckpt.dit import write_dit

    i2v = dit_state(36, 16)
    wan21 = tf.write_comfy(tmp_path / "i2v_high.safetensors", tf.wan21_i2v_state(i2v))
    msg = message(wan21, "dit", model="i2v-a14b", expert="high")
    assert "Wan 2.1" in msg and "img_emb" in msg and "high-noise expert of Wan2.2 I2V-A14B" in msg

    vae21 = tf.write_comfy(tmp_path / "renamed_vae.safetensors", random_vae_state("2.1"))
    msg = message(vae21, "vae", model="ti2v-5b")
    assert "Wan 2.1 VAE" in msg and "needs the Wan 2.2 VAE" in msg and "Wan2.2_VAE.pth" in msg

    lora = tf.write_lora(tmp_path / "wan_style_lora.safetensors", i2v)
    msg = message(lora, "dit", model="i2v-a14b")
    assert "is a LoRA, not a model" in msg

    full = tf.write_comfy(tmp_path / "full.safetensors", i2v)
    msg = message(tf.truncate(full, tmp_path / "cut.safetensors"), "dit")
    assert "truncated" in msg and "download" in msg.lower()
    gguf = tf.write_gguf(tmp_path / "full.gguf", i2v, "Q8_0")
    msg = message(tf.truncate(gguf, tmp_path / "cut.gguf"), "dit")
    assert "cut.gguf" in msg and ("truncated" in msg or "not a readable GGUF" in msg)

    sharded = tmp_path / "Wan2.2-I2V-A14B" / "high_noise_model"
    write_dit(sharded, in_dim=36, out_dim=16, model_type="i2v", text_dim=TEXT_DIM, shards=3)
    next(sharded.glob("*-00002-of-00003.safetensors")).unlink()
    msg = message(sharded, "dit", model="i2v-a14b", expert="high")
    assert "1 of 3 file(s) are missing" in msg and "00002-of-00003" in msg

    tensors, meta = tf.comfy_state(i2v, fp8="weight_scale")
    meta["_quantization_metadata"] = json.dumps({"layers": {"blocks.0.ffn.0": {"format": "nvfp4"}}})
    save_file(tensors, str(tmp_path / "nvfp4.safetensors"), metadata=meta)
    assert "'nvfp4'" in message(tmp_path / "nvfp4.safetensors", "dit")

    msg = message(full, "vae")
    assert "expected a VAE" in msg and "I2V-A14B" in msg
    msg = message(full, "dit", model="ti2v-5b")
    assert "TI2V-5B needs its own DiT" in msg
    low = tf.write_comfy(tmp_path / "wan2.2_i2v_low_noise_14B_fp16.safetensors", i2v)
    assert "Swap" in message(low, "dit", model="i2v-a14b", expert="high")
    t2v21 = tf.write_comfy(tmp_path / "wan2.1_t2v_14B_fp16.safetensors", dit_state(16, 16))
    assert "Wan 2.1 T2V-14B" in message(t2v21, "dit", model="t2v-a14b")


def test_renamed_file_is_recognised_by_content(t2v, tmp_path) -> None:
    root, official = t2v
    path = tf.write_comfy(root / "wan2.2_t2v_high_noise_14B_fp16.safetensors", official)
    copy = tmp_path / "my_model.safetensors"
    shutil.copy(path, copy)
    a, b = only(path), only(copy)
    assert (b.role, b.variant, b.precision) == (a.role, a.variant, a.precision) == ("dit", "t2v-a14b", "fp16")
    assert a.expert == "high" and b.expert is None  # the side is only in the name
    other = tf.write_comfy(tmp_path / "other.safetensors", official, dtype=torch.bfloat16)
    assert discovery.fingerprint(a.files) == discovery.fingerprint(b.files) != discovery.fingerprint([other])
    assert discovery.content_hash(path) == discovery.content_hash(copy)


# ------------------------------------------------------------------------------ discovery
def test_discovery_finds_components_everywhere_and_remembers_choices(tmp_path, t5, monkeypatch) -> None:
    _root, t5_official, tok = t5
    official = dit_state(48, 48)
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("WAN_LITE_CONFIG_DIR", str(tmp_path / "config"))
    # HF cache: a diffusers pipeline whose files are symlinks into blobs/, as huggingface_hub stores them
    staging = tf.write_diffusers_pipeline(tmp_path / "stage", [official], random_vae_state("2.2"), "2.2",
                                          t5_official, tok)
    repo = cache / "models--Wan-AI--Wan2.2-TI2V-5B-Diffusers"
    snap = repo / "snapshots" / "abc123"
    for f in staging.rglob("*"):
        if f.is_file():
            blob = repo / "blobs" / hashlib.sha256(str(f.relative_to(staging)).encode()).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, blob)
            (snap / f.relative_to(staging)).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(blob, snap / f.relative_to(staging))
    comfy = tmp_path / "ComfyUI" / "models"
    dit_file = tf.write_comfy(comfy / "diffusion_models" / "wan2.2_ti2v_5B_fp16.safetensors", official)
    tf.write_comfy(comfy / "vae" / "wan2.2_vae.safetensors", random_vae_state("2.2"))
    tf.write_lora(comfy / "loras" / "style.safetensors", official)
    shutil.copy(dit_file, comfy / "diffusion_models" / "copy_of_5b.safetensors")
    (comfy / "text_encoders").mkdir()
    tf.truncate(dit_file, comfy / "text_encoders" / "broken.safetensors")

    found = discovery.scan(discovery.default_places(comfy_dirs=[comfy]))
    by = {(f.location, f.component.role, f.component.format) for f in found}
    assert {("hf-cache", "dit", "diffusers"), ("hf-cache", "vae", "diffusers"),
            ("hf-cache", "text_encoder", "diffusers"), ("hf-cache", "tokenizer", "official"),
            ("comfyui", "dit", "comfy"), ("comfyui", "vae", "comfy"), ("comfyui", "lora", "comfy"),
            ("comfyui", "broken", "?")} <= by
    assert {f.repo for f in found if f.location == "hf-cache"} == {"Wan-AI/Wan2.2-TI2V-5B-Diffusers"}
    slots = discovery.candidates(found, "ti2v-5b")
    assert len(slots["dit"]) == 3 and len(slots["vae"]) == 2 and slots["text_encoder"] and slots["tokenizer"]
    assert not discovery.candidates(found, "t2v-a14b")["dit_high"]
    copies = discovery.find_copies(found)
    assert len(copies) == 1 and len(next(iter(copies.values()))) == 2

    choices = discovery.RememberedChoices()
    choices.add_comfy_dir(comfy)
    chosen = next(f.component for f in slots["dit"] if f.location == "comfyui")
    choices.choose("ti2v-5b", "dit", chosen)
    choices.save()
    again = discovery.RememberedChoices()
    assert again.comfy_dirs == [comfy.resolve()] and again.resolve("ti2v-5b") == {"dit": chosen.path}
    moved = tmp_path / "elsewhere" / "renamed.safetensors"
    moved.parent.mkdir()
    shutil.move(chosen.path, moved)
    assert again.resolve("ti2v-5b") == {}  # gone from where it was remembered
    assert again.resolve("ti2v-5b", discovery.scan([("user", moved.parent)])) == {"dit": moved}
