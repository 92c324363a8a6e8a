"""A tiny umT5 encoder checkpoint and tokenizer folder in the official Wan 2.2 layout.

`write_t5(ckpt_dir)` writes what the official repositories ship next to the DiT:

    ckpt_dir/models_t5_umt5-xxl-enc-bf16.pth   torch.save of the official key names, bfloat16
    ckpt_dir/google/umt5-xxl/                   spiece.model, tokenizer.json,
                                                tokenizer_config.json, special_tokens_map.json

The tokenizer is a SentencePiece unigram model trained here on generated English and Chinese
text, with umT5's special ids (pad 0, eos 1, unk 2, no bos) and `<extra_id_*>` sentinels above
the pieces. It is trained once per process and reused (training plus conversion ~1 s).
"""

from __future__ import annotations

import io
import json
import random
import tempfile
from pathlib import Path

import torch

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_SUBDIR = Path("google") / "umt5-xxl"
SP_PIECES = 320
EXTRA_IDS = 16

_EN_WORDS = (
    "a the cat dog fox bird horse runs jumps flies walks dances over under through quick lazy brown "
    "white black red golden bright dark light city night street rain snow car train tree forest "
    "mountain river ocean sky cloud sunset sunrise beautiful young old woman man child camera slowly "
    "close-up wide shot cinematic lighting soft warm cold film grain 4k detailed portrait landscape"
).split()
_ZH_CHARS = (
    "一只猫在草地上奔跑色调艳丽过曝静态细节模糊不清字幕风格作品画作画面整体发灰最差质量低质量"
    "压缩残留丑陋的残缺多余手指画得不好脸部变形毁容形态畸形肢体融合背景人很多倒着走城市夜晚雨"
)
_PUNCT = ",.!?;:'\"()-"

# (spiece.model bytes, tokenizer.json text), built on first use.
_TOKENIZER_FILES: tuple[bytes, str] | None = None


def _corpus(rng: random.Random, lines: int = 600) -> list[str]:
    out = []
    for _ in range(lines):
        words = [rng.choice(_EN_WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.5:
            words[-1] += rng.choice(_PUNCT)
        if rng.random() < 0.2:
            words.append(str(rng.randint(0, 2025)))
        out.append(" ".join(words))
        out.append("".join(rng.choice(_ZH_CHARS) for _ in range(rng.randint(3, 16))) + rng.choice("，。！"))
    return out


def _precompiled_charsmap(model_proto: bytes) -> bytes | None:
    # ModelProto.normalizer_spec (3) -> NormalizerSpec.precompiled_charsmap (2), read with the same
    # small protobuf reader the loader uses for ComfyUI's built-in tokenizers (transformers' own
    # SentencePiece converter needs protobuf, which is not installed).
    from wan_lite.loading.sources import proto_field

    normalizer = proto_field(model_proto, 3)
    return None if normalizer is None else proto_field(normalizer, 2)


def _tokenizer_files() -> tuple[bytes, str]:
    """Train the SentencePiece model and convert it to tokenizer.json (cached per process)."""
    global _TOKENIZER_FILES
    if _TOKENIZER_FILES is not None:
        return _TOKENIZER_FILES
    import sentencepiece as spm
    from transformers import T5Tokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(random.Random(1234))),
        model_writer=model,
        vocab_size=SP_PIECES,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    proto = model.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    vocab = [(sp.id_to_piece(i), float(sp.get_score(i))) for i in range(sp.get_piece_size())]
    # The same construction transformers uses when it converts a spiece.model itself.
    charsmap = _precompiled_charsmap(proto)
    fast = T5Tokenizer(vocab=vocab, _spm_precompiled_charsmap=charsmap, extra_ids=EXTRA_IDS)
    with tempfile.TemporaryDirectory() as tmp:
        fast.save_pretrained(tmp)
        tokenizer_json = (Path(tmp) / "tokenizer.json").read_text(encoding="utf-8")
    _TOKENIZER_FILES = (proto, tokenizer_json)
    return _TOKENIZER_FILES


def write_tokenizer(folder: Path) -> Path:
    """Write the tokenizer folder (the `google/umt5-xxl/` files) into `folder`."""
    proto, tokenizer_json = _tokenizer_files()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    extras = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    special = {
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "additional_special_tokens": extras,
    }
    config = {
        **special,
        "extra_ids": EXTRA_IDS,
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
        "model_max_length": 1000000000000000019884624838656,
    }
    (folder / "spiece.model").write_bytes(proto)
    (folder / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return folder


def tokenizer_size() -> int:
    """Pieces plus sentinels: the number of ids the tokenizer can produce."""
    return len(json.loads(_tokenizer_files()[1])["model"]["vocab"]) + EXTRA_IDS


def official_t5_state_dict(
    *, d_model: int, heads: int, d_ff: int, layers: int, vocab: int, d_kv: int | None = None, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random umT5 encoder weights under the official key names, float32.

    Scales keep activations O(1) through the un-scaled T5 attention, so outputs are meaningful.
    """
    d_kv = d_kv or d_model // heads
    inner = heads * d_kv
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def norm_weight() -> torch.Tensor:
        return 1.0 + randn(d_model, std=0.1)

    sd: dict[str, torch.Tensor] = {"token_embedding.weight": randn(vocab, d_model, std=1.0)}
    for i in range(layers):
        p = f"blocks.{i}."
        sd[p + "norm1.weight"] = norm_weight()
        sd[p + "attn.q.weight"] = randn(inner, d_model, std=(d_model * d_kv) ** -0.5)
        sd[p + "attn.k.weight"] = randn(inner, d_model, std=d_model**-0.5)
        sd[p + "attn.v.weight"] = randn(inner, d_model, std=d_model**-0.5)
        sd[p + "attn.o.weight"] = randn(d_model, inner, std=inner**-0.5)
        sd[p + "norm2.weight"] = norm_weight()
        sd[p + "ffn.gate.0.weight"] = randn(d_ff, d_model, std=d_model**-0.5)
        sd[p + "ffn.fc1.weight"] = randn(d_ff, d_model, std=d_model**-0.5)
        sd[p + "ffn.fc2.weight"] = randn(d_model, d_ff, std=d_ff**-0.5)
        sd[p + "pos_embedding.embedding.weight"] = randn(32, heads, std=0.5)
    sd["norm.weight"] = norm_weight()
    return sd


def write_t5(
    ckpt_dir: Path,
    *,
    d_model: int = 64,
    heads: int = 4,
    d_ff: int = 128,
    layers: int = 2,
    vocab: int | None = None,
    seed: int = 0,
) -> dict:
    """Write the tiny T5 checkpoint and tokenizer folder into `ckpt_dir`.

    vocab: embedding rows; default = tokenizer size rounded up to a multiple of 128 (umT5 pads
    its 256,300 ids to 256,384 rows the same way).
    Returns {"t5_path", "tokenizer_dir", "state_dict" (official names, bfloat16 as written),
    "vocab", "tokenizer_size", "d_model", "heads", "d_ff", "layers"}.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    n_ids = tokenizer_size()
    vocab = vocab if vocab is not None else -(-n_ids // 128) * 128
    if vocab < n_ids:
        raise ValueError(f"vocab {vocab} is smaller than the tokenizer's {n_ids} ids")
    tokenizer_dir = write_tokenizer(ckpt_dir / TOKENIZER_SUBDIR)
    sd = official_t5_state_dict(
        d_model=d_model, heads=heads, d_ff=d_ff, layers=layers, vocab=vocab, seed=seed
    )
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}
    t5_path = ckpt_dir / T5_FILE
    torch.save(sd, t5_path)
    return {
        "t5_path": t5_path,
        "tokenizer_dir": tokenizer_dir,
        "state_dict": sd,
        "vocab": vocab,
        "tokenizer_size": n_ids,
        "d_model": d_model,
        "heads": heads,
        "d_ff": d_ff,
        "layers": layers,
    }


def sentencepiece_ids(text: str) -> list[int]:
    """The trained model's piece ids for `text` (no EOS), straight from sentencepiece."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=_tokenizer_files()[0])
    return list(sp.encode(text))


__all__ = [
    "T5_FILE",
    "TOKENIZER_SUBDIR",
    "official_t5_state_dict",
    "sentencepiece_ids",
    "tokenizer_size",
    "write_t5",
    "write_tokenizer",
]
