"""Recognise model files and folders by their headers, and open them under the official names.

A *component* is one DiT (or one A14B expert), VAE, text encoder or tokenizer, in one of the
formats people already have on disk:

| format      | what it looks like                                                              |
|-------------|---------------------------------------------------------------------------------|
| official    | Wan-AI repos: sharded DiT folder with a WanModel config.json, `Wan2.x_VAE.pth`,  |
|             | `models_t5_umt5-xxl-enc-bf16.pth`, `google/umt5-xxl/` tokenizer                  |
| diffusers   | `transformer/`, `transformer_2/`, `vae/`, `text_encoder/`, `tokenizer/` folders  |
| comfy       | single .safetensors files: official DiT/VAE names (DiT optionally prefixed        |
|             | `model.diffusion_model.`), HF umT5 names + `spiece_model`; fp16/bf16/fp8(_scaled)|
| gguf        | .gguf files: DiT with official names, umT5 with llama.cpp names                  |

Identity comes from tensor names and shapes, never from the file name alone, so a renamed file is
still recognised. File names are only used for what shapes cannot tell: which A14B expert a file
is (high/low noise) and whether a 14B text-to-video DiT is Wan 2.1 rather than 2.2.

Entry points: `detect(path)` lists the components found at a path, `check_component` says why a
component does not fit a slot, `open_component` gives a `TensorSource` with official names, and
`load_component(path, role, ...)` does all three.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from wan_lite.errors import CheckpointError
from wan_lite.loading import keymaps
from wan_lite.loading.files import regular_file, weight_map
from wan_lite.loading.keymaps import recognise
from wan_lite.loading.sources import (
    Fp8ScaledSource,
    GGUFSource,
    RenamedSource,
    gguf_field,
    gguf_shape,
    is_quant_aux,
    materialize_tokenizer,
    open_gguf_reader,
)
from wan_lite.loading.tensors import PthSource, SafetensorsSource, TensorSource, read_safetensors_header
from wan_lite.registry import MODELS

log = logging.getLogger(__name__)

ROLES = ("dit", "vae", "text_encoder", "tokenizer")
ROLE_TEXT = {
    "dit": "a diffusion transformer (DiT)",
    "vae": "a VAE",
    "text_encoder": "the umT5-XXL text encoder",
    "tokenizer": "the umT5 tokenizer",
    "lora": "a LoRA",
    "unknown": "not a model file wan_lite knows",
    "broken": "an unreadable file",
}
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".pth", ".pt", ".bin", ".ckpt")
_DIFFUSERS_SHARED = ("vae", "text_encoder", "tokenizer")  # a diffusers pipeline's other subfolders


def _diffusers_subfolders() -> tuple[str, ...]:
    """The subfolders of a diffusers pipeline root that hold components, from the registry."""
    dits = (p.diffusers_folder for s in MODELS.values() for p in s.dits)
    return tuple(dict.fromkeys((*dits, *_DIFFUSERS_SHARED)))


def _official_subfolders() -> tuple[str, ...]:
    """The subfolders of an official model folder that hold components (experts, tokenizer)."""
    dirs = [p.folder for s in MODELS.values() for p in s.dits if p.folder]
    return tuple(dict.fromkeys([*dirs, *(s.tokenizer_dir for s in MODELS.values())]))


@dataclass(frozen=True)
class Component:
    """One model component found on disk.

    path: what a user names (a file, or the folder of a sharded / diffusers component).
    role: "dit", "vae", "text_encoder", "tokenizer", or "lora" / "unknown" / "broken".
    variant: dit -> registry model name ("ti2v-5b", ...); vae -> "2.1" / "2.2";
      text_encoder / tokenizer -> "umt5".
    expert: "high" / "low" for A14B experts when the name or folder says so, else None.
    naming: the tensor names inside: "official", "diffusers", "hf" (umT5) or "llama.cpp".
    precision: "fp32", "bf16", "fp16", "fp8_e4m3fn", "fp8_scaled", "gguf-Q4_K", ...
    fingerprint: hash of the headers and sizes (equal for copies of a file), set by discovery.
    problem: why it cannot be used (Wan 2.1 DiT, a LoRA, truncated, ...), None when usable.
    """

    path: Path
    files: tuple[Path, ...]
    format: str
    role: str
    variant: str | None = None
    expert: str | None = None
    naming: str = "official"
    precision: str = ""
    size_bytes: int = 0
    prefix: str = ""
    fingerprint: str = ""
    details: str = ""
    has_tokenizer: bool = False
    problem: str | None = None

    @property
    def usable(self) -> bool:
        return self.problem is None and self.role in ROLES

    @property
    def models(self) -> tuple[str, ...]:
        """The registry models this component can serve."""
        if self.role == "dit":
            return (self.variant,) if self.variant in MODELS else ()
        if self.role == "vae":
            return tuple(name for name, spec in MODELS.items() if spec.vae_version == self.variant)
        if self.role in ("text_encoder", "tokenizer"):
            return tuple(MODELS)
        return ()

    def what(self) -> str:
        """A short phrase for messages: "the Wan 2.1 VAE", "the low-noise expert of T2V-A14B"..."""
        if self.role == "dit" and self.variant in MODELS:
            spec = MODELS[self.variant]
            if spec.experts:
                which = spec.dit_part(self.expert).label if self.expert in spec.dit_roles else "an expert"
                return f"{which} of {spec.short_title}"
            return f"the DiT of {spec.short_title}"
        if self.role == "vae" and self.variant:
            return f"the Wan {self.variant} VAE"
        return ROLE_TEXT.get(self.role, self.role)

    def describe(self) -> str:
        """One line for listings: what, format, precision, size, where."""
        gib = self.size_bytes / 2**30
        state = f"  !! {self.problem}" if self.problem else ""
        return f"{self.what()} [{self.format}, {self.precision or '?'}, {gib:.2f} GiB] {self.path}{state}"


# --------------------------------------------------------------------------------------------
# Headers: names, shapes and stored types, read without touching the tensor data

_TORCH_TYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int32: "I32",
    torch.int64: "I64",
}


@dataclass(frozen=True)
class Header:
    """The tensor table of a checkpoint. `tensors`: name -> (shape, stored type), the type as
    safetensors spells it ("F32", "BF16", "F8_E4M3", ...) or the GGUF type ("Q4_K", "F16", ...).
    `kind`: "safetensors", "pth" or "gguf"; `architecture`: GGUF `general.architecture`."""

    tensors: dict[str, tuple[tuple[int, ...], str]]
    kind: str
    metadata: dict[str, str]
    architecture: str | None = None


def read_header(files: Iterable[Path]) -> Header:
    """The header of one checkpoint file or of the shards of one model.

    Raises CheckpointError for a missing, truncated or unreadable file.
    """
    files = [Path(f) for f in files]
    first = files[0]
    if first.suffix == ".gguf":
        reader = open_gguf_reader(first)
        tensors = {t.name: (gguf_shape(reader, t, first), t.tensor_type.name) for t in reader.tensors}
        arch = gguf_field(reader, "general.architecture")
        return Header(tensors, "gguf", {}, arch if isinstance(arch, str) else None)
    if first.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        src = PthSource(first)
        tensors = {k: (src.shape(k), _TORCH_TYPE_NAMES.get(src.dtype(k), "?")) for k in src}
        return Header(tensors, "pth", {})
    tensors, metadata = {}, {}
    for f in files:
        header = read_safetensors_header(f)
        metadata.update(header.pop("__metadata__", None) or {})
        tensors.update({k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items()})
    return Header(tensors, "safetensors", metadata)


_FLOAT_NAMES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16", "F64": "fp64",
                "F8_E4M3": "fp8_e4m3fn", "F8_E5M2": "fp8_e5m2"}


def _precision(header: Header) -> str:
    """The storage type of the bulk of the weights (>= 2-D tensors, by element count)."""
    by_type: Counter[str] = Counter()
    for shape, kind in header.tensors.values():
        if len(shape) >= 2 and kind not in ("U8", "I8", "I32", "I64", "BOOL"):
            by_type[kind] += math.prod(shape)
    if not by_type:
        return "?"
    if header.kind == "gguf":
        quant = Counter({k: n for k, n in by_type.items() if k not in ("F32", "F16", "BF16")})
        return f"gguf-{(quant or by_type).most_common(1)[0][0]}"
    if any(k.startswith("F8") for k in by_type):
        if any(is_quant_aux(name) for name in header.tensors):
            return "fp8_scaled"
        return _FLOAT_NAMES[max((k for k in by_type if k.startswith("F8")), key=lambda k: by_type[k])]
    main = by_type.most_common(1)[0][0]
    return _FLOAT_NAMES.get(main, main.lower())


# --------------------------------------------------------------------------------------------
# Detection


def _format_of(files: tuple[Path, ...], naming: str, folder_has_config: bool) -> str:
    if files[0].suffix == ".gguf":
        return "gguf"
    if naming == "diffusers" or (naming == "hf" and folder_has_config):
        return "diffusers"
    if naming == "official" and (files[0].suffix != ".safetensors" or folder_has_config):
        return "official"
    return "comfy"


def detect_files(files: Iterable[Path], path: Path | None = None, *, expert: str | None = None,
                 folder_has_config: bool = False) -> Component:
    """Identify one component stored in `files` (one file or the shards of one model).

    Never raises for a bad file: a truncated or unreadable file comes back as role "broken" with
    the reason in `problem`. path: what the user names (default: the file); expert: the A14B
    side when a folder says it; folder_has_config: the files sit next to a config.json.
    """
    files = tuple(Path(f) for f in files)
    path = Path(path) if path is not None else files[0]
    size = sum(f.stat().st_size for f in files if f.exists())
    try:
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(
                f"{path}: {len(missing)} of {len(files)} file(s) are missing ({missing[0].name}, ...).",
                "The download is incomplete; download the missing files again.",
            )
        header = read_header(files)
    except CheckpointError as err:
        return Component(path, files, "?", "broken", size_bytes=size, problem=str(err))
    found = recognise(header.tensors, path)
    expert = expert or found.expert
    fmt = _format_of(files, found.naming, folder_has_config)
    return Component(
        path=path,
        files=files,
        format=fmt,
        role=found.role,
        variant=found.variant,
        expert=expert if found.role == "dit" else None,
        naming=found.naming,
        precision=_precision(header),
        size_bytes=size,
        prefix=found.prefix,
        details=found.details,
        has_tokenizer=found.has_tokenizer,
        problem=found.problem,
    )


def _shard_sets(folder: Path) -> tuple[list[tuple[Path, list[Path]]], set[Path], list[Component]]:
    """Sharded safetensors models in `folder` (from their index json): [(index, shards)], the
    shards used, and each index that cannot be read as a "broken" component."""
    sets, used, broken = [], set(), []
    for index in sorted(folder.glob("*.safetensors.index.json")):
        try:
            names = sorted(set(weight_map(index).values()))
        except CheckpointError as err:
            broken.append(Component(index, (index,), "?", "broken", problem=str(err)))
            continue
        shards = [folder / n for n in names]
        sets.append((index, shards))
        used.update(shards)
    return sets, used, broken


def _tokenizer_component(folder: Path) -> Component | None:
    files = [folder / n for n in ("spiece.model", "tokenizer.json") if (folder / n).is_file()]
    if not files:
        return None
    size = sum(f.stat().st_size for f in files)
    return Component(folder, tuple(files), "official", "tokenizer", variant="umt5", naming="sentencepiece",
                     precision="-", size_bytes=size, details="tokenizer folder")


def _folder_expert(folder: Path) -> str | None:
    """The expert a folder holds by its place in a model's layout (`ModelSpec.dits`): an official
    expert folder (high_noise_model/, low_noise_model/), or a diffusers pipeline's DiT subfolder
    when the pipeline has every expert's (A14B: transformer/ the high-noise, transformer_2/ the
    low-noise expert; a TI2V pipeline has only transformer/)."""
    for spec in MODELS.values():
        parts = spec.dits if spec.experts else ()
        for p in parts:
            official = Path(p.folder).parts
            if official and folder.parts[-len(official):] == official:
                return p.role
            if folder.name == p.diffusers_folder and all((folder.parent / q.diffusers_folder).is_dir() for q in parts):
                return p.role
    return None


def detect_folder(folder: Path, expert: str | None = None) -> list[Component]:
    """Components stored directly in `folder` (not in its subfolders). `expert` overrides the
    side read from names."""
    folder = Path(folder)
    expert = expert or _folder_expert(folder)
    has_config = (folder / "config.json").is_file()
    sets, used, out = _shard_sets(folder)
    for _index, shards in sets:
        out.append(detect_files(shards, folder, expert=expert, folder_has_config=has_config))
    singles = [f for f in sorted(folder.iterdir())
               if f.suffix in WEIGHT_SUFFIXES and f.is_file() and f not in used]
    # A diffusers component folder (config.json + one weights file) is named by the folder.
    as_folder = has_config and not sets and len(singles) == 1
    for f in singles:
        out.append(detect_files([f], folder if as_folder else f, expert=expert, folder_has_config=has_config))
    tok = _tokenizer_component(folder)
    if tok is not None:
        out.append(tok)
    return out


def detect(path: Path) -> list[Component]:
    """Every component at `path`: a file, a component folder, or a diffusers pipeline root.

    A diffusers root (model_index.json) is read one level deep; for A14B pipelines `transformer/`
    is the high-noise expert and `transformer_2/` the low-noise expert.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"Not found: {path}", "Check the path.")
    if path.is_file():
        return [detect_files([path])]
    if not path.is_dir():
        regular_file(path)  # raises: a device, a FIFO or a socket is never read
    try:
        out = detect_folder(path)
    except OSError as err:  # a folder this user may not list
        raise CheckpointError(f"The folder {path} cannot be read ({err.strerror or err}).",
                              "Check the folder's permissions.") from None
    subs = _diffusers_subfolders() if (path / "model_index.json").is_file() else _official_subfolders()
    for sub in subs:
        if (path / sub).is_dir():
            out.extend(detect_folder(path / sub))
    return out


# --------------------------------------------------------------------------------------------
# Checking a component against the slot it is offered for


def check_component(c: Component, role: str, *, model: str | None = None, expert: str | None = None) -> None:
    """Raise CheckpointError saying what `c` is and what was expected, unless it fits.

    role: "dit", "vae", "text_encoder" or "tokenizer"; model: registry name; expert: "high"/"low".
    """
    name = c.path.name
    spec = MODELS.get(model) if model else None
    slot = ROLE_TEXT[role]
    title = spec.short_title if spec is not None else ""
    if spec is not None and role == "dit":
        which = spec.dit_part(expert).label if spec.experts and expert in spec.dit_roles else "the DiT"
        slot = f"{which} of {title}"
    if c.role == "broken":
        raise CheckpointError(c.problem or f"{c.path} cannot be read.")
    if c.role == "lora":
        raise CheckpointError(
            f"{name} is a LoRA, not a model ({c.details}).",
            f"Choose the base model file here ({slot}). LoRAs are applied on top of a model.",
        )
    if c.role == "tokenizer" and role == "text_encoder":
        raise CheckpointError(f"{name} is the tokenizer, not the text encoder weights.")
    wanted_tok = role == "tokenizer" and c.role == "text_encoder" and c.has_tokenizer
    if c.role != role and not wanted_tok:
        raise CheckpointError(
            f"{name} is {c.what()}{f' ({c.details})' if c.details else ''}; expected {slot}.",
            "Choose the right file for this slot.",
        )
    if c.problem:
        raise CheckpointError(f"{name} cannot be used as {slot}: {c.problem}")
    if spec is None:
        return
    if role == "dit":
        if c.variant != spec.name:
            raise CheckpointError(
                f"{name} is {c.what()} ({c.details}); {title} needs "
                + ("its high- and low-noise expert files." if spec.experts else "its own DiT file."),
                "Choose the DiT file of the model you are running.",
            )
        if spec.experts and expert and c.expert and c.expert != expert:
            raise CheckpointError(
                f"{name} is the {c.expert}-noise expert but was chosen as the {expert}-noise expert.",
                "Swap the two expert files.",
            )
    if role == "vae" and c.variant != spec.vae_version:
        right = f"{spec.vae.file} or {spec.vae.comfy_file}"
        raise CheckpointError(
            f"{name} is the Wan {c.variant} VAE ({c.details}); {title} needs the Wan "
            f"{spec.vae_version} VAE.",
            f"Choose the Wan {spec.vae_version} VAE ({right}).",
        )


# --------------------------------------------------------------------------------------------
# Opening


def open_component(c: Component, *, fp8_dequantize: bool = True) -> TensorSource:
    """A TensorSource with the official names and shapes for a usable component.

    fp8 files: with fp8_dequantize=False, fp8 weights are read as stored (fp8) and their scales
    are reachable with `sources.fp8_weight(source, name)`; otherwise they read as float32.
    """
    if c.role == "broken" or c.problem:
        raise CheckpointError(c.problem or f"{c.path} cannot be read.")
    if c.role not in ("dit", "vae", "text_encoder"):
        raise CheckpointError(f"{c.path} is {c.what()}, which holds no model weights.")
    if c.format == "gguf":
        base: TensorSource = GGUFSource(c.files[0])
    elif c.files[0].suffix in (".pth", ".pt", ".bin", ".ckpt"):
        base = PthSource(c.files[0])
    else:
        base = SafetensorsSource(c.files)
        if any(base.dtype(k) in (torch.float8_e4m3fn, torch.float8_e5m2) for k in base):
            base = Fp8ScaledSource(base, dequantize=fp8_dequantize)
    key_map = {
        ("dit", "diffusers"): keymaps.dit_diffusers_to_official,
        ("vae", "diffusers"): partial(keymaps.vae_diffusers_to_official, version=c.variant),
        ("text_encoder", "hf"): keymaps.t5_hf_to_official,
        ("text_encoder", "llama.cpp"): keymaps.t5_gguf_to_official,
    }.get((c.role, c.naming))
    if key_map is None and not c.prefix:
        return base
    return RenamedSource(base, key_map, strip_prefixes=(c.prefix,) if c.prefix else ())


def tokenizer_folder(path: Path, cache_dir: Path) -> Path:
    """A tokenizer folder transformers can load: the folder at `path` (google/umt5-xxl,
    diffusers tokenizer/, or one holding it), or the tokenizer built into a ComfyUI umT5 file,
    written once under `cache_dir`."""
    chosen = pick(detect(path), "tokenizer")
    if chosen is None:
        raise CheckpointError(
            f"{path} holds no tokenizer.",
            "Point wan_lite at the tokenizer folder (google/umt5-xxl or the diffusers tokenizer/) "
            "or at a ComfyUI umt5_xxl_*.safetensors file (it carries its tokenizer).",
        )
    if chosen.role == "tokenizer":
        return chosen.path
    return materialize_tokenizer(SafetensorsSource(chosen.files), cache_dir)


def pick(components: list[Component], role: str, expert: str | None = None) -> Component | None:
    """The component for a slot among those found at one path (None when there is none)."""
    matching = [c for c in components if c.role == role or (role == "tokenizer" and c.has_tokenizer)]
    if expert is not None and len(matching) > 1:
        matching = [c for c in matching if c.expert == expert] or matching
    if not matching:
        return None
    return sorted(matching, key=lambda c: c.role != role)[0]


def load_component(
    path: Path,
    role: str,
    *,
    model: str | None = None,
    expert: str | None = None,
    fp8_dequantize: bool = True,
) -> TensorSource:
    """Detect what is at `path`, check that it fits (role, model, expert), open it.

    Raises CheckpointError naming what the file is and what was expected.
    """
    found = detect(path)
    chosen = pick(found, role, expert)
    if chosen is None:
        if len(found) == 1:
            check_component(found[0], role, model=model, expert=expert)
        what = ", ".join(sorted({c.what() for c in found})) or "no model files"
        raise CheckpointError(f"{path} holds {what}; expected {ROLE_TEXT[role]}.",
                              "Choose another file or folder.")
    if chosen.expert is None and expert is not None:
        chosen = replace(chosen, expert=expert)
    check_component(chosen, role, model=model, expert=expert)
    log.info("Loading %s from %s (%s, %s)", role, chosen.path, chosen.format, chosen.precision)
    return open_component(chosen, fp8_dequantize=fp8_dequantize)
