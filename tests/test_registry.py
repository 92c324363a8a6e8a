"""The registry record is the one place a model's facts live.

The first tests check the three released records against the official numbers; the rest register
two extra variants (copies of real entries with other names and other data, added to
registry.MODELS for the test only) and check that the footprint, the official layout, the slot
names, checkpoint detection and the sizes follow them with no other code change.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.tiny_ckpt import write_model
from tests.tiny_ckpt.dit import official_dit_shapes
from wan_lite import registry
from wan_lite.errors import CheckpointError
from wan_lite.registry import MODELS, VAES, DiTPart, DiTShape


@pytest.mark.parametrize("name, channels, slots", [
    ("ti2v-5b", (48, 48), ("dit",)),
    ("t2v-a14b", (16, 16), ("dit_high", "dit_low")),
    ("i2v-a14b", (36, 16), ("dit_high", "dit_low")),
])
def test_released_records_give_the_official_facts(name: str, channels: tuple[int, int], slots: tuple[str, ...]) -> None:
    spec = MODELS[name]
    assert (spec.dit_in_dim, spec.dit_out_dim) == channels
    assert spec.slots == (*slots, "vae", "text_encoder", "tokenizer")
    assert spec.dit.dim // spec.dit.num_heads == 128  # Wan heads are 128 wide
    assert registry.match_dit(*channels, spec.dit.dim, spec.dit.num_layers) is spec
    assert spec.guidance_index(spec.dit_role_at(999)) == 0
    if spec.experts:
        assert spec.dit_role_at(spec.boundary) == "high" and spec.dit_role_at(spec.boundary - 1) == "low"
        assert spec.guidance_index("low") == 1


def test_image_switches_between_the_a14b_models() -> None:
    assert registry.model_for_image("t2v-a14b", True) == "i2v-a14b"
    assert registry.model_for_image("i2v-a14b", False) == "t2v-a14b"
    assert registry.model_for_image("ti2v-5b", True) == registry.model_for_image("ti2v-5b", False) == "ti2v-5b"


# --------------------------------------------------------------------------------------------
# Two variants that exist only as data

MINI = replace(MODELS["ti2v-5b"], name="ti2v-mini", title="Wan2.2 TI2V-Mini (a test variant)",
               hf_repo="Test/Wan2.2-TI2V-Mini", dit=DiTShape(dim=256, ffn_dim=512, num_heads=2, num_layers=2),
               steps=20, frames=49, sizes=((960, 544), (544, 960)), draft_size=(480, 288), quality_floor=None)
# Two experts in other folders, with the Wan 2.2 VAE: 48 latent + 4 mask + 48 image channels in.
DUO = replace(MODELS["i2v-a14b"], name="i2v-duo", title="Wan2.2 I2V-Duo (a test variant)",
              hf_repo="Test/Wan2.2-I2V-Duo", dit=DiTShape(dim=384, ffn_dim=768, num_heads=3, num_layers=3),
              dits=(DiTPart("high", "dit_high", "experts/high", "transformer"),
                    DiTPart("low", "dit_low", "experts/low", "transformer_2")),
              vae=VAES["2.2"], text_variant=None, sizes=((1024, 576), (576, 1024)), draft_size=(512, 288))


@pytest.fixture
def variants(monkeypatch):
    for spec in (MINI, DUO):
        monkeypatch.setitem(MODELS, spec.name, spec)
    return MINI, DUO


def test_footprint_follows_the_record(variants) -> None:
    from wan_lite.models.dit import WanDiT, WanDiTConfig
    from wan_lite.runtime.footprint import ModelFootprint
    from wan_lite.runtime.hardware import Hardware
    from wan_lite.runtime.planner import PlanRequest, plan

    for spec in variants:
        m = ModelFootprint.full_size(spec.name)
        d = spec.dit
        assert (m.dim, m.ffn_dim, m.num_heads, m.num_layers) == (d.dim, d.ffn_dim, d.num_heads, d.num_layers)
        assert (m.in_dim, m.out_dim, m.experts) == (spec.dit_in_dim, spec.dit_out_dim, len(spec.dits))
        assert (m.vae_version, m.vae_stride, m.sizes) == (spec.vae_version, spec.vae_stride, spec.sizes)
        cfg = WanDiTConfig(dim=d.dim, ffn_dim=d.ffn_dim, num_heads=d.num_heads, num_layers=d.num_layers,
                           in_dim=spec.dit_in_dim, out_dim=spec.dit_out_dim)
        with torch.device("meta"):
            real = sum(p.numel() for p in WanDiT(cfg).parameters())
        assert m.params == real  # the record's shape is the model's
        assert ModelFootprint.of_model(spec.name, cfg) == m  # the released size on disk
        smaller = replace(cfg, num_layers=1)
        assert ModelFootprint.of_model(spec.name, smaller).num_layers == 1
        w, h = spec.default_size
        assert plan(m, PlanRequest(w, h, spec.frames, image=spec.needs_image), Hardware.fake(24, 64)).fits
    assert ModelFootprint.full_size("i2v-duo").encodes_video and DUO.dit_in_dim == 100


def test_layout_slots_and_downloads_follow_the_record(variants, tmp_path: Path) -> None:
    from wan_lite.loading import discovery, layout
    from wan_lite.ui import components_panel, downloads

    assert discovery.slot_names("i2v-duo") == components_panel.slots_of("i2v-duo") == DUO.slots
    assert discovery.slot_names("ti2v-mini") == ("dit", "vae", "text_encoder", "tokenizer")
    help_text = layout.layout_help(DUO)
    assert "Test/Wan2.2-I2V-Duo" in help_text and "experts/high/ and experts/low/" in help_text
    assert "Wan2.2_VAE.pth" in help_text
    assert downloads.allow_patterns(DUO) == ["experts/high/*", "experts/low/*", "Wan2.2_VAE.pth",
                                             registry.T5_FILE, f"{registry.TOKENIZER_DIR}/*"]
    # tiny folders at each variant's own size are told apart from the released models by it
    for spec in variants:
        root = write_model(tmp_path / spec.name, spec.name, dim=spec.dit.dim, ffn_dim=spec.dit.ffn_dim,
                           num_layers=spec.dit.num_layers)
        assert layout.detect_spec(root) is spec
        files = layout.find_model(root)
        assert files.spec is spec and set(files.dit) == set(spec.dit_roles)
        assert all(root / p.folder in files.dit[p.role][0].parents for p in spec.dits)
    assert layout.detect_spec(write_model(tmp_path / "5b", "ti2v-5b")) is MODELS["ti2v-5b"]


def test_checkpoint_detection_follows_the_record(variants, tmp_path: Path) -> None:
    from wan_lite.loading import discovery, formats
    from wan_lite.loading.keymaps import recognise

    def table(spec_dims: tuple[int, int], dim: int, ffn_dim: int, layers: int) -> dict:
        shapes = official_dit_shapes(in_dim=spec_dims[0], out_dim=spec_dims[1], dim=dim, ffn_dim=ffn_dim,
                                     num_layers=layers)
        return {k: (v, "BF16") for k, v in shapes.items()}

    mini = recognise(table((48, 48), 256, 512, 2), Path("mini.safetensors"))
    assert (mini.variant, mini.problem) == ("ti2v-mini", None) and "not the released" not in mini.details
    five = recognise(table((48, 48), 3072, 14336, 30), Path("5b.safetensors"))
    assert five.variant == "ti2v-5b" and "not the released" not in five.details
    assert recognise(table((48, 48), 128, 256, 2), Path("x.safetensors")).variant == "ti2v-5b"
    duo = recognise(table((100, 48), 384, 768, 3), Path("wan2.2_duo_high_noise.safetensors"))
    assert (duo.variant, duo.expert, duo.problem) == ("i2v-duo", "high", None)
    assert "I2V-Duo 100/48" in recognise(table((99, 48), 384, 768, 3), Path("x.safetensors")).problem

    # the experts' folders are the record's: each expert fills its own slot, found by a scan
    root = write_model(tmp_path / "duo", "i2v-duo", dim=384, ffn_dim=768, num_layers=3)
    dits = [c for c in formats.detect(root) if c.role == "dit"]
    assert sorted((c.variant, c.expert) for c in dits) == [("i2v-duo", "high"), ("i2v-duo", "low")]
    slots = discovery.candidates(discovery.scan([("user", root)]), "i2v-duo")
    assert set(slots) == set(DUO.slots)
    assert [f.component.expert for f in slots["dit_high"]] == ["high"]
    assert [f.component.path.name for f in slots["vae"]] == ["Wan2.2_VAE.pth"]
    with pytest.raises(CheckpointError, match="high-noise expert of Wan2.2 I2V-Duo"):
        formats.check_component(dits[0], "vae", model="i2v-duo")


def test_sizes_follow_the_record(variants) -> None:
    from wan_lite.api import GenerateRequest
    from wan_lite.job import resolve
    from wan_lite.sizing import best_output_size, i2v_a14b_size, image_output_size
    from wan_lite.ui import form, settings

    assert [v for _, v in settings.size_choices(MINI)] == ["960x544", "544x960", "480x288", "288x480"]
    draft = settings.mode_values("draft", MINI)
    assert draft["size"] == "480x288" and draft["steps"] == 12
    quality = settings.mode_values("quality", MINI)
    assert (quality["size"], quality["frames"], quality["steps"]) == ("960x544", 49, 20)
    assert settings.quality_notes(MINI, 480, 288, 4, 49) == []  # no quality floor in this record
    job = resolve(GenerateRequest("a fox", model=DUO.name, image=_image()))
    assert (job.width, job.height) == i2v_a14b_size(640, 480, 1024 * 576, 16, 2) == (864, 640)
    assert job.width % DUO.size_multiple == 0 and job.frames == DUO.frames
    assert image_output_size(MINI, 640, 480, 960, 544) == best_output_size(640, 480, 32, 32, 960 * 544)
    assert form.model_for_image("i2v-duo", False) == "i2v-duo"  # no text sibling in this record
    assert form.default_values("ti2v-mini")["size"] == "960x544"


def _image():
    from PIL import Image

    return Image.new("RGB", (640, 480), (200, 100, 50))
