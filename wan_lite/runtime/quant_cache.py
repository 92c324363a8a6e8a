"""The disk cache of converted models: a model's weights in the runtime format (int8 / fp8 /
int4 quantized, or bf16 from an fp32 checkpoint) as one safetensors file, so that a second start
skips the conversion and a streamed expert can be read block by block from it.

- **Keyed by content, not place**: a cache entry's key hashes each source file's size, mtime and
  a hash of its header bytes (`source_identity`), the format, the skip patterns and the float
  dtype, never the file's path: moving or renaming the models folder keeps the cache. A LoRA
  merged on read (`loading.lora.LoRASource`) lists its LoRA files among the source's files, so
  such a source keys an entry of its own.
- **Written as it is converted** (`convert_to_cache`): the header is computed from the meta
  model's declared dtypes and shapes, then each tensor is read from the source, cast or
  quantized and written, one at a time, to a temporary name renamed at the end. An fp32
  A14B expert (57 GB) never sits in RAM: the peak is one source tensor and its converted copy.
- **Stale entries removed**: writing an entry removes the entries whose source files, at the
  paths recorded in them, now hold other content (a replaced checkpoint), entries of other cache
  versions and leftover partial files of dead writers. `prune(cache_dir, cap)` (`python -m
  wan_lite cache prune`) does the same, removes entries whose sources are gone and which were
  not used for ORPHAN_DAYS, then the least recently used ones until the folder is within the
  cap (DEFAULT_CAP_GB). Using an entry touches its mtime (its "last used").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from wan_lite.errors import CheckpointError
from wan_lite.loading.tensors import _ST_DTYPES, SafetensorsSource, TensorSource, read_safetensors_header
from wan_lite.runtime.quant import quantize_model, quantized_modules
from wan_lite.runtime.refill import Rows, declare_dtypes, iter_refill, refill_order

log = logging.getLogger(__name__)

CACHE_VERSION = 2
_META_KEY = "wan_lite_quant"
SUFFIX = ".safetensors"
DEFAULT_CAP_GB = 80.0  # `cache prune` keeps at most this much: an A14B pair in bf16 (57 GB) and one in fp8
ORPHAN_DAYS = 30.0  # an entry whose source files are gone is kept this long after its last use
_HEAD_BYTES = 1 << 20  # files that are not safetensors: hash this much of their start

_DTYPE_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}
FLOAT_FORMATS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _header_hash(path: Path) -> str:
    """sha256 of a file's header bytes: a safetensors file's length prefix and JSON header (names,
    dtypes, shapes, offsets, metadata), else its first MiB."""
    with path.open("rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        if path.suffix == SUFFIX and 0 < n <= 100_000_000:
            head += fh.read(n)
        else:
            head += fh.read(_HEAD_BYTES - len(head))
    return hashlib.sha256(head).hexdigest()[:32]


def file_identity(path: Path) -> dict[str, object]:
    """Size, mtime and header hash of one file: what its cache entries are keyed by."""
    st = Path(path).stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "header": _header_hash(Path(path))}


def source_identity(source: TensorSource) -> list[dict[str, object]]:
    """The identity of every file behind `source`, in order (no paths: moving the files keeps it)."""
    return [file_identity(Path(f)) for f in source.files]


def cache_key(source: TensorSource, fmt: str, skip: Iterable[str] = (),
              dtype: torch.dtype | None = torch.bfloat16) -> str:
    """A short hash of the source files' identity, the format, the skip patterns and the dtype of
    the unquantized tensors; for a source that merges LoRAs as it reads (`LoRASource`: its LoRA
    files are among its files), their strengths too."""
    strengths = [s for _lora, s in getattr(source, "loras", ())]
    blob = json.dumps({"v": CACHE_VERSION, "files": source_identity(source), "fmt": fmt,
                       "skip": sorted(set(skip)), "dtype": str(dtype), "lora_strengths": strengths},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _slug(what: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", what).strip("-") or "model"


def cache_path(cache_dir: Path, source: TensorSource, fmt: str, skip: Iterable[str] = (),
               what: str = "model", dtype: torch.dtype | None = torch.bfloat16) -> Path:
    return Path(cache_dir) / f"{_slug(what)}.{fmt}.{cache_key(source, fmt, skip, dtype)}{SUFFIX}"


# ------------------------------------------------------------------------------ writing
def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _write_stream(path: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                  tensors: Iterator[tuple[str, torch.Tensor | Rows]], metadata: dict[str, str]) -> None:
    """Write a safetensors file whose tensors (`layout`: name, dtype, shape, in file order) come
    one at a time from `tensors` (in the same order), to a temporary name renamed at the end, so
    a crash never leaves a half-written cache that looks valid. safetensors' own writer first
    copies every tensor into Python bytes (the whole model twice in RAM)."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in layout:
        n = dtype.itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with tmp.open("wb") as fh:
            fh.write(len(raw).to_bytes(8, "little"))
            fh.write(raw)
            for (name, dtype, shape), (got, t) in zip(layout, tensors, strict=True):
                if got != name or t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise RuntimeError(f"cache writer: expected {name} {dtype} {list(shape)}, "
                                       f"got {got} {t.dtype} {list(t.shape)}")
                for part in t.chunks() if isinstance(t, Rows) else (t,):  # a large one a chunk at a time
                    flat = part.detach().contiguous().reshape(-1).view(torch.uint8).cpu()
                    fh.write(memoryview(flat.numpy()))
                    del flat, part
                del t
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _meta(model: nn.Module, key: str, aliases: dict[str, str], sources: TensorSource | None,
          fmt: str) -> dict[str, str]:
    files = [] if sources is None else [dict(file_identity(Path(f)), path=str(Path(f).resolve()))
                                        for f in sources.files]
    meta = {"version": CACHE_VERSION, "key": key, "fmt": fmt,
            "modules": {n: m.fmt for n, m in quantized_modules(model).items()},
            "aliases": aliases, "sources": files}
    return {_META_KEY: json.dumps(meta)}


def save_quantized(model: nn.Module, path: Path, *, key: str = "", source: TensorSource | None = None,
                   fmt: str = "") -> Path:
    """Write the whole state of a converted model (every tensor in its current dtype) to `path`,
    with the quantized layer names, formats, `key` and the source files in the header metadata."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}  # tied tensors (umT5's shared / embed_tokens) are stored once
    first: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype)
        if ident in first:
            aliases[name] = first[ident]
        else:
            first[ident], tensors[name] = name, t
    layout = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    _write_stream(Path(path), layout, iter(tensors.items()), _meta(model, key, aliases, source, fmt))
    log.info("saved converted weights to %s", path)
    return Path(path)


def convert_to_cache(model: nn.Module, source: TensorSource, path: Path, *, key: str, fmt: str,
                     key_map: Callable[[str], str] | None = None, quant_device: torch.device | str = "cpu",
                     what: str = "model") -> Path:
    """Write the cache of a meta `model` (quantized layers swapped in, dtypes declared) straight
    from `source`, tensor by tensor: no tensor of the model is ever filled, so the RAM peak is one
    source tensor and its converted copy (an A14B block is ~30 of them), or of a large one (umT5's
    2 GB token embedding) a ROW_CHUNK_BYTES chunk of each."""
    declared = model.state_dict(keep_vars=True)
    order = refill_order(model)
    layout = [(n, declared[n].dtype, tuple(declared[n].shape)) for n in order]
    tensors = iter_refill(model, source, key_map=key_map, quant_device=quant_device, what=what, rows=True)
    _write_stream(Path(path), layout, tensors, _meta(model, key, {}, source, fmt))
    log.info("converted %s (%s) into %s", what, fmt, path)
    return Path(path)


# ------------------------------------------------------------------------------ reading
def read_cache_metadata(path: Path) -> dict | None:
    """The metadata of a cache file, or None when the file is absent or not ours."""
    try:
        header = read_safetensors_header(Path(path))
        meta = json.loads(header.get("__metadata__", {}).get(_META_KEY, "null"))
        return meta if isinstance(meta, dict) else None
    except (CheckpointError, json.JSONDecodeError):
        return None


def _current(path: Path | None, key: str | None) -> dict | None:
    """The metadata of `path` when it is a current cache for `key`, else None."""
    if path is None:
        return None
    meta = read_cache_metadata(path)
    if meta is None or meta.get("version") != CACHE_VERSION or (key is not None and meta.get("key") != key):
        if meta is not None:
            log.info("converted-weights cache %s is stale; converting again", path)
        return None
    return meta


def prepare_like_cache(model: nn.Module, meta: dict) -> None:
    """Swap in the quantized layers a cache's metadata names (a meta model then declares exactly
    the cache's tensors)."""
    by_fmt: dict[str, list[str]] = {}
    for name, fmt in meta["modules"].items():
        by_fmt.setdefault(fmt, []).append(name)
    for fmt, names in by_fmt.items():
        quantize_model(model, fmt, names=names)


def load_quantized(model: nn.Module, path: Path, *, key: str | None = None, fill: bool = True) -> bool:
    """Fill `model` (meta or filled, unconverted) from a cache written here.

    Returns False, touching nothing, when the file is missing, not a wan_lite cache, of another
    cache version or written for another `key` (source files changed): the caller converts again.
    fill=False: only swap the layers and declare the dtypes (the model stays on meta: its
    weights are read from the file when needed).
    """
    meta = _current(Path(path), key)
    if meta is None:
        return False
    prepare_like_cache(model, meta)
    source = SafetensorsSource([Path(path)])
    expected = model.state_dict(keep_vars=True)
    aliases = meta.get("aliases", {})
    missing = [k for k in expected if k not in source and k not in aliases]
    if missing or len(source) + len(aliases) != len(expected):
        raise CheckpointError(f"The converted-weights cache {path} does not match this model "
                              f"({len(missing)} tensors missing).", f"Delete {path}; it will be rebuilt.")
    for name, ref in expected.items():
        shape, dtype = source.shape(aliases.get(name, name)), source.dtype(aliases.get(name, name))
        if tuple(shape) != tuple(ref.shape) or dtype.is_floating_point != ref.is_floating_point():
            raise CheckpointError(f"Tensor {name!r} in {path} is {dtype} {list(shape)}, expected "
                                  f"{ref.dtype} {list(ref.shape)}.", f"Delete {path}; it will be rebuilt.")
    touch(Path(path))
    if not fill:
        # Float tensors take the dtypes they were cached in (the dtype choice is part of the key).
        for name, ref in expected.items():
            want = source.dtype(aliases.get(name, name))
            if ref.dtype != want:
                _set_meta_dtype(model, name, want)
        return True
    loaded = {}
    for name in expected:
        loaded[name] = loaded[aliases[name]] if name in aliases else source[name]
    model.load_state_dict(loaded, assign=True, strict=True)  # aliases share one tensor again
    log.info("loaded converted weights from %s", path)
    return True


def _set_meta_dtype(model: nn.Module, name: str, dtype: torch.dtype) -> None:
    prefix, _, leaf = name.rpartition(".")
    module = model.get_submodule(prefix) if prefix else model
    if leaf in module._parameters:
        module._parameters[leaf].data = module._parameters[leaf].data.to(dtype)
    else:
        module._buffers[leaf] = module._buffers[leaf].to(dtype)


def touch(path: Path) -> None:
    """Mark a cache entry as used now (its mtime: what `prune` keeps the most recent of)."""
    with contextlib.suppress(OSError):
        os.utime(path)


def load_or_quantize(model: nn.Module, source: TensorSource, fmt: str, *, dtype: torch.dtype | None = torch.bfloat16,
                     cache_dir: Path | None = None, key_map: Callable[[str], str] | None = None,
                     keep_fp32: Callable[[str], bool] | None = None, skip: Iterable[str] = (),
                     quant_device: torch.device | str = "cpu", what: str = "model",
                     fill: bool = True) -> tuple[nn.Module, Path | None]:
    """Fill a meta-built `model` with `fmt` weights ("int8" / "fp8" / "int4" quantized, or a float format
    of FLOAT_FORMATS: `dtype`): from the cache when it is current, else by converting `source`
    tensor by tensor straight into the cache file (`convert_to_cache`) and reading it back.
    Without a `cache_dir` the model is filled from `source` as read. fill=False (with a cache):
    the model stays on meta, its weights in the cache file (streamed from there).
    Returns (model, cache file or None)."""
    skip = tuple(skip)
    key = cache_key(source, fmt, skip, dtype)
    path = cache_path(cache_dir, source, fmt, skip, what, dtype) if cache_dir is not None else None
    if path is not None and load_quantized(model, path, key=key, fill=fill):
        return model, path
    if fmt not in FLOAT_FORMATS:
        quantize_model(model, fmt, skip)
    if dtype is not None:
        declare_dtypes(model, dtype, keep_fp32)
    if path is not None:
        try:
            convert_to_cache(model, source, path, key=key, fmt=fmt, key_map=key_map, quant_device=quant_device,
                             what=what)
        except OSError as err:  # a full or read-only disk costs the next start time, not this run
            log.warning("could not write the converted-weights cache %s (%s); the next start converts again",
                        path, err)
            path = None
        else:
            remove_stale(Path(cache_dir))
            if fill:
                load_quantized(model, path, key=key)
            return model, path
    from wan_lite.runtime.refill import refill_like

    refill_like(model, source, key_map=key_map, quant_device=quant_device, what=what)
    return model, path


# ------------------------------------------------------------------------------ housekeeping
@dataclass(frozen=True)
class CacheEntry:
    path: Path
    size: int
    used: float  # last use (mtime), seconds since the epoch
    what: str
    fmt: str
    sources: tuple[str, ...]  # the source files' paths when it was written
    status: str  # "current", "stale" (sources replaced / another version), "orphan" (sources gone), "partial"


def _status(meta: dict | None) -> tuple[str, tuple[str, ...]]:
    if meta is None or meta.get("version") != CACHE_VERSION:
        return "stale", ()
    recorded = meta.get("sources") or []
    paths = tuple(str(s.get("path", "")) for s in recorded)
    present = [s for s in recorded if Path(str(s.get("path", ""))).is_file()]
    for s in present:
        try:
            if file_identity(Path(str(s["path"]))) != {k: s[k] for k in ("size", "mtime_ns", "header")}:
                return "stale", paths
        except (OSError, KeyError):
            return "stale", paths
    return ("orphan" if recorded and not present else "current"), paths


def list_entries(cache_dir: Path) -> list[CacheEntry]:
    """Every file in the cache folder with its size, last use and status, most recently used first."""
    out = []
    folder = Path(cache_dir)
    if not folder.is_dir():
        return out
    for p in folder.iterdir():
        if not p.is_file():
            continue
        try:
            st = p.stat()
        except OSError:
            continue
        if p.name.startswith(".") and p.name.endswith(".tmp"):
            pid = p.name[:-4].rsplit(".", 1)[-1]
            alive = pid.isdigit() and _pid_alive(int(pid))
            if not alive:
                out.append(CacheEntry(p, st.st_size, st.st_mtime, "", "", (), "partial"))
            continue
        if p.suffix != SUFFIX:
            continue
        meta = read_cache_metadata(p)
        status, sources = _status(meta)
        parts = p.name.split(".")
        out.append(CacheEntry(p, st.st_size, st.st_mtime, parts[0], (meta or {}).get("fmt") or
                              (parts[1] if len(parts) > 3 else ""), sources, status))
    return sorted(out, key=lambda e: -e.used)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_stale(cache_dir: Path) -> list[Path]:
    """Delete stale entries (sources replaced, other cache versions) and dead writers' partial files."""
    gone = []
    for e in list_entries(cache_dir):
        if e.status in ("stale", "partial"):
            with contextlib.suppress(OSError):
                e.path.unlink()
                gone.append(e.path)
                log.info("removed stale cache entry %s", e.path.name)
    return gone


def prune(cache_dir: Path, cap_gb: float = DEFAULT_CAP_GB, *, orphan_days: float = ORPHAN_DAYS,
          now: float | None = None) -> list[Path]:
    """Remove stale entries and partial files, orphans unused for `orphan_days`, then the least
    recently used entries until the folder holds at most `cap_gb` GB (10**9 bytes). Returns what
    was removed."""
    now = time.time() if now is None else now
    gone = remove_stale(cache_dir)
    kept = []
    for e in list_entries(cache_dir):
        if e.status == "orphan" and now - e.used > orphan_days * 86400:
            with contextlib.suppress(OSError):
                e.path.unlink()
                gone.append(e.path)
            continue
        kept.append(e)
    total = sum(e.size for e in kept)
    for e in sorted(kept, key=lambda e: e.used):  # least recently used first
        if total <= cap_gb * 1e9:
            break
        with contextlib.suppress(OSError):
            e.path.unlink()
            gone.append(e.path)
            total -= e.size
    return gone
