"""The VAE memory model (wan_lite.runtime.vae_memory) against a trace of every allocation of a
full-size Wan 2.1 / 2.2 decode on `meta` tensors: tiled in frame chunks, untiled, and the tiled
decode's global pass, each within 10 % above what was traced."""

from __future__ import annotations

import logging
import weakref

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from wan_lite.models.vae21 import WanVAE21
from wan_lite.models.vae22 import WanVAE22
from wan_lite.runtime import tiled_vae, vae_memory
from wan_lite.runtime.tiled_vae import tiled_decode
from wan_lite.runtime.vae_memory import estimate_decode_bytes

log = logging.getLogger(__name__)
CLASSES = {"2.1": WanVAE21, "2.2": WanVAE22}

class live_bytes(TorchDispatchMode):  # noqa: N801 - used like a function: `with live_bytes(...) as m`
    """Counts the bytes of every storage an op creates while any tensor using it is alive (`peak`);
    on `meta` tensors nothing is computed, so a full-size decode traces in seconds. Storages of
    `ignore` (weights, inputs) are not counted. Kernel workspaces are not seen."""

    def __init__(self, ignore=()) -> None:
        super().__init__()
        self.ignore = {t.untyped_storage()._cdata for t in ignore}
        self.live: dict[int, list[int]] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.ignore:
            return
        if key not in self.live:
            self.live[key] = [storage.nbytes(), 0]
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
        self.live[key][1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]


def _meta_low_res(vae, latent, lean=False):
    """decoder_low_res on meta, its outputs not counted (the real one gathers them in CPU memory)."""
    x = vae.decoder_input(latent)
    cache, out = tiled_vae.FeatureCache(), []
    for i in range(x.shape[2]):
        y = vae.decoder.low_res(x[:, :, i : i + 1], cache, vae_memory.global_levels(vae, lean))
        cache.first_chunk = False
        out.append(torch.empty(y.shape, dtype=y.dtype, device="meta"))
    _meta_low_res.nbytes = sum(t.numel() * t.element_size() for t in out)
    return out


class _OutputOnlySDPA:
    """torch.nn.functional with an attention that only allocates its output, as SDPA's
    memory-efficient CUDA kernel (the VAE's head sizes 384 / 1024) keeps no score matrix; on meta
    the math path would hold one."""

    def __getattr__(self, name):
        return getattr(torch.nn.functional, name)

    @staticmethod
    def scaled_dot_product_attention(q, k, v):
        return torch.empty_like(q)


@pytest.mark.parametrize("lean", [False, True])
@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_traced_decode_memory_matches_the_model(version, lean, monkeypatch):
    """Full-size VAE in bf16 on meta: frame chunks cut a tile's activations by > 20 % (2.2: by 24 %;
    plain decode 6.92 kB/px, tiled in 1-frame chunks 5.33 kB/px), and estimate_decode_bytes covers
    every traced allocation (but the global pass's features, kept in CPU memory in a real run),
    with the full global pass and with the lean one (the tiles then run the first level too)."""
    monkeypatch.setattr(tiled_vae, "decoder_low_res", _meta_low_res)
    with torch.device("meta"):
        vae = CLASSES[version]().to(torch.bfloat16).eval()
    s = vae.stride[1]
    shape = (1, vae.z_dim, 3, 8, 16)  # tile 9, overlap 2: two tiles of 8 x 9 latent px
    z = torch.empty(shape, device="meta")
    peaks = {}
    for chunk in (None, 1):
        with torch.no_grad(), live_bytes(ignore=[*vae.parameters(), z]) as trace:
            out = tiled_decode(vae, z, 9, 2, frame_chunk=chunk, lean=lean)
        # the output and the low-resolution features live in CPU memory
        peaks[chunk] = trace.peak - out.numel() * 4 - _meta_low_res.nbytes
        model = estimate_decode_bytes(vae, shape, 9, torch.bfloat16, 2, frame_chunk=chunk, lean=lean)
        model -= vae_memory.FIXED_BYTES
        log.info("Wan %s tile traced %.0f B/px, model %.0f B/px (frame chunk %s)", version,
                 peaks[chunk] / (8 * 9 * s * s), model / (8 * 9 * s * s), chunk)
        assert peaks[chunk] <= model <= 1.1 * peaks[chunk]
    assert peaks[1] < 0.8 * peaks[None]
    with torch.no_grad(), live_bytes(ignore=[*vae.parameters(), z]) as trace:
        vae.decode(z)  # untiled, whole chunks, the whole video on the device
    model = estimate_decode_bytes(vae, shape, None, torch.bfloat16) - vae_memory.FIXED_BYTES
    assert trace.peak <= model <= 1.1 * trace.peak


@pytest.mark.parametrize("lean", [False, True])
@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_traced_global_pass_memory_matches_the_model(version, lean, monkeypatch):
    """A tiled decode's global pass (conv1, middle, first upsampling level over the whole frame;
    lean: conv1 and middle) at 1280x704 on meta: estimate_low_res_bytes covers every traced
    allocation, within 10 % (2.2: 290 MiB in bf16, under a third of one 32 px tile's activations;
    lean 118 MiB)."""
    from wan_lite.models import vae_common

    monkeypatch.setattr(vae_common, "F", _OutputOnlySDPA())
    with torch.device("meta"):
        vae = CLASSES[version]().to(torch.bfloat16).eval()
    s = vae.stride[1]
    shape = (1, vae.z_dim, 3, 704 // s, 1280 // s)
    z = torch.empty(shape, device="meta")
    with torch.no_grad(), live_bytes(ignore=[*vae.parameters(), z]) as trace:
        x = vae.decoder_input(z)
        cache = tiled_vae.FeatureCache()
        for i in range(shape[2]):
            y = vae.decoder.low_res(x[:, :, i : i + 1], cache, vae_memory.global_levels(vae, lean))
            cache.first_chunk = False
            del y  # in CPU memory in a real run
    model = vae_memory.estimate_low_res_bytes(vae, shape, torch.bfloat16, lean) - vae_memory.FIXED_BYTES
    log.info("Wan %s global pass (lean %s) traced %.0f MiB, model %.0f MiB", version, lean, trace.peak / 2**20,
             model / 2**20)
    assert trace.peak <= model <= 1.1 * trace.peak
    if version == "2.2" and not lean:
        assert model < estimate_decode_bytes(vae, shape, 32, torch.bfloat16) / 3
