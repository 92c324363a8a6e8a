"""int8 / fp8 / int4 weights: quantization math, QuantizedLinear paths, whole-model swap and the disk cache."""

from __future__ import annotations

import logging
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from tests.tiny_ckpt.dit import write_dit
from wan_lite.loading.build import build_dit
from wan_lite.loading.tensors import SafetensorsSource
from wan_lite.models.dit import WanDiT
from wan_lite.runtime import int4, quant
from wan_lite.runtime.quant import (
    QuantizedLinear,
    dequantize_weight,
    quantize_model,
    quantize_weight,
    quantized_modules,
    set_compute,
    weight_bytes,
)
from wan_lite.runtime.quant_cache import load_or_quantize, load_quantized, save_quantized

log = logging.getLogger(__name__)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------------------------------------ toy model
class ToyBlock(nn.Module):
    """Transformer-like block: modulation table, affine norm, attention projections, FFN."""

    def __init__(self, d: int, ffn: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.modulation = nn.Parameter(torch.randn(1, 4, d) * 0.1)
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.GELU(approximate="tanh"), nn.Linear(ffn, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, d] fp32 residual -> [B, L, d] fp32; matmuls in the bias dtype (bf16 / fp32)."""
        dtype = self.q.bias.dtype
        m = self.modulation.float()
        u = (self.norm(x) * (1 + m[:, 0]) + m[:, 1]).to(dtype)
        q, k, v = (p(u).unflatten(-1, (self.heads, -1)).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = x + self.o(a).float() * m[:, 2]
        return x + self.ffn(self.norm(x).to(dtype)).float() * m[:, 3]


class ToyModel(nn.Module):
    no_quantize_patterns = ("*.o", "*norm*")
    keep_fp32_patterns = ("*modulation", "*norm*")

    def __init__(self, d: int = 128, ffn: int = 256, layers: int = 3, heads: int = 2, c_in: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(c_in, d)
        self.blocks = nn.ModuleList(ToyBlock(d, ffn, heads) for _ in range(layers))
        self.head = nn.Linear(d, c_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.to(self.embed.weight.dtype)).float()
        for block in self.blocks:
            h = block(h)
        return self.head(h.to(self.head.weight.dtype)).float()


def toy(dtype: torch.dtype = torch.bfloat16, seed: int = 0, **kw) -> ToyModel:
    torch.manual_seed(seed)
    model = ToyModel(**kw).to(dtype)
    for block in model.blocks:
        block.modulation.data = block.modulation.data.float()
        block.norm.float()
    return model.eval()


def toy_input(seed: int = 1, tokens: int = 24) -> torch.Tensor:
    return torch.randn(2, tokens, 8, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ math
@pytest.mark.parametrize("fmt,tol", [("int8", 0.012), ("fp8", 0.04)])
def test_quantize_weight_roundtrip(fmt: str, tol: float) -> None:
    w = torch.randn(96, 512, generator=torch.Generator().manual_seed(0)) * torch.rand(96, 1) * 3
    w[5] = 0.0  # an all-zero row must stay exactly zero
    q, scale = quantize_weight(w, fmt)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (96,)
    back = dequantize_weight(q, scale, fmt, torch.float32)
    err = rel_err(back, w)
    log.info("%s weight round trip rel L2 %.4f", fmt, err)
    assert err < tol
    assert torch.equal(back[5], torch.zeros(512))
    # Every row uses its full range: the largest magnitude maps onto the top code exactly.
    top = 127.0 if fmt == "int8" else 448.0
    raw = q.float() if fmt == "int8" else q.view(torch.float8_e4m3fn).float()
    nz = torch.arange(96) != 5
    assert torch.equal(raw.abs().amax(1)[nz], torch.full((95,), top))


def test_dequantize_rounds_once() -> None:
    """bf16 dequantization equals rounding the exact float product once."""
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    q, scale = quantize_weight(w, "int8")
    exact = (q.double() * scale.double()[:, None]).to(torch.bfloat16)
    assert torch.equal(dequantize_weight(q, scale, "int8", torch.bfloat16), exact)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantized_linear_dequant_path(fmt: str) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(256, 192).to(torch.bfloat16)
    ql = QuantizedLinear.from_linear(lin, fmt)
    x = torch.randn(3, 10, 256, dtype=torch.bfloat16)
    out = ql(x)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 10, 192)
    # The dequant path is exactly F.linear with the dequantized weight.
    assert torch.equal(out, F.linear(x, ql.dequantized(torch.bfloat16), lin.bias))
    ref = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    err = rel_err(out, ref)
    log.info("%s dequant Linear rel L2 %.4f", fmt, err)
    assert err < (0.015 if fmt == "int8" else 0.045)
    # fp32 activations are served too (dequantized to fp32).
    assert ql(x.float()).dtype == torch.float32


def test_quantized_linear_fp8_compute_path() -> None:
    """The _scaled_mm path (forced; runs on CPU too) matches a float64 reference within fp8 error."""
    torch.manual_seed(1)
    lin = nn.Linear(256, 192).to(torch.bfloat16)
    ql = QuantizedLinear.from_linear(lin, "fp8", compute="fp8")
    x = torch.randn(4, 33, 256, dtype=torch.bfloat16)
    x[0, 0] *= 50  # an outlier token: per-row activation scales keep the other rows precise
    out = ql(x)
    assert out.dtype == torch.bfloat16 and out.shape == (4, 33, 192) and torch.isfinite(out).all()
    ref = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    err = rel_err(out[1:], ref[1:])
    log.info("fp8 x fp8 Linear rel L2 %.4f", err)
    assert err < 0.06
    assert not ql._fp8_broken
    with torch.inference_mode():  # inference tensors have no version counter
        assert torch.equal(ql(x), out)
    assert not ql._fp8_broken
    # Same function as the dequant path up to the activation rounding.
    ql.compute = "dequant"
    assert rel_err(out, ql(x)) < 0.05


def test_activation_quantization_is_shared_and_released() -> None:
    torch.manual_seed(2)
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    cache = quant.QuantCaches().activations
    a = cache.get(x)
    assert cache.get(x) is a  # q, k and v of one input quantize it once
    x.mul_(2)  # an in-place change invalidates the entry
    b = cache.get(x)
    assert b is not a and torch.allclose(b[1], a[1] * 2)
    del x, a, b
    assert cache._value is None  # died with its activation
    with torch.inference_mode():
        y = torch.randn(5, 64, dtype=torch.bfloat16)
        c = cache.get(y)
        assert cache.get(y) is c and cache.get(y.clone()) is not c
    x8, s = quant._quantize_rows_eager(torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]], dtype=torch.bfloat16))
    assert torch.isfinite(s).all() and torch.equal(x8[1].float(), torch.zeros(3))
    assert (x8[0].float() * s[0]).sub(torch.tensor([1.0, -2.0, 0.5])).abs().max() < 0.1


def test_gelu_folds_into_the_quantized_layer_after_it() -> None:
    """quantize_model moves the FFN's GELU into the second FFN layer: bit-identical outputs on the
    dequant path; on the fp8 path its row scale comes from a bound, as precise as the exact one."""
    x = toy_input()
    model, plain = toy(), toy()
    with torch.inference_mode():
        ref = model(x)
    quantize_model(model, "fp8", compute="fp8")
    quantize_model(plain, "fp8", compute="fp8")
    for block in plain.blocks:  # undo the fold: GELU back as a module of its own
        block.ffn[1], block.ffn[2].input_gelu = nn.GELU(approximate="tanh"), None
    for block in model.blocks:
        assert isinstance(block.ffn[1], nn.Identity) and block.ffn[2].input_gelu == "tanh"
        assert isinstance(block.ffn[0], QuantizedLinear) and block.ffn[0].input_gelu is None
    assert "input_gelu=tanh" in repr(model.blocks[0].ffn[2])
    assert quant.fold_activations(model) == 0  # idempotent (quantize_model runs again after an OOM)
    with torch.inference_mode():
        folded, unfolded = model(x), plain(x)
        assert not any(m._fp8_broken for m in quantized_modules(model).values())  # fp8 really ran
        assert rel_err(folded, ref) < 1.15 * rel_err(unfolded, ref) + 1e-3
        quant.set_compute(model, "dequant")
        quant.set_compute(plain, "dequant")
        assert torch.equal(model(x), plain(x))


def test_gelu_row_quantization_scale_bound() -> None:
    """The GELU-first row quantization: its scale is max(max(x), 0.171) / 440, no value leaves
    e4m3's range (rows all negative, all zero, or with a huge maximum), and x8 * scale is
    GELU(x) to e4m3 precision."""
    torch.manual_seed(3)
    h = torch.randn(6, 512, dtype=torch.bfloat16) * 3
    h[1] = -h[1].abs()  # all negative: GELU within [-0.17, 0]
    h[2] = 0
    h[3, 7] = 3.0e4  # an outlier far above the rest
    h[4] = torch.linspace(-0.75, 0.1, 512)  # the GELU minimum, and a max below the negative bound
    x8, s = quant._quantize_rows_eager(h, "tanh")
    bound = h.float().amax(dim=1, keepdim=True).clamp(min=quant._GELU_NEG_BOUND)
    torch.testing.assert_close(s, bound / quant._FP8_ACT_TARGET, rtol=2**-7, atol=0)
    assert torch.isfinite(x8.float()).all() and x8.float().abs().max() <= 448
    g = F.gelu(h, approximate="tanh").float()
    deq = x8.float() * s
    for row in (0, 1, 3, 4, 5):
        assert rel_err(deq[row], g[row]) < 0.035, row
    assert torch.equal(deq[2], torch.zeros(512))
    # Without a GELU the scale is the row's own max-abs.
    x8, s = quant._quantize_rows_eager(h)
    torch.testing.assert_close(s[0], h[0].float().abs().max()[None] / quant._FP8_ACT_TARGET, rtol=2**-7, atol=0)
    # The activation cache tells a GELU-first quantization from a plain one of the same tensor.
    cache = quant.QuantCaches().activations
    assert not torch.equal(cache.get(h, "tanh")[0].float(), cache.get(h)[0].float())


# ------------------------------------------------------------------------------ whole models
@pytest.mark.parametrize("fmt,tol", [("int8", 0.02), ("fp8", 0.06), ("int4", 0.03)])  # int4 measured 0.011
def test_quantize_toy_model(fmt: str, tol: float) -> None:
    model = toy()
    x = toy_input()
    with torch.inference_mode():
        ref = model(x)
    names = quantize_model(model, fmt)
    # Only Linear layers inside the blocks, minus the declared patterns ("*.o").
    assert names == [f"blocks.{i}.{n}" for i in range(3) for n in ("q", "k", "v", "ffn.0", "ffn.2")]
    assert isinstance(model.embed, nn.Linear) and isinstance(model.head, nn.Linear)
    assert all(isinstance(b.o, nn.Linear) for b in model.blocks)
    assert model.blocks[0].modulation.dtype == torch.float32
    with torch.inference_mode():
        out = model(x)
    err = rel_err(out, ref)
    log.info("toy model %s vs bf16: rel L2 %.4f", fmt, err)
    assert err < tol
    # .to(dtype) must not cast the stored weights (int8 storage; int4: uint8).
    model.to(torch.float16)
    stored = torch.uint8 if fmt == "int4" else torch.int8
    assert all(m.weight.dtype == stored for m in quantized_modules(model).values())


def test_bytes_per_weight_near_ideal() -> None:
    model = toy(d=256, ffn=512)
    quantize_model(model, "int8")
    used, n = weight_bytes(model)
    rows = sum(m.out_features for m in quantized_modules(model).values())
    ideal = n + 4 * rows  # one byte per weight plus one fp32 scale per output row
    log.info("quantized bytes / ideal = %.4f (%d / %d)", used / ideal, used, ideal)
    assert used / ideal <= 1.1
    assert used / n <= 1.1


def test_meta_structure_then_fill_matches_direct_quantization(tmp_path) -> None:
    """Filling a meta model from a float32 file, quantizing tensor by tensor, gives the same int8
    tensors as quantizing the float32 weights directly."""
    state = toy(torch.float32).state_dict()
    path = tmp_path / "toy.safetensors"
    save_file(state, str(path))
    with torch.device("meta"):
        model = ToyModel()
    model, cache = load_or_quantize(model, SafetensorsSource([path]), "int8", dtype=torch.bfloat16,
                                    keep_fp32=lambda n: "modulation" in n or "norm" in n)
    assert cache is None
    q, s = quantize_weight(state["blocks.1.ffn.0.weight"], "int8")
    assert torch.equal(model.blocks[1].ffn[0].weight, q) and torch.equal(model.blocks[1].ffn[0].weight_scale, s)
    assert model.blocks[1].ffn[0].bias.dtype == torch.bfloat16
    assert model.blocks[0].modulation.dtype == torch.float32
    assert model.embed.weight.dtype == torch.bfloat16


def tiny_umt5(num_layers: int):
    """A random bf16 transformers umT5 encoder with `num_layers` blocks and token ids [2, 9] for it."""
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(vocab_size=64, d_model=64, d_kv=16, d_ff=128, num_layers=num_layers, num_heads=4,
                     relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")
    torch.manual_seed(0)
    model = UMT5EncoderModel(cfg).to(torch.bfloat16).eval()
    return model, torch.randint(2, 64, (2, 9), generator=torch.Generator().manual_seed(0))


def test_umt5_encoder_quantized() -> None:
    model, ids = tiny_umt5(2)
    with torch.inference_mode():
        ref = model(input_ids=ids).last_hidden_state
        names = quantize_model(model, "fp8")
        out = model(input_ids=ids).last_hidden_state
    per_block = {"layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v",
                 "layer.0.SelfAttention.o", "layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_1",
                 "layer.1.DenseReluDense.wo"}
    assert set(names) == {f"encoder.block.{i}.{n}" for i in range(2) for n in per_block}
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    err = rel_err(out, ref)
    log.info("tiny umT5 fp8 vs bf16: rel L2 %.4f", err)
    assert err < 0.08


# ------------------------------------------------------------------------------ disk cache
def test_umt5_cache_keeps_the_tied_embedding_shared(tmp_path) -> None:
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(vocab_size=64, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")
    torch.manual_seed(0)
    model = UMT5EncoderModel(cfg).to(torch.bfloat16).eval()
    quantize_model(model, "int8")
    path = save_quantized(model, tmp_path / "t5.safetensors", key="k")
    assert len(SafetensorsSource([path])) == len(model.state_dict()) - 1  # the embedding once
    with torch.device("meta"):
        again = UMT5EncoderModel(cfg)
    assert load_quantized(again, path, key="k")
    shared, embed = again.shared.weight, again.encoder.embed_tokens.weight
    assert shared.device.type == "cpu" and shared.data_ptr() == embed.data_ptr()
    ids = torch.randint(2, 64, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(again.eval()(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)


def test_cache_round_trip_and_reuse(tmp_path, monkeypatch) -> None:
    state = toy(torch.float32).state_dict()
    src_path = tmp_path / "toy.safetensors"
    save_file(state, str(src_path))
    cache_dir = tmp_path / "cache"
    x = toy_input()
    keep = {"keep_fp32": lambda n: "modulation" in n or "norm" in n}

    def fresh() -> ToyModel:
        with torch.device("meta"):
            return ToyModel()

    first, path = load_or_quantize(fresh(), SafetensorsSource([src_path]), "fp8", cache_dir=cache_dir, **keep)
    assert path is not None and path.is_file() and path.parent == cache_dir
    assert [p.name for p in cache_dir.iterdir()] == [path.name]  # no temp file left behind

    calls = []
    real = quant.quantize_weight
    monkeypatch.setattr(quant, "quantize_weight", lambda *a, **k: calls.append(1) or real(*a, **k))
    second, path2 = load_or_quantize(fresh(), SafetensorsSource([src_path]), "fp8", cache_dir=cache_dir, **keep)
    assert path2 == path and calls == []  # the second start skips quantization
    for (k1, v1), (k2, v2) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert k1 == k2 and v1.dtype == v2.dtype and torch.equal(v1, v2)
    with torch.inference_mode():
        assert torch.equal(first(x), second(x))

    # Another format is another cache entry.
    _, path_int8 = load_or_quantize(fresh(), SafetensorsSource([src_path]), "int8", cache_dir=cache_dir, **keep)
    assert path_int8 != path and calls
    int4_model, path_int4 = load_or_quantize(fresh(), SafetensorsSource([src_path]), "int4", cache_dir=cache_dir,
                                             **keep)
    assert path_int4 not in (path, path_int8) and ".int4." in path_int4.name
    assert int4_model.blocks[0].q.weight.dtype == torch.uint8 and int4_model.blocks[0].q.weight.shape == (128, 64)
    assert int4_model.blocks[0].q.weight_scale.dtype == torch.bfloat16  # as the layer declares it, not fp32
    again, path_again = load_or_quantize(fresh(), SafetensorsSource([src_path]), "int4", cache_dir=cache_dir, **keep)
    assert path_again == path_int4
    for (k1, v1), (k2, v2) in zip(int4_model.state_dict().items(), again.state_dict().items(), strict=True):
        assert k1 == k2 and v1.dtype == v2.dtype and torch.equal(v1, v2)
    # A changed source file (size/mtime) gives another key: the old cache is not used.
    calls.clear()
    st = src_path.stat()
    os.utime(src_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _, path3 = load_or_quantize(fresh(), SafetensorsSource([src_path]), "fp8", cache_dir=cache_dir, **keep)
    assert path3 != path and calls


def test_stale_or_foreign_cache_is_refused(tmp_path) -> None:
    model = toy()
    quantize_model(model, "int8")
    path = save_quantized(model, tmp_path / "c.safetensors", key="abc")
    with torch.device("meta"):
        fresh = ToyModel()
    assert not load_quantized(fresh, path, key="other")
    assert not any(isinstance(m, QuantizedLinear) for m in fresh.modules())
    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    assert not load_quantized(fresh, tmp_path / "plain.safetensors")
    assert not load_quantized(fresh, tmp_path / "missing.safetensors")
    assert load_quantized(fresh, path, key="abc")
    assert isinstance(fresh.blocks[2].ffn[2], QuantizedLinear)


# ------------------------------------------------------------------------------ WanDiT
# int4: measured 0.044 (NF4 levels; the uniform levels -7..7 gave 0.049), int8 0.0038, fp8 0.012
@pytest.mark.parametrize("fmt,tol", [("int8", 0.02), ("fp8", 0.06), ("int4", 0.07)])
def test_wan_dit_quantized_forward(tmp_path, fmt: str, tol: float) -> None:
    write_dit(tmp_path / "dit", in_dim=16, out_dim=16, dim=256, ffn_dim=512, num_layers=2, text_dim=64)
    src = SafetensorsSource(sorted((tmp_path / "dit").glob("*.safetensors")))
    bf16 = build_dit(src, torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 4, 6, generator=gen)
    ctx = torch.zeros(1, 512, 64)
    ctx[:, :9] = torch.randn(1, 9, 64, generator=gen)
    t = torch.tensor([700.0])
    with torch.inference_mode():
        ref = bf16(x, t, ctx)
    with torch.device("meta"):
        from wan_lite.models.dit import WanDiTConfig

        meta = WanDiT(WanDiTConfig.from_shapes(src.shapes()))
    keep = lambda n: n.endswith("modulation")  # noqa: E731
    model, path = load_or_quantize(meta, src, fmt, cache_dir=tmp_path / "cache", keep_fp32=keep, what="dit")
    names = set(quantized_modules(model))
    per_block = {f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo"} | {"ffn.0", "ffn.2"}
    assert names == {f"blocks.{i}.{n}" for i in range(2) for n in per_block}
    assert model.blocks[0].modulation.dtype == torch.float32
    with torch.inference_mode():
        out = model.eval()(x, t, ctx)
    err = rel_err(out, ref)
    log.info("tiny WanDiT %s vs bf16: rel L2 %.4f", fmt, err)
    assert err < tol
    assert math.isfinite(err)
    used, n = weight_bytes(model)
    assert used / n < (0.6 if fmt == "int4" else 1.1)
    if fmt == "fp8":  # the fp8 x fp8 path (forced; CPU _scaled_mm) on the whole DiT
        set_compute(model, "fp8")
        with torch.inference_mode():
            out8 = model(x, t, ctx)
        set_compute(model, "auto")
        assert not any(m._fp8_broken for m in quantized_modules(model).values())
        log.info("tiny WanDiT fp8 x fp8 vs bf16: rel L2 %.4f", rel_err(out8, ref))
        assert rel_err(out8, ref) < tol
    # From the cache the model is the same.
    with torch.device("meta"):
        again = WanDiT(WanDiTConfig.from_shapes(src.shapes()))
    assert load_quantized(again, path)
    with torch.inference_mode():
        assert torch.equal(again.eval()(x, t, ctx), out)


def test_wan_dit_fp8_inputs_from_the_modulation_kernel(monkeypatch) -> None:
    """With fp8 GEMMs (forced on the CPU) the modulation kernels hand q, k, v and ffn.0 (and norm3
    the cross-attention's q) their input in e4m3 (Fp8Rows, static scales per batch row and timestep
    run): as precise as quantizing each row by its own max, unchunked and in token chunks, TI2V's
    two timestep runs included."""
    from tests.test_dit import context, latent, ti2v_timesteps, tiny_state
    from wan_lite.loading.tensors import DictSource
    from wan_lite.models.fp8_rows import Fp8Rows

    state = tiny_state(48, 48, seed=6)
    x, ctx, t = latent(2, 48), context(2), ti2v_timesteps(2, 700.0)
    with torch.inference_mode():
        ref = build_dit(DictSource(state), torch.bfloat16)(x, t, ctx)
    model = build_dit(DictSource(state), torch.bfloat16)
    quantize_model(model, "fp8", WanDiT.no_quantize_patterns, compute="fp8")
    seen: list[str] = []
    real = QuantizedLinear._forward_fp8

    def spy(self, inp):
        seen.append(type(inp).__name__)
        return real(self, inp)

    monkeypatch.setattr(QuantizedLinear, "_forward_fp8", spy)
    with torch.inference_mode():
        rows = model(x, t, ctx)
        for block in model.blocks:
            block.chunk_tokens = 5
        chunked = model(x, t, ctx)
        for block in model.blocks:
            block.chunk_tokens = None
        # q, k, v, ffn.0 and the cross-attention's q, unchunked and in 4 chunks
        assert seen.count(Fp8Rows.__name__) == 5 * len(model.blocks) * (1 + 4)
        monkeypatch.setattr(QuantizedLinear, "accepts_fp8_rows", lambda self, device: False)
        plain = model(x, t, ctx)
    assert not any(m._fp8_broken for m in quantized_modules(model).values())
    err_rows, err_plain = rel_err(rows, ref), rel_err(plain, ref)
    log.info("tiny WanDiT fp8 inputs from the modulation kernel %.4f, quantized by row max %.4f", err_rows, err_plain)
    assert err_rows < 1.2 * err_plain + 1e-3
    assert rel_err(chunked, rows) < 1e-2


def test_fp8_rows_input_is_the_quantized_input() -> None:
    """A QuantizedLinear given Fp8Rows runs the GEMM on exactly those bytes and scales (the same
    result as the bf16 input whose row quantization they are); where it cannot take them (dequant
    compute, a GELU in front) it uses their values."""
    from wan_lite.models.fp8_rows import Fp8Rows, takes_fp8_rows

    torch.manual_seed(4)
    ql = QuantizedLinear.from_linear(nn.Linear(256, 192).to(torch.bfloat16), "fp8", compute="fp8")
    x = torch.randn(3, 11, 256, dtype=torch.bfloat16)
    x8, s = quant._quantize_rows_eager(x.reshape(-1, 256))
    rows = Fp8Rows(x8.reshape(3, 11, 256), s, torch.bfloat16)
    cpu = torch.device("cpu")
    assert ql.accepts_fp8_rows(cpu) and takes_fp8_rows(ql, cpu) and not takes_fp8_rows(nn.Linear(4, 4), cpu)
    with torch.inference_mode():
        assert torch.equal(ql(rows), ql(x))
        ql.compute = "dequant"
        assert not ql.accepts_fp8_rows(cpu)
        assert torch.equal(ql(rows), F.linear(rows.dequantized(), ql.dequantized(torch.bfloat16), ql.bias))
        ql.compute, ql.input_gelu = "fp8", "tanh"
        assert not ql.accepts_fp8_rows(cpu)
        assert torch.equal(ql(rows), ql(rows.dequantized()))
    assert not QuantizedLinear.from_linear(nn.Linear(256, 192), "int8", compute="fp8").accepts_fp8_rows(cpu)


def test_unknown_format_is_a_user_error() -> None:
    from wan_lite.errors import InputError

    with pytest.raises(InputError, match="int8, fp8, int4"):
        quantize_model(toy(), "int3")
    with pytest.raises(InputError):
        quantize_weight(torch.zeros(2, 2), "nf4")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_cuda_quantized_linear(fmt: str) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(1024, 2048).to("cuda", torch.bfloat16)
    ql = QuantizedLinear.from_linear(lin, fmt)
    assert ql.weight.is_cuda
    x = torch.randn(4, 300, 1024, device="cuda", dtype=torch.bfloat16)
    ref = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    out = ql(x)
    torch.cuda.synchronize()
    err = rel_err(out, ref)
    cc = torch.cuda.get_device_capability()
    log.info("CUDA %s Linear (cc %s, compute %s) rel L2 %.4f", fmt, cc, ql.compute, err)
    assert torch.isfinite(out).all() and err < (0.015 if fmt == "int8" else 0.06)
    if fmt == "fp8" and cc >= (8, 9):
        assert not ql._fp8_broken  # the fp8 tensor-core path really ran
        ql.compute = "dequant"
        assert rel_err(out, ql(x)) < 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("gelu", [None, "tanh"])
def test_cuda_fused_activation_quantization(gelu: str | None) -> None:
    """The compiled row quantization (GELU first for the FFN's second layer) gives the eager
    numbers: the same scales and fp8 values up to a rare last-bit flip of the fp32 GELU."""
    torch.manual_seed(0)
    x = torch.randn(3000, 1536, device="cuda", dtype=torch.bfloat16) * 2
    x8, s = quant._quantize_rows_fused(x, gelu)
    assert not quant._quantize_rows_fused.failed  # the compiled kernel really ran
    e8, es = quant._quantize_rows_eager(x, gelu)
    assert x8.dtype == torch.float8_e4m3fn and s.shape == (3000, 1)
    assert torch.allclose(s, es, rtol=1e-2)
    assert rel_err(x8.float() * s, e8.float() * es) < 1e-3


def test_fused_dequantization_is_the_eager_one() -> None:
    """The one-pass form (compiled on CUDA) rounds exactly like cast-then-multiply-in-place."""
    torch.manual_seed(0)
    w = torch.randn(64, 96)
    for fmt in ("int8", "fp8"):  # int4: test_int4_dequantization_rounds_once_and_eager_is_the_fused_form
        q, scale = quantize_weight(w, fmt)
        raw = q if fmt == "int8" else q.view(torch.float8_e4m3fn)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            assert torch.equal(quant._dequantize_fused(raw, scale, dtype), quant._dequantize_eager(raw, scale, dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_cuda_fused_dequantization(fmt: str) -> None:
    torch.manual_seed(0)
    q, scale = quantize_weight(torch.randn(3072, 1000, device="cuda"), fmt)
    raw = q if fmt == "int8" else q.view(torch.float8_e4m3fn)
    out = quant.dequantize_weight(q, scale, fmt, torch.bfloat16)
    assert not quant._fused_dequantize.failed  # the compiled kernel really ran
    assert torch.equal(out, quant._dequantize_eager(raw, scale, torch.bfloat16))


# ------------------------------------------------------------------------------ int4
def test_int4_packing_order_and_levels() -> None:
    """Byte j of a row holds input 2j in its low nibble and 2j+1 in its high one; a code is the
    index of an NF4 level, the group's largest magnitude its bf16 scale. Weights that are levels
    times a bf16-exact scale come back exactly."""
    levels = torch.tensor(int4.NF4_LEVELS)
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (3, 128), generator=gen)
    codes[:, 0], codes[:, 64] = 15, 0  # each group holds a level +-1: its scale is exactly its factor
    factor = torch.tensor([1.0, 0.03125, 3.0])[:, None]
    w = levels[codes] * factor
    packed, scale = quantize_weight(w, "int4")
    assert packed.dtype == torch.uint8 and packed.shape == (3, 64)
    assert scale.dtype == torch.bfloat16 and scale.shape == (3, 2)
    assert torch.equal(packed.long(), codes[:, 0::2] | (codes[:, 1::2] << 4))
    assert torch.equal(scale.float(), factor.expand(3, 2))
    assert torch.equal(dequantize_weight(packed, scale, "int4", torch.float32), w)
    assert torch.equal(dequantize_weight(packed, scale, "int4", torch.bfloat16), w.to(torch.bfloat16))


@pytest.mark.parametrize("in_features", [1, 63, 64, 100, 130, 512])
def test_int4_round_trip(in_features: int) -> None:
    """Any row length (padded to a multiple of 64, the padding cut off), zero rows exact, an
    outlier coarsens only its own group of 64, and the error of bell-shaped weights is NF4's."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(40, in_features, generator=gen) * 0.02
    w[3] = 0.0
    packed, scale = quantize_weight(w, "int4")
    groups = -(-in_features // 64)
    assert packed.shape == (40, groups * 32) and scale.shape == (40, groups)
    back = dequantize_weight(packed, scale, "int4", torch.float32, in_features)
    assert back.shape == w.shape
    assert torch.equal(back[3], torch.zeros(in_features))
    assert torch.equal(dequantize_weight(packed, scale, "int4", torch.float32)[:, :in_features], back)
    # every group's largest magnitude is kept (to the bf16 rounding of its scale)
    top = torch.tensor([row[i : i + 64].abs().max() for row in w for i in range(0, in_features, 64)])
    got = torch.tensor([row[i : i + 64].abs().max() for row in back for i in range(0, in_features, 64)])
    assert torch.allclose(got, top, rtol=2**-8, atol=0)
    err = rel_err(back, w)
    log.info("int4 round trip, %d inputs: rel L2 %.4f", in_features, err)
    if in_features >= 64:
        assert 0.05 < err < 0.11
    # an outlier: its group's other weights get coarse, the rest of the row does not change
    spiked = w.clone()
    spiked[7, 0] = 1.0
    p2, s2 = quantize_weight(spiked, "int4")
    again = dequantize_weight(p2, s2, "int4", torch.float32, in_features)
    assert torch.allclose(again[7, 0], torch.tensor(1.0), rtol=2**-8)
    assert torch.equal(again[7, 64:], back[7, 64:]) and torch.equal(again[:7], back[:7])


def test_int4_dequantization_rounds_once_and_eager_is_the_fused_form(monkeypatch) -> None:
    """level x scale in float32 rounded once to the dtype; the eager path (a few rows at a time)
    gives the one-pass function's numbers exactly."""
    w = torch.randn(50, 320, generator=torch.Generator().manual_seed(2))
    packed, scale = quantize_weight(w, "int4")
    levels = torch.tensor(int4.NF4_LEVELS, dtype=torch.float64)
    codes = torch.stack((packed & 15, packed >> 4), dim=-1).view(50, 320).long()
    exact = levels[codes] * scale.double().repeat_interleave(64, dim=1)
    pairs = int4.pairs_table(torch.device("cpu"))
    monkeypatch.setattr(int4, "_CHUNK_WEIGHTS", 640)  # two rows at a time
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        eager = dequantize_weight(packed, scale, "int4", dtype)
        assert torch.equal(eager, exact.to(dtype))
        assert torch.equal(eager, int4.dequantize_rows(packed, scale, pairs, dtype))


def test_int4_quantized_linear() -> None:
    """Buffers of the packed shapes (on meta too), the dequant path only (no fp8 compute), any
    in_features, the bytes of the format."""
    meta = QuantizedLinear(100, 48, "int4", device="meta")
    assert meta.weight.shape == (48, 64) and meta.weight.dtype == torch.uint8 and meta.weight.is_meta
    assert meta.weight_scale.shape == (48, 2) and meta.weight_scale.dtype == torch.bfloat16
    assert "fmt=int4, group=64" in repr(meta)
    torch.manual_seed(0)
    lin = nn.Linear(100, 48).to(torch.bfloat16)
    lin.weight.data = (torch.randn(48, 100) * 0.05).to(torch.bfloat16)
    ql = QuantizedLinear.from_linear(lin, "int4", compute="fp8")  # fp8 compute is for fp8 weights only
    x = torch.randn(3, 7, 100, dtype=torch.bfloat16)
    out = ql(x)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 7, 48) and not ql._use_fp8(x.device)
    assert torch.equal(out, F.linear(x, ql.dequantized(torch.bfloat16), lin.bias))
    assert ql.dequantized(torch.float32).shape == (48, 100)
    err = rel_err(out, F.linear(x.double(), lin.weight.double(), lin.bias.double()))
    log.info("int4 Linear 100 -> 48 rel L2 %.4f", err)
    assert err < 0.12
    model = toy(d=256, ffn=512)
    quantize_model(model, "int4")
    used, n = weight_bytes(model)
    rows = sum(m.out_features for m in quantized_modules(model).values())
    assert used == n // 2 + n // 64 * 2 + 2 * rows  # 4 bits a weight, a bf16 scale per 64, bf16 biases


def test_int4_full_size_layer_error() -> None:
    """A 5120 x 5120 layer (A14B's attention width) with N(0, 0.02) weights, on activations like a
    block's modulated norm output (unit variance, a few channels 10x larger): the output error of
    int4 against the float layer, next to int8's."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5120, 5120, generator=gen) * 0.02
    x = torch.randn(256, 5120, generator=gen)
    x[:, torch.randperm(5120, generator=gen)[:50]] *= 10
    xb = x.to(torch.bfloat16)
    ref = xb.double() @ w.double().t()
    errs = {}
    for fmt in ("int8", "int4"):
        q, scale = quantize_weight(w, fmt)
        wq = dequantize_weight(q, scale, fmt, torch.bfloat16, 5120)
        errs[fmt] = (rel_err(wq, w), rel_err(F.linear(xb, wq), ref))
    errs["bf16"] = (rel_err(w.to(torch.bfloat16), w), rel_err(F.linear(xb, w.to(torch.bfloat16)), ref))
    for fmt, (we, oe) in errs.items():
        log.info("5120x5120 N(0, 0.02) layer, %s: weight rel L2 %.4f, output rel L2 %.4f", fmt, we, oe)
    # measured: int4 0.092, int8 0.0091, bf16 0.0023
    assert errs["int4"][1] < 0.1 and errs["int8"][1] < 0.01 and errs["bf16"][1] < 0.005


@pytest.mark.gpu
def test_cuda_fused_int4_dequantization() -> None:
    torch.manual_seed(0)
    q, scale = quantize_weight(torch.randn(3072, 1000, device="cuda"), "int4")
    assert q.is_cuda and scale.is_cuda
    out = quant.dequantize_weight(q, scale, "int4", torch.bfloat16, 1000)
    assert not quant._fused_dequantize_int4.failed  # the compiled kernel really ran
    assert torch.equal(out.cpu(), quant.dequantize_weight(q.cpu(), scale.cpu(), "int4", torch.bfloat16, 1000))
    lin = nn.Linear(1000, 3072).to("cuda", torch.bfloat16)
    ql = QuantizedLinear.from_linear(lin, "int4")
    x = torch.randn(4, 300, 1000, device="cuda", dtype=torch.bfloat16)
    err = rel_err(ql(x), F.linear(x.double(), lin.weight.double(), lin.bias.double()))
    log.info("CUDA int4 Linear rel L2 %.4f", err)
    assert err < 0.12


def test_chunked_layers_reuse_their_dequantized_weight(monkeypatch) -> None:
    """A layer called again within a few layer calls (token chunks) dequantizes once more and then
    reuses that weight; a layer called once per pass never keeps one; results are unchanged."""
    torch.manual_seed(0)
    layers = [QuantizedLinear.from_linear(nn.Linear(32, 32), "int8") for _ in range(6)]
    calls: list[int] = []
    real = QuantizedLinear.dequantized

    def counting(self, dtype):
        calls.append(layers.index(self))
        return real(self, dtype)

    monkeypatch.setattr(QuantizedLinear, "dequantized", counting)
    shared = quant.QuantCaches()
    for layer in layers:
        layer.caches = shared
    x = torch.randn(5, 32)
    # unchunked: every layer once per pass, three passes -> three dequantizations each, none kept
    for _ in range(3):
        for layer in layers:
            layer(x)
    assert len(calls) == 18 and not shared.reuse._kept
    # chunked: q, k, v over 5 chunks, then the FFN pair over 5 chunks
    calls.clear()
    outs = []
    for group in (layers[:3], layers[3:5]):
        for _ in range(5):
            outs += [layer(x) for layer in group]
    assert sorted(calls) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert len(shared.reuse._kept) <= quant._WeightReuse.SIZE
    expected = [F.linear(x, real(layer, torch.float32), layer.bias) for group in (layers[:3], layers[3:5])
                for _ in range(5) for layer in group]
    assert all(torch.equal(a, b) for a, b in zip(outs, expected, strict=True))
    # a new weight tensor (a streamed block loaded again) is never served a kept one
    calls.clear()
    layers[3].weight = layers[3].weight.clone()
    layers[3](x)
    assert calls == [3]


def test_one_name_pattern_rule() -> None:
    from wan_lite.models.dit import name_matches

    assert quant.matches is name_matches
    assert name_matches("blocks.3.modulation", ["modulation"]) and name_matches("head.head", ["head"])
    assert name_matches("blocks.7.ffn.2", ["blocks.*.ffn.2"]) and not name_matches("heads", ["head"])
    assert name_matches("encoder.block.0.layer.1.DenseReluDense.wo", ["wo"])  # umT5's fp32 module
    assert not name_matches("encoder.block.0.layer.1.DenseReluDense.wo", ["w"])


def test_each_model_owns_its_quantized_layers_caches() -> None:
    """Two quantized models share nothing: each has one QuantCaches for all its layers, and
    releasing one model's kept weights leaves the other's."""
    a, b = (nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32)) for _ in range(2))
    for m in (a, b):
        quantize_model(m, "int8", names=["0", "1"])
    caches = [{id(layer.caches) for layer in m if isinstance(layer, QuantizedLinear)} for m in (a, b)]
    assert len(caches[0]) == len(caches[1]) == 1 and caches[0] != caches[1]
    b[0].caches.reuse._kept[1] = "kept"
    quant.release_kept_weights(a)
    assert b[0].caches.reuse._kept == {1: "kept"}
    quant.release_kept_weights(b)
    assert not b[0].caches.reuse._kept
