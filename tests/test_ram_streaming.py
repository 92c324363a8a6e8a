"""Blocks streamed from disk (issue 21, item 3): a plan with blocks_from "disk" keeps no copy of
a DiT in RAM (its blocks are read from the converted-weights cache each forward, the rest when
it runs) and gives the RAM-streamed plan's video bit for bit, for all three models, on the CPU."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from PIL import Image

from wan_lite.pipeline import WanPipeline
from wan_lite.registry import MODELS
from wan_lite.runtime import streaming
from wan_lite.runtime.hardware import Hardware
from wan_lite.runtime.planner import ModelFootprint, PlanRequest, plan

SMALL = dict(width=64, height=64, frames=9, steps=3)


def tiny_plan(name: str, cfg, **force):
    spec = MODELS[name]
    fp = ModelFootprint.from_config(cfg, name=name, vae_version=spec.vae_version, experts=len(spec.dits))
    p = plan(fp, PlanRequest(64, 64, 9, steps=3, image=name.startswith("i2v")), Hardware.fake(vram_gb=4, ram_gb=16))
    return replace(p, **force)


@pytest.mark.parametrize("name", ["ti2v-5b", "t2v-a14b", "i2v-a14b"])
def test_disk_streamed_equals_ram_streamed(tiny_models, tmp_path, name):
    image = tmp_path / "in.png"
    Image.new("RGB", (56, 40), (200, 120, 40)).save(image)
    kw = dict(SMALL, image=str(image)) if name.startswith("i2v") else SMALL
    cfg = WanPipeline.load(tiny_models[name]).dit.config
    common = dict(quantization="bf16", resident_blocks=1, prefetch=1, text_encoder="cpu", text_encoder_quant="bf16",
                  vae_tile=None, cfg_batch=False, keep_resident=False)
    runs, seen = {}, {}
    for where in ("ram", "disk"):
        p = tiny_plan(name, cfg, **common, blocks_from=where, keep_text_encoder=where == "ram",
                      idle_expert="disk" if len(MODELS[name].dits) > 1 else "none")
        pipe = WanPipeline.load_planned(tiny_models[name], p, device="cpu", cache_dir=tmp_path / "cache")
        placed = []

        def hook(info, call, pipe=pipe, placed=placed):
            dit = pipe.dits[info.expert] if info.expert in pipe.dits else next(iter(pipe.dits.values()))
            s = streaming.streamer_of(dit)
            placed.append((s.source is not None, sum(getattr(b, "cpu", torch.empty(0)).numel()
                                                      for b in s._packed)))
            return call()

        pipe.step_hooks.append(hook)
        if where == "disk":
            assert all(streaming.where_is(d) == "disk" for d in pipe.dits.values())  # nothing read yet
            assert streaming.where_is(pipe.text_encoder.model) == "disk"
            # umT5 (a .pth) is read again from its safetensors conversion in the cache
            t5_source, _ = streaming.expert_source(pipe.text_encoder.model)
            assert t5_source.files[0].parent == tmp_path / "cache" and t5_source.files[0].suffix == ".safetensors"
        runs[where] = pipe.generate("a boat at dawn", seed=3, **kw)
        seen[where] = placed
        if where == "disk":  # after the job nothing of the DiTs or the text encoder stays in RAM
            assert all(streaming.where_is(d) == "disk" for d in pipe.dits.values())
            assert streaming.where_is(pipe.text_encoder.model) == "disk"
    assert all(src and packed == 0 for src, packed in seen["disk"]) and seen["disk"]
    assert all(not src and packed > 0 for src, packed in seen["ram"])
    assert torch.equal(runs["disk"].latents, runs["ram"].latents)
    assert (runs["disk"].frames == runs["ram"].frames).all()


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4"])
def test_disk_streamed_quantized_equals_ram_streamed(tiny_models, tmp_path, fmt):
    """The streamer reads the quantized cache's exact tensors: int8 / fp8 / int4 blocks from disk
    are the RAM ones."""
    from wan_lite.loading.components import resolve_sources
    from wan_lite.runtime.loader import load_dit

    _spec, sources, _tok = resolve_sources(tiny_models["t2v-a14b"], {}, None)
    ram, _ = load_dit(sources["dit_high"], quantization=fmt, cache_dir=tmp_path)
    disk, src = load_dit(sources["dit_high"], quantization=fmt, cache_dir=tmp_path, on_disk=True)
    assert streaming.where_is(disk) == "disk"
    g = torch.Generator().manual_seed(0)
    c = ram.config
    x = torch.randn(1, c.in_dim, 3, 8, 8, generator=g)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 512, c.text_dim, generator=g)
    outs = []
    for model, source in ((ram, None), (disk, src)):
        s = streaming.attach(model, "cpu", resident=0, prefetch=1, source=source)
        with torch.inference_mode():
            outs.append(model(x, t, ctx))
            outs.append(model(x, t, ctx))  # the second forward re-reads every block
        s.detach()
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])


@pytest.mark.gpu
@pytest.mark.parametrize("prefetch", [1, 2])
def test_cuda_disk_streamed_equals_ram_streamed(tiny_models, tmp_path, prefetch):
    """The CUDA path: the reader thread fills page-locked staging, the side stream copies it."""
    from wan_lite.loading.components import resolve_sources
    from wan_lite.runtime.loader import load_dit

    _spec, sources, _tok = resolve_sources(tiny_models["t2v-a14b"], {}, None)
    g = torch.Generator().manual_seed(0)
    outs = []
    for on_disk in (False, True):
        model, src = load_dit(sources["dit_high"], quantization="fp8", cache_dir=tmp_path, on_disk=on_disk)
        c = model.config
        x = torch.randn(1, c.in_dim, 3, 8, 8, generator=g.manual_seed(0)).cuda()
        ctx = torch.randn(1, 512, c.text_dim, generator=g).cuda()
        s = streaming.attach(model, "cuda", resident=0, prefetch=prefetch, source=src if on_disk else None)
        with torch.inference_mode():
            outs.append([model(x, torch.tensor([500.0], device="cuda"), ctx) for _ in range(3)])
        s.detach()
    assert all(torch.equal(a, b) for a, b in zip(outs[0], outs[1], strict=True))
