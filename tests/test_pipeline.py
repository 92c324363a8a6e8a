"""End to end on the CPU with the three tiny models: API and CLI, t2v and i2v."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import wan_lite
import wan_lite.errors
from wan_lite.errors import InputError
from wan_lite.output import read_mp4, read_mp4_metadata

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(width=64, height=64, frames=9, steps=3)


@pytest.fixture(scope="module")
def pipes(tiny_models):
    return {name: wan_lite.load_pipeline(folder) for name, folder in tiny_models.items()}


@pytest.mark.parametrize("name", ["ti2v-5b", "t2v-a14b"])
def test_text_to_video_same_seed_same_frames(pipes, name):
    pipe = pipes[name]
    a = pipe.generate("a red fox in the snow", seed=123, **SMALL)
    b = pipe.generate("a red fox in the snow", seed=123, **SMALL)
    c = pipe.generate("a red fox in the snow", seed=124, **SMALL)
    assert a.frames.shape == (9, 64, 64, 3) and a.frames.dtype == np.uint8
    assert a.fps == pipe.spec.fps and a.seed == 123
    assert np.array_equal(a.frames, b.frames) and torch.equal(a.latents, b.latents)
    assert not torch.equal(a.latents, c.latents)
    z = pipe.spec.z_dim
    s = pipe.spec.vae_stride[1]
    assert a.latents.shape == (z, 3, 64 // s, 64 // s)
    assert a.timings["decode"] > 0 and a.timings["text"] >= 0


def test_a14b_switches_expert_at_the_boundary(pipes):
    pipe = pipes["t2v-a14b"]
    calls = []
    for role, dit in pipe.dits.items():
        dit.register_forward_hook(lambda m, a, o, role=role: calls.append((role, int(a[1].flatten()[0]))))
    try:
        pipe.generate("a boat", seed=1, width=32, height=32, frames=5, steps=40)
    finally:
        for dit in pipe.dits.values():
            dit._forward_hooks.clear()
    highs = [t for role, t in calls if role == "high"]
    lows = [t for role, t in calls if role == "low"]
    assert len(highs) == 2 * 26 and len(lows) == 2 * 14  # cond + uncond per step
    assert min(highs) >= 875 > max(lows)


def test_ti2v_image_to_video_holds_the_first_latent_frame(pipes, image_file):
    pipe = pipes["ti2v-5b"]
    seen = []
    hook = pipe.dit.register_forward_hook(lambda m, a, o: seen.append(a[1].clone()))
    try:
        r = pipe.generate("the fox turns its head", image=str(image_file), seed=5, width=64, height=64, frames=9, steps=3)
    finally:
        hook.remove()
    # best_output_size for a 56x40 image at area 64*64 with 32-px granularity
    assert r.frames.shape[1:3] == (64, 64) or r.frames.shape[1:3] == (32, 96) or r.frames.shape[0] == 9
    t = seen[0]
    tokens_per_frame = (r.latents.shape[2] // 2) * (r.latents.shape[3] // 2)
    assert t.shape[-1] == r.latents.shape[1] * tokens_per_frame
    assert torch.all(t[:, :tokens_per_frame] == 0) and torch.all(t[:, tokens_per_frame:] == 999)
    z0 = pipe.vae_encode(torch.zeros(3, 1, r.frames.shape[1], r.frames.shape[2]))  # shape only
    assert r.latents[:, :1].shape == z0.shape


def test_i2v_a14b_feeds_mask_and_image_latent(pipes, image_file):
    pipe = pipes["i2v-a14b"]
    ys = []
    hook = pipe.dits["high"].register_forward_hook(lambda m, a, kw, o: ys.append(kw["y"]), with_kwargs=True)
    try:
        r = pipe.generate("the waves roll in", image=str(image_file), seed=3, **SMALL)
    finally:
        hook.remove()
    y = ys[0]
    assert y.shape[1] == 20
    assert torch.all(y[0, :4, 0] == 1) and torch.all(y[0, :4, 1:] == 0)
    assert r.frames.shape[0] == 9


def test_bad_input_is_refused_clearly(pipes, tmp_path):
    pipe = pipes["ti2v-5b"]
    with pytest.raises(InputError, match="prompt is empty"):
        pipe.generate("   ", **SMALL)
    bogus = tmp_path / "photo.png"
    bogus.write_bytes(b"this is not an image")
    with pytest.raises(InputError, match="Cannot read .*photo.png as an image"):
        pipe.generate("x", image=str(bogus), **SMALL)
    with pytest.raises(InputError, match="give a start image"):
        pipes["i2v-a14b"].generate("x", **SMALL)
    r = pipe.generate("x", width=70, height=60, frames=10, steps=1, seed=0)
    assert r.frames.shape == (9, 64, 64, 3)
    assert any("multiple of 32" in n for n in r.notes) and any("4n+1" in n for n in r.notes)


def test_prompt_embeddings_are_cached(pipes):
    pipe = pipes["ti2v-5b"]
    calls = []
    original = pipe.text_encoder.encode
    pipe.text_encoder.encode = lambda texts: calls.append(list(texts)) or original(texts)
    try:
        pipe.generate("a cached prompt", seed=1, **SMALL)
        pipe.generate("a cached prompt", seed=2, **SMALL)
    finally:
        pipe.text_encoder.encode = original
    assert sum(len(c) for c in calls) <= 2  # prompt (and at most the negative prompt) once


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wan_lite", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_cli_generate_decode_info(tiny_models, image_file, tmp_path):
    out = tmp_path / "fox.mp4"
    r = _cli("generate", "--model-dir", str(tiny_models["ti2v-5b"]), "--prompt", "一只狐狸 in snow",
             "--size", "64x64", "--frames", "9", "--steps", "2", "--seed", "42", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "seed:    42" in r.stdout and "Denoising" in r.stderr
    frames, fps = read_mp4(out)
    assert frames.shape == (9, 64, 64, 3) and fps == 24
    meta = read_mp4_metadata(out)
    assert meta["settings"]["prompt"] == "一只狐狸 in snow" and meta["settings"]["seed"] == 42
    sidecar = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert sidecar["settings"]["steps"] == 2 and "denoise" in sidecar["settings"]["timings"]
    latents = tmp_path / "fox.latents.safetensors"
    assert latents.is_file()

    again = tmp_path / "again.mp4"
    r = _cli("decode", str(latents), "--out", str(again))
    assert r.returncode == 0, r.stderr
    frames2, _ = read_mp4(again)
    assert np.array_equal(frames, frames2)

    r = _cli("generate", "--model-dir", str(tiny_models["i2v-a14b"]), "--prompt", "waves", "--image",
             str(image_file), "--size", "64x64", "--frames", "5", "--steps", "2", "--out", str(tmp_path / "i2v.mp4"))
    assert r.returncode == 0, r.stderr
    frames, fps = read_mp4(tmp_path / "i2v.mp4")
    assert frames.shape[0] == 5 and fps == 16

    r = _cli("info", "--model-dir", str(tiny_models["t2v-a14b"]))
    assert r.returncode == 0 and "installed" in r.stdout and "high_noise_model" in r.stdout


def test_cli_user_mistakes_get_messages_not_tracebacks(tiny_models, tmp_path):
    r = _cli("generate", "--model-dir", str(tmp_path / "nowhere"), "--prompt", "x")
    assert r.returncode == 2 and "Model folder not found" in r.stderr and "Traceback" not in r.stderr
    r = _cli("generate", "--model-dir", str(tiny_models["ti2v-5b"]), "--prompt", "")
    assert r.returncode == 2 and "prompt is empty" in r.stderr and "Traceback" not in r.stderr
    r = _cli("generate", "--model-dir", str(tiny_models["ti2v-5b"]), "--prompt", "x", "--size", "big")
    assert r.returncode == 2 and "size must look like" in r.stderr
    r = _cli("decode", str(tmp_path / "missing.latents.safetensors"))
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_components_from_elsewhere_replace_parts_of_the_folder(tiny_models, pipes, tmp_path):
    """A VAE kept elsewhere (and absent from the folder) gives the same video as the full folder."""
    import shutil

    folder = tmp_path / "ti2v"
    shutil.copytree(tiny_models["ti2v-5b"], folder)
    vae = tmp_path / "elsewhere" / "wan2.2_vae.pth"
    vae.parent.mkdir()
    (folder / "Wan2.2_VAE.pth").rename(vae)
    pipe = wan_lite.load_pipeline(folder, components={"vae": vae})
    a = pipe.generate("a lamp", seed=9, **SMALL)
    b = pipes["ti2v-5b"].generate("a lamp", seed=9, **SMALL)
    assert np.array_equal(a.frames, b.frames)
    with pytest.raises(wan_lite.errors.CheckpointError, match=r"Missing file: .*Wan2\.2_VAE\.pth"):
        wan_lite.load_pipeline(folder)


def test_frames_made_in_chunks_where_the_video_is_equal_the_whole_video_conversion():
    """video_to_frames converts a few frames at a time (on the GPU, where an untiled decode leaves
    the video, a quarter of the bytes then cross to the CPU): the same uint8 frames as the
    official whole-video truncation, values at the rounding edges included."""
    from wan_lite.runtime.vae_frames import video_to_frames

    gen = torch.Generator().manual_seed(0)
    video = torch.rand(3, 37, 8, 6, generator=gen) * 2.4 - 1.2
    video[0, 0, 0, :5] = torch.tensor([-1.0, 1.0, 1 / 255 * 2 - 1, 0.0, -0.9921568632125854])
    whole = ((video.float().clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8).permute(1, 2, 3, 0).numpy()
    for chunk in (1, 5, 16, 64):
        assert (video_to_frames(video, chunk) == whole).all()
