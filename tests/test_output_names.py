"""A result's files: named after the user's own words (not a style template's), and all with the
same permissions."""

from __future__ import annotations

import os
import stat

import torch

from wan_lite.engine import Engine
from wan_lite.output import save_latents, write_json_atomic, write_mp4


def test_every_file_of_a_result_gets_the_same_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        files = [save_latents(tmp_path / "r.latents.safetensors", torch.zeros(2, 3), {"settings": {}}),
                 write_mp4(tmp_path / "r.mp4", [torch.zeros(16, 16, 3, dtype=torch.uint8).numpy()] * 2, 8),
                 write_json_atomic(tmp_path / "r.json", {"wan_lite": "x"})]
    finally:
        os.umask(old)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in files}
    assert set(modes.values()) == {0o644}, modes  # safetensors' private temp file made the latents 0600


def test_output_names_come_from_the_users_words_not_the_style_template(tiny_models, tmp_path):
    from wan_lite.ui.form import request_from_values
    from wan_lite.ui.presets import BUILTIN_DIR, load_presets

    presets = load_presets(BUILTIN_DIR, None)
    style = next(iter(presets.styles))
    values = {"model": "ti2v-5b", "user_prompt": "A red fox in the snow", "style": style, "size": "64x64",
              "frames": 5, "steps": 2, "seed": "5"}
    request, composition = request_from_values(values, presets)
    assert request.prompt == composition.prompt and not request.prompt.startswith("A red fox")  # the template's words first
    engine = Engine(tmp_path / "models", tmp_path / "out", device="cpu", folders={"ti2v-5b": tiny_models["ti2v-5b"]})
    result = engine.generate(request)
    assert result.video_path.name.endswith("_s5_a-red-fox-in-the-snow.mp4"), result.video_path.name
    assert result.settings["prompt"] == composition.prompt  # what ran is recorded whole
