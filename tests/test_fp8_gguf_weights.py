"""fp8 and GGUF checkpoints stay quantized in memory and compute like their dequantized selves.

- GGUF: our torch dequantizer equals gguf-py's numpy one bit for bit (Q8_0, Q4_K, Q5_K, Q6_K);
  a DiT built from a GGUF file holds only the stored blocks (GGUFLinear) and gives the output of
  the dequantize-on-read model, within the quantization tolerance of the official float model.
- fp8: a DiT / umT5 built from a ComfyUI fp8 file holds the stored e4m3 bytes and scales in
  QuantizedLinear layers (1 byte per weight), same output as dequantizing on read.
- Both stream with BlockStreamer and re-fill from the file after `move_expert(..., "disk")`, and
  the pipeline (`WanPipeline.load`, `WanPipeline.load_planned`) builds them from the components
  it is given (`runtime.loader.load_dit` / `load_text_encoder`).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.test_ram_cache import peak_cpu_bytes
from tests.tiny_ckpt import formats as tf
from tests.tiny_ckpt.dit import official_dit_shapes, random_dit_state
from wan_lite.errors import CheckpointError
from wan_lite.loading import formats
from wan_lite.loading.build import build_dit, build_text_encoder
from wan_lite.loading.tensors import DictSource, SafetensorsSource, open_source
from wan_lite.pipeline import WanPipeline
from wan_lite.runtime import gguf_linear, streaming
from wan_lite.runtime.gguf_linear import GGUF_BLOCKS, GGUF_TYPES, GGUFLinear, dequantize_gguf
from wan_lite.runtime.loader import load_dit, load_text_encoder
from wan_lite.runtime.quant import QuantizedLinear

DIM, FFN, LAYERS, TEXT_DIM = 256, 512, 2, 256  # rows of 256 values: every block Linear takes K-quants
GRID = (2, 4, 4)  # latent frames, height, width -> 2 x 2 x 2 tokens
# Output error against the official fp32 model: weight errors (~0.5 % Q8_0 ... ~8 % Q4_K, ~3 %
# fp8) grow a little through the tiny DiT; a wrong block layout would give errors of order 1.
OUT_TOL = {"Q8_0": 0.02, "Q6_K": 0.05, "Q5_K": 0.1, "Q4_K": 0.2, "fp8": 0.08, "Q4_0": 0.2, "Q4_1": 0.2,
           "Q5_0": 0.1, "Q5_1": 0.1}
SMALL = dict(width=32, height=32, frames=5, steps=2)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def official() -> dict[str, torch.Tensor]:
    shapes = official_dit_shapes(in_dim=16, out_dim=16, dim=DIM, ffn_dim=FFN, num_layers=LAYERS, text_dim=TEXT_DIM)
    return random_dit_state(shapes, seed=0)


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, *GRID, generator=gen)
    ctx = torch.zeros(1, 512, TEXT_DIM)
    ctx[0, :9] = torch.randn(9, TEXT_DIM, generator=gen)
    return x, torch.tensor([700.0]), ctx


@torch.inference_mode()
def run(model: torch.nn.Module, inputs) -> torch.Tensor:
    return model(*inputs)


def block_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The layers a plain WanDiT has as nn.Linear inside its blocks (q k v o of both attentions, ffn)."""
    names = [f"blocks.{i}.{a}.{p}" for i in range(len(model.blocks)) for a in ("self_attn", "cross_attn")
             for p in "qkvo"] + [f"blocks.{i}.ffn.{j}" for i in range(len(model.blocks)) for j in (0, 2)]
    return {n: model.get_submodule(n) for n in names}


def float_matrix_bytes(module: torch.nn.Module) -> int:
    """Bytes of 2-D float tensors in the blocks: a dequantized copy of a weight would show up here."""
    return sum(t.numel() * t.element_size() for t in module.blocks.state_dict().values()
               if t.is_floating_point() and t.dim() == 2)


def finite_random_blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random ggml blocks whose fp16 scale fields are finite (random bytes would give NaN/inf)."""
    rng = np.random.default_rng(seed)
    size, type_size = GGUF_BLOCKS[qtype]
    data = rng.integers(0, 256, size=(rows, cols // size * type_size), dtype=np.uint8)
    blocks = data.reshape(-1, type_size)

    def halves() -> np.ndarray:
        return (rng.standard_normal(len(blocks)) * 0.05).astype(np.float16).view(np.uint8).reshape(-1, 2)

    fields = {"Q8_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q4_0": (0,), "Q4_1": (0, 2),
              "Q5_0": (0,), "Q5_1": (0, 2)}[qtype]
    for at in fields:
        blocks[:, at : at + 2] = halves()
    return data


# ------------------------------------------------------------------------------ GGUF kernels
@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_gguf_dequant_is_bit_identical_to_gguf_package(qtype: str, monkeypatch) -> None:
    import gguf

    size = GGUF_BLOCKS[qtype][0]
    gtype = gguf.GGMLQuantizationType[qtype]
    rows, cols = 24, 2 * max(size, 256)
    random_blocks = finite_random_blocks(qtype, rows, cols)
    weights = np.random.default_rng(1).standard_normal((rows, cols)).astype(np.float32) / 16
    encoded, _ = tf.gguf_encode(weights, qtype)  # our K-quant encoder / gguf's own Q8_0 quantizer
    for data in (random_blocks, np.ascontiguousarray(encoded)):
        want = torch.from_numpy(gguf.quants.dequantize(data, gtype))
        got = dequantize_gguf(torch.from_numpy(data), qtype, (rows, cols))
        assert got.dtype == torch.float32 and torch.equal(got, want)
        assert torch.equal(dequantize_gguf(torch.from_numpy(data), qtype, (rows, cols), torch.bfloat16),
                           want.to(torch.bfloat16))  # one rounding from the float32 values
        monkeypatch.setattr(gguf_linear, "_CHUNK_VALUES", 3 * cols)  # the chunked path: 3 rows at a time
        assert torch.equal(dequantize_gguf(torch.from_numpy(data), qtype, (rows, cols)), want)
        monkeypatch.undo()
    assert rel_err(dequantize_gguf(torch.from_numpy(encoded), qtype, (rows, cols)), torch.from_numpy(weights)) < 0.1


def test_gguf_linear_holds_the_blocks_and_computes_with_them() -> None:
    rows, cols = 48, 512
    data = torch.from_numpy(finite_random_blocks("Q4_K", rows, cols, seed=2))
    bias = torch.randn(rows)
    layer = GGUFLinear.from_blocks(data, "Q4_K", (rows, cols), bias)
    assert layer.weight.data_ptr() == data.data_ptr() and layer.weight.dtype == torch.uint8  # no copy
    assert set(layer.state_dict()) == {"weight", "bias"}
    x = torch.randn(3, 5, cols)
    w = dequantize_gguf(data, "Q4_K", (rows, cols))
    assert torch.equal(layer(x), F.linear(x, w, bias))
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(CheckpointError, match="not a whole number"):
        GGUFLinear(100, rows, "Q4_K")
    with pytest.raises(CheckpointError, match="Q8_0"):
        GGUFLinear(256, rows, "IQ2_XS")


# ------------------------------------------------------------------------------ fp8 layers
@pytest.mark.parametrize("per_row", [False, True])
def test_quantized_linear_from_fp8_keeps_the_bytes(per_row: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=gen) / 8
    scale = (torch.rand(32, 1, generator=gen) + 0.5) / 100 if per_row else torch.tensor(0.003)
    w8 = (w / scale).to(torch.float8_e4m3fn)
    bias = torch.randn(32, generator=gen)
    layer = QuantizedLinear.from_fp8(w8, scale, bias)
    assert layer.weight.dtype == torch.int8 and layer.weight.data_ptr() == w8.data_ptr()  # the stored bytes
    assert layer.weight_scale.shape == (32,) and layer.weight_scale.dtype == torch.float32
    x = torch.randn(4, 64, generator=gen)
    assert torch.equal(layer(x), F.linear(x, w8.float() * scale.reshape(-1, 1).expand(32, 1), bias))
    with pytest.raises(CheckpointError):
        QuantizedLinear.from_fp8(w, scale)


# ------------------------------------------------------------------------------ whole DiTs
@pytest.mark.parametrize("layout", ["plain", "scale_weight", "weight_scale"])
def test_fp8_dit_holds_the_stored_bytes(tmp_path, official, inputs, layout: str) -> None:
    path = tf.write_comfy(tmp_path / f"wan_fp8_{layout}.safetensors", official, fp8=layout, prefix=tf.PREFIX)
    source = formats.load_component(path, "dit")
    model, refill = load_dit(source, torch.float32)
    layers = block_linears(model)
    assert all(isinstance(m, QuantizedLinear) and m.fmt == "fp8" for m in layers.values())
    w8, _ = tf.to_fp8(official["blocks.1.ffn.2.weight"], scaled=layout != "plain")
    assert torch.equal(layers["blocks.1.ffn.2"].weight.view(torch.uint8), w8.view(torch.uint8))
    n = sum(m.weight.numel() for m in layers.values())
    weight_bytes = sum(m.weight.untyped_storage().nbytes() for m in layers.values())
    total = sum(t.numel() * t.element_size() for m in layers.values() for t in m.state_dict().values())
    print(f"fp8 {layout}: {weight_bytes / n:.3f} B/weight stored, {total / n:.3f} with scales and biases")
    assert weight_bytes == n and total / n < 1.04 and float_matrix_bytes(model) == 0
    assert "blocks.0.self_attn.q.weight_scale" in refill

    want = run(build_dit(DictSource(official), torch.float32), inputs)
    on_read = run(build_dit(source, torch.float32), inputs)  # dequantized on read
    got = run(model, inputs)
    print(f"fp8 {layout}: vs dequantize-on-read {rel_err(got, on_read):.2e}, vs official {rel_err(got, want):.4f}")
    assert rel_err(got, on_read) < 1e-6 and rel_err(got, want) < OUT_TOL["fp8"]
    got16 = run(load_dit(source, torch.bfloat16)[0], inputs)
    assert rel_err(got16, run(build_dit(source, torch.bfloat16), inputs)) < 1e-6


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_gguf_dit_holds_only_the_blocks(tmp_path, official, inputs, qtype: str) -> None:
    path = tf.write_gguf(tmp_path / f"Wan2.2-T2V-A14B-LowNoise-{qtype}.gguf", official, qtype)
    source = formats.load_component(path, "dit")
    model, _ = load_dit(source, torch.float32)
    layers = block_linears(model)
    assert all(isinstance(m, GGUFLinear) and m.qtype == qtype for m in layers.values())
    n = sum(m.in_features * m.out_features for m in layers.values())
    stored = sum(m.weight.numel() for m in layers.values())
    size, type_size = GGUF_BLOCKS[qtype]
    assert stored == n * type_size // size and float_matrix_bytes(model) == 0  # the ggml blocks, nothing else
    raw = formats.open_component(formats.detect(path)[0])
    assert torch.equal(layers["blocks.0.ffn.0"].weight.flatten(), raw.quantized("blocks.0.ffn.0.weight").data.flatten())

    want = run(build_dit(DictSource(official), torch.float32), inputs)
    on_read = run(build_dit(source, torch.float32), inputs)
    got = run(model, inputs)
    print(f"{qtype}: {stored / n:.3f} B/weight; vs dequantize-on-read {rel_err(got, on_read):.2e}, "
          f"vs official {rel_err(got, want):.4f}")
    assert rel_err(got, on_read) < 1e-6 and rel_err(got, want) < OUT_TOL[qtype]


def _stored_dit_file(folder, official, fmt: str):
    """The tiny DiT as a ComfyUI fp8_scaled file ("fp8") or a GGUF file of type `fmt`."""
    if fmt == "fp8":
        return tf.write_comfy(folder / "dit_fp8.safetensors", official, fp8="scale_weight")
    return tf.write_gguf(folder / "dit.gguf", official, fmt)


@pytest.mark.parametrize("fmt", ["fp8", "Q4_K"])
def test_stored_dit_streams_and_refills_from_disk(tmp_path, official, inputs, fmt: str) -> None:
    path = _stored_dit_file(tmp_path, official, fmt)
    model, refill = load_dit(formats.load_component(path, "dit"), torch.bfloat16)
    want = run(model, inputs)
    streamer = streaming.attach(model, "cpu", resident=0, prefetch=1, pinned=False)
    try:
        raw_dtype = torch.int8 if fmt == "fp8" else torch.uint8
        packed = streamer._packed[0]
        assert sum(e.dtype == raw_dtype for e in packed.entries) == 10  # 2 x (q k v o) + 2 ffn weights
        bf16_bytes = sum(2 * m.in_features * m.out_features for n, m in block_linears(model).items()
                         if n.startswith("blocks.0."))
        assert packed.nbytes < 0.65 * bf16_bytes  # the stored bytes travel, not a float copy
        assert torch.equal(run(model, inputs), want)
    finally:
        streaming.detach_streamer(model)
    streaming.set_expert_source(model, refill)
    streaming.move_expert(model, "disk")
    assert streaming.where_is(model) == "disk"
    streaming.move_expert(model, "ram")
    kind = QuantizedLinear if fmt == "fp8" else GGUFLinear
    assert all(isinstance(m, kind) for m in block_linears(model).values())
    assert torch.equal(run(model, inputs), want)


@pytest.mark.parametrize("fmt", ["fp8", "Q4_K"])
def test_stored_dit_waiting_on_disk_is_never_read_whole(tmp_path, official, inputs, fmt: str) -> None:
    """A plan that streams the DiT from disk (on_disk) loads a stored fp8 / GGUF file on meta:
    nothing of it is read at load (it was filled whole, then dropped), and streamed from its
    file it computes what the model loaded whole computes."""
    path = _stored_dit_file(tmp_path, official, fmt)
    whole, _ = load_dit(formats.load_component(path, "dit"), torch.bfloat16)
    want = run(whole, inputs)
    loaded = []
    peak = peak_cpu_bytes(lambda: loaded.append(load_dit(formats.load_component(path, "dit"), torch.bfloat16,
                                                         on_disk=True)))
    model, refill = loaded[0]
    assert streaming.where_is(model) == "disk"
    stored = sum(t.numel() * t.element_size() for t in whole.state_dict().values())
    assert peak < 0.1 * stored, (peak, stored)
    assert {n: t.dtype for n, t in model.state_dict().items()} == {n: t.dtype for n, t in whole.state_dict().items()}
    streaming.set_expert_source(model, refill)
    streaming.attach(model, "cpu", resident=0, prefetch=1, pinned=False, source=refill)
    try:
        assert torch.equal(run(model, inputs), want)
    finally:
        streaming.detach_streamer(model)


# ------------------------------------------------------------------------------ pipeline
@pytest.fixture(scope="module")
def ti2v_files(tiny_models, tmp_path_factory):
    """The tiny TI2V-5B folder, and its DiT as GGUF Q8_0 / fp8_scaled and its umT5 as a fp8 ComfyUI file."""
    root = tiny_models["ti2v-5b"]
    out = tmp_path_factory.mktemp("ti2v_files")
    dit = SafetensorsSource(sorted(root.glob("diffusion_pytorch_model-*.safetensors")))
    dit_state = {k: dit[k] for k in dit}
    t5_state = dict(open_source(root / "models_t5_umt5-xxl-enc-bf16.pth").items())
    spiece = (root / "google" / "umt5-xxl" / "spiece.model").read_bytes()
    return {
        "root": root,
        "tokenizer": root / "google" / "umt5-xxl",
        # dim 128: rows too short for K-quants, Q8_0 blocks of 32 fit every Linear
        "gguf": tf.write_gguf(out / "wan2.2_ti2v_5B-Q8_0.gguf", dit_state, "Q8_0"),
        "fp8": tf.write_comfy(out / "wan2.2_ti2v_5B_fp8_scaled.safetensors", dit_state, fp8="scale_weight"),
        "t5_fp8": tf.write_comfy_t5(out / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", t5_state, spiece,
                                    fp8="scale_weight"),
    }


@torch.inference_mode()
def test_fp8_text_encoder_stays_fp8(ti2v_files) -> None:
    source = formats.load_component(ti2v_files["t5_fp8"], "text_encoder")
    enc = load_text_encoder(source, ti2v_files["tokenizer"], torch.float32)
    layers = [m for n, m in enc.model.named_modules() if n.startswith("encoder.block.") and
              isinstance(m, (torch.nn.Linear, QuantizedLinear))]
    assert layers and all(isinstance(m, QuantizedLinear) and m.weight.dtype == torch.int8 for m in layers)
    assert enc.model.encoder.embed_tokens is enc.model.shared  # the tied embedding is held once
    prompts = ["a red fox jumps over the lazy dog", "一只猫在草地上奔跑"]
    on_read = build_text_encoder(source, ti2v_files["tokenizer"], dtype=torch.float32).encode(prompts)
    float_model = build_text_encoder(ti2v_files["root"] / "models_t5_umt5-xxl-enc-bf16.pth",
                                     ti2v_files["tokenizer"], dtype=torch.float32).encode(prompts)
    for got, same, want in zip(enc.encode(prompts), on_read, float_model, strict=True):
        assert rel_err(got, same) < 1e-6 and rel_err(got, want) < 0.08


@pytest.mark.parametrize("kind", ["t5_fp8", "t5_gguf", "t5_gguf_cached"])
def test_stored_text_encoder_waits_on_disk_and_reads_its_rows(ti2v_files, tmp_path, kind, monkeypatch) -> None:
    """A umT5 file in a stored format (ComfyUI fp8, a GGUF) can wait on disk as the plan says
    (it was held whole in RAM for the whole job): loaded on meta, streamed from its file with
    the embedding's rows of the prompt read from it, moved back whole; each time the same
    features as the encoder loaded whole."""
    from wan_lite.loading import keymaps
    from wan_lite.runtime import embedding_rows

    if kind.startswith("t5_gguf"):
        t5_state = dict(open_source(ti2v_files["root"] / "models_t5_umt5-xxl-enc-bf16.pth").items())
        path = tf.write_gguf(tmp_path / "umt5-Q8_0.gguf", t5_state, "Q8_0", arch="t5encoder",
                             rename=keymaps.t5_official_to_gguf)
    else:
        path = ti2v_files[kind]
    prompts = ["a red fox jumps over the lazy dog", "一只猫在草地上奔跑"]
    with torch.inference_mode():
        want = load_text_encoder(formats.load_component(path, "text_encoder"), ti2v_files["tokenizer"],
                                 torch.bfloat16).encode(prompts)
    cache = tmp_path / "cache" if kind == "t5_gguf_cached" else None  # converted once into the cache
    enc = load_text_encoder(formats.load_component(path, "text_encoder"), ti2v_files["tokenizer"], torch.bfloat16,
                            on_disk=True, cache_dir=cache)
    assert cache is None or len(list(cache.glob("*.safetensors"))) == 1
    model = enc.model
    assert streaming.where_is(model) == "disk" and streaming.expert_source(model) is not None
    rows = []
    real = embedding_rows.rows_on_demand
    monkeypatch.setattr(streaming, "rows_on_demand", lambda *a: rows.append(a[2]) or real(*a))
    source, key_map = streaming.expert_source(model)
    streaming.attach(model, "cpu", resident=0, prefetch=1, host_modules=streaming.T5_HOST_MODULES, source=source,
                     key_map=key_map)
    try:
        with torch.inference_mode():
            got = enc.encode(prompts)
    finally:
        streaming.detach_streamer(model)
    assert rows  # the embedding stayed in the file
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    streaming.move_expert(model, "disk")
    streaming.move_expert(model, "ram")
    with torch.inference_mode():
        assert all(torch.equal(g, w) for g, w in zip(enc.encode(prompts), want, strict=True))


def test_gguf_rows_equal_the_rows_of_the_whole_tensor(tmp_path) -> None:
    from wan_lite.loading.sources import GGUFSource

    table = torch.randn(40, 64)
    path = tf.write_gguf(tmp_path / "t.gguf", {"blocks.0.ffn.0.weight": table}, "Q8_0")
    src = GGUFSource(path)
    (name,) = [k for k in src if src.shape(k) == (40, 64)]
    rows = torch.tensor([0, 7, 7, 39])
    assert src.rows_are_cheap(name)
    assert torch.equal(src.read_rows(name, rows), src[name][rows])
    assert torch.equal(src.read_rows(name, rows, torch.bfloat16), src[name][rows].to(torch.bfloat16))


@pytest.fixture(scope="module")
def plain_ti2v(ti2v_files) -> tuple[WanPipeline, torch.Tensor]:
    pipe = WanPipeline.load(ti2v_files["root"])
    return pipe, pipe.generate("a red fox in the snow", seed=5, **SMALL).latents


def test_pipeline_builds_stored_dits(ti2v_files, plain_ti2v) -> None:
    want = plain_ti2v[1]
    for fmt, kind in (("gguf", GGUFLinear), ("fp8", QuantizedLinear)):
        pipe = WanPipeline.load(ti2v_files["root"], components={"dit": ti2v_files[fmt]})
        assert all(isinstance(m, kind) for m in block_linears(pipe.dit).values())
        got = pipe.generate("a red fox in the snow", seed=5, **SMALL).latents
        print(f"TI2V-5B pipeline, {fmt} DiT: latent rel err {rel_err(got, want):.4f}")
        assert rel_err(got, want) < (0.03 if fmt == "gguf" else 0.1)


def test_load_planned_keeps_the_stored_format_over_the_plan(ti2v_files, plain_ti2v, tmp_path, caplog) -> None:
    from wan_lite.runtime.hardware import Hardware
    from wan_lite.runtime.planner import ModelFootprint, PlanRequest, plan

    ref, want = plain_ti2v
    fp = ModelFootprint.from_config(ref.dit.config, name="ti2v-5b", vae_version="2.2")
    p = replace(plan(fp, PlanRequest(32, 32, 5, steps=2), Hardware.fake(vram_gb=4, ram_gb=16)),
                quantization="int8", resident_blocks=0, vae_tile=None, text_encoder="cpu",
                text_encoder_quant="bf16", vae_dtype="fp32", cfg_batch=False)
    with caplog.at_level(logging.INFO, logger="wan_lite.runtime.loader"):
        pipe = WanPipeline.load_planned(ti2v_files["root"], p, device="cpu", cache_dir=tmp_path,
                                        components={"dit": ti2v_files["fp8"], "text_encoder": ti2v_files["t5_fp8"],
                                                    "tokenizer": ti2v_files["tokenizer"]})
    assert "weights stay fp8 as stored" in caplog.text and "(int8) is not applied" in caplog.text
    layers = block_linears(pipe.dit)
    assert all(isinstance(m, QuantizedLinear) and m.fmt == "fp8" for m in layers.values())
    assert not list(tmp_path.glob("*.safetensors"))  # nothing re-quantized, nothing cached
    assert any(isinstance(m, QuantizedLinear) for m in pipe.text_encoder.model.modules())
    got = pipe.generate("a red fox in the snow", seed=5, **SMALL).latents
    print(f"planned fp8 DiT + fp8 umT5: latent rel err {rel_err(got, want):.4f}")
    assert rel_err(got, want) < 0.15


# ------------------------------------------------------------------------------ CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_cuda_gguf_dequant_equals_cpu(qtype: str) -> None:
    data = torch.from_numpy(finite_random_blocks(qtype, 64, 1024, seed=4))
    cpu = dequantize_gguf(data, qtype, (64, 1024))
    gpu = dequantize_gguf(data.cuda(), qtype, (64, 1024))
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8", "Q4_K"])
def test_cuda_stored_dit_streams_like_resident(tmp_path, official, inputs, fmt: str) -> None:
    from wan_lite.runtime.quant import _fp8_tensor_cores, set_compute

    if fmt == "fp8":
        path = tf.write_comfy(tmp_path / "cuda_fp8.safetensors", official, fp8="scale_weight")
    else:
        path = tf.write_gguf(tmp_path / "cuda.gguf", official, fmt)
    model, _ = load_dit(formats.load_component(path, "dit"), torch.bfloat16)
    on_cpu = run(model, inputs)  # dequantized bf16 weights
    cuda_inputs = tuple(t.cuda() for t in inputs)
    streamer = streaming.attach(model, "cuda", resident=0, prefetch=1, pinned=True)
    try:
        assert streamer.pinned_blocks == len(model.blocks)
        streamed = run(model, cuda_inputs)
    finally:
        streaming.detach_streamer(model)
    model.to("cuda")
    assert all(m.weight.is_cuda for m in block_linears(model).values())  # the stored bytes, on the GPU
    resident = run(model, cuda_inputs)
    assert torch.equal(streamed, resident)
    fp8_mm = fmt == "fp8" and _fp8_tensor_cores(torch.device("cuda"))
    err = rel_err(resident.cpu(), on_cpu)
    print(f"{fmt} on {torch.cuda.get_device_name()}: fp8 matmul {fp8_mm}, vs CPU dequant path {err:.4f}")
    # bf16 GEMMs differ between CPU and GPU in their rounding; fp8 x fp8 GEMMs also quantize activations
    assert err < (0.05 if fp8_mm else 0.01)
    if fp8_mm:
        set_compute(model, "dequant")
        assert rel_err(run(model, cuda_inputs).cpu(), on_cpu) < 0.01
