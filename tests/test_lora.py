"""LoRA files: key conventions, merge as read, strengths, bad files, the FILE:STRENGTH syntax.

Oracles: diffusers' own Wan LoRA conversion (`WanLoraLoaderMixin.lora_state_dict`, which turns
ComfyUI / musubi keys into PEFT keys) merged into diffusers' `WanTransformer3DModel` the way
PEFT does (W + strength * lora_alpha / r * B @ A, bias + ... * lora_B.bias) and run there; with
PEFT installed also PEFT's own layers (`load_lora_adapter`). For what diffusers cannot load (norm
and modulation deltas, patch embedding), the hand merge W + s * alpha / r * up @ down.
Unmerged LoRAs at run time: test_lora_runtime.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tests.tiny_ckpt.dit import official_dit_shapes
from tests.tiny_ckpt.lora import (
    BLOCK_LINEARS,
    CH,
    DIM,
    FFN,
    LAYERS,
    OUTSIDE_LINEARS,
    TEXT_DIM,
    combine,
    diffusers_module,
    dit,
    full_lora,
    hand_merge,
    lora_keys,
    make_lora,
    rel_err,
    run,
    two_loras,
    write_lora,
)
from wan_lite.errors import CheckpointError, InputError
from wan_lite.loading.lora import LoRASource, official_module, parse_lora_arg, read_lora
from wan_lite.loading.tensors import DictSource

# ------------------------------------------------------------------------------- key names
CONVENTIONS = ("comfy", "comfy_ab", "bare", "kohya", "peft", "peft_default")


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_every_layer_is_reachable_in_every_convention(tmp_path, state, convention: str) -> None:
    lora = full_lora(state)
    lf = read_lora(write_lora(tmp_path / "x.safetensors", lora, convention))
    want = set()
    for module, parts in lora.items():
        if "down" in parts or "diff" in parts:
            want.add(module if module.endswith("modulation") else f"{module}.weight")
        if "diff_b" in parts:
            want.add(f"{module}.bias")
    assert set(lf.params()) == want
    lf.check({k: v.shape for k, v in state.items()})
    # a merged read equals the hand merge, whatever the names were
    merged, ref = LoRASource(DictSource(state), [(lf, 0.7)]), hand_merge(state, lora, 0.7)
    for name in want:
        torch.testing.assert_close(merged.read(name), ref[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("spelled,official", [
    ("blocks_3_cross_attn_norm_k", "blocks.3.cross_attn.norm_k"), ("blocks_0_ffn_0", "blocks.0.ffn.0"),
    ("blocks_12_ffn_2", "blocks.12.ffn.2"), ("time_projection_1", "time_projection.1"),
    ("text_embedding_2", "text_embedding.2"), ("head_head", "head.head"), ("blocks_7_norm3", "blocks.7.norm3"),
    ("blocks_1_attn1_to_out_0", "blocks.1.self_attn.o"), ("blocks.1.attn2.norm_k", "blocks.1.cross_attn.norm_k"),
    ("blocks.0.norm2", "blocks.0.norm3"), ("proj_out", "head.head"), ("blocks.4.modulation", "blocks.4.modulation"),
    ("condition_embedder.time_proj", "time_projection.1"), ("blocks.0.ffn.net.0.proj", "blocks.0.ffn.0"),
    ("blocks_0_self_attn_qq", None), ("blocks.0.norm1", None), ("lora_te_text_model_encoder", None),
])
def test_module_names_map_back_unambiguously(spelled: str, official: str | None) -> None:
    assert official_module(spelled) == official


# ------------------------------------------------------------------------ diffusers oracle
def diffusers_state(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in official.items():
        if key.endswith("modulation"):
            out[diffusers_module(key)] = value
        else:
            module, _, param = key.rpartition(".")
            out[f"{diffusers_module(module)}.{param}"] = value
    return out


def diffusers_dit(official: dict[str, torch.Tensor]):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=DIM // 128, attention_head_dim=128, in_channels=CH,
        out_channels=CH, text_dim=TEXT_DIM, freq_dim=256, ffn_dim=FFN, num_layers=LAYERS,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
    )
    model.load_state_dict(diffusers_state(official), strict=True)
    return model.eval()


def diffusers_lora(path):
    """diffusers' own reading of a LoRA file: (PEFT-named state dict, adapter metadata)."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    sd, meta = WanLoraLoaderMixin.lora_state_dict(str(path.parent), weight_name=path.name, return_lora_metadata=True)
    return {k.removeprefix("transformer."): v for k, v in sd.items()}, meta


def peft_merge(official: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], meta, strength: float) -> dict:
    """PEFT's merge of a diffusers LoRA state dict into diffusers-named weights."""
    weights = diffusers_state(official)
    scaling = strength * (meta["lora_alpha"] / meta["r"] if meta else 1.0)
    for key, a in sd.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        b = sd[f"{module}.lora_B.weight"].float()
        w = weights[f"{module}.weight"]
        weights[f"{module}.weight"] = w + scaling * (b.flatten(1) @ a.float().flatten(1)).reshape(w.shape)
        if f"{module}.lora_B.bias" in sd:
            weights[f"{module}.bias"] = weights[f"{module}.bias"] + scaling * sd[f"{module}.lora_B.bias"]
    return weights


def diffusers_run(weights: dict[str, torch.Tensor] | None, inputs, model) -> torch.Tensor:
    x, t, ctx = inputs
    with torch.inference_mode():
        if weights is not None:
            model.load_state_dict(weights, strict=True)
        return model(x, t, ctx, return_dict=False)[0].float()


def oracle_lora(state, convention: str) -> dict:
    """What diffusers' converters accept: every block Linear (alpha), for ComfyUI keys also the
    embeddings and time projection (no alpha) and head.head as diff + diff_b, with bias deltas."""
    lora = make_lora(state, [f"blocks.{n}.{m}" for n in range(LAYERS) for m in BLOCK_LINEARS], seed=3, size=1.0)
    if convention in ("comfy", "comfy_ab"):
        lora = combine(lora, make_lora(state, [m for m in OUTSIDE_LINEARS if m != "head.head"], alpha=None, seed=4,
                                       diffs=["head.head"], diff_bs=["head.head", "time_projection.1",
                                                                     "blocks.0.self_attn.k", "blocks.1.cross_attn.o",
                                                                     "blocks.0.ffn.0"]))
    if convention.startswith("peft"):
        lora = combine(lora, make_lora(state, [*OUTSIDE_LINEARS, "patch_embedding"], alpha=None, seed=4))
        for parts in lora.values():
            parts.pop("alpha", None)  # PEFT files carry lora_alpha in their metadata instead
    return lora


@pytest.mark.parametrize("convention", ["comfy", "comfy_ab", "kohya", "peft"])
def test_merged_lora_matches_diffusers(tmp_path, state, inputs, convention: str) -> None:
    lora = oracle_lora(state, convention)
    peft_alpha = 6.0 if convention == "peft" else None
    # float32: diffusers' converters fold alpha into the factors in the file's dtype (a bf16
    # rounding of the whole delta), which would hide a real difference of that size.
    path = write_lora(tmp_path / f"{convention}.safetensors", lora, convention, peft_alpha=peft_alpha)
    strength = 0.8
    ours = run(dit(LoRASource(DictSource(state), [(read_lora(path), strength)])), inputs)

    sd, meta = diffusers_lora(path)
    model = diffusers_dit(state)
    theirs = diffusers_run(peft_merge(state, sd, meta, strength), inputs, model)
    base = diffusers_run(None, inputs, diffusers_dit(state))
    assert rel_err(theirs, base) > 0.01  # the LoRA changes the output ...
    assert rel_err(ours, theirs) < 1e-4  # ... and in the same way

    if peft_alpha is not None:
        for parts in lora.values():
            parts["alpha"] = torch.tensor(peft_alpha)
    hand = run(dit(hand_merge(state, lora, strength)), inputs)
    assert rel_err(ours, hand) < 1e-6


def test_peft_layers_give_the_same_output(tmp_path, state, inputs) -> None:
    """diffusers' real LoRA loading (PEFT layers around each Linear, unmerged) on a ComfyUI file."""
    pytest.importorskip("peft")
    lora = oracle_lora(state, "comfy")
    path = write_lora(tmp_path / "comfy.safetensors", lora, "comfy")
    sd, _meta = diffusers_lora(path)
    model = diffusers_dit(state)
    model.load_lora_adapter({f"transformer.{k}": v for k, v in sd.items()}, prefix="transformer", adapter_name="x")
    model.set_adapters(["x"], weights=[0.8])
    theirs = diffusers_run(None, inputs, model)
    ours = run(dit(LoRASource(DictSource(state), [(read_lora(path), 0.8)])), inputs)
    assert rel_err(ours, theirs) < 1e-4


def test_full_deltas_merge_into_norms_modulation_head_and_patch_embedding(tmp_path, state, inputs) -> None:
    lora = make_lora(state, ["patch_embedding"], alpha=1.5, seed=5,
                     diffs=["blocks.0.norm3", "blocks.0.self_attn.norm_k", "blocks.0.modulation", "head.modulation",
                            "head.head"], diff_bs=["blocks.0.norm3", "head.head", "patch_embedding"])
    diff_m = 0.1 * torch.randn(1, 6, DIM, generator=torch.Generator().manual_seed(6))
    path = write_lora(tmp_path / "distill.safetensors", lora, "comfy", extra={"diffusion_model.blocks.1.diff_m": diff_m})
    lora["blocks.1.modulation"] = {"diff": diff_m}
    merged = LoRASource(DictSource(state), [(read_lora(path), 0.6)])
    ref = hand_merge(state, lora, 0.6)
    assert merged.changed == {"patch_embedding.weight", "patch_embedding.bias", "blocks.0.norm3.weight",
                              "blocks.0.norm3.bias", "blocks.0.self_attn.norm_k.weight", "blocks.0.modulation",
                              "blocks.1.modulation", "head.modulation", "head.head.weight", "head.head.bias"}
    for name in state:
        torch.testing.assert_close(merged.read(name), ref[name], rtol=1e-6, atol=1e-7)
    assert rel_err(run(dit(merged), inputs), run(dit(ref), inputs)) < 1e-6


# ------------------------------------------------------------------- strengths, several LoRAs
def test_strength_zero_reads_the_base_bit_for_bit(tmp_path, state) -> None:
    lf = read_lora(write_lora(tmp_path / "x.safetensors", full_lora(state), "kohya"))
    base = DictSource(state)
    other = read_lora(write_lora(tmp_path / "y.safetensors", make_lora(state, ["blocks.0.ffn.0"]), "comfy"))
    for zero in (LoRASource(base, [(lf, 0.0)]), LoRASource(base, [(lf, 0.0), (other, 0.6)])):
        for name in state:
            if name not in zero.changed:
                for dtype in (None, torch.bfloat16, torch.float16):
                    assert torch.equal(zero.read(name, dtype), base.read(name, dtype))
    assert LoRASource(base, [(lf, 0.0), (other, 0.6)]).changed == {"blocks.0.ffn.0.weight"}


def test_several_loras_add(tmp_path, state, inputs) -> None:
    a, b, fa, fb = two_loras(tmp_path, state)
    merged = LoRASource(DictSource(state), [(fa, 0.5), (fb, -0.7)])
    ref = hand_merge(hand_merge(state, a, 0.5), b, -0.7)
    for name in state:
        torch.testing.assert_close(merged.read(name), ref[name], rtol=1e-6, atol=1e-6)
    assert rel_err(run(dit(merged), inputs), run(dit(ref), inputs)) < 1e-6


def test_peft_metadata_alpha_and_patterns(tmp_path, state) -> None:
    lora = make_lora(state, ["blocks.0.self_attn.q", "blocks.0.ffn.0"], rank=4, alpha=None)
    meta = {"r": 4, "lora_alpha": 8, "alpha_pattern": {"blocks.0.attn1.to_q": 2}}
    tensors = {k: v.contiguous() for k, v in lora_keys(lora, "peft").items()}
    save_file(tensors, str(tmp_path / "p.safetensors"), metadata={"lora_adapter_metadata": json.dumps(meta)})
    lf = read_lora(tmp_path / "p.safetensors")
    assert lf.layers["blocks.0.self_attn.q"].scale(0.5) == 0.5 * 2 / 4
    assert lf.layers["blocks.0.ffn.0"].scale(0.5) == 0.5 * 8 / 4
    meta = {"r": 4, "lora_alpha": 8, "use_rslora": True}
    save_file(tensors, str(tmp_path / "r.safetensors"), metadata={"lora_adapter_metadata": json.dumps(meta)})
    assert read_lora(tmp_path / "r.safetensors").layers["blocks.0.ffn.0"].scale(1.0) == 8 / 2


# ------------------------------------------------------------------------------------ bad files
def test_a_14b_lora_on_the_5b_model_names_both(tmp_path) -> None:
    shapes = official_dit_shapes(in_dim=48, out_dim=48, dim=3072, ffn_dim=14336, num_layers=30)
    big = {f"blocks.{n}.self_attn.q": {"down": torch.zeros(2, 5120), "up": torch.zeros(5120, 2)} for n in (0, 35)}
    lf = read_lora(write_lora(tmp_path / "wan14b_style.safetensors", big, "comfy"))
    with pytest.raises(CheckpointError, match=r"(?s)wan14b_style.*5120 wide.*14B.*3072 wide.*TI2V-5B"):
        lf.check(shapes)
    with pytest.raises(CheckpointError, match="5120 wide"):
        LoRASource(DictSource({k: torch.empty(v, device="meta") for k, v in shapes.items()}), [(lf, 1.0)])


def test_truncated_lora(tmp_path, state) -> None:
    path = write_lora(tmp_path / "cut.safetensors", full_lora(state), "comfy")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"LoRA file.*cut\.safetensors.*truncated"):
        read_lora(path)
    (tmp_path / "junk.safetensors").write_bytes(b"\x05")
    with pytest.raises(CheckpointError, match="junk.safetensors is not a readable safetensors"):
        read_lora(tmp_path / "junk.safetensors")


def test_a_model_file_is_not_a_lora(tmp_path, state) -> None:
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors holds no LoRA tensors.*Wan DiT"):
        read_lora(tmp_path / "model.safetensors")


def test_unknown_keys_are_listed(tmp_path, state) -> None:
    lora = make_lora(state, ["blocks.0.self_attn.q"], seed=13)
    extra = {"diffusion_model.blocks.0.self_attn.q_proj.lora_down.weight": torch.zeros(2, DIM),
             "diffusion_model.blocks.0.self_attn.q.weight": torch.zeros(DIM, DIM)}
    with pytest.raises(CheckpointError, match=r"target no layer.*q\.weight.*q_proj\.lora_down"):
        read_lora(write_lora(tmp_path / "a.safetensors", lora, "comfy", extra=extra))
    lora["blocks.5.ffn.0"] = make_lora(state, ["blocks.1.ffn.0"])["blocks.1.ffn.0"]
    lf = read_lora(write_lora(tmp_path / "b.safetensors", lora, "kohya"))
    with pytest.raises(CheckpointError, match=r"target nothing in this DiT \(2 blocks\): blocks\.5\.ffn\.0"):
        lf.check({k: v.shape for k, v in state.items()})


@pytest.mark.parametrize("key,kind", [("lora_unet_blocks_0_ffn_0.lokr_w1", "LoKr"),
                                      ("diffusion_model.blocks.0.ffn.0.dora_scale", "DoRA"),
                                      ("lora_unet_blocks_0_ffn_0.hada_w1_a", "LoHa")])
def test_other_adapter_kinds_are_named(tmp_path, state, key, kind) -> None:
    path = write_lora(tmp_path / "x.safetensors", make_lora(state, ["blocks.0.ffn.0"]), "comfy",
                      extra={key: torch.zeros(4, 4)})
    with pytest.raises(CheckpointError, match=kind):
        read_lora(path)


def test_incomplete_pair(tmp_path, state) -> None:
    lora = make_lora(state, ["blocks.0.ffn.0", "blocks.0.ffn.2"])
    del lora["blocks.0.ffn.2"]["up"]
    with pytest.raises(CheckpointError, match=r"incomplete.*ffn\.2\.lora_down"):
        read_lora(write_lora(tmp_path / "x.safetensors", lora, "comfy"))


def test_wan21_image_branch_is_skipped_with_a_note(tmp_path, state) -> None:
    lora = make_lora(state, ["blocks.0.cross_attn.k"])
    extra = {f"diffusion_model.blocks.0.cross_attn.{p}.lora_down.weight": torch.zeros(2, DIM) for p in ("k_img", "v_img")}
    extra.update({f"diffusion_model.blocks.0.cross_attn.{p}.lora_up.weight": torch.zeros(DIM, 2) for p in ("k_img", "v_img")})
    extra["diffusion_model.img_emb.proj.1.lora_down.weight"] = torch.zeros(2, 1280)
    lf = read_lora(write_lora(tmp_path / "i2v21.safetensors", lora, "comfy", extra=extra))
    assert set(lf.layers) == {"blocks.0.cross_attn.k"}
    assert any("skipped 5 Wan 2.1 image-branch" in n for n in lf.notes)


def test_a_bad_lora_among_good_ones_fails_before_any_read(tmp_path, state) -> None:
    good = read_lora(write_lora(tmp_path / "good.safetensors", full_lora(state), "comfy"))
    wide = {"blocks.0.ffn.0": {"down": torch.zeros(2, 2 * DIM), "up": torch.zeros(FFN, 2)}}
    bad = read_lora(write_lora(tmp_path / "bad.safetensors", wide, "comfy"))
    with pytest.raises(CheckpointError, match=r"bad\.safetensors does not fit.*ffn\.0\.lora_down"):
        LoRASource(DictSource(state), [(good, 1.0), (bad, 1.0)])


# ------------------------------------------------------------------------------ strength syntax
@pytest.mark.parametrize("arg,want", [
    ("style.safetensors", ("style.safetensors", 1.0, 1.0)),
    ("style.safetensors:0.8", ("style.safetensors", 0.8, 0.8)),
    ("lightning.safetensors:1,0", ("lightning.safetensors", 1.0, 0.0)),
    ("a/b:c.safetensors:-0.5", ("a/b:c.safetensors", -0.5, -0.5)),
    (r"C:\loras\x.safetensors:0.8", (r"C:\loras\x.safetensors", 0.8, 0.8)),
    (r"C:\loras\x.safetensors", (r"C:\loras\x.safetensors", 1.0, 1.0)),
    ("D:/loras/x.safetensors:0,1.25", ("D:/loras/x.safetensors", 0.0, 1.25)),
])
def test_parse_lora_arg(arg: str, want) -> None:
    got = parse_lora_arg(arg)
    assert (str(got.path), got.high, got.low) == want


@pytest.mark.parametrize("arg", ["x.safetensors:abc", "x.safetensors:nan", "x.safetensors:inf", "x.safetensors:1e999",
                                 "x.safetensors:1,2,3", "x.safetensors:", "x.safetensors:0.5,", ":0.5"])
def test_parse_lora_arg_refuses_bad_strengths(arg: str) -> None:
    with pytest.raises(InputError, match=r"(?s)LoRA argument.*FILE:HIGH,LOW") as err:
        parse_lora_arg(arg)
    assert repr(arg) in str(err.value)
