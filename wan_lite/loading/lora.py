"""LoRA files for the Wan DiT as people have them, normalised to the official parameter names.

`read_lora(path)` reads a safetensors header (a truncated file or one that holds no LoRA is a
CheckpointError naming the file and what it is) and maps every key to the official DiT module or
parameter it targets, whatever the convention:

- official / ComfyUI / Wan2GP / lightx2v: `diffusion_model.blocks.0.self_attn.q.lora_down.weight`,
  `.lora_up.weight`, `.alpha`; also without a prefix and with `lora_A` / `lora_B`;
- kohya / musubi-tuner / LyCORIS: `lora_unet_blocks_0_self_attn_q.lora_down.weight` (underscores,
  mapped back through a table of every known module name, so `cross_attn_norm_k`, `ffn_0` or
  `time_projection_1` are unambiguous);
- PEFT / diffusers: `transformer.blocks.0.attn1.to_q.lora_A.weight`, also under `base_model.model.`
  and with an adapter name (`lora_A.default.weight`); `lora_alpha` from the
  `lora_adapter_metadata` diffusers writes; `lora_B.bias` (PEFT's lora_bias);
- full deltas (distill LoRAs): `.diff` (weight), `.diff_b` (bias), `.diff_m` (modulation).

Scale of a low-rank pair: strength * alpha / rank (no alpha: strength); full deltas: strength.
Wan 2.1 I2V image-branch keys (k_img, v_img, norm_k_img, img_emb) are skipped with a note: Wan 2.2
has no CLIP image branch. `LoRAFile.check(shapes)` validates against a DiT's shapes: keys that
target nothing in it, or a LoRA made for another width (a 14B LoRA on TI2V-5B), are errors that
list what is wrong, before anything is applied.

`LoRASource` merges as it reads: base + the deltas in float32, cast to the requested dtype, so a
16-bit model is filled with the LoRA already in its weights (quantizing afterwards is the caller's
choice). `parse_lora_arg` reads the CLI/API form `FILE[:STRENGTH | :HIGH,LOW]`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wan_lite.errors import CheckpointError
from wan_lite.job import LoRAArg, parse_lora_arg
from wan_lite.loading.keymaps import recognise
from wan_lite.loading.tensors import SafetensorsSource, TensorSource, read_safetensors_header

# Official module (or parameter) -> its diffusers name, inside a block and outside the blocks.
_BLOCK_TABLE = [
    ("modulation", "scale_shift_table"),
    *((f"self_attn.{p}", f"attn1.to_{p}") for p in "qkv"),
    ("self_attn.o", "attn1.to_out.0"),
    *((f"self_attn.norm_{p}", f"attn1.norm_{p}") for p in "qk"),
    *((f"cross_attn.{p}", f"attn2.to_{p}") for p in "qkv"),
    ("cross_attn.o", "attn2.to_out.0"),
    *((f"cross_attn.norm_{p}", f"attn2.norm_{p}") for p in "qk"),
    ("norm3", "norm2"),  # the affine cross-attention norm (diffusers' norm2)
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
]
_GLOBAL_TABLE = [
    ("patch_embedding", "patch_embedding"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.head", "proj_out"),
    ("head.modulation", "scale_shift_table"),
]
# Wan 2.1 I2V / FLF2V CLIP-image branch: recognised, then skipped (Wan 2.2 has none).
_IMAGE_BLOCK_TABLE = [
    ("cross_attn.k_img", "attn2.add_k_proj"),
    ("cross_attn.v_img", "attn2.add_v_proj"),
    ("cross_attn.norm_k_img", "attn2.norm_added_k"),
]
_IMAGE_GLOBAL_TABLE = [
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
]


def _lookup(rows: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Every spelling (official, diffusers, each dotted or with underscores) -> official name.
    Raises at import if two names collide once dots become underscores."""
    table: dict[str, str] = {}
    for official, diffusers in rows:
        for name in (official, diffusers, official.replace(".", "_"), diffusers.replace(".", "_")):
            if table.setdefault(name, official) != official:
                raise RuntimeError(f"LoRA key table: {name!r} is ambiguous")
    return table


_IN_BLOCK = _lookup(_BLOCK_TABLE + _IMAGE_BLOCK_TABLE)
_OUTSIDE = _lookup(_GLOBAL_TABLE + _IMAGE_GLOBAL_TABLE)
_IMAGE_PARTS = ("k_img", "v_img", "norm_k_img", "img_emb")
_BLOCK_KEY = re.compile(r"blocks[._](\d+)[._](.+)")
_BLOCK_LINEAR = re.compile(r"blocks\.\d+\.((self|cross)_attn\.[qkvo]|ffn\.[02])")

# Prefixes seen in the wild; dotted ones may stack (`base_model.model.transformer.`).
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "pipe.dit.",
             "dit.", "model.", "unet.")
_UNDERSCORE_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")
_ADAPTER = r"(?:\.[A-Za-z_][\w-]*)?"  # PEFT adapter name, e.g. `.default`
_SUFFIX = re.compile(
    rf"(?P<module>.+?)\.(?:(?P<down>lora_down|lora_A|lora\.down){_ADAPTER}\.weight"
    rf"|(?P<up>lora_up|lora_B|lora\.up){_ADAPTER}\.weight|(?P<up_bias>lora_B){_ADAPTER}\.bias"
    r"|(?P<alpha>alpha|lora_alpha)|(?P<diff>diff|diff_m)|(?P<diff_b>diff_b))"
)
# Other adapter kinds, by a part of their key names.
_UNSUPPORTED = {"dora_scale": "DoRA", "lora_mid": "LoCon (Tucker)", "hada_": "LoHa", "lokr_": "LoKr",
                ".set_weight": "a weight replacement (set)", "oft_": "OFT"}
_WIDTHS = {1536: "Wan 2.1 T2V-1.3B", 3072: "Wan 2.2 TI2V-5B",
           5120: "a 14B Wan model: Wan 2.2 T2V-A14B / I2V-A14B or Wan 2.1 14B"}


def official_module(module: str) -> str | None:
    """A LoRA key's module part (prefix already removed) -> the official module or parameter
    path: `blocks_3_cross_attn_norm_k` -> `blocks.3.cross_attn.norm_k`,
    `blocks.0.attn1.to_out.0` -> `blocks.0.self_attn.o`; None when it is no Wan DiT layer."""
    if m := _BLOCK_KEY.fullmatch(module):
        inner = _IN_BLOCK.get(m.group(2))
        return None if inner is None else f"blocks.{int(m.group(1))}.{inner}"
    return _OUTSIDE.get(module)


def _strip_prefix(key: str) -> str:
    for _ in range(3):
        for p in _UNDERSCORE_PREFIXES:
            if key.startswith(p):
                return key[len(p):]
        stripped = next((key[len(p):] for p in _PREFIXES if key.startswith(p)), key)
        if stripped == key:
            return key
        key = stripped
    return key


def _is_param(module: str) -> bool:
    """Modulation tables are parameters themselves, not modules holding a `.weight`."""
    return module.endswith("modulation")


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _listing(items: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


@dataclass(frozen=True)
class LoRALayer:
    """What one LoRA holds for one official module (or parameter: the modulation tables).

    down / up / diff / diff_b / up_bias: keys in the file (None when absent); down [r, in...],
    up [out, r...]; diff the full weight (or parameter) delta, diff_b the bias delta, up_bias
    PEFT's lora_B.bias (scaled like the pair). alpha: the file's alpha (None: scale 1 per rank).
    """

    module: str
    down: str | None = None
    up: str | None = None
    alpha: float | None = None
    diff: str | None = None
    diff_b: str | None = None
    up_bias: str | None = None
    rank: int = 0
    rslora: bool = False

    @property
    def weight_param(self) -> str:
        return self.module if _is_param(self.module) else f"{self.module}.weight"

    @property
    def bias_param(self) -> str:
        return f"{self.module}.bias"

    def scale(self, strength: float) -> float:
        """strength * alpha / rank for the low-rank pair (alpha / sqrt(rank) for rsLoRA)."""
        if self.alpha is None or not self.rank:
            return strength
        return strength * self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclass(frozen=True, eq=False)
class LoRAFile:
    """A parsed LoRA: `layers` by official module, `notes` on what was skipped and why, and
    `convention` ("official", "kohya" or "diffusers": what its keys looked like)."""

    path: Path
    layers: dict[str, LoRALayer]
    source: SafetensorsSource = field(repr=False)
    notes: tuple[str, ...] = ()
    convention: str = "official"

    @property
    def name(self) -> str:
        return self.path.name

    def params(self) -> dict[str, tuple[LoRALayer, str]]:
        """Official parameter name -> (layer, "weight" | "bias") for every parameter it changes."""
        out: dict[str, tuple[LoRALayer, str]] = {}
        for layer in self.layers.values():
            if layer.down or layer.diff:
                out[layer.weight_param] = (layer, "weight")
            if layer.diff_b or layer.up_bias:
                out[layer.bias_param] = (layer, "bias")
        return out

    def tensor(self, key: str) -> torch.Tensor:
        return self.source.read(key, torch.float32)

    def unmerged_bytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes `runtime.lora.attach_loras` keeps unmerged for this LoRA on a quantized DiT (the
        factors, and full deltas, of the block Linear layers, in `dtype`), for planning before
        anything is loaded."""
        keys = [k for layer in self.layers.values() if _BLOCK_LINEAR.fullmatch(layer.module)
                for k in (layer.down, layer.up, layer.diff) if k]
        return sum(math.prod(self.source.shape(k)) for k in keys) * dtype.itemsize

    def delta(self, param: str, shape: Sequence[int], strength: float,
              device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The float32 delta of `param` (shaped `shape`) at `strength`, computed on `device`;
        None if this LoRA has none."""
        found = self.params().get(param)
        if found is None or strength == 0:
            return None
        layer, kind = found
        out = torch.zeros(tuple(shape), dtype=torch.float32, device=device)

        def get(key: str) -> torch.Tensor:
            return self.tensor(key).to(device)

        if kind == "bias":
            if layer.diff_b:
                out += strength * get(layer.diff_b).reshape(out.shape)
            if layer.up_bias:
                out += layer.scale(strength) * get(layer.up_bias).reshape(out.shape)
            return out
        if layer.down:
            down, up = get(layer.down), get(layer.up)
            out += layer.scale(strength) * (up.reshape(up.shape[0], layer.rank) @ down.reshape(layer.rank, -1)).reshape(out.shape)
        if layer.diff:
            out += strength * get(layer.diff).reshape(out.shape)
        return out

    def check(self, shapes: Mapping[str, Sequence[int]], what: str = "DiT") -> None:
        """Raise CheckpointError unless every layer targets a parameter of the model with
        `shapes` (official name -> shape) and fits its shape. Reads no tensor data."""
        shapes = {k: tuple(v) for k, v in shapes.items()}
        missing, wrong = [], []
        for layer in self.layers.values():
            wanted = shapes.get(layer.weight_param)
            if wanted is None:
                missing.append(layer.module)
                continue
            for key, kind in ((layer.down, "down"), (layer.up, "up"), (layer.diff, "diff"),
                              (layer.diff_b, "diff_b"), (layer.up_bias, "bias")):
                if key is None:
                    continue
                have = tuple(self.source.shape(key))
                target = shapes.get(layer.bias_param) if kind in ("diff_b", "bias") else wanted
                if target is None:
                    ok = False
                elif kind == "down":
                    ok = len(target) >= 2 and math.prod(have[1:]) == math.prod(target[1:])
                elif kind == "up":
                    ok = have[0] == target[0]
                else:
                    ok = math.prod(have) == math.prod(target) and _squeezed(have) == _squeezed(target)
                if not ok:
                    wrong.append((key, have, target))
        mine = self.width()
        dim = next((v[-1] for k, v in shapes.items() if k.endswith("modulation")), None)
        if (missing or wrong) and mine is not None and dim is not None and mine != dim:
            model = f" ({_WIDTHS[dim]})" if dim in _WIDTHS else ""
            raise CheckpointError(f"The LoRA {self.path} is for a DiT {mine} wide ({_WIDTHS.get(mine, 'another model')});"
                                  f" this {what} is {dim} wide{model}.", "Use a LoRA made for this model.")
        if missing:
            blocks = sum(1 for k in shapes if re.fullmatch(r"blocks\.\d+\.modulation", k))
            raise CheckpointError(
                f"The LoRA {self.path} has layers that target nothing in this {what} ({blocks} blocks): "
                f"{_listing(sorted(missing))}.",
                "The LoRA is for another model; use a LoRA made for this one.",
            )
        if wrong:
            shown = [f"{k} {_shape_text(h)} vs {_shape_text(t) if t else 'no such tensor'}" for k, h, t in wrong]
            raise CheckpointError(f"The LoRA {self.path} does not fit this {what}'s shapes: {_listing(shown, 4)}.",
                                  "Use a LoRA made for this model.")

    def width(self) -> int | None:
        """The DiT width this LoRA was made for, from its attention layers (None if it has none)."""
        for layer in self.layers.values():
            if _BLOCK_LINEAR.fullmatch(layer.module) and "ffn" not in layer.module:
                key = layer.up or layer.diff or layer.diff_b
                if key:
                    return self.source.shape(key)[0]
            if _is_param(layer.module) and layer.diff:
                return self.source.shape(layer.diff)[-1]
        return None


def _squeezed(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(s for s in shape if s != 1)


def _peft_alpha(metadata: Mapping[str, str]) -> tuple[float | None, dict[str, float], bool]:
    """(lora_alpha, alpha_pattern, use_rslora) from diffusers' `lora_adapter_metadata` (PEFT's
    LoraConfig as JSON), when the file has one."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, {}, False
    try:
        cfg = json.loads(raw)
        alpha = cfg.get("lora_alpha")
        pattern = {str(k): float(v) for k, v in (cfg.get("alpha_pattern") or {}).items()}
        return (None if alpha is None else float(alpha)), pattern, bool(cfg.get("use_rslora"))
    except (ValueError, TypeError, AttributeError, RecursionError):  # not PEFT's shape: no alpha from it
        return None, {}, False


def _pattern_alpha(pattern: Mapping[str, float], module: str) -> float | None:
    """PEFT's rule: a pattern matches a module name that ends with it at a dot boundary."""
    for key, alpha in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return alpha
    return None


def _not_a_lora(path: Path, header: dict) -> CheckpointError:
    keys = {k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items() if k != "__metadata__"}
    if not keys:
        return CheckpointError(f"{path} holds no tensors: it is not a LoRA.", "Choose a LoRA .safetensors file.")
    found = recognise(keys, path)
    what = {"dit": "a Wan DiT (a model, not a LoRA)", "vae": "a VAE", "text_encoder": "a text encoder"}.get(
        found.role, f"no Wan component ({found.details})")
    if found.variant and found.role == "dit":
        what = f"a Wan DiT ({found.variant}), a model rather than a LoRA"
    return CheckpointError(f"{path} holds no LoRA tensors (lora_down/up, lora_A/B, diff): it looks like {what}.",
                           "Choose a LoRA file; models go in the model folder.")


def read_lora(path: Path | str) -> LoRAFile:
    """Parse a LoRA safetensors file (header, alphas and key names; no weights are read).

    Raises CheckpointError naming the file for a truncated or non-safetensors file, a file that
    holds no LoRA, an adapter kind wan_lite cannot apply (LoKr, DoRA, ...), keys that target no
    Wan DiT layer, and incomplete low-rank pairs.
    """
    path = Path(path)
    try:
        header = read_safetensors_header(path)
    except CheckpointError as err:
        raise CheckpointError(f"LoRA file: {err.message}", err.hint) from None
    metadata = header.get("__metadata__") or {}
    names = [k for k in header if k != "__metadata__"]
    for part, kind in _UNSUPPORTED.items():
        if any(part in k for k in names):
            raise CheckpointError(f"The LoRA {path} is {kind} ({next(k for k in names if part in k)}), "
                                  "which wan_lite cannot apply.", "Use a plain LoRA (lora_down/lora_up).")
    parsed: list[tuple[str, str, str]] = []  # (file key, module part, role)
    for key in names:
        m = _SUFFIX.fullmatch(_strip_prefix(key))
        if m is None:
            continue
        role = next(r for r in ("down", "up", "up_bias", "alpha", "diff", "diff_b") if m.group(r))
        module = m.group("module")
        if m.group("diff") == "diff_m":
            module += ".modulation"
        parsed.append((key, module, role))
    if not parsed:
        raise _not_a_lora(path, header)
    source = SafetensorsSource([path])
    peft_alpha, alpha_pattern, rslora = _peft_alpha(metadata)
    groups: dict[str, dict[str, str]] = {}
    spelled: dict[str, str] = {}
    unknown, image, duplicate = [], [], []
    for key, module, role in parsed:
        official = official_module(module)
        if official is None:
            unknown.append(key)
        elif any(part in official for part in _IMAGE_PARTS):
            image.append(key)
        elif groups.setdefault(official, {}).setdefault(role, key) != key:
            duplicate.append(key)
        else:
            spelled[official] = module
    unparsed = sorted(set(names) - {k for k, _m, _r in parsed})
    if unknown or unparsed:
        raise CheckpointError(f"The LoRA {path} has keys that target no layer of a Wan DiT: "
                              f"{_listing(sorted(unknown + unparsed))}.",
                              "It is a LoRA for another model or in a layout wan_lite does not know.")
    if duplicate:
        raise CheckpointError(f"The LoRA {path} names the same layer twice: {_listing(sorted(duplicate))}.",
                              "The file mixes two LoRAs; use each on its own.")
    layers, notes, lone = {}, [], []
    for official, roles in groups.items():
        if ("down" in roles) != ("up" in roles) or ("up_bias" in roles and "down" not in roles):
            lone.append(roles.get("down") or roles.get("up") or roles["up_bias"])
            continue
        if set(roles) == {"alpha"}:
            notes.append(f"{roles['alpha']}: an alpha without its lora_down/lora_up, ignored")
            continue
        rank = source.shape(roles["down"])[0] if "down" in roles else 0
        if rank and source.shape(roles["up"])[1] != rank:
            lone.append(f"{roles['up']} {_shape_text(source.shape(roles['up']))} (rank {rank} in lora_down)")
            continue
        alpha = None
        if "alpha" in roles:
            alpha = float(source.read(roles["alpha"], torch.float32).reshape(-1)[0])
        elif rank and peft_alpha is not None:
            alpha = _pattern_alpha(alpha_pattern, spelled[official])
            alpha = peft_alpha if alpha is None else alpha
        if alpha is not None and not math.isfinite(alpha):
            lone.append(f"{roles['alpha']} = {alpha}")
            continue
        layers[official] = LoRALayer(official, roles.get("down"), roles.get("up"), alpha, roles.get("diff"),
                                     roles.get("diff_b"), roles.get("up_bias"), rank, rslora)
    if lone:
        raise CheckpointError(f"The LoRA {path} has incomplete or inconsistent low-rank pairs: {_listing(lone)}.",
                              "The file is damaged or was saved incompletely; download it again.")
    if image:
        notes.append(f"skipped {len(image)} Wan 2.1 image-branch tensors (k_img, v_img, norm_k_img, img_emb): "
                     "Wan 2.2 has no CLIP image branch")
    if not layers:
        raise CheckpointError(f"The LoRA {path} holds nothing for a Wan 2.2 DiT ({'; '.join(notes)}).",
                              "Use a LoRA made for a Wan 2.2 model.")
    return LoRAFile(path, layers, source, tuple(notes), _convention(names))


def _convention(names: Sequence[str]) -> str:
    first = names[0]
    if any(first.startswith(p) for p in _UNDERSCORE_PREFIXES):
        return "kohya"
    return "diffusers" if any(".attn1." in k or ".attn2." in k or "proj_out" in k or "condition_embedder" in k
                              for k in names) else "official"


def load_lora(path: Path | str, shapes: Mapping[str, Sequence[int]], what: str = "DiT") -> LoRAFile:
    """`read_lora(path)`, checked against a DiT's shapes (official name -> shape)."""
    lora = read_lora(path)
    lora.check(shapes, what)
    return lora


# ------------------------------------------------------------------------------- merge as read
class LoRASource(TensorSource):
    """`base` with LoRAs merged into the tensors they change, as each tensor is read.

    read(name, dtype): base + the sum of every LoRA's delta at its strength, in float32, cast
    once to `dtype` (or the base's stored dtype). A tensor no LoRA changes, or only LoRAs at
    strength 0 change, is the base's own read, bit for bit. Every LoRA is checked against the
    base's shapes when the source is made, so a bad one fails before any tensor is read.
    only: merge just these parameter names (e.g. the float parameters `attach_loras` merged,
    for re-filling a model that runs the rest unmerged); None: all.
    """

    def __init__(self, base: TensorSource, loras: Sequence[tuple[LoRAFile, float]], *,
                 only: Iterable[str] | None = None, what: str = "DiT") -> None:
        self.base = base
        self.loras = [(lora, float(s)) for lora, s in loras]
        shapes = base.shapes()
        for lora, _strength in self.loras:
            lora.check(shapes, what)
        keep = None if only is None else set(only)
        self._deltas: dict[str, list[tuple[LoRAFile, float]]] = {}
        for lora, strength in self.loras:
            if strength == 0:
                continue
            for param in lora.params():
                if keep is None or param in keep:
                    self._deltas.setdefault(param, []).append((lora, strength))
        self.files = tuple(base.files) + tuple(lora.path for lora, _s in self.loras)

    @property
    def changed(self) -> frozenset[str]:
        """The parameter names whose reads differ from the base."""
        return frozenset(self._deltas)

    def identity(self) -> list[dict[str, object]]:
        """(path, size, mtime, strength) of every LoRA: what a cache of merged weights must key on."""
        out = []
        for lora, strength in self.loras:
            st = lora.path.stat()
            out.append({"lora": str(lora.path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                        "strength": strength})
        return out

    def read(self, name: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
             base_values: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor with the LoRAs merged (float32, rounded once to `dtype`), the merge done on
        `device` (a GPU merges a 14B expert's layers in a fraction of the CPU's time).
        base_values: the base's tensor as stored, already at hand (a model's own plain tensor on
        the GPU): used instead of reading the base again, which for a 14B expert means moving 28 GB
        from host memory; the result is the same."""
        deltas = self._deltas.get(name)
        if not deltas:
            return self.base.read(name, dtype)
        shape = self.base.shape(name)
        if base_values is not None and (base_values.dtype != self.base.dtype(name)
                                        or tuple(base_values.shape) != tuple(shape)):
            raise ValueError(f"{name}: the values given are not the base's tensor as stored")
        # read as stored and moved first (half the bytes of float32 for a bf16 file), then widened
        # where the merge runs; it may be the base's own tensor: never add in place
        merged = (self.base.read(name) if base_values is None else base_values).to(device).float()
        for lora, strength in deltas:
            merged = merged + lora.delta(name, shape, strength, device)
        return merged.to(dtype or self.base.dtype(name))

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)

    def __contains__(self, name: object) -> bool:
        return name in self.base

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.base.shape(name))

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self.base.shapes()

    def describe(self) -> str:
        loras = ", ".join(f"{lora.name} x{strength:g}" for lora, strength in self.loras)
        return f"{self.base.describe()} + LoRA {loras}" if loras else self.base.describe()


__all__ = ["LoRAArg", "LoRAFile", "LoRALayer", "LoRASource", "load_lora", "official_module", "parse_lora_arg",
           "read_lora", "speed_lora"]


# Words that name the step-distilled speed LoRAs people use with Wan (Wan2.2-Lightning, the lightx2v
# distill and CFG-step-distill LoRAs, CausVid, AccVid, FastWan), in file names or in the file's
# safetensors metadata.
_SPEED_WORDS = ("lightning", "lightx2v", "distill", "causvid", "accvid", "fastwan", "4step", "4-step", "4_step",
                "8step", "8-step", "8_step", "turbo")


def speed_lora(path: str | Path) -> str | None:
    """Why the LoRA file at `path` looks like a step-distilled speed LoRA (None when it does not):
    its name or its metadata names one. Reads the header only; a file that cannot be read is not
    one (it is refused later, with the reason, when the LoRAs are read)."""
    path = Path(path)
    name = path.name.lower()
    for word in _SPEED_WORDS:
        if word in name:
            return f"its name says {word!r}"
    try:
        metadata = read_safetensors_header(path).get("__metadata__") or {}
    except (OSError, ValueError, CheckpointError):
        return None
    text = " ".join(f"{k} {v}" for k, v in metadata.items() if isinstance(v, str)).lower()
    for word in _SPEED_WORDS:
        if word in text:
            return f"its metadata says {word!r}"
    return None
