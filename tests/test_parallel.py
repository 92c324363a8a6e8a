"""Multi-GPU generation (wan_lite.parallel), proven on the CPU: N gloo processes, tiny models.

Sequence parallel (Ulysses over uneven head groups, padded token pieces) and CFG parallel give
the one-process latents within float tolerance (fp32 tiny models) for all three models, with the
A14B expert switch, image conditioning and block streaming; a failing or hanging rank ends the
job with its message, in bounded time.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from wan_lite.api import GenerateRequest
from wan_lite.errors import InputError, WanLiteError
from wan_lite.models.dit_ops import timestep_runs
from wan_lite.parallel.group import BACKEND_ENV, LOAD_TIMEOUT_ENV, TIMEOUT_ENV, init_group, leave_group
from wan_lite.parallel.sequence import head_split, local_runs

HEADS_DIM = 384  # 3 heads of 128: 2 ranks split them 2 + 1, 4 ranks 1 + 1 + 1 + 0
TOL = 2e-5

# (model, request fields, stream the DiT's blocks). Sizes give token counts no rank count divides.
CASES = {
    "ti2v": ("ti2v-5b", dict(width=96, height=64, frames=9, steps=3), False),
    "ti2v_image": ("ti2v-5b", dict(width=96, height=64, frames=9, steps=3, image=True), False),
    "ti2v_no_cfg": ("ti2v-5b", dict(width=96, height=64, frames=9, steps=3, guidance=1.0), True),
    "t2v_a14b": ("t2v-a14b", dict(width=80, height=48, frames=9, steps=3), False),
    "i2v_a14b": ("i2v-a14b", dict(width=80, height=48, frames=9, steps=3, image=True), True),
    "a14b_no_cfg": ("t2v-a14b", dict(width=80, height=48, frames=9, steps=3, guidance=1.0, guidance_low=1.0), True),
    # the step cache's block-loop hook wraps the split (innermost): it sees the whole batch and sequence
    "ti2v_cache": ("ti2v-5b", dict(width=96, height=64, frames=9, steps=12, cache="balanced"), False),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from tests.tiny_ckpt import write_model

    root = tmp_path_factory.mktemp("par_models")
    return {name: write_model(root / name, name, dim=HEADS_DIM) for name in ("ti2v-5b", "t2v-a14b", "i2v-a14b")}


def _request(case: str, image: Path) -> GenerateRequest:
    name, fields, _stream = CASES[case]
    fields = dict(fields)
    if fields.pop("image", False):
        fields["image"] = str(image)
    return GenerateRequest(prompt="a red fox in the snow", model=name, seed=7, **fields)


def _load(folder: Path, stream: bool, device: str = "cpu"):
    from wan_lite.pipeline import WanPipeline
    from wan_lite.runtime import streaming

    pipe = WanPipeline.load(folder, dtype=torch.float32, text_dtype=torch.float32, device=device)
    if stream:
        for dit in pipe.dits.values():
            streaming.attach(dit, device, resident=0, prefetch=1, pinned=False)
    return pipe


def _denoise(pipe, request: GenerateRequest) -> torch.Tensor:
    from wan_lite.job import resolve

    return pipe.denoise(resolve(request))[0]


def _rank_cases(index: int, world: int, init: str, models: dict[str, Path], image: Path, cases: list[str],
                out: Path, backend: str = "gloo") -> None:
    """One rank: every case's denoise with the job's ParallelRun attached; each rank saves its latents."""
    from wan_lite.job import resolve
    from wan_lite.parallel.run import ParallelRun

    torch.set_num_threads(1)
    pg = init_group(index, world, index, cfg=True, backend_name=backend, init_method=init)
    results = {}
    for case in cases:
        name, _fields, stream = CASES[case]
        pipe = _load(models[name], stream, str(pg.device))
        job = resolve(_request(case, image))
        with ParallelRun(pg, pipe, job):
            results[case] = pipe.denoise(job)[0]
        assert not pipe.step_hooks and all(b.self_attention is None for d in pipe.dits.values() for b in d.blocks)
    leave_group()
    torch.save(results, out / f"rank{index}.pt")


def _free_init() -> str:
    from wan_lite.parallel.launch import _free_port

    return f"tcp://127.0.0.1:{_free_port()}"


def _split_equals_one_process(world: int, models, image_file, tmp_path, cases: list[str],
                              backend: str = "gloo") -> None:
    t0 = time.perf_counter()
    mp.start_processes(_rank_cases, args=(world, _free_init(), models, image_file, cases, tmp_path, backend),
                       nprocs=world, start_method="spawn")
    print(f"{world} ranks, {len(cases)} cases: {time.perf_counter() - t0:.1f} s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for case in cases:
        name, _fields, stream = CASES[case]
        pipe = _load(models[name], stream, "cuda:0" if backend == "nccl" else "cpu")
        # CFG parallel runs cond + uncond as one batch, whose two branches the step cache skips
        # together; one process does so too when batching (alone, each branch decides for itself)
        pipe.cfg_batch = case == "ti2v_cache"
        ref = _denoise(pipe, _request(case, image_file))
        for r, got in enumerate(ranks):
            assert got[case].shape == ref.shape
            err = (got[case] - ref).abs().max().item()
            assert err <= TOL * max(1.0, ref.abs().max().item()), f"{case}, rank {r}: max error {err:.2e}"
        assert all(torch.equal(ranks[0][case], other[case]) for other in ranks[1:])  # the ranks agree bit for bit


def test_two_ranks_equal_one_process(models, image_file, tmp_path):
    """2 ranks: CFG parallel (one pass per rank) where guidance > 1, sequence parallel over 3 heads
    (2 + 1) where guidance is 1; all three models, the expert switch, images, streaming."""
    _split_equals_one_process(2, models, image_file, tmp_path, list(CASES))


@pytest.mark.slow
def test_four_ranks_equal_one_process(models, image_file, tmp_path):
    """4 ranks: CFG 2 x sequence 2, and sequence 4 over 3 heads (one rank has none) at guidance 1."""
    _split_equals_one_process(4, models, image_file, tmp_path, ["ti2v_image", "ti2v_no_cfg", "t2v_a14b", "i2v_a14b"])


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_ring_attention_equals_one_process(models, image_file, tmp_path, monkeypatch, world):
    """WAN_LITE_SP_ATTENTION=ring: k and v go around the ring, the pieces merge by log-sum-exp;
    padded pieces (2 ranks: 45 tokens; 4 ranks: 18 and 45) are never keys."""
    from wan_lite.parallel.sequence import SP_ATTENTION_ENV

    monkeypatch.setenv(SP_ATTENTION_ENV, "ring")
    _split_equals_one_process(world, models, image_file, tmp_path, ["ti2v_no_cfg", "a14b_no_cfg"])


@pytest.mark.gpu
@pytest.mark.parametrize("world", [2, 4])
def test_nccl_ranks_equal_one_gpu(models, image_file, tmp_path, world):
    """The same cases over NCCL on `world` GPUs (skipped where fewer are present)."""
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA GPUs")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    _split_equals_one_process(world, models, image_file, tmp_path, list(CASES), backend="nccl")


# ------------------------------------------------------------------------------- the pieces
def test_head_split_is_uneven_where_it_must_be():
    assert head_split(24, 8) == [3] * 8
    assert head_split(24, 5) == [5, 5, 5, 5, 4]
    assert head_split(40, 3) == [14, 13, 13]
    assert head_split(3, 4) == [1, 1, 1, 0]
    assert sum(head_split(40, 7)) == 40


def test_local_runs_keep_global_timesteps_and_cover_the_padding():
    t = torch.full((1, 10), 500.0)
    t[:, :4] = 0.0  # TI2V: frame 0 clean
    _values, runs = timestep_runs(t, 1, 10)
    rows = slice(0, 1)
    # 3 ranks of 4 tokens (2 of padding on the last)
    first = local_runs(runs, 0, 4, 4, rows)
    assert [(s, e) for s, e, _ in first] == [(0, 4)] and int(first[0][2]) == 0
    mid = local_runs(runs, 4, 8, 4, rows)
    assert [(s, e) for s, e, _ in mid] == [(0, 4)] and int(mid[0][2]) == 1
    last = local_runs(runs, 8, 10, 4, rows)
    assert [(s, e) for s, e, _ in last] == [(0, 4)]
    straddle = local_runs(runs, 2, 6, 4, rows)
    assert [(s, e, int(i)) for s, e, i in straddle] == [(0, 2, 0), (2, 4, 1)]
    only_pad = local_runs(runs, 10, 10, 4, rows)
    assert [(s, e) for s, e, _ in only_pad] == [(0, 4)]


# ------------------------------------------------------------------------------- the engine's path
def test_engine_generate_gpus_2_spawns_ranks_and_writes_the_video(models, tmp_path, monkeypatch):
    """`GenerateRequest(gpus=2)` through Engine.generate: two spawned gloo processes, rank 0's
    progress relayed, its files written, the latents those of one process (the plan's dtype)."""
    import multiprocessing
    from dataclasses import replace

    from wan_lite.engine import Engine
    from wan_lite.output import load_latents

    monkeypatch.setenv(BACKEND_ENV, "gloo")
    engine = Engine(models_root=tmp_path / "models", output_dir=tmp_path / "out", device="cpu",
                    folders={"ti2v-5b": models["ti2v-5b"]})
    request = GenerateRequest(prompt="a lamp in the dark", model="ti2v-5b", seed=3, width=96, height=64, frames=9,
                              steps=2)
    one = engine.generate(request)
    assert engine._pipe is not None
    events = []
    t0 = time.perf_counter()
    two = engine.generate(replace(request, gpus=2), on_progress=events.append)
    print(f"2 ranks through the engine: {time.perf_counter() - t0:.1f} s")
    assert engine._pipe is None  # unloaded before the ranks loaded theirs (GPU 0 and the RAM are theirs)
    assert two.video_path.is_file() and two.sidecar_path.is_file() and two.video_path != one.video_path
    assert two.seed == 3 and two.frames == one.frames
    assert any("Ran on 2 ranks" in n for n in two.notes)
    assert [e.step for e in events if e.stage == "denoise"][-1] == 2 and any(e.stage == "decode" for e in events)
    a, _ = load_latents(one.latents_path)
    b, meta = load_latents(two.latents_path)
    assert meta["request"]["gpus"] == 2
    assert two.settings["dit_forwards"] == one.settings["dit_forwards"] == {"computed": 4, "skipped": 0}
    dtype_tol = 1e-5 if a.dtype == torch.float32 else 2e-2
    assert (a - b).abs().max().item() <= dtype_tol * max(1.0, a.abs().max().item())
    assert not multiprocessing.active_children()


def _watched_engine(device: str, *, folder: Path, out: Path):
    """A rank's engine that writes down, as its pipeline is loaded, whether its text encoder was
    read into memory (out/rank<N>.json)."""
    import torch.distributed as dist

    from wan_lite.engine import Engine
    from wan_lite.loading.components import module_of
    from wan_lite.runtime.hardware import MemoryProfile

    engine = Engine(models_root=out, output_dir=out, device=device, folders={"ti2v-5b": folder})
    inputs = engine._plan_inputs

    def keeping(*args, **kwargs):  # as a memory profile that keeps umT5 in RAM (a CPU plan never does)
        model, req, hw, _ = inputs(*args, **kwargs)
        return model, req, hw, MemoryProfile("keep", "umT5 kept", force=(("keep_text_encoder", True),))

    engine._plan_inputs = keeping
    load = engine.pipeline

    def pipeline(*args, **kwargs):
        pipe = load(*args, **kwargs)
        params = list(module_of(pipe.text_encoder).parameters())
        (out / f"rank{dist.get_rank()}.json").write_text(json.dumps({
            "loaded": not any(p.is_meta for p in params), "keep": pipe.placement.plan.keep_text_encoder}))
        return pipe

    engine.pipeline = pipeline
    return engine


def test_only_rank_0_holds_the_text_encoder(models, tmp_path, monkeypatch):
    """Rank 0 encodes the prompt for every rank: the others leave umT5 in its file where the plan
    keeps it in RAM, their plan otherwise the same."""
    from wan_lite.parallel.launch import spawn_job
    from wan_lite.parallel.plan import rank_plan

    monkeypatch.setenv(BACKEND_ENV, "gloo")
    factory = functools.partial(_watched_engine, folder=models["ti2v-5b"], out=tmp_path)
    request = GenerateRequest(prompt="x", model="ti2v-5b", seed=2, width=64, height=64, frames=5, steps=1)
    result = spawn_job(factory, request, 2, cfg=True, device="cpu")
    assert result.video_path.is_file()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == {"loaded": True, "keep": True}
    assert ranks[1] == {"loaded": False, "keep": False}
    from wan_lite.runtime.hardware import Hardware
    from wan_lite.runtime.planner import ModelFootprint, PlanRequest, plan

    plan = plan(ModelFootprint.full_size("ti2v-5b"), PlanRequest(1280, 704, 121),
                Hardware.fake(80, 256, (9, 0), gpu_name="NVIDIA H100 80GB HBM3"))
    follower = rank_plan(plan, 1)
    assert plan.keep_text_encoder and rank_plan(plan, 0) is plan
    assert follower.keep_text_encoder is False and follower.quantization == plan.quantization
    assert follower.resident_blocks == plan.resident_blocks and "rank 0 encodes" in follower.notes[-1]


def _failing_engine(device: str, *, folder: Path, out: Path, hang: bool = False):
    """A rank's engine; rank 1 fails (or hangs) while rank 0 goes on into the first exchange."""
    import torch.distributed as dist

    from wan_lite.engine import Engine

    if dist.get_rank() == 1:
        if hang:
            time.sleep(300)
        raise InputError("Rank 1 could not read its model files.", "Check the files.")
    return Engine(models_root=out, output_dir=out, device=device, folders={"ti2v-5b": folder})


@pytest.mark.parametrize("hang", [False, True])
def test_a_failing_or_hanging_rank_ends_every_rank_with_its_message(models, tmp_path, monkeypatch, hang):
    """Rank 0 waits in the text broadcast when rank 1 fails: the parent ends it and raises rank 1's
    error (a user error keeps its class and hint). A rank that hangs instead: rank 0's exchange
    times out, and that error names the rank and the timeout. Nothing is left running."""
    import multiprocessing

    from wan_lite.parallel.launch import ParallelError, spawn_job

    monkeypatch.setenv(BACKEND_ENV, "gloo")
    monkeypatch.setenv(LOAD_TIMEOUT_ENV, "4")
    monkeypatch.setenv(TIMEOUT_ENV, "4")
    factory = functools.partial(_failing_engine, folder=models["ti2v-5b"], out=tmp_path, hang=hang)
    request = GenerateRequest(prompt="x", model="ti2v-5b", seed=1, width=64, height=64, frames=5, steps=1)
    t0 = time.perf_counter()
    with pytest.raises(ParallelError if hang else InputError) as err:
        spawn_job(factory, request, 2, cfg=True, device="cpu")
    took = time.perf_counter() - t0
    if hang:
        assert "Rank 0 of the 2-GPU job failed" in str(err.value) and "WAN_LITE_DIST_TIMEOUT" in str(err.value)
    else:
        assert str(err.value).startswith("Rank 1 could not read its model files.") and err.value.hint == "Check the files."
    assert took < 90, took
    assert not multiprocessing.active_children()


def test_gpus_beyond_the_machine_are_refused(monkeypatch):
    from wan_lite.parallel.launch import check_gpus

    monkeypatch.setenv(BACKEND_ENV, "nccl")
    with pytest.raises(InputError, match="this machine has"):
        check_gpus(torch.cuda.device_count() + 1, None)
    with pytest.raises(InputError):
        check_gpus(0, None)
    from wan_lite.engine import Engine

    with pytest.raises(InputError, match="not a GPU count"):
        Engine(models_root=Path("."), output_dir=Path("."), device="cpu").generate(
            GenerateRequest(prompt="x", model="ti2v-5b", gpus=0))
    assert os.environ[BACKEND_ENV] == "nccl"


# ------------------------------------------------------------------------------- the planner
def test_plan_gpus_splits_one_job_and_runs_a_queue_one_job_per_gpu():
    from wan_lite.parallel.plan import plan_gpus, share_of_host
    from wan_lite.runtime.hardware import Hardware
    from wan_lite.runtime.planner import ModelFootprint, PlanRequest

    h100 = Hardware.fake(80, 512, (9, 0), gpu_name="NVIDIA H100 80GB HBM3")
    assert share_of_host(h100, 8).ram_total_gib == 64 and share_of_host(h100, 8).vram_total_gib == h100.vram_total_gib
    a14b = ModelFootprint.full_size("t2v-a14b")
    job = PlanRequest(1280, 720, 81, steps=40)
    split = plan_gpus(a14b, job, h100, 8)
    assert (split.mode, split.cfg, split.sp) == ("split", 2, 4) and split.per_gpu.fits
    assert "conditional and unconditional" in split.reason and "4 GPUs" in split.reason
    odd = plan_gpus(a14b, job, h100, 3)
    assert (odd.cfg, odd.sp) == (1, 3)
    no_cfg = plan_gpus(a14b, PlanRequest(1280, 720, 81, steps=4, cfg=False), h100, 4)
    assert (no_cfg.cfg, no_cfg.sp) == (1, 4)
    queue = plan_gpus(ModelFootprint.full_size("ti2v-5b"), PlanRequest(1280, 704, 121), h100, 4, jobs=8)
    assert queue.mode == "throughput" and "one job per GPU" in queue.reason and "2 job time" in queue.reason
    one = plan_gpus(a14b, job, h100, 1)
    assert one.mode == "one"
    # 4 ranks on a host with little RAM: each plans with a quarter of it
    small = Hardware.fake(24, 32, (8, 9), gpu_name="NVIDIA GeForce RTX 4090")
    tight = plan_gpus(a14b, job, small, 4)
    assert tight.per_gpu.hardware.ram_total_gib == 8


def _paced_engine(device: str, *, folder: Path, out: Path, where: str, pause_s: float):
    """A rank's engine whose rank 0 pauses (the model math untouched) where a cancel is to land, so
    one sent from the parent on a progress event has arrived by then however busy the machine:
    before each DiT call after the first ("steps": the ranks must agree), or before the decode
    ("decode": rank 0 goes on alone)."""
    import contextlib

    from wan_lite.engine import Engine

    engine = Engine(models_root=out, output_dir=out, device=device, folders={"t2v-a14b": folder})

    @contextlib.contextmanager
    def pace(pipe, job):
        def pause(info, call):
            if info.index >= 1:
                time.sleep(pause_s)
            return call()

        def decode_later(*args, **kwargs):
            time.sleep(pause_s)
            return decode(*args, **kwargs)

        decode = pipe.decode_frames
        if where == "steps":
            pipe.step_hooks.append(pause)  # before ParallelRun's hook: outside its agreement
        else:
            pipe.decode_frames = decode_later
        try:
            yield
        finally:
            if pause in pipe.step_hooks:
                pipe.step_hooks.remove(pause)
            pipe.decode_frames = decode

    engine.job_hooks.append(pace)
    return engine


@pytest.mark.parametrize("where", ["steps", "decode"])
def test_a_cancel_stops_every_rank_at_the_same_step_or_rank_0_in_its_decode(models, tmp_path, monkeypatch, where):
    """The user's cancel reaches the ranks as an event. During the denoise they agree on the step
    (a rank that stopped alone would leave the others waiting in an exchange); after it, rank 0
    decodes alone and stops there, keeping the latents. Either way the parent raises Cancelled,
    no video is written and nothing is left running."""
    import multiprocessing

    from wan_lite.api import CancelToken
    from wan_lite.errors import Cancelled
    from wan_lite.parallel.launch import spawn_job

    monkeypatch.setenv(BACKEND_ENV, "gloo")
    monkeypatch.setenv(TIMEOUT_ENV, "90")  # rank 1 waits in an exchange through rank 0's pause
    factory = functools.partial(_paced_engine, folder=models["t2v-a14b"], out=tmp_path, where=where, pause_s=3.0)
    request = GenerateRequest(prompt="x", model="t2v-a14b", seed=1, width=80, height=48, frames=9, steps=6)
    cancel = CancelToken()
    steps = []

    def progress(p):
        if p.stage in ("high_noise", "low_noise"):
            steps.append(p.step)
        if p.stage == ("decode" if where == "decode" else "high_noise"):
            cancel.cancel()

    with pytest.raises(Cancelled) as err:
        spawn_job(factory, request, 2, cfg=True, device="cpu", on_progress=progress, cancel=cancel)
    if where == "steps":
        assert steps == [1]  # the cancel sent after step 1 stopped both ranks before step 2's call
    else:
        assert steps[-1] == 6 and "the latents are kept in" in str(err.value)
        assert len(list(tmp_path.glob("*.latents.*"))) == 1
    assert not list(tmp_path.glob("*.mp4"))
    assert not multiprocessing.active_children()


@pytest.mark.slow
def test_torchrun_runs_the_cli_as_its_ranks(models, tmp_path):
    """`torchrun --nproc_per_node 2 -m wan_lite generate`: each process is a rank (nothing is
    spawned), rank 0 writes the video, the CLI ends well on both."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, **{BACKEND_ENV: "gloo", LOAD_TIMEOUT_ENV: "120", TIMEOUT_ENV: "60"})
    out = tmp_path / "fox.mp4"
    from wan_lite.parallel.launch import _free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "wan_lite", "generate", "--model-dir", str(models["ti2v-5b"]), "--prompt", "a fox", "--size", "96x64",
           "--frames", "9", "--steps", "2", "--seed", "5", "--device", "cpu", "--out", str(out)]
    run = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert out.is_file()
    record = json.loads(out.with_suffix(".json").read_text())
    assert any("Ran on 2 ranks (gloo" in n for n in record["notes"])


@pytest.mark.slow
def test_throughput_mode_runs_one_job_per_process_and_reports_each(models, tmp_path, monkeypatch):
    """Engine.generate_each: 3 jobs on 2 CPU processes (gloo switch), each job's own result, a
    failing job reported in its place while the others run."""
    from wan_lite.engine import Engine
    from wan_lite.output import load_latents

    monkeypatch.setenv(BACKEND_ENV, "gloo")
    engine = Engine(models_root=tmp_path / "m", output_dir=tmp_path / "out", device="cpu",
                    folders={"ti2v-5b": models["ti2v-5b"]})
    base = dict(model="ti2v-5b", width=64, height=64, frames=5, steps=2)
    bad = tmp_path / "broken_lora.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    requests = [GenerateRequest(prompt="a fox", seed=1, **base),
                GenerateRequest(prompt="a boat", seed=2, loras=(str(bad),), turbo=False, **base),
                GenerateRequest(prompt="a lamp", seed=3, **base)]
    done = []
    t0 = time.perf_counter()
    results = engine.generate_each(requests, 2, on_result=lambda i, r: done.append(i))
    print(f"3 jobs on 2 processes: {time.perf_counter() - t0:.1f} s")
    assert sorted(done) == [0, 1, 2]
    assert isinstance(results[1], WanLiteError) and "broken_lora" in str(results[1])
    assert [results[0].seed, results[2].seed] == [1, 3]
    assert results[0].video_path.is_file() and results[2].video_path.is_file()
    one = engine.generate(requests[2])
    a, _ = load_latents(one.latents_path)
    b, _ = load_latents(results[2].latents_path)
    assert torch.equal(a, b)


def test_an_interrupted_queue_leaves_no_process_running(models, tmp_path, monkeypatch):
    """Ctrl+C (here: raised from on_result at the first finished job) while jobs run one per
    process: the other process is ended, not left running its job."""
    import multiprocessing

    from wan_lite.engine import Engine

    monkeypatch.setenv(BACKEND_ENV, "gloo")
    engine = Engine(models_root=tmp_path / "m", output_dir=tmp_path / "out", device="cpu",
                    folders={"ti2v-5b": models["ti2v-5b"]})
    base = dict(model="ti2v-5b", width=64, height=64, frames=5)
    requests = [GenerateRequest(prompt="a fox", seed=1, steps=1, **base),
                GenerateRequest(prompt="a boat", seed=2, steps=100, **base)]  # still running when stopped

    def stop(i, result):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.generate_each(requests, 2, on_result=stop)
    assert not multiprocessing.active_children()


def test_a_rank_plans_with_its_share_of_the_ram_free_at_the_start():
    """A rank that plans after others loaded their weights still gets its share of what was free
    when the ranks started (read once, in init_group), not of what is free by then."""
    from dataclasses import replace

    from wan_lite.parallel.group import current_group
    from wan_lite.parallel.plan import rank_hardware
    from wan_lite.runtime.hardware import Hardware

    hw = Hardware.fake(80, 512, (9, 0), gpu_name="NVIDIA H100 80GB HBM3")
    assert rank_hardware(hw) == hw  # not a rank
    pg = init_group(0, 1, 0, cfg=True, backend_name="gloo", init_method=_free_init())
    try:
        assert current_group() is pg and pg.host_ram_available_gib > 0
        pg.host_ram_available_gib = 400.0  # as if read at start, on a 512 GiB host
        later = replace(hw, ram_available_gib=100.0)  # what a late probe sees
        assert rank_hardware(later).ram_available_gib == 400.0
    finally:
        leave_group()
    assert current_group() is None


def test_preflight_and_plan_split_a_job_over_gpus(models, tmp_path, capsys):
    """What `--gpus N` will use, before it runs: each rank's plan with its share of the RAM, the RAM
    of all of them, the split job's time (the denoise shared, the decode on rank 0); a count
    beyond this machine's GPUs does not fit and says so. `plan --gpus` prints the same."""
    from wan_lite.cli import main
    from wan_lite.engine import Engine
    from wan_lite.parallel.plan import SPLIT_EFFICIENCY

    engine = Engine(models_root=tmp_path, output_dir=tmp_path, device="cpu", folders={"ti2v-5b": models["ti2v-5b"]})
    request = GenerateRequest(prompt="x", model="ti2v-5b", width=96, height=64, frames=9, steps=4)
    one = engine.preflight(request)
    two = engine.preflight(GenerateRequest(**{**request.to_dict(), "gpus": 2}))
    split = two.plan["gpus"]
    assert (split["mode"], split["gpus"], split["cfg"], split["sp"]) == ("split", 2, 2, 1)
    assert two.fits and "One job over 2 GPUs" in two.summary
    assert two.peak_ram_gib == pytest.approx(2 * two.plan["peak_ram_gib"], abs=0.01)  # both ranks' RAM
    stages = dict(two.plan["stage_seconds"])
    assert two.seconds == pytest.approx(sum(stages.values()) - stages["denoise"]
                                        + stages["denoise"] / (2 * SPLIT_EFFICIENCY), abs=0.2)
    assert one.fits and "over" not in one.summary  # (on the CPU the ranks share its cores: no faster)
    # on GPUs (NCCL): more than the machine has is refused before anything starts
    gpu_engine = Engine(models_root=tmp_path, output_dir=tmp_path, device="cuda")
    many = gpu_engine.preflight(GenerateRequest(**{**request.to_dict(), "gpus": torch.cuda.device_count() + 1}))
    assert not many.fits and "this machine has" in many.reason
    # `plan --gpus 8`: a hypothetical 8-GPU host
    code = main(["plan", "--model", "t2v-a14b", "--size", "1280x720", "--frames", "81", "--vram-gb", "80",
                 "--ram-gb", "512", "--cc", "9.0", "--gpus", "8"])
    out = capsys.readouterr().out
    assert code == 0 and "GPUs:    One job over 8 GPUs" in out and "with 1/8 of the RAM" in out
    assert "a video over 8 GPUs" in out and "512.0 GiB RAM" in out
    assert main(["plan", "--model", "ti2v-5b", "--vram-gb", "80", "--ram-gb", "512", "--cc", "9.0",
                 "--gpus", "4", "--jobs", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["gpus"]["mode"] == "throughput" and data["gpus"]["jobs"] == 8
