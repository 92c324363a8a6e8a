""""Use files you already have": the engine takes remembered component files, the Models tab scans
a ComfyUI folder, lists what it found and saves the user's picks.

Tiny checkpoints: one set of random official weights is written both as an official TI2V-5B
folder and as ComfyUI single files (tests/tiny_ckpt/formats.py, stored in the same dtypes), so a
video made from the ComfyUI files must equal the official folder's bit for bit.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny_ckpt import formats as tf
from tests.tiny_ckpt.dit import official_dit_shapes, random_dit_state, write_dit
from tests.tiny_ckpt.t5 import write_t5
from tests.tiny_ckpt.vae import random_vae_state, write_vae
from wan_lite.api import GenerateRequest
from wan_lite.engine import Engine
from wan_lite.ui import components_panel, models_panel

SMALL = dict(width=64, height=64, frames=5, steps=2, seed=11)
TI2V = "Wan2.2-TI2V-5B"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """An official TI2V-5B folder and a ComfyUI models/ folder holding the same weights, plus
    a copy of one file, a Wan 2.1 VAE, a LoRA, a truncated file and the two experts of T2V-A14B."""
    root = tmp_path_factory.mktemp("components")
    official = root / "official" / TI2V
    dit = write_dit(official, in_dim=48, out_dim=48, dim=128, ffn_dim=256, num_layers=2, model_type="ti2v",
                    text_dim=64, seed=1)
    vae = write_vae(official / "Wan2.2_VAE.pth", "2.2", seed=3)
    t5 = write_t5(official)
    comfy = root / "ComfyUI" / "models"
    out = {"official": official, "comfy": comfy}
    # Stored in the official files' dtypes (fp32 DiT and VAE, bf16 umT5): lossless.
    out["dit"] = tf.write_comfy(comfy / "diffusion_models" / "wan2.2_ti2v_5B_fp32.safetensors", dit,
                                dtype=torch.float32, prefix="model.diffusion_model.")
    out["vae"] = tf.write_comfy(comfy / "vae" / "wan2.2_vae.safetensors", vae, dtype=torch.float32)
    (comfy / "text_encoders").mkdir(parents=True)
    out["t5"] = tf.write_comfy_t5(comfy / "text_encoders" / "umt5_xxl_bf16.safetensors", t5["state_dict"],
                                  (t5["tokenizer_dir"] / "spiece.model").read_bytes(), dtype=torch.bfloat16)
    out["copy"] = comfy / "vae" / "copy_of_wan2.2_vae.safetensors"
    shutil.copy(out["vae"], out["copy"])
    out["vae21"] = tf.write_comfy(comfy / "vae" / "wan_2.1_vae.safetensors", random_vae_state("2.1"))
    tf.write_lora(comfy / "loras" / "style_lora.safetensors", dit)
    out["truncated"] = tf.truncate(out["dit"], comfy / "diffusion_models" / "half_downloaded.safetensors")
    a14b = random_dit_state(official_dit_shapes(in_dim=16, out_dim=16, dim=128, ffn_dim=256, num_layers=2,
                                                text_dim=64), seed=5)
    out["high"] = tf.write_comfy(comfy / "diffusion_models" / "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors",
                                 a14b, fp8="scale_weight")
    out["low"] = tf.write_comfy(comfy / "diffusion_models" / "wan2.2_t2v_low_noise_14B_fp16.safetensors", a14b)
    return out


@pytest.fixture()
def env(tmp_path, monkeypatch) -> Path:
    """An isolated config folder (choices.json) and an empty Hugging Face cache."""
    monkeypatch.setenv("WAN_LITE_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


def _state(engine: Engine, name: str) -> str:
    return next(s for s in engine.model_status() if s.name == name).state


def test_scan_lists_what_is_found_with_format_precision_size_and_slot(files, env):
    engine = Engine(env / "models", env / "out", device="cpu")
    found, table = components_panel.scan(engine, str(files["comfy"]))
    by_path = {f.path: f for f in found}
    dit, vae, t5 = by_path[files["dit"]], by_path[files["vae"]], by_path[files["t5"]]
    assert (dit.role, dit.format, dit.precision, dit.location) == ("dit", "comfy", "fp32", "comfyui")
    assert dit.serves == [("ti2v-5b", "dit")] and dit.size_bytes == files["dit"].stat().st_size
    assert ("ti2v-5b", "vae") in vae.serves and ("t2v-a14b", "vae") not in vae.serves
    assert {("ti2v-5b", "text_encoder"), ("ti2v-5b", "tokenizer"), ("i2v-a14b", "text_encoder")} <= set(t5.serves)
    assert t5.precision == "bf16"
    # The copy is flagged both ways; the expert whose side is in its name serves only that side.
    assert by_path[files["copy"]].copies == [files["vae"]] and vae.copies == [files["copy"]]
    assert by_path[files["high"]].serves == [("t2v-a14b", "dit_high")] and by_path[files["high"]].precision == "fp8_scaled"
    assert by_path[files["vae21"]].serves == [("t2v-a14b", "vae"), ("i2v-a14b", "vae")]
    bad = [f for f in found if f.problem or not f.serves]
    assert {f.role for f in bad} == {"lora", "broken"}
    # The page's table: usable rows first, each with format, precision, size and use.
    assert "| the DiT of Wan2.2 TI2V-5B | comfy | fp32 |" in table and "TI2V-5B: DiT" in table
    assert "⧉ same file as vae/copy_of_wan2.2_vae.safetensors" in table and "2 are copies" in table
    assert "⛔ an unreadable file: " in table and "is truncated" in table and "⛔ a LoRA" in table
    assert all(line.startswith("|") for line in table.splitlines()[2:])  # one table row per file
    assert table.index("TI2V-5B: DiT") < table.index("⛔")
    # The ComfyUI folder is remembered (a second engine sees it) and a wrong one is refused.
    assert Engine(env / "models", env / "out").comfy_dirs() == [files["comfy"].resolve()]
    found, table = components_panel.scan(engine, str(env / "no_such_folder"))
    assert found == [] and table.startswith("⛔ ComfyUI folder not found")
    assert engine.comfy_dirs() == [files["comfy"].resolve()]


def test_slot_dropdowns_offer_what_fits_each_slot(files, env):
    engine = Engine(env / "models", env / "out", device="cpu")
    found, _ = components_panel.scan(engine, str(files["comfy"]))
    views = {v.slot: v for v in components_panel.slot_views(engine, found, "ti2v-5b")}
    assert not views["dit_high"].visible and views["dit"].visible and views["dit"].value == ""
    assert [v for _, v in views["dit"].choices] == ["", str(files["dit"])]  # not the truncated file
    assert {v for _, v in views["vae"].choices} == {"", str(files["vae"]), str(files["copy"])}
    assert str(files["t5"]) in {v for _, v in views["tokenizer"].choices}
    a14b = {v.slot: v for v in components_panel.slot_views(engine, found, "t2v-a14b")}
    assert not a14b["dit"].visible and a14b["dit_high"].visible
    assert [v for _, v in a14b["dit_high"].choices] == ["", str(files["high"])]
    assert [v for _, v in a14b["vae"].choices] == ["", str(files["vae21"])]
    label = dict((v, k) for k, v in a14b["dit_high"].choices)[str(files["high"])]
    assert "fp8_scaled" in label and "ComfyUI" in label


def test_chosen_files_make_the_model_installed_and_generate_like_the_official_folder(files, env):
    models = env / "models"
    engine = Engine(models, env / "out", device="cpu")
    assert _state(engine, "ti2v-5b") == "missing"
    picks = {"dit": str(files["dit"]), "vae": str(files["vae"]), "text_encoder": str(files["t5"]),
             "tokenizer": str(files["t5"])}
    message = components_panel.save(engine, "ti2v-5b", picks)
    assert message.startswith("✅ Saved for Wan2.2 TI2V-5B") and "is ready to use" in message
    status = next(s for s in engine.model_status() if s.name == "ti2v-5b")
    assert status.state == "installed" and status.components == {k: Path(v) for k, v in picks.items()}
    assert status.size_bytes == sum(files[k].stat().st_size for k in ("dit", "vae", "t5"))
    table = models_panel.status_markdown(engine.model_status())
    assert "✅ installed" in table and f"dit `{files['dit']}`" in table

    from wan_lite.runtime.attention_select import AttentionChoice

    engine._attention = {False: AttentionChoice("sdpa", "Attention: PyTorch SDPA (test note).")}  # as on a GPU
    ours = engine.generate(GenerateRequest(prompt="a lamp on a desk", model="ti2v-5b", **SMALL))
    assert "Attention: PyTorch SDPA (test note)." in ours.notes  # said with the first result only
    ref_engine = Engine(files["official"].parent, env / "ref_out", device="cpu", folders={"ti2v-5b": files["official"]})
    assert ref_engine.library.components == {}  # an explicit folder is used as it is
    ref = ref_engine.generate(GenerateRequest(prompt="a lamp on a desk", model="ti2v-5b", **SMALL))
    a, b = load_file(ours.latents_path)["latents"], load_file(ref.latents_path)["latents"]
    assert a.shape == b.shape and torch.equal(a, b)
    assert ours.video_path.is_file() and ours.sidecar_path.read_text().count(str(files["dit"])) == 1
    second = engine.generate(GenerateRequest(prompt="a lamp on a desk", model="ti2v-5b", **SMALL))
    assert not any(n.startswith("Attention:") for n in second.notes + ref.notes)

    # Remembered: a new engine (the next start of the app) uses the same files.
    again = Engine(models, env / "out2", device="cpu")
    assert again.chosen_components("ti2v-5b") == status.components and _state(again, "ti2v-5b") == "installed"
    # Choosing "from the model folder" again forgets them.
    components_panel.save(again, "ti2v-5b", {"dit": "", "vae": None})
    assert again.chosen_components("ti2v-5b") == {} and _state(Engine(models, env / "o"), "ti2v-5b") == "missing"
    # Saved latents still decode with the files that made them (recorded in their metadata).
    redo = Engine(models, env / "o", device="cpu").decode_latents(ours.latents_path, out_path=env / "redo.mp4")
    assert redo.video_path.is_file() and redo.frames == ours.frames


def test_a_partial_choice_says_what_is_still_missing(files, env):
    engine = Engine(env / "models", env / "out", device="cpu")
    message = components_panel.save(engine, "t2v-a14b", {"dit_high": str(files["high"]), "dit_low": str(files["low"])})
    assert message.startswith("✅ Saved for Wan2.2 T2V-A14B") and "not complete yet" in message
    assert "No file given for: vae, text_encoder, tokenizer" in message
    message = components_panel.save(engine, "t2v-a14b", {"dit_high": str(files["high"]), "dit_low": str(files["low"]),
                                                         "vae": str(files["vae21"]), "text_encoder": str(files["t5"])})
    assert "T2V-A14B is ready to use" in message  # the tokenizer comes with the ComfyUI umT5 file
    assert _state(engine, "t2v-a14b") == "installed" and _state(engine, "i2v-a14b") == "missing"


def test_a_wrong_file_is_named_and_nothing_is_saved(files, env):
    engine = Engine(env / "models", env / "out", device="cpu")
    good = {"dit": str(files["dit"]), "vae": str(files["vae"])}
    components_panel.save(engine, "ti2v-5b", good)
    cases = [
        ({"vae": str(files["vae21"])}, "is the Wan 2.1 VAE"),
        ({"dit": str(files["vae"])}, "expected the DiT of Wan2.2 TI2V-5B"),
        ({"dit": str(files["comfy"] / "loras" / "style_lora.safetensors")}, "is a LoRA, not a model"),
        ({"text_encoder": str(files["dit"])}, "expected the umT5-XXL text encoder"),
        ({"dit": str(env / "nowhere.safetensors")}, "Not found"),
    ]
    for picks, expected in cases:
        message = components_panel.save(engine, "ti2v-5b", good | picks)
        assert message.startswith("⛔") and expected in message, message
        assert engine.chosen_components("ti2v-5b") == {k: Path(v) for k, v in good.items()}
    message = components_panel.save(engine, "t2v-a14b", {"dit_high": str(files["low"])})
    assert "is the low-noise expert but was chosen as the high-noise expert" in message
    message = components_panel.save(engine, "ti2v-5b", {"dit": str(files["truncated"])})
    assert message.startswith("⛔") and "half_downloaded.safetensors" in message
    assert Engine(env / "models", env / "o").chosen_components("ti2v-5b") == {k: Path(v) for k, v in good.items()}


def test_a_remembered_file_that_moved_is_found_again_by_a_scan(files, env):
    engine = Engine(env / "models", env / "out", device="cpu")
    moved_dir = env / "models" / "mine"
    moved_dir.mkdir(parents=True)
    vae = shutil.copy(files["vae"], moved_dir / "vae_for_5b.safetensors")
    components_panel.save(engine, "ti2v-5b", {"vae": vae})
    renamed = Path(shutil.move(vae, moved_dir / "renamed.safetensors"))
    later = Engine(env / "models", env / "out", device="cpu")
    assert later.chosen_components("ti2v-5b") == {}  # gone from where it was remembered...
    later.scan_components([])
    assert later.chosen_components("ti2v-5b") == {"vae": renamed}  # ...found again by its header and size


def test_the_page_builds_the_section_and_the_saved_folder_comes_back(files, env, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(env / "up"))
    from wan_lite.ui.app import build_ui

    engine = Engine(env / "models", env / "out", device="cpu")
    components_panel.scan(engine, str(files["comfy"]))
    ui = build_ui(engine, env / "up")
    for name in ("comfy_dir", "scan_btn", "found_table", "comp_model", "comp_save", "comp_status",
                 *(f"slot_{s}" for s in components_panel.ALL_SLOTS)):
        assert name in ui.w, name
    fns = {fn.name: fn for fn in ui.demo.fns.values()}
    assert fns["scan"].concurrency_id == "scan" and fns["save"].concurrency_id == "scan"
    assert components_panel.dirs_text(engine.comfy_dirs()) == str(files["comfy"].resolve())
    assert components_panel.parse_dirs(" /a ; /b\n/c;") == ["/a", "/b", "/c"]
