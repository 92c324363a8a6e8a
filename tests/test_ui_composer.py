"""The prompt composer follows the official Wan 2.2 rules and is deterministic."""

from __future__ import annotations

import itertools

import pytest

from wan_lite.registry import DEFAULT_NEGATIVE_PROMPT
from wan_lite.ui.composer import compose
from wan_lite.ui.presets import BUILTIN_DIR, load_presets

PROMPT = "A red fox trots through fresh snow in a birch forest, its breath steaming in the cold air"


@pytest.fixture(scope="module")
def presets():
    return load_presets(BUILTIN_DIR, None)


def test_plain_prompt_gets_default_negative_and_no_rewrite(presets):
    c = compose(presets, "  A cat   sleeps on a warm windowsill in the afternoon sun, tail twitching slowly.  ")
    assert c.prompt == "A cat sleeps on a warm windowsill in the afternoon sun, tail twitching slowly."
    assert c.negative_prompt == DEFAULT_NEGATIVE_PROMPT
    assert c.warnings == ()


def test_style_comes_first_then_prompt_then_look_then_motion(presets):
    c = compose(presets, PROMPT, ["camera_movement.push_in", "time_of_day.sunset", "visual_style.claymation",
                                  "colour_tone.warm"])
    assert c.prompt == (f"Claymation style. {PROMPT}. Sunset, warm colors. Camera pushes in.")
    assert c.used_terms == ("visual_style.claymation", "time_of_day.sunset", "colour_tone.warm",
                            "camera_movement.push_in")


def test_style_template_wraps_everything_and_adds_its_negative(presets):
    c = compose(presets, PROMPT, ["time_of_day.night"], "Cinematic film", negative_prompt="blurry")
    assert c.prompt.startswith("Cinematic film still, shot on 35mm film. A red fox")
    assert "Night." in c.prompt and c.prompt.endswith("natural film grain, rich detail.")
    assert c.negative_prompt == "blurry, cartoon, illustration, flat colors"


def test_braces_in_user_text_are_safe_with_templates(presets):
    c = compose(presets, "A sign that reads {prompt} and {0}", [], "Documentary")
    assert "A sign that reads {prompt} and {0}." in c.prompt


def test_order_of_clicks_does_not_matter(presets):
    ids = ["lens.telephoto", "time_of_day.dawn", "camera_movement.tracking", "visual_style.watercolor"]
    results = {compose(presets, PROMPT, list(p), "Vintage film").prompt for p in itertools.permutations(ids)}
    assert len(results) == 1


def test_more_than_four_aesthetic_terms_keeps_them_with_a_gentle_warning(presets):
    four = ["light_source.moonlight", "lighting_type.rim", "shot_size.wide", "colour_tone.cool"]
    assert not any("at most 4" in w for w in compose(presets, PROMPT, four).warnings)
    c = compose(presets, PROMPT, [*four, "composition.symmetrical", "lens.fisheye"])
    assert any("6 lighting/framing terms" in w and "at most 4" in w for w in c.warnings)
    assert "symmetrical composition" in c.prompt and "fisheye lens" in c.prompt
    # Camera movement and style words do not count toward the four.
    c = compose(presets, PROMPT, [*four, "camera_movement.pull_back", "visual_style.felt"])
    assert not any("at most 4" in w for w in c.warnings)


def test_camera_angle_is_left_out_when_the_camera_moves(presets):
    c = compose(presets, PROMPT, ["camera_angle.low_angle", "camera_movement.arc"])
    assert "low-angle" not in c.prompt.lower() and c.prompt.endswith("Arc shot around the subject.")
    assert any("Camera angle left out (Low-angle shot)" in w for w in c.warnings)
    assert "Low-angle shot." in compose(presets, PROMPT, ["camera_angle.low_angle"]).prompt


def test_image_to_video_keeps_only_motion_and_camera_words(presets):
    c = compose(presets, "The fox turns its head and runs off", ["time_of_day.sunset", "visual_style.anime_2d",
                "camera_movement.pull_back", "emotion.happy"], "Cinematic film", image_to_video=True)
    assert c.prompt == "The fox turns its head and runs off. Happy, camera pulls back."
    assert any("Image-to-video" in w and "Sunset" in w and "Cinematic film" in w for w in c.warnings)
    assert not any(w.startswith("Tip") for w in c.warnings)
    empty = compose(presets, "", [], image_to_video=True)
    assert any("what should move" in w for w in empty.warnings)


def test_illustration_styles_warn_about_film_terms(presets):
    c = compose(presets, PROMPT, ["visual_style.pixel_art", "lighting_type.rim"])
    assert any("2D/illustration" in w for w in c.warnings)
    c = compose(presets, PROMPT, ["lens.long_focus"], "Watercolor")
    assert any("2D/illustration" in w for w in c.warnings)
    assert not any("2D" in w for w in compose(presets, PROMPT, ["lens.long_focus"], "Documentary").warnings)


def test_chinese_terms_and_punctuation(presets):
    c = compose(presets, "一只狐狸在雪地里小跑", ["visual_style.claymation", "time_of_day.sunset", "camera_movement.push_in"],
                language="zh")
    assert c.prompt == "黏土风格。一只狐狸在雪地里小跑。日落。镜头推进。"


def test_terms_already_written_are_not_repeated_and_unknown_ids_warn(presets):
    c = compose(presets, f"{PROMPT}, at sunset", ["time_of_day.sunset", "old.removed_term"])
    assert c.prompt.lower().count("sunset") == 1
    assert any("old.removed_term" in w for w in c.warnings)


def test_empty_and_short_prompts_get_hints(presets):
    assert any("Write what the video shows" in w for w in compose(presets, "").warnings)
    assert any(w.startswith("Tip") for w in compose(presets, "a dog").warnings)
