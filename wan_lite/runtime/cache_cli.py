"""`python -m wan_lite cache list | prune`: the converted-weights cache (runtime/quant_cache.py),
kept where the app keeps it (`paths.weights_cache_dir()`, WAN_LITE_CACHE_DIR overrides)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from wan_lite.paths import weights_cache_dir
from wan_lite.runtime.quant_cache import DEFAULT_CAP_GB, ORPHAN_DAYS, list_entries, prune


def add_cache_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="list or prune the converted-weights cache",
                       description="Converted and quantized model weights are cached (keyed by the source files' "
                                   "size, mtime and header, so moving the models folder keeps them) in "
                                   f"{weights_cache_dir()}.")
    p.add_argument("action", choices=("list", "prune"))
    p.add_argument("--dir", type=Path, default=None, help="the cache folder (default: the app's)")
    p.add_argument("--max-gb", type=float, default=DEFAULT_CAP_GB,
                   help=f"prune: keep at most this many GB, least recently used removed first "
                        f"(default {DEFAULT_CAP_GB:g}); stale entries (source files replaced, older cache "
                        f"versions, partial files) always go, and entries whose source files are gone "
                        f"after {ORPHAN_DAYS:g} days unused")


def run_cache(args: argparse.Namespace) -> int:
    folder = args.dir or weights_cache_dir()
    if args.action == "prune":
        gone = prune(folder, args.max_gb)
        for path in gone:
            print(f"removed {path.name}")
        print(f"{len(gone)} file(s) removed; {_total(folder) / 1e9:.1f} GB left in {folder}")
        return 0
    entries = list_entries(folder)
    now = time.time()
    for e in entries:
        age = (now - e.used) / 86400
        src = f" from {', '.join(Path(s).name for s in e.sources[:2])}" if e.sources else ""
        print(f"{e.size / 1e9:7.2f} GB  {e.status:8}  used {age:5.1f} d ago  {e.path.name}{src}")
    print(f"{len(entries)} file(s), {_total(folder) / 1e9:.1f} GB in {folder}")
    return 0


def _total(folder: Path) -> int:
    return sum(e.size for e in list_entries(folder))
