"""Preset files: every shipped JSON validates; broken user presets are reported and skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wan_lite.errors import InputError
from wan_lite.ui.presets import (
    BUILTIN_DIR,
    GROUPS,
    PROMPT_SLOT,
    Bundle,
    load_presets,
    memory_profiles,
    save_user_bundle,
)

ISSUE_CATEGORIES = ("light_source", "lighting_type", "time_of_day", "shot_size", "composition", "lens",
                    "camera_angle", "shot_type", "colour_tone", "camera_movement", "visual_style", "special_effects")


def test_every_shipped_preset_file_parses_and_validates():
    files = sorted(BUILTIN_DIR.glob("*.json"))
    assert {p.name for p in files} >= {"vocabulary.json", "styles.json", "bundles.json"}
    for path in files:
        json.loads(path.read_text(encoding="utf-8"))  # plain JSON, UTF-8
    presets = load_presets(BUILTIN_DIR, None)
    assert presets.problems == []
    assert set(ISSUE_CATEGORIES) <= set(presets.categories)
    terms = presets.terms()
    assert len(terms) == sum(len(c.terms) for c in presets.categories.values())  # ids unique
    for term in terms.values():
        assert term.en and term.zh and term.group in GROUPS
    # The official aesthetic-control vocabulary has 60 terms (9 categories).
    assert sum(1 for t in terms.values() if t.group == "aesthetic") == 60
    assert len(presets.styles) >= 8 and all(s.prompt.count(PROMPT_SLOT) == 1 for s in presets.styles.values())
    for bundle in presets.bundles.values():
        assert bundle.terms and all(t in terms for t in bundle.terms)
        assert bundle.style is None or bundle.style in presets.styles


def test_bilingual_labels_come_from_the_official_guide():
    terms = load_presets(BUILTIN_DIR, None).terms()
    assert terms["time_of_day.sunset"].label == "Sunset · 日落"
    assert terms["lighting_type.rim"].zh == "边缘光"
    assert terms["camera_movement.push_in"].zh == "镜头推进"
    assert terms["visual_style.claymation"].zh == "黏土"


def test_broken_user_presets_are_reported_by_file_and_key_and_skipped(tmp_path):
    (tmp_path / "a_not_json.json").write_text('{"styles": [', encoding="utf-8")
    (tmp_path / "b_mixed.json").write_text(json.dumps({
        "styles": [
            {"name": "No slot", "prompt": "just text"},
            {"name": "Good one", "prompt": "Noir film. {prompt}", "negative_prompt": "colour"},
        ],
        "bundles": [
            {"name": "Typo bundle", "terms": ["time_of_day.sunsett"]},
            {"name": "Uses my style", "terms": ["time_of_day.night"], "style": "Good one"},
        ],
        "categories": [{"key": "lens", "terms": [{"id": "anamorphic", "en": "Anamorphic lens", "zh": "变形宽银幕镜头"},
                                                 {"id": "BAD ID", "en": "x", "zh": "y"}]}],
        "colours": [],
    }), encoding="utf-8")
    presets = load_presets(BUILTIN_DIR, tmp_path)
    text = "\n".join(presets.problems)
    assert "a_not_json.json: not valid JSON (line 1" in text
    assert "b_mixed.json: styles[0]: prompt: must contain {prompt} exactly once" in text
    assert "b_mixed.json: bundles[0]: terms: unknown term ids ['time_of_day.sunsett']" in text
    assert "b_mixed.json: categories[0].terms[1]: id: 'BAD ID'" in text
    assert "b_mixed.json: colours: unknown section" in text
    # The good entries still load, next to the built-in ones.
    assert "Good one" in presets.styles and "No slot" not in presets.styles
    assert presets.bundles["Uses my style"].style == "Good one"
    assert "Typo bundle" not in presets.bundles
    assert "lens.anamorphic" in presets.terms() and "lens.telephoto" in presets.terms()
    assert "Cinematic film" in presets.styles


def test_fooocus_style_list_files_are_accepted(tmp_path):
    (tmp_path / "sdxl_styles.json").write_text(json.dumps([
        {"name": "Fooocus Sharp", "prompt": "cinematic still {prompt} . emotional, harmonious", "negative_prompt": "anime"},
    ]), encoding="utf-8")
    presets = load_presets(BUILTIN_DIR, tmp_path)
    assert presets.problems == []
    assert presets.styles["Fooocus Sharp"].apply("a cat") == "cinematic still a cat . emotional, harmonious"


def test_save_user_bundle_round_trips_and_replaces_by_name(tmp_path):
    presets = load_presets(BUILTIN_DIR, tmp_path)
    path = save_user_bundle(tmp_path, Bundle("Mine", ("time_of_day.night",), "Cinematic film"), presets)
    save_user_bundle(tmp_path, Bundle("Mine", ("time_of_day.dawn", "lens.telephoto"), None), presets)
    again = load_presets(BUILTIN_DIR, tmp_path)
    assert path.name == "my_presets.json" and again.problems == []
    assert again.bundles["Mine"].terms == ("time_of_day.dawn", "lens.telephoto")
    assert [b["name"] for b in json.loads(path.read_text())["bundles"]] == ["Mine"]
    with pytest.raises(InputError, match="empty"):
        save_user_bundle(tmp_path, Bundle("Empty", ()), presets)
    with pytest.raises(InputError, match="unknown term"):
        save_user_bundle(tmp_path, Bundle("Bad", ("nope.nope",)), presets)


def test_memory_profiles_tolerate_absence_and_broken_files(tmp_path):
    assert memory_profiles(tmp_path / "nowhere") == [("Auto (fit this computer)", "auto")]
    (tmp_path / "rtx4090_24gb.json").write_text(json.dumps({"title": "RTX 4090, 24 GB"}), encoding="utf-8")
    (tmp_path / "broken.json").write_text("{", encoding="utf-8")
    choices = memory_profiles(tmp_path)
    assert choices[0][1] == "auto"
    assert ("RTX 4090, 24 GB", "rtx4090_24gb") in choices and ("broken", "broken") in choices
    if (BUILTIN_DIR / "memory_profiles").is_dir():  # shipped by the planner; must at least list
        assert memory_profiles()[0][1] == "auto"


def test_builtin_dir_is_the_repository_presets_folder():
    assert BUILTIN_DIR == Path(__file__).resolve().parents[1] / "presets"
