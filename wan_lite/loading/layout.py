"""Recognise a model folder in the official layout (the files of the Wan-AI Hugging Face repos).

    Wan2.2-TI2V-5B/                         Wan2.2-T2V-A14B/ (and I2V-A14B)
      config.json                             high_noise_model/  config.json, index, shards
      diffusion_pytorch_model.safetensors.index.json
      diffusion_pytorch_model-0000K-of-0000N.safetensors
                                              low_noise_model/   config.json, index, shards
      Wan2.2_VAE.pth                          Wan2.1_VAE.pth
      models_t5_umt5-xxl-enc-bf16.pth         models_t5_umt5-xxl-enc-bf16.pth
      google/umt5-xxl/  (tokenizer)           google/umt5-xxl/

The kind of model is read from the DiT's config.json (`model_type`) and, when that is absent,
from the patch embedding's input channels (48 -> ti2v, 16 -> t2v, 36 -> i2v).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from wan_lite.errors import CheckpointError
from wan_lite.registry import MODELS, T5_FILE, TOKENIZER_DIR, ModelSpec, spec_for_task

INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
SINGLE_FILE = "diffusion_pytorch_model.safetensors"
EXPERT_DIRS = {"high": "high_noise_model", "low": "low_noise_model"}
TOKENIZER_FILES = ("spiece.model", "tokenizer.json")  # either is enough for AutoTokenizer
_IN_DIM_TASK = {48: "ti2v", 16: "t2v", 36: "i2v"}


@dataclass
class ModelFiles:
    """Where each component of one model lives. `dit` holds one entry ("main") for TI2V-5B and
    two ("high", "low") for the A14B models; each entry is the list of safetensors shards."""

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


def layout_help(spec: ModelSpec | None = None) -> str:
    if spec is None or not spec.experts:
        dit = f"config.json, {INDEX_FILE} and its shards at the top of the folder"
    else:
        dit = "high_noise_model/ and low_noise_model/, each with config.json, the index and its shards"
    vae = spec.vae_file if spec else "Wan2.2_VAE.pth (TI2V-5B) or Wan2.1_VAE.pth (A14B)"
    repo = f" (as downloaded from huggingface.co/{spec.hf_repo})" if spec else ""
    return f"Expected layout{repo}: {dit}; {vae}; {T5_FILE}; the tokenizer folder {TOKENIZER_DIR}/."


def _dit_shards(folder: Path, spec: ModelSpec | None) -> list[Path]:
    """The shard files of one DiT folder, checked against the index."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index ({err}).",
                                  "Download this file again.") from None
        names = sorted(set(weight_map.values()))
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


def _task_of(folder: Path) -> str | None:
    cfg = folder / "config.json"
    if cfg.is_file():
        try:
            task = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
        except ValueError:
            task = None
        if task in ("ti2v", "t2v", "i2v"):
            return task
    try:
        shards = _dit_shards(folder, None)
    except CheckpointError:
        return None
    from wan_lite.loading.tensors import SafetensorsSource

    source = SafetensorsSource(shards)
    if "patch_embedding.weight" in source:
        return _IN_DIM_TASK.get(source.shape("patch_embedding.weight")[1])
    return None


def detect_spec(root: Path) -> ModelSpec:
    """Which of the three models a folder holds, from its files."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"Model folder not found: {root}", layout_help())
    if (root / EXPERT_DIRS["high"]).is_dir() or (root / EXPERT_DIRS["low"]).is_dir():
        for sub in EXPERT_DIRS.values():
            task = _task_of(root / sub)
            if task in ("t2v", "i2v"):
                return spec_for_task(task)
        raise CheckpointError(f"Cannot tell whether {root} holds T2V-A14B or I2V-A14B: "
                              "the expert folders have no readable config.json or weights.",
                              layout_help(MODELS["t2v-a14b"]))
    task = _task_of(root)
    if task is None:
        raise CheckpointError(f"{root} does not look like a Wan 2.2 model folder.", layout_help())
    return spec_for_task(task)


def find_model(root: Path, name: str | None = None, skip: Collection[str] = ()) -> ModelFiles:
    """Resolve every component file of the model in `root`; raise CheckpointError naming the
    first missing file and the expected layout. Slots in `skip` ("dit", "dit_high", "dit_low",
    "vae", "text_encoder", "tokenizer") come from elsewhere and are not required here."""
    root = Path(root)
    spec = MODELS[name] if name else detect_spec(root)
    if not root.is_dir():
        raise CheckpointError(f"Model folder not found: {root}", layout_help(spec))
    if spec.experts:
        dit = {}
        for role, sub in EXPERT_DIRS.items():
            if f"dit_{role}" in skip:
                continue
            if not (root / sub).is_dir():
                raise CheckpointError(f"{root} has no {sub}/ folder.", layout_help(spec))
            dit[role] = _dit_shards(root / sub, spec)
    else:
        dit = {} if "dit" in skip else {"main": _dit_shards(root, spec)}
    vae, t5, tok = root / spec.vae_file, root / T5_FILE, root / TOKENIZER_DIR
    for slot, path in (("vae", vae), ("text_encoder", t5)):
        if slot not in skip and not path.is_file():
            other = "Wan2.1_VAE.pth" if spec.vae_file == "Wan2.2_VAE.pth" else "Wan2.2_VAE.pth"
            extra = (f" {root / other} is there, but {spec.title} needs {spec.vae_file}."
                     if path == vae and (root / other).is_file() else "")
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
        files = find_model(root, spec.name)
        from wan_lite.loading.tensors import read_safetensors_header

        for shard in (p for shards in files.dit.values() for p in shards):
            read_safetensors_header(shard)  # catches truncated downloads
        return FolderReport(root, spec, "installed", found)
    except CheckpointError as err:
        state = "partial" if found else "missing"
        return FolderReport(root, spec, state, found, problems=[str(err)])
