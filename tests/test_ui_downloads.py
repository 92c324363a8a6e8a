"""Model downloads: only the needed files, and a plain refusal when the disk is too small."""

from __future__ import annotations

from fnmatch import fnmatch

import pytest

from tests.e2e.fake_engine import FakeEngine
from wan_lite.registry import get_spec
from wan_lite.ui import downloads, models_panel
from wan_lite.ui.downloads import DownloadError, allow_patterns, check_space, folder_bytes, plan_download

TI2V_REPO = ["config.json", "diffusion_pytorch_model-00001-of-00003.safetensors",
             "diffusion_pytorch_model.safetensors.index.json", "Wan2.2_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth",
             "google/umt5-xxl/spiece.model", "google/umt5-xxl/tokenizer.json", "README.md", "assets/logo.png",
             "examples/i2v_input.JPG", ".gitattributes"]
A14B_REPO = ["high_noise_model/config.json", "high_noise_model/diffusion_pytorch_model-00001-of-00006.safetensors",
             "low_noise_model/diffusion_pytorch_model.safetensors.index.json", "Wan2.1_VAE.pth",
             "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/tokenizer_config.json", "assets/moe.png",
             "README.md", "configuration.json"]


def _selected(files, patterns):
    return {f for f in files if any(fnmatch(f, p) for p in patterns)}


def test_allow_patterns_select_only_what_wan_lite_reads():
    five = _selected(TI2V_REPO, allow_patterns(get_spec("ti2v-5b")))
    assert five == set(TI2V_REPO) - {"README.md", "assets/logo.png", "examples/i2v_input.JPG", ".gitattributes"}
    a14b = _selected(A14B_REPO, allow_patterns(get_spec("i2v-a14b")))
    assert a14b == set(A14B_REPO) - {"assets/moe.png", "README.md", "configuration.json"}
    assert "Wan2.2_VAE.pth" not in _selected(["Wan2.2_VAE.pth"], allow_patterns(get_spec("t2v-a14b")))


def test_disk_check_refuses_up_front_in_plain_words(tmp_path):
    gb = 10**9
    plan = plan_download([("a", 20 * gb, True), ("b", 14 * gb, False), ("c", None, True)], free_bytes=10 * gb)
    assert (plan.total_bytes, plan.missing_bytes, plan.files) == (34 * gb, 20 * gb, 3) and not plan.fits
    with pytest.raises(DownloadError, match=r"needs 20.0 GB .* only 10.0 GB is free") as err:
        check_space(plan, tmp_path)
    assert "--models-dir" in str(err.value)
    check_space(plan_download([("a", gb, True)], free_bytes=4 * gb), tmp_path)  # fits: no error


def test_folder_bytes_counts_partial_downloads(tmp_path):
    partial = tmp_path / ".cache" / "huggingface" / "download"
    partial.mkdir(parents=True)
    (partial / "x.incomplete").write_bytes(b"1" * 300)
    (tmp_path / "done.bin").write_bytes(b"1" * 200)
    assert folder_bytes(tmp_path) == 500 and folder_bytes(tmp_path / "none") == 0


def test_models_panel_lists_state_size_folder_and_repo(tmp_path):
    engine = FakeEngine(tmp_path / "models", tmp_path / "out")
    folder = engine.model_folder("ti2v-5b")
    folder.mkdir(parents=True)
    (folder / "Wan2.2_VAE.pth").write_bytes(b"0" * 2_500_000)
    rows, note = models_panel.statuses(engine)
    text = models_panel.status_markdown(rows, note)
    assert "✅ installed" in text and "2.5 MB" in text and str(folder) in text
    assert "Hugging Face `Wan-AI/Wan2.2-T2V-A14B` — use Download below" in text
    assert "- **t2v-a14b**: Wan2.1_VAE.pth: not found" in text  # a missing model names what is missing
    rows[1].problems.append(rows[1].missing[0])
    assert models_panel.status_markdown(rows).count("Wan2.1_VAE.pth: not found") == 2  # once per model
    assert "⬇️ missing" in text


def test_models_panel_survives_an_engine_that_cannot_tell(tmp_path):
    class Unfinished(FakeEngine):
        def model_status(self):
            raise NotImplementedError

    rows, note = models_panel.statuses(Unfinished(tmp_path, tmp_path))
    assert [r.state for r in rows] == ["unknown"] * 3 and "not finished yet" in note
    assert "❔ not checked" in models_panel.status_markdown(rows, note)


def test_download_errors_end_in_a_readable_line(tmp_path, monkeypatch):
    engine = FakeEngine(tmp_path / "models", tmp_path / "out")

    def refuse(spec, folder, token=None, others=()):
        raise DownloadError("Not enough disk space: the download needs 34.2 GB.", "Free some space.")

    monkeypatch.setattr(models_panel, "start_download", refuse)
    lines = list(models_panel.download_events(engine, "ti2v-5b"))
    assert lines[0].startswith("Checking") and lines[-1].startswith("⛔ Not enough disk space")
    assert downloads.human_bytes(34_200_000_000) == "34.2 GB"
