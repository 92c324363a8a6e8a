"""Recognise a model folder in the official layout (the files of the Wan-AI Hugging Face repos).

    Wan2.2-TI2V-5B/                         Wan2.2-T2V-A14B/ (and I2V-A14B)
      config.json                             high_noise_model/  config.json, index, shards
      diffusion_pytorch_model.safetensors.index.json
      diffusion_pytorch_model-0000K-of-0000N.safetensors
                                              low_noise_model/   config.json, index, shards
      Wan2.2_VAE.pth                          Wan2.1_VAE.pth
      models_t5_umt5-xxl-enc-bf16.pth         models_t5_umt5-xxl-enc-bf16.pth
      google/umt5-xxl/  (tokenizer)           google/umt5-xxl/

Which folders and files a model has comes from its registry record (`ModelSpec.dits`, `vae`,
`t5_file`, `tokenizer_dir`). Which model a folder holds is read from the DiT's channels and size
(config.json, else the weights' header) and matched against the registry (`registry.match_dit`);
config.json's `model_type` is the last resort.

A diffusers pipeline root (model_index.json with transformer/ (+ transformer_2/), vae/,
text_encoder/, tokenizer/) is a model folder too: its parts are read as components
(`pipeline_parts`). `model_folders_in` tells a folder that holds model folders (the app's
--models-dir) from one model's folder (--model-dir), for the messages that say which was meant.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from wan_lite.errors import CheckpointError
from wan_lite.loading.files import read_json_file, weight_map
from wan_lite.registry import MODELS, VAES, ModelSpec, match_dit, spec_for_task

INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
PIPELINE_INDEX = "model_index.json"  # a diffusers pipeline's root
SINGLE_FILE = "diffusion_pytorch_model.safetensors"
TOKENIZER_FILES = ("spiece.model", "tokenizer.json")  # either is enough for AutoTokenizer

log = logging.getLogger(__name__)


@dataclass
class ModelFiles:
    """Where each component of one model lives. `dit` holds one entry per DiT role of the model
    (`spec.dit_roles`: "main", or "high" and "low"); each entry is the list of safetensors shards."""

    spec: ModelSpec
    root: Path
    dit: dict[str, list[Path]]
    vae: Path
    t5: Path
    tokenizer: Path

    def all_files(self) -> list[Path]:
        files = [p for shards in self.dit.values() for p in shards] + [self.vae, self.t5]
        files += sorted(p for p in self.tokenizer.rglob("*") if p.is_file())
        return files

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.all_files() if p.exists())


def _dit_layout(spec: ModelSpec) -> str:
    folders = [p.folder for p in spec.dits if p.folder]
    if not folders:
        return f"config.json, {INDEX_FILE} and its shards at the top of the folder"
    return f"{' and '.join(f + '/' for f in folders)}, each with config.json, the index and its shards"


def layout_help(spec: ModelSpec | None = None) -> str:
    """The expected official layout of `spec` (of any model when None), for error messages."""
    if spec is not None:
        return (f"Expected layout (as downloaded from huggingface.co/{spec.hf_repo}): {_dit_layout(spec)}; "
                f"{spec.vae_file}; {spec.t5_file}; the tokenizer folder {spec.tokenizer_dir}/.")
    specs = list(MODELS.values())
    dits = " or ".join(dict.fromkeys(_dit_layout(s) for s in specs))
    vaes = " or ".join(f"{v.file} ({', '.join(s.label for s in specs if s.vae == v)})"
                       for v in dict.fromkeys(s.vae for s in specs))
    t5 = " or ".join(dict.fromkeys(s.t5_file for s in specs))
    tok = " or ".join(dict.fromkeys(s.tokenizer_dir + "/" for s in specs))
    return f"Expected layout: {dits}; {vaes}; {t5}; the tokenizer folder {tok}."


def _dit_shards(folder: Path, spec: ModelSpec | None) -> list[Path]:
    """The shard files of one DiT folder, checked against the index."""
    index = folder / INDEX_FILE
    if index.is_file():
        names = sorted(set(weight_map(index).values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(
                f"{folder} is incomplete: {len(missing)} of {len(names)} shard(s) missing: {', '.join(missing)}.",
                "Finish the download (the missing files are listed above). " + layout_help(spec),
            )
        return [folder / n for n in names]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    shards = sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))
    if shards:
        return shards
    raise CheckpointError(f"No DiT weights in {folder}: {INDEX_FILE} is missing.", layout_help(spec))


def _shapes_of(folder: Path) -> tuple[int, int, int, int] | None:
    """(in_dim, out_dim, dim, num_layers) of the DiT in `folder`: from config.json, else from the
    weights' header; None when neither says."""
    cfg = _config(folder)
    keys = ("in_dim", "out_dim", "dim", "num_layers")
    if isinstance(cfg, dict) and all(isinstance(cfg.get(k), int) for k in keys):
        return tuple(cfg[k] for k in keys)  # type: ignore[return-value]
    try:
        shards = _dit_shards(folder, None)
    except CheckpointError:
        return None
    from wan_lite.loading.tensors import SafetensorsSource

    source = SafetensorsSource(shards)
    head = next((k for k in ("head.head.weight", "proj_out.weight") if k in source), None)  # official, diffusers
    if "patch_embedding.weight" not in source or head is None:
        return None
    dim, in_dim = source.shape("patch_embedding.weight")[:2]
    out_dim = source.shape(head)[0] // 4  # (1, 2, 2) patches
    layers = len({k.split(".")[1] for k in source if k.startswith("blocks.")})
    return in_dim, out_dim, dim, layers


def _spec_of(folder: Path, experts: bool) -> ModelSpec | None:
    """The registry model whose DiT (or expert) is in `folder`: by channels and size, else by
    config.json's model_type (a mismatch is then named when the DiT is loaded)."""
    shapes = _shapes_of(folder)
    spec = match_dit(*shapes, experts=experts) if shapes is not None else None
    if spec is not None:
        return spec
    try:
        return spec_for_task(_config(folder).get("model_type"), experts=experts)
    except (ValueError, KeyError):
        return None


def _config(folder: Path) -> dict:
    """The DiT's config.json as a dict; {} when it is missing, unreadable or not a JSON object
    (the weights' header is asked instead, and logged)."""
    path = folder / "config.json"
    if not path.exists():
        return {}
    try:
        cfg = read_json_file(path, "model config")
    except CheckpointError as err:
        log.warning("Ignoring %s", err)
        return {}
    if not isinstance(cfg, dict):
        log.warning("Ignoring %s: it is a JSON %s, not an object.", path, type(cfg).__name__)
        return {}
    return cfg


def is_pipeline_root(root: Path) -> bool:
    """Whether `root` is a diffusers pipeline's root folder (model_index.json)."""
    return (Path(root) / PIPELINE_INDEX).is_file()


def _pipeline_spec(root: Path) -> ModelSpec | None:
    """The model of a diffusers pipeline root, from its transformer/ (two DiT folders: an A14B)."""
    folders = dict.fromkeys(p.diffusers_folder for s in MODELS.values() for p in s.dits)
    present = [f for f in folders if (root / f).is_dir()]
    if not present:
        return None
    return _spec_of(root / present[0], experts=len(present) > 1)


def pipeline_parts(root: Path, spec: ModelSpec, skip: Collection[str] = ()) -> dict[str, Path]:
    """The component slots of `spec` a diffusers pipeline root fills: each slot -> the root (the
    component readers pick the subfolder: transformer/ the DiT or the high-noise expert,
    transformer_2/ the low-noise expert, vae/, text_encoder/, tokenizer/). Slots in `skip` come
    from elsewhere. Raises CheckpointError naming the subfolders that are missing."""
    root = Path(root)
    wanted = {p.slot: p.diffusers_folder for p in spec.dits}
    wanted |= {"vae": "vae", "text_encoder": "text_encoder", "tokenizer": "tokenizer"}
    wanted = {slot: sub for slot, sub in wanted.items() if slot not in skip}
    missing = [f"{sub}/" for sub in wanted.values() if not (root / sub).is_dir()]
    if missing:
        raise CheckpointError(f"The diffusers pipeline {root} has no {', '.join(missing)}.",
                              f"Finish the download of {spec.hf_repo}-Diffusers, or give the missing parts "
                              "as files (--vae, --text-encoder, --tokenizer).")
    return {slot: root for slot in wanted}


def _model_folders_hint(root: Path) -> str:
    """" It holds the model folders A, B: give one of them." when `root` is their parent."""
    inside = model_folders_in(root)
    if not inside:
        return ""
    names = ", ".join(f"{p.name} ({spec.label})" for p, spec in inside)
    return f" It holds the model folders {names}: give one of them, not the folder that holds them."


def model_folders_in(root: Path, limit: int = 50) -> list[tuple[Path, ModelSpec]]:
    """The model folders directly inside `root` (official layout or diffusers pipeline), with
    their models: non-empty when `root` is a folder of model folders (the app's --models-dir)."""
    root = Path(root)
    try:
        subs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))[:limit]
    except OSError:
        return []
    found = []
    for sub in subs:
        spec = model_in(sub)
        if spec is not None:
            found.append((sub, spec))
    return found


def model_in(root: Path) -> ModelSpec | None:
    """The model a folder holds when it is one model's folder, else None (never raises)."""
    try:
        return detect_spec(root, hint=False)
    except (CheckpointError, OSError):
        return None


def detect_spec(root: Path, *, hint: bool = True) -> ModelSpec:
    """Which registry model a folder holds, from its files (an official folder or a diffusers
    pipeline root). `hint`: the error names the model folders inside `root`, if it holds some."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"Model folder not found: {root}", layout_help())
    if is_pipeline_root(root):
        spec = _pipeline_spec(root)
        if spec is None:
            raise CheckpointError(f"The diffusers pipeline {root} has no readable transformer/ folder.",
                                  layout_help())
        return spec
    expert_dirs = dict.fromkeys(p.folder for s in MODELS.values() for p in s.dits if p.folder)
    if any((root / sub).is_dir() for sub in expert_dirs):
        for sub in expert_dirs:
            spec = _spec_of(root / sub, experts=True) if (root / sub).is_dir() else None
            if spec is not None:
                return spec
        names = " or ".join(s.label for s in MODELS.values() if s.experts)
        raise CheckpointError(f"Cannot tell whether {root} holds {names}: "
                              "the expert folders have no readable config.json or weights.",
                              layout_help(next(s for s in MODELS.values() if s.experts)))
    spec = _spec_of(root, experts=False)
    if spec is None:
        raise CheckpointError(f"{root} does not look like a Wan 2.2 model folder."
                              + (_model_folders_hint(root) if hint else ""), layout_help())
    return spec


def find_model(root: Path, name: str | None = None, skip: Collection[str] = ()) -> ModelFiles:
    """Resolve every component file of the model in `root`; raise CheckpointError naming the
    first missing file and the expected layout. Slots in `skip` (of `spec.slots`: "dit" or
    "dit_high" / "dit_low", "vae", "text_encoder", "tokenizer") come from elsewhere and are not
    required here."""
    root = Path(root)
    spec = MODELS[name] if name else detect_spec(root)
    if not root.is_dir():
        raise CheckpointError(f"Model folder not found: {root}", layout_help(spec))
    dit = {}
    for part in spec.dits:
        if part.slot in skip:
            continue
        if part.folder and not (root / part.folder).is_dir():
            raise CheckpointError(f"{root} has no {part.folder}/ folder.", layout_help(spec))
        dit[part.role] = _dit_shards(root / part.folder, spec)
    vae, t5, tok = root / spec.vae_file, root / spec.t5_file, root / spec.tokenizer_dir
    for slot, path in (("vae", vae), ("text_encoder", t5)):
        if slot not in skip and not path.is_file():
            others = [v.file for v in VAES.values() if v != spec.vae and (root / v.file).is_file()]
            extra = (f" {root / others[0]} is there, but {spec.title} needs {spec.vae_file}."
                     if path == vae and others else "")
            raise CheckpointError(f"Missing file: {path}.{extra}", layout_help(spec))
    if "tokenizer" not in skip and (not tok.is_dir() or not any((tok / f).is_file() for f in TOKENIZER_FILES)):
        raise CheckpointError(f"Missing tokenizer folder: {tok} (needs spiece.model or tokenizer.json).",
                              layout_help(spec))
    return ModelFiles(spec=spec, root=root, dit=dit, vae=vae, t5=t5, tokenizer=tok)


@dataclass
class FolderReport:
    """What `python -m wan_lite info` and the models panel show about one folder."""

    root: Path
    spec: ModelSpec | None
    state: str  # "installed", "partial" or "missing"
    found: list[tuple[str, int]] = field(default_factory=list)  # (relative path, bytes)
    problems: list[str] = field(default_factory=list)

    @property
    def size_bytes(self) -> int:
        return sum(size for _, size in self.found)


def inspect_folder(root: Path, name: str | None = None) -> FolderReport:
    """Never raises for a bad folder: describes what is there and what is missing or broken."""
    root = Path(root)
    spec = MODELS[name] if name else None
    if not root.is_dir():
        return FolderReport(root, spec, "missing", problems=[f"{root} does not exist."])
    found = [(str(p.relative_to(root)), p.stat().st_size) for p in sorted(root.rglob("*"))
             if p.is_file() and not p.name.startswith(".")]
    try:
        spec = spec or detect_spec(root)
        if is_pipeline_root(root):
            _check_pipeline(root, spec)
            return FolderReport(root, spec, "installed", found)
        files = find_model(root, spec.name)
        from wan_lite.loading.tensors import read_safetensors_header

        for shard in (p for shards in files.dit.values() for p in shards):
            read_safetensors_header(shard)  # catches truncated downloads
        return FolderReport(root, spec, "installed", found)
    except CheckpointError as err:
        state = "partial" if found else "missing"
        return FolderReport(root, spec, state, found, problems=[str(err)])


def _check_pipeline(root: Path, spec: ModelSpec) -> None:
    """Every part of a diffusers pipeline root is there and readable as what its slot needs
    (headers only); CheckpointError otherwise."""
    from wan_lite.loading.formats import detect, load_component, pick

    parts = pipeline_parts(root, spec)
    for part in spec.dits:
        load_component(parts[part.slot], "dit", model=spec.name, expert=part.role if spec.experts else None)
    load_component(parts["vae"], "vae", model=spec.name)
    load_component(parts["text_encoder"], "text_encoder")
    if pick(detect(root / "tokenizer"), "tokenizer") is None:
        raise CheckpointError(f"{root / 'tokenizer'} holds no tokenizer (spiece.model or tokenizer.json).",
                              f"Finish the download of {spec.hf_repo}-Diffusers.")
