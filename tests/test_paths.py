"""The user's config folder (one rule, an earlier version's folder read as a fallback) and the
one atomic JSON writer."""

from __future__ import annotations

import json

import numpy as np
import platformdirs
import pytest
import torch

from wan_lite import paths
from wan_lite.ui.presets import user_presets_dir
from wan_lite.ui.settings import SettingsStore


def test_config_dir_override(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.CONFIG_DIR_ENV, str(tmp_path))
    assert paths.config_dir() == tmp_path
    assert paths.config_path("settings.json") == tmp_path / "settings.json"


@pytest.fixture
def windows_like(tmp_path, monkeypatch):
    """platformdirs as on Windows: without appauthor=False the app folder sits in an author
    folder of the same name (where the UI kept its files before)."""
    monkeypatch.delenv(paths.CONFIG_DIR_ENV)

    def user_config_dir(appname, appauthor=None, *args, **kwargs):
        base = tmp_path / "AppData" / "Local" / appname
        return str(base if appauthor is False else base / (appauthor or appname))

    monkeypatch.setattr(platformdirs, "user_config_dir", user_config_dir)
    new = tmp_path / "AppData" / "Local" / "wan_lite"
    return new, new / "wan_lite"


def test_files_only_in_the_earlier_config_folder_are_read_from_there(windows_like):
    new, old = windows_like
    assert paths.config_dir() == new
    assert paths.config_path("settings.json") == new / "settings.json"  # nothing anywhere: the new place
    (old / "presets").mkdir(parents=True)
    (old / "settings.json").write_text(json.dumps({"version": 1, "steps": 12}), encoding="utf-8")
    assert user_presets_dir() == old / "presets"

    store = SettingsStore()
    assert store.load() == {"steps": 12}
    store.save({"steps": 20})  # saved in the new folder, read from there from now on
    assert json.loads((new / "settings.json").read_text(encoding="utf-8"))["steps"] == 20
    assert SettingsStore().load() == {"steps": 20} and store.load() == {"steps": 20}
    assert json.loads((old / "settings.json").read_text(encoding="utf-8"))["steps"] == 12


def test_write_json_atomic_takes_one_value_arrays_and_tensors(tmp_path):
    target = tmp_path / "a" / "b.json"
    paths.write_json_atomic(target, {"t": torch.tensor(2.5), "a": np.array([3]), "s": {"b", "a"},
                                     "p": tmp_path, "zh": "一只猫"})
    text = target.read_text(encoding="utf-8")
    assert "一只猫" in text and json.loads(text) == {"t": 2.5, "a": 3, "s": ["a", "b"], "p": str(tmp_path),
                                                    "zh": "一只猫"}
    for bad in (torch.ones(2), np.ones(2), object()):
        with pytest.raises(TypeError):
            paths.write_json_atomic(target, {"bad": bad})
    assert json.loads(target.read_text(encoding="utf-8"))["t"] == 2.5
    assert sorted(p.name for p in target.parent.iterdir()) == ["b.json"]
