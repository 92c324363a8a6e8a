"""The disk cache of quantized models: safetensors files keyed by the source files' identity
(path, size, mtime), the format, the skip patterns and the dtype, written atomically, so that a
second start skips quantizing. `load_or_quantize` fills a meta-built model from the cache when it
is current, else quantizes the source tensor by tensor and writes the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from wan_lite.errors import CheckpointError
from wan_lite.loading.tensors import _ST_DTYPES, SafetensorsSource, TensorSource, read_safetensors_header
from wan_lite.runtime.quant import declare_dtypes, quantize_model, quantized_modules, refill_like

log = logging.getLogger(__name__)

CACHE_VERSION = 1
_META_KEY = "wan_lite_quant"


_DTYPE_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}


def source_identity(source: TensorSource) -> list[dict[str, object]]:
    """(path, size, mtime) of every file behind `source`: a changed or replaced file changes it."""
    ident = []
    for f in source.files:
        st = Path(f).stat()
        ident.append({"path": str(Path(f).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return ident


def cache_key(source: TensorSource, fmt: str, skip: Iterable[str] = (),
              dtype: torch.dtype | None = torch.bfloat16) -> str:
    """A short hash of the source files' identity, the format, the skip patterns and the dtype of
    the unquantized tensors."""
    blob = json.dumps({"v": CACHE_VERSION, "files": source_identity(source), "fmt": fmt,
                       "skip": sorted(set(skip)), "dtype": str(dtype)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cache_path(cache_dir: Path, source: TensorSource, fmt: str, skip: Iterable[str] = (),
               what: str = "model", dtype: torch.dtype | None = torch.bfloat16) -> Path:
    return Path(cache_dir) / f"{what}.{fmt}.{cache_key(source, fmt, skip, dtype)}.safetensors"


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Stream a safetensors file tensor by tensor (safetensors' own writer first copies every tensor
    into Python bytes, doubling the RAM of a 14 GB expert), to a temp name renamed at the end so a
    crash never leaves a half-written cache that looks valid."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(len(raw).to_bytes(8, "little"))
            fh.write(raw)
            for t in tensors.values():
                flat = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu()
                fh.write(memoryview(flat.numpy()))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_quantized(model: nn.Module, path: Path, *, key: str = "") -> Path:
    """Write the whole state of a quantized model (every tensor in its current dtype) to `path`,
    with the quantized layer names, formats and `key` in the header metadata."""
    qmods = quantized_modules(model)
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}  # tied tensors (umT5's shared / embed_tokens) are stored once
    first: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype)
        if ident in first:
            aliases[name] = first[ident]
        else:
            first[ident], tensors[name] = name, t
    meta = {"version": CACHE_VERSION, "key": key, "modules": {n: m.fmt for n, m in qmods.items()},
            "aliases": aliases}
    _write_safetensors(Path(path), tensors, {_META_KEY: json.dumps(meta)})
    log.info("saved quantized weights to %s", path)
    return Path(path)


def read_cache_metadata(path: Path) -> dict | None:
    """The quantization metadata of a cache file, or None when the file is absent or not ours."""
    try:
        header = read_safetensors_header(Path(path))
        return json.loads(header.get("__metadata__", {}).get(_META_KEY, "null"))
    except (CheckpointError, json.JSONDecodeError):
        return None


def load_quantized(model: nn.Module, path: Path, *, key: str | None = None) -> bool:
    """Fill `model` (meta or filled, unquantized) from a cache written by `save_quantized`.

    Returns False, touching nothing, when the file is missing, not a wan_lite cache, of another
    cache version or written for another `key` (source files changed): the caller quantizes again.
    """
    meta = read_cache_metadata(path)
    if meta is None or meta.get("version") != CACHE_VERSION or (key is not None and meta.get("key") != key):
        if meta is not None:
            log.info("quantized cache %s is stale; quantizing again", path)
        return False
    by_fmt: dict[str, list[str]] = {}
    for name, fmt in meta["modules"].items():
        by_fmt.setdefault(fmt, []).append(name)
    for fmt, names in by_fmt.items():
        quantize_model(model, fmt, names=names)
    source = SafetensorsSource([Path(path)])
    expected = model.state_dict(keep_vars=True)
    aliases = meta.get("aliases", {})
    missing = [k for k in expected if k not in source and k not in aliases]
    if missing or len(source) + len(aliases) != len(expected):
        raise CheckpointError(f"The quantized cache {path} does not match this model "
                              f"({len(missing)} tensors missing).", f"Delete {path}; it will be rebuilt.")
    loaded = {}
    for name, ref in expected.items():
        t = loaded[aliases[name]] if name in aliases else source[name]
        # Float tensors keep the dtypes they were cached in (the dtype choice is part of the key);
        # a meta model built in the default dtype says nothing about them.
        if tuple(t.shape) != tuple(ref.shape) or (t.is_floating_point() != ref.is_floating_point()):
            raise CheckpointError(f"Tensor {name!r} in {path} is {t.dtype} {list(t.shape)}, expected "
                                  f"{ref.dtype} {list(ref.shape)}.", f"Delete {path}; it will be rebuilt.")
        loaded[name] = t
    model.load_state_dict(loaded, assign=True, strict=True)  # aliases share one tensor again
    log.info("loaded quantized weights from %s", path)
    return True


def load_or_quantize(model: nn.Module, source: TensorSource, fmt: str, *, dtype: torch.dtype | None = torch.bfloat16,
                     cache_dir: Path | None = None, key_map: Callable[[str], str] | None = None,
                     keep_fp32: Callable[[str], bool] | None = None, skip: Iterable[str] = (),
                     quant_device: torch.device | str = "cpu", what: str = "model") -> tuple[nn.Module, Path | None]:
    """Fill a meta-built `model` with `fmt` weights: from the cache when it is current, else by
    quantizing `source` tensor by tensor (then writing the cache). Returns (model, cache file)."""
    skip = tuple(skip)
    key = cache_key(source, fmt, skip, dtype)
    path = cache_path(cache_dir, source, fmt, skip, what, dtype) if cache_dir is not None else None
    if path is not None and load_quantized(model, path, key=key):
        return model, path
    quantize_model(model, fmt, skip)
    if dtype is not None:
        declare_dtypes(model, dtype, keep_fp32)
    refill_like(model, source, key_map=key_map, quant_device=quant_device, what=what)
    if path is not None:
        try:
            save_quantized(model, path, key=key)
        except OSError as err:  # a full or read-only disk costs the next start time, not this run
            log.warning("could not write the quantized cache %s (%s); the next start quantizes again", path, err)
            path = None
    return model, path
