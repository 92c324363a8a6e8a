"""Issue 22, item 4: the page's rough edges as a new user meets them, checked on the handlers with
the real Engine (an empty models folder, or tiny checkpoints in the official layout)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from wan_lite.engine import Engine
from wan_lite.ui import form, models_panel
from wan_lite.ui.handlers import (
    AppUI,
    apply_bundle,
    estimate_updates,
    first_run_hint,
    model_menu,
    snap_frames_box,
    snap_size_box,
    undo_bundle,
)
from wan_lite.ui.jobs import JobManager
from wan_lite.ui.presets import BUILTIN_DIR, load_presets
from wan_lite.ui.settings import SettingsStore


@pytest.fixture(scope="module")
def presets():
    return load_presets(BUILTIN_DIR, None)


def _ui(tmp_path: Path, presets) -> AppUI:
    engine = Engine(tmp_path / "models", tmp_path / "out", device="cpu")
    return AppUI(engine, presets, SettingsStore(tmp_path / "settings.json"), tmp_path / "up",
                 JobManager(engine, tmp_path / "queue.json"))


def test_first_run_without_models_points_to_the_models_tab(tmp_path, presets, tiny_models):
    ui = _ui(tmp_path, presets)
    values = form.default_values()
    text = estimate_updates(ui, values)["estimate"]
    assert "Fits this computer" not in text and "Models** tab" in text
    hint = first_run_hint(ui)
    assert "Models" in hint and "download" in hint
    menu = dict((name, label) for label, name in model_menu(ui))
    assert all("not downloaded" in label for label in menu.values())
    # The Models tab names a missing folder once (its row), not again in the problem list.
    rows, note = models_panel.statuses(ui.engine)
    table = models_panel.status_markdown(rows, note)
    for r in rows:
        assert table.count(str(r.folder)) == 1, table
    # Once a model is there, the hint goes and the menu no longer marks that model.
    shutil.copytree(tiny_models["ti2v-5b"], ui.engine.model_folder("ti2v-5b"))
    menu = dict((name, label) for label, name in model_menu(ui, refresh=True))
    assert "not downloaded" not in menu["ti2v-5b"] and "not downloaded" in menu["t2v-a14b"]
    assert first_run_hint(ui) == ""
    assert "Models** tab" not in estimate_updates(ui, values)["estimate"]


def test_the_estimate_is_plain_words_with_units(tmp_path, presets, tiny_models):
    ui = _ui(tmp_path, presets)
    shutil.copytree(tiny_models["ti2v-5b"], ui.engine.model_folder("ti2v-5b"))
    values = form.default_values()
    text = estimate_updates(ui, values)["estimate"]
    assert not re.search(r"\b\d+:\d\d\b", text), text  # no bare 24:44 (minutes or hours?)
    assert re.search(r"\*\*\d+ (s|min|h)( \d+ min)?\*\*", text), text
    assert re.search(r"\d GB\*\* of RAM", text), text
    for jargon in ("blocks resident", "chunks of", "tokens", "untiled", "bf16", "GiB", "VRAM"):
        assert jargon not in text, (jargon, text)
    # This machine has no GPU (device="cpu"): the estimate says so, as the CLI does.
    assert "No GPU found" in text
    # A memory profile describes another computer: never "this computer".
    profiled = estimate_updates(ui, {**values, "memory_profile": "08gb-vram-32gb-ram"})["estimate"]
    assert "this computer" not in profiled.split("\n")[2] and "memory profile" in profiled
    assert "Fits this computer" not in profiled


def test_typed_sizes_and_frame_counts_are_snapped_in_their_box():
    out = snap_size_box("ti2v-5b", "1000x1000")["size"]
    assert out["value"] == "992x992" and "multiples of 32" in out["info"]
    assert snap_size_box("ti2v-5b", "1280x704")["size"]["value"] == "1280x704"
    assert "⛔" in snap_size_box("ti2v-5b", "big")["size"]["info"]
    frames = snap_frames_box("ti2v-5b", 8)["frames"]
    assert frames["value"] == 9 and "4n+1" in frames["info"]
    assert snap_frames_box("ti2v-5b", 49)["frames"]["value"] == 49


def test_a_preset_bundle_shows_its_description_and_can_be_undone(tmp_path, presets):
    ui = _ui(tmp_path, presets)
    mine = form.split_terms(["lens.telephoto", "time_of_day.dawn"], presets)
    out = apply_bundle(ui, "Golden hour portrait", "Documentary", mine)
    assert out[form.term_widget("time_of_day")] == ["time_of_day.sunset"]
    assert "Warm, backlit close-up at sunset." in out["bundle_note"] and out["bundle_undo"]["visible"]
    back = undo_bundle(ui, out["bundle_before"])
    assert back[form.term_widget("lens")] == ["lens.telephoto"] and back["style"] == "Documentary"
    assert back[form.term_widget("time_of_day")] == ["time_of_day.dawn"] and not back["bundle_undo"]["visible"]


def test_the_bundle_menu_has_no_blank_first_option(tmp_path, presets, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "up"))
    from tests.e2e.fake_engine import FakeEngine
    from wan_lite.ui.app import build_ui

    ui = build_ui(FakeEngine(tmp_path / "models", tmp_path / "out"), tmp_path / "up", presets=presets)
    choices = [c[1] if isinstance(c, tuple) else c for c in ui.w["bundle"].choices]
    assert choices and "" not in choices


def test_launch_hides_gradios_share_tip_and_prints_our_address(tmp_path, capsys):
    from wan_lite.ui.app import JS, launch

    seen = {}

    class Demo:
        local_url = "http://127.0.0.1:7860/"

        def queue(self, **kwargs):
            pass

        def launch(self, **kwargs):
            seen.update(kwargs)

    ui = type("UI", (), {"demo": Demo(), "upload_dir": tmp_path})()
    launch(ui, host="127.0.0.1", port=7860, share=False, open_browser=False, output_dir=tmp_path, block=False)
    out = capsys.readouterr().out
    assert seen["quiet"] is True and "share=True" not in out and "http://127.0.0.1:7860/" in out and "--share" in out
    assert "Enter" in seen["js"] == JS and "#wl-generate" in JS


# ------------------------------------------------------------------------------- Models tab


def test_models_tab_shows_download_sizes_and_shares_the_common_parts(tmp_path, tiny_models):
    from wan_lite.registry import get_spec
    from wan_lite.ui import downloads

    engine = Engine(tmp_path / "models", tmp_path / "out", device="cpu")
    rows, note = models_panel.statuses(engine)
    table = models_panel.status_markdown(rows, note)
    assert "| Download |" in table and "34.2 GB" in table and "126.2 GB" in table
    # TI2V-5B downloaded: the A14B models need its umT5 and tokenizer no more.
    five = engine.model_folder("ti2v-5b")
    shutil.copytree(tiny_models["ti2v-5b"], five)
    rows, note = models_panel.statuses(engine)
    table = models_panel.status_markdown(rows, note)
    assert "umT5, tokenizer shared with another model" in table, table
    spec = get_spec("t2v-a14b")
    folder = engine.model_folder("t2v-a14b")
    shared = downloads.share_parts(spec, folder, [five])
    assert set(shared) == {spec.t5_file, spec.tokenizer_dir}
    t5 = folder / spec.t5_file
    assert t5.stat().st_ino == (five / spec.t5_file).stat().st_ino  # one copy on disk
    patterns = downloads.allow_patterns(spec, skip=shared)
    assert spec.t5_file not in patterns and f"{spec.tokenizer_dir}/*" not in patterns and spec.vae_file in patterns


def test_download_errors_show_no_library_exception_text(tmp_path, monkeypatch):
    import huggingface_hub

    from wan_lite.registry import get_spec
    from wan_lite.ui import downloads

    class DryRunError(Exception):
        pass

    def fail(*args, **kwargs):
        raise DryRunError("dry_run is not supported by this version")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(downloads.DownloadError) as err:
        downloads.start_download(get_spec("ti2v-5b"), tmp_path / "m")
    assert "DryRunError" not in str(err.value) and "dry_run" not in str(err.value)
    assert "Hugging Face" in str(err.value)
    # The dry run (sizes and the disk check before a download) needs huggingface_hub 1.0.
    assert downloads.hub_version_problem("0.26.2") and downloads.hub_version_problem("1.0.0") is None
    req = (Path(__file__).resolve().parents[1] / "requirements.txt").read_text()
    assert re.search(r"^huggingface_hub>=1\.0\b", req, re.M)


def test_a_model_folder_with_another_name_is_found(tmp_path, tiny_models):
    engine = Engine(tmp_path / "models", tmp_path / "out", device="cpu")
    mine = tmp_path / "models" / "my wan 5b"
    shutil.copytree(tiny_models["ti2v-5b"], mine)
    state = {s.name: (s.state, s.folder) for s in engine.model_status()}
    assert state["ti2v-5b"] == ("installed", mine) and state["t2v-a14b"][0] == "missing"
    assert engine.model_folder("ti2v-5b") == mine


# ------------------------------------------------------------------------------ remembered files


def _experts(folder: Path):
    """The high- and low-noise experts of one release: same tensor names, shapes and dtypes (so
    the same header and size), different weights."""
    from tests.tiny_ckpt.dit import official_dit_shapes, random_dit_state
    from tests.tiny_ckpt.formats import write_comfy

    shapes = official_dit_shapes(in_dim=16, out_dim=16, dim=256, ffn_dim=512, num_layers=2, text_dim=256)
    high = write_comfy(folder / "wan2.2_t2v_high_noise_14B_fp16.safetensors", random_dit_state(shapes, 1))
    low = write_comfy(folder / "wan2.2_t2v_low_noise_14B_fp16.safetensors", random_dit_state(shapes, 2))
    return high, low


def test_remembered_experts_never_land_in_the_wrong_slot(tmp_path):
    from wan_lite.loading import discovery

    high, low = _experts(tmp_path / "comfy" / "diffusion_models")
    found = discovery.scan([("comfyui", tmp_path / "comfy")])
    by_path = {f.component.path: f.component for f in found}
    assert by_path[high].fingerprint != by_path[low].fingerprint  # same header and size, other data
    assert not discovery.find_copies(found)  # not "the same file in 2 places"
    choices = discovery.RememberedChoices(tmp_path / "choices.json")
    choices.choose("t2v-a14b", "dit_high", by_path[high])
    choices.choose("t2v-a14b", "dit_low", by_path[low])
    choices.save()
    assert choices.resolve("t2v-a14b") == {"dit_high": high, "dit_low": low}
    # The pair moves (new names that no longer say which is which): each slot finds its own file.
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    new_high, new_low = moved / "a.safetensors", moved / "b.safetensors"
    shutil.move(high, new_high)
    shutil.move(low, new_low)
    again = discovery.RememberedChoices(tmp_path / "choices.json")
    assert again.resolve("t2v-a14b", discovery.scan([("user", moved)])) == {"dit_high": new_high, "dit_low": new_low}
    # Swapped in place by renaming: each slot still follows its own file, never the other's.
    shutil.move(new_high, moved / "tmp.safetensors")
    shutil.move(new_low, new_high)
    shutil.move(moved / "tmp.safetensors", new_low)
    chosen = discovery.RememberedChoices(tmp_path / "choices.json")
    chosen.choose("t2v-a14b", "dit_high", discovery.detect(new_low)[0])
    chosen.choose("t2v-a14b", "dit_low", discovery.detect(new_high)[0])
    assert chosen.resolve("t2v-a14b", discovery.scan([("user", moved)])) == {"dit_high": new_low, "dit_low": new_high}


# ------------------------------------------------------------------------------ image-to-video


def _picture(path: Path, size: tuple[int, int]) -> str:
    from PIL import Image

    Image.new("RGB", size, (40, 90, 160)).save(path)
    return str(path)


def test_image_to_video_says_what_the_image_changes(tmp_path, presets):
    from wan_lite.ui.handlers import crop_preview, upload_image

    ui = _ui(tmp_path, presets)
    tiny = crop_preview(ui, _picture(tmp_path / "tiny.png", (64, 48)), "ti2v-5b", "1280x704")["crop_note"]
    assert "64×48" in tiny and "enlarged" in tiny and "blurry" in tiny
    pano = crop_preview(ui, _picture(tmp_path / "pano.png", (3000, 400)), "ti2v-5b", "1280x704")["crop_note"]
    made = re.search(r"will be \*\*(\d+)×(\d+)\*\*", pano).groups()
    assert f"The Size box says 1280×704; the video follows the image's shape instead: {made[0]}×{made[1]}" in pano
    land = _picture(tmp_path / "land.png", (900, 600))
    portrait = crop_preview(ui, land, "ti2v-5b", "704x1280")["crop_note"]
    assert "Size box is portrait but the image is landscape" in portrait
    assert "⚠️" not in crop_preview(ui, _picture(tmp_path / "fits.png", (1280, 704)), "ti2v-5b", "1280x704")["crop_note"]
    # T2V-A14B with an image runs I2V-A14B: the page says so, and again when the image goes.
    out = upload_image(ui, land, "t2v-a14b", "quality", "1280x720")
    assert out["model"] == "i2v-a14b" and "I2V-A14B is used" in out["status"]
    back = upload_image(ui, None, "i2v-a14b", "quality", "1280x720")
    assert back["model"] == "t2v-a14b" and "T2V-A14B is used" in back["status"]
    # A refused file: the error stays (the handler empties the box; only a user's own clear resets).
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    bad = upload_image(ui, str(tmp_path / "bad.png"), "ti2v-5b", "quality", "1280x704")
    assert bad["status"].startswith("⛔") and bad["upload"] is None


@pytest.mark.slow
def test_one_image_size_rule_for_the_api_the_cli_and_the_app(tmp_path, presets, tiny_models):
    """TI2V-5B, a 4:3 image at 128x128: the official rule gives 160x96 through all three, and the
    crop preview shows that size; a size the box would round (1000x1000) too."""
    import subprocess
    import sys

    from wan_lite.api import GenerateRequest
    from wan_lite.ui.handlers import crop_preview

    ui = _ui(tmp_path, presets)
    shutil.copytree(tiny_models["ti2v-5b"], ui.engine.model_folder("ti2v-5b"))
    image = _picture(tmp_path / "four_three.png", (400, 300))
    for size in ("128x128", "1000x1000", "130x130"):
        w, h = (int(x) for x in size.split("x"))
        api = ui.engine.resolve(GenerateRequest(prompt="a fox", model="ti2v-5b", image=image, width=w, height=h))
        request, _ = form.request_from_values({"user_prompt": "a fox", "model": "ti2v-5b", "image": image,
                                                "size": size}, presets)
        app = ui.engine.resolve(request)
        note = crop_preview(ui, image, "ti2v-5b", size)["crop_note"]
        assert (app.width, app.height) == (api.width, api.height), size
        assert f"**{api.width}×{api.height}**" in note, (size, note)
    run = subprocess.run([sys.executable, "-m", "wan_lite", "generate", "--model-dir",
                          str(ui.engine.model_folder("ti2v-5b")), "--image", image, "--size", "128x128",
                          "--frames", "5", "--steps", "1", "--prompt", "a fox", "--device", "cpu",
                          "--out", str(tmp_path / "cli.mp4")],
                         capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-2000:]
    assert "size: 160x96" in run.stdout, run.stdout


# ------------------------------------------------------------------------------ History and Reuse


def _result(out: Path, stem: str, prompt: str, **settings) -> Path:
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    (out / f"{stem}.latents.safetensors").write_bytes(b"x")
    side = {"wan_lite": 1, "video": f"{stem}.mp4",
            "settings": {"prompt": prompt, "model": "ti2v-5b", "seed": 7, "width": 1280, "height": 704,
                         "frames": 121, "steps": 50, **settings}}
    (out / f"{stem}.json").write_text(json.dumps(side), encoding="utf-8")
    return out / f"{stem}.json"


def test_reuse_gives_back_the_composed_prompt_and_the_mode(tmp_path, presets):
    from wan_lite.ui.handlers import page_values, reuse_history

    ui = _ui(tmp_path, presets)
    values = {**form.default_values(), "user_prompt": "A red fox trots through snow", "style": "Documentary",
              form.term_widget("lens"): ["lens.telephoto"], "language": "en"}
    final = form.composition_for(values, presets).prompt
    ui.store.save(form.settings_from_values(values, presets))  # what Generate saves
    side = _result(ui.engine.output_dir, "fox", final)
    out = reuse_history(ui, [str(side)], 0)
    assert out["user_prompt"] == "A red fox trots through snow" and out["style"] == "Documentary"
    assert out[form.term_widget("lens")] == ["lens.telephoto"] and out["mode"] == "quality"
    # A result of unknown composition still comes back, flattened into the prompt box.
    other = _result(ui.engine.output_dir, "other", "Something else entirely.", steps=25)
    flat = reuse_history(ui, [str(other)], 0)
    assert flat["user_prompt"] == "Something else entirely." and flat["mode"] == "fast"
    # Nothing selected: said where the user is looking (the History tab), not only on Create.
    none = reuse_history(ui, [str(side)], None)
    assert "Pick a result" in none["history_details"]
    # After a reload the mode radio shows the mode the settings are, not a stale one.
    ui.store.save({**form.settings_from_values(values, presets), "mode": "draft"})
    assert page_values(ui)["mode"] == "quality"
    ui.store.save({**form.settings_from_values(values, presets), "steps": 33})
    assert page_values(ui)["mode"] is None


def test_history_filter_and_delete(tmp_path, presets):
    from wan_lite.ui.handlers import delete_history, history_updates

    ui = _ui(tmp_path, presets)
    out = ui.engine.output_dir
    fox, owl = _result(out, "fox", "A red fox in snow."), _result(out, "owl", "An owl at night.")
    assert len(history_updates(ui)["history"]) == 2
    shown = history_updates(ui, "OWL night")
    assert shown["history_paths"] == [str(owl)]
    ask = delete_history(ui, [str(fox)], 0, None)
    assert "Click Delete again" in ask["history_details"] and (out / "fox.mp4").exists()
    done = delete_history(ui, [str(fox)], 0, ask["history_armed"])
    assert not any(out.glob("fox*")) and (out / "owl.mp4").exists() and done["history_paths"] == [str(owl)]
    assert "Pick a result" in delete_history(ui, [], None, None)["history_details"]


def test_lora_choices_are_remembered_per_model(tmp_path, presets):
    """Issue 19: the LoRA panel keeps its rows per model in the saved settings, and a model
    switched back to gets its own rows again."""
    from wan_lite.ui.handlers import page_values

    ui = _ui(tmp_path, presets)
    five = [["/loras/five_style.safetensors", 0.8, 0.8]]
    a14b = [["/loras/lightning_high.safetensors", 1.0, 0.0]]
    by_model = form.remember_loras("ti2v-5b", five, {})
    by_model = form.remember_loras("t2v-a14b", a14b, by_model)
    assert form.loras_for_model("ti2v-5b", by_model) == five and form.loras_for_model("i2v-a14b", by_model) == []
    values = {**form.default_values("t2v-a14b"), "user_prompt": "x", "loras": a14b, "loras_by_model": by_model}
    ui.store.save(form.settings_from_values(values, presets))
    loaded = page_values(ui)
    assert loaded["loras"] == a14b and loaded["loras_by_model"]["ti2v-5b"] == five
    ui.store.save({**ui.store.load(), "model": "ti2v-5b"})
    assert page_values(ui)["loras"] == five


def test_generate_without_the_model_points_to_the_models_tab(tmp_path, presets):
    from wan_lite.ui.queue_panel import job_updates, submit_form

    ui = _ui(tmp_path, presets)
    values = {**form.default_values(), "user_prompt": "A fox", "size": "64x64", "frames": 5, "steps": 1}
    submit_form(ui, values, start=True)
    try:
        view = ui.jobs.view()  # the one job there is, wherever it is by now
        job = ui.jobs.wait((view.running or (view.queued + view.finished)[0]).id)
    finally:
        ui.jobs.close()
    assert job.state == "failed"
    last = job_updates(job, ui)
    assert "Models** tab" in last["status"] and "Expected layout" not in last["status"]
    assert last["status"].count("not downloaded") == 1 and "not downloaded" not in last["progress"]
