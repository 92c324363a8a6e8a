"""Turbo in 3 phases (issue 19, item 4): the published anti-slow-motion schedule of the 4-step
speed LoRAs. 8 Euler steps at shift 3; while t >= 965 the high-noise expert (TI2V-5B: the one
DiT) runs without the LoRAs and with guidance 3.5 (two passes), then with the LoRAs at guidance 1
(one pass), the A14B experts switching at t = 800 instead of the model's boundary."""

from __future__ import annotations

import pytest
import torch

import wan_lite
from tests.tiny_ckpt.lora import make_lora, write_lora
from wan_lite.api import GenerateRequest
from wan_lite.errors import InputError
from wan_lite.job import resolve
from wan_lite.loading.layout import find_model
from wan_lite.loading.tensors import SafetensorsSource
from wan_lite.runtime import lora as lora_rt
from wan_lite.runtime import streaming
from wan_lite.sampling import make_sampler

SMALL = dict(width=64, height=64, frames=9, seed=5)


def by_hand(steps: int = 8, shift: float = 3.0) -> list[float]:
    """The Euler flow schedule's timesteps: 1000 * shift*s / (1 + (shift-1)*s), s = 1 - i/steps."""
    return [1000 * shift * s / (1 + (shift - 1) * s) for s in (1 - i / steps for i in range(steps))]


def test_three_phases_fill_the_published_settings_and_phases():
    job = resolve(GenerateRequest("a fox", model="t2v-a14b", turbo_phases=3, **SMALL))
    assert job.request.turbo and (job.steps, job.shift, job.sampler) == (8, 3.0, "euler")
    assert job.guidance == (3.5, 1.0)
    timesteps = [int(t) for t in make_sampler(job.sampler, job.steps, job.shift).timesteps]
    assert timesteps == pytest.approx(by_hand(), abs=2)  # ~1000, 954, 900, 833, 750, 642, 500, 300
    phases = [job.phase_at(t) for t in timesteps]
    assert phases == [("high", 3.5, False)] + [("high", 1.0, True)] * 3 + [("low", 1.0, True)] * 4
    assert job.settings()["turbo_phases"] == 3
    assert any("3 phases" in n for n in job.notes)
    five = resolve(GenerateRequest("a fox", model="ti2v-5b", turbo=True, turbo_phases=3, **SMALL))
    assert five.guidance == (3.5, 1.0)
    assert [five.phase_at(t)[1:] for t in (1000, 954)] == [(3.5, False), (1.0, True)]
    two = resolve(GenerateRequest("a fox", model="t2v-a14b", turbo=True, **SMALL))
    assert two.turbo_phases == 2 and two.phase_at(954) == ("high", 1.0, True)
    assert two.phase_at(800) == ("low", 1.0, True)  # the model's own boundary (875)
    user = resolve(GenerateRequest("a fox", model="t2v-a14b", turbo_phases=3, steps=12, guidance=4.0, **SMALL))
    assert (user.steps, user.guidance) == (12, (4.0, 1.0))  # what the user set wins


@pytest.mark.parametrize("bad", [4, 1, "3", True])
def test_a_phase_count_other_than_2_or_3_is_refused(bad):
    with pytest.raises(InputError, match="2 or 3 phases"):
        resolve(GenerateRequest("a fox", model="t2v-a14b", turbo_phases=bad, **SMALL))


def test_three_phases_with_turbo_off_is_refused():
    with pytest.raises(InputError, match="Turbo is off"):
        resolve(GenerateRequest("a fox", model="t2v-a14b", turbo=False, turbo_phases=3, **SMALL))


@pytest.fixture(scope="module")
def a14b(tiny_models, tmp_path_factory):
    folder = tiny_models["t2v-a14b"]
    pipe = wan_lite.load_pipeline(folder)
    files = find_model(folder, "t2v-a14b")
    for role, dit in pipe.dits.items():  # as the planned loader does: the file is the refill source
        streaming.set_expert_source(dit, SafetensorsSource(files.dit[role]))
    state = {k: v.float() for k, v in pipe.dits["high"].state_dict().items()}
    lora = make_lora(state, [f"blocks.{n}.{m}" for n in range(2) for m in ("self_attn.q", "ffn.0", "ffn.2")],
                     seed=4, diffs=["blocks.0.modulation"])
    path = write_lora(tmp_path_factory.mktemp("speed") / "speed.safetensors", lora, "comfy")
    return pipe, path


def traced(pipe, loras=()):
    """Run a 3-phase job; per DiT call: (step, expert, branches, LoRAs on that expert, velocity)."""
    calls = []

    def hook(info, call):
        v = call()
        key = lora_rt._IN_USE[pipe.dits[info.expert]].key if pipe.dits[info.expert] in lora_rt._IN_USE else ()
        calls.append((info.index, info.expert, info.branches, len(key), v.clone()))
        return v

    pipe.step_hooks.append(hook)
    try:
        out = pipe.generate(resolve(GenerateRequest("a boat at dawn", model="t2v-a14b", turbo_phases=3,
                                                    loras=loras, **SMALL)))
    finally:
        pipe.step_hooks.remove(hook)
    return out, calls


def test_the_first_phase_runs_without_the_lora_and_with_guidance_then_the_lora_alone(a14b):
    pipe, path = a14b
    plain, plain_calls = traced(pipe)
    out, calls = traced(pipe, [str(path)])
    seen: dict[int, tuple] = {}
    for i, e, b, n, _v in calls:  # per step: the expert, every branch it ran, the LoRAs on it
        seen[i] = (e, seen.get(i, (e, ()))[1] + b, n)
    assert seen == {0: ("high", ("cond", "uncond"), 0), **{i: ("high", ("cond",), 1) for i in (1, 2, 3)},
                    **{i: ("low", ("cond",), 1) for i in range(4, 8)}}
    assert out.settings["dit_forwards"] == {"computed": 9, "skipped": 0}
    assert out.settings["turbo_phases"] == 3
    # phase 1 is the plain model: its velocity is the no-LoRA run's, bit for bit; the LoRA acts after
    first = {i: v for i, *_rest, v in reversed(calls)}  # step -> its first DiT call's output
    plain_first = {i: v for i, *_rest, v in reversed(plain_calls)}
    assert torch.equal(first[0], plain_first[0])
    assert not torch.equal(first[1], plain_first[1])
    assert not torch.equal(out.latents, plain.latents)
    # a second job starts plain again (the LoRA taken off for its first phase), and is the same video
    again, _ = traced(pipe, [str(path)])
    assert torch.equal(again.latents, out.latents)


def test_turbo_plans_the_vae_in_bf16_where_quality_keeps_the_official_fp32():
    """Turbo puts speed first: on a GPU where the untiled fp32 decode fits, the planner still
    takes bf16 (about half the decode time on an H100); a Quality job keeps fp32."""
    from wan_lite.runtime.hardware import Hardware
    from wan_lite.runtime.planner import ModelFootprint, PlanRequest, plan

    fp, hw = ModelFootprint.of_model("ti2v-5b"), Hardware.fake(vram_gb=80, ram_gb=128, cc=(9, 0))
    quality = plan(fp, PlanRequest(1280, 704, 121, steps=50), hw)
    turbo = plan(fp, PlanRequest(1280, 704, 121, steps=4, cfg=False, speed_first=True), hw)
    assert (quality.vae_dtype, quality.vae_tile) == ("fp32", None)
    assert (turbo.vae_dtype, turbo.vae_tile) == ("bf16", None)
