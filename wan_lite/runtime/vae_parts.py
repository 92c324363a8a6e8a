"""The VAE waiting in its file: each half read straight to where it runs, dropped after.

A plan short of RAM (`Plan.vae_on_disk`) keeps no copy of the VAE in host memory: the Wan 2.2
VAE is 1.3 GiB in bf16, on an 8 GB machine a third of what a job may use. The loader registers
where each part of the VAE comes from (`register`; built on meta where the plan starts so); its
encoder half (`encoder`, `conv1`) and decoder half (`decoder`, `conv2`) are then read from the
VAE file tensor by tensor straight to the device when their stage begins (`bring`: a 720p decode
reads ~2 GB of fp32 from disk, a second or two against minutes of denoising) and dropped back to
meta when it ends (`drop`), or read back into RAM when a later plan keeps it there. The same
tensors as a VAE loaded whole, cast as they are read.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from wan_lite.loading.tensors import TensorSource
from wan_lite.runtime import streaming, tiled_vae
from wan_lite.runtime.refill import read_plan, refill_like

HALVES = {"encoder": ("encoder", "conv1"), "decoder": ("decoder", "conv2")}


def _prefixed(prefix: str) -> Callable[[str], str]:
    return lambda name: f"{prefix}.{name}"


def register(vae: nn.Module, source: TensorSource) -> None:
    """Register where each part of a VAE (on meta or loaded) comes from, checking now that
    `source` holds every tensor in its shape (CheckpointError otherwise, as a whole load raises)."""
    for names in HALVES.values():
        for name in names:
            part = getattr(vae, name)
            read_plan(part, source, key_map=_prefixed(name), what="VAE")
            streaming.set_expert_source(part, source, _prefixed(name))


def has_file(vae: nn.Module) -> bool:
    """Whether `drop` can let the VAE go (`register` was called)."""
    return all(streaming.expert_source(getattr(vae, n)) is not None for names in HALVES.values() for n in names)


def waiting(vae: nn.Module) -> bool:
    """Whether a part of the VAE waits in its file (on meta)."""
    return any(t.is_meta for t in vae.parameters())


def bring(vae: nn.Module, half: str, device: torch.device | str) -> None:
    """The `half` ("encoder" / "decoder") of `vae` on `device`: read from its file where it waits
    on meta, moved where it is in RAM."""
    for name in HALVES[half]:
        part = getattr(vae, name)
        src = streaming.expert_source(part)
        if src is not None and streaming.where_is(part) == "disk":
            refill_like(part, src[0], key_map=src[1], device=device, what="VAE")
        else:
            part.to(device)


def drop(vae: nn.Module, half: str) -> None:
    """The `half` of `vae` off its device: back to meta where it has a file, else to RAM."""
    if half == "decoder":  # weights a cancelled tiled decode parked in RAM go with the rest
        setattr(vae, tiled_vae._PARKED, [])
    for name in HALVES[half]:
        part = getattr(vae, name)
        if streaming.expert_source(part) is not None:
            part.to_empty(device="meta")
        else:
            part.to("cpu")
    streaming.trim_host_memory(collect=False)
