"""Block streaming (streamed == resident, bit for bit) and whole-model placement of experts."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tests.test_quant import ToyModel, tiny_umt5, toy, toy_input
from tests.tiny_ckpt.dit import write_dit
from wan_lite.loading.build import build_dit
from wan_lite.loading.tensors import SafetensorsSource
from wan_lite.runtime.quant import quantize_model, quantized_modules
from wan_lite.runtime.quant_cache import load_or_quantize
from wan_lite.runtime.streaming import (
    T5_HOST_MODULES,
    BlockStreamer,
    attach,
    move_expert,
    set_expert_source,
    streamer_of,
    where_is,
)


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------ CPU equivalence
@pytest.mark.parametrize("resident,prefetch", [(0, 1), (0, 2), (1, 1), (2, 3), (0, 5), (4, 1)])
@pytest.mark.parametrize("fmt", [None, "int8", "fp8", "int4"])
def test_streamed_equals_resident_cpu(resident: int, prefetch: int, fmt: str | None) -> None:
    model = toy(layers=4)
    if fmt:
        quantize_model(model, fmt)
    x = toy_input()
    ref = run(model, x)
    before = snapshot(model)
    streamer = attach(model, "cpu", resident=resident, prefetch=prefetch)
    assert streamer_of(model) is streamer
    for _ in range(3):  # repeated forwards exercise the wrap-around prefetch of the next step
        assert torch.equal(run(model, x), ref)
    streamer.detach()
    assert streamer_of(model) is None
    assert torch.equal(run(model, x), ref)
    after = snapshot(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


def test_packing_uses_one_buffer_per_block_and_no_copy_of_params() -> None:
    model = toy(layers=3)
    params = [p for p in model.blocks[1].parameters()]
    streamer = attach(model, "cpu", resident=1, prefetch=1)
    packed = streamer._packed[0]
    assert packed.index == 1
    base = packed.cpu.untyped_storage().data_ptr()
    # The block's own Parameter objects now view the packed buffer (no second copy in RAM).
    assert [p for p in model.blocks[1].parameters()] == params
    assert all(p.untyped_storage().data_ptr() == base for p in params)
    assert len(streamer._slots) == 2 and streamer.slot_bytes == 2 * max(p.nbytes for p in streamer._packed)
    assert "1 resident, 2 streamed" in streamer.summary()
    streamer.detach()


@pytest.mark.parametrize("prefetch", [1, 2])
def test_blocks_run_from_slots_prefetched_in_order(prefetch: int) -> None:
    """During its forward a streamed block's weights live in a slot, loaded ahead of time: each
    step copies every streamed block exactly once and never waits on an on-demand load."""
    model = toy(layers=5)
    x = toy_input()
    streamer = attach(model, "cpu", resident=1, prefetch=prefetch)
    slot_ptrs = {s.untyped_storage().data_ptr() for s in streamer._slots}
    seen: list[tuple[int, int]] = []
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(
            lambda m, a, i=i: seen.append((i, m.q.weight.untyped_storage().data_ptr())))
    loads: list[int] = []
    real_load, real_pick = streamer._load, streamer._pick_slot
    streamer._load = lambda pos, slot: (loads.append(pos), real_load(pos, slot))[1]
    streamer._pick_slot = lambda pos: pytest.fail(f"block {pos} was not prefetched")
    run(model, x)
    run(model, x)
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4] * 2
    assert all(ptr in slot_ptrs for i, ptr in seen if i >= 1)
    assert seen[0][1] not in slot_ptrs  # the resident block stays where it is
    # Four streamed blocks, prefetch + 1 slots: one copy per block and step (the loads issued
    # after the last block are the next step's first blocks).
    assert sorted(loads) == sorted([0, 1, 2, 3] * 2)
    streamer._load, streamer._pick_slot = real_load, real_pick
    streamer.detach()
    assert all(p.untyped_storage().data_ptr() not in slot_ptrs for p in model.parameters())


def test_pinning_helpers_without_a_gpu() -> None:
    from wan_lite.runtime.packed_blocks import PAGE, page_aligned, pin_in_place

    for n in (1, PAGE - 1, PAGE, 3 * PAGE + 7, 10**6):
        buf = page_aligned(n)  # registered ranges must own whole pages
        assert buf.data_ptr() % PAGE == 0 and buf.numel() % PAGE == 0 and n <= buf.numel() < n + PAGE
    if not torch.cuda.is_available():
        assert pin_in_place(page_aligned(100)) is False  # falls back, does not raise


def test_failed_attach_leaves_no_hooks() -> None:
    model = toy(layers=3)
    x = toy_input()
    ref = run(model, x)
    with torch.device("meta"):
        model.blocks[2].extra = nn.Linear(2, 2)  # an unfilled tensor: packing must refuse it
    with pytest.raises(RuntimeError, match="meta"):
        attach(model, "cpu", resident=0, prefetch=1)
    assert streamer_of(model) is None
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in model.blocks)
    del model.blocks[2].extra
    assert torch.equal(run(model, x), ref)


def test_model_dropped_while_attached_is_collected() -> None:
    import gc
    import weakref

    model = toy(layers=3)
    streamer = attach(model, "cpu", resident=0, prefetch=1)
    refs = weakref.ref(model), weakref.ref(streamer)
    del model, streamer
    gc.collect()
    assert refs[0]() is None and refs[1]() is None


def test_out_of_order_calls_and_failed_forward_recover() -> None:
    model = toy(layers=4)
    x = toy_input()
    ref = run(model, x)
    h = torch.randn(2, 24, 128)
    ref_block2 = run(model.blocks[2], h)
    streamer = attach(model, "cpu", resident=0, prefetch=1)
    assert torch.equal(run(model.blocks[2], h), ref_block2)  # not the next block in order
    assert torch.equal(run(model.blocks[0], h), run(copy.deepcopy(model.blocks[0]), h))

    class Boom(RuntimeError):
        pass

    def explode(_m, _a):
        raise Boom

    hook = model.blocks[1].ffn.register_forward_pre_hook(explode)
    with pytest.raises(Boom):
        run(model, x)  # like an OOM inside block 1: its post-hook never runs
    hook.remove()
    assert torch.equal(run(model, x), ref)
    streamer.detach()


def test_reattach_and_wan_dit_streaming(tmp_path) -> None:
    state = write_dit(tmp_path / "dit", in_dim=16, out_dim=16, dim=128, ffn_dim=256, num_layers=3, text_dim=32)
    src = SafetensorsSource(sorted((tmp_path / "dit").glob("*.safetensors")))
    model = build_dit(src, torch.bfloat16)
    assert set(state) == set(model.state_dict())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 4, generator=gen)
    ctx = torch.randn(1, 512, 32, generator=gen)
    t = torch.tensor([500.0])
    for block in model.blocks:
        # The FFN in chunks, as the planner may choose; set before the reference: a bf16 CPU matmul
        # may round differently for other row counts on some CPUs (test_dit.py::test_chunked_block_is_identical
        # compares chunked with whole), and this test is about streaming, which must change nothing.
        block.chunk_tokens = 3
    with torch.inference_mode():
        ref = model(x, t, ctx)
        s1 = attach(model, "cpu", resident=1, prefetch=1)
        assert torch.equal(model(x, t, ctx), ref)
        s2 = attach(model, "cpu", resident=0, prefetch=2)  # re-attaching detaches the old one
        assert s1.model is None and streamer_of(model) is s2
        assert torch.equal(model(x, t, ctx), ref)
        s2.detach()


def test_umt5_encoder_streaming() -> None:
    model, ids = tiny_umt5(3)
    with torch.inference_mode():
        ref = model(input_ids=ids).last_hidden_state
        quantize_model(model, "int8")
        ref_q = model(input_ids=ids).last_hidden_state
        streamer = BlockStreamer.attach(model, "cpu", resident=1, prefetch=1, host_modules=T5_HOST_MODULES)
        assert len(streamer._packed) == 2
        assert torch.equal(model(input_ids=ids).last_hidden_state, ref_q)
        streamer.detach()
    assert not torch.equal(ref, ref_q)


class _Reads(SafetensorsSource):
    """A safetensors source that records which tensors are read whole and which by rows."""

    def __init__(self, files) -> None:
        super().__init__(files)
        self.whole, self.rows = [], []

    def read(self, name, dtype=None):
        self.whole.append(name)
        return super().read(name, dtype)

    def read_rows(self, name, rows, dtype=None):
        self.rows.append((name, rows.tolist()))
        return super().read_rows(name, rows, dtype)


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_umt5_streamed_from_its_file_reads_only_the_embedding_rows_it_looks_up(tmp_path, fmt) -> None:
    """The text encoder waiting on disk and streamed from its file (the plan's "stream" without
    keeping it): its 2 GB token embedding is never read whole, each prompt reads the rows of
    its tokens, and the output is the in-RAM encoder's bit for bit. Detached, the embedding is
    filled whole when the encoder moves to RAM."""
    model, ids = tiny_umt5(3)
    if fmt == "int8":
        quantize_model(model, "int8")
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(tmp_path / "umt5.safetensors"))
    with torch.inference_mode():
        ref = model(input_ids=ids).last_hidden_state
    source = _Reads([tmp_path / "umt5.safetensors"])
    set_expert_source(model, source)
    move_expert(model, "disk")
    streamer = attach(model, "cpu", resident=0, prefetch=1, host_modules=T5_HOST_MODULES, source=source)
    assert model.shared.weight.is_meta and model.encoder.embed_tokens.weight.is_meta
    with torch.inference_mode():
        out = model(input_ids=ids).last_hidden_state
    assert torch.equal(out, ref)
    assert not [n for n in source.whole if n.endswith("embed_tokens.weight") or n == "shared.weight"]
    assert [rows for _n, rows in source.rows] == [sorted(set(ids.flatten().tolist()))]
    streamer.detach()
    move_expert(model, "ram")
    assert not model.shared.weight.is_meta
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).last_hidden_state, ref)


def test_rows_of_a_tensor_equal_its_rows(tmp_path) -> None:
    table = torch.randn(50, 8).to(torch.bfloat16)
    save_file({"t": table}, str(tmp_path / "t.safetensors"))
    src = SafetensorsSource([tmp_path / "t.safetensors"])
    rows = torch.tensor([0, 3, 3, 49])
    assert torch.equal(src.read_rows("t", rows), table[rows])
    assert torch.equal(src.read_rows("t", rows, torch.float32), table[rows].float())
    with pytest.raises(IndexError):
        src.read_rows("t", torch.tensor([50]))


@pytest.mark.gpu
def test_cuda_umt5_from_its_file_rows_streamed_and_moved_whole(tmp_path) -> None:
    """On a GPU: streamed from its file, the rows of a prompt come from the file to the CPU
    lookup and the output to the GPU; moved whole to the GPU ("gpu"/"resident" plans), the
    embedding goes there a chunk at a time. Both equal the encoder resident on the GPU."""
    from wan_lite.runtime import refill

    model, ids = tiny_umt5(3)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "umt5.safetensors"))
    with torch.inference_mode():
        ref = model.cuda()(input_ids=ids.cuda()).last_hidden_state
    source = SafetensorsSource([tmp_path / "umt5.safetensors"])
    set_expert_source(model, source)
    move_expert(model, "disk")
    streamer = attach(model, "cuda", resident=0, prefetch=1, host_modules=T5_HOST_MODULES, source=source)
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids.cuda()).last_hidden_state, ref)
    streamer.detach()
    move_expert(model, "disk")
    chunk, refill.ROW_CHUNK_BYTES = refill.ROW_CHUNK_BYTES, 1024  # the tiny table in several chunks
    try:
        move_expert(model, "gpu")
    finally:
        refill.ROW_CHUNK_BYTES = chunk
    assert model.shared.weight.is_cuda
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids.cuda()).last_hidden_state, ref)


@pytest.mark.gpu
def test_cuda_umt5_streaming_with_embedding_in_ram() -> None:
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(vocab_size=64, d_model=64, d_kv=16, d_ff=128, num_layers=3, num_heads=4,
                     relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")
    torch.manual_seed(0)
    model = UMT5EncoderModel(cfg).to(torch.bfloat16).eval()
    quantize_model(model, "int8")
    ids = torch.randint(2, 64, (2, 9), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.inference_mode():
        ref = model.cuda()(input_ids=ids).last_hidden_state
        streamer = attach(model, "cuda", resident=0, prefetch=1, host_modules=T5_HOST_MODULES)
        assert not model.shared.weight.is_cuda and model.encoder.final_layer_norm.weight.is_cuda
        out = model(input_ids=ids).last_hidden_state
        assert out.is_cuda and torch.equal(out, ref)
        streamer.detach()


# ------------------------------------------------------------------------------ experts
def test_move_expert_disk_and_back_from_float_file(tmp_path) -> None:
    model = toy(torch.float32)
    path = tmp_path / "expert.safetensors"
    save_file(model.state_dict(), str(path))
    quantize_model(model, "int8")  # from the same float32 weights the file holds
    model.embed.to(torch.bfloat16)  # mixed dtypes survive the round trip
    x = toy_input()
    ref = run(model, x)
    set_expert_source(model, SafetensorsSource([path]))
    move_expert(model, "disk")
    assert where_is(model) == "disk"
    assert all(t.device.type == "meta" for t in model.state_dict().values())
    move_expert(model, "ram")  # re-read from the float file, re-quantized as read
    assert where_is(model) == "ram"
    assert model.blocks[0].modulation.dtype == torch.float32
    assert model.embed.weight.dtype == torch.bfloat16 and model.blocks[0].q.weight.dtype == torch.int8
    assert torch.equal(run(model, x), ref)


def test_move_expert_from_quantized_cache_and_streamer_detach(tmp_path) -> None:
    state = toy(torch.float32).state_dict()
    src_path = tmp_path / "toy.safetensors"
    save_file(state, str(src_path))
    with torch.device("meta"):
        model = ToyModel()
    keep = lambda n: "modulation" in n or "norm" in n  # noqa: E731
    model, cache = load_or_quantize(model, SafetensorsSource([src_path]), "fp8", cache_dir=tmp_path, keep_fp32=keep)
    x = toy_input()
    ref = run(model, x)
    set_expert_source(model, SafetensorsSource([cache]))  # the cache holds the exact tensors
    attach(model, "cpu", resident=1, prefetch=1)
    move_expert(model, "disk")  # detaches the streamer first
    assert streamer_of(model) is None and where_is(model) == "disk"
    move_expert(model, "ram")
    assert len(quantized_modules(model)) == 15  # q, k, v, ffn.0, ffn.2 x 3 blocks
    assert torch.equal(run(model, x), ref)


def test_move_expert_needs_a_source() -> None:
    with pytest.raises(RuntimeError, match="set_expert_source"):
        move_expert(toy(), "disk")
    with pytest.raises(ValueError):
        move_expert(toy(), "vram")


# ------------------------------------------------------------------------------ CUDA
def _cuda_toy(layers: int = 6, d: int = 512, ffn: int = 2048) -> ToyModel:
    return toy(layers=layers, d=d, ffn=ffn, heads=4)


@pytest.mark.gpu
@pytest.mark.parametrize("pinned", [True, False])
@pytest.mark.parametrize("fmt", [None, "int8"])
def test_cuda_streamed_equals_resident(pinned: bool, fmt: str | None) -> None:
    model = _cuda_toy()
    if fmt:
        quantize_model(model, fmt)
    x = toy_input(tokens=256).cuda()
    model.cuda()
    ref = run(model, x)
    model.cpu()
    streamer = attach(model, "cuda", resident=1, prefetch=2, pinned=pinned)
    assert streamer.pinned_blocks == (5 if pinned else 0)
    # (torch.Tensor.is_pinned does not see memory page-locked with cudaHostRegister; the
    # streamer counts what it locked)
    assert model.embed.weight.is_cuda and model.blocks[0].q.bias.is_cuda
    assert not model.blocks[3].q.bias.is_cuda  # streamed blocks rest in host memory between uses
    for _ in range(3):
        out = run(model, x)
        torch.cuda.synchronize()
        assert torch.equal(out, ref)
    streamer.detach()


@pytest.mark.gpu
def test_cuda_pin_limit_falls_back_to_pageable() -> None:
    model = _cuda_toy()
    x = toy_input(tokens=256).cuda()
    model.cuda()
    ref = run(model, x)
    model.cpu()
    one_block = sum(t.numel() * t.element_size() for t in model.blocks[1].state_dict().values())
    streamer = attach(model, "cuda", resident=0, prefetch=1, pinned=True, pin_limit=int(2.5 * one_block))
    assert 1 <= streamer.pinned_blocks < len(streamer._packed)
    assert torch.equal(run(model, x), ref)
    streamer.detach()


@pytest.mark.gpu
def test_cuda_peak_memory_is_resident_plus_slots() -> None:
    model = _cuda_toy(layers=8, d=2048, ffn=8192)  # ~52 MB per int8 block
    quantize_model(model, "int8")
    x = toy_input(tokens=64).cuda()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    streamer = attach(model, "cuda", resident=1, prefetch=1)
    run(model, x)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    run(model, x)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    block_bytes = sum(t.numel() * t.element_size() for t in model.blocks[0].state_dict().values())
    non_block = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if not n.startswith("blocks."))
    resident_bytes = block_bytes + non_block
    # 64 tokens: activations are tiny; this covers one dequantized bf16 weight (32 MiB) and the
    # cuBLAS workspace, both allocated through the caching allocator.
    activations = 128 << 20
    all_blocks = 8 * block_bytes
    assert peak <= resident_bytes + streamer.slot_bytes + activations, (peak, streamer.summary())
    assert peak < all_blocks
    streamer.detach()


@pytest.mark.gpu
def test_cuda_move_expert_one_on_gpu(tmp_path) -> None:
    a, b = toy(torch.float32, seed=0), toy(torch.float32, seed=1)
    for name, m in (("a", a), ("b", b)):
        path = tmp_path / f"{name}.safetensors"
        save_file(m.state_dict(), str(path))
        set_expert_source(m, SafetensorsSource([path]))
    x = toy_input().cuda()
    move_expert(a, "gpu")
    ref_a = run(a, x)
    move_expert(a, "disk")
    move_expert(b, "gpu")
    assert where_is(a) == "disk" and where_is(b) == "gpu"
    run(b, x)
    move_expert(b, "ram")
    move_expert(a, "gpu")
    assert torch.equal(run(a, x), ref_a)


# ------------------------------------------------------------------------------ attention choice
# (start-up choice of the attention kernel, wan_lite/runtime/attention_select.py)
def _sdpa_stand_in(q, k, v, tensor_layout="NHD", is_causal=False):
    """Plays an installed, correct SageAttention: same function, sage's call signature."""
    assert tensor_layout == "NHD" and not is_causal
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float()).transpose(1, 2)


def test_attention_self_check_accepts_good_and_rejects_bad_kernels(monkeypatch) -> None:
    import sys
    import types

    from wan_lite.runtime import attention_select as sel

    fake = types.ModuleType("sageattention")
    fake.sageattn = _sdpa_stand_in
    monkeypatch.setitem(sys.modules, "sageattention", fake)
    wrapped = sel._sage_backend()
    ok, err, reason = sel.self_check(wrapped, "cpu")
    assert ok and err < 0.01 and reason == "passed"
    q = torch.randn(1, 5, 2, 128, dtype=torch.bfloat16)
    assert wrapped(q, q, q).dtype == torch.bfloat16

    ok, err, reason = sel.self_check(lambda q, k, v: torch.flip(_sdpa_stand_in(q, k, v), dims=[1]).to(q.dtype), "cpu")
    assert not ok and err > sel.TOLERANCE and "differs from SDPA" in reason

    def broken(q, k, v):
        raise RuntimeError("no kernel image is available for execution on the device")

    ok, err, reason = sel.self_check(broken, "cpu")
    assert not ok and "no kernel image" in reason
    ok, _, reason = sel.self_check(lambda q, k, v: q[:, :1], "cpu")
    assert not ok and "shape" in reason
    ok, _, reason = sel.self_check(lambda q, k, v: q * float("nan"), "cpu")
    assert not ok and "non-finite" in reason


def test_attention_kernel_is_used_only_when_faster(monkeypatch) -> None:
    """A correct SageAttention still loses to SDPA where SDPA is faster (cuDNN attention on an
    H200); it is chosen where it is faster. Timings are stubbed: no GPU needed."""
    import sys
    import types

    from wan_lite.runtime import attention_select as sel

    fake = types.ModuleType("sageattention")
    fake.sageattn = _sdpa_stand_in
    monkeypatch.setitem(sys.modules, "sageattention", fake)
    monkeypatch.setattr(sel, "self_check", lambda fn, dev: (True, 0.012, "passed"))
    cuda = torch.device("cuda")
    monkeypatch.setattr(sel, "compare_speed", lambda fn, dev, **kw: (21.0, 15.0))
    slower = sel._decide(cuda, True)
    assert slower.backend == "sdpa" and not slower.failed and "faster than the installed" in slower.note
    monkeypatch.setattr(sel, "compare_speed", lambda fn, dev, **kw: (10.0, 15.0))
    faster = sel._decide(cuda, True)
    assert faster.backend == "sage" and "1.50x" in faster.note

    def too_big(fn, dev, **kw):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(sel, "compare_speed", too_big)
    broken = sel._decide(cuda, True)
    assert broken.backend == "sdpa" and broken.failed and "larger input" in broken.note


def test_attention_speed_comparison_times_both() -> None:
    from wan_lite.runtime.attention_select import compare_speed

    calls = []

    def slow(q, k, v):
        calls.append(q.shape)
        time.sleep(0.02)
        return q

    mine, sdpa = compare_speed(slow, "cpu", torch.float32, shape=(64, 2), repeats=2)
    assert len(calls) == 3 and calls[0] == (1, 64, 2, 128)  # a warm-up and two timed calls
    assert mine >= 20.0 > sdpa


def test_attention_select_falls_back_to_sdpa_with_a_note(caplog) -> None:
    from wan_lite.models import attention as attn_mod
    from wan_lite.runtime.attention_select import select_attention

    with caplog.at_level("INFO", logger="wan_lite.runtime.attention_select"):
        choice = select_attention("cpu")
    assert choice.backend == "sdpa" and choice.fn is attn_mod.sdpa_attention
    assert "SDPA" in choice.note and choice.note in caplog.text
    assert select_attention("cpu", allow_sage=False).note.endswith("disabled by the user).")


@pytest.mark.gpu
def test_cuda_attention_select() -> None:
    from wan_lite.models import attention as attn_mod
    from wan_lite.runtime.attention_select import select_attention

    choice = select_attention("cuda")
    q, k, v = (torch.randn(1, 777, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = choice.fn(q, k, v)
    ref = attn_mod.sdpa_attention(q, k, v)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 0.05
