"""What this machine has and can do: GPU, VRAM, compute capability, host RAM, free disk, speed;
and the named memory profiles (presets/memory_profiles/*.json) that stand for a machine.

`Hardware.probe()` asks torch.cuda, psutil and the file system, and only when called (importing
this module probes nothing). `Hardware.fake(vram_gb=8, ram_gb=32)` describes a hypothetical
machine for tests, memory profiles and `python -m wan_lite plan --vram-gb 8 --ram-gb 32`.
`Hardware.speed()` gives rough throughput figures for time estimates (table below).

Units: every size is in GiB (2**30 bytes). Cards and RAM sticks sold as "8 GB" hold 8 GiB, so a
profile's "8 GB" is taken as 8 GiB.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from wan_lite.errors import InputError

log = logging.getLogger(__name__)

GIB = 1024**3
PROFILES_DIR = Path(__file__).resolve().parents[2] / "presets" / "memory_profiles"

# Throughput for time estimates: (name fragment, effective bf16 TFLOP/s on a Wan DiT forward,
# host->GPU GB/s pinned, pageable). First matching fragment wins, so specific names come first.
# Effective = ~55 % of the dense bf16 tensor peak (fp32 accumulate), which is what the official
# Wan2.2 timings imply (RTX 4090: 5B 720p in 535 s ~ 100 TFLOP/s; H100: A14B 720p ~ 520) and
# what our DiT reached on an H200 (410-480 with random full-size weights). PCIe: measured 55.5/25.3 GB/s
# on H100/H200 hosts; consumer PCIe 4.0 x16 ~24/12, x8 cards half that, PCIe 5.0 about double.
GPU_SPEEDS: tuple[tuple[str, float, float, float], ...] = (
    ("H200", 450, 55, 25), ("H100 PCIe", 360, 25, 12), ("H100", 430, 55, 25), ("GH200", 450, 55, 25),
    ("B200", 800, 55, 25), ("A100", 170, 24, 12), ("L40S", 180, 24, 12), ("RTX 6000 Ada", 180, 24, 12),
    ("L40", 90, 24, 12), ("L4", 60, 24, 12), ("A10", 65, 24, 12), ("A6000", 85, 24, 12),
    ("5090", 115, 48, 20), ("5080", 60, 48, 20), ("5070 Ti", 48, 48, 20), ("5070", 34, 48, 20),
    ("5060", 26, 24, 10), ("4090", 100, 24, 12), ("4080", 55, 24, 12), ("4070 Ti", 44, 24, 12),
    ("4070", 34, 24, 12), ("4060", 20, 12, 6), ("3090", 40, 24, 12), ("3080", 34, 24, 12),
    ("3070", 22, 24, 12), ("3060", 14, 24, 12),
)
# When the name is unknown, by compute capability (conservative: the slower cards of a generation).
CC_SPEEDS: tuple[tuple[tuple[int, int], float], ...] = (
    ((12, 0), 30), ((10, 0), 600), ((9, 0), 360), ((8, 9), 25), ((8, 7), 5), ((8, 6), 14), ((8, 0), 170),
)
DEFAULT_TFLOPS = 8.0  # anything older: no bf16 tensor cores
DEFAULT_LINK_GBPS = (20.0, 10.0)
CPU_TFLOPS_PER_CORE = 0.03  # bf16 GEMM on a desktop core, conservative
DISK_GBPS = 1.5  # sequential read of a memory-mapped checkpoint (NVMe ~3, SATA SSD ~0.5)

# A fake GPU is assumed to lose this much to the CUDA context and the desktop before we start;
# a probe measures it instead (free memory after the context exists).
FAKE_GPU_RESERVED_GIB = 0.5


def fake_available_ram_gib(total: float) -> float:
    """RAM a hypothetical machine leaves to us: the OS, a browser and the desktop keep
    max(2.5 GiB, 12 %) of it (a fresh 16 GiB Windows or Linux desktop shows ~13 GiB available)."""
    return max(0.0, total - max(2.5, 0.12 * total))


@dataclass(frozen=True)
class Speed:
    """tflops: effective bf16 TFLOP/s of the compute device; pinned/pageable: host->GPU GB/s."""

    tflops: float
    pinned_gbps: float
    pageable_gbps: float
    cpu_tflops: float
    basis: str  # which table row gave the figures


@dataclass(frozen=True)
class Hardware:
    """A machine as the planner sees it. `gpu_name is None` means no usable CUDA GPU."""

    gpu_name: str | None
    vram_total_gib: float
    vram_free_gib: float
    compute_capability: tuple[int, int] | None
    ram_total_gib: float
    ram_available_gib: float
    disk_free_gib: float
    cpu_cores: int = 4
    source: str = "probe"  # "probe", "fake" or "profile: <name>"
    disk_gbps: float = DISK_GBPS  # read speed of the disk the weights cache is on (probed once, remembered)

    @property
    def has_gpu(self) -> bool:
        return self.gpu_name is not None and self.vram_total_gib > 0

    @property
    def cc(self) -> tuple[int, int]:
        """Compute capability, (0, 0) without a GPU."""
        return self.compute_capability or (0, 0)

    def speed(self) -> Speed:
        """Rough throughput of this machine (see GPU_SPEEDS); the CPU's when there is no GPU."""
        cpu = self.cpu_cores * CPU_TFLOPS_PER_CORE
        if not self.has_gpu:
            return Speed(cpu, 0.0, 0.0, cpu, "cpu")
        name = (self.gpu_name or "").upper()
        for frag, tflops, pinned, pageable in GPU_SPEEDS:
            if frag.upper() in name:
                return Speed(tflops, pinned, pageable, cpu, frag)
        tflops = next((t for cc, t in CC_SPEEDS if self.cc == cc), DEFAULT_TFLOPS)
        return Speed(tflops, *DEFAULT_LINK_GBPS, cpu, f"cc {self.cc[0]}.{self.cc[1]}")

    @property
    def fp8_tensor_cores(self) -> bool:
        """fp8 x fp8 matmuls run on tensor cores from Ada / Hopper on (compute capability 8.9)."""
        return self.has_gpu and self.cc >= (8, 9)

    # ------------------------------------------------------------------ construction
    @classmethod
    def fake(
        cls,
        vram_gb: float,
        ram_gb: float,
        cc: tuple[int, int] = (8, 9),
        *,
        gpu_name: str | None = None,
        free_vram_gb: float | None = None,
        available_ram_gb: float | None = None,
        disk_gb: float = 500.0,
        cpu_cores: int = 8,
    ) -> Hardware:
        """A hypothetical machine. `vram_gb=0` means no GPU. Free VRAM defaults to the total less
        the CUDA context and desktop (0.5 GiB); available RAM to the total less the OS share."""
        if vram_gb < 0 or ram_gb <= 0:
            from wan_lite.errors import InputError

            raise InputError(f"Cannot plan for {vram_gb} GB of VRAM and {ram_gb} GB of RAM.",
                             "Give a VRAM size >= 0 and a RAM size > 0, in GB.")
        has_gpu = vram_gb > 0
        free = free_vram_gb if free_vram_gb is not None else max(0.0, vram_gb - FAKE_GPU_RESERVED_GIB)
        return cls(
            gpu_name=(gpu_name or "hypothetical GPU") if has_gpu else None,
            vram_total_gib=float(vram_gb),
            vram_free_gib=float(min(free, vram_gb)),
            compute_capability=tuple(cc) if has_gpu else None,  # type: ignore[arg-type]
            ram_total_gib=float(ram_gb),
            ram_available_gib=float(available_ram_gb if available_ram_gb is not None
                                    else fake_available_ram_gib(ram_gb)),
            disk_free_gib=float(disk_gb),
            cpu_cores=cpu_cores,
            source="fake",
        )

    @classmethod
    def probe(cls, path: str | Path = ".", device: int = 0) -> Hardware:
        """Measure this machine. `path`: where model and cache files go (its free disk space).

        Free VRAM is read after the CUDA context exists, so the context (and other programs on
        the GPU, such as the desktop) are already subtracted.
        """
        name, total, free, cc = None, 0.0, 0.0, None
        try:
            import torch

            if torch.cuda.is_available():
                props = torch.cuda.get_device_properties(device)
                free_b, total_b = torch.cuda.mem_get_info(device)
                name, total, free = props.name, total_b / GIB, free_b / GIB
                cc = (props.major, props.minor)
        except (ImportError, RuntimeError, AssertionError) as err:  # broken driver: plan for the CPU
            log.warning("CUDA probe failed (%s); planning without a GPU.", err)
        ram_total, ram_avail = _ram_gib()
        try:
            target = Path(path)
            while not target.exists() and target != target.parent:
                target = target.parent
            disk = shutil.disk_usage(target).free / GIB
        except OSError:
            disk = 0.0
        hw = cls(name, total, free, cc, ram_total, ram_avail, disk, os.cpu_count() or 1, "probe",
                 disk_read_gbps())
        log.debug("hardware: %s", hw.summary())
        return hw

    def without_gpu(self) -> Hardware:
        """This machine as a run on its CPU sees it (a GPU it has is not used)."""
        return replace(self, gpu_name=None, vram_total_gib=0.0, vram_free_gib=0.0, compute_capability=None)

    # ------------------------------------------------------------------ output
    def summary(self) -> str:
        """One line for people, e.g. 'NVIDIA GeForce RTX 4090 (cc 8.9), 23.6/24.0 GiB VRAM free, 27.1/32.0 GiB RAM'."""
        gpu = "no CUDA GPU"
        if self.has_gpu:
            gpu = (f"{self.gpu_name} (cc {self.cc[0]}.{self.cc[1]}), "
                   f"{self.vram_free_gib:.1f}/{self.vram_total_gib:.1f} GiB VRAM free")
        return f"{gpu}, {self.ram_available_gib:.1f}/{self.ram_total_gib:.1f} GiB RAM available"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["compute_capability"] = list(self.compute_capability) if self.compute_capability else None
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in data.items()}


DISK_SPEED_FILE = "disk_speed.json"  # in the config folder: {device id of the cache's disk: GB/s}
_DISK_PROBE_BYTES = 256 << 20


def disk_read_gbps(folder: Path | None = None, *, measure: bool = True) -> float:
    """Read speed (GB/s) of the disk holding `folder` (default: the weights cache), measured once
    per disk by writing a 256 MB file there, dropping it from the page cache and reading it back,
    and remembered in the config folder (DISK_SPEED_FILE); DISK_GBPS when it cannot be measured."""
    from wan_lite.paths import config_dir, weights_cache_dir, write_json_atomic

    folder = Path(folder) if folder is not None else weights_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        dev = str(folder.stat().st_dev)
    except OSError:
        return DISK_GBPS
    store = config_dir() / DISK_SPEED_FILE
    try:
        known = json.loads(store.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if isinstance(known.get(dev), (int, float)) and known[dev] > 0:
        return float(known[dev])
    if not measure:
        return DISK_GBPS
    gbps = _measure_read(folder)
    if gbps is None:
        return DISK_GBPS
    known[dev] = gbps = round(gbps, 3)
    try:
        write_json_atomic(store, known)
    except OSError:
        pass
    log.info("disk read speed of %s: %.2f GB/s (remembered in %s)", folder, gbps, store)
    return gbps


def _measure_read(folder: Path) -> float | None:
    import time

    path = folder / f".disk_probe.{os.getpid()}"
    block = os.urandom(1 << 20)
    try:
        with open(path, "wb") as fh:
            for _ in range(_DISK_PROBE_BYTES >> 20):
                fh.write(block)
            fh.flush()
            os.fsync(fh.fileno())
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        with open(path, "rb", buffering=0) as fh:
            while fh.read(8 << 20):
                pass
        secs = time.perf_counter() - start
        return min(50.0, max(0.05, _DISK_PROBE_BYTES / max(secs, 1e-6) / 1e9))
    except OSError:
        return None
    finally:
        try:
            path.unlink()
        except OSError:
            pass


def probe(path: str | Path = ".", device: int = 0) -> Hardware:
    """Shorthand for `Hardware.probe`."""
    return Hardware.probe(path, device)


def _ram_gib() -> tuple[float, float]:
    """(total, available) host RAM in GiB; psutil, else /proc/meminfo, else (0, 0)."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return vm.total / GIB, vm.available / GIB
    except ImportError:
        pass
    try:
        info = {}
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
        return info["MemTotal"] / GIB, info.get("MemAvailable", info["MemFree"]) / GIB
    except (OSError, KeyError, ValueError, IndexError):
        log.warning("Cannot read the host RAM size; install psutil.")
        return 0.0, 0.0


# ---------------------------------------------------------------------------- memory profiles
# Plan fields a profile may force, with their allowed values (a string describes a numeric rule).
FORCE_CHOICES: dict[str, tuple[Any, ...] | str] = {
    "quantization": ("bf16", "int8", "fp8", "int4"),
    "resident_blocks": "an integer >= 0",
    "prefetch": "an integer from 1 to 4",
    "pinned": (True, False),
    "idle_expert": ("gpu", "ram", "disk"),
    "keep_resident": (True, False),
    "text_encoder": ("gpu", "cpu", "stream"),
    "text_encoder_quant": ("bf16", "int8"),
    "keep_text_encoder": (True, False),
    "vae_tile": "null or an integer from 64 to 2048, a multiple of 32",
    "vae_dtype": ("bf16", "fp32"),
    "ffn_chunk_tokens": "null or an integer >= 256",
    "cfg_batch": (True, False),
    "blocks_from": ("ram", "disk"),
}
_HARDWARE_KEYS = ("vram_gb", "ram_gb", "free_vram_gb", "available_ram_gb", "cc")


class ProfileError(InputError):
    """A memory profile file is missing, not JSON, or has a key or value that is not allowed."""


@dataclass(frozen=True)
class MemoryProfile:
    """A named machine ("8 GB VRAM / 32 GB RAM") and/or plan fields it forces."""

    name: str
    description: str
    path: Path | None = None
    vram_gb: float | None = None
    ram_gb: float | None = None
    free_vram_gb: float | None = None
    available_ram_gb: float | None = None
    cc: tuple[int, int] | None = None
    force: tuple[tuple[str, Any], ...] = field(default=())

    @property
    def forced(self) -> dict[str, Any]:
        return dict(self.force)

    def apply(self, hw: Hardware) -> Hardware:
        """The machine to plan for. On a machine with a GPU the profile's memory caps what the probe
        found (a profile never plans for more than is there; its `cc` is ignored, the GPU is what it
        is); on one without a GPU, or for a fake one's missing parts, the profile describes it."""
        if self.vram_gb is None and self.ram_gb is None:
            return replace(hw, source=f"profile: {self.name}")
        gpu = (hw.gpu_name, hw.vram_total_gib, hw.vram_free_gib, hw.compute_capability)
        if self.vram_gb is not None:
            free = self.free_vram_gb if self.free_vram_gb is not None else self.vram_gb - FAKE_GPU_RESERVED_GIB
            free = max(0.0, min(free, self.vram_gb))
            if hw.has_gpu:
                gpu = (hw.gpu_name, min(hw.vram_total_gib, self.vram_gb), min(hw.vram_free_gib, free),
                       hw.compute_capability)
            elif self.vram_gb > 0:
                cc = self.cc or (8, 6)
                gpu = ("hypothetical GPU", float(self.vram_gb), float(free), cc)
        ram_total, ram_avail = hw.ram_total_gib, hw.ram_available_gib
        if self.ram_gb is not None:
            avail = self.available_ram_gb if self.available_ram_gb is not None else fake_available_ram_gib(self.ram_gb)
            known = hw.ram_total_gib > 0
            ram_total = min(ram_total, self.ram_gb) if known else float(self.ram_gb)
            ram_avail = min(ram_avail, avail) if known else float(avail)
        return replace(hw, gpu_name=gpu[0], vram_total_gib=gpu[1], vram_free_gib=gpu[2], compute_capability=gpu[3],
                       ram_total_gib=ram_total, ram_available_gib=ram_avail, source=f"profile: {self.name}")


def _bad(path: Path, key: str, value: Any, allowed: str) -> ProfileError:
    return ProfileError(f"Memory profile {path}: key {key!r} is {json.dumps(value)}; allowed: {allowed}.",
                        "Fix the value or delete the file (the built-in profiles can be restored from git).")


def _check_forced(path: Path, key: str, value: Any) -> None:
    rule = FORCE_CHOICES.get(key)
    if rule is None:
        raise _bad(path, f"force.{key}", value, "one of " + ", ".join(FORCE_CHOICES))
    if isinstance(rule, tuple):
        if value not in rule or type(value) is not type(rule[0]):
            raise _bad(path, f"force.{key}", value, ", ".join(json.dumps(v) for v in rule))
        return
    nullable = rule.startswith("null")
    if value is None and nullable:
        return
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and key == "resident_blocks":
        ok = value >= 0
    elif ok and key == "prefetch":
        ok = 1 <= value <= 4
    elif ok and key == "vae_tile":
        ok = 64 <= value <= 2048 and value % 32 == 0
    elif ok and key == "ffn_chunk_tokens":
        ok = value >= 256
    if not ok:
        raise _bad(path, f"force.{key}", value, rule)


def parse_profile(data: Any, path: Path) -> MemoryProfile:
    """Validate one profile's JSON object; every error names the file, the key and what is allowed."""
    if not isinstance(data, dict):
        raise ProfileError(f"Memory profile {path} must hold a JSON object, not {type(data).__name__}.",
                           "See the other files in presets/memory_profiles/ for the layout.")
    for key in data:
        if key not in ("name", "description", "hardware", "force"):
            raise _bad(path, key, data[key], "only the keys name, description, hardware, force")
    for key in ("name", "description"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise _bad(path, key, data.get(key), "a non-empty string")
    hw, force = data.get("hardware", {}), data.get("force", {})
    for key, value in (("hardware", hw), ("force", force)):
        if not isinstance(value, dict):
            raise _bad(path, key, value, "a JSON object")
    if not hw and not force:
        raise _bad(path, "hardware", hw, "at least one of 'hardware' or 'force' with entries")
    sizes: dict[str, Any] = {}
    for key, value in hw.items():
        if key not in _HARDWARE_KEYS:
            raise _bad(path, f"hardware.{key}", value, "one of " + ", ".join(_HARDWARE_KEYS))
        if key == "cc":
            if (not isinstance(value, list) or len(value) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
                raise _bad(path, "hardware.cc", value, "[major, minor], e.g. [8, 9]")
            sizes["cc"] = (value[0], value[1])
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
                key == "ram_gb" and value == 0):
            raise _bad(path, f"hardware.{key}", value, "a number of GB >= 0 (RAM > 0)")
        else:
            sizes[key] = float(value)
    for key, value in force.items():
        _check_forced(path, key, value)
    return MemoryProfile(name=data["name"].strip(), description=data["description"].strip(), path=path,
                         force=tuple(sorted(force.items())), **sizes)


def load_profiles(folder: Path | None = None) -> dict[str, MemoryProfile]:
    """Every profile in `folder` (default presets/memory_profiles), by name, in file order."""
    folder = Path(folder) if folder is not None else PROFILES_DIR
    profiles: dict[str, MemoryProfile] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise ProfileError(f"Cannot read memory profile {path}: {err}.", "Check the file's permissions.") from err
        except json.JSONDecodeError as err:
            raise ProfileError(f"Memory profile {path} is not valid JSON (line {err.lineno}, column {err.colno}: "
                               f"{err.msg}).", "Fix the file or delete it.") from err
        profile = parse_profile(data, path)
        if profile.name.lower() in (n.lower() for n in profiles):
            raise _bad(path, "name", profile.name, "a name no other profile file uses")
        profiles[profile.name] = profile
    return profiles


def get_profile(name: str | None, folder: Path | None = None) -> MemoryProfile | None:
    """The profile called `name` (its name or file name, any case); None for "auto", "" or None."""
    if name is None or name.strip().lower() in ("", "auto"):
        return None
    profiles = load_profiles(folder)
    key = name.strip().lower()
    for profile in profiles.values():
        if key in (profile.name.lower(), profile.path.stem.lower() if profile.path else ""):
            return profile
    raise ProfileError(f"Unknown memory profile {name!r}.",
                       "Choose auto or one of: " + "; ".join(profiles) + ".")
