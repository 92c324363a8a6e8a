"""Building blocks shared by the Wan 2.1 and Wan 2.2 VAEs, and the chunked encode/decode driver.

Both VAEs are causal in time and run over a video in chunks (encode: frame 0, then 4 frames at a
time; decode: one latent frame at a time). Each causal layer needs input frames of the previous
chunk; a `FeatureCache` passed down the forward calls holds them, keyed by layer, so modules stay
stateless (one cache per stream; a spatial tile is its own stream). Attribute names and
`nn.Sequential` indices follow the official VAE code, so `state_dict()` keys equal
those of `Wan2.1_VAE.pth` / `Wan2.2_VAE.pth`. Tensors are `[B, C, T, H, W]`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from wan_lite.errors import CheckpointError, InputError
from wan_lite.models import rms_silu_kernel
from wan_lite.models.fused import KernelSwitch

logger = logging.getLogger(__name__)

CACHE_T = 2  # frames a 3x3x3 causal conv needs from the previous chunk
_REPEAT = "repeat"  # upsample3d slot marker: "first chunk seen, time conv not applied yet"
_KERNELS = KernelSwitch("VAE norm kernels", "eager form")  # off once they failed to build here


class FeatureCache:
    """State of one chunked stream: per causal layer, what it must remember of the last chunk.
    `first_chunk` is True during the first chunk (Wan 2.2's DupUp3D drops a time copy then)."""

    def __init__(self) -> None:
        self._slots: dict[nn.Module, torch.Tensor | str] = {}
        self.first_chunk = True

    def get(self, layer: nn.Module) -> torch.Tensor | str | None:
        return self._slots.get(layer)

    def set(self, layer: nn.Module, value: torch.Tensor | str) -> None:
        self._slots[layer] = value


def _new_like(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised tensor of `shape` with x's dtype, device and memory layout (NCDHW or NDHWC)."""
    cl = torch.channels_last_3d
    layout = cl if len(shape) == 5 and x.is_contiguous(memory_format=cl) and not x.is_contiguous() else None
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=layout or torch.contiguous_format)


def _time_padded(
    x: torch.Tensor, prev: torch.Tensor | None, pad: int, norm: RMS_norm | None = None,
    norm_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, C, pad + T, H, W]: `prev` (or zero frames) followed by x, or by silu(norm(x + norm_bias))
    when `norm` is given. The activation is written straight into the padded buffer: neither a
    separate normalised tensor nor a concatenated copy is made."""
    b, c, t, h, w = x.shape
    buf = _new_like(x, (b, c, pad + t, h, w))
    if prev is None:
        buf[:, :, :pad].zero_()
    else:
        buf[:, :, :pad].copy_(prev)
    if norm is None:
        buf[:, :, pad:].copy_(x)
    else:
        norm.silu(x, out=buf[:, :, pad:], bias=norm_bias)
    return buf


def _weight_like(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A conv `weight` in the channels-last layout when the activation x [B, C, T, H, W] on a GPU
    has it. cuDNN convolves channels-last activations with channels-last weights; given a weight
    in another layout, PyTorch copies it into that one on every call (all the decoder's weights
    once per latent frame). So the parameter itself is converted, once (the same values; a
    weight read again from its file is converted again at its first use)."""
    cl = torch.channels_last_3d
    if not x.is_cuda or x.is_contiguous() or not x.is_contiguous(memory_format=cl):
        return weight
    layout = cl if weight.dim() == 5 else torch.channels_last
    if not weight.is_contiguous(memory_format=layout):
        with torch.inference_mode(False), torch.no_grad():  # a plain tensor, as the parameter was
            weight.data = weight.data.contiguous(memory_format=layout)
    return weight


def _remember(cache: FeatureCache, layer: nn.Module, old: torch.Tensor | str | None,
              frames: torch.Tensor) -> None:
    """Store `frames` (a view of this chunk's padded input) as `layer`'s state for the next chunk.
    Written into the previous state tensor when the shapes agree, so that no second copy is alive
    while the layer's conv runs (the previous state was already copied into the padded input)."""
    if isinstance(old, torch.Tensor) and old.shape == frames.shape:
        old.copy_(frames)
    else:
        # cloned so that the cache does not keep the whole padded activation alive
        cache.set(layer, frames.clone())


class CausalConv3d(nn.Conv3d):
    """Conv3d padded `2*pT` frames in front only (causal): with the previous chunk's cached frames,
    or zeros on the first. Spatial padding is symmetric, left to the conv itself (no padded copy)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1, padding: int | tuple[int, int, int] = 0) -> None:
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=(0, ph, pw))
        self.time_pad = 2 * pt

    def convolve(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """The convolution on `x` already padded in time: [B, Cin, T, H, W] -> [B, Cout, T', H, W];
        bias False: without the bias (the caller adds it in its next kernel)."""
        return self._conv_forward(x, _weight_like(self.weight, x), self.bias if bias else None)

    def forward(
        self, x: torch.Tensor, cache: FeatureCache | None = None, norm: RMS_norm | None = None,
        norm_bias: torch.Tensor | None = None, bias: bool = True,
    ) -> torch.Tensor:
        """conv(x), or conv(silu(norm(x + norm_bias))) when `norm` is given (norm_bias: the bias of
        the convolution that made x, when it left it out): [B, Cin, T, H, W] -> [B, Cout, T, H, W].
        With `cache`, continues the previous chunk of the stream; bias: as in `convolve`."""
        if self.time_pad == 0:
            return self.convolve(x if norm is None else norm.silu(x, bias=norm_bias), bias)
        prev = cache.get(self) if cache is not None else None
        x = _time_padded(x, prev, self.time_pad, norm, norm_bias)  # type: ignore[arg-type]
        if cache is not None:  # the last frames of (previous + current) are what the next chunk needs
            _remember(cache, self, prev, x[:, :, -self.time_pad :])
        return self.convolve(x, bias)


class RMS_norm(nn.Module):  # noqa: N801 - the official class name
    """`x / max(||x||_2 over channels, 1e-12) * sqrt(C) * gamma`, no mean, no bias. gamma is
    `[C, 1, 1, 1]` (images=False) or `[C, 1, 1]` (images=True); both apply to any `[B, C, ...]`."""

    def __init__(self, dim: int, images: bool = True) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C, ...] -> same shape, written into `out` when given."""
        # The norm is reduced in float32 (it is C times smaller than x) for 16-bit accuracy.
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32)
        inv = (self.scale / norm.clamp_min(1e-12)).to(x.dtype)
        gamma = self.gamma.reshape(-1, *([1] * (x.dim() - 2)))
        return torch.mul(x, inv, out=out).mul_(gamma)  # in place on our own result

    def silu(self, x: torch.Tensor, out: torch.Tensor | None = None,
             bias: torch.Tensor | None = None) -> torch.Tensor:
        """silu(self(x + bias)) (bias per channel, optional), written into `out` when given: on
        CUDA in one kernel where it takes the tensors (`rms_silu_kernel`: channels-last
        activations), else in eager steps."""
        if kernels_take(x, out):
            y = _KERNELS.run(rms_silu_kernel.rms_silu, x, self.gamma, self.scale, out, bias)
            if y is not None:
                return y
        if bias is not None:
            x = x + bias.reshape(-1, *([1] * (x.dim() - 2)))
        return F.silu(self(x, out=out), inplace=True)


def _nearest_2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest x2 per frame, [B, C, T, H, W] -> [B, C, T, 2H, 2W]: one broadcast copy in x's layout
    (exact in any dtype, so the official fp32 round trip is not needed)."""
    b, c, t, h, w = x.shape
    out = _new_like(x, (b, c, t, 2 * h, 2 * w))
    out.view(b, c, t, h, 2, w, 2).copy_(x[:, :, :, :, None, :, None])
    return out


def _conv2d_per_frame(conv: nn.Conv2d, x: torch.Tensor, stride: int = 1, padding: int = 0) -> torch.Tensor:
    """Apply a 2-D conv to every frame of [B, C, T, H, W] as a (1, k, k) 3-D conv: no permute copies.
    (A channels-last 2-D weight with a time axis of 1 is a channels-last 3-D weight.)"""
    weight = _weight_like(conv.weight, x).unsqueeze(2)
    return F.conv3d(x, weight, conv.bias, stride=(1, stride, stride), padding=(0, padding, padding))


class Resample(nn.Module):
    """Spatial x2 per frame: upsample2d/3d = nearest x2, 3x3 conv dim -> out_dim (3d doubles time
    first); downsample2d/3d = pad right/bottom, 3x3 stride-2 conv (3d then halves time). Index 0
    of `resample` is the parameter-free part, so the conv keys are `resample.1.*` as officially."""

    def __init__(self, dim: int, mode: str, out_dim: int | None = None) -> None:
        super().__init__()
        self.dim, self.mode = dim, mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, out_dim or dim, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            raise ValueError(f"unknown Resample mode {mode!r}")

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """upsample: [B, dim, T, H, W] -> [B, out, T', 2H, 2W] with T' = T (first chunk or 2d)
        or 2T (3d); downsample: -> [B, dim, T', H/2, W/2] with T' = T (first chunk or 2d) or T/2."""
        if self.mode.startswith("up"):
            if self.mode == "upsample3d":
                x = self._time_up(x, cache)
            return _conv2d_per_frame(self.resample[1], _nearest_2x(x), padding=1)
        x = _conv2d_per_frame(self.resample[1], F.pad(x, (0, 1, 0, 1)), stride=2)
        if self.mode == "downsample3d":
            x = self._time_down(x, cache)
        return x

    def _time_up(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """The first chunk passes unchanged; later chunks go through a causal (3,1,1) conv whose 2*dim
        outputs A|B become frames A(t0), B(t0), A(t1), ... (T -> 2T); frame 0 never enters a window."""
        state = cache.get(self)
        if state is None:
            cache.set(self, _REPEAT)
            return x
        b, c, t, h, w = x.shape
        x = _time_padded(x, None if isinstance(state, str) else state, CACHE_T)
        _remember(cache, self, state, x[:, :, -CACHE_T:])
        y = self.time_conv.convolve(x)  # [B, 2C, T, H, W]
        out = _new_like(y, (b, c, 2 * t, h, w))
        out.view(b, c, t, 2, h, w).copy_(y.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5))
        return out

    def _time_down(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """The first chunk passes unchanged; later chunks get the previous chunk's last frame in
        front, then a stride-2 (3,1,1) conv without padding (4 frames -> 2, 2 -> 1)."""
        state = cache.get(self)
        cache.set(self, x[:, :, -1:].clone())
        if state is None:
            return x
        return self.time_conv.convolve(_time_padded(x, state, 1))


def kernels_take(x: torch.Tensor, out: torch.Tensor | None = None) -> bool:
    """Whether the VAE's fused kernels (`rms_silu_kernel`) run on activations like x."""
    return not _KERNELS.failed and rms_silu_kernel.takes(x, out)


def _add_residual(h: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """h += s (+ bias per channel), in place on h; in one kernel where it takes the tensors."""
    if bias is None:
        return h.add_(s)
    if not _KERNELS.failed and rms_silu_kernel.takes_sum(h, s):
        done = _KERNELS.run(rms_silu_kernel.add_rows, h, s, bias)
        if done is not None:
            return done
    return h.add_(s).add_(bias.reshape(-1, *([1] * (h.dim() - 2))))


class ResidualBlock(nn.Module):
    """residual = [RMS_norm, SiLU, CausalConv3d 3^3, RMS_norm, SiLU, Dropout, CausalConv3d 3^3];
    shortcut = 1x1x1 CausalConv3d if in != out. Output = residual(x) + shortcut(x).

    Where the fused kernels run (CUDA, channels-last), the convolutions leave out their biases and
    the next kernel adds them: the first conv's in the second norm, the second conv's (and the
    shortcut conv's) in the residual sum. cuDNN adds a conv bias as a separate broadcast pass that
    PyTorch runs with its slow strided kernel: 0.44 s of a 3.7 s TI2V-5B 720p decode on an H100
    (bench/results/2026-12-06-d)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        # nn.Identity at 5 is the dropout (0, identity at inference); indices as in the official file
        self.residual = nn.Sequential(
            RMS_norm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim, images=False), nn.SiLU(), nn.Identity(),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """[B, in, T, H, W] -> [B, out, T, H, W]."""
        r = self.residual  # [0] norm, [2] conv, [3] norm, [6] conv; SiLU applied inside the convs
        if not kernels_take(x):
            h = r[6](r[2](x, cache, norm=r[0]), cache, norm=r[3])
            return h.add_(self.shortcut(x))
        h = r[6](r[2](x, cache, norm=r[0], bias=False), cache, norm=r[3], norm_bias=r[2].bias, bias=False)
        bias = r[6].bias
        if isinstance(self.shortcut, CausalConv3d):
            shortcut = self.shortcut.convolve(x, bias=False)
            bias = bias.float() + self.shortcut.bias.float()
        else:
            shortcut = x
        return _add_residual(h, shortcut, bias)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W pixels of each frame (no mixing across time)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMS_norm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        """[B, C, T, H, W] -> same shape; tokens are pixels in row-major order, head dim C."""
        b, c, t, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 4, 1).reshape(b * t, 1, h * w, c)
        qkv = F.linear(tokens, self.to_qkv.weight.view(3 * c, c), self.to_qkv.bias)
        q, k, v = qkv.chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)  # [B*T, 1, HW, C]
        out = F.linear(out, self.proj.weight.view(c, c), self.proj.bias)
        return out.view(b, t, h, w, c).permute(0, 4, 1, 2, 3) + x


class MiddleBlock(nn.Sequential):
    """`middle` = ResidualBlock, AttentionBlock, ResidualBlock at the lowest resolution."""

    def __init__(self, dim: int) -> None:
        super().__init__(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, cache)
        return x


class Head(nn.Sequential):
    """`head` = RMS_norm, SiLU, CausalConv3d 3^3 (dim -> out)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__(RMS_norm(dim, images=False), nn.SiLU(), CausalConv3d(dim, out_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:  # type: ignore[override]
        return self[2](x, cache, norm=self[0])


class Encoder3d(nn.Module):
    """conv1 -> downsamples (version-specific) -> middle -> head, over one chunk."""

    def __init__(self, in_dim: int, dim: int, downsamples: nn.Sequential, top_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv1 = CausalConv3d(in_dim, dim, 3, padding=1)
        self.downsamples = downsamples
        self.middle = MiddleBlock(top_dim)
        self.head = Head(top_dim, out_dim)

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """[B, in, 1 or 4, H, W] -> [B, out, 1, H/8, W/8] (one latent frame per chunk, 3 levels down)."""
        x = self.conv1(x, cache)
        for layer in self.downsamples:
            x = layer(x, cache)
        return self.head(self.middle(x, cache), cache)


class Decoder3d(nn.Module):
    """conv1 -> middle -> upsamples (version-specific) -> head, over one latent frame.

    `frame_chunk`: set by the runtime to run the levels after the last time upsampling (the
    spatial-only levels and the head, at up to full resolution: most of the activations) on at
    most that many of the chunk's 4 frames at a time, in frame order. Each of those layers is
    causal in time and keeps what it needs of earlier frames in the cache, so the result is the
    same. Earlier levels run on <= 2 frames at <= 1/4 resolution: chunking them would save little
    and shrink their already small convolutions. None: whole chunks.
    """

    frame_chunk: int | None = None

    def __init__(self, z_dim: int, top_dim: int, upsamples: nn.Sequential, dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv1 = CausalConv3d(z_dim, top_dim, 3, padding=1)
        self.middle = MiddleBlock(top_dim)
        self.upsamples = upsamples
        self.head = Head(dim, out_dim)
        time_up = [i for i, layer in enumerate(upsamples) if any(
            isinstance(m, Resample) and m.mode == "upsample3d" for m in layer.modules())]
        self.time_local_from = time_up[-1] + 1 if time_up else 0  # first level without time upsampling
        up = [i for i, layer in enumerate(upsamples) if any(
            isinstance(m, Resample) and m.mode.startswith("upsample") for m in layer.modules())]
        # `upsamples[:low_res_end]` run at the latent's resolution, up to and including the first
        # upsampling (Wan 2.2: level 0; Wan 2.1: its three ResidualBlocks and Resample)
        self.low_res_end = min(up[0] + 1 if up else 0, self.time_local_from)

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """[B, z, 1, h, w] -> [B, out, 1 (first chunk) or 4, 8h, 8w] (3 levels up)."""
        return self.upsample(self.middle(self.conv1(x, cache), cache), cache)

    def low_res(self, x: torch.Tensor, cache: FeatureCache, levels: int | None = None) -> torch.Tensor:
        """conv1, middle and `upsamples[:levels]` (default `low_res_end`): [B, z, 1, h, w] ->
        [B, C, 1 or 2, 2h, 2w], the part a tiler runs once over the whole latent (global attention,
        small convolutions); levels 0: the middle's output [B, C_top, 1, h, w]."""
        x = self.middle(self.conv1(x, cache), cache)
        for layer in self.upsamples[: self.low_res_end if levels is None else levels]:
            x = layer(x, cache)
        return x

    def upsample(self, x: torch.Tensor, cache: FeatureCache, start: int = 0) -> torch.Tensor:
        """The part after `middle` from `upsamples[start]` on (start <= `time_local_from`), and the
        head: [B, C_top, 1, h, w] -> [B, out, 1 or 4, 8h, 8w] for start 0. A tiler calls it with its
        crop of a `low_res` output computed over the whole latent, start `low_res_end`."""
        if not 0 <= start <= self.time_local_from:
            raise ValueError(f"upsample start {start} is not in [0, {self.time_local_from}]")
        for layer in self.upsamples[start : self.time_local_from]:
            x = layer(x, cache)
        time_local = [*self.upsamples[self.time_local_from :], self.head]
        n = self.frame_chunk
        if n is None or n >= x.shape[2]:
            for layer in time_local:  # rebinding x frees each input as soon as it is used
                x = layer(x, cache)
            return x
        parts = []
        for j in range(0, x.shape[2], n):
            y = x[:, :, j : j + n]
            for layer in time_local:
                y = layer(y, cache)
            parts.append(y)
        return torch.cat(parts, dim=2)


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of a Wan VAE. Defaults are the Wan 2.1 release; subclasses set theirs."""

    dim: int = 96  # encoder base width
    dec_dim: int = 96  # decoder base width
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # decoder uses it reversed

    @property
    def temporal_upsample(self) -> tuple[bool, ...]:
        return self.temporal_downsample[::-1]


def shape_of(shapes: Mapping[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    """`shapes[key]`, or a CheckpointError saying the file is not a complete Wan VAE."""
    if key not in shapes:
        raise CheckpointError(
            f"The VAE checkpoint has no tensor {key!r}; it is not a complete Wan VAE in the official layout.",
            "Use Wan2.1_VAE.pth / Wan2.2_VAE.pth (or a ComfyUI repack of them).",
        )
    return tuple(shapes[key])


class WanVAEBase(nn.Module):
    """Chunked encode / decode shared by both versions. Subclasses build `encoder`, `conv1`,
    `conv2`, `decoder` and set `version`, `latent_mean`, `latent_std`; Wan 2.2 adds patchify."""

    version: ClassVar[str]
    latent_mean: ClassVar[tuple[float, ...]]
    latent_std: ClassVar[tuple[float, ...]]
    config_class: ClassVar[type[VAEConfig]]
    patch_size: ClassVar[int] = 1
    config: VAEConfig
    encoder: Encoder3d
    decoder: Decoder3d
    conv1: CausalConv3d  # top-level 1x1x1 convs: conv1 after the encoder, conv2 before the decoder
    conv2: CausalConv3d
    # Layout of the activations (layers keep their input's layout). NDHWC is cuDNN's native 3-D
    # conv layout: on an H200 encode ran 10-20 % faster with 20 % less peak memory, decode equal.
    activation_layout: torch.memory_format = torch.channels_last_3d

    @classmethod
    def detect_version(cls, shapes: Mapping[str, tuple[int, ...]]) -> str:
        """"2.1" or "2.2" from the tensor names of an official-layout VAE checkpoint."""
        if "decoder.upsamples.0.upsamples.0.residual.2.weight" in shapes:
            return "2.2"
        if "decoder.middle.0.residual.0.gamma" in shapes:
            return "2.1"
        hint = "Use Wan2.1_VAE.pth / Wan2.2_VAE.pth (or a ComfyUI repack of them)."
        if "decoder.mid_block.resnets.0.norm1.gamma" in shapes:
            hint = "This is a diffusers-format VAE; convert it to the official key names first. " + hint
        raise CheckpointError("The file is not a Wan VAE checkpoint (no decoder.middle tensors).", hint)

    @property
    def z_dim(self) -> int:
        return self.config.z_dim

    @property
    def stride(self) -> tuple[int, int, int]:
        """(time, height, width) compression factors, e.g. (4, 8, 8) or (4, 16, 16)."""
        s = 2 ** (len(self.config.dim_mult) - 1) * self.patch_size
        return 2 ** sum(self.config.temporal_downsample), s, s

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1/std) as float32 [1, z, 1, 1, 1] on `like`'s device (built per call: no buffers)."""
        mean = torch.tensor(self.latent_mean, dtype=torch.float32, device=like.device)
        inv_std = 1.0 / torch.tensor(self.latent_std, dtype=torch.float32, device=like.device)
        return mean.view(1, -1, 1, 1, 1), inv_std.view(1, -1, 1, 1, 1)

    def _to_network(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, T, H, W] -> encoder input (Wan 2.2: patchify)."""
        return x

    def _write_frames(self, dst: torch.Tensor, y: torch.Tensor) -> None:
        """Store decoder output `y` into the float32 video slice `dst` (Wan 2.2: unpatchify)."""
        dst.copy_(y)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, F, H, W] in [-1, 1] -> normalised latent mean [B, z, 1+(F-1)//4, H/s, W/s] float32.

        Frame 0 is encoded alone, then chunks of 4 frames; trailing frames that do not fill a
        chunk are dropped, as in the official code (use F = 4k+1). No sampling: the mean.
        """
        st, s, _ = self.stride
        b, c, f, h, w = video.shape if video.dim() == 5 else (0,) * 5
        if c != 3 or f < 1 or h % s or w % s:
            raise InputError(
                f"Cannot encode a video of shape {list(video.shape)} with the Wan {self.version} VAE.",
                f"Give [B, 3, F, H, W] with F >= 1 and width and height multiples of {s}.",
            )
        if (f - 1) % st:
            logger.warning("VAE encode: %d frames is not %d*k+1; the last %d are dropped.",
                           f, st, (f - 1) % st)
        return torch.cat([self._encode_one(video[i : i + 1]) for i in range(b)])

    def _encode_one(self, x: torch.Tensor) -> torch.Tensor:
        st = self.stride[0]
        cache = FeatureCache()
        chunks = []
        for i in range(1 + (x.shape[2] - 1) // st):
            lo, hi = (0, 1) if i == 0 else (1 + st * (i - 1), 1 + st * i)
            chunk = self._to_network(x[:, :, lo:hi].to(self.dtype))
            chunks.append(self.encoder(chunk.contiguous(memory_format=self.activation_layout), cache))
            cache.first_chunk = False
        mu = self.conv1(torch.cat(chunks, dim=2))[:, : self.z_dim].float()
        mean, inv_std = self._stats(mu)
        return (mu - mean) * inv_std

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalised latent [B, z, T, h, w] -> video [B, 3, 1+4(T-1), h*s, w*s] float32 in [-1, 1].

        One latent frame at a time with the feature cache; any h, w work, so a tiling wrapper
        can decode spatial crops of the latent.
        """
        if latent.dim() != 5 or latent.shape[1] != self.z_dim or latent.shape[2] < 1:
            raise InputError(
                f"The Wan {self.version} VAE decodes latents [B, {self.z_dim}, T>=1, h, w]; "
                f"got {list(latent.shape)}.",
                "The latent belongs to a model with a different VAE.",
            )
        st, s, _ = self.stride
        b, _, t, h, w = latent.shape
        out = torch.empty(b, 3, 1 + st * (t - 1), h * s, w * s, dtype=torch.float32, device=latent.device)
        for i in range(b):
            self._decode_one(latent[i : i + 1], out[i : i + 1])
        return out

    @property
    def decode_frame_chunk(self) -> int | None:
        """Frames the decoder's upsampling levels process at a time (`Decoder3d.frame_chunk`)."""
        return self.decoder.frame_chunk

    @decode_frame_chunk.setter
    def decode_frame_chunk(self, frames: int | None) -> None:
        if frames is not None and (not isinstance(frames, int) or frames < 1):
            raise InputError(f"The VAE decode frame chunk must be None or an integer >= 1; got {frames!r}.",
                             "Use 1 (least memory), 2, or None (whole chunks).")
        self.decoder.frame_chunk = frames

    def decoder_input(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latent [B, z, T, h, w] -> the decoder's input (conv2 output) in the VAE dtype
        and activation layout."""
        mean, inv_std = self._stats(z)
        # de-normalised exactly as the reference: z / (1/std) + mean
        x = self.conv2((z.float() / inv_std + mean).to(self.dtype))
        return x.contiguous(memory_format=self.activation_layout)

    def write_frames(self, dst: torch.Tensor, y: torch.Tensor) -> None:
        """Decoder output y [B, C, n, H', W'] -> video frames written into `dst` [B, 3, n, H, W]
        (float32), clamped to [-1, 1]."""
        self._write_frames(dst, y)
        dst.clamp_(-1.0, 1.0)

    def _decode_one(self, z: torch.Tensor, out: torch.Tensor) -> None:
        x = self.decoder_input(z)
        cache = FeatureCache()
        done = 0
        for i in range(x.shape[2]):
            y = self.decoder(x[:, :, i : i + 1], cache)
            cache.first_chunk = False
            n = y.shape[2]
            self.write_frames(out[:, :, done : done + n], y)
            done += n
        if done != out.shape[2]:
            raise RuntimeError(f"VAE decode produced {done} frames, expected {out.shape[2]}")
