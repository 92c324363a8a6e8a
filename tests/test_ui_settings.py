"""Sizes, frame snapping, Quality/Fast/Draft modes and the remembered settings."""

from __future__ import annotations

import json

import pytest

from wan_lite.errors import InputError
from wan_lite.registry import MODELS, get_spec
from wan_lite.sizing import snap_frames
from wan_lite.ui.settings import (
    MIN_FRAMES,
    MODES,
    SettingsStore,
    clean_settings,
    frames_for_seconds,
    infer_mode,
    max_frames,
    mode_values,
    offered_frames,
    parse_size,
    quality_notes,
    seconds_for_frames,
    size_choices,
    snap_size,
)


@pytest.mark.parametrize(("frames", "snapped"), [(121, 121), (120, 121), (119, 121), (118, 117), (123, 125), (3, 5), (1, 5),
                                                 (82, 81), (83, 85), (0, 5), (-7, 5), (97.9, 97)])
def test_snap_frames_to_4n_plus_1(frames, snapped):
    assert snap_frames(frames, MIN_FRAMES) == snapped
    assert snap_frames(frames) == (snapped if frames >= 3 else 1)  # the CLI keeps 1 frame


def test_snapped_frames_are_always_4n_plus_1_and_bounded():
    for spec in MODELS.values():
        for n in range(-3, 400):
            f = offered_frames(n, spec)
            assert (f - 1) % 4 == 0 and 5 <= f <= max_frames(spec)
    assert max_frames(get_spec("ti2v-5b")) == 241 and max_frames(get_spec("t2v-a14b")) == 161


def test_duration_and_frames_match_the_official_five_second_clips():
    five_b, a14b = get_spec("ti2v-5b"), get_spec("i2v-a14b")
    assert frames_for_seconds(5, five_b) == 121 and frames_for_seconds(5, a14b) == 81
    assert seconds_for_frames(121, 24) == 5.0 and seconds_for_frames(81, 16) == 5.0
    assert frames_for_seconds(2, five_b) == 49 and frames_for_seconds(2, a14b) == 33


def test_size_choices_are_valid_for_each_model():
    for spec in MODELS.values():
        values = [parse_size(v) for _, v in size_choices(spec)]
        assert values[: len(spec.sizes)] == list(spec.sizes)
        for w, h in values:
            assert w % spec.size_multiple == 0 and h % spec.size_multiple == 0
    assert (640, 352) in [parse_size(v) for _, v in size_choices(get_spec("ti2v-5b"))]
    assert snap_size(1280, 720, get_spec("ti2v-5b")) == (1280, 704)
    assert snap_size(10, 10, get_spec("t2v-a14b")) == (16, 16)
    with pytest.raises(InputError):
        parse_size("big")
    assert parse_size("1280×704") == (1280, 704)


def test_modes_are_data_with_official_quality():
    assert list(MODES) == ["quality", "fast", "draft"]
    for spec in MODELS.values():
        q = mode_values("quality", spec)
        assert (q["steps"], q["shift"], q["frames"]) == (spec.steps, spec.shift, spec.frames)
        assert (q["guidance"], q["guidance_low"]) == spec.guidance
        assert parse_size(q["size"]) == spec.sizes[0]
        fast, draft = mode_values("fast", spec), mode_values("draft", spec)
        assert fast["steps"] == spec.steps // 2 and fast["size"] == q["size"]
        w, h = parse_size(draft["size"])
        assert w * h < 1280 * 704 and draft["steps"] < fast["steps"] and draft["frames"] < q["frames"]
        assert infer_mode(spec, draft["size"], draft["frames"], draft["steps"]) == "draft"
    portrait = mode_values("quality", get_spec("ti2v-5b"), portrait=True)
    assert portrait["size"] == "704x1280"
    assert mode_values("draft", get_spec("t2v-a14b"), portrait=True)["size"] == "480x832"
    assert infer_mode(get_spec("ti2v-5b"), "1280x704", 121, 37) is None


def test_quality_notes_warn_about_5b_quirks():
    spec = get_spec("ti2v-5b")
    assert quality_notes(spec, 1280, 704, 50, 121) == []
    notes = quality_notes(spec, 640, 352, 12, 161)
    assert len(notes) == 3 and "1280×704" in notes[0] and "30" in notes[1]


def test_settings_round_trip(tmp_path):
    store = SettingsStore(tmp_path / "cfg" / "settings.json")
    assert store.load() == {}
    values = {"model": "t2v-a14b", "user_prompt": "A fox", "size": "832x480", "frames": 33, "steps": 20,
              "guidance": 4.0, "guidance_low": 3, "seed": 42, "terms": ["time_of_day.dawn"], "style": None,
              "mode": "draft", "memory_profile": "auto", "not_a_setting": 1}
    store.save(values)
    loaded = store.load()
    assert loaded == {k: v for k, v in values.items() if k != "not_a_setting"}


def test_corrupt_settings_file_is_set_aside_and_defaults_used(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text('{"model": "ti2v-5b", "steps": ', encoding="utf-8")
    store = SettingsStore(path)
    assert store.load() == {}
    assert not path.exists() and len(list(tmp_path.glob("settings.json.broken-*"))) == 1
    store.save({"steps": 30})
    assert store.load() == {"steps": 30}
    path.write_bytes(b"\xff\xfe\x00garbage")
    assert store.load() == {}


def test_wrong_types_and_unknown_models_are_dropped_one_by_one():
    cleaned = clean_settings({"model": "sora", "steps": "many", "frames": True, "seed": 7, "terms": ["a", 3],
                              "guidance": 4})
    assert cleaned == {"seed": 7, "terms": ["a"], "guidance": 4}
    assert clean_settings(["not", "a", "dict"]) == {}


def test_turbo_and_a_modeless_form_are_remembered(caplog):
    """Turbo's checkboxes come back after a restart (a bool was refused as if it were a stray
    True for an int), and mode None (the form holds no mode's values) is kept without a warning."""
    saved = {"turbo": True, "turbo_phases": True, "mode": None, "steps": 4}
    with caplog.at_level("WARNING"):
        assert clean_settings(saved) == saved
    assert not caplog.records
    assert clean_settings({"turbo": 1, "turbo_phases": "yes"}) == {}


def test_unwritable_settings_do_not_raise(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    SettingsStore(blocker / "settings.json").save({"steps": 3})  # parent is a file: logged, not raised


def test_modes_are_plain_data():
    assert json.loads(json.dumps(MODES["draft"].__dict__))["key"] == "draft"
