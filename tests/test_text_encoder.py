"""umT5 text encoder: key mapping, config inference, loading, tokenisation and encoding.

The oracle is transformers' UMT5EncoderModel built the ordinary way (random init, then
`load_state_dict` under HF names converted here independently from the official -> HF key table), run like
the official code: 512 padded ids with the attention mask, eager attention, trimmed afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
from transformers import UMT5Config, UMT5EncoderModel

from tests.tiny_ckpt.t5 import sentencepiece_ids, write_t5
from wan_lite.errors import CheckpointError
from wan_lite.loading.build import build_text_encoder, build_umt5
from wan_lite.loading.tensors import DictSource, PthSource
from wan_lite.models.text_encoder import (
    TOKENIZER_FILES,
    clean_prompt,
    hf_to_official_key,
    load_tokenizer,
    official_to_hf_key,
    pad_context,
    umt5_config_from_shapes,
)

PROMPTS = [
    "A golden retriever runs through a  bright forest at sunset, cinematic lighting.",
    "一只猫在草地上奔跑",
    "close-up &amp;lt;portrait&amp;gt; of an old man,\n\tfilm grain",
]

# Official -> HF substitutions, written out independently of the module.
_SUBS = [
    (".norm1.", ".layer.0.layer_norm."),
    (".attn.", ".layer.0.SelfAttention."),
    (".pos_embedding.embedding.", ".layer.0.SelfAttention.relative_attention_bias."),
    (".norm2.", ".layer.1.layer_norm."),
    (".ffn.gate.0.", ".layer.1.DenseReluDense.wi_0."),
    (".ffn.fc1.", ".layer.1.DenseReluDense.wi_1."),
    (".ffn.fc2.", ".layer.1.DenseReluDense.wo."),
]


def _to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k == "token_embedding.weight":
            out["shared.weight"] = out["encoder.embed_tokens.weight"] = v
        elif k == "norm.weight":
            out["encoder.final_layer_norm.weight"] = v
        else:
            k = "encoder." + k.replace("blocks.", "block.", 1)
            for a, b in _SUBS:
                k = k.replace(a, b)
            out[k] = v
    return out


def _reference(ckpt: dict, dtype: torch.dtype) -> UMT5EncoderModel:
    cfg = UMT5Config(
        vocab_size=ckpt["vocab"], d_model=ckpt["d_model"], d_kv=ckpt["d_model"] // ckpt["heads"],
        d_ff=ckpt["d_ff"], num_layers=ckpt["layers"], num_heads=ckpt["heads"],
        feed_forward_proj="gated-gelu", is_encoder_decoder=False,
    )
    cfg._attn_implementation = "eager"
    model = UMT5EncoderModel(cfg)
    model.load_state_dict(_to_hf({k: v.float() for k, v in ckpt["state_dict"].items()}), strict=True)
    return model.to(dtype).eval()


@torch.no_grad()
def _reference_encode(model: UMT5EncoderModel, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return [o[:n] for o, n in zip(out, mask.sum(1).tolist(), strict=True)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_t5(tmp_path_factory.mktemp("t5"), seed=3)


@pytest.fixture(scope="module")
def enc32(ckpt):
    return build_text_encoder(PthSource(ckpt["t5_path"]), ckpt["tokenizer_dir"], dtype=torch.float32)


def _xxl_official_shapes() -> dict[str, tuple[int, ...]]:
    d, f, h = 4096, 10240, 64
    s: dict[str, tuple[int, ...]] = {"token_embedding.weight": (256384, d), "norm.weight": (d,)}
    for i in range(24):
        p = f"blocks.{i}."
        s |= {p + "norm1.weight": (d,), p + "norm2.weight": (d,)}
        s |= {p + "pos_embedding.embedding.weight": (32, h)}
        s |= {p + f"attn.{x}.weight": (d, d) for x in "qkvo"}
        s |= {p + "ffn.gate.0.weight": (f, d), p + "ffn.fc1.weight": (f, d), p + "ffn.fc2.weight": (d, f)}
    return s


# --- key mapping and config ----------------------------------------------------------------------


def test_key_mapping_table_and_round_trip():
    table = {
        "token_embedding.weight": "shared.weight",
        "blocks.7.norm1.weight": "encoder.block.7.layer.0.layer_norm.weight",
        "blocks.7.attn.k.weight": "encoder.block.7.layer.0.SelfAttention.k.weight",
        "blocks.23.attn.o.weight": "encoder.block.23.layer.0.SelfAttention.o.weight",
        "blocks.0.pos_embedding.embedding.weight":
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "blocks.5.norm2.weight": "encoder.block.5.layer.1.layer_norm.weight",
        "blocks.5.ffn.gate.0.weight": "encoder.block.5.layer.1.DenseReluDense.wi_0.weight",
        "blocks.5.ffn.fc1.weight": "encoder.block.5.layer.1.DenseReluDense.wi_1.weight",
        "blocks.5.ffn.fc2.weight": "encoder.block.5.layer.1.DenseReluDense.wo.weight",
        "norm.weight": "encoder.final_layer_norm.weight",
    }
    for official, hf in table.items():
        assert official_to_hf_key(official) == hf
        assert hf_to_official_key(hf) == official
    assert hf_to_official_key("encoder.embed_tokens.weight") == "token_embedding.weight"
    keys = _xxl_official_shapes()
    assert len(keys) == 242  # the official file's tensor count
    hf_keys = {official_to_hf_key(k) for k in keys}
    assert len(hf_keys) == 242 and all(hf_to_official_key(official_to_hf_key(k)) == k for k in keys)
    for bad in ("blocks.0.attn.q.bias", "head.weight", "shared.weight"):
        with pytest.raises(KeyError):
            official_to_hf_key(bad)
    for bad in ("encoder.block.0.layer.2.x.weight", "lm_head.weight", "token_embedding.weight"):
        with pytest.raises(KeyError):
            hf_to_official_key(bad)


def test_mapping_covers_hf_module_tree(ckpt):
    """Every key of a real UMT5EncoderModel maps onto exactly the keys of the official file."""
    cfg = umt5_config_from_shapes({k: v.shape for k, v in ckpt["state_dict"].items()})
    with torch.device("meta"):
        model = UMT5EncoderModel(cfg)
    mapped = {hf_to_official_key(k) for k in model.state_dict()}
    assert mapped == set(ckpt["state_dict"])


def test_config_from_xxl_shapes_matches_spec():
    shapes = _xxl_official_shapes()
    cfg = umt5_config_from_shapes(shapes)
    assert (cfg.vocab_size, cfg.d_model, cfg.d_kv, cfg.d_ff, cfg.num_heads, cfg.num_layers) == (
        256384, 4096, 64, 10240, 64, 24)
    assert cfg.relative_attention_num_buckets == 32 and cfg.relative_attention_max_distance == 128
    assert cfg.is_gated_act and cfg.dense_act_fn == "gelu_new" and cfg.layer_norm_epsilon == 1e-6
    assert (cfg.pad_token_id, cfg.eos_token_id) == (0, 1)
    with torch.device("meta"):
        model = UMT5EncoderModel(cfg)
    assert sum(p.numel() for p in model.parameters()) == 5_680_910_336  # umT5-XXL encoder; tied embedding once
    hf = {official_to_hf_key(k): v for k, v in shapes.items()} | {"spiece_model": (4_548_313,)}
    assert umt5_config_from_shapes(hf, official=False).to_dict() == cfg.to_dict()


def test_config_rejects_other_checkpoints():
    with pytest.raises(CheckpointError, match="not a umT5"):
        dit = {"head.modulation": (1, 2, 3072), "blocks.0.self_attn.q.weight": (3072, 3072)}
        umt5_config_from_shapes(dit)
    shapes = _xxl_official_shapes() | {"blocks.0.attn.q.weight": (4000, 4096)}
    with pytest.raises(CheckpointError, match="heads"):
        umt5_config_from_shapes(shapes)


# --- loading ------------------------------------------------------------------------------------


def test_fp32_encode_matches_hf_reference(ckpt, enc32):
    ref = _reference(ckpt, torch.float32)
    ids, mask = enc32.tokenize(PROMPTS)
    want = _reference_encode(ref, ids, mask)
    got = enc32.encode(PROMPTS)
    errs = [(g - w).abs().max().item() for g, w in zip(got, want, strict=True)]
    assert [g.shape for g in got] == [w.shape for w in want]
    assert all(g.dtype == torch.float32 for g in got)
    assert max(errs) < 1e-5, errs  # unpadded sdpa vs padded eager: rounding only
    # The padded path through our loaded model equals the reference exactly up to the kernel.
    full = enc32.hidden_states(ids, mask)
    assert (full[0, : got[0].shape[0]] - got[0]).abs().max() < 1e-5


def test_bf16_encode_close_to_reference(ckpt):
    enc = build_text_encoder(ckpt["t5_path"], ckpt["tokenizer_dir"])  # default dtype bfloat16
    assert {p.dtype for p in enc.model.parameters()} == {torch.bfloat16}
    ids, mask = enc.tokenize(PROMPTS)
    got = enc.encode(PROMPTS)
    want16 = _reference_encode(_reference(ckpt, torch.bfloat16), ids, mask)
    want32 = _reference_encode(_reference(ckpt, torch.float32), ids, mask)
    for g, w16, w32 in zip(got, want16, want32, strict=True):
        assert g.dtype == torch.bfloat16 and torch.isfinite(g).all()
        assert _rel(g, w16) < 2e-2 and _rel(g, w32) < 3e-2, (_rel(g, w16), _rel(g, w32))


def test_embedding_is_one_tensor(ckpt):
    for dtype in (torch.bfloat16, torch.float32):  # as stored (no copy) and cast on read
        model = build_umt5(PthSource(ckpt["t5_path"]), dtype)
        assert model.encoder.embed_tokens is model.shared
        sd = model.state_dict()
        assert sd["shared.weight"].data_ptr() == sd["encoder.embed_tokens.weight"].data_ptr()
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in sd.values()}
        n_official = sum(t.numel() for t in ckpt["state_dict"].values())
        assert sum(storages.values()) == n_official * dtype.itemsize  # the embedding is held once
        assert sum(p.numel() for p in model.parameters()) == n_official


_ALIASES = ("shared.weight", "encoder.embed_tokens.weight")


@pytest.mark.parametrize("aliases", [_ALIASES[:1], _ALIASES[1:], _ALIASES])
def test_hf_named_source_loads(ckpt, enc32, aliases):
    """ComfyUI / Diffusers files use HF names and may carry either embedding alias."""
    hf = _to_hf(dict(ckpt["state_dict"]))
    for alias in _ALIASES:
        if alias not in aliases:
            del hf[alias]
    hf["spiece_model"] = torch.zeros(8, dtype=torch.uint8)  # ComfyUI's extra tensor is ignored
    model = build_umt5(DictSource(hf), torch.float32)
    ids = torch.tensor([[5, 17, 40, 1]])
    assert torch.equal(model(input_ids=ids).last_hidden_state, enc32.hidden_states(ids))


def test_missing_tensor_is_reported(ckpt, tmp_path):
    sd = dict(ckpt["state_dict"])
    del sd["blocks.1.ffn.fc2.weight"]
    with pytest.raises(CheckpointError, match=r"blocks\.1\.ffn\.fc2\.weight"):
        build_umt5(DictSource(sd))


def test_tokenizer_larger_than_embedding_is_refused(ckpt):
    sd = dict(ckpt["state_dict"])
    sd["token_embedding.weight"] = sd["token_embedding.weight"][:100]
    with pytest.raises(CheckpointError, match="different models"):
        build_text_encoder(DictSource(sd), ckpt["tokenizer_dir"])


# --- tokenizer, cleaning, trimming ---------------------------------------------------------------


def test_tokenizer_folder_matches_sentencepiece(ckpt):
    tok = load_tokenizer(ckpt["tokenizer_dir"])
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) == ckpt["tokenizer_size"]
    for text in PROMPTS[:2] + ["ＦＵＬＬ width １２３ text"]:
        assert tok(text)["input_ids"] == sentencepiece_ids(text) + [1]


def test_cleaning():
    assert clean_prompt("schÃ¶n") == "schön"  # ftfy repairs mojibake
    assert clean_prompt("a &amp;lt;b&amp;gt;") == "a <b>"
    # ftfy leaves HTML alone in text that holds a "<"; then exactly two unescapes follow.
    assert clean_prompt("<b> &amp;amp;amp;") == "<b> &amp;"
    assert clean_prompt("“quoted”") == '"quoted"'  # ftfy straightens quotes, as officially
    assert clean_prompt("  A\tcat \n\n on\u3000the  Mat  ") == "A cat on the Mat"  # no lower-casing
    assert clean_prompt("  \n ") == ""


def test_trimmed_lengths_are_tokens_plus_eos(enc32):
    ids, mask = enc32.tokenize(PROMPTS)
    assert ids.shape == mask.shape == (3, 512) and ids.dtype == torch.int64
    out = enc32.encode(PROMPTS)
    for text, row, m, o in zip(PROMPTS, ids, mask, out, strict=True):
        n = len(sentencepiece_ids(clean_prompt(text))) + 1
        assert int(m.sum()) == n and o.shape == (n, enc32.d_model)
        assert row[n - 1] == 1 and (row[n:] == 0).all() and (m[:n] == 1).all() and (m[n:] == 0).all()
    # The doubly escaped "<" reaches the tokenizer as "<", not as "&lt;".
    assert ids[2].tolist()[: int(mask[2].sum())] == sentencepiece_ids(clean_prompt(PROMPTS[2])) + [1]
    assert enc32.encode([]) == []


def test_truncation_at_512(ckpt, enc32):
    text = " ".join(["golden retriever"] * 400)
    assert len(sentencepiece_ids(text)) > 600
    ids, mask = enc32.tokenize([text])
    assert int(mask.sum()) == 512 and ids[0, -1] == 1
    (out,) = enc32.encode([text])
    assert out.shape == (512, enc32.d_model)
    (want,) = _reference_encode(_reference(ckpt, torch.float32), ids, mask)
    assert (out - want).abs().max() < 1e-5


def test_missing_or_broken_tokenizer_folder(ckpt, tmp_path):
    missing = tmp_path / "google" / "umt5-xxl"
    for folder in (missing, tmp_path):
        with pytest.raises(CheckpointError) as err:
            build_text_encoder(ckpt["t5_path"], folder)
        assert str(folder) in str(err.value) and all(f in str(err.value) for f in TOKENIZER_FILES)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    (broken / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer"}))
    with pytest.raises(CheckpointError, match="Cannot load the tokenizer"):
        load_tokenizer(broken)
    # Without tokenizer.json, transformers needs protobuf to read spiece.model.
    no_json = tmp_path / "no_json"
    shutil.copytree(ckpt["tokenizer_dir"], no_json)
    (no_json / "tokenizer.json").unlink()
    if importlib.util.find_spec("google") is None:
        with pytest.raises(CheckpointError, match="lacks tokenizer.json"):
            load_tokenizer(no_json)
    else:
        assert len(load_tokenizer(no_json)) == ckpt["tokenizer_size"]


def test_pad_context(enc32):
    out = enc32.encode(PROMPTS[:2])
    ctx = pad_context(out)
    assert ctx.shape == (2, 512, enc32.d_model) and ctx.dtype == torch.float32
    for i, o in enumerate(out):
        assert torch.equal(ctx[i, : len(o)], o) and (ctx[i, len(o) :] == 0).all()
    assert pad_context(out, text_len=64, dtype=torch.bfloat16).shape == (2, 64, enc32.d_model)
    with pytest.raises(ValueError):
        pad_context([torch.zeros(600, enc32.d_model)])
