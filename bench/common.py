"""Pieces every benchmark script shares: run metadata, host memory, size arguments."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import torch

GIB = 1024**3


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


def host_rss_gib() -> float | None:
    try:
        import psutil

        return psutil.Process().memory_info().rss / GIB
    except ImportError:
        return None


def parse_size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)
