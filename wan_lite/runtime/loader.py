"""The one loader: a model's parts built in the formats a plan (or a caller) asks for.

`load_parts` finds the sources (wan_lite.loading.components.resolve_sources) and builds every
part with the same builders, whoever asks: `load_dit` (float in a dtype, int8 / fp8 through the
quantized disk cache, or stored fp8 / GGUF weights kept as stored, which win over any asked
quantization) and `load_text_encoder` (an fp8 file kept fp8; int8 / fp8 quantization on
request). `load_planned_parts` does it for a `Plan` (GPU or CPU alike) and adds the
`PlannedPlacement` that runs it. The parts come back as `LoadedParts`, which the pipeline is
made of (`WanPipeline.of_parts`). Quantized and stored-format layers are runtime layers
(QuantizedLinear, GGUFLinear), which is why building them lives here and not in wan_lite.loading.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wan_lite.errors import InputError
from wan_lite.loading.build import build_dit, build_text_encoder, dit_on_meta, fill_module, keep_dit_fp32
from wan_lite.loading.components import check_compatible, dit_roles, load_vae, resolve_sources
from wan_lite.loading.tensors import SafetensorsSource, TensorSource, open_source
from wan_lite.models.dit import WanDiT
from wan_lite.registry import ModelSpec
from wan_lite.runtime import streaming, vae_parts
from wan_lite.runtime.apply import PlannedPlacement
from wan_lite.runtime.gguf_linear import load_stored, stored_format, stored_key_map
from wan_lite.runtime.planner import Plan
from wan_lite.runtime.quant import quantize_model
from wan_lite.runtime.quant_cache import FLOAT_FORMATS, load_or_quantize
from wan_lite.runtime.refill import declare_dtypes, refill_like

log = logging.getLogger(__name__)

QUANTIZED = ("int8", "fp8", "int4")  # what a DiT's `quantization` may ask for; anything else loads float
TEXT_QUANTIZED = ("int8", "fp8")  # the text encoder's: no int4 (the planner never asks, nor measured)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Formats:
    """What is fixed when the weights are loaded. quantization: "int8", "fp8" or "int4" to
    quantize the DiT (through the disk cache), text_quant: "int8" or "fp8" for the text encoder;
    None to load the floats in the dtype."""

    dit_dtype: torch.dtype = torch.bfloat16
    quantization: str | None = None
    vae_dtype: torch.dtype = torch.float32
    text_dtype: torch.dtype = torch.bfloat16
    text_quant: str | None = None

    @classmethod
    def of_plan(cls, plan: Plan) -> Formats:
        """The formats `plan` runs in: bf16 DiT and umT5, each quantized as the plan says."""
        return cls(dit_dtype=torch.bfloat16,
                   quantization=plan.quantization if plan.quantization in QUANTIZED else None,
                   vae_dtype=_DTYPES.get(plan.vae_dtype, torch.bfloat16), text_dtype=torch.bfloat16,
                   text_quant=plan.text_encoder_quant if plan.text_encoder_quant in TEXT_QUANTIZED else None)


@dataclass
class LoadedParts:
    """A loaded model, not yet a pipeline. placement: a PlannedPlacement (unbound) or None."""

    spec: ModelSpec
    text_encoder: Any  # wan_lite.models.text_encoder.TextEncoder
    vae: nn.Module
    dits: dict[str, nn.Module]  # {"main": dit} or {"high": ..., "low": ...}
    placement: PlannedPlacement | None = None
    # what the text encoder and the VAE were built from and in which formats: another model
    # with the same keys can take them as they are (`load_parts(..., reuse=)`)
    keys: dict[str, tuple] = field(default_factory=dict)


def _float_format(dtype: torch.dtype | None) -> str | None:
    return next((name for name, d in FLOAT_FORMATS.items() if d == dtype), None)


def _needs_conversion(source: TensorSource, dtype: torch.dtype) -> bool:
    """Whether the blocks' weight matrices are stored in another float dtype (official A14B: fp32)."""
    return any(source.dtype(k) != dtype for k in source
               if k.startswith("blocks.") and k.endswith(".weight") and len(source.shape(k)) == 2
               and source.dtype(k).is_floating_point)


def load_dit(source: TensorSource, dtype: torch.dtype | None = torch.bfloat16, *, quantization: str | None = None,
             cache_dir: Path | None = None, what: str = "DiT", on_disk: bool = False) -> tuple[nn.Module, TensorSource]:
    """The DiT of `source` and the TensorSource to re-fill it from (`streaming.move_expert`).

    fp8 (ComfyUI) and GGUF files keep their block weights as stored (fp8 QuantizedLinear /
    GGUFLinear, ~1 or fewer bytes per weight, no float copy) whatever `quantization` asks; the
    rest loads in `dtype`. Otherwise `quantization` "int8" / "fp8" / "int4" quantizes the Linear layers,
    and None loads the floats in `dtype`: with a `cache_dir`, converted tensor by tensor into the
    on-disk cache (quant_cache.convert_to_cache: an fp32 expert never sits in RAM in either
    dtype) and re-filled from it; without one, from `source`, converted again as read.
    on_disk: the model comes back on meta (nothing read into RAM), its weights in the returned
    source, for an expert that waits on disk or streams its blocks from there; a stored fp8 /
    GGUF file is its own source.
    """
    stored = stored_format(source)
    if stored is None and quantization not in QUANTIZED:
        fmt = _float_format(dtype)
        if cache_dir is not None and fmt is not None and _needs_conversion(source, dtype):
            model, cache = load_or_quantize(dit_on_meta(source), source, fmt, dtype=dtype, cache_dir=cache_dir,
                                            keep_fp32=keep_dit_fp32, what=what, fill=not on_disk)
            if cache is not None:
                return model.requires_grad_(False).eval(), SafetensorsSource([cache])
            return _dropped(model, source) if on_disk else model.requires_grad_(False).eval(), source
        if on_disk:
            model = dit_on_meta(source)
            if dtype is not None:
                declare_dtypes(model, dtype, keep_dit_fp32)
            return model.requires_grad_(False).eval(), source
        return build_dit(source, dtype), source
    model = dit_on_meta(source)
    if stored is not None:
        # The file's own quantization is kept (no float copy, no re-quantization): it wins over
        # the asked one for the layers it covers.
        if quantization in QUANTIZED:
            log.info("%s: weights stay %s as stored in %s; the asked quantization (%s) is not applied",
                     what, stored, source.describe(), quantization)
        refill = load_stored(model, source, dtype, keep_fp32=keep_dit_fp32, what=what, fill=not on_disk)
    else:
        model, cache = load_or_quantize(model, source, quantization, dtype=dtype, cache_dir=cache_dir,
                                        keep_fp32=keep_dit_fp32, skip=WanDiT.no_quantize_patterns, what=what,
                                        fill=not on_disk)
        refill = source if cache is None else SafetensorsSource([cache])
    model = model.requires_grad_(False).eval()
    return (_dropped(model, refill) if on_disk else model), refill


def _dropped(model: nn.Module, source: TensorSource) -> nn.Module:
    """`model` with every tensor dropped to meta (its source holds them)."""
    if streaming.where_is(model) != "disk":
        streaming.set_expert_source(model, source)
        streaming.move_expert(model, "disk")
    return model


def load_text_encoder(source: TensorSource | Path | str, tokenizer: Path | str, dtype: torch.dtype = torch.bfloat16,
                      *, quantization: str | None = None, on_disk: bool = False,
                      cache_dir: Path | None = None) -> Any:
    """The umT5 encoder (a TextEncoder); the Linear layers of an fp8 file stay fp8
    (QuantizedLinear), and `quantization` "int8" / "fp8" quantizes the others as they are read
    (one float tensor at a time, never the whole bf16 encoder). Its source is registered
    (`streaming.set_expert_source`), so it can be dropped to disk between prompts and read again.
    on_disk: built on meta, nothing read (the placement reads it when it is first needed); with
    a `cache_dir`, from its conversion into the converted-weights cache (an fp8 file: from the
    file itself, its fp8 layers as stored).
    GGUF encoders are dequantized on read: transformers' T5 casts its FFN input to the dtype of
    a non-int8 `wo` weight, which a uint8 GGUFLinear would turn into a byte cast (so would an
    int4 layer's: the text encoder has no int4 format)."""
    if quantization is not None and quantization not in TEXT_QUANTIZED:
        raise InputError(f"The text encoder cannot be quantized to {quantization!r}.",
                         f"Use one of: {', '.join(TEXT_QUANTIZED)}, or none (bf16).")
    if not isinstance(source, TensorSource):
        source = open_source(Path(source))
    key_maps: list = []
    refills: list = []
    stored = stored_format(source)
    if stored == "fp8":  # its fp8 layers as stored; the file is the source to read it again from
        def fill(model, src, dt, *, key_map=None, what="text encoder"):
            key_maps.append(key_map)
            kept = load_stored(model, src, dt, key_map=key_map, what=what, fill=not on_disk)
            refills.append((kept, stored_key_map(key_map)))
            return model
    elif on_disk and cache_dir is not None:
        # converted into the cache (safetensors, read with the pages let go: a .pth read through
        # torch's memory map would keep every page it touched in the process's RSS)
        def fill(model, src, dt, *, key_map=None, what="text encoder"):
            fmt = quantization if quantization in TEXT_QUANTIZED else _float_format(dt)
            _m, cache = load_or_quantize(model, src, fmt, dtype=dt, cache_dir=cache_dir, key_map=key_map,
                                         fill=False, what="text encoder")
            refills.append((SafetensorsSource([cache]), None) if cache is not None else (src, key_map))
            if cache is None:
                streaming.set_expert_source(model, src, key_map)
                streaming.move_expert(model, "disk")
            return model
    elif quantization in TEXT_QUANTIZED or on_disk:
        def fill(model, src, dt, *, key_map=None, what="text encoder"):
            key_maps.append(key_map)
            if quantization in TEXT_QUANTIZED:
                quantize_model(model, quantization)
            if dt is not None:
                declare_dtypes(model, dt)
            if not on_disk:
                refill_like(model, src, key_map=key_map, what=what)
            return model
    else:
        def fill(model, src, dt, *, key_map=None, what="text encoder"):
            key_maps.append(key_map)
            return fill_module(model, src, dt, key_map=key_map, what=what)
    encoder = build_text_encoder(source, tokenizer, dtype, fill=fill)
    if quantization in TEXT_QUANTIZED and stored == "fp8":
        quantize_model(encoder.model, quantization)  # layers stored as fp8 stay so; the rest as read
    if refills:
        streaming.set_expert_source(encoder.model, *refills[0])
    elif stored is None or on_disk:  # a GGUF file read again dequantizes again: the same values
        streaming.set_expert_source(encoder.model, source, key_maps[0] if key_maps else None)
    return encoder


def load_parts(model_dir: str | Path | None, formats: Formats = Formats(), *,
               components: dict[str, str | Path] | None = None, name: str | None = None,
               cache_dir: Path | None = None, idle_on_disk: bool = False, dits_on_disk: bool = False,
               text_on_disk: bool = False, vae_on_disk: bool = False,
               reuse: dict[tuple, Any] | None = None) -> LoadedParts:
    """Load a model: an official-layout folder, and/or per-component files or folders in any
    supported format (`components` slots: "dit" or "dit_high"/"dit_low", "vae",
    "text_encoder", "tokenizer"), in `formats`. Weights stay on the CPU.

    idle_on_disk: the A14B low-noise expert, idle first, is dropped to its file (or quantized
    cache) once loaded; it is loaded first, so the two experts are never in RAM together.
    dits_on_disk: every DiT stays on disk (meta) once converted: the placement reads its parts
    when it runs, and streams its blocks from the file (a plan's blocks_from "disk").
    text_on_disk: the text encoder too (read at its first prompt, dropped after it).
    vae_on_disk: the VAE too (each half read where it runs, dropped after: runtime/vae_parts.py).
    reuse: key -> component (`LoadedParts.keys` of the model loaded before): a text encoder or VAE
    built from the same files in the same formats is taken as it is, not read again (switching
    between models that share umT5 or a VAE).
    Raises CheckpointError naming any missing, broken or mismatched file."""
    spec, sources, tokenizer = resolve_sources(model_dir, components or {}, name)
    reuse = reuse or {}
    keys = {"text_encoder": ("text_encoder", sources["text_encoder"].describe(), str(tokenizer),
                             formats.text_dtype, formats.text_quant),
            "vae": ("vae", sources["vae"].describe(), spec.vae_version, formats.vae_dtype)}
    text_encoder = reuse.get(keys["text_encoder"]) or load_text_encoder(
        sources["text_encoder"], tokenizer, formats.text_dtype, quantization=formats.text_quant,
        on_disk=text_on_disk, cache_dir=cache_dir)
    vae = reuse.get(keys["vae"]) or load_vae(sources["vae"], spec, formats.vae_dtype, on_disk=vae_on_disk)
    if not vae_parts.has_file(vae):  # a later plan may let it wait in its file
        vae_parts.register(vae, sources["vae"])
    if vae_on_disk:  # one reused from the model before leaves RAM too
        for half in vae_parts.HALVES:
            vae_parts.drop(vae, half)
    roles = dit_roles(spec)
    to_disk = {"low"} if spec.experts and idle_on_disk else set()
    dits: dict[str, nn.Module] = {}
    for role in sorted(roles, key=lambda r: r not in to_disk):
        model, refill = load_dit(sources[f"dit_{role}"], formats.dit_dtype, quantization=formats.quantization,
                                 cache_dir=cache_dir, what=f"{role} DiT", on_disk=dits_on_disk)
        streaming.set_expert_source(model, refill)
        dits[role] = model
        if role in to_disk and streaming.where_is(model) != "disk":
            streaming.move_expert(model, "disk")
    dits = {role: dits[role] for role in roles}
    streaming.trim_host_memory()
    check_compatible(spec, dits, vae, text_encoder)
    return LoadedParts(spec, text_encoder, vae, dits, keys=keys)


def load_planned_parts(model_dir: str | Path | None, plan: Plan, *, components: dict[str, str | Path] | None = None,
                       name: str | None = None, device: torch.device | str | None = None,
                       cache_dir: Path | None = None, reuse: dict[tuple, Any] | None = None) -> LoadedParts:
    """The parts in `plan`'s formats, with the PlannedPlacement (on `device`: the GPU when there
    is one, else the CPU) that runs them as the plan says; the pipeline binds it."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    parts = load_parts(model_dir, Formats.of_plan(plan), components=components, name=name, cache_dir=cache_dir,
                       idle_on_disk=plan.idle_expert == "disk",
                       # kept on the GPU: read from the file straight there, never whole in RAM
                       dits_on_disk=plan.blocks_from == "disk" or (plan.keep_resident and device.type == "cuda"),
                       text_on_disk=not plan.keep_text_encoder, vae_on_disk=plan.vae_on_disk and device.type == "cuda",
                       reuse=reuse)
    parts.placement = PlannedPlacement(plan, device)
    return parts
