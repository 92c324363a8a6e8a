"""Tensor-name maps between the official Wan 2.2 checkpoints and the other formats people have.

Every map is a function `key -> key | None` (None: the key has no counterpart and is dropped).
Maps are written as explicit patterns, one per tensor family, never as chained substring
replacements: diffusers' own converter swaps `norm2`/`norm3` through a placeholder, which is easy
to get wrong when reversed.

`recognise(tensor table, path)` tells which component a checkpoint is from its names and shapes.

Families covered:
- DiT: official `WanModel` <-> diffusers `WanTransformer3DModel`.
- VAE 2.1 and 2.2: official <-> diffusers `AutoencoderKLWan` (their block nesting differs).
- umT5 encoder: official <-> Hugging Face `UMT5EncoderModel` (also the ComfyUI single file; the
  table is the text encoder's own), and llama.cpp GGUF `t5encoder` names -> official.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from wan_lite.loading.sources import is_quant_aux
from wan_lite.registry import MODELS, VAES, match_dit

# Placeholders usable in the rule templates below, with the text each one matches.
_SLOTS = {
    "n": r"\d+",
    "p": r"weight|bias",
    "qkv": r"q|k|v",
    "qk": r"q|k",
    "side": r"encoder|decoder",
}


class _Rules:
    """A two-column table of name templates, usable in both directions.

    Each row is (official template, other template); `{slot}` parts are copied across, so
    "blocks.{n}.self_attn.{qkv}.{p}" <-> "blocks.{n}.attn1.to_{qkv}.{p}" maps all 6 projections of
    every block. A key that matches no row maps to None.
    """

    def __init__(self, rows: Iterable[tuple[str, str]]) -> None:
        self.rows = tuple(rows)
        self._fwd = [(self._compile(a), b) for a, b in self.rows]
        self._rev = [(self._compile(b), a) for a, b in self.rows]

    @staticmethod
    def _compile(template: str) -> re.Pattern[str]:
        out, pos = [], 0
        for m in re.finditer(r"\{(\w+)\}", template):
            out.append(re.escape(template[pos : m.start()]))
            out.append(f"(?P<{m.group(1)}>{_SLOTS[m.group(1)]})")
            pos = m.end()
        out.append(re.escape(template[pos:]))
        return re.compile("".join(out))

    @staticmethod
    def _apply(table: list[tuple[re.Pattern[str], str]], key: str) -> str | None:
        for pattern, target in table:
            m = pattern.fullmatch(key)
            if m:
                return target.format(**m.groupdict())
        return None

    def forward(self, key: str) -> str | None:
        return self._apply(self._fwd, key)

    def reverse(self, key: str) -> str | None:
        return self._apply(self._rev, key)


# --------------------------------------------------------------------------------------------
# DiT: official WanModel <-> diffusers WanTransformer3DModel.

_DIT = _Rules(
    [
        ("patch_embedding.{p}", "patch_embedding.{p}"),
        ("text_embedding.0.{p}", "condition_embedder.text_embedder.linear_1.{p}"),
        ("text_embedding.2.{p}", "condition_embedder.text_embedder.linear_2.{p}"),
        ("time_embedding.0.{p}", "condition_embedder.time_embedder.linear_1.{p}"),
        ("time_embedding.2.{p}", "condition_embedder.time_embedder.linear_2.{p}"),
        ("time_projection.1.{p}", "condition_embedder.time_proj.{p}"),
        ("head.head.{p}", "proj_out.{p}"),
        ("head.modulation", "scale_shift_table"),
        ("blocks.{n}.modulation", "blocks.{n}.scale_shift_table"),
        ("blocks.{n}.self_attn.{qkv}.{p}", "blocks.{n}.attn1.to_{qkv}.{p}"),
        ("blocks.{n}.self_attn.o.{p}", "blocks.{n}.attn1.to_out.0.{p}"),
        ("blocks.{n}.self_attn.norm_{qk}.weight", "blocks.{n}.attn1.norm_{qk}.weight"),
        ("blocks.{n}.cross_attn.{qkv}.{p}", "blocks.{n}.attn2.to_{qkv}.{p}"),
        ("blocks.{n}.cross_attn.o.{p}", "blocks.{n}.attn2.to_out.0.{p}"),
        ("blocks.{n}.cross_attn.norm_{qk}.weight", "blocks.{n}.attn2.norm_{qk}.weight"),
        # The only affine norm of a block is the cross-attention norm: official `norm3`,
        # diffusers `norm2` (diffusers' norm1/norm3 and official norm1/norm2 have no parameters).
        ("blocks.{n}.norm3.{p}", "blocks.{n}.norm2.{p}"),
        ("blocks.{n}.ffn.0.{p}", "blocks.{n}.ffn.net.0.proj.{p}"),
        ("blocks.{n}.ffn.2.{p}", "blocks.{n}.ffn.net.2.{p}"),
    ]
)


def dit_official_to_diffusers(key: str) -> str | None:
    """`blocks.3.norm3.weight` -> `blocks.3.norm2.weight`, ...; None for non-Wan-2.2 keys."""
    return _DIT.forward(key)


def dit_diffusers_to_official(key: str) -> str | None:
    """Inverse of `dit_official_to_diffusers`."""
    return _DIT.reverse(key)


# --------------------------------------------------------------------------------------------
# VAE: official <-> diffusers AutoencoderKLWan. Both versions share the leaf names;
# they differ in how residual blocks and resamplers are nested.

# Inside a residual block (official `residual` Sequential: 0 norm, 1 SiLU, 2 conv, 3 norm,
# 4 SiLU, 5 dropout, 6 conv).
_RES_LEAF = _Rules(
    [
        ("residual.0.gamma", "norm1.gamma"),
        ("residual.2.{p}", "conv1.{p}"),
        ("residual.3.gamma", "norm2.gamma"),
        ("residual.6.{p}", "conv2.{p}"),
        ("shortcut.{p}", "conv_shortcut.{p}"),
    ]
)
_RESAMPLE_LEAF = _Rules([("resample.1.{p}", "resample.1.{p}"), ("time_conv.{p}", "time_conv.{p}")])
_ATTN_LEAF = _Rules([("norm.gamma", "norm.gamma"), ("to_qkv.{p}", "to_qkv.{p}"), ("proj.{p}", "proj.{p}")])

_VAE_FIXED = _Rules(
    [
        ("conv1.{p}", "quant_conv.{p}"),
        ("conv2.{p}", "post_quant_conv.{p}"),
        ("{side}.conv1.{p}", "{side}.conv_in.{p}"),
        ("{side}.head.0.gamma", "{side}.norm_out.gamma"),
        ("{side}.head.2.{p}", "{side}.conv_out.{p}"),
    ]
)

# Both VAEs use num_res_blocks = 2: the 2.1 decoder's flat `upsamples` list therefore holds
# 3 residual blocks + 1 resampler per level (stride 4), the 2.2 encoder/decoder levels hold
# 2 / 3 residual blocks with the resampler right after them.
_NUM_RES_BLOCKS = 2
_DEC21_STRIDE = _NUM_RES_BLOCKS + 2

_OFF_MID = re.compile(r"(?P<side>encoder|decoder)\.middle\.(?P<i>[012])\.(?P<leaf>.+)")
_OFF_ENC21 = re.compile(r"encoder\.downsamples\.(?P<i>\d+)\.(?P<leaf>.+)")
_OFF_DEC21 = re.compile(r"decoder\.upsamples\.(?P<k>\d+)\.(?P<leaf>.+)")
_OFF_ENC22 = re.compile(r"encoder\.downsamples\.(?P<i>\d+)\.downsamples\.(?P<j>\d+)\.(?P<leaf>.+)")
_OFF_DEC22 = re.compile(r"decoder\.upsamples\.(?P<i>\d+)\.upsamples\.(?P<j>\d+)\.(?P<leaf>.+)")

_DIF_MID_RES = re.compile(r"(?P<side>encoder|decoder)\.mid_block\.resnets\.(?P<j>[01])\.(?P<leaf>.+)")
_DIF_MID_ATTN = re.compile(r"(?P<side>encoder|decoder)\.mid_block\.attentions\.0\.(?P<leaf>.+)")
_DIF_ENC21 = re.compile(r"encoder\.down_blocks\.(?P<i>\d+)\.(?P<leaf>.+)")
_DIF_UP_RES = re.compile(r"decoder\.up_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)\.(?P<leaf>.+)")
_DIF_UP21 = re.compile(r"decoder\.up_blocks\.(?P<i>\d+)\.upsamplers\.0\.(?P<leaf>.+)")
_DIF_UP22 = re.compile(r"decoder\.up_blocks\.(?P<i>\d+)\.upsampler\.(?P<leaf>.+)")
_DIF_DOWN_RES = re.compile(r"encoder\.down_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)\.(?P<leaf>.+)")
_DIF_DOWN22 = re.compile(r"encoder\.down_blocks\.(?P<i>\d+)\.downsampler\.(?P<leaf>.+)")


def _block_leaf(leaf: str, forward: bool) -> str | None:
    """A leaf of a residual block or resampler (the two never share a leaf name)."""
    for rules in (_RES_LEAF, _RESAMPLE_LEAF):
        out = rules.forward(leaf) if forward else rules.reverse(leaf)
        if out is not None:
            return out
    return None


def _join(prefix: str, leaf: str | None) -> str | None:
    return None if leaf is None else f"{prefix}.{leaf}"


def vae_official_to_diffusers(key: str, version: str) -> str | None:
    """Official VAE key -> AutoencoderKLWan key. `version` is "2.1" or "2.2"."""
    fixed = _VAE_FIXED.forward(key)
    if fixed is not None:
        return fixed
    if m := _OFF_MID.fullmatch(key):
        side, i, leaf = m["side"], int(m["i"]), m["leaf"]
        if i == 1:
            return _join(f"{side}.mid_block.attentions.0", _ATTN_LEAF.forward(leaf))
        return _join(f"{side}.mid_block.resnets.{i // 2}", _RES_LEAF.forward(leaf))
    if version == "2.1":
        if m := _OFF_ENC21.fullmatch(key):
            return _join(f"encoder.down_blocks.{m['i']}", _block_leaf(m["leaf"], True))
        if m := _OFF_DEC21.fullmatch(key):
            level, j = divmod(int(m["k"]), _DEC21_STRIDE)
            if j == _DEC21_STRIDE - 1:
                return _join(f"decoder.up_blocks.{level}.upsamplers.0", _RESAMPLE_LEAF.forward(m["leaf"]))
            return _join(f"decoder.up_blocks.{level}.resnets.{j}", _RES_LEAF.forward(m["leaf"]))
        return None
    if version == "2.2":
        if m := _OFF_ENC22.fullmatch(key):
            i, j = m["i"], int(m["j"])
            if j == _NUM_RES_BLOCKS:
                return _join(f"encoder.down_blocks.{i}.downsampler", _RESAMPLE_LEAF.forward(m["leaf"]))
            return _join(f"encoder.down_blocks.{i}.resnets.{j}", _RES_LEAF.forward(m["leaf"]))
        if m := _OFF_DEC22.fullmatch(key):
            i, j = m["i"], int(m["j"])
            if j == _NUM_RES_BLOCKS + 1:
                return _join(f"decoder.up_blocks.{i}.upsampler", _RESAMPLE_LEAF.forward(m["leaf"]))
            return _join(f"decoder.up_blocks.{i}.resnets.{j}", _RES_LEAF.forward(m["leaf"]))
        return None
    raise ValueError(f"VAE version must be '2.1' or '2.2', got {version!r}")


def vae_diffusers_to_official(key: str, version: str) -> str | None:
    """AutoencoderKLWan key -> official VAE key. `version` is "2.1" or "2.2"."""
    fixed = _VAE_FIXED.reverse(key)
    if fixed is not None:
        return fixed
    if m := _DIF_MID_ATTN.fullmatch(key):
        return _join(f"{m['side']}.middle.1", _ATTN_LEAF.reverse(m["leaf"]))
    if m := _DIF_MID_RES.fullmatch(key):
        return _join(f"{m['side']}.middle.{2 * int(m['j'])}", _RES_LEAF.reverse(m["leaf"]))
    if version == "2.1":
        if m := _DIF_UP_RES.fullmatch(key):
            k = int(m["i"]) * _DEC21_STRIDE + int(m["j"])
            return _join(f"decoder.upsamples.{k}", _RES_LEAF.reverse(m["leaf"]))
        if m := _DIF_UP21.fullmatch(key):
            k = int(m["i"]) * _DEC21_STRIDE + _DEC21_STRIDE - 1
            return _join(f"decoder.upsamples.{k}", _RESAMPLE_LEAF.reverse(m["leaf"]))
        if m := _DIF_ENC21.fullmatch(key):
            return _join(f"encoder.downsamples.{m['i']}", _block_leaf(m["leaf"], False))
        return None
    if version == "2.2":
        if m := _DIF_DOWN_RES.fullmatch(key):
            return _join(f"encoder.downsamples.{m['i']}.downsamples.{m['j']}", _RES_LEAF.reverse(m["leaf"]))
        if m := _DIF_DOWN22.fullmatch(key):
            prefix = f"encoder.downsamples.{m['i']}.downsamples.{_NUM_RES_BLOCKS}"
            return _join(prefix, _RESAMPLE_LEAF.reverse(m["leaf"]))
        if m := _DIF_UP_RES.fullmatch(key):
            return _join(f"decoder.upsamples.{m['i']}.upsamples.{m['j']}", _RES_LEAF.reverse(m["leaf"]))
        if m := _DIF_UP22.fullmatch(key):
            prefix = f"decoder.upsamples.{m['i']}.upsamples.{_NUM_RES_BLOCKS + 1}"
            return _join(prefix, _RESAMPLE_LEAF.reverse(m["leaf"]))
        return None
    raise ValueError(f"VAE version must be '2.1' or '2.2', got {version!r}")


# --------------------------------------------------------------------------------------------
# umT5-XXL encoder: llama.cpp GGUF `t5encoder` names, and the HF names.

_T5_GGUF = _Rules(
    [
        ("token_embedding.weight", "token_embd.weight"),
        ("blocks.{n}.norm1.weight", "enc.blk.{n}.attn_norm.weight"),
        ("blocks.{n}.attn.{qkv}.weight", "enc.blk.{n}.attn_{qkv}.weight"),
        ("blocks.{n}.attn.o.weight", "enc.blk.{n}.attn_o.weight"),
        ("blocks.{n}.pos_embedding.embedding.weight", "enc.blk.{n}.attn_rel_b.weight"),
        ("blocks.{n}.norm2.weight", "enc.blk.{n}.ffn_norm.weight"),
        ("blocks.{n}.ffn.gate.0.weight", "enc.blk.{n}.ffn_gate.weight"),
        ("blocks.{n}.ffn.fc1.weight", "enc.blk.{n}.ffn_up.weight"),
        ("blocks.{n}.ffn.fc2.weight", "enc.blk.{n}.ffn_down.weight"),
        ("norm.weight", "enc.output_norm.weight"),
    ]
)


def t5_official_to_hf(key: str) -> str | None:
    """Official umT5 key -> Hugging Face UMT5EncoderModel key (None if not an encoder key).

    The table lives with the text encoder (wan_lite.models.text_encoder), imported on first use
    because it pulls in transformers.
    """
    from wan_lite.models.text_encoder import official_to_hf_key

    try:
        return official_to_hf_key(key)
    except KeyError:
        return None


def t5_hf_to_official(key: str) -> str | None:
    """HF UMT5 (diffusers text_encoder/, ComfyUI umt5 files) -> official; other keys -> None.

    `shared.weight` and its tied alias `encoder.embed_tokens.weight` both map to
    `token_embedding.weight`; a RenamedSource keeps whichever comes first.
    """
    from wan_lite.models.text_encoder import hf_to_official_key

    try:
        return hf_to_official_key(key)
    except KeyError:
        return None


def t5_gguf_to_official(key: str) -> str | None:
    """llama.cpp `t5encoder` GGUF tensor name -> official umT5 key."""
    return _T5_GGUF.reverse(key)


def t5_official_to_gguf(key: str) -> str | None:
    """Official umT5 key -> llama.cpp `t5encoder` GGUF tensor name."""
    return _T5_GGUF.forward(key)


# --------------------------------------------------------------------------------------------
# Recognising a checkpoint from its tensor names and shapes (and what wan_lite cannot run: LoRAs,
# Wan 2.1 and VACE DiTs, unknown shapes)

_LORA_KEY = re.compile(r"lora_[AB]\b|lora_(?:up|down)\b|\.lora\.|\.alpha$|\.diff(?:_b)?$|\.(?:lokr|hada)_")
_DIT_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.")
_VAE_PREFIXES = ("", "vae.", "first_stage_model.")
_BLOCK = re.compile(r"blocks\.(\d+)\.")
_VERSION_IN_NAME = re.compile(r"wan[\s_.-]?2[._-]?([12])(?!\d)", re.IGNORECASE)
_EXPERT_IN_NAME = re.compile(r"(high|low)[\s_.-]?noise", re.IGNORECASE)
# DiTs that are not Wan 2.2 models but have no extra tensors: (dim, layers, in_dim) -> what they are
_OTHER_DITS = {(1536, 30, 16): "Wan 2.1 T2V-1.3B"}
# Wan 2.1 I2V / FLF2V CLIP-image layers, official and diffusers names.
_WAN21_IMAGE_LAYERS = ("img_emb", "k_img", "v_img", "image_embedder", "add_k_proj", "add_v_proj")
# umT5 naming -> (embedding keys, relative-position table of layer N, any key of layer N)
_T5_NAMES = {
    "official": (("token_embedding.weight",), r"blocks\.(\d+)\.pos_embedding\.embedding\.weight",
                 r"blocks\.(\d+)\."),
    "hf": (("shared.weight", "encoder.embed_tokens.weight"),
           r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight",
           r"encoder\.block\.(\d+)\."),
    "llama.cpp": (("token_embd.weight",), r"enc\.blk\.(\d+)\.attn_rel_b\.weight", r"enc\.blk\.(\d+)\."),
}


@dataclass(frozen=True)
class Recognised:
    """What a tensor table is: role ("dit", "vae", "text_encoder", "lora", "unknown"), the
    naming scheme inside, variant, expert hint, key prefix, a details line and, for anything
    wan_lite cannot run, the problem."""

    role: str
    naming: str = "official"
    variant: str | None = None
    expert: str | None = None
    prefix: str = ""
    details: str = ""
    has_tokenizer: bool = False
    problem: str | None = None


def _name_hint(path: Path, pattern: re.Pattern[str]) -> re.Match[str] | None:
    """The first match in the file name or its nearest folders (HF cache: the repo folder)."""
    for part in (path.name, *(p.name for p in list(path.parents)[:4])):
        if m := pattern.search(part):
            return m
    return None


def _classify_dit(shapes: dict[str, tuple[int, ...]], path: Path) -> Recognised:
    """Official-named DiT shapes -> variant, expert hint and, for non-Wan-2.2 DiTs, the problem."""
    dim = shapes["head.modulation"][-1]
    in_dim = shapes["patch_embedding.weight"][1]
    out_dim = shapes["head.head.weight"][0] // 4 if "head.head.weight" in shapes else 0
    layers = len({int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))})
    details = f"dim {dim}, {layers} layers, {in_dim} input channels"
    extras = [k for k in shapes if dit_official_to_diffusers(k) is None and not is_quant_aux(k)]
    spec = match_dit(in_dim, out_dim, dim, layers)
    hint = _name_hint(path, _VERSION_IN_NAME)
    expert = m.group(1).lower() if (m := _name_hint(path, _EXPERT_IN_NAME)) else None
    problem = None
    if any(part in k for k in extras for part in _WAN21_IMAGE_LAYERS):
        problem = ("it is a Wan 2.1 image-to-video DiT (it has the CLIP image layers img_emb / k_img, which "
                   "Wan 2.2 dropped); use the Wan 2.2 I2V-A14B high-noise and low-noise expert files.")
    elif any(k.startswith("vace_") for k in extras):
        problem = "it is a Wan VACE DiT (vace_blocks); wan_lite runs the plain Wan 2.2 models."
    elif extras:
        problem = (f"it has {len(extras)} tensor(s) no Wan 2.2 DiT has (e.g. {extras[0]}): "
                   "another Wan variant, which wan_lite does not run.")
    elif (dim, layers, in_dim) in _OTHER_DITS:
        problem = f"it is {_OTHER_DITS[dim, layers, in_dim]}; wan_lite runs the Wan 2.2 models."
    elif spec is None:
        known = ", ".join(f"{s.label} {s.dit_in_dim}/{s.dit_out_dim}" for s in MODELS.values())
        problem = f"its {in_dim} input / {out_dim} output channels match no Wan 2.2 model ({known})."
    elif spec.wan21_lookalike and hint and hint.group(1) == "1":
        problem = (f"it is named as {spec.wan21_lookalike}, whose shapes equal a Wan 2.2 {spec.label} expert's; "
                   "Wan 2.1 weights do not work as a Wan 2.2 expert. Rename the file if it really is Wan 2.2.")
    elif (spec.dit.dim, spec.dit.num_layers) != (dim, layers):
        details += " (not the released size)"
    expert = expert if spec is not None and spec.experts else None
    return Recognised("dit", variant=spec.name if spec else None, expert=expert, details=details, problem=problem)


def _classify_vae(keys: Mapping[str, tuple[tuple[int, ...], str]], prefix: str, naming: str) -> Recognised:
    if naming == "official":
        version = "2.2" if f"{prefix}decoder.upsamples.0.upsamples.0.residual.2.weight" in keys else "2.1"
        z_key = f"{prefix}conv2.weight"
    else:
        version = "2.2" if "encoder.down_blocks.0.resnets.0.norm1.gamma" in keys else "2.1"
        z_key = "post_quant_conv.weight"
    z = keys[z_key][0][0] if z_key in keys else 0
    problem = None
    if z != VAES[version].z_dim:
        problem = f"it has the Wan {version} VAE structure but z_dim {z} (expected {VAES[version].z_dim})."
    return Recognised("vae", naming=naming, variant=version, prefix=prefix, details=f"z_dim {z}",
                      problem=problem)


def _classify_t5(keys: Mapping[str, tuple[tuple[int, ...], str]], naming: str) -> Recognised:
    emb_keys, rel, block = _T5_NAMES[naming]
    emb = next((keys[k][0] for k in emb_keys if k in keys), None)
    layers = {int(m.group(1)) for k in keys if (m := re.match(block, k))}
    with_table = {int(m.group(1)) for k in keys if (m := re.fullmatch(rel, k))}
    details = f"vocab {emb[0]}, width {emb[1]}, {len(layers)} layers" if emb else f"{len(layers)} layers"
    problem = None
    if emb is None:
        problem = "it has no token embedding; the file is incomplete."
    elif with_table != layers:
        problem = ("it is a T5 encoder (position table in the first layer only), not umT5; Wan needs "
                   "umT5-XXL (models_t5_umt5-xxl-enc-bf16.pth or umt5_xxl_*.safetensors).")
    return Recognised("text_encoder", naming=naming, variant="umt5", details=details,
                      has_tokenizer="spiece_model" in keys, problem=problem)


def recognise(keys: Mapping[str, tuple[tuple[int, ...], str]], path: Path) -> Recognised:
    """What a checkpoint holds, from its tensor table {name: (shape, stored type)}.

    `path` only gives hints shapes cannot: the A14B expert side and a Wan 2.1 file name.
    """
    lora = [k for k in keys if _LORA_KEY.search(k)]
    if lora:
        target = "a Wan DiT" if any("blocks." in k and "attn" in k for k in lora) else "a model"
        return Recognised("lora", details=f"{len(keys)} tensors for {target}, e.g. {lora[0]}",
                          problem="it is a LoRA, not a model")
    found: Recognised | None = None
    for p in _DIT_PREFIXES:
        if f"{p}head.modulation" in keys and f"{p}patch_embedding.weight" in keys:
            shapes = {k[len(p):]: v[0] for k, v in keys.items() if k.startswith(p)}
            found = replace(_classify_dit(shapes, path), prefix=p)
            break
    if found is None and "scale_shift_table" in keys and "blocks.0.attn1.to_q.weight" in keys:
        shapes = {dit_diffusers_to_official(k) or f"?{k}": v[0] for k, v in keys.items()}
        found = replace(_classify_dit(shapes, path), naming="diffusers")
    for p in _VAE_PREFIXES:
        if found is None and f"{p}decoder.middle.0.residual.0.gamma" in keys:
            found = _classify_vae(keys, p, "official")
    if found is None and "decoder.mid_block.resnets.0.norm1.gamma" in keys:
        found = _classify_vae(keys, "", "diffusers")
    for naming, (_emb, rel, _block) in _T5_NAMES.items():
        if found is None and any(re.fullmatch(rel, k) for k in keys):
            found = _classify_t5(keys, naming)
    if found is None:
        example = ", ".join(list(keys)[:2])
        problem = "it is not a Wan 2.2 model component"
        if any(k.startswith("visual.") for k in keys) and any(k.startswith("textual.") for k in keys):
            problem = "it is the Wan 2.1 CLIP image encoder, which Wan 2.2 does not use"
        found = Recognised("unknown", details=f"{len(keys)} tensors, e.g. {example}", problem=problem)
    return found
