"""Opening the files a user points at, safely: only regular files are read (a character device
such as /dev/zero never ends, a FIFO blocks until someone writes to it), and JSON files of the
wrong shape are named, not a traceback.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from wan_lite.errors import CheckpointError


def regular_file(path: Path, what: str = "File") -> int:
    """The size of `path`, after checking that it is a regular file that can be read.

    Raises CheckpointError naming the file for a missing file, a folder, a device, a FIFO or a
    socket (reading those would never end or block), and for a file this user may not read.
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{what} not found: {path}", "Check the path.") from None
    except OSError as err:  # a symlink loop, a name too long, a folder we may not enter
        raise CheckpointError(f"{what} {path} cannot be read ({err.strerror or err}).",
                              "Check the path and its permissions.") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{path} is a folder; a file was expected here.", "Name the file inside it.")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path} is not a regular file (a device, pipe or socket); it is not read.",
                              "Name a model file on disk.")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path} cannot be read: permission denied.",
                              "Give your user read access to this file (chmod / file properties).")
    return st.st_size


def read_json_file(path: Path, what: str) -> Any:
    """The parsed JSON of a small file (a config, an index), any JSON type.

    Raises CheckpointError naming the file when it cannot be read or is not JSON (nesting too
    deep for the parser included). `what`: the file's kind for messages ("safetensors index").
    """
    path = Path(path)
    regular_file(path, what)
    try:
        return json.loads(path.read_bytes())
    except OSError as err:
        raise CheckpointError(f"The {what} {path} cannot be read ({err.strerror or err}).",
                              "Check the file's permissions.") from None
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        detail = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise CheckpointError(f"The {what} {path} is not valid JSON ({detail}).",
                              "The file is damaged; download it again.") from None


def weight_map(index: Path) -> dict[str, str]:
    """The tensor -> shard file map of a sharded safetensors model's `*.safetensors.index.json`.

    Raises CheckpointError naming the index when it is not JSON or not shaped
    {"weight_map": {tensor name: shard file name}} with at least one entry; shard names must be plain file names.
    """
    data = read_json_file(index, "safetensors index")
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not wmap or not isinstance(wmap, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
        raise CheckpointError(
            f"{index} is not a valid safetensors index: it needs a \"weight_map\" object of "
            "tensor name -> shard file name.",
            "The file is damaged; download it again.",
        )
    bad = next((v for v in wmap.values() if not v or Path(v).name != v or v in (".", "..")), None)
    if bad is not None:
        raise CheckpointError(f"{index} names the shard {bad!r}, which is not a file name in its folder.",
                              "The file is damaged; download it again.")
    return wmap
