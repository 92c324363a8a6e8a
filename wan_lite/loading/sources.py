"""TensorSource adapters that present other formats under the official names, tensor by tensor.

- `RenamedSource`: renames keys (a keymaps function) and strips a prefix such as
  `model.diffusion_model.`; keys without an official counterpart are hidden (kept in `.dropped`).
- `Fp8ScaledSource`: ComfyUI fp8 files. Legacy layout: `<m>.weight` F8_E4M3 + `<m>.scale_weight`
  (+ `scale_input`) and a `scaled_fp8` marker tensor; newer layout: `<m>.weight_scale`
  (+ `input_scale`, `comfy_quant` JSON blob). Reading `<m>.weight` gives `float(W) * scale`;
  `fp8_weight(name)` hands out the stored fp8 tensor and its scale for the fp8 compute path,
  so fp8 weights can stay fp8 in memory.
- `GGUFSource`: GGUF files through the `gguf` package, memory-mapped; each tensor is
  dequantised only when read (`quantized(name)` gives the raw blocks).
- `spiece_model_bytes` / `materialize_tokenizer`: the tokenizer ComfyUI stores in its umT5 file.

Every adapter forwards `fp8_weight` / `quantized` / `stored_type` through renaming, so the runtime
can reach the raw storage from the official name (runtime/gguf_linear.py keeps it as is).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wan_lite.errors import CheckpointError
from wan_lite.loading.files import regular_file
from wan_lite.loading.tensors import TensorSource

log = logging.getLogger(__name__)

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_SCALE_SUFFIXES = ("scale_weight", "weight_scale")
_INPUT_SCALE_SUFFIXES = ("scale_input", "input_scale")
_FP8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


@dataclass(frozen=True)
class Fp8Weight:
    """A weight as stored in an fp8 file. `weight` is fp8 [out, in]; `scale` float32 of shape []
    (per tensor) or [out, 1] (per output row); the real weight is `weight.float() * scale`."""

    weight: torch.Tensor
    scale: torch.Tensor
    input_scale: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype) * self.scale.to(dtype)


@dataclass(frozen=True)
class GGUFTensor:
    """A GGUF tensor as stored: `data` uint8 blocks (or plain values for F32/F16), its ggml type
    name ("Q4_K", ...) and the PyTorch shape it stands for."""

    data: torch.Tensor
    qtype: str
    shape: tuple[int, ...]


def is_quant_aux(key: str) -> bool:
    """True for the scale / marker tensors of fp8 files (not model weights themselves)."""
    tail = key.rsplit(".", 1)[-1]
    return tail in (*_SCALE_SUFFIXES, *_INPUT_SCALE_SUFFIXES, "comfy_quant", "scaled_fp8")


def fp8_weight(source: TensorSource, name: str) -> Fp8Weight | None:
    """The stored fp8 weight behind `name`, or None if the source does not hold it as fp8."""
    getter = getattr(source, "fp8_weight", None)
    return getter(name) if getter is not None else None


def quantized(source: TensorSource, name: str) -> GGUFTensor | None:
    """The stored GGUF blocks behind `name`, or None if the source is not GGUF."""
    getter = getattr(source, "quantized", None)
    return getter(name) if getter is not None else None


def stored_type(source: TensorSource, name: str) -> str | None:
    """How an fp8 or GGUF file stores `name`, read from the header only: "F8_E4M3" / "F8_E5M2"
    for fp8 weights, the ggml type ("Q4_K", "F16", ...) for GGUF tensors; None for other sources
    and for the 16/32-bit tensors of fp8 files."""
    getter = getattr(source, "stored_type", None)
    return getter(name) if getter is not None else None


class RenamedSource(TensorSource):
    """Presents `inner` under new names: strip the first matching prefix, then apply `key_map`.

    key_map returns the new name or None to hide the key. When two keys map to the same name the
    first one wins (e.g. `shared.weight` before its tied alias `encoder.embed_tokens.weight`).
    """

    def __init__(
        self,
        inner: TensorSource,
        key_map: Callable[[str], str | None] | None = None,
        *,
        strip_prefixes: Iterable[str] = (),
    ) -> None:
        self.inner = inner
        self.files = inner.files
        prefixes = tuple(strip_prefixes)
        self._to_inner: dict[str, str] = {}
        self.dropped: list[str] = []
        for key in inner:
            name = key
            for prefix in prefixes:
                if name.startswith(prefix):
                    name = name[len(prefix) :]
                    break
            new = key_map(name) if key_map is not None else name
            if new is None or new in self._to_inner:
                self.dropped.append(key)
                continue
            self._to_inner[new] = key

    def inner_key(self, name: str) -> str:
        return self._to_inner[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.inner[self._to_inner[name]]

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        # Forwarded so that the inner source's own cast-as-read path is used.
        return self.inner.read(self._to_inner[name], dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._to_inner)

    def __len__(self) -> int:
        return len(self._to_inner)

    def __contains__(self, name: object) -> bool:
        return name in self._to_inner

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(self._to_inner[name])

    def dtype(self, name: str) -> torch.dtype:
        return self.inner.dtype(self._to_inner[name])

    def read_rows(self, name: str, rows: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.inner.read_rows(self._to_inner[name], rows, dtype)

    def rows_are_cheap(self, name: str) -> bool:
        return self.inner.rows_are_cheap(self._to_inner[name])

    def fp8_weight(self, name: str) -> Fp8Weight | None:
        return fp8_weight(self.inner, self._to_inner[name])

    def quantized(self, name: str) -> GGUFTensor | None:
        return quantized(self.inner, self._to_inner[name])

    def stored_type(self, name: str) -> str | None:
        return stored_type(self.inner, self._to_inner[name])

    def describe(self) -> str:
        return self.inner.describe()


class Fp8ScaledSource(TensorSource):
    """ComfyUI fp8 / fp8_scaled files, with the scale tensors and markers hidden.

    dequantize=True: `source[name]` of an fp8 weight is `float(W) * scale` in `dequant_dtype`
    (one tensor at a time; the loader casts it to the model dtype).
    dequantize=False: fp8 weights are returned as stored (fp8) and `scale(name)` gives the scale,
    for loading a model whose Linear layers compute in fp8 (no upcast copy in RAM).
    Plain `*_fp8_e4m3fn` files (fp8 weights without scale tensors) have scale 1.
    """

    def __init__(self, inner: TensorSource, *, dequantize: bool = True,
                 dequant_dtype: torch.dtype = torch.float32) -> None:
        self.inner = inner
        self.files = inner.files
        self.dequantize = dequantize
        self.dequant_dtype = dequant_dtype
        keys = set(inner)
        hidden = {k for k in keys if is_quant_aux(k)}
        self._fp8 = {k for k in keys - hidden if k.endswith(".weight") and inner.dtype(k) in FP8_DTYPES}
        self._scale_key: dict[str, str] = {}
        self._input_scale_key: dict[str, str] = {}
        self.layout = "plain"  # "plain" (fp8, no scales), "scale_weight" (legacy), "weight_scale" (newer)
        for key in self._fp8:
            module = key[: -len(".weight")]
            for suffix in _SCALE_SUFFIXES:
                if f"{module}.{suffix}" in keys:
                    self._scale_key[key] = f"{module}.{suffix}"
                    self.layout = suffix
            for suffix in _INPUT_SCALE_SUFFIXES:
                if f"{module}.{suffix}" in keys:
                    self._input_scale_key[key] = f"{module}.{suffix}"
        self._keys = [k for k in inner if k not in hidden]
        self._keyset = frozenset(self._keys)
        self._refuse_other_formats(sorted(k for k in hidden if k.endswith(".comfy_quant")))

    def _refuse_other_formats(self, blobs: list[str]) -> None:
        """Refuse quantization formats other than fp8 with per-tensor / per-row scales (nvfp4,
        int8 blocks, ...), named per layer in `comfy_quant` JSON blobs or the file metadata."""
        formats: set[str] = set()
        for key in blobs:
            try:
                conf = json.loads(bytes(self.inner[key].to(torch.uint8).tolist()).decode("utf-8"))
                formats.add(conf.get("format"))
            except (ValueError, AttributeError, TypeError, RecursionError):  # not this format's blob
                continue
        raw = (getattr(self.inner, "metadata", None) or {}).get("_quantization_metadata")
        try:
            layers = json.loads(raw).get("layers", {}) if raw else {}
            formats |= {v.get("format") for v in layers.values() if isinstance(v, dict)}
        except (ValueError, AttributeError, TypeError, RecursionError):
            pass
        bad = formats - set(_FP8_FORMATS) - {None}
        if bad:
            raise CheckpointError(
                f"{self.describe()} uses the quantization format(s) {sorted(bad)}, "
                "which wan_lite cannot read.",
                "Use the fp16/bf16 or fp8_scaled file of this model instead.",
            )

    @property
    def fp8_keys(self) -> frozenset[str]:
        """Names of the weights stored as fp8."""
        return frozenset(self._fp8)

    def scale(self, name: str) -> torch.Tensor:
        """The float32 scale of an fp8 weight: shape [] (per tensor) or [out, 1] (per row)."""
        key = self._scale_key.get(name)
        if key is None:
            return torch.ones((), dtype=torch.float32)
        scale = self.inner[key].to(torch.float32)
        if scale.numel() == 1:
            return scale.reshape(())
        rows = self.inner.shape(name)[0]
        if scale.numel() == rows:
            # Per-output-row scales broadcast over the remaining dimensions of the weight.
            return scale.reshape(rows, *([1] * (len(self.inner.shape(name)) - 1)))
        raise CheckpointError(
            f"{self.describe()}: the scale {key!r} has shape {list(scale.shape)}, which does not fit "
            f"the weight {name!r} {list(self.inner.shape(name))} (block-wise scales are not supported).",
            "Use the fp16/bf16 or fp8_scaled file of this model instead.",
        )

    def stored_type(self, name: str) -> str | None:
        if name not in self._fp8:
            return None
        return "F8_E4M3" if self.inner.dtype(name) == torch.float8_e4m3fn else "F8_E5M2"

    def fp8_weight(self, name: str) -> Fp8Weight | None:
        if name not in self._fp8:
            return None
        key = self._input_scale_key.get(name)
        input_scale = self.inner[key].to(torch.float32) if key is not None else None
        return Fp8Weight(self.inner[name], self.scale(name), input_scale)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._fp8 and self.dequantize:
            return self.inner[name].to(self.dequant_dtype) * self.scale(name).to(self.dequant_dtype)
        return self.inner[name]

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name in self._fp8 and self.dequantize:
            # Product in dequant_dtype (one rounding), then one cast to the model dtype.
            tensor = self[name]
            return tensor if dtype is None or dtype == tensor.dtype else tensor.to(dtype)
        return self.inner.read(name, dtype)

    def read_rows(self, name: str, rows: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name in self._fp8:
            return super().read_rows(name, rows, dtype)
        return self.inner.read_rows(name, rows, dtype)

    def rows_are_cheap(self, name: str) -> bool:  # the 16-bit tensors (umT5's embedding), as the file's
        return name not in self._fp8 and self.inner.rows_are_cheap(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, name: object) -> bool:
        return name in self._keyset

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        if name in self._fp8 and self.dequantize:
            return self.dequant_dtype
        return self.inner.dtype(name)

    def describe(self) -> str:
        return self.inner.describe()


# --------------------------------------------------------------------------------------------
# GGUF


def open_gguf_reader(path: Path):  # -> gguf.GGUFReader (the import is deferred: gguf is optional)
    """A memory-mapped GGUFReader; CheckpointError for a missing, truncated or corrupt file."""
    import gguf

    path = Path(path)
    regular_file(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # the reader raises ValueError, IndexError, ... on damaged files
        raise CheckpointError(
            f"{path} is not a readable GGUF file ({type(err).__name__}: {err}).",
            "The file is truncated or damaged (an interrupted download?); download it again.",
        ) from None
    size = path.stat().st_size
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise CheckpointError(
            f"{path} is truncated: {size:,} bytes on disk, its header describes {end:,}.",
            "The download did not finish; download this file again.",
        )
    return reader


def gguf_field(reader, key: str):  # -> str | int | float | list | None
    """The value of a GGUF metadata field (strings decoded, arrays as lists), None if absent."""
    import gguf

    field = reader.get_field(key)
    if field is None:
        return None
    types = field.types
    if types and types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    if types and types[0] == gguf.GGUFValueType.ARRAY:
        if len(types) > 1 and types[1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i][0].item() for i in field.data]
    return field.parts[field.data[0]][0].item()


def gguf_shape(reader, tensor, path: Path) -> tuple[int, ...]:
    """PyTorch shape of a GGUF tensor: `comfy.gguf.orig_shape.<name>` if present (5-D tensors
    are stored flattened), else the GGUF dims reversed (GGUF lists the fastest dim first)."""
    orig = gguf_field(reader, f"comfy.gguf.orig_shape.{tensor.name}")
    if orig and not (isinstance(orig, list) and all(isinstance(v, int) and v >= 0 for v in orig)):
        raise CheckpointError(f"{path}: the stored shape of tensor {tensor.name!r} is {orig!r}, not a list of sizes.",
                              "The file is damaged; download it again.")
    shape = tuple(int(v) for v in orig) if orig else tuple(int(v) for v in reversed(tensor.shape.tolist()))
    if math.prod(shape) != tensor.n_elements:
        raise CheckpointError(
            f"{path}: tensor {tensor.name!r} holds {tensor.n_elements} values "
            f"but its shape is {list(shape)}.",
            "The file is damaged; download it again.",
        )
    return shape


class GGUFSource(TensorSource):
    """A GGUF file (ComfyUI-GGUF DiT conversions, llama.cpp t5encoder), memory-mapped.

    Shapes come from `comfy.gguf.orig_shape.<name>` when present, else from the reversed GGUF
    dims (GGUF stores the fastest-varying dim first). Quantized tensors (Q8_0, Q6_K, Q5_K, Q4_K,
    ...) are dequantised to float32 with gguf's quants module when read; F16 and BF16 come back
    as float16 / bfloat16 without conversion, F32 as float32.
    """

    def __init__(self, path: Path) -> None:
        import gguf

        self._gguf = gguf
        path = Path(path)
        self.files = (path,)
        self.reader = open_gguf_reader(path)
        self.architecture = gguf_field(self.reader, "general.architecture")
        self._tensors = {t.name: t for t in self.reader.tensors}
        self._shapes = {t.name: gguf_shape(self.reader, t, path) for t in self.reader.tensors}

    def qtype(self, name: str) -> str:
        """The ggml type name of a tensor: "F32", "F16", "BF16", "Q8_0", "Q4_K", ..."""
        return self._tensors[name].tensor_type.name

    def stored_type(self, name: str) -> str:
        return self.qtype(name)

    def quantized(self, name: str) -> GGUFTensor:
        t = self._tensors[name]
        # A copy: torch cannot wrap the read-only memory map, and the caller owns the result.
        return GGUFTensor(torch.from_numpy(np.array(t.data)), t.tensor_type.name, self._shapes[name])

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._tensors[name]
        return self._values(name, t.data, self._shapes[name])

    def read_rows(self, name: str, rows: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows of a 2-D tensor: only their blocks are read from the map and dequantised (each
        row of a GGUF matrix is whole blocks)."""
        shape = self._shapes[name]
        if len(shape) != 2:
            return super().read_rows(name, rows, dtype)
        data = np.asarray(self._tensors[name].data).reshape(shape[0], -1)[rows.numpy()]
        out = self._values(name, data, (rows.numel(), shape[1]))
        return out if dtype is None or out.dtype == dtype else out.to(dtype)

    def rows_are_cheap(self, name: str) -> bool:
        return len(self._shapes[name]) == 2

    def _values(self, name: str, data: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
        t = self._tensors[name]
        q = self._gguf.GGMLQuantizationType
        try:
            if t.tensor_type in (q.F32, q.F16):
                array = np.array(data)
            elif t.tensor_type == q.BF16:
                # bfloat16 is the upper half of float32: keep the bits, no float32 round trip.
                bits = np.array(data).view(np.int16)
                return torch.from_numpy(bits).view(torch.bfloat16).reshape(shape)
            else:
                array = self._gguf.quants.dequantize(data, t.tensor_type)
        except NotImplementedError:
            raise CheckpointError(
                f"{self.describe()}: tensor {name!r} uses the GGUF type {t.tensor_type.name}, "
                "which the installed gguf package cannot dequantise.",
                "Use a Q8_0, Q6_K, Q5_K or Q4_K file, or update the gguf package.",
            ) from None
        return torch.from_numpy(np.ascontiguousarray(array)).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        kind = self._tensors[name].tensor_type.name
        return {"F16": torch.float16, "BF16": torch.bfloat16}.get(kind, torch.float32)


# --------------------------------------------------------------------------------------------
# The tokenizer inside ComfyUI's umT5 files.

SPIECE_KEY = "spiece_model"


def spiece_model_bytes(source: TensorSource) -> bytes:
    """The serialized SentencePiece model ComfyUI stores as the uint8 tensor `spiece_model`."""
    if SPIECE_KEY not in source:
        raise CheckpointError(
            f"{source.describe()} has no built-in tokenizer (no 'spiece_model' tensor).",
            "Point wan_lite at the tokenizer folder (google/umt5-xxl or the diffusers tokenizer/).",
        )
    return source[SPIECE_KEY].to(torch.uint8).numpy().tobytes()


UMT5_EXTRA_IDS = 300  # <extra_id_*> sentinels of google/umt5-xxl, above the 256,000 pieces


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def proto_field(buf: bytes, wanted: int) -> bytes | None:
    """The first length-delimited field `wanted` of a serialized protobuf message."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        elif wire == 2:
            n, i = _varint(buf, i)
            if field == wanted:
                return buf[i : i + n]
            i += n
        else:
            return None
    return None


def materialize_tokenizer(source: TensorSource, cache_dir: Path, extra_ids: int = UMT5_EXTRA_IDS) -> Path:
    """Write the tokenizer inside a ComfyUI umT5 file as a folder transformers loads offline
    (spiece.model, tokenizer.json, tokenizer_config.json), once per content; returns the folder.

    tokenizer.json is built from the SentencePiece pieces and scores plus the model's
    normalisation table, the same construction transformers' converter uses, but without the
    protobuf package (the two fields needed are read directly from the serialized model).
    The `<extra_id_*>` sentinels are capped so every id has a row in the file's embedding.
    """
    import sentencepiece as spm
    from transformers import T5Tokenizer

    data = spiece_model_bytes(source)
    sp = spm.SentencePieceProcessor(model_proto=data)
    embedding = next((k for k in ("shared.weight", "token_embedding.weight") if k in source), None)
    rows = source.shape(embedding)[0] if embedding else None
    if rows is not None:
        extra_ids = max(0, min(extra_ids, rows - sp.get_piece_size()))
    folder = Path(cache_dir) / f"{hashlib.sha256(data).hexdigest()[:16]}-{extra_ids}"
    if (folder / "tokenizer.json").is_file():
        return folder
    vocab = [(sp.id_to_piece(i), float(sp.get_score(i))) for i in range(sp.get_piece_size())]
    normalizer = proto_field(data, 3)  # ModelProto.normalizer_spec
    charsmap = proto_field(normalizer, 2) if normalizer is not None else None  # precompiled_charsmap
    tokenizer = T5Tokenizer(vocab=vocab, _spm_precompiled_charsmap=charsmap, extra_ids=extra_ids)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "spiece.model").write_bytes(data)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)
    log.info("Tokenizer from %s written to %s", source.describe(), folder)
    return folder
