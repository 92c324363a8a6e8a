"""Build the models from a TensorSource: each on the `meta` device, then filled tensor by tensor.

No RAM is spent on random initialisation, and the peak while loading is the finished model plus
one source tensor. Every mismatch is reported with the key, the expected and the found shape.
The models themselves know nothing of sources: they take the shapes (`Config.from_shapes`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from wan_lite.errors import CheckpointError
from wan_lite.loading.tensors import TensorSource, open_source
from wan_lite.models.dit import WanDiT, WanDiTConfig, name_matches
from wan_lite.models.vae21 import WanVAE21
from wan_lite.models.vae22 import WanVAE22
from wan_lite.models.vae_common import WanVAEBase

if TYPE_CHECKING:
    from transformers import UMT5EncoderModel

    from wan_lite.models.text_encoder import TextEncoder

log = logging.getLogger(__name__)

KeepDtype = Callable[[str], bool]
# A fill step: (module built on meta, source, dtype, *, key_map=, what=) fills the module; what
# it returns is not used here. `fill_module`, or the runtime's `load_stored` (fp8 / GGUF kept).
Fill = Callable[..., Any]


def fill_module(
    module: nn.Module,
    source: TensorSource,
    dtype: torch.dtype | None,
    *,
    key_map: Callable[[str], str] | None = None,
    keep_fp32: KeepDtype | None = None,
    what: str = "model",
    convert: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> nn.Module:
    """Assign every parameter and buffer of `module` (built on meta) from `source`.

    key_map: module key -> source key (identity when None).
    keep_fp32: module keys that stay float32 whatever `dtype` is.
    convert: optional per-tensor transform applied after reading (e.g. dequantisation).
    Raises CheckpointError listing missing keys or a wrong shape (key, expected, found).
    """
    expected = module.state_dict(keep_vars=True)
    src_keys = {name: (key_map(name) if key_map else name) for name in expected}
    missing = [s for s in src_keys.values() if s not in source]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(
            f"The {what} file(s) {source.describe()} lack {len(missing)} tensor(s): {shown}.",
            "This is not the expected checkpoint or it is incomplete; check the file or download it again.",
        )
    loaded: dict[str, torch.Tensor] = {}
    for name, ref in expected.items():
        key = src_keys[name]
        found = tuple(source.shape(key))
        if found != tuple(ref.shape):
            raise CheckpointError(
                f"Tensor {key!r} in {source.describe()} has shape {list(found)}, "
                f"expected {list(ref.shape)} for this {what}.",
                "The file belongs to a different model or version.",
            )
        target = ref.dtype if not ref.is_floating_point() else dtype or source.dtype(key)
        if keep_fp32 is not None and keep_fp32(name) and ref.is_floating_point():
            target = torch.float32
        if convert is None:
            tensor = source.read(key, target)  # cast as it is read: one tensor in flight
        else:
            tensor = convert(key, source[key])
        loaded[name] = tensor.to(target) if tensor.dtype != target else tensor
    module.load_state_dict(loaded, assign=True, strict=True)
    module.requires_grad_(False)  # inference only: no autograd bookkeeping anywhere
    module.eval()
    return module


# ------------------------------------------------------------------------------ the models
# Each model is built on `meta` from the tensor shapes of its source (`Config.from_shapes`) and
# filled by a fill step: `fill_module` (float weights in `dtype`), or one the runtime passes in
# for files whose weights it keeps as stored (fp8 / GGUF: runtime/loader.py).


def keep_dit_fp32(name: str) -> bool:
    """DiT parameters that stay float32 whatever the model dtype (`WanDiT.keep_fp32_patterns`)."""
    return name_matches(name, WanDiT.keep_fp32_patterns)


def dit_on_meta(source: TensorSource) -> WanDiT:
    """The DiT of `source`'s architecture (from its tensor shapes), built on meta, unfilled."""
    cfg = WanDiTConfig.from_shapes(source.shapes())
    log.debug("DiT config from %s: %s", source.describe(), cfg)
    with torch.device("meta"):
        model = WanDiT(cfg)
    extra = sorted(set(source) - set(model.state_dict()))
    if extra:
        log.warning("Ignoring %d tensor(s) unused by the Wan 2.2 DiT: %s", len(extra), extra[:3])
    return model


def build_dit(source: TensorSource, dtype: torch.dtype | None, *, keep_fp32: bool = True) -> WanDiT:
    """A float DiT from `source`, cast to `dtype` as read (None: as stored).

    keep_fp32: keep the `WanDiT.keep_fp32_patterns` parameters float32 whatever `dtype` is.
    Quantized and stored-format DiTs: the runtime loader's `load_dit`.
    """
    model = dit_on_meta(source)
    fill_module(model, source, dtype, keep_fp32=keep_dit_fp32 if keep_fp32 else None, what="DiT")
    return model


def build_vae(source: TensorSource, dtype: torch.dtype = torch.float32, *, version: str | None = None,
              fill: bool = True) -> WanVAEBase:
    """The Wan 2.1 or 2.2 VAE of `source` (told apart by its tensor names), cast to `dtype`.

    version: the VAE version the caller needs; another one raises CheckpointError naming both.
    fill: False leaves it on meta in `dtype` (nothing read: the placement reads its parts).
    """
    shapes = source.shapes()
    found = WanVAEBase.detect_version(shapes)
    if version is not None and found != version:
        raise CheckpointError(
            f"{source.describe()} is a Wan {found} VAE, not a Wan {version} VAE.",
            "Use Wan2.1_VAE.pth for T2V-A14B / I2V-A14B and Wan2.2_VAE.pth for TI2V-5B.",
        )
    cls = WanVAE22 if found == "2.2" else WanVAE21
    config = cls.config_class.from_shapes(shapes)  # type: ignore[attr-defined]
    with torch.device("meta"):
        model = cls(config)  # type: ignore[call-arg]
    if not fill:
        return model.to(dtype)  # meta: declares the dtype, allocates nothing
    fill_module(model, source, dtype, what="VAE")
    return model


def build_umt5(source: TensorSource, dtype: torch.dtype | None = torch.bfloat16, *,
               fill: Fill = fill_module) -> UMT5EncoderModel:
    """transformers' UMT5EncoderModel built on meta and filled from `source` (official or HF key
    names) by `fill` (`fill_module`, or the runtime's fill that keeps fp8 weights as stored).

    The token embedding is held once: `encoder.embed_tokens` is the same module as `shared`.
    """
    from transformers import UMT5EncoderModel  # transformers loads only when an encoder is built

    from wan_lite.models.text_encoder import OFFICIAL_MARKER, hf_to_official_key, umt5_config_from_shapes

    official = OFFICIAL_MARKER in source
    config = umt5_config_from_shapes(source.shapes(), official=official)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    if official:
        key_map = hf_to_official_key
    else:
        # HF-named files may keep the embedding under either alias (or both).
        emb = "shared.weight" if "shared.weight" in source else "encoder.embed_tokens.weight"

        def key_map(name: str) -> str:
            return emb if name == "shared.weight" else name

    # Detach the tied alias while filling so the embedding is read, cast and stored once (a
    # second state-dict entry would make a second full-size copy); re-tie to the same module.
    model.encoder.embed_tokens = None
    fill(model, source, dtype, key_map=key_map, what="text encoder")
    model.encoder.embed_tokens = model.shared
    return model.eval().requires_grad_(False)


def build_text_encoder(t5: Path | str | TensorSource, tokenizer_dir: Path | str, dtype: torch.dtype = torch.bfloat16,
                       *, fill: Fill = fill_module) -> TextEncoder:
    """The umT5 encoder of `t5` (.pth, .safetensors or a TensorSource) with the tokenizer folder."""
    from wan_lite.models.text_encoder import TextEncoder, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    source = t5 if isinstance(t5, TensorSource) else open_source(Path(t5))
    model = build_umt5(source, dtype, fill=fill)
    cfg = model.config
    log.info("umT5 encoder: %d layers, d_model %d, %d heads, vocab %d, %s, from %s",
             cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.vocab_size, dtype, source.describe())
    return TextEncoder(model, tokenizer)
