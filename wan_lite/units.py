"""Durations and sizes in plain words, the same in the CLI and the app."""

from __future__ import annotations

import math


def duration(seconds: float | None) -> str:
    """`"45 s"`, `"12 min"`, `"2 h 35 min"`; `"–"` when unknown. One unit style everywhere:
    never a bare `24:44` that could be minutes or hours."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "–"
    s = round(seconds)
    if s < 120:
        return f"{s} s"
    minutes = round(seconds / 60)
    if minutes < 120:
        return f"{minutes} min"
    h, m = divmod(minutes, 60)
    return f"{h} h {m} min" if m else f"{h} h"


def human_bytes(n: float) -> str:
    """Decimal units, as disks and downloads are sold: `"34.2 GB"`."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
