"""Loading from the official layout: folder recognition, clear errors, and the RAM bound."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.tiny_ckpt.dit import write_dit
from wan_lite.errors import CheckpointError
from wan_lite.loading.layout import detect_spec, find_model, inspect_folder
from wan_lite.loading.tensors import SafetensorsSource, open_source

ROOT = Path(__file__).resolve().parents[1]


def test_folders_are_recognised_by_their_files(tiny_models):
    for name, folder in tiny_models.items():
        assert detect_spec(folder).name == name
        files = find_model(folder)
        assert set(files.dit) == ({"main"} if name == "ti2v-5b" else {"high", "low"})
        assert all(len(shards) == 2 for shards in files.dit.values())
        assert inspect_folder(folder).state == "installed"


def test_missing_files_are_named(tiny_models, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_models["ti2v-5b"], folder)
    (folder / "Wan2.2_VAE.pth").unlink()
    with pytest.raises(CheckpointError, match=r"Missing file: .*Wan2\.2_VAE\.pth"):
        find_model(folder)
    report = inspect_folder(folder)
    assert report.state == "partial" and "Wan2.2_VAE.pth" in report.problems[0]
    shard = next(folder.glob("diffusion_pytorch_model-00002-*.safetensors"))
    shard.unlink()
    with pytest.raises(CheckpointError, match="1 of 2 shard"):
        find_model(folder)


def test_wrong_vae_version_is_explained(tiny_models, tmp_path):
    import shutil

    import wan_lite

    folder = tmp_path / "m"
    shutil.copytree(tiny_models["ti2v-5b"], folder)
    shutil.copy(tiny_models["t2v-a14b"] / "Wan2.1_VAE.pth", folder / "Wan2.2_VAE.pth")
    with pytest.raises(CheckpointError, match=r"Wan 2\.1 VAE, but ti2v-5b needs the Wan 2\.2 VAE"):
        wan_lite.load_pipeline(folder)


def test_truncated_and_corrupt_files_name_the_file(tiny_models, tmp_path):
    shard = next(tiny_models["ti2v-5b"].glob("diffusion_pytorch_model-00001-*.safetensors"))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors is truncated"):
        SafetensorsSource([cut])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 3 + b"not a model" * 10)
    with pytest.raises(CheckpointError, match=r"junk\.safetensors is not a readable safetensors file"):
        SafetensorsSource([junk])
    bad_pth = tmp_path / "Wan2.2_VAE.pth"
    bad_pth.write_bytes((tiny_models["ti2v-5b"] / "Wan2.2_VAE.pth").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"Wan2\.2_VAE\.pth is not a readable PyTorch checkpoint"):
        open_source(bad_pth)


def test_pth_loading_never_runs_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        open_source(path)


def test_safetensors_reads_cast_on_the_way(tmp_path):
    state = write_dit(tmp_path, in_dim=16, out_dim=16, dim=128, ffn_dim=256, model_type="t2v")
    source = SafetensorsSource(sorted(tmp_path.glob("*.safetensors")))
    for name, ref in state.items():
        assert source.shape(name) == tuple(ref.shape)
        assert torch.equal(source.read(name), ref)
        assert torch.equal(source.read(name, torch.bfloat16), ref.to(torch.bfloat16))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_loading_fp32_dit_as_bf16_stays_under_1_3x_of_bf16_size(tmp_path):
    """Peak RSS growth while loading a float32 checkpoint into a bfloat16 model (measured in a
    fresh process) stays under 1.3x the bfloat16 model: no full float32 copy is ever held."""
    state = write_dit(tmp_path, in_dim=48, out_dim=48, dim=768, ffn_dim=3072, num_layers=4, shards=3)
    bf16_bytes = sum(t.numel() * 2 for t in state.values())
    del state
    script = textwrap.dedent(f"""
        import json
        from pathlib import Path
        import torch
        from wan_lite.loading.tensors import SafetensorsSource
        from wan_lite.loading.build import build_dit

        def hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024

        folder = Path({str(tmp_path)!r})
        source = SafetensorsSource(sorted(folder.glob("*.safetensors")))
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
        base = hwm()
        model = build_dit(source, torch.bfloat16)
        print(json.dumps({{"base": base, "peak": hwm()}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    growth = m["peak"] - m["base"]
    assert growth > 0.9 * bf16_bytes, "the model was not materialised: the measurement is meaningless"
    assert growth < 1.3 * bf16_bytes, f"peak grew by {growth / 1e6:.1f} MB for a {bf16_bytes / 1e6:.1f} MB bf16 model"
