"""The seams features attach to: the request resolved once, the DiT's block-loop hooks, the
pipeline's step hooks, guidance 1 as one pass, and the DiT forwards each run reports."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import wan_lite
import wan_lite.job as job_mod
from wan_lite.api import GenerateRequest
from wan_lite.engine import Engine
from wan_lite.job import Job, resolve
from wan_lite.loading.build import build_dit
from wan_lite.loading.tensors import DictSource
from wan_lite.models.dit import WanDiT

SMALL = dict(width=64, height=64, frames=9, steps=3)


@pytest.fixture(scope="module")
def pipes(tiny_models):
    return {name: wan_lite.load_pipeline(folder) for name, folder in tiny_models.items()}


# ------------------------------------------------------------------------- the request, resolved once
def test_resolve_fills_every_field_and_draws_the_seed_once() -> None:
    job = resolve(GenerateRequest("a fox", model="t2v-a14b", width=70, height=60, frames=10))
    r = job.request
    assert (r.model, r.width, r.height, r.frames, r.steps) == ("t2v-a14b", 64, 64, 9, 40)
    assert (r.guidance, r.guidance_low, r.shift, r.sampler) == (4.0, 3.0, 12.0, "unipc")
    assert isinstance(r.seed, int) and r.seed >= 0 and r.negative_prompt
    assert job.guidance == (4.0, 3.0) and any("4n+1" in n for n in job.notes)
    assert resolve(job.request).seed == r.seed  # the filled request resolves to itself


def test_an_image_opened_once_per_generation(tiny_models, tmp_path, monkeypatch) -> None:
    """Engine.resolve then Engine.generate (what the UI and the CLI do): the request is resolved,
    and the image opened, once; the size follows the image by the official rule."""
    path = tmp_path / "wide.png"
    Image.fromarray(np.zeros((48, 96, 3), dtype=np.uint8)).save(path)
    opened, resolved = [], []
    real_open, real_resolve = job_mod.load_image, job_mod.resolve
    monkeypatch.setattr(job_mod, "load_image", lambda img: opened.append(img) or real_open(img))
    monkeypatch.setattr(job_mod, "resolve", lambda req: resolved.append(req) or real_resolve(req))
    engine = Engine(tiny_models["ti2v-5b"].parent, tmp_path / "out", device="cpu",
                    folders={"ti2v-5b": tiny_models["ti2v-5b"]})
    job = engine.resolve(GenerateRequest("a fox", image=str(path), seed=4, **SMALL))
    result = engine.generate(job)
    assert len(opened) == 1 and len(resolved) == 1
    from wan_lite.sizing import image_output_size

    assert (result.width, result.height) == (job.width, job.height) == image_output_size(job.spec, 96, 48, 64, 64)
    assert result.settings["seed"] == 4 and result.settings["mode"] == "i2v"


def test_a_job_for_another_model_is_refused(pipes) -> None:
    from wan_lite.errors import InputError

    with pytest.raises(InputError, match="i2v-a14b"):
        pipes["ti2v-5b"].generate(resolve(GenerateRequest("x", model="i2v-a14b", image=Image.new("RGB", (64, 64)),
                                                          **SMALL)))


# ------------------------------------------------------------------------- DiT block-loop hooks
def _tiny_dit() -> WanDiT:
    from tests.test_dit import tiny_state

    return build_dit(DictSource(tiny_state(48, 48, seed=7)), torch.float32)


@torch.inference_mode()
def test_block_loop_hooks_wrap_in_order_and_can_skip_the_blocks() -> None:
    from tests.test_dit import context, latent

    dit = _tiny_dit()
    x, ctx, t = latent(1, 48), context(1), torch.tensor([600.0])
    ref = dit(x, t, ctx)
    order: list[str] = []
    residual: dict[str, torch.Tensor] = {}

    def outer(state, inner):
        order.append("outer")
        return inner(state)

    def cache(state, inner):  # a step cache in miniature: keep the blocks' residual, then reuse it
        order.append("cache")
        if "r" in residual:
            return state.x + residual["r"]
        x0 = state.x.clone()
        out = inner(state)
        residual["r"] = out - x0
        return out

    handles = [dit.register_block_loop_hook(outer), dit.register_block_loop_hook(cache)]
    rows = dit.rows_through_blocks
    assert torch.equal(dit(x, t, ctx), ref) and order == ["outer", "cache"]
    skipped = dit(x, t, ctx)  # blocks skipped: embed and head ran, the residual was added
    assert dit.rows_through_blocks == rows + 1  # the second forward did not go through the blocks
    assert torch.allclose(skipped, ref, rtol=0, atol=1e-5)
    for h in handles:
        h.remove()
    assert torch.equal(dit(x, t, ctx), ref) and dit.rows_through_blocks == rows + 2


@torch.inference_mode()
def test_a_bf16_models_patch_embeddings_are_freed_once_the_blocks_have_the_residual_stream() -> None:
    """The embeddings (bf16 in a bf16 model) are not kept alive through the block loop by the
    state object: after block 0 made the fp32 stream only that is alive (an A14B 720p forward's
    peak was 0.77 GB higher while the state held them). The output is unchanged."""
    import weakref

    from tests.test_dit import context, latent, tiny_state

    dit = build_dit(DictSource(tiny_state(48, 48, seed=7)), torch.bfloat16)
    x, ctx, t = latent(1, 48), context(1).bfloat16(), torch.tensor([600.0])
    ref = dit(x, t, ctx)
    seen: dict[str, object] = {}

    def keep_a_weakref(state, inner):
        assert state.x.dtype == torch.bfloat16
        seen["embeddings"] = weakref.ref(state.x)
        return inner(state)

    def at_block_1(module, args):
        seen["alive at block 1"] = seen["embeddings"]() is not None

    handles = [dit.register_block_loop_hook(keep_a_weakref), dit.blocks[1].register_forward_pre_hook(at_block_1)]
    try:
        out = dit(x, t, ctx)
    finally:
        for h in handles:
            h.remove()
    assert seen["alive at block 1"] is False
    assert torch.equal(out, ref)


# ------------------------------------------------------------------------- pipeline step hooks
def test_step_hooks_see_each_dit_call_with_its_expert_and_branch(pipes) -> None:
    pipe = pipes["t2v-a14b"]
    seen = []

    def spy(info, call):
        seen.append((info.index, info.expert, info.branches))
        return call()

    pipe.step_hooks.append(spy)
    try:
        ref_free = pipe.generate("a boat", seed=1, width=32, height=32, frames=5, steps=4)
    finally:
        pipe.step_hooks.remove(spy)
    assert [s[2] for s in seen] == [("cond",), ("uncond",)] * 4
    experts = [s[1] for s in seen[::2]]
    assert experts == sorted(experts) and set(experts) == {"high", "low"}  # high first, never back
    assert ref_free.settings["dit_forwards"] == {"computed": 8, "skipped": 0}
    again = pipe.generate("a boat", seed=1, width=32, height=32, frames=5, steps=4)
    assert torch.equal(again.latents, ref_free.latents)  # a hook that calls through changes nothing


def test_cfg_batch_is_one_call_with_both_branches(pipes) -> None:
    pipe = pipes["ti2v-5b"]
    seen = []
    pipe.step_hooks.append(lambda info, call: seen.append(info.branches) or call())
    pipe.cfg_batch = True
    try:
        out = pipe.generate("a lamp", seed=2, **SMALL)
    finally:
        pipe.cfg_batch = False
        pipe.step_hooks.clear()
    assert seen == [("cond", "uncond")] * 3 and out.settings["dit_forwards"]["computed"] == 6


def test_guidance_1_is_one_pass_and_skips_the_negative_prompt(pipes) -> None:
    pipe = pipes["t2v-a14b"]
    encoded: list[str] = []
    original = pipe.text_encoder.encode
    pipe.text_encoder.encode = lambda texts: encoded.extend(texts) or original(texts)
    pipe._text_cache.clear()
    calls = []
    pipe.step_hooks.append(lambda info, call: calls.append(info.branches) or call())
    try:
        one = pipe.generate("a quiet harbour", seed=3, guidance=1.0, guidance_low=1.0, **SMALL)
        mixed = pipe.generate("a quiet harbour", seed=3, guidance=3.5, guidance_low=1.0, **SMALL)
    finally:
        pipe.text_encoder.encode = original
        pipe.step_hooks.clear()
    assert encoded[0] == "a quiet harbour" and len(encoded) == 2  # the negative prompt only for the mixed run
    assert one.settings["dit_forwards"] == {"computed": 3, "skipped": 0}
    n_high = sum(1 for b in calls[3:] if b == ("uncond",))
    assert mixed.settings["dit_forwards"]["computed"] == 3 + n_high and n_high >= 1
    assert calls[:3] == [("cond",)] * 3


def test_a_skipping_block_hook_is_reported_as_skipped(pipes) -> None:
    pipe = pipes["ti2v-5b"]
    dit = pipe.dits["main"]
    state = {"calls": 0}

    def skip_every_other(s, inner):
        state["calls"] += 1
        return s.x if state["calls"] % 2 == 0 else inner(s)

    handle = dit.register_block_loop_hook(skip_every_other)
    try:
        out = pipe.generate("a lamp", seed=2, **SMALL)
    finally:
        handle.remove()
    assert out.settings["dit_forwards"] == {"computed": 3, "skipped": 3}


def test_job_dataclass_is_what_the_pipeline_reads() -> None:
    job = resolve(GenerateRequest("a fox", seed=9, **SMALL))
    assert isinstance(job, Job) and job_mod.as_job(job) is job
    assert job.settings()["seed"] == 9 and job.settings()["model"] == "ti2v-5b"


def test_switching_models_keeps_the_shared_text_encoder_and_vae(tiny_models, tmp_path) -> None:
    """T2V-A14B then I2V-A14B with the same umT5 and Wan 2.1 VAE files: the second load takes
    the first one's text encoder (and its prompt cache) and VAE as they are; the same model
    again loads nothing."""
    from wan_lite.loading.layout import find_model

    t2v = find_model(tiny_models["t2v-a14b"], "t2v-a14b")
    shared = {"text_encoder": t2v.t5, "tokenizer": t2v.tokenizer, "vae": t2v.vae}
    engine = Engine(tiny_models["t2v-a14b"].parent, tmp_path / "out", device="cpu",
                    folders={"t2v-a14b": tiny_models["t2v-a14b"], "i2v-a14b": tiny_models["i2v-a14b"]},
                    components={"t2v-a14b": dict(shared), "i2v-a14b": dict(shared)})
    first = engine.pipeline("t2v-a14b", job=engine.resolve(GenerateRequest("a boat", model="t2v-a14b", **SMALL)))
    first.encode_text(["a boat"])
    again = engine.pipeline("t2v-a14b", job=engine.resolve(GenerateRequest("a cat", model="t2v-a14b", **SMALL)))
    assert again is first
    te, vae, cache = first.text_encoder, first.vae, first._text_cache
    job = engine.resolve(GenerateRequest("a boat", model="i2v-a14b", image=Image.new("RGB", (64, 64)), **SMALL))
    second = engine.pipeline("i2v-a14b", job=job)
    assert second is not first and second.spec.name == "i2v-a14b"
    assert second.text_encoder is te and second.vae is vae and second._text_cache is cache
    assert "a boat" in second._text_cache
