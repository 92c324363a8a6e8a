"""The page's logic without a browser: widgets map to request fields by name, jobs run and cancel,
errors are shown in plain words, history is read back and reused."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.e2e.fake_engine import FakeEngine
from wan_lite.api import GenerateRequest, Progress
from wan_lite.errors import InputError
from wan_lite.registry import DEFAULT_NEGATIVE_PROMPT
from wan_lite.ui import form, history
from wan_lite.ui.presets import BUILTIN_DIR, load_presets

PROMPT = "A red fox trots through fresh snow in a birch forest, breath steaming in the cold air"


@pytest.fixture(scope="module")
def presets():
    return load_presets(BUILTIN_DIR, None)


def test_widgets_map_to_request_fields_by_name(presets):
    values = {"user_prompt": PROMPT, "model": "t2v-a14b", "size": "832x480", "frames": 35.0, "steps": 20.0,
              "guidance": 4, "guidance_low": 2.5, "shift": 12, "seed": -1, "sampler": "dpm++",
              "memory_profile": "auto", form.term_widget("time_of_day"): ["time_of_day.dawn"], "negative_prompt": ""}
    request, comp = form.request_from_values(values, presets)
    assert request == GenerateRequest(prompt=f"{PROMPT}. Dawn.", model="t2v-a14b", negative_prompt=DEFAULT_NEGATIVE_PROMPT,
                                      width=832, height=480, frames=37, steps=20, guidance=4.0, guidance_low=2.5,
                                      shift=12.0, seed=None, sampler="dpm++", memory_profile="auto",
                                      title=PROMPT)  # the user's own words name the files
    # Every widget that sets a request field carries that field's name.
    assert set(form.REQUEST_WIDGETS) <= set(GenerateRequest.field_names())
    # The order of the dict does not matter.
    assert form.request_from_values(dict(reversed(list(values.items()))), presets)[0] == request


def test_seeds_are_text_so_64_bit_seeds_survive_the_browser(presets):
    big = 8724209484096390455  # > 2**53: a JavaScript number would round it
    assert form.request_from_values({"user_prompt": PROMPT, "seed": str(big)}, presets)[0].seed == big
    assert form.parse_seed(" -1 ") is None and form.parse_seed("") is None and form.parse_seed(7.0) == 7
    with pytest.raises(InputError, match="not a whole number"):
        form.parse_seed("lucky")
    saved = form.settings_from_values({"seed": str(big)}, presets)
    assert saved["seed"] == big and form.values_from_settings(saved, presets)["seed"] == str(big)


def test_an_image_switches_a14b_to_i2v_and_5b_to_image_mode(presets, tmp_path):
    img = str(tmp_path / "x.png")
    r, comp = form.request_from_values({"user_prompt": "It runs", "model": "t2v-a14b", "image": img,
                                        form.term_widget("time_of_day"): ["time_of_day.dawn"]}, presets)
    assert r.model == "i2v-a14b" and r.image == img and comp.prompt == "It runs."
    assert form.model_for_image("i2v-a14b", False) == "t2v-a14b"
    r, _ = form.request_from_values({"user_prompt": "It runs", "model": "ti2v-5b", "image": img, "seed": 5,
                                     "guidance_low": 3.0}, presets)
    assert r.model == "ti2v-5b" and r.seed == 5 and r.guidance_low is None


def test_settings_and_history_round_trip_through_widget_values(presets):
    values = form.default_values("t2v-a14b") | {"user_prompt": PROMPT, "style": "Documentary",
                                                form.term_widget("lens"): ["lens.telephoto"]}
    saved = form.settings_from_values(values, presets)
    assert saved["terms"] == ["lens.telephoto"] and saved["negative_prompt"] == "" and "image" not in saved
    restored = form.values_from_settings(saved, presets)
    assert restored[form.term_widget("lens")] == ["lens.telephoto"] and restored[form.term_widget("time_of_day")] == []
    assert restored["negative_prompt"] == DEFAULT_NEGATIVE_PROMPT and restored["model"] == "t2v-a14b"
    assert form.request_from_values(restored, presets)[0] == form.request_from_values(values, presets)[0]
    reused = form.values_from_history({"prompt": "Final text.", "model": "ti2v-5b", "width": 704, "height": 1280,
                                       "seed": 77, "steps": 30}, presets)
    assert reused["user_prompt"] == "Final text." and reused["size"] == "704x1280" and reused["seed"] == "77"
    assert all(v == [] for k, v in reused.items() if k.startswith(form.TERM_PREFIX))


def test_progress_and_estimate_texts():
    html = form.progress_html(Progress("high_noise", 12, 40, 75.0, eta_s=3725.0))
    assert 'data-pct="30"' in html and "High-noise expert · step 12/40 · 1:15 elapsed · about 1:02:05 left" in html
    assert 'data-state="done"' in form.progress_html(None, "Finished", "done")
    # the whole job's share: the decode starts where denoising ended, it does not drop back to 0
    assert 'data-pct="90"' in form.progress_html(Progress("decode", 0, 1, 80.0))
    assert 'data-pct="100"' in form.progress_html(Progress("save", 1, 1, 81.0))
    from wan_lite.engine import Estimate

    text = form.estimate_text(Estimate(False, 30.5, 40.0, 600, "int8 + 20 blocks streamed", "Needs 30.5 GiB; <you> have 24"))
    assert "Too big for this computer" in text and "32.7 GB" in text and "10 min" in text and "&lt;you&gt;" in text


def _write_result(out: Path, stem: str, sidecar: dict, video: bool = True) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    if video:
        (out / f"{stem}.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    (out / f"{stem}.json").write_text(json.dumps(sidecar), encoding="utf-8")
    return out / f"{stem}.mp4"


def test_history_reads_sidecars_of_several_shapes_and_skips_junk(tmp_path):
    out = tmp_path / "out"
    _write_result(out, "a", {"request": {"prompt": "first", "model": "ti2v-5b", "steps": 50}, "seed": 1,
                             "timings": {"text": 1.5, "denoise": 100.0}})
    time.sleep(0.01)
    _write_result(out / "2026-11-21", "b", {"prompt": "second", "seed": 2, "video": "b.mp4", "width": 1280})
    _write_result(out, "no_video", {"prompt": "gone"}, video=False)
    (out / "broken.json").write_text("{", encoding="utf-8")
    outside = tmp_path / "secret.mp4"
    outside.write_bytes(b"x")
    _write_result(out, "escape", {"prompt": "x", "video": str(outside)}, video=False)
    entries = history.read_history(out)
    assert [e.prompt for e in entries] == ["second", "first"]
    assert entries[0].settings["width"] == 1280 and entries[1].timings == {"text": 1.5, "denoise": 100.0}
    details = history.describe(entries[1])
    assert "**Seed:** 1" in details and "denoise 100.0 s" in details and "total 101.5 s" in details
    assert history.read_history(tmp_path / "missing") == []


@pytest.fixture()
def ui(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "up"))
    monkeypatch.setenv("WAN_LITE_CONFIG_DIR", str(tmp_path / "cfg"))
    from wan_lite.ui.app import build_ui

    engine = FakeEngine(tmp_path / "models", tmp_path / "out", step_s=0.0)
    return build_ui(engine, tmp_path / "up")


def test_page_builds_with_every_request_widget_named(ui):
    for name in (*form.REQUEST_WIDGETS, *form.UI_ONLY, *ui.term_names, "generate", "cancel", "progress", "video",
                 "history", "reuse", "models_table", "download_btn", "estimate", "final_prompt"):
        assert name in ui.w, name
    assert len(ui.term_names) == len(ui.presets.categories) >= 12


def test_model_switch_sets_expert_guidance_and_valid_sizes():
    from wan_lite.ui.handlers import model_updates

    a14b = model_updates("t2v-a14b", "quality", "704x1280")
    assert a14b["guidance_low"]["visible"] is True and a14b["guidance_low"]["value"] == 3.0
    assert a14b["size"]["value"] == "720x1280" and a14b["shift"] == 12.0 and a14b["steps"] == 40
    five = model_updates("ti2v-5b", "fast", None)
    assert five["guidance_low"]["visible"] is False and five["steps"] == 25 and five["size"]["value"] == "1280x704"


def test_history_reads_the_engines_sidecar_layout(tmp_path):
    out = tmp_path / "out"
    record = {"wan_lite": "0.1.0", "image": None, "notes": [], "video": "fox_42.mp4", "latents": "fox_42.latents.safetensors",
              "request": GenerateRequest(prompt="A fox.", seed=None, memory_profile="auto").to_dict(),
              "settings": {"model": "ti2v-5b", "prompt": "A fox.", "width": 1280, "height": 704, "frames": 121,
                           "steps": 50, "seed": 42, "timings": {"text": 2.0, "denoise": 300.0, "decode": 20.0}}}
    _write_result(out, "fox_42", record)
    (entry,) = history.read_history(out)
    assert entry.seed == 42 and entry.prompt == "A fox." and entry.settings["memory_profile"] == "auto"
    assert entry.timings == {"text": 2.0, "denoise": 300.0, "decode": 20.0} and entry.video.name == "fox_42.mp4"


def test_the_ui_modules_import_no_torch_and_only_the_engines_small_api():
    import ast

    allowed = {"wan_lite.api", "wan_lite.engine", "wan_lite.errors", "wan_lite.paths", "wan_lite.registry", "wan_lite.sizing", "wan_lite.ui", "wan_lite.units"}
    ui_dir = Path(__file__).resolve().parents[1] / "wan_lite" / "ui"
    for path in ui_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] != "torch", f"{path.name} imports {name}"
                if name.startswith("wan_lite"):
                    assert any(name == a or name.startswith(a + ".") for a in allowed), f"{path.name} imports {name}"


def test_cache_turbo_and_loras_map_to_the_request(presets, tmp_path):
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"x")
    values = form.default_values("t2v-a14b") | {"user_prompt": PROMPT, "cache": "balanced",
                                                 "loras": [[str(lora), 0.8, None], ["", 1, 1], [str(lora), "", 0]]}
    request, _ = form.request_from_values(values, presets)
    assert request.cache == "balanced" and request.turbo is None and request.steps == values["steps"]
    assert request.loras == ((str(lora), 0.8, 0.8), (str(lora), 1.0, 0))
    turbo, _ = form.request_from_values(values | {"turbo": True}, presets)
    assert turbo.turbo is True and (turbo.steps, turbo.guidance, turbo.shift, turbo.sampler) == (None,) * 4
    # what a result records comes back into the form
    back = form.values_from_history({"model": "t2v-a14b", "cache": "fast", "turbo": True,
                                     "loras": [{"file": str(lora), "strength_high": 1.0, "strength_low": 0.0}]},
                                    presets)
    assert back["cache"] == "fast" and back["turbo"] is True and back["loras"] == [[str(lora), 1.0, 0.0]]


def test_adding_a_speed_lora_switches_turbo_on(ui, tmp_path):
    from wan_lite.ui.handlers import add_lora

    plain, speed = tmp_path / "style.safetensors", tmp_path / "Wan2.2-Lightning-4steps.safetensors"
    for f in (plain, speed):
        f.write_bytes(b"not read for the name check")
    out = add_lora(ui, str(plain), [], False)
    assert out["loras"] == [[str(plain), 1.0, 1.0]] and out["turbo"] is False
    out = add_lora(ui, str(speed), out["loras"], False)
    assert len(out["loras"]) == 2 and out["turbo"] is True and "Turbo is on" in out["status"]
    assert "not found" in add_lora(ui, str(tmp_path / "nope.safetensors"), [], False)["status"]


def test_the_gpus_menu_shows_where_there_are_several_and_splits_the_estimate(tmp_path, monkeypatch, presets):
    """Issue 24's app setting: hidden on one GPU (and on the CPU); with four, 1-4 are offered, the
    choice goes into the request and is remembered, a count remembered on a bigger machine falls
    back to 1, and the estimate speaks of each GPU and of the split."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "up"))
    monkeypatch.setenv("WAN_LITE_CONFIG_DIR", str(tmp_path / "cfg"))
    from wan_lite.ui.app import build_ui
    from wan_lite.ui.handlers import page_values
    from wan_lite.ui.settings import SettingsStore

    one = build_ui(FakeEngine(tmp_path / "models", tmp_path / "out", step_s=0.0), tmp_path / "up")
    assert one.w["gpus"].visible is False and form.request_from_values({"user_prompt": PROMPT}, presets)[0].gpus == 1

    engine = FakeEngine(tmp_path / "models", tmp_path / "out", step_s=0.0)
    monkeypatch.setattr(engine, "gpu_count", lambda: 4)
    store = SettingsStore(tmp_path / "settings.json")
    ui = build_ui(engine, tmp_path / "up", store=store)
    assert ui.w["gpus"].visible is True and [v for _, v in ui.w["gpus"].choices] == [1, 2, 3, 4]
    values = form.default_values() | {"user_prompt": PROMPT, "gpus": 2}
    assert form.request_from_values(values, presets)[0].gpus == 2
    store.save(form.settings_from_values(values, presets))
    assert page_values(ui)["gpus"] == 2
    store.save(form.settings_from_values(values | {"gpus": 8}, presets))  # the settings of an 8-GPU machine
    assert page_values(ui)["gpus"] == 1
    from wan_lite.engine import Estimate

    split = {"gpus": 2, "mode": "split", "reason": "One job over 2 GPUs: the conditional and unconditional passes "
                                                   "on different GPUs; about 3 min a video."}
    text = form.estimate_text(Estimate(True, 30.0, 40.0, 180, "split", None,
                                       {"hardware": {"gpu_name": "NVIDIA H100"}, "gpus": split}))
    assert "of GPU memory on each of 2 GPUs" in text and "One job over 2 GPUs" in text, text
