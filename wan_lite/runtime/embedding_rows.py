"""A token embedding that stays in its file: each lookup reads only the rows it needs.

umT5-XXL's token embedding is 256k x 4096, 2 GB in bf16 (1.96 GiB), and a prompt looks up at most
512 of its rows (4 MB). Streamed from the converted-weights cache or the checkpoint (the text
encoder on "disk" between prompts), the embedding is not read into RAM: `rows_on_demand` leaves
its weight on `meta` and has the module read the rows of each lookup from the memory-mapped file
(`TensorSource.read_rows`), the same values as the whole table's lookup. What the text stage
holds in RAM is then its streamed blocks' staging, not 2 GB.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from wan_lite.loading.tensors import TensorSource


def can_read_rows(module: nn.Module, source: TensorSource, key: str) -> bool:
    """An nn.Embedding waiting on meta whose weight `key` `source` reads row by row (a float table
    memory-mapped, a GGUF matrix; `TensorSource.rows_are_cheap`) in its shape; others are filled
    the usual way."""
    return (isinstance(module, nn.Embedding) and module.weight.device.type == "meta" and key in source
            and source.rows_are_cheap(key) and tuple(source.shape(key)) == tuple(module.weight.shape))


def rows_on_demand(module: nn.Embedding, source: TensorSource, key: str) -> Callable[[], None]:
    """Make `module` look its rows up in `source[key]`, read per call; returns the undo (the
    module's own forward back; its weight stays on meta, to be filled when it is needed whole)."""
    dtype = module.weight.dtype

    def forward(ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        wanted, where = torch.unique(flat, return_inverse=True)  # sorted: the reads go forward
        rows = source.read_rows(key, wanted.cpu(), dtype)
        return rows.to(ids.device)[where.to(ids.device)].reshape(*ids.shape, rows.shape[-1])

    module.forward = forward  # an instance attribute: hooks on the module still run around it

    def undo() -> None:
        module.__dict__.pop("forward", None)

    return undo
