"""LoRAs unmerged at run time (wan_lite.runtime.lora) on the tiny DiT: the same output as the
LoRA merged as read (loading.lora.LoRASource, checked against diffusers in test_lora.py), on float,
int8 / fp8 (`QuantizedLinear`) and GGUF layers; detach gives the base back bit for bit."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_ckpt.lora import (
    BLOCK_LINEARS,
    DIM,
    FFN,
    LAYERS,
    dit,
    full_lora,
    make_lora,
    rel_err,
    run,
    two_loras,
    write_lora,
)
from wan_lite.errors import CheckpointError
from wan_lite.loading.lora import LoRASource, read_lora
from wan_lite.loading.tensors import DictSource
from wan_lite.runtime.lora import attach_loras, attached_loras, detach_loras, lora_bytes, loras_to


def test_unmerged_equals_merged_and_detach_restores(tmp_path, state, inputs) -> None:
    lora = full_lora(state, seed=9)
    lf = read_lora(write_lora(tmp_path / "x.safetensors", lora, "comfy_ab"))
    want = run(dit(LoRASource(DictSource(state), [(lf, 0.8)])), inputs)
    model = dit(state)
    before = run(model, inputs)
    attachment = attach_loras(model, [lf], [0.8], dtype=torch.float32)
    assert set(attachment.hooks) == {f"blocks.{n}.{m}" for n in range(LAYERS) for m in BLOCK_LINEARS}
    # outside the blocks (read with F.linear by the DiT), norms, modulation and biases: merged
    assert {"head.head.weight", "text_embedding.0.weight", "patch_embedding.weight", "blocks.0.norm3.weight",
            "blocks.1.modulation", "blocks.0.self_attn.q.bias"} <= set(attachment.merged)
    factors = sum(t.numel() * 4 for h in attachment.hooks.values() for t in (h.down, h.up))
    assert lora_bytes(model) == factors == attachment.factor_bytes()
    assert rel_err(run(model, inputs), want) < 1e-5
    loras_to(model, "cpu")
    assert attachment.hooks["blocks.0.ffn.2"].up.device.type == "cpu"

    detach_loras(model)
    assert attached_loras(model) is None and lora_bytes(model) == 0
    assert torch.equal(run(model, inputs), before)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name


# gain: how much closer to the merge the LoRA brings the quantized model; int4's own error (0.04
# here) is most of what is left (measured: 0.078 without the LoRA, 0.040 with it)
@pytest.mark.parametrize("fmt,tol,gain", [("int8", 0.02, 3), ("fp8", 0.06, 3), ("int4", 0.06, 1.5)])
def test_quantized_base_with_unmerged_lora_is_close_to_the_bf16_merge(tmp_path, state, inputs, fmt, tol,
                                                                      gain) -> None:
    from wan_lite.runtime.quant import QuantizedLinear, quantize_model

    lora = full_lora(state, seed=10)
    lf = read_lora(write_lora(tmp_path / "x.safetensors", lora, "kohya", dtype=torch.bfloat16))
    want = run(dit(LoRASource(DictSource(state), [(lf, 1.0)]), torch.bfloat16), inputs)
    model = dit(state, torch.bfloat16)
    quantize_model(model, fmt)
    assert isinstance(model.blocks[0].ffn[2], QuantizedLinear) and model.blocks[0].ffn[2].input_gelu  # GELU folded
    without = run(model, inputs)
    attach_loras(model, [lf], [1.0])
    assert lora_bytes(model) == lf.unmerged_bytes(torch.bfloat16)  # what the planner can count beforehand
    got = run(model, inputs)
    assert rel_err(got, want) < min(tol, rel_err(without, want) / gain)


def test_hook_sees_fp8_rows_and_gguf_layers() -> None:
    gguf = pytest.importorskip("gguf")
    from wan_lite.models.fp8_rows import Fp8Rows
    from wan_lite.runtime.gguf_linear import GGUFLinear
    from wan_lite.runtime.lora import _LowRank
    from wan_lite.runtime.quant import QuantizedLinear

    gen = torch.Generator().manual_seed(11)
    w, b, x = torch.randn(64, 128, generator=gen) / 11, torch.randn(64, generator=gen), torch.randn(5, 128, generator=gen)
    down, up = torch.randn(3, 128, generator=gen) / 11, torch.randn(64, 3, generator=gen)
    data = torch.from_numpy(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0))
    layers = [GGUFLinear.from_blocks(data.reshape(64, -1), "Q8_0", (64, 128), b),
              QuantizedLinear.from_linear(torch.nn.Linear(128, 64).requires_grad_(False), "fp8")]
    for layer in layers:
        plain = layer(x)
        layer.register_forward_hook(_LowRank(down, up, None))
        torch.testing.assert_close(layer(x), plain + x @ down.T @ up.T)
    scale = x.abs().amax(dim=1, keepdim=True) / 448
    rows = Fp8Rows((x / scale).to(torch.float8_e4m3fn), scale, torch.float32)
    xr = rows.dequantized()
    torch.testing.assert_close(layers[1](rows), layers[1](xr))  # the hook used the rows' values


def test_refill_from_disk_keeps_the_lora(tmp_path, state, inputs) -> None:
    from wan_lite.runtime import streaming
    from wan_lite.runtime.quant import quantize_model

    lf = read_lora(write_lora(tmp_path / "x.safetensors", full_lora(state, seed=12), "comfy"))
    model = dit(state, torch.bfloat16)
    quantize_model(model, "int8")
    base = DictSource({k: v.clone() for k, v in model.state_dict().items()})  # as the quantized cache holds it
    attachment = attach_loras(model, [lf], [1.0])
    before = run(model, inputs)
    source = attachment.refill_source(base)
    assert source.changed == set(attachment.merged)
    streaming.set_expert_source(model, source)
    streaming.move_expert(model, "disk")
    streaming.move_expert(model, "ram")
    assert torch.equal(run(model, inputs), before)


def test_attach_refuses_a_streamed_model(tmp_path, state) -> None:
    from wan_lite.runtime import streaming

    lf = read_lora(write_lora(tmp_path / "x.safetensors", make_lora(state, ["blocks.1.ffn.0"]), "comfy"))
    model = dit(state)
    streaming.attach(model, "cpu")
    with pytest.raises(RuntimeError, match="streamer"):
        attach_loras(model, [lf], [1.0])
    streaming.detach_streamer(model)
    attach_loras(model, [lf], [1.0])
    streaming.attach(model, "cpu")
    with pytest.raises(RuntimeError, match="streamer"):
        detach_loras(model)


def test_strength_zero_attaches_nothing(tmp_path, state, inputs) -> None:
    lf = read_lora(write_lora(tmp_path / "x.safetensors", full_lora(state), "kohya"))
    model = dit(state)
    before = run(model, inputs)
    attachment = attach_loras(model, [lf], [0.0])
    assert not attachment.hooks and not attachment.merged and lora_bytes(model) == 0
    assert torch.equal(run(model, inputs), before)


def test_several_loras_stack_into_one_pair_per_layer(tmp_path, state, inputs) -> None:
    _a, _b, fa, fb = two_loras(tmp_path, state)
    want = run(dit(LoRASource(DictSource(state), [(fa, 0.5), (fb, -0.7)])), inputs)
    model = dit(state)
    attachment = attach_loras(model, [fa, fb], [0.5, -0.7], dtype=torch.float32)
    assert attachment.hooks["blocks.0.self_attn.q"].down.shape == (3 + 2, DIM)  # both LoRAs, one pair of GEMMs
    assert rel_err(run(model, inputs), want) < 1e-5
    attach_loras(model, [fb], [1.0], dtype=torch.float32)  # attaching again replaces, never stacks
    assert set(attached_loras(model).hooks) == {"blocks.0.self_attn.q", "blocks.0.cross_attn.v"}
    assert rel_err(run(model, inputs), run(dit(LoRASource(DictSource(state), [(fb, 1.0)])), inputs)) < 1e-5


def test_a_bad_lora_leaves_the_model_as_it_was(tmp_path, state, inputs) -> None:
    good = read_lora(write_lora(tmp_path / "good.safetensors", full_lora(state), "comfy"))
    wide = {"blocks.0.ffn.0": {"down": torch.zeros(2, 2 * DIM), "up": torch.zeros(FFN, 2)}}
    bad = read_lora(write_lora(tmp_path / "bad.safetensors", wide, "comfy"))
    model = dit(state)
    before = run(model, inputs)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        attach_loras(model, [good, bad], [1.0, 1.0])
    assert attached_loras(model) is None
    assert torch.equal(run(model, inputs), before)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_merge_into_the_models_own_tensors_equals_the_merge_as_read(tmp_path, state, device) -> None:
    """use_loras merges a first LoRA into a bf16 model from the model's own tensors (no second read
    of the base): each tensor as LoRASource reads it merged on that device, bit for bit; a new
    strength re-reads the base (not merged on top); off gives the base back bit for bit."""
    from wan_lite.runtime import streaming
    from wan_lite.runtime.lora import use_loras

    bf16 = {k: v.bfloat16() for k, v in state.items()}
    base = DictSource(bf16)
    lf = read_lora(write_lora(tmp_path / "x.safetensors", full_lora(state, seed=9), "comfy_ab"))
    model = dit({k: v.clone() for k, v in bf16.items()}, torch.bfloat16).to(device)  # not the base's tensors
    streaming.set_expert_source(model, base)
    reads = []
    original_read = base.read
    base.read = lambda name, *a, **k: reads.append(name) or original_read(name, *a, **k)
    for strength in (0.8, 0.3):
        reads.clear()
        assert use_loras(model, [lf], [strength]) == "merged"
        want = LoRASource(DictSource(bf16), [(lf, strength)])
        for name, value in model.state_dict().items():
            assert torch.equal(value, want.read(name, value.dtype, device=device)), name
        # (a tensor the model keeps in float32, stored in bf16, is read again: its merge rounds once)
        at_hand = {n for n in want.changed if model.state_dict()[n].dtype == torch.bfloat16}
        assert len(at_hand) > 30
        assert not at_hand & set(reads) if strength == 0.8 else at_hand <= set(reads)
    use_loras(model, [], [])
    for name, value in model.state_dict().items():
        assert torch.equal(value.cpu(), bf16[name]), name
