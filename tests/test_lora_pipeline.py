"""LoRAs in a generation: per-expert strengths reach only their expert, merged == hand-merged
weights, strength 0 and a LoRA taken off again are the plain run bit for bit, merged ==
unmerged, and a LoRA that does not fit stops the job with nothing applied."""

from __future__ import annotations

import pytest
import torch

import wan_lite
from tests.tiny_ckpt.lora import hand_merge, make_lora, write_lora
from wan_lite.api import GenerateRequest
from wan_lite.errors import CheckpointError
from wan_lite.job import resolve
from wan_lite.loading.layout import find_model
from wan_lite.loading.tensors import SafetensorsSource
from wan_lite.runtime import lora as lora_rt
from wan_lite.runtime import streaming

SMALL = dict(width=64, height=64, frames=9, steps=3, seed=11)
LINEARS = ("self_attn.q", "self_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def a14b(tiny_models):
    folder = tiny_models["t2v-a14b"]
    pipe = wan_lite.load_pipeline(folder)
    files = find_model(folder, "t2v-a14b")
    for role, dit in pipe.dits.items():  # as the planned loader does: the file is the refill source
        streaming.set_expert_source(dit, SafetensorsSource(files.dit[role]))
    return pipe


@pytest.fixture(scope="module")
def lora_file(a14b, tmp_path_factory):
    state = {k: v.float() for k, v in a14b.dits["high"].state_dict().items()}
    lora = make_lora(state, [f"blocks.{n}.{m}" for n in range(2) for m in LINEARS], seed=3,
                     diffs=["blocks.0.modulation", "blocks.1.norm3"], diff_bs=["blocks.0.ffn.2"])
    path = write_lora(tmp_path_factory.mktemp("lora") / "style.safetensors", lora, "comfy")
    return path, lora


def run(pipe, loras=()):
    return pipe.generate(resolve(GenerateRequest("a boat at dawn", model="t2v-a14b", loras=loras, **SMALL)))


def test_per_expert_strengths_reach_only_their_expert_and_merge_exactly(a14b, lora_file) -> None:
    path, lora = lora_file
    plain = run(a14b)
    base = {role: {k: v.clone() for k, v in dit.state_dict().items()} for role, dit in a14b.dits.items()}
    out = run(a14b, [f"{path}:1,0"])
    assert out.settings["loras"][0]["applied"] == {"high": "merged", "low": "none"}
    low_now = a14b.dits["low"].state_dict()
    assert all(torch.equal(low_now[k], v) for k, v in base["low"].items())  # strength 0: untouched
    source = streaming._SOURCES[a14b.dits["high"]][0].base  # the file the expert was read from (float32)
    merged = hand_merge({k: source.read(k, torch.float32) for k in base["high"]}, lora)
    high_now = a14b.dits["high"].state_dict()
    for k, v in high_now.items():
        assert torch.equal(v, merged[k].to(v.dtype)), k  # merged in float32 from the file, rounded once
    assert not torch.equal(out.latents, plain.latents)
    again = run(a14b)  # taken off: read again from the file, the plain model bit for bit
    assert torch.equal(again.latents, plain.latents)
    assert all(torch.equal(a14b.dits["high"].state_dict()[k], v) for k, v in base["high"].items())


def test_strength_0_is_no_lora_bit_for_bit(a14b, lora_file) -> None:
    path, _ = lora_file
    assert torch.equal(run(a14b, [(str(path), 0.0, 0.0)]).latents, run(a14b).latents)


def test_merged_equals_unmerged(a14b, lora_file) -> None:
    path, _ = lora_file
    merged = run(a14b, [f"{path}:0.7"])
    # the same LoRA attached unmerged (what a quantized expert gets)
    for dit in a14b.dits.values():
        lora_rt.use_loras(dit, [], [])
    from wan_lite.loading.lora import read_lora

    parsed = read_lora(path)
    for dit in a14b.dits.values():
        lora_rt.attach_loras(dit, [parsed], [0.7])
    a14b._loras = {}
    try:
        unmerged = run(a14b)
    finally:
        for dit in a14b.dits.values():
            lora_rt.detach_loras(dit)
    assert rel(unmerged.latents, merged.latents) < 0.02  # bf16 weights: merged rounds W + dW once, unmerged W alone


def test_a_lora_for_another_model_stops_the_job_with_nothing_applied(a14b, lora_file, tmp_path) -> None:
    from tests.tiny_ckpt.dit import official_dit_shapes, random_dit_state

    other = random_dit_state(official_dit_shapes(in_dim=16, out_dim=16, dim=256, ffn_dim=512, num_layers=2,
                                                 text_dim=64), seed=5)  # twice as wide
    bad = write_lora(tmp_path / "wide.safetensors", make_lora(other, ["blocks.0.self_attn.q"]), "comfy")
    path, _ = lora_file
    plain = run(a14b)
    with pytest.raises(CheckpointError, match="wide.safetensors"):
        run(a14b, [str(path), str(bad)])
    assert torch.equal(run(a14b).latents, plain.latents)


def test_sidecar_names_the_lora(a14b, lora_file) -> None:
    path, _ = lora_file
    out = run(a14b, [(str(path), 0.5, 0.25)])
    assert out.settings["loras"] == [{"file": str(path.resolve()), "strength_high": 0.5, "strength_low": 0.25,
                                      "applied": {"high": "merged", "low": "merged"}}]
    run(a14b)


def test_turbo_fills_what_the_user_left_unset() -> None:
    job = resolve(GenerateRequest("x", model="t2v-a14b", turbo=True, shift=3.0))
    r = job.request
    assert (r.steps, r.guidance, r.guidance_low, r.shift, r.sampler, r.turbo) == (4, 1.0, 1.0, 3.0, "euler", True)
    assert any(n.startswith("Turbo: steps 4, guidance 1, guidance low 1, sampler euler") for n in job.notes)
    off = resolve(GenerateRequest("x", model="t2v-a14b")).request
    assert (off.steps, off.sampler, off.turbo) == (40, "unipc", False)


def test_a_speed_lora_turns_turbo_on_by_its_name_or_metadata(tmp_path, lora_file, tiny_models) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from wan_lite.engine import Engine

    path, _ = lora_file
    named = shutil.copy(path, tmp_path / "Wan2.2-Lightning_T2V-A14B-4steps-lora_HIGH_fp16.safetensors")
    tagged = tmp_path / "my_lora.safetensors"
    save_file(load_file(path), tagged, metadata={"ss_output_name": "wan22_lightx2v_distill_rank64"})
    engine = Engine(tiny_models["t2v-a14b"].parent, tmp_path / "out", device="cpu")
    for lora in (named, tagged):
        job = engine.resolve(GenerateRequest("x", model="t2v-a14b", loras=(str(lora),)))
        assert job.request.turbo and job.steps == 4 and job.guidance == (1.0, 1.0)
        assert "is a speed LoRA" in job.notes[0]
    plain = engine.resolve(GenerateRequest("x", model="t2v-a14b", loras=(str(path),)))
    assert not plain.request.turbo and plain.steps == 40
    kept = engine.resolve(GenerateRequest("x", model="t2v-a14b", loras=(str(named),), turbo=False))
    assert not kept.request.turbo and kept.steps == 40  # --no-turbo wins


def test_turbo_job_runs_one_pass_per_step(a14b, lora_file) -> None:
    path, _ = lora_file
    out = a14b.generate(resolve(GenerateRequest("a boat", model="t2v-a14b", turbo=True, loras=(str(path),),
                                                width=64, height=64, frames=9, seed=1)))
    assert out.settings["dit_forwards"] == {"computed": 4, "skipped": 0} and out.settings["sampler"] == "euler"
    run(a14b)
