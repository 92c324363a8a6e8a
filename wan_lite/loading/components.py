"""Where each component of a model comes from (`resolve_sources`), and whether they fit together.

A model is a set of components (one DiT or two experts, VAE, text encoder, tokenizer); each may
come from the official folder or from a file or folder of another format (diffusers, ComfyUI
single files incl. fp8, GGUF), given per slot. Building the DiT and the text encoder in the
formats a plan asks for (stored fp8 / GGUF weights kept as stored, int8 / fp8 quantized) is the
runtime's loader (runtime/loader.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from wan_lite.registry import ModelSpec


def module_of(component: Any) -> nn.Module:
    return component if isinstance(component, nn.Module) else component.model


def dit_roles(spec: ModelSpec) -> tuple[str, ...]:
    return spec.dit_roles


def resolve_sources(model_dir: str | Path | None, components: dict[str, str | Path],
                    name: str | None = None) -> tuple[ModelSpec, dict[str, Any], Path]:
    """Where each component comes from: given files/folders (any format) first, the official
    folder for the rest. Returns (spec, {"dit_<role>"/"vae"/"text_encoder": TensorSource},
    tokenizer folder)."""
    from wan_lite.errors import CheckpointError
    from wan_lite.loading.formats import detect, load_component, pick, tokenizer_folder
    from wan_lite.loading.layout import detect_spec, find_model, is_pipeline_root, layout_help, pipeline_parts
    from wan_lite.loading.tensors import SafetensorsSource, open_source
    from wan_lite.registry import MODELS, dit_slots

    given = {k: Path(v) for k, v in components.items() if v}
    if name:
        spec = MODELS[name]
    elif model_dir is not None:
        spec = detect_spec(Path(model_dir))
    else:
        dit_path = next((given[s] for s in dit_slots() if s in given), None)
        found = pick(detect(dit_path), "dit") if dit_path else None
        if found is None or found.variant not in MODELS:
            raise CheckpointError("Say which model to run: give a model folder, a model name or a DiT file.")
        spec = MODELS[found.variant]
    if model_dir is not None and is_pipeline_root(Path(model_dir)):  # its parts, read one by one
        given = pipeline_parts(Path(model_dir), spec, skip=set(given)) | given
        model_dir = None
    slots = list(spec.slots)
    official = [s for s in slots if s not in given]
    # a ComfyUI umT5 file carries its tokenizer
    if "tokenizer" in official and "text_encoder" in given:
        te = pick(detect(given["text_encoder"]), "tokenizer")
        if te is not None:
            given["tokenizer"] = given["text_encoder"]
            official.remove("tokenizer")
    files = None
    if official:
        if model_dir is None:
            raise CheckpointError(f"No file given for: {', '.join(official)}.", layout_help(spec))
        files = find_model(Path(model_dir), spec.name, skip=set(given))
    sources: dict[str, Any] = {}
    for role in spec.dit_roles:
        slot = spec.slot_of(role)
        sources[f"dit_{role}"] = (
            load_component(given[slot], "dit", model=spec.name, expert=role if spec.experts else None)
            if slot in given else SafetensorsSource(files.dit[role]))
    sources["vae"] = (load_component(given["vae"], "vae", model=spec.name) if "vae" in given
                      else open_source(files.vae))
    sources["text_encoder"] = (load_component(given["text_encoder"], "text_encoder") if "text_encoder" in given
                               else open_source(files.t5))
    if "tokenizer" in given:
        from wan_lite.paths import config_dir

        tokenizer = tokenizer_folder(given["tokenizer"], config_dir() / "tokenizers")
    else:
        tokenizer = files.tokenizer
    return spec, sources, tokenizer


def vae_source(model_dir: str | Path | None, components: dict[str, str | Path], name: str) -> Any:
    """The TensorSource of model `name`'s VAE alone (decoding saved latents needs nothing else):
    the given file first, else the folder's (official layout or diffusers pipeline root); the
    other parts need not be there."""
    from wan_lite.errors import CheckpointError
    from wan_lite.loading.formats import load_component
    from wan_lite.loading.layout import find_model, is_pipeline_root, layout_help
    from wan_lite.loading.tensors import open_source
    from wan_lite.registry import MODELS

    spec = MODELS[name]
    given = components.get("vae")
    if given:
        return load_component(Path(given), "vae", model=spec.name)
    if model_dir is None:
        raise CheckpointError(f"No VAE file given for {spec.label}.", layout_help(spec))
    if is_pipeline_root(Path(model_dir)):
        return load_component(Path(model_dir), "vae", model=spec.name)
    files = find_model(Path(model_dir), spec.name, skip=set(spec.slots) - {"vae"})
    return open_source(files.vae)


def load_vae(source: Any, spec: ModelSpec, dtype: torch.dtype, *, on_disk: bool = False) -> nn.Module:
    """The VAE `spec` needs, from `source` (a TensorSource or a file), in `dtype`. on_disk: left
    on meta, nothing read (runtime/vae_parts.py reads each half where it runs)."""
    from wan_lite.errors import CheckpointError
    from wan_lite.loading.build import build_vae
    from wan_lite.loading.tensors import TensorSource, open_source
    from wan_lite.models.vae_common import WanVAEBase

    if not isinstance(source, TensorSource):
        source = open_source(source)
    version = WanVAEBase.detect_version(source.shapes())
    if version != spec.vae_version:
        raise CheckpointError(
            f"{source.describe()} is a Wan {version} VAE, but {spec.name} needs the Wan {spec.vae_version} VAE "
            f"({spec.vae_file}).",
            f"Download {spec.vae_file} from huggingface.co/{spec.hf_repo}.",
        )
    return build_vae(source, dtype, version=version, fill=not on_disk)


def check_compatible(spec: ModelSpec, dits: dict[str, nn.Module], vae: nn.Module, text_encoder: Any) -> None:
    """The DiT's channels must fit the model kind, the VAE and the text encoder."""
    from wan_lite.errors import CheckpointError

    in_dim, out_dim = spec.dit_in_dim, spec.dit_out_dim
    for role, dit in dits.items():
        cfg = dit.config
        if cfg.in_dim != in_dim or cfg.out_dim != out_dim:
            raise CheckpointError(
                f"The {role} DiT has {cfg.in_dim} input / {cfg.out_dim} output channels; "
                f"{spec.name} needs {in_dim} / {out_dim}.",
                "The folder mixes files of different models.",
            )
    if getattr(vae, "z_dim", spec.z_dim) != spec.z_dim:
        raise CheckpointError(f"The VAE has {vae.z_dim} latent channels; {spec.name} needs {spec.z_dim}.")
    d_model = getattr(getattr(module_of(text_encoder), "config", None), "d_model", None)
    for dit in dits.values():
        if d_model is not None and d_model != dit.config.text_dim:
            raise CheckpointError(
                f"The text encoder's width ({d_model}) does not match the DiT's text input ({dit.config.text_dim})."
            )
