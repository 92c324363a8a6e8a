"""Pieces every benchmark script shares: run metadata, host memory, size arguments."""

from __future__ import annotations

import datetime as dt
import sys
import threading
import time
from pathlib import Path

import torch

GIB = 1024**3


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of `a` against the reference `b`."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run_meta(cuda: bool) -> dict:
    """GPU, torch, diffusers, date and the command line of this run."""
    meta = {
        "gpu": torch.cuda.get_device_name() if cuda else "cpu (smoke test)",
        "capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "torch": torch.__version__,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    try:
        import diffusers

        meta["diffusers"] = diffusers.__version__
    except ImportError:
        meta["diffusers"] = None
    return meta


def bench_device(smoke: bool, script: str) -> torch.device | None:
    """Set up logging; the CPU for `--smoke`, else the GPU, or None (after an error line) without one."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        logging.getLogger(script).error("%s needs a CUDA GPU (or --smoke for a CPU check of the script)", script)
        return None
    return torch.device("cuda")


def host_rss_gib() -> float | None:
    try:
        import psutil

        return psutil.Process().memory_info().rss / GIB
    except ImportError:
        return None


def parse_fields(text: str) -> dict:
    """"resident_blocks=0,text_encoder=stream,ffn_chunk_tokens=None" -> plan fields (ints, None,
    booleans and strings)."""
    words = {"none": None, "null": None, "true": True, "false": False}
    pairs = (kv.split("=", 1) for kv in text.split(",") if kv)
    return {k: int(v) if v.isdigit() else words.get(v.lower(), v) for k, v in pairs}


def parse_size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def _status_kib(fields: tuple[str, ...]) -> dict[str, int]:
    """Selected kB fields of /proc/self/status (Linux; empty elsewhere)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in fields:
                out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


class PeakRSS:
    """Peak host memory of this process while the `with` block runs, sampled every 50 ms:
    `peak` (RSS bytes, psutil) and `peaks` (GiB of RssAnon: the process's own memory, RssFile:
    mapped file pages, which the kernel may drop, RssShmem)."""

    FIELDS = ("RssAnon", "RssFile", "RssShmem")

    def __init__(self) -> None:
        self.peak = 0
        self.peaks = dict.fromkeys(self.FIELDS, 0.0)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            for key, kib in _status_kib(self.FIELDS).items():
                self.peaks[key] = max(self.peaks[key], kib / 2**20)
            time.sleep(0.05)

    def __enter__(self) -> PeakRSS:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def random_dit(cfg, device: torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A WanDiT of config `cfg` on `device` in `dtype` (the modulation fp32, as loaded), seeded
    random weights: tensor i from seed * 1_000_003 + i, so every rebuild (and every rank of a
    multi-GPU run) gets the same weights; norm gains around 1, everything else N(0, 0.02)."""
    from wan_lite.models.dit import WanDiT, name_matches

    with torch.device("meta"):
        model = WanDiT(cfg)
    model.to(dtype)  # free on meta: only dtypes change
    for name, p in model.named_parameters():
        if name_matches(name, WanDiT.keep_fp32_patterns):
            p.data = p.data.float()
    model.to_empty(device=device)
    gen = torch.Generator(device=device)
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            gen.manual_seed(seed * 1_000_003 + i)
            is_gain = "norm" in name and name.endswith("weight")
            p.normal_(1.0 if is_gain else 0.0, 0.02, generator=gen)
    return model.eval()
