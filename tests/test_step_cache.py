"""The step cache (runtime/step_cache.py): off changes nothing, the skip schedule is the MagCache
rule computed by hand, skips never cross the expert switch, and streamed + cache == resident +
cache."""

from __future__ import annotations

import pytest
import torch

import wan_lite
from wan_lite.api import GenerateRequest
from wan_lite.errors import InputError
from wan_lite.job import resolve
from wan_lite.runtime import step_cache as sc

STEPS = dict(width=64, height=64, frames=9, steps=20)


@pytest.fixture(scope="module")
def pipes(tiny_models):
    return {name: wan_lite.load_pipeline(folder) for name, folder in tiny_models.items()}


def _hand_schedule(ratios: list[float], retained: set[int], threshold: float, max_skips: int) -> list[bool]:
    """The MagCache rule written out plainly for one branch of one expert."""
    out, acc_ratio, acc_err, acc_steps = [], 1.0, 0.0, 0
    for i, r in enumerate(ratios):
        if i in retained:
            out.append(False)
            acc_ratio, acc_err, acc_steps = 1.0, 0.0, 0
            continue
        acc_ratio *= r
        acc_steps += 1
        acc_err += abs(1 - acc_ratio)
        if acc_err < threshold and acc_steps <= max_skips:
            out.append(True)
        else:
            out.append(False)
            acc_ratio, acc_err, acc_steps = 1.0, 0.0, 0
    return out


def test_schedule_of_a_made_up_calibration_equals_the_hand_computation(monkeypatch) -> None:
    ratios = (1.0, 0.99, 0.99, 0.99, 0.98, 0.9, 0.99, 0.995, 0.97, 0.96)
    monkeypatch.setitem(sc._MAG_RATIOS, "ti2v-5b", sc.Calibration(cond=ratios, uncond=ratios))
    monkeypatch.setitem(sc.SETTINGS["balanced"], "ti2v-5b", sc.Setting(0.06, 2, (0.2, 0.2)))
    got = sc.plan_skips("ti2v-5b", "balanced", ["main"] * 10)
    # steps 0, 1 retained; 2: err .01 skip; 3: ratio .9801 err .0399 skip; 4: 3 skips > 2 -> compute;
    # 5: err .1 -> compute; 6: .01 skip; 7: ratio .98505 err .02495 skip; 8: third -> compute; 9: .04 skip
    expected = [False, False, True, True, False, False, True, True, False, True]
    assert got == expected == _hand_schedule(list(ratios), {0, 1}, 0.06, 2)


@pytest.mark.parametrize("model", ["ti2v-5b", "t2v-a14b", "i2v-a14b"])
@pytest.mark.parametrize("mode", ["balanced", "fast"])
def test_published_calibration_schedule_equals_the_hand_computation(model: str, mode: str) -> None:
    """At the calibrated step count the job's ratios are the published ones, segment by segment;
    each expert's segment follows the rule by hand from its own start."""
    from wan_lite.registry import get_spec
    from wan_lite.sampling import make_sampler

    spec = get_spec(model)
    ts = make_sampler("unipc", spec.steps, spec.shift).timesteps
    experts = ["main" if not spec.experts else ("high" if int(t) >= spec.boundary else "low") for t in ts]
    got = sc.plan_skips(model, mode, experts)
    cal, setting = sc.calibration_for(model, False), sc.SETTINGS[mode][model]
    segments = sc.expert_segments(experts)
    assert [e - s for s, e in segments] == ([spec.steps] if cal.switch_step is None
                                             else [cal.switch_step, spec.steps - cal.switch_step])
    expected: list[bool] = []
    for k, (start, end) in enumerate(segments):
        keep = max(1, int((end - start) * setting.retain[min(k, 1)]))
        expected += _hand_schedule(list(cal.cond[start:end]), set(range(keep)), setting.threshold, setting.max_skips)
    assert got == expected
    assert all(not got[s] for s, _ in segments)  # every expert's first step computes


def test_cache_saves_what_the_issue_asks_at_the_official_step_counts() -> None:
    """Balanced computes at most 60 % of the forwards on each model at its official steps; fast fewer."""
    from wan_lite.registry import get_spec
    from wan_lite.sampling import make_sampler

    for model in ("ti2v-5b", "t2v-a14b", "i2v-a14b"):
        spec = get_spec(model)
        ts = make_sampler("unipc", spec.steps, spec.shift).timesteps
        experts = ["main" if not spec.experts else ("high" if int(t) >= spec.boundary else "low") for t in ts]
        computed = {m: spec.steps - sum(sc.plan_skips(model, m, experts)) for m in ("balanced", "fast")}
        assert computed["fast"] < computed["balanced"] <= 0.6 * spec.steps, (model, computed)


def test_cache_off_is_the_plain_path_bit_for_bit(pipes) -> None:
    pipe = pipes["ti2v-5b"]
    plain = pipe.generate("a lamp on a desk", seed=5, **STEPS)
    off = pipe.generate(resolve(GenerateRequest("a lamp on a desk", seed=5, cache="off", **STEPS)))
    assert torch.equal(plain.latents, off.latents)
    assert off.settings["dit_forwards"] == {"computed": 40, "skipped": 0} and off.settings["cache"] == "off"
    assert not pipe.step_hooks and not pipe.dits["main"]._block_loop_hooks


def test_cache_never_skipping_is_bit_identical(pipes, monkeypatch) -> None:
    """The hooks themselves change nothing: a threshold of 0 computes every forward."""
    monkeypatch.setitem(sc.SETTINGS["balanced"], "t2v-a14b", sc.Setting(0.0, 2, (0.1, 0.1)))
    pipe = pipes["t2v-a14b"]
    plain = pipe.generate("a boat", seed=5, **STEPS)
    cached = pipe.generate("a boat", seed=5, cache="balanced", **STEPS)
    assert torch.equal(plain.latents, cached.latents)
    assert cached.settings["dit_forwards"] == {"computed": 40, "skipped": 0}


@pytest.mark.parametrize("model", ["ti2v-5b", "t2v-a14b"])
def test_balanced_cache_skips_the_planned_forwards_and_stays_near_the_plain_run(pipes, model) -> None:
    pipe = pipes[model]
    plain = pipe.generate("a red fox", seed=7, **STEPS)
    cached = pipe.generate("a red fox", seed=7, cache="balanced", **STEPS)
    from wan_lite.sampling import make_sampler

    sampler = make_sampler("unipc", 20, pipe.spec.shift)
    experts = [pipe.spec.dit_role_at(int(t)) for t in sampler.timesteps]
    skips = sc.plan_skips(model, "balanced", experts)
    forwards = cached.settings["dit_forwards"]
    assert forwards["skipped"] == 2 * sum(skips) > 0 and forwards["computed"] + forwards["skipped"] == 40
    assert not pipe.step_hooks and all(not d._block_loop_hooks for d in pipe.dits.values())  # detached
    err = ((cached.latents - plain.latents).norm() / plain.latents.norm()).item()
    assert err < 0.5  # random weights: only that the cached run is the same video, roughly


def test_skips_never_cross_the_expert_switch(pipes) -> None:
    """Each expert computes its first step itself: the low-noise DiT runs its blocks at the
    first low-noise step, whatever the high-noise expert cached."""
    pipe = pipes["t2v-a14b"]
    first_low: list[int] = []
    low = pipe.dits["low"]

    def watch(info, call):
        if info.expert == "low" and not first_low:
            before = low.rows_through_blocks
            out = call()
            first_low.append(low.rows_through_blocks - before)
            return out
        return call()

    pipe.step_hooks.append(watch)
    try:
        pipe.generate("a boat", seed=2, cache="fast", **STEPS)
    finally:
        pipe.step_hooks.remove(watch)
    assert first_low == [1]


def test_streamed_plus_cache_equals_resident_plus_cache(pipes) -> None:
    from tests.test_runtime_apply import lean_plan, unbind
    from wan_lite.runtime.apply import PlannedPlacement

    pipe = pipes["t2v-a14b"]
    resident = pipe.generate("a boat at dawn", seed=3, cache="balanced", **STEPS)
    p = lean_plan(pipe, resident_blocks=0, prefetch=1, ffn_chunk_tokens=None, quantization="bf16",
                  idle_expert="ram", text_encoder="stream", vae_tile=None)
    PlannedPlacement(p, "cpu").bind(pipe)
    try:
        streamed = pipe.generate("a boat at dawn", seed=3, cache="balanced", **STEPS)
    finally:
        unbind(pipe)
    assert torch.equal(streamed.latents, resident.latents)
    assert streamed.settings["dit_forwards"] == resident.settings["dit_forwards"]


def test_cache_settings_are_checked_and_short_runs_turn_it_off() -> None:
    with pytest.raises(InputError, match="balanced"):
        resolve(GenerateRequest("x", cache="turbo"))
    job = resolve(GenerateRequest("x", steps=4, cache="fast"))
    assert job.request.cache == "off" and any("step cache is off" in n for n in job.notes)


def test_planner_counts_the_cache_time_and_residuals() -> None:
    from wan_lite.runtime.hardware import Hardware
    from wan_lite.runtime.planner import ModelFootprint, PlanRequest, plan

    share = sc.computed_share("ti2v-5b", "balanced", 50, 5.0)
    assert share == 1 - sum(sc.plan_skips("ti2v-5b", "balanced", ["main"] * 50)) / 50 == 0.5
    fp, hw = ModelFootprint.full_size("ti2v-5b"), Hardware.fake(80, 128)
    off = plan(fp, PlanRequest(1280, 704, 121, steps=50), hw)
    on = plan(fp, PlanRequest(1280, 704, 121, steps=50, cache="balanced", cache_share=share), hw)
    assert on.choices == off.choices and on.resident_blocks == fp.num_layers  # resident: residuals on the GPU
    assert dict(on.stage_seconds)["denoise"] < 0.55 * dict(off.stage_seconds)["denoise"]
    v_off, v_on = dict(off.stage_vram_gib), dict(on.stage_vram_gib)
    residuals = 2 * 27280 * fp.dim * 2 / 1024**3  # cond and uncond, bf16
    assert abs(v_on["denoise"] - v_off["denoise"] - residuals) < 2e-3
    assert "step cache balanced (50% of DiT forwards computed)" in on.summary()
    streamed = plan(fp, PlanRequest(1280, 704, 121, steps=50, cache="balanced", cache_share=share),
                    Hardware.fake(4, 32))
    assert streamed.resident_blocks < fp.num_layers and streamed.fits  # residuals in RAM there


def test_planner_counts_an_unmerged_loras_memory_and_time() -> None:
    from wan_lite.runtime.hardware import Hardware
    from wan_lite.runtime.planner import ModelFootprint, PlanRequest, plan

    fp, hw = ModelFootprint.full_size("t2v-a14b"), Hardware.fake(8, 64)
    base = PlanRequest(1280, 720, 81, steps=40)
    lora = PlanRequest(1280, 720, 81, steps=40, lora_names=("style.safetensors",), lora_bytes=600 * 2**20,
                       lora_rank=64)
    from wan_lite.runtime.plan_model import evaluate

    plain = plan(fp, base, hw, profile="8 GB VRAM / 32 GB RAM")
    assert plain.quantization != "bf16"  # this profile quantizes: a LoRA runs unmerged
    with_lora = evaluate(fp, lora, hw, plain.choices)  # the same choices, with the LoRA
    assert "LoRA style.safetensors unmerged beside the quantized weights" in with_lora.summary()
    planned = plan(fp, lora, hw, profile="8 GB VRAM / 32 GB RAM")
    assert planned.fits and planned.peak_vram_gib <= planned.usable_vram_gib  # the planner made room
    grew = dict(with_lora.stage_vram_gib)["denoise"] - dict(plain.stage_vram_gib)["denoise"]
    assert abs(grew - 600 / 1024) < 0.01
    slower = dict(with_lora.stage_seconds)["denoise"] / dict(plain.stage_seconds)["denoise"]
    assert 1.03 < slower < 1.1
    big = plan(ModelFootprint.full_size("ti2v-5b"), PlanRequest(1280, 704, 121, lora_names=("a.safetensors",),
                                                                lora_bytes=300 * 2**20, lora_rank=64),
               Hardware.fake(80, 128))
    assert big.quantization == "bf16" and "merged into the weights" in big.summary()
