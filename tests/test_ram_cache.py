"""The converted-weights cache (issue 21): keyed by content, not place; stale entries removed;
`cache list|prune`; fp32 sharded experts converted tensor by tensor straight into it, equal to
the whole-model conversion bit for bit, with a RAM peak of about one block."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from tests.tiny_ckpt.dit import write_dit
from wan_lite.loading.build import dit_on_meta, keep_dit_fp32
from wan_lite.loading.tensors import SafetensorsSource
from wan_lite.models.dit import WanDiT
from wan_lite.runtime import quant, quant_cache, refill
from wan_lite.runtime.quant import quantize_model
from wan_lite.runtime.quant_cache import cache_key, list_entries, load_or_quantize, prune, save_quantized
from wan_lite.runtime.refill import declare_dtypes, refill_like


def fp32_dit(folder: Path, *, dim: int = 128, ffn: int = 256, layers: int = 3, shards: int = 3,
             seed: int = 0) -> SafetensorsSource:
    """A tiny DiT as the official A14B experts are released: fp32, sharded safetensors."""
    write_dit(folder, in_dim=16, out_dim=16, dim=dim, ffn_dim=ffn, num_layers=layers, shards=shards,
              text_dim=64, seed=seed)
    return SafetensorsSource(sorted(folder.glob("*.safetensors")))


def load(source, fmt, cache_dir, **kw):
    skip = WanDiT.no_quantize_patterns if fmt in quant.FORMATS else ()
    return load_or_quantize(dit_on_meta(source), source, fmt, dtype=torch.bfloat16, cache_dir=cache_dir,
                            keep_fp32=keep_dit_fp32, skip=skip, what="high DiT", **kw)


def test_moving_the_models_folder_keeps_the_cache(tmp_path, monkeypatch):
    src = fp32_dit(tmp_path / "models" / "high")
    _, first = load(src, "fp8", tmp_path / "cache")
    key = cache_key(src, "fp8")
    shutil.move(tmp_path / "models", tmp_path / "elsewhere")
    moved = SafetensorsSource(sorted((tmp_path / "elsewhere" / "high").glob("*.safetensors")))
    assert cache_key(moved, "fp8") == key
    calls = []
    real = quant.quantize_weight
    monkeypatch.setattr(quant, "quantize_weight", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, again = load(moved, "fp8", tmp_path / "cache")
    assert again == first and calls == []  # nothing quantized again
    assert {e.status for e in list_entries(tmp_path / "cache")} <= {"current", "orphan"}


def test_replaced_source_gives_a_new_entry_and_the_old_one_goes(tmp_path):
    folder = tmp_path / "high"
    src = fp32_dit(folder)
    _, old = load(src, "int8", tmp_path / "cache")
    key = cache_key(src, "int8")
    _, bf16 = load(src, "bf16", tmp_path / "cache")  # another format: its own entry, kept
    # the same file names with other weights (a re-download of another version)
    src2 = fp32_dit(folder, seed=5)
    for f in src2.files:  # written within the file system's clock tick: make the new mtime visible
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache_key(src2, "int8") != key
    _, new = load(src2, "int8", tmp_path / "cache")
    assert new != old and new.is_file()
    assert not old.exists() and not bf16.exists()  # their source files now hold other content
    assert [e.path for e in list_entries(tmp_path / "cache")] == [new]


def test_header_change_alone_changes_the_key(tmp_path):
    src = fp32_dit(tmp_path / "a")
    key = cache_key(src, "fp8")
    f = src.files[0]
    st = f.stat()
    data = bytearray(f.read_bytes())
    n = int.from_bytes(data[:8], "little")
    i = bytes(data[8:8 + n]).index(b'"pt"')
    data[8 + i:8 + i + 4] = b'"PT"'  # same size, same mtime, other header bytes
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache_key(SafetensorsSource(src.files), "fp8") != key


def test_lora_merged_source_keys_its_own_entry(tmp_path):
    from tests.tiny_ckpt.lora import make_lora, write_lora
    from wan_lite.loading.lora import LoRASource, read_lora

    src = fp32_dit(tmp_path / "high")
    state = {k: src[k] for k in src}
    lora = make_lora(state, ["blocks.0.self_attn.q"], rank=2)
    path = write_lora(tmp_path / "l.safetensors", lora)
    merged = LoRASource(src, [(read_lora(path), 1.0)])
    assert cache_key(merged, "bf16") != cache_key(src, "bf16")
    assert cache_key(LoRASource(src, [(read_lora(path), 0.5)]), "bf16") != cache_key(merged, "bf16")
    assert cache_key(LoRASource(src, [(read_lora(path), 1.0)]), "bf16") == cache_key(merged, "bf16")


def test_prune_cap_orphans_and_partials(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    a = fp32_dit(tmp_path / "a", seed=1)
    b = fp32_dit(tmp_path / "b", seed=2)
    _, pa = load(a, "fp8", cache)
    _, pb = load(b, "fp8", cache)
    now = time.time()
    os.utime(pa, (now - 100, now - 100))  # a used longer ago than b
    (cache / f".x.safetensors.{2**22 + 12345}.tmp").write_bytes(b"half")  # a dead writer's partial
    size = pb.stat().st_size
    gone = prune(cache, cap_gb=size * 1.5 / 1e9)
    assert set(gone) == {pa, cache / f".x.safetensors.{2**22 + 12345}.tmp"} and pb.exists()
    # sources gone: kept ORPHAN_DAYS after the last use, then removed
    shutil.rmtree(tmp_path / "b")
    assert [e.status for e in list_entries(cache)] == ["orphan"]
    assert prune(cache) == []
    assert prune(cache, now=now + 31 * 86400) == [pb]


def test_cache_cli_lists_and_prunes_the_apps_folder(tmp_path, monkeypatch, capsys):
    from wan_lite import paths
    from wan_lite.cli import main

    monkeypatch.setenv(paths.CACHE_DIR_ENV, str(tmp_path / "c"))
    _, entry = load(fp32_dit(tmp_path / "a"), "int8", paths.weights_cache_dir())
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert entry.name in out and "current" in out and str(tmp_path / "c") in out
    assert main(["cache", "prune", "--max-gb", "0"]) == 0
    assert not entry.exists()


def test_engine_cache_is_the_apps_whatever_the_directory(tmp_path, monkeypatch):
    from wan_lite import paths
    from wan_lite.engine import Engine

    monkeypatch.setenv(paths.CACHE_DIR_ENV, str(tmp_path / "c"))
    monkeypatch.chdir(tmp_path)
    assert Engine(Path("models"), Path("outputs")).cache_dir == tmp_path / "c" / "weights"


# ------------------------------------------------------------------------------ conversion
def whole_model(source, fmt) -> dict[str, torch.Tensor]:
    """The conversion as it was: the whole model filled in RAM, then its state."""
    model = dit_on_meta(source)
    if fmt in quant.FORMATS:
        quantize_model(model, fmt, WanDiT.no_quantize_patterns)
    declare_dtypes(model, torch.bfloat16, keep_dit_fp32)
    refill_like(model, source)
    return model.state_dict()


@pytest.mark.parametrize("fmt", ["bf16", "int8", "fp8", "int4"])
def test_streamed_conversion_equals_whole_model_bit_for_bit(tmp_path, fmt):
    src = fp32_dit(tmp_path / "high")
    _, path = load(src, fmt, tmp_path / "cache", fill=False)
    cached = SafetensorsSource([path])
    want = whole_model(src, fmt)
    assert set(cached) == set(want)
    for name, t in want.items():
        got = cached[name]
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert torch.equal(got.view(torch.uint8) if got.dtype.itemsize == 1 else got,
                           t.view(torch.uint8) if t.dtype.itemsize == 1 else t), name
    # and the model filled from the cache is that model
    model, _ = load(src, fmt, tmp_path / "cache")
    for name, t in model.state_dict().items():
        assert torch.equal(t.view(torch.uint8) if t.dtype.itemsize == 1 else t,
                           want[name].view(torch.uint8) if t.dtype.itemsize == 1 else want[name])


def peak_cpu_bytes(fn) -> int:
    """Peak of torch's CPU allocations while `fn` runs (the profiler's allocation events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    cur = peak = 0
    for e in events:
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_conversion_peak_is_about_one_block(tmp_path, fmt):
    dim, ffn, layers = 256, 1024, 6
    src = fp32_dit(tmp_path / "high", dim=dim, ffn=ffn, layers=layers, shards=4)
    block_fp32 = sum(src[k].numel() * 4 for k in src if k.startswith("blocks.0."))
    model_fp32 = sum(int(torch.Size(src.shape(k)).numel()) for k in src) * 4
    peak = peak_cpu_bytes(lambda: load(src, fmt, tmp_path / "cache", fill=False))
    whole = peak_cpu_bytes(lambda: whole_model(src, fmt))
    assert peak <= block_fp32, (peak, block_fp32)  # one source tensor and its converted copy
    assert whole >= model_fp32 / (2 if fmt == "bf16" else 4) * 0.9  # the old way held the whole model
    assert peak * 3 < whole


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_large_tensors_convert_and_fill_a_chunk_at_a_time(tmp_path, monkeypatch, fmt):
    """A tensor larger than refill.ROW_CHUNK_BYTES (umT5's 2 GB embedding at full size; every FFN
    weight here, with the chunk made small) is read, cast and written a chunk of rows at a time
    unless it is quantized:
    the same cache bit for bit, a peak of a few chunks instead of the largest tensor and its copy;
    filled straight to a device the same way, it is the same model."""
    dim, ffn, layers = 256, 1024, 3
    src = fp32_dit(tmp_path / "high", dim=dim, ffn=ffn, layers=layers, shards=2)
    _, whole_path = load(src, fmt, tmp_path / "whole", fill=False)
    largest = max(int(torch.Size(src.shape(k)).numel()) * 4 for k in src)
    monkeypatch.setattr(refill, "ROW_CHUNK_BYTES", 64 << 10)
    peak = peak_cpu_bytes(lambda: load(src, fmt, tmp_path / "chunked", fill=False))
    _, chunked_path = load(src, fmt, tmp_path / "chunked", fill=False)
    assert chunked_path.read_bytes() == whole_path.read_bytes()
    if fmt == "bf16":  # (int8: the Linear weights are quantized whole, one at a time, as before)
        assert peak * 2 < largest * 1.5, (peak, largest)  # the largest tensor in fp32 and its copy, before
        model = dit_on_meta(src)
        declare_dtypes(model, torch.bfloat16, keep_dit_fp32)
        refill_like(model, src, device="cpu")
        want = SafetensorsSource([whole_path])
        assert all(torch.equal(t, want[n]) for n, t in model.state_dict().items())


def test_rows_of_a_pth_file_equal_its_rows_and_the_file_reads_again(tmp_path):
    """PthSource reads rows out of torch's memory map and lets those pages go (MADV_PAGEOUT):
    the rows are right, and the tensor read after that is still whole and right."""
    from wan_lite.loading.tensors import PthSource

    table = torch.randn(4096, 64)
    torch.save({"t": table}, tmp_path / "t.pth")
    src = PthSource(tmp_path / "t.pth")
    assert src.rows_are_cheap("t")
    rows = torch.arange(100, 3000)
    assert torch.equal(src.read_rows("t", rows, torch.bfloat16), table[rows].to(torch.bfloat16))
    assert torch.equal(src["t"], table)


def test_quantize_weight_count_unchanged_for_cached_float(tmp_path, monkeypatch):
    """A bf16 cache of an fp32 source is read back as it is: no conversion at the second load."""
    src = fp32_dit(tmp_path / "high")
    load(src, "bf16", tmp_path / "cache")
    seen = []
    monkeypatch.setattr(quant_cache, "convert_to_cache", lambda *a, **k: seen.append(1))
    model, path = load(src, "bf16", tmp_path / "cache")
    assert seen == [] and path is not None
    assert model.blocks[0].self_attn.q.weight.dtype == torch.bfloat16


def test_save_quantized_still_writes_what_it_is_given(tmp_path):
    src = fp32_dit(tmp_path / "high")
    model = dit_on_meta(src)
    quantize_model(model, "int8", WanDiT.no_quantize_patterns)
    declare_dtypes(model, torch.bfloat16, keep_dit_fp32)
    refill_like(model, src)
    path = save_quantized(model, tmp_path / "x.safetensors", key="k")
    assert quant_cache.load_quantized(dit_on_meta(src), path, key="k")


def test_disk_speed_is_probed_once_and_remembered(tmp_path, monkeypatch):
    from wan_lite import paths
    from wan_lite.runtime import hardware

    monkeypatch.setenv(paths.CONFIG_DIR_ENV, str(tmp_path / "cfg"))
    calls = []
    real = hardware._measure_read
    monkeypatch.setattr(hardware, "_measure_read", lambda f: calls.append(f) or real(f))
    first = hardware.disk_read_gbps(tmp_path / "c")
    assert first > 0 and len(calls) == 1 and (tmp_path / "cfg" / hardware.DISK_SPEED_FILE).is_file()
    assert hardware.disk_read_gbps(tmp_path / "c") == first and len(calls) == 1
    assert not list((tmp_path / "c").glob(".disk_probe*"))
