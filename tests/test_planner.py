"""Memory planner, hardware description and memory profiles (pure arithmetic: CPU, fast)."""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from wan_lite.errors import WanLiteError
from wan_lite.models.dit import WanDiT, WanDiTConfig
from wan_lite.runtime.hardware import Hardware, MemoryProfile, ProfileError, get_profile, load_profiles
from wan_lite.runtime.plan_cli import add_plan_parser, run_plan
from wan_lite.runtime.plan_model import Geo, evaluate
from wan_lite.runtime.planner import (
    CHUNKS,
    QUANTS,
    K,
    ModelFootprint,
    PlanRequest,
    default_chunk,
    leaner,
    plan,
)

MODELS = ("ti2v-5b", "t2v-a14b", "i2v-a14b")
VRAMS = (4, 6, 8, 12, 16, 24, 80)
RAMS = (16, 32, 64)
LEANNESS = {"bf16": 0, "fp8": 1, "int8": 1, "int4": 2}


def default_request(name: str) -> PlanRequest:
    m = ModelFootprint.full_size(name)
    w, h = m.sizes[0]
    return PlanRequest(w, h, 121 if name == "ti2v-5b" else 81, image=name == "i2v-a14b")


@pytest.fixture(scope="module")
def table() -> dict[tuple[str, int, int], object]:
    return {(name, v, r): plan(ModelFootprint.full_size(name), default_request(name), Hardware.fake(v, r))
            for name in MODELS for v in VRAMS for r in RAMS}


# ------------------------------------------------------------------------------ sizes
@pytest.mark.parametrize("name,params", [("ti2v-5b", 4_999_787_712), ("t2v-a14b", 14_288_491_584),
                                         ("i2v-a14b", 14_288_901_184)])
def test_full_size_parameter_counts_match_the_released_checkpoints(name: str, params: int) -> None:
    m = ModelFootprint.full_size(name)
    assert m.params == params
    # bf16 is 2 bytes per parameter (+ fp32 modulation tables); int8/fp8 within 1.1x of 1 byte per
    # Linear weight plus 2 per other parameter
    assert m.expert_bytes("bf16") == pytest.approx(2 * params, rel=1e-3)
    ideal = m.num_layers * (m.block_linear_params + 2 * (m.block_params - m.block_linear_params)) \
        + m.nonblock_bytes()
    assert ideal <= m.expert_bytes("int8") <= 1.1 * ideal
    assert m.expert_bytes("int8") == m.expert_bytes("fp8")


def test_text_encoder_and_vae_sizes() -> None:
    m = ModelFootprint.full_size("ti2v-5b")
    assert m.text_bytes("bf16") == pytest.approx(11_361_820_672, rel=1e-3)  # umT5-XXL bf16 file
    assert 5.5e9 < m.text_bytes("int8") < 6.9e9  # int8 blocks, bf16 embedding
    assert m.vae_bytes("decoder", "bf16") + m.vae_bytes("encoder", "bf16") == pytest.approx(1_409_377_336, rel=1e-4)
    a14 = ModelFootprint.full_size("t2v-a14b")
    assert a14.vae_version == "2.1" and a14.experts == 2
    assert sum(a14.vae_params) * 4 == pytest.approx(507_570_124, rel=1e-4)


def test_from_config_counts_what_the_model_really_holds() -> None:
    cfg = WanDiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=3, in_dim=36, out_dim=16)
    with torch.device("meta"):
        dit = WanDiT(cfg)
    m = ModelFootprint.from_config(cfg, name="tiny")
    assert m.params == sum(p.numel() for p in dit.parameters())
    assert m.block_params == sum(p.numel() for p in dit.blocks[0].parameters())
    linear = sum(mod.weight.numel() for mod in dit.blocks[0].modules() if isinstance(mod, torch.nn.Linear))
    assert m.block_linear_params == linear
    duck = SimpleNamespace(dim=256, ffn_dim=512, num_heads=2, num_layers=3, in_dim=36, out_dim=16)
    assert ModelFootprint.from_config(duck).params == m.params


# ------------------------------------------------------------------------------ the table
def test_plans_within_their_budgets(table) -> None:
    for key, p in table.items():
        assert p.quantization in QUANTS and 0 <= p.resident_blocks <= p.model.num_layers, key
        if p.fits:
            assert p.peak_vram_gib <= p.usable_vram_gib, key
            assert p.peak_ram_gib <= p.usable_ram_gib, key
            assert p.reason is None
        else:
            assert p.reason and "GiB" in p.reason, key
        assert p.fp8_compute == (p.quantization == "fp8"), key  # fake GPUs are cc 8.9
        assert p.seconds_estimate > 0
        if p.model.experts == 1:
            assert p.idle_expert == "none"
        else:
            assert p.idle_expert in ("gpu", "ram", "disk")
            if p.idle_expert == "gpu":
                assert p.resident_blocks == p.model.num_layers


def test_more_vram_never_gives_a_leaner_plan(table) -> None:
    for name in MODELS:
        for r in RAMS:
            prev = None
            for v in VRAMS:
                p = table[name, v, r]
                if prev is not None:
                    assert p.fits or not prev.fits, (name, v, r)
                    if prev.fits:
                        assert LEANNESS[p.quantization] <= LEANNESS[prev.quantization], (name, v, r)
                        if p.quantization == prev.quantization:
                            assert p.resident_blocks >= prev.resident_blocks, (name, v, r)
                            assert p.peak_vram_gib >= prev.peak_vram_gib - 1e-6, (name, v, r)
                prev = p


def test_more_ram_never_makes_a_request_fail(table) -> None:
    for name in MODELS:
        for v in VRAMS:
            fits = [table[name, v, r].fits for r in RAMS]
            assert fits == sorted(fits), (name, v, fits)


def test_datacenter_gpu_keeps_the_5b_model_resident_in_bf16(table) -> None:
    for r in RAMS:
        p = table["ti2v-5b", 80, r]
        assert p.fits and p.quantization == "bf16" and p.resident_blocks == 30
        assert p.keep_resident and p.vae_tile is None and p.text_encoder == "resident"  # room for umT5 beside every stage
        # the whole sequence at once, cond and uncond one after the other (a batch of 2 is slower)
        assert p.ffn_chunk_tokens is None and not p.cfg_batch


def test_a14b_on_4gb_and_16gb_ram_is_refused_with_numbers(table) -> None:
    p = table["t2v-a14b", 4, 16]
    assert not p.fits
    assert f"{p.peak_vram_gib:.1f} GiB of GPU memory" in p.reason
    assert f"{p.usable_vram_gib:.1f} GiB usable" in p.reason
    # RAM is no longer short there: the experts stream from disk (issue 21); the GPU is
    assert p.blocks_from == "disk" and p.peak_ram_gib <= p.usable_ram_gib and "GiB RAM" not in p.reason
    assert "832x480 fits" in p.reason


def test_refusal_suggests_what_would_fit(table) -> None:
    p = table["t2v-a14b", 6, 32]
    assert not p.fits and "832x480 fits" in p.reason and "fewer frames" in p.reason
    small = plan(p.model, replace(p.request, width=832, height=480), p.hardware)
    assert small.fits


def test_a14b_idle_expert_waits_on_disk_when_ram_is_32gb(table) -> None:
    p = table["t2v-a14b", 8, 32]
    assert p.fits and p.quantization in ("int8", "fp8") and p.idle_expert == "disk"
    assert p.resident_blocks < 40 and p.prefetch >= 1 and p.pinned


def test_plans_are_deterministic_and_json_serialisable(table) -> None:
    for (name, v, r), p in list(table.items())[::5]:
        again = plan(ModelFootprint.full_size(name), default_request(name), Hardware.fake(v, r))
        assert again == p
        data = json.loads(json.dumps(p.to_json()))
        for key in ("fits", "peak_vram_gib", "peak_ram_gib", "seconds_estimate", "quantization",
                    "resident_blocks", "vae_tile", "reason"):
            assert key in data
        assert data["peak_vram_gib"] == p.peak_vram_gib and data["fits"] == p.fits
        assert p.summary().startswith(f"{name} ") and "GiB VRAM" in p.summary()


def test_token_chunk_is_the_fastest_that_fits() -> None:
    """Token chunks cost time (K.chunked_token_s, K.chunk_block_s): a GPU with room runs the whole sequence
    at once, a small one the largest chunk whose denoise fits; no forced chunk is faster."""
    m, req = ModelFootprint.full_size("ti2v-5b"), PlanRequest(1280, 704, 121)
    for hw in (Hardware.fake(140, 128, (9, 0), free_vram_gb=139), Hardware.fake(3.5, 128, (9, 0), free_vram_gb=3.0),
               Hardware.fake(12, 32, (8, 6))):
        p = plan(m, req, hw)
        assert p.fits
        secs = dict(p.stage_seconds)["denoise"]
        for c in CHUNKS:
            forced = MemoryProfile("chunk", "", force=(("ffn_chunk_tokens", c),))
            q = plan(m, req, hw, profile=forced)
            assert not q.fits or q.quantization != p.quantization or dict(q.stage_seconds)["denoise"] >= secs * 0.999
    assert plan(m, req, Hardware.fake(140, 128, (9, 0), free_vram_gb=139)).ffn_chunk_tokens is None
    small = plan(m, req, Hardware.fake(3.5, 128, (9, 0), free_vram_gb=3.0))
    assert small.quantization == "bf16" and small.ffn_chunk_tokens > default_chunk(m, Geo.of(m, req))


# ------------------------------------------------------------------------------ issue targets
def test_5b_low_vram_plan_stays_under_3_gib() -> None:
    p = plan(ModelFootprint.full_size("ti2v-5b"), (1280, 704, 121), Hardware.fake(24, 64),
             profile="4 GB VRAM / 16 GB RAM")
    assert p.fits and p.peak_vram_gib <= 3.0
    assert p.resident_blocks < 30 and p.vae_tile is not None and not p.pinned  # the profile forces pageable


@pytest.mark.parametrize("cc", [(8, 9), (8, 6)])
def test_a14b_720p_in_6_gib_of_gpu_and_32_gb_of_ram(cc: tuple[int, int]) -> None:
    total = 6.8
    hw = Hardware.fake(total, 32, cc, free_vram_gb=6.0 + 0.25 + 0.04 * total)  # usable 6.0 GiB
    p = plan(ModelFootprint.full_size("t2v-a14b"), (1280, 720, 81), hw)
    assert p.fits and p.peak_vram_gib <= 6.0 and p.peak_ram_gib <= 32
    assert p.quantization == ("fp8" if cc >= (8, 9) else "int8") and p.idle_expert == "disk"
    assert p.ffn_chunk_tokens is not None


def test_cfg_batching_where_it_saves_transfers_asked_for_or_forbidden_and_cpu_only_machines() -> None:
    """A batch of 2 streams each block once per step instead of twice: the planner batches a
    streamed plan whose transfers it halves, and a resident one only at short sequences on a
    fast GPU (elsewhere it is slower);
    PlanRequest.cfg_batch True asks for it where it fits, False forbids it."""
    m = ModelFootprint.full_size("ti2v-5b")
    small = Hardware.fake(3.5, 64, (9, 0), free_vram_gb=3.0)
    streamed = plan(m, (832, 480, 49), small)
    assert streamed.resident_blocks < 30 and streamed.cfg_batch
    alone = evaluate(m, streamed.request, small, replace(streamed.choices, cfg_batch=False))
    assert dict(streamed.stage_seconds)["denoise"] < dict(alone.stage_seconds)["denoise"]
    assert not plan(m, PlanRequest(832, 480, 49, cfg_batch=False), small).cfg_batch
    assert not plan(m, (1280, 704, 121), Hardware.fake(80, 64)).cfg_batch
    assert plan(m, PlanRequest(1280, 704, 121, cfg_batch=True), Hardware.fake(80, 64)).cfg_batch
    # short sequences: a batch of 2 beats two passes where one pass leaves the GPU underused
    # (run 2026-12-04-zi on an H200: 0.97x at 12090 tokens), not on a GPU a few times slower
    h200 = Hardware.fake(141, 256, (9, 0), gpu_name="NVIDIA H200")
    assert plan(m, (832, 480, 121), h200).cfg_batch and not plan(m, (1280, 704, 121), h200).cfg_batch
    assert not plan(m, (832, 480, 121), Hardware.fake(24, 64, (8, 9), gpu_name="NVIDIA GeForce RTX 4060 Ti")).cfg_batch
    cpu = plan(m, (1280, 704, 121), Hardware.fake(0, 64))
    assert cpu.fits and cpu.peak_vram_gib == 0 and cpu.text_encoder == "cpu"
    assert any("CPU" in n for n in cpu.notes) and cpu.seconds_estimate > 3600


def test_tiny_model_from_config_fits_a_small_machine() -> None:
    cfg = SimpleNamespace(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=48, out_dim=48)
    m = ModelFootprint.from_config(cfg, vae_params=(1000, 1000), text_params=10_000, text_embed_params=1000,
                                   text_blocks=2)
    p = plan(m, (64, 64, 5), Hardware.fake(4, 16))
    assert p.fits and p.resident_blocks == 2 and p.quantization == "bf16"


# ------------------------------------------------------------------------------ leaner
@pytest.mark.parametrize("name,vram,ram", [("ti2v-5b", 24, 64), ("t2v-a14b", 80, 64), ("t2v-a14b", 8, 32),
                                           ("i2v-a14b", 16, 32), ("ti2v-5b", 4, 16)])
def test_leaner_strictly_reduces_peak_vram_until_nothing_is_left(name: str, vram: int, ram: int) -> None:
    p = plan(ModelFootprint.full_size(name), default_request(name), Hardware.fake(vram, ram))
    steps = 0
    while (nxt := leaner(p)) is not None:
        assert nxt.peak_vram_gib < p.peak_vram_gib
        p, steps = nxt, steps + 1
        assert steps < 100
    assert steps >= 1
    assert p.quantization in ("int8", "fp8") and p.resident_blocks == 0 and not p.cfg_batch


def test_leaner_for_one_stage() -> None:
    p = plan(ModelFootprint.full_size("ti2v-5b"), (1280, 704, 121), Hardware.fake(24, 64))
    d = leaner(p, "decode")
    assert d is not None and dict(d.stage_vram_gib)["decode"] < dict(p.stage_vram_gib)["decode"]
    assert (d.vae_tile, d.vae_dtype) != (p.vae_tile, p.vae_dtype) or d.keep_resident != p.keep_resident
    n = leaner(p, "denoise")
    assert n is not None and dict(n.stage_vram_gib)["denoise"] < dict(p.stage_vram_gib)["denoise"]
    assert leaner(plan(p.model, p.request, Hardware.fake(0, 64))) is None  # nothing to shed on a CPU
    big = plan(p.model, p.request, Hardware.fake(80, 64))  # all resident, the whole sequence at once
    assert big.ffn_chunk_tokens is None and not big.cfg_batch
    n = leaner(big, "denoise")  # first the text encoder kept on the GPU gives its place back
    assert n.text_encoder == "gpu" and n.ffn_chunk_tokens is None and big.text_encoder == "resident"
    n = leaner(n, "denoise")  # then token chunks: a few % slower, where streaming would cost more
    assert n.ffn_chunk_tokens is not None and n.resident_blocks == big.resident_blocks


# ------------------------------------------------------------------------------ profiles
EXPECTED_PROFILES = ("4 GB VRAM / 16 GB RAM", "6 GB VRAM / 16 GB RAM", "8 GB VRAM / 32 GB RAM",
                     "12 GB VRAM / 32 GB RAM", "16 GB VRAM / 32 GB RAM", "24 GB VRAM / 64 GB RAM",
                     "80 GB VRAM (datacenter)")


def test_shipped_profiles_parse_and_plan() -> None:
    profiles = load_profiles()
    assert tuple(profiles) == EXPECTED_PROFILES
    for prof in profiles.values():
        assert prof.description and prof.vram_gb is not None and prof.ram_gb is not None
        p = plan(ModelFootprint.full_size("ti2v-5b"), (1280, 704, 121), Hardware.fake(80, 256), profile=prof)
        assert p.fits and p.profile == prof.name, prof.name
        assert p.hardware.vram_total_gib == min(80, prof.vram_gb)
        for key, value in prof.forced.items():
            assert getattr(p, key) == value, (prof.name, key)
    assert get_profile("08gb-vram-32gb-ram").name == "8 GB VRAM / 32 GB RAM"
    assert get_profile("auto") is None and get_profile(None) is None


def test_profile_caps_a_bigger_machine_and_describes_a_gpu_less_one() -> None:
    prof = get_profile("8 GB VRAM / 32 GB RAM")
    big = prof.apply(Hardware.fake(24, 64, (8, 6), gpu_name="NVIDIA GeForce RTX 3090"))
    assert big.vram_total_gib == 8 and big.gpu_name == "NVIDIA GeForce RTX 3090" and big.cc == (8, 6)
    assert big.ram_total_gib == 32
    small = prof.apply(Hardware.fake(6, 16))
    assert small.vram_total_gib == 6 and small.ram_total_gib == 16
    none = prof.apply(Hardware.fake(0, 64))
    assert none.has_gpu and none.vram_total_gib == 8


@pytest.mark.parametrize("content,needle", [
    ('{"name": "x", "description": "y", "hardware": {"vram_gb": 8, "ram_gb": 32}', "not valid JSON"),
    ('{"name": "x", "description": "y", "force": {"quantization": "nf4"}}', "'force.quantization'"),
    ('{"name": "x", "description": "y", "force": {"resident_blocks": -1}}', "'force.resident_blocks'"),
    ('{"name": "x", "description": "y", "force": {"pinned": "yes"}}', "'force.pinned'"),
    ('{"name": "x", "description": "y", "force": {"vae_tile": 100}}', "'force.vae_tile'"),
    ('{"name": "x", "description": "y", "force": {"turbo": true}}', "'force.turbo'"),
    ('{"name": "x", "description": "y", "hardware": {"vram_gb": "8"}}', "'hardware.vram_gb'"),
    ('{"name": "x", "description": "y", "hardware": {"vram_gb": 8, "cc": [8]}}', "'hardware.cc'"),
    ('{"name": "x", "description": "y", "hardware": {}}', "'hardware'"),
    ('{"name": "", "description": "y", "hardware": {"ram_gb": 8}}', "'name'"),
    ('{"name": "x", "description": "y", "hardware": {"ram_gb": 8}, "colour": 1}', "'colour'"),
    ('[1, 2]', "JSON object"),
])
def test_broken_profile_names_the_file_and_the_key(tmp_path, content: str, needle: str) -> None:
    path = tmp_path / "broken.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ProfileError) as err:
        load_profiles(tmp_path)
    assert str(path) in str(err.value) and needle in str(err.value)
    assert isinstance(err.value, WanLiteError) and err.value.hint


def test_forced_fields_are_honoured_and_unknown_profiles_refused(tmp_path) -> None:
    (tmp_path / "mine.json").write_text(json.dumps({
        "name": "Mine", "description": "forces int8 and small tiles",
        "force": {"quantization": "int8", "vae_tile": 256, "resident_blocks": 4, "cfg_batch": False}}))
    prof = get_profile("mine", tmp_path)
    p = plan(ModelFootprint.full_size("ti2v-5b"), (1280, 704, 121), Hardware.fake(24, 64), profile=prof)
    assert (p.quantization, p.vae_tile, p.resident_blocks, p.cfg_batch) == ("int8", 256, 4, False)
    with pytest.raises(ProfileError, match="Mine"):
        get_profile("nope", tmp_path)


# ------------------------------------------------------------------------------ hardware and CLI
def test_fake_hardware_and_speed_table() -> None:
    hw = Hardware.fake(8, 32)
    assert hw.has_gpu and hw.vram_free_gib == 7.5 and hw.fp8_tensor_cores and hw.ram_available_gib < 32
    assert Hardware.fake(24, 64, (8, 9), gpu_name="NVIDIA GeForce RTX 4090").speed().basis == "4090"
    assert Hardware.fake(12, 32, (8, 6)).speed().tflops < Hardware.fake(80, 64, (9, 0)).speed().tflops
    assert not Hardware.fake(8, 32, (8, 6)).fp8_tensor_cores and not Hardware.fake(0, 8).has_gpu
    with pytest.raises(WanLiteError):
        Hardware.fake(8, 0)
    probed = Hardware.probe()
    assert probed.ram_total_gib > 0 and probed.has_gpu == torch.cuda.is_available()
    json.dumps(probed.to_json())


def _cli(*argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers(dest="command"))
    out = io.StringIO()
    return run_plan(parser.parse_args(["plan", *argv]), out), out.getvalue()


def test_plan_command_json_and_text() -> None:
    rc, text = _cli("--model", "t2v-a14b", "--size", "1280x720", "--frames", "81", "--vram-gb", "8",
                    "--ram-gb", "32", "--json")
    data = json.loads(text)
    assert rc == 0 and data["fits"] and data["quantization"] in ("int8", "fp8") and data["reason"] is None
    assert data["request"]["width"] == 1280 and data["hardware"]["vram_total_gib"] == 8
    rc, text = _cli("--model", "t2v-a14b", "--vram-gb", "4", "--ram-gb", "16")
    assert rc == 1 and "does not fit" in text and "GiB" in text
    rc, text = _cli("--vram-gb", "24", "--ram-gb", "64", "--cc", "8.6", "--profile", "4 GB VRAM / 16 GB RAM")
    assert rc == 0 and "[profile 4 GB VRAM / 16 GB RAM]" in text
    rc, text = _cli("--list-profiles")
    assert rc == 0 and all(name in text for name in EXPECTED_PROFILES)
    # a fast GPU with little RAM and a slow disk: 4-bit weights in RAM, and the plan line says why
    rc, text = _cli("--model", "t2v-a14b", "--vram-gb", "8", "--ram-gb", "16", "--gpu-name", "H100 SXM",
                    "--disk-gbps", "0.5")
    assert rc == 0 and "plan:    t2v-a14b 1280x720x81 fits: int4 (4-bit weights in RAM: no 8-bit DiT" in text
    with pytest.raises(WanLiteError, match="GB/s"):
        _cli("--vram-gb", "8", "--ram-gb", "32", "--disk-gbps", "0")
    with pytest.raises(WanLiteError, match="WIDTHxHEIGHT"):
        _cli("--size", "big", "--vram-gb", "8", "--ram-gb", "32")


def test_forced_fp32_vae_is_tiled_rather_than_dropped() -> None:
    prof = get_profile("80 GB VRAM (datacenter)")
    p = plan(ModelFootprint.full_size("ti2v-5b"), (1280, 704, 121), Hardware.fake(12, 64), profile=prof)
    assert p.vae_dtype == "fp32" and p.vae_tile is not None and dict(p.stage_vram_gib)["decode"] <= p.usable_vram_gib


def test_fp8_attention_counts_its_fp8_copies_of_q_k_v(monkeypatch) -> None:
    """Opting into fp8 attention (WAN_LITE_FP8_ATTENTION=1) adds the fp8 q, k and v beside the bf16
    ones to the denoise peak (A14B 720p: 3 bytes x 75600 tokens x 5120 = 1.08 GiB, as measured)
    and only on plans that compute in fp8; the plan command reads the same switch."""
    m = ModelFootprint.full_size("t2v-a14b")
    hw = Hardware.fake(80, 64)
    forced = "8 GB VRAM / 32 GB RAM"
    off = plan(m, PlanRequest(1280, 720, 81), hw, profile=forced)
    on = plan(m, PlanRequest(1280, 720, 81, fp8_attention=True), hw, profile=forced)
    assert off.fp8_compute and on.fp8_attention and not off.fp8_attention and "fp8 attention" in on.summary()
    assert on.fits and on.peak_vram_gib <= on.usable_vram_gib  # the plan made room for them
    same = evaluate(m, PlanRequest(1280, 720, 81), on.hardware, on.choices)  # the same choices without
    # in small chunks the attention moment is the peak, and it grows by nearly all of them
    small = replace(on.choices, ffn_chunk_tokens=2048)
    extra = (dict(evaluate(m, on.request, on.hardware, small).stage_vram_gib)["denoise"]
             - dict(evaluate(m, same.request, on.hardware, small).stage_vram_gib)["denoise"])
    fp8_qkv = 3 * 75600 * 5120 / 2**30
    assert 0.9 * fp8_qkv <= extra <= fp8_qkv + 0.001
    assert on.seconds_estimate < same.seconds_estimate  # fp8 attention is faster
    no_fp8 = plan(m, PlanRequest(1280, 720, 81, fp8_attention=True), Hardware.fake(80, 64, (8, 6)), profile=forced)
    assert not no_fp8.fp8_attention  # int8 on a GPU without fp8 tensor cores: nothing to count
    argv = ("--model", "t2v-a14b", "--size", "1280x720", "--frames", "81", "--vram-gb", "80", "--ram-gb", "64",
            "--profile", forced, "--json")
    monkeypatch.setenv("WAN_LITE_FP8_ATTENTION", "1")
    assert json.loads(_cli(*argv)[1])["fp8_attention"]
    monkeypatch.delenv("WAN_LITE_FP8_ATTENTION")
    assert not json.loads(_cli(*argv)[1])["fp8_attention"]


def test_planner_times_tiled_decodes_as_the_tiler_does() -> None:
    """The planner's decode time factor is vae_memory.decode_cost with whole frame chunks (the same
    time model, kept free of torch in the planner)."""
    from wan_lite.runtime import plan_model, vae_memory

    assert K.vae_tile_cost == vae_memory.TILE_COST
    for (w, h), stride in (((1280, 704), 16), ((832, 480), 16), ((1280, 720), 8), ((832, 480), 8)):
        r = PlanRequest(w, h, 81)
        for tile in (None, *K.vae_tiles):
            latent_tile = None if tile is None else tile // stride
            want = vae_memory.decode_cost((1, 16, 21, h // stride, w // stride), latent_tile,
                                         K.vae_tile_overlap // stride, None)
            assert plan_model.tiled_time(r, tile, stride) == pytest.approx(want, rel=1e-9), (w, h, stride, tile)


def test_text_encoder_stays_on_a_gpu_with_room_for_it_beside_every_stage() -> None:
    from wan_lite.runtime.planner import leaner

    fp = ModelFootprint.full_size("ti2v-5b")
    big = plan(fp, (1280, 704, 121), Hardware.fake(80, 128))
    assert big.text_encoder == "resident" and big.fits
    t5 = fp.text_bytes(big.text_encoder_quant) / 1024**3
    stages = dict(big.stage_vram_gib)
    assert stages["denoise"] > t5 and stages["decode"] > t5  # counted beside the DiT and the VAE
    small = plan(fp, (1280, 704, 121), Hardware.fake(24, 64))
    assert small.text_encoder != "resident"
    for stage in ("denoise", "decode"):  # after an OOM there, the first thing given back
        assert leaner(big, stage).text_encoder == "gpu"


# ------------------------------------------------------------------------------ issue 21: small RAM
SMALL_RAM_MACHINES = [
    ("t2v-a14b", (1280, 720, 81), 8, 16),
    ("i2v-a14b", (1280, 720, 81), 8, 16),
    ("t2v-a14b", (832, 480, 81), 6, 16),
    ("i2v-a14b", (832, 480, 81), 6, 16),
]


@pytest.mark.parametrize("name,size,vram,ram", SMALL_RAM_MACHINES)
def test_a14b_fits_16_gb_of_ram_streaming_from_disk(name, size, vram, ram):
    from wan_lite.runtime.planner import ModelFootprint, PlanRequest, plan

    p = plan(ModelFootprint.full_size(name), PlanRequest(*size, image=name.startswith("i2v")),
             Hardware.fake(vram_gb=vram, ram_gb=ram))
    assert p.fits, p.reason
    assert p.peak_ram_gib <= 0.8 * ram and p.peak_ram_gib <= p.usable_ram_gib
    assert p.blocks_from == "disk" and p.idle_expert == "disk"  # no expert copy in RAM
    assert "from disk" in p.summary()
    # what was given up on the way there and is not needed once the DiT waits on disk comes back
    assert not p.vae_on_disk and not p.vae_lean


def test_disk_reads_count_in_the_time_estimate():
    from wan_lite.runtime.planner import ModelFootprint, PlanRequest, estimate, plan

    m = ModelFootprint.full_size("t2v-a14b")
    hw = Hardware.fake(vram_gb=8, ram_gb=16, gpu_name="NVIDIA H100 80GB HBM3")
    fp8 = MemoryProfile("fp8", "8-bit weights", force=(("quantization", "fp8"),))  # else int4 in RAM: faster here
    p = plan(m, PlanRequest(832, 480, 81), hw, profile=fp8)
    assert p.blocks_from == "disk"
    slow, fast = (estimate(m, p.request, replace(hw, disk_gbps=g), p.choices)["secs"]["denoise"] for g in (0.2, 20))
    assert slow > 1.5 * fast  # an H100 forward at 480p is shorter than reading 40 blocks at 0.2 GB/s


def test_ti2v_5b_fits_4_gb_of_vram_and_8_gb_of_ram():
    """TI2V-5B 1280x704x121 on 4 GB + 8 GB (issue 21): the DiT's blocks, umT5 (its embedding row
    by row) and the VAE wait in their files, the decode keeps the tiles' input lean and only the
    uint8 frames in RAM; peak RAM within 80 % of the machine's and what it may use."""
    from wan_lite.runtime.planner import ModelFootprint, PlanRequest, plan

    p = plan(ModelFootprint.full_size("ti2v-5b"), PlanRequest(1280, 704, 121), Hardware.fake(vram_gb=4, ram_gb=8))
    assert p.fits, p.reason
    assert p.peak_ram_gib <= 0.8 * 8 and p.peak_ram_gib <= p.usable_ram_gib
    assert p.blocks_from == "disk" and p.vae_on_disk and p.vae_lean and p.vae_tile
    assert p.text_encoder == "stream" and not p.keep_text_encoder
    assert "read from its file" in p.summary() and "lean global pass" in p.summary()


def test_what_ram_short_plans_give_up_is_only_what_ram_needs():
    """With RAM to spare the VAE stays in RAM and the global pass is whole (faster); the video's
    RAM is its uint8 frames on a GPU, the float32 video and frames on the CPU."""
    from wan_lite.runtime.planner import ModelFootprint, PlanRequest, estimate, plan

    m = ModelFootprint.full_size("ti2v-5b")
    p = plan(m, PlanRequest(1280, 704, 121), Hardware.fake(vram_gb=4, ram_gb=32))
    assert p.fits and not p.vae_on_disk and not p.vae_lean
    lean = estimate(m, p.request, p.hardware, replace(p.choices, vae_lean=True))["ram"]
    disk = estimate(m, p.request, p.hardware, replace(p.choices, vae_lean=True, vae_on_disk=True))["ram"]
    full = estimate(m, p.request, p.hardware, p.choices)["ram"]
    assert disk < lean < full


def test_ram_figure_counts_the_loaders_copies():
    """The RAM figure is what the loader holds: a RAM-streamed expert whole, the text encoder
    whole while it is kept, and with keep_resident only a block in flight to the GPU."""
    from wan_lite.runtime.planner import Choices, ModelFootprint, PlanRequest, estimate

    m = ModelFootprint.full_size("t2v-a14b")
    hw = Hardware.fake(vram_gb=80, ram_gb=256)
    r = PlanRequest(832, 480, 81)
    base = Choices(quantization="bf16", resident_blocks=40, keep_resident=True, idle_expert="gpu",
                   text_encoder="gpu", vae_tile=512)
    kept = estimate(m, r, hw, base)["ram"]
    in_ram = estimate(m, r, hw, replace(base, keep_resident=False, idle_expert="ram"))["ram"]
    assert in_ram - kept >= 2 * m.expert_bytes("bf16") - m.block_bytes("bf16")
    t5 = estimate(m, r, hw, replace(base, keep_text_encoder=True))["ram"] - kept
    assert t5 >= m.text_bytes("bf16") - m.block_bytes("bf16") * 2


# ------------------------------------------------------------------------------ int4
def test_int4_block_bytes() -> None:
    """int4: half a byte a weight and a bf16 scale per 64 inputs (an A14B expert 7.9 GB, int8's 14.5)."""
    m = ModelFootprint.full_size("t2v-a14b")
    lin = m.block_linear_params
    assert m.block_bytes("int8") - m.block_bytes("int4") == lin + (9 * m.dim + m.ffn_dim) * 4 - lin // 2 - lin // 32
    assert 0.52 < m.expert_bytes("int4") / m.expert_bytes("int8") < 0.56
    assert m.expert_bytes("int4") == pytest.approx(7.94e9, rel=0.01)


@pytest.mark.parametrize("name", ["t2v-a14b", "i2v-a14b"])
def test_int4_only_where_no_8bit_dit_fits_in_ram(name: str) -> None:
    """1280x720x81 on 8 GB VRAM / 16 GB RAM: no 8-bit expert fits in RAM. On a consumer card a
    forward takes minutes, the disk reads hide behind it: the 16-bit / 8-bit plan streaming from
    disk stays. On a fast GPU with a slow disk (an H100 held to 8 GB, 0.5 GB/s) fp8 blocks from
    disk take 1.5x+ the time of int4 weights in RAM: int4, with the reason in the plan line.
    With 32 GB of RAM, never int4."""
    m = ModelFootprint.full_size(name)
    r = PlanRequest(1280, 720, 81, image=name.startswith("i2v"))
    for gpu in (None, "NVIDIA GeForce RTX 4090"):
        p = plan(m, r, Hardware.fake(8, 16, gpu_name=gpu))
        assert p.fits and p.quantization != "int4" and p.blocks_from == "disk" and p.quant_note is None
    slow = replace(Hardware.fake(8, 16, gpu_name="NVIDIA H100 80GB HBM3"), disk_gbps=0.5)
    p = plan(m, r, slow)
    assert p.fits and p.quantization == "int4" and p.blocks_from == "ram" and p.idle_expert == "disk"
    assert p.peak_ram_gib <= 0.8 * 16 and p.peak_ram_gib <= p.usable_ram_gib
    line = p.summary()
    assert "int4 (4-bit weights in RAM: no 8-bit DiT fits in RAM, and fp8 blocks from disk would take" in line
    fp8_disk = plan(m, r, slow, profile=MemoryProfile("fp8", "", force=(("quantization", "fp8"),)))
    assert fp8_disk.blocks_from == "disk" and fp8_disk.seconds_estimate > K.int4_slack * p.seconds_estimate
    assert p.to_json()["quant_note"] == p.quant_note
    for hw in (replace(Hardware.fake(8, 32, gpu_name="NVIDIA H100 80GB HBM3"), disk_gbps=0.5), Hardware.fake(8, 32)):
        roomy = plan(m, r, hw)
        assert roomy.fits and roomy.quantization in ("bf16", "fp8") and roomy.blocks_from == "ram"


def test_int4_is_the_last_resort_where_nothing_else_fits(table) -> None:
    """A14B 720p on 24 GB VRAM / 8 GB RAM: the fp8 plan needs more RAM than there is; the int4
    expert is read from its file straight to the GPU and fits. The plan line says why."""
    m = ModelFootprint.full_size("t2v-a14b")
    p = plan(m, default_request("t2v-a14b"), Hardware.fake(24, 8))
    assert p.fits and p.quantization == "int4"
    assert "4-bit weights: no 8-bit plan fits (fp8 needs" in p.summary() and "GiB RAM" in p.quant_note
    # the shipped machines of the table: int4 nowhere (each fits in 16 or 8 bits, or not at all)
    assert not [k for k, q in table.items() if q.quantization == "int4"]


def test_forced_int4_profile(tmp_path) -> None:
    """A profile may force int4 (even on a machine with room for bf16); a CPU plans it as asked."""
    (tmp_path / "four.json").write_text(json.dumps({"name": "Four", "description": "4-bit DiT",
                                                    "force": {"quantization": "int4"}}))
    prof = get_profile("four", tmp_path)
    for hw in (Hardware.fake(24, 64), Hardware.fake(0, 64)):
        p = plan(ModelFootprint.full_size("ti2v-5b"), (1280, 704, 121), hw, profile=prof)
        assert p.fits and p.quantization == "int4" and p.quant_note is None and p.profile == "Four"
        assert p.text_encoder_quant in ("bf16", "int8")  # the text encoder has no int4
    m = ModelFootprint.full_size("t2v-a14b")
    kept = plan(m, (1280, 720, 81), Hardware.fake(24, 64), profile=prof)
    eight = plan(m, (1280, 720, 81), Hardware.fake(24, 64),
                 profile=MemoryProfile("8", "", force=(("quantization", "int8"),)))
    assert kept.peak_vram_gib < eight.peak_vram_gib
