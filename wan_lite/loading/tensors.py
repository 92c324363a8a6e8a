"""Read tensors lazily from checkpoint files, one at a time, never the whole file at once.

A `TensorSource` maps names to tensors that are only materialised when asked for, so a loader
can cast each tensor to the target dtype as it is read: loading a float32 checkpoint into a
bfloat16 model holds at most one float32 tensor at a time.

Safetensors files are memory-mapped by `safe_open`; `.pth` files are opened with
`torch.load(weights_only=True, mmap=True)`, so a checkpoint can never run code and its storage
stays on disk until a tensor is read.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import struct
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from wan_lite.errors import CheckpointError
from wan_lite.loading.files import regular_file

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


PLAIN_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
_MADV_PAGEOUT = 21


class TensorSource(Mapping[str, torch.Tensor]):
    """A read-only name -> tensor mapping whose tensors are read on access.

    `shape(name)` and `dtype(name)` answer from the file header without reading data.
    `files` lists the files behind the source (for messages and cache keys).
    """

    files: tuple[Path, ...] = ()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self[name].dtype

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: self.shape(name) for name in self}

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `name`, cast to `dtype` when given."""
        tensor = self[name]
        return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)

    def read_rows(self, name: str, rows: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows `rows` (int64 indices into the first dimension) of `name`, cast to `dtype`: a
        memory-mapped file reads only their pages (a token embedding's lookup)."""
        tensor = self[name].index_select(0, rows)
        return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)

    def rows_are_cheap(self, name: str) -> bool:
        """Whether `read_rows` reads only the rows (a memory-mapped float tensor), not the tensor."""
        return False

    def describe(self) -> str:
        return ", ".join(str(f) for f in self.files) or "<memory>"


class DictSource(TensorSource):
    """Tensors already in memory (tests, converted state dicts)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], files: Iterable[Path] = ()) -> None:
        self._tensors = dict(tensors)
        self.files = tuple(Path(f) for f in files)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked: its shape and every tensor's entry
    (dtype, shape, data_offsets) against each other and against the file size.

    Raises CheckpointError naming the file when it is not a regular readable file, is truncated
    or is not safetensors.
    """
    return _read_header(Path(path))[0]


def _read_header(path: Path) -> tuple[dict, int]:
    """(checked header, offset of the data block)."""
    size = regular_file(path)
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100_000_000):
                raise ValueError("header length is larger than the file")
            header = json.loads(fh.read(n))
    except OSError as err:  # permission denied, an I/O error
        raise CheckpointError(f"{path} cannot be read ({err.strerror or err}).",
                              "Check the file's permissions.") from None
    except (ValueError, RecursionError, struct.error) as err:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(
            f"{path} is not a readable safetensors file "
            f"({'header nested too deeply' if isinstance(err, RecursionError) else err}).",
            "The file is corrupt or was not fully downloaded; download it again.",
        ) from None
    problem = _header_problem(header)
    if problem:
        raise CheckpointError(f"{path} is not a valid safetensors file: {problem}.",
                              "The file is corrupt or was not fully downloaded; download it again.")
    end = 8 + n + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size < end:
        raise CheckpointError(
            f"{path} is truncated: {size:,} bytes on disk, the header describes {end:,}.",
            "The download did not finish; download this file again.",
        )
    return header, 8 + n


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _header_problem(header: object) -> str | None:
    """What is wrong with the shape of a parsed safetensors header, None when nothing is."""
    if not isinstance(header, dict):
        return f"its header is a JSON {type(header).__name__}, not an object"
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        return "its __metadata__ is not an object of strings"
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            return f"the entry of tensor {name!r} is not an object"
        offsets, shape, dtype = info.get("data_offsets"), info.get("shape"), info.get("dtype")
        if not isinstance(dtype, str):
            return f"tensor {name!r} has no dtype"
        if not (isinstance(shape, list) and all(_is_int(d) for d in shape)):
            return f"tensor {name!r} has no valid shape"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            return f"tensor {name!r} has no valid data_offsets (two byte offsets, start <= end)"
        if dtype in _ST_DTYPES and offsets[1] - offsets[0] != math.prod(shape) * _itemsize(_ST_DTYPES[dtype]):
            return (f"tensor {name!r} takes {offsets[1] - offsets[0]} bytes, "
                    f"but its shape {shape} in {dtype} needs {math.prod(shape) * _itemsize(_ST_DTYPES[dtype])}")
    return None


class SafetensorsSource(TensorSource):
    """One or more (sharded) safetensors files, memory-mapped, read tensor by tensor.

    Each read copies (and casts) one tensor out of the mapping and then tells the kernel the
    mapped pages are no longer needed (MADV_DONTNEED), so the file's pages do not pile up in the
    process's resident memory: loading a float32 checkpoint into a bfloat16 model peaks at the
    bfloat16 model plus one float32 tensor, not the whole float32 file.
    """

    def __init__(self, files: Iterable[Path]) -> None:
        self.files = tuple(Path(f) for f in files)
        self._where: dict[str, int] = {}
        self._info: dict[str, tuple[tuple[int, ...], torch.dtype, int, int]] = {}
        self.metadata: dict[str, str] = {}
        self._maps: list[mmap.mmap | None] = []
        for i, f in enumerate(self.files):
            header, base = _read_header(f)
            self.metadata.update(header.get("__metadata__") or {})
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in _ST_DTYPES:
                    raise CheckpointError(f"{f}: tensor {name!r} has an unsupported dtype {info['dtype']}.")
                start, end = info["data_offsets"]
                self._where[name] = i
                self._info[name] = (tuple(info["shape"]), _ST_DTYPES[info["dtype"]], base + start, base + end)
            self._maps.append(None)

    def _map(self, i: int) -> mmap.mmap:
        if self._maps[i] is None:
            with self.files[i].open("rb") as fh:
                # copy-on-write mapping: readable as a writable buffer for torch, never written
                self._maps[i] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[i]

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A new tensor holding `name`, cast to `dtype` on the way (no second copy)."""
        shape, stored, start, end = self._info[name]
        i = self._where[name]
        try:
            mm = self._map(i)
            if end > start:
                view = torch.frombuffer(mm, dtype=stored, count=(end - start) // _itemsize(stored), offset=start)
            else:
                view = torch.empty(0, dtype=stored)
            out = view.reshape(shape).to(dtype or stored, copy=True)
        except (ValueError, RuntimeError, OSError) as err:
            raise CheckpointError(
                f"Cannot read tensor {name!r} from {self.files[i]}: {err}",
                "The file is damaged; download it again.",
            ) from None
        if hasattr(mm, "madvise") and end - start >= 1 << 20:
            page = mmap.PAGESIZE
            lo = start // page * page
            mm.madvise(mmap.MADV_DONTNEED, lo, end - lo)
        return out

    def read_rows(self, name: str, rows: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        shape, stored, start, end = self._info[name]
        i = self._where[name]
        if not shape or (rows.numel() and not 0 <= int(rows.min()) <= int(rows.max()) < shape[0]):
            raise IndexError(f"rows out of range for {name!r} of shape {list(shape)}")
        try:
            mm = self._map(i)
            view = torch.frombuffer(mm, dtype=stored, count=(end - start) // _itemsize(stored), offset=start)
            out = view.reshape(shape).index_select(0, rows).to(dtype or stored)
        except (ValueError, RuntimeError, OSError) as err:
            raise CheckpointError(
                f"Cannot read tensor {name!r} from {self.files[i]}: {err}",
                "The file is damaged; download it again.",
            ) from None
        if hasattr(mm, "madvise") and end - start >= 1 << 20:  # the pages read go back, as in `read`
            page = mmap.PAGESIZE
            lo = start // page * page
            mm.madvise(mmap.MADV_DONTNEED, lo, end - lo)
        return out

    def rows_are_cheap(self, name: str) -> bool:
        return self._info[name][1] in PLAIN_FLOATS

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._info[name][1]

    def file_of(self, name: str) -> Path:
        return self.files[self._where[name]]


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


class PthSource(DictSource):
    """A `torch.save` state dict, opened memory-mapped with `weights_only=True` (runs no code)."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        regular_file(path)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # zipfile, pickle and torch raise many types here
            raise CheckpointError(
                f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {err}).",
                "The file is corrupt, truncated or not a weights file; download it again.",
            ) from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{path} does not hold a plain dictionary of tensors.")
        super().__init__(obj, files=[path])

    def rows_are_cheap(self, name: str) -> bool:
        return self[name].dtype in PLAIN_FLOATS

    def read_rows(self, name: str, rows: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """As TensorSource's, then the pages of the memory map the rows took are let go (torch's
        map would keep every page it touched in the process's RSS: a 2 GB table read row chunk by
        row chunk would end up resident whole)."""
        out = super().read_rows(name, rows, dtype)
        tensor = self[name]
        if rows.numel() and tensor.is_contiguous():
            row = tensor[0].numel() * tensor.element_size() if tensor.dim() > 1 else tensor.element_size()
            start = tensor.data_ptr() + int(rows.min()) * row
            _page_out(start, (int(rows.max()) + 1) * row + tensor.data_ptr() - start)
        return out


def _page_out(address: int, length: int) -> None:
    """Ask the kernel to reclaim the pages of [address, address + length) (MADV_PAGEOUT, Linux
    5.4+): clean file-backed pages are dropped and read again from the file if touched; memory
    that is not file-backed stays as it is where there is no swap. Nothing where unsupported."""
    if not sys.platform.startswith("linux") or length <= 0:
        return
    page = mmap.PAGESIZE
    lo = address // page * page
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(address + length - lo), ctypes.c_int(_MADV_PAGEOUT))
    except (OSError, AttributeError):
        pass


def open_source(paths: Path | Iterable[Path]) -> TensorSource:
    """A source for a .safetensors / .pth file or a list of safetensors shards."""
    if isinstance(paths, (str, Path)):
        paths = [Path(paths)]
    paths = [Path(p) for p in paths]
    if len(paths) == 1 and paths[0].suffix in (".pth", ".pt", ".bin", ".ckpt"):
        return PthSource(paths[0])
    return SafetensorsSource(paths)
