"""The memory plan applied to a real (tiny) pipeline on the CPU: every memory-saving path gives
the plain path's result (streamed, chunked, batched CFG, resumed after an OOM), quantized within
tolerance, and an OOM mid-run drops to a leaner plan and carries on."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import wan_lite
from wan_lite.api import GenerateRequest
from wan_lite.job import resolve
from wan_lite.loading.components import module_of
from wan_lite.pipeline import MovePlacement, WanPipeline
from wan_lite.runtime.apply import PlannedPlacement
from wan_lite.runtime.hardware import Hardware
from wan_lite.runtime.planner import ModelFootprint, PlanRequest, plan

SMALL = dict(width=64, height=64, frames=9, steps=4)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def plain(tiny_models):
    pipe = wan_lite.load_pipeline(tiny_models["t2v-a14b"])
    return pipe, pipe.generate("a boat at dawn", seed=3, **SMALL)


def lean_plan(pipe, **force):
    cfg = pipe.dit.config
    fp = ModelFootprint.from_config(cfg, name="t2v-a14b", vae_version="2.1", experts=2)
    p = plan(fp, PlanRequest(64, 64, 9, steps=4), Hardware.fake(vram_gb=4, ram_gb=16))
    return replace(p, **force)


def unbind(pipe) -> None:
    """Back to the plain path: what PlannedPlacement.bind set, unset."""
    pipe.placement, pipe.cfg_batch = MovePlacement("cpu"), False
    for dit in pipe.dits.values():
        for b in dit.blocks:
            b.chunk_tokens = None
    pipe.decode_fn = lambda vae, z: vae.decode(z)
    pipe.encode_fn = lambda vae, x: vae.encode(x)


def test_streamed_chunked_plan_equals_plain(plain):
    pipe, ref = plain
    p = lean_plan(pipe, resident_blocks=0, prefetch=1, ffn_chunk_tokens=16, quantization="bf16",
                  idle_expert="ram", text_encoder="stream", vae_tile=None)
    placement = PlannedPlacement(p, "cpu")
    placement.bind(pipe)
    try:
        out = pipe.generate("a boat at dawn", seed=3, **SMALL)
    finally:
        unbind(pipe)
    assert rel(out.latents, ref.latents) < 1e-5


def test_text_encoder_read_from_its_file_per_prompt_equals_plain(plain, monkeypatch):
    """A plan that keeps no text encoder in RAM: umT5 waits on disk, streams from its file for a
    new prompt with its token embedding read row by row (embedding_rows), and goes back to disk:
    the same video as the plain path."""
    from wan_lite.runtime import embedding_rows, streaming

    pipe, ref = plain
    used = []
    real = embedding_rows.rows_on_demand
    monkeypatch.setattr(streaming, "rows_on_demand", lambda *a: used.append(a[2]) or real(*a))
    p = lean_plan(pipe, resident_blocks=0, prefetch=1, quantization="bf16", idle_expert="ram",
                  text_encoder="stream", keep_text_encoder=False, vae_tile=None)
    placement = PlannedPlacement(p, "cpu")
    placement.bind(pipe)
    module = module_of(pipe.text_encoder)
    cache = dict(pipe._text_cache)
    pipe._text_cache.clear()
    try:
        streaming.move_expert(module, "disk")  # as the loader leaves it when RAM is short
        out = pipe.generate("a boat at dawn", seed=3, **SMALL)
        assert streaming.where_is(module) == "disk"
    finally:
        pipe._text_cache.update(cache)
        streaming.move_expert(module, "ram")
        unbind(pipe)
    assert used and all(k.endswith("weight") for k in used)
    assert rel(out.latents, ref.latents) < 1e-5


def test_a_new_plan_first_takes_the_dit_back_from_the_last_ones_placement(plain):
    """The engine re-binds its placement when the plan changes between runs: a DiT the last plan
    left placed (streamed here; on a GPU also kept resident) goes back to RAM, so the new plan's
    placement starts from what it assumes; the same plan again moves nothing."""
    from wan_lite.runtime import streaming

    pipe, _ = plain
    first = lean_plan(pipe, resident_blocks=0, prefetch=1, quantization="bf16", idle_expert="ram")
    placement = PlannedPlacement(first, "cpu")
    placement.bind(pipe)
    dit = pipe.dits["high"]
    try:
        placement.activate("high", dit)
        assert streaming.streamer_of(dit) is not None
        placement.bind(pipe)  # the same plan: left as it is
        assert streaming.streamer_of(dit) is not None
        placement.plan = replace(first, resident_blocks=1)
        placement.bind(pipe)
        assert streaming.streamer_of(dit) is None and streaming.where_is(dit) == "ram"
    finally:
        streaming.move_expert(dit, "ram")
        unbind(pipe)


def test_batched_cfg_equals_two_passes(plain):
    pipe, ref = plain
    pipe.cfg_batch = True
    try:
        out = pipe.generate("a boat at dawn", seed=3, **SMALL)
    finally:
        pipe.cfg_batch = False
    assert rel(out.latents, ref.latents) < 1e-5


class _OomOnce(MovePlacement):
    """Raises an out-of-memory error from the DiT once, at a chosen call, like a full GPU would."""

    def __init__(self, pipe, at_call: int) -> None:
        super().__init__("cpu")
        self.calls, self.at, self.ooms = 0, at_call, 0
        for dit in pipe.dits.values():
            dit.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1
        if self.calls == self.at:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    def on_oom(self, name, module) -> bool:
        self.ooms += 1
        return True


def test_resumed_after_oom_equals_uninterrupted(tiny_models, plain):
    _, ref = plain
    pipe = wan_lite.load_pipeline(tiny_models["t2v-a14b"])
    pipe.placement = _OomOnce(pipe, at_call=5)  # third step, cond pass
    out = pipe.generate("a boat at dawn", seed=3, **SMALL)
    assert pipe.placement.ooms == 1
    assert torch.equal(out.latents, ref.latents)


def test_oom_without_a_leaner_plan_says_what_to_do(tiny_models):
    from wan_lite.errors import OutOfMemoryError

    pipe = wan_lite.load_pipeline(tiny_models["t2v-a14b"])
    placement = _OomOnce(pipe, at_call=1)
    placement.on_oom = lambda name, module: False
    pipe.placement = placement
    with pytest.raises(OutOfMemoryError, match="smaller size or fewer frames"):
        pipe.generate("a boat", seed=1, **SMALL)


def test_planned_oom_resumes_on_the_leaner_plan_with_the_same_latents(tiny_models):
    """An out-of-memory error in the third step's DiT call: the PlannedPlacement drops to exactly
    the plan `leaner` gives for denoising, re-places the expert, and the step runs again; the
    video equals the uninterrupted run under the first plan bit for bit (on the CPU a leaner
    placement is the same math)."""
    from wan_lite.runtime.planner import leaner

    pipe = wan_lite.load_pipeline(tiny_models["t2v-a14b"])
    first = lean_plan(pipe)
    want = leaner(first, "denoise")
    assert want is not None and want.choices != first.choices and want.quantization == first.quantization
    PlannedPlacement(first, "cpu").bind(pipe)
    uninterrupted = pipe.generate("a boat at dawn", seed=3, **SMALL)
    placement = PlannedPlacement(first, "cpu")
    placement.bind(pipe)
    calls = {"n": 0}

    def full_gpu(module, args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    handles = [dit.register_forward_pre_hook(full_gpu) for dit in pipe.dits.values()]
    try:
        out = pipe.generate("a boat at dawn", seed=3, **SMALL)
    finally:
        for h in handles:
            h.remove()
        unbind(pipe)
    assert placement.plan == want
    assert torch.equal(out.latents, uninterrupted.latents)


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4"])
def test_quantized_plan_within_tolerance(tiny_models, plain, tmp_path, fmt):
    pipe, ref = plain
    p = lean_plan(pipe, quantization=fmt, resident_blocks=0, idle_expert="disk", vae_tile=None,
                  text_encoder="cpu", text_encoder_quant="bf16", vae_dtype="fp32", cfg_batch=False)
    q = WanPipeline.load_planned(tiny_models["t2v-a14b"], p, device="cpu", cache_dir=tmp_path)
    out = q.generate("a boat at dawn", seed=3, **SMALL)
    err = rel(out.latents, ref.latents)
    # the whole generation's latents, measured: int8 0.0048, fp8 0.0125, int4 0.039
    assert err < {"int8": 0.02, "fp8": 0.05, "int4": 0.08}[fmt], err
    assert list(tmp_path.glob("*.safetensors")), "the quantized weights were not cached on disk"
    again = WanPipeline.load_planned(tiny_models["t2v-a14b"], p, device="cpu", cache_dir=tmp_path)
    assert torch.equal(again.generate("a boat at dawn", seed=3, **SMALL).latents, out.latents)


def test_experts_are_never_in_ram_together_while_loading(tiny_models, plain, tmp_path, monkeypatch):
    """With the idle expert on disk, the low-noise expert is loaded (its fp32 file converted into
    the bf16 cache) and dropped before the high-noise expert is read: RAM holds one expert, even
    during loading, and the dropped expert is read again from the bf16 cache."""
    from wan_lite.runtime import loader, streaming

    pipe, _ = plain
    p = lean_plan(pipe, quantization="bf16", idle_expert="disk", text_encoder="cpu", text_encoder_quant="bf16")
    built: list = []
    in_ram_at_build: list[int] = []
    real = loader.load_or_quantize

    def load_or_quantize(model, source, fmt, **kw):
        if not kw.get("what", "").endswith("DiT"):  # the text encoder's conversion
            return real(model, source, fmt, **kw)
        in_ram_at_build.append(sum(streaming.where_is(m) == "ram" for m in built))
        out = real(model, source, fmt, **kw)
        built.append(out[0])
        return out

    monkeypatch.setattr(loader, "load_or_quantize", load_or_quantize)
    q = WanPipeline.load_planned(tiny_models["t2v-a14b"], p, device="cpu", cache_dir=tmp_path)
    assert len(built) == 2 and in_ram_at_build == [0, 0]
    assert list(q.dits) == ["high", "low"]
    assert streaming.where_is(q.dits["high"]) == "ram" and streaming.where_is(q.dits["low"]) == "disk"
    source, _ = streaming.expert_source(q.dits["low"])
    assert [f.parent for f in source.files] == [tmp_path] and ".bf16." in source.files[0].name


def test_job_resolution_is_shared(plain):
    pipe, _ = plain
    job = resolve(GenerateRequest("x", model=pipe.spec.name, width=70, height=60, frames=10))
    assert (job.width, job.height, job.frames) == (64, 64, 9)


def test_engine_on_a_cpu_runs_the_plan_that_plan_reports(tiny_models, plain, tmp_path, monkeypatch):
    """Without a GPU (or with device="cpu") the engine's pipeline comes from the planned loader
    too: its placement holds the plan `planner.plan` makes for the request on this machine (the
    one `python -m wan_lite plan` prints for it), in the CPU's formats (bf16 DiT and umT5, fp32
    VAE, nothing quantized), and the video is the plain pipeline's."""
    import json

    from safetensors.torch import load_file

    from tests.test_planner import _cli
    from wan_lite.api import GenerateRequest
    from wan_lite.engine import Engine
    from wan_lite.runtime.quant import quantized_modules

    machine = Hardware.fake(vram_gb=0, ram_gb=64)  # what a probe of a 64 GB machine without a GPU says
    monkeypatch.setattr(Hardware, "probe", classmethod(lambda cls, *args, **kw: machine))
    monkeypatch.delenv("WAN_LITE_FP8_ATTENTION", raising=False)
    _, ref = plain
    engine = Engine(tmp_path / "models", tmp_path / "out", device="cpu", folders={"t2v-a14b": tiny_models["t2v-a14b"]})
    request = GenerateRequest(prompt="a boat at dawn", model="t2v-a14b", seed=3, **SMALL)
    result = engine.generate(request)
    pipe = engine._pipe
    assert isinstance(pipe.placement, PlannedPlacement) and pipe.device.type == "cpu"
    # the model on disk: this DiT, and the text encoder and VAE as they are in the folder (tiny)
    t5_params = sum(p.numel() for p in pipe.text_encoder.model.parameters())
    vae_params = tuple(sum(p.numel() for n, p in pipe.vae.named_parameters() if n.startswith(parts))
                       for parts in (("encoder.", "conv1."), ("decoder.", "conv2.")))
    footprint = ModelFootprint.from_config(pipe.dit.config, name="t2v-a14b", vae_version="2.1", experts=2,
                                           text_params=t5_params, vae_params=vae_params,
                                           text_embed_params=pipe.text_encoder.model.shared.weight.numel(),
                                           text_blocks=len(pipe.text_encoder.model.encoder.block))
    want = plan(footprint, PlanRequest(64, 64, 9, steps=4), machine)
    assert pipe.placement.plan == want and want.fits and want.quantization == "bf16"
    assert not any(quantized_modules(m) for m in (*pipe.dits.values(), pipe.text_encoder.model))
    assert {p.dtype for d in pipe.dits.values() for n, p in d.named_parameters() if "modulation" not in n} == {
        torch.bfloat16}
    assert pipe.vae.dtype == torch.float32 and pipe.text_encoder.model.dtype == torch.bfloat16
    assert torch.equal(load_file(result.latents_path)["latents"], ref.latents)
    # the preflight (the CLI's plan line, the app's estimate) is the plan the run followed
    assert engine.preflight(request).plan == want.to_json()
    # `plan` plans the released model's sizes, as the preflight of an engine without the model does
    bare = Engine(tmp_path / "no-models", tmp_path / "out", device="cpu")
    rc, text = _cli("--model", "t2v-a14b", "--size", "64x64", "--frames", "9", "--steps", "4", "--json")
    assert rc == 0 and json.loads(text) == bare.preflight(request).plan


@pytest.mark.gpu
def test_a_real_cuda_oom_mid_run_finishes_on_a_leaner_plan_with_the_same_latents(tmp_path):
    """Issue 23, item 8, on the GPU: at the third DiT call the process's GPU memory is capped
    (set_per_process_memory_fraction) just above what is allocated, so the resident plan's next
    activation fails in the CUDA allocator for real. The PlannedPlacement drops one step down
    the leaner chain per error (smaller chunks, then fewer resident blocks) until the step fits,
    and the run finishes with the latents of the uninterrupted run under the first plan (fp32
    weights: the same math, only the GEMM sizes differ)."""
    from tests.tiny_ckpt import write_model
    from wan_lite.runtime.planner import leaner

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    folder = write_model(tmp_path / "ti2v-5b", "ti2v-5b", dim=512, ffn_dim=2048, num_layers=8)
    pipe = wan_lite.load_pipeline(folder, device="cpu", dtype=torch.float32)
    cfg = pipe.dit.config
    fp = ModelFootprint.from_config(cfg, name="ti2v-5b", vae_version="2.2", experts=1)
    size = dict(width=512, height=512, frames=33, steps=3)
    first = replace(plan(fp, PlanRequest(512, 512, 33, steps=3), Hardware.fake(vram_gb=80, ram_gb=64)),
                    resident_blocks=8, prefetch=1, ffn_chunk_tokens=None, cfg_batch=False, quantization="bf16",
                    text_encoder="gpu", vae_tile=None, vae_dtype="fp32")
    PlannedPlacement(first, "cuda").bind(pipe)
    uninterrupted = pipe.generate("a boat at dawn", seed=3, **size)
    placement = PlannedPlacement(first, "cuda")
    placement.bind(pipe)
    total = torch.cuda.get_device_properties(0).total_memory
    calls = {"n": 0, "ooms": 0}
    real_on_oom = placement.on_oom

    def counted(name, module):
        calls["ooms"] += 1
        return real_on_oom(name, module)

    placement.on_oom = counted

    def cap_now(module, args):
        calls["n"] += 1
        if calls["n"] == 3:
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + 4 * 2**20) / total)

    def uncap(progress):
        if progress.stage == "decode":
            torch.cuda.set_per_process_memory_fraction(1.0)

    handle = pipe.dit.register_forward_pre_hook(cap_now)
    try:
        out = pipe.generate("a boat at dawn", seed=3, on_progress=uncap, **size)
    finally:
        handle.remove()
        torch.cuda.set_per_process_memory_fraction(1.0)
        unbind(pipe)
    assert calls["ooms"] >= 1, "the cap did not make an allocation fail"
    leaner_plans, p = [], first
    while (p := leaner(p, "denoise")) is not None and len(leaner_plans) < calls["ooms"]:
        leaner_plans.append(p)
    assert placement.plan == leaner_plans[-1]  # one step down the leaner chain per out-of-memory error
    assert placement.plan.quantization == "bf16"
    assert rel(out.latents, uninterrupted.latents) < 1e-5


def test_vae_waiting_in_its_file_makes_the_same_video(tiny_models, image_file):
    """A plan short of RAM keeps the VAE in its file (vae_parts): the encoder half is read for
    the start image, the decoder half for the decode, each dropped after; the video is the one
    of the VAE held in RAM, byte for byte. Plans that change between jobs move it in and out of
    RAM without reloading the model."""
    from wan_lite.loading.tensors import open_source
    from wan_lite.runtime import streaming, vae_parts

    pipe = wan_lite.load_pipeline(tiny_models["ti2v-5b"])
    args = dict(image=str(image_file), seed=4, width=64, height=64, frames=9, steps=3)
    ref = pipe.generate("a kite over the dunes", **args)
    vae = pipe.vae
    vae_parts.register(vae, open_source(tiny_models["ti2v-5b"] / "Wan2.2_VAE.pth"))
    for half in vae_parts.HALVES:
        vae_parts.drop(vae, half)
    assert streaming.where_is(vae) == "disk"
    fp = ModelFootprint.from_config(pipe.dit.config, name="ti2v-5b", vae_version="2.2", experts=1)
    p = replace(plan(fp, PlanRequest(64, 64, 9, steps=3), Hardware.fake(vram_gb=4, ram_gb=16)),
                vae_on_disk=True, vae_tile=None)
    placement = PlannedPlacement(p, "cpu")
    placement.bind(pipe)
    pipe._text_cache.clear()
    try:
        out = pipe.generate("a kite over the dunes", **args)
        assert streaming.where_is(vae) == "disk"  # dropped again after the decode
        # the next job's plan keeps it in RAM: read back there after its use, no reload of the model
        PlannedPlacement(replace(p, vae_on_disk=False), "cpu").bind(pipe)
        again = pipe.generate("a kite over the dunes", **args)
        assert streaming.where_is(vae) == "ram"
        PlannedPlacement(p, "cpu").bind(pipe)  # short of RAM again: it leaves RAM at once
        assert streaming.where_is(vae) == "disk"
    finally:
        for half in vae_parts.HALVES:
            vae_parts.bring(vae, half, "cpu")
        unbind(pipe)
    assert torch.equal(out.latents, ref.latents)
    assert (out.frames == ref.frames).all() and (again.frames == ref.frames).all()


def test_loader_leaves_the_vae_in_its_file_and_checks_it_first(tiny_models, tmp_path):
    """load_parts(vae_on_disk=True) reads nothing of the VAE, but a VAE file that lacks a tensor
    or holds the wrong shape is refused at load, as a whole load would be."""
    import shutil

    from wan_lite.errors import CheckpointError
    from wan_lite.runtime import streaming, vae_parts
    from wan_lite.runtime.loader import load_parts

    parts = load_parts(tiny_models["ti2v-5b"], vae_on_disk=True)
    assert streaming.where_is(parts.vae) == "disk" and vae_parts.has_file(parts.vae)
    folder = tmp_path / "broken"
    shutil.copytree(tiny_models["ti2v-5b"], folder)
    state = torch.load(folder / "Wan2.2_VAE.pth")
    state.pop(next(k for k in state if k.startswith("decoder.")))
    torch.save(state, folder / "Wan2.2_VAE.pth")
    with pytest.raises(CheckpointError, match="lack 1 tensor"):
        load_parts(folder, vae_on_disk=True)
