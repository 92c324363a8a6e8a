"""umT5-XXL text encoder (transformers' `UMT5EncoderModel`) and its tokenizer, as Wan 2.2 uses them.

The network is transformers' UMT5 encoder: it computes the same function as the official
umT5 encoder (no attention scaling, a relative-position table in every layer, gated-GELU
with the tanh approximation, RMS norms in fp32). Only the key names differ; the official
`models_t5_umt5-xxl-enc-bf16.pth` is mapped onto HF names on load, and files that already use HF
names (ComfyUI, Diffusers) load as they are.

Prompts are cleaned like the official `HuggingfaceTokenizer(clean='whitespace')`, tokenised to
512 ids with `</s>` appended, and each prompt's output is trimmed to its real tokens (EOS
included): `encode(list[str]) -> list[Tensor [L_i, d_model]]`. The DiT zero-pads them back to
512 rows (`pad_context`).
"""

from __future__ import annotations

import html
import importlib.util
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import UMT5Config, UMT5EncoderModel

from wan_lite.errors import CheckpointError

log = logging.getLogger(__name__)

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_SUBDIR = "google/umt5-xxl"
TOKENIZER_FILES = ("spiece.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")
TEXT_LEN = 512  # the official seq_len: prompts are cut to 511 pieces + </s>
PAD_ID, EOS_ID = 0, 1

# (official suffix after `blocks.i.`, HF suffix after `encoder.block.i.`).
# `ffn.gate.0` is the GELU branch (wi_0), `ffn.fc1` the linear branch (wi_1).
_LAYER_KEYS: tuple[tuple[str, str], ...] = (
    ("norm1.weight", "layer.0.layer_norm.weight"),
    ("attn.q.weight", "layer.0.SelfAttention.q.weight"),
    ("attn.k.weight", "layer.0.SelfAttention.k.weight"),
    ("attn.v.weight", "layer.0.SelfAttention.v.weight"),
    ("attn.o.weight", "layer.0.SelfAttention.o.weight"),
    ("pos_embedding.embedding.weight", "layer.0.SelfAttention.relative_attention_bias.weight"),
    ("norm2.weight", "layer.1.layer_norm.weight"),
    ("ffn.gate.0.weight", "layer.1.DenseReluDense.wi_0.weight"),
    ("ffn.fc1.weight", "layer.1.DenseReluDense.wi_1.weight"),
    ("ffn.fc2.weight", "layer.1.DenseReluDense.wo.weight"),
)
_OFFICIAL_TO_HF = dict(_LAYER_KEYS)
_HF_TO_OFFICIAL = {hf: official for official, hf in _LAYER_KEYS}
_GLOBAL_OFFICIAL_TO_HF = {
    "token_embedding.weight": "shared.weight",
    "norm.weight": "encoder.final_layer_norm.weight",
}
_GLOBAL_HF_TO_OFFICIAL = {
    "shared.weight": "token_embedding.weight",
    # transformers ties the encoder's embedding to `shared`; both names are the one official tensor.
    "encoder.embed_tokens.weight": "token_embedding.weight",
    "encoder.final_layer_norm.weight": "norm.weight",
}
_OFFICIAL_LAYER = re.compile(r"blocks\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"encoder\.block\.(\d+)\.(.+)")
# Present in a file with official names / with HF names (format detection).
OFFICIAL_MARKER = "blocks.0.pos_embedding.embedding.weight"
HF_MARKER = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"


def official_to_hf_key(name: str) -> str:
    """Official umT5 key (`blocks.3.attn.q.weight`) -> HF UMT5EncoderModel key. KeyError if unknown."""
    if name in _GLOBAL_OFFICIAL_TO_HF:
        return _GLOBAL_OFFICIAL_TO_HF[name]
    m = _OFFICIAL_LAYER.fullmatch(name)
    if m and m.group(2) in _OFFICIAL_TO_HF:
        return f"encoder.block.{m.group(1)}.{_OFFICIAL_TO_HF[m.group(2)]}"
    raise KeyError(f"{name!r} is not a key of the official umT5 encoder")


def hf_to_official_key(name: str) -> str:
    """HF UMT5EncoderModel key -> official umT5 key (both embedding aliases -> `token_embedding.weight`)."""
    if name in _GLOBAL_HF_TO_OFFICIAL:
        return _GLOBAL_HF_TO_OFFICIAL[name]
    m = _HF_LAYER.fullmatch(name)
    if m and m.group(2) in _HF_TO_OFFICIAL:
        return f"blocks.{m.group(1)}.{_HF_TO_OFFICIAL[m.group(2)]}"
    raise KeyError(f"{name!r} is not a key of the HF UMT5 encoder")


def umt5_config_from_shapes(shapes: Mapping[str, Sequence[int]], official: bool = True) -> UMT5Config:
    """The UMT5Config of the encoder whose tensors have these shapes.

    shapes: key -> shape, official names (`official=True`) or HF names; keys of neither (e.g.
    ComfyUI's `spiece_model`) are ignored. heads come from the relative-position table
    `[buckets, heads]`, d_kv from q's rows / heads, layers from the highest block index.
    Raises CheckpointError when a tensor the encoder needs is absent or shapes disagree.
    """
    to_official = (lambda k: k) if official else hf_to_official_key
    s: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        try:
            s[to_official(key)] = tuple(shape)
        except KeyError:
            continue
    needed = ("token_embedding.weight", OFFICIAL_MARKER, "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight")
    absent = [k if official else official_to_hf_key(k) for k in needed if k not in s]
    if absent:
        raise CheckpointError(
            f"This is not a umT5 text encoder: it lacks {', '.join(absent)}.",
            f"Use the Wan 2.2 text encoder ({T5_FILE}, or umt5_xxl_*.safetensors for ComfyUI files).",
        )
    vocab, d_model = s["token_embedding.weight"]
    buckets, heads = s[OFFICIAL_MARKER]
    inner = s["blocks.0.attn.q.weight"][0]
    layers = 1 + max(int(m.group(1)) for k in s if (m := _OFFICIAL_LAYER.fullmatch(k)))
    if inner % heads or buckets != 32:
        raise CheckpointError(
            f"umT5 shapes do not fit together: q has {inner} rows for {heads} heads, "
            f"{buckets} position buckets.",
            "The text encoder file is damaged or belongs to another model.",
        )
    return UMT5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=s["blocks.0.ffn.fc1.weight"][0],
        num_layers=layers,
        num_decoder_layers=0,
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",  # sets dense_act_fn = "gelu_new" (tanh GELU), as official
        layer_norm_epsilon=1e-6,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
        is_encoder_decoder=False,
        use_cache=False,
    )


def clean_prompt(text: str) -> str:
    """The official clean='whitespace': ftfy repair, HTML-unescape twice, collapse whitespace."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def _has_protobuf() -> bool:
    try:
        return importlib.util.find_spec("google.protobuf") is not None
    except ModuleNotFoundError:  # no `google` namespace at all
        return False


def load_tokenizer(folder: Path | str) -> Any:
    """transformers' T5 tokenizer from the local `google/umt5-xxl` folder (never the network).

    Raises CheckpointError naming the folder and the files expected in it.
    """
    from transformers import AutoTokenizer

    folder = Path(folder)
    expect = ", ".join(TOKENIZER_FILES)
    hint = (
        f"The folder {TOKENIZER_SUBDIR}/ ships with the Wan 2.2 checkpoint and holds {expect}; "
        "copy it from the model repository (it must be complete)."
    )
    if not folder.is_dir():
        raise CheckpointError(f"Tokenizer folder not found: {folder}", hint)
    if not any((folder / f).is_file() for f in ("tokenizer.json", "spiece.model")):
        raise CheckpointError(
            f"The tokenizer folder {folder} has neither tokenizer.json nor spiece.model.", hint
        )
    if not (folder / "tokenizer.json").is_file() and not _has_protobuf():
        # transformers can only convert spiece.model with protobuf; its own error (about
        # tiktoken) would send the user the wrong way.
        raise CheckpointError(
            f"The tokenizer folder {folder} lacks tokenizer.json, and reading spiece.model alone "
            "needs the 'protobuf' package, which is not installed.",
            hint + " Alternatively install protobuf (pip install protobuf).",
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # transformers, tokenizers and json raise many types here
        raise CheckpointError(
            f"Cannot load the tokenizer in {folder} ({type(err).__name__}: {err}).", hint
        ) from None
    if tokenizer.pad_token_id != PAD_ID or tokenizer.eos_token_id != EOS_ID:
        raise CheckpointError(
            f"The tokenizer in {folder} is not umT5's: pad id {tokenizer.pad_token_id}, "
            f"eos id {tokenizer.eos_token_id} (expected {PAD_ID} and {EOS_ID}).",
            hint,
        )
    return tokenizer


class TextEncoder:
    """Prompt -> umT5 features, exactly as the official Wan 2.2 pipelines compute them.

    The model is transformers' UMT5EncoderModel; placement is the runtime's business. Inputs
    go to the device of the token embedding (the CPU for one read from its file), and outputs
    come in the model's dtype there.
    """

    def __init__(self, model: UMT5EncoderModel, tokenizer: Any, text_len: int = TEXT_LEN) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.text_len = text_len
        rows = model.config.vocab_size
        if len(tokenizer) > rows:
            raise CheckpointError(
                f"The tokenizer has {len(tokenizer)} ids but the text encoder only {rows} embedding rows.",
                "The tokenizer folder and the text encoder file come from different models.",
            )

    @property
    def d_model(self) -> int:
        return self.model.config.d_model

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cleaned, padded and truncated ids `[B, text_len]` int64 and mask `[B, text_len]` int64.

        Each row is up to text_len - 1 pieces, then `</s>`, then pad (0); mask is 1 on pieces and EOS.
        """
        batch = self.tokenizer(
            [clean_prompt(t) for t in texts],
            add_special_tokens=True,
            padding="max_length",
            max_length=self.text_len,
            truncation=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return batch["input_ids"].long(), batch["attention_mask"].long()

    @torch.no_grad()
    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output `[B, L, d_model]` for ids `[B, L]` (pad keys masked out where mask is 0)."""
        device = self.model.shared.weight.device
        if device.type == "meta":  # the embedding reads its rows from the file (runtime/embedding_rows.py)
            device = torch.device("cpu")
        mask = None if mask is None else mask.to(device)
        return self.model(input_ids=ids.to(device), attention_mask=mask).last_hidden_state

    def encode(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """Per prompt `[L_i, d_model]`, L_i = real pieces + EOS (at most text_len).

        The official encoder runs on 512 padded ids with pad keys masked; pad keys get zero
        weight and the position bias depends only on offsets, so running each prompt on its
        L_i real ids gives the same rows for a fraction of the work.
        """
        if not texts:
            return []
        ids, mask = self.tokenize(texts)
        lengths = mask.sum(dim=1).tolist()
        return [self.hidden_states(row[:n].unsqueeze(0))[0] for row, n in zip(ids, lengths, strict=True)]


def pad_context(
    context: Sequence[torch.Tensor], text_len: int = TEXT_LEN, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Stack trimmed features `[L_i, D]` into `[B, text_len, D]`, zero rows after each prompt.

    This is the DiT's input convention: the zero rows are not masked in cross-attention.
    """
    if not context:
        raise ValueError("pad_context needs at least one prompt's features")
    first = context[0]
    out = torch.zeros(len(context), text_len, first.shape[-1], dtype=dtype, device=first.device)
    for i, c in enumerate(context):
        if c.ndim != 2 or c.shape[0] > text_len or c.shape[1] != first.shape[-1]:
            raise ValueError(
                f"context {i} has shape {tuple(c.shape)}; expected [<= {text_len}, {first.shape[-1]}]"
            )
        out[i, : c.shape[0]] = c.to(dtype)
    return out
