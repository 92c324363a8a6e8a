"""An activation handed from the layer that makes it to the next in fp8 (e4m3), with row scales.

A producer that knows a bound of its values (the DiT's LayerNorm + modulation: every value lies
within sqrt(D) * |1 + scale| + |shift|) can write e4m3 directly, in the kernel that computes it,
instead of a bf16 tensor that the fp8 GEMM's activation quantization reads twice more. Layers
that take one say so with `accepts_fp8_rows(device)` (`wan_lite.runtime.quant.QuantizedLinear`);
the models ask before they make one, so a model without such layers never sees this type.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Fp8Rows(NamedTuple):
    """data [..., K] float8_e4m3fn; scale [M, 1] float32 per row (M = the product of data's leading
    dims; a row's value is data * scale); dtype: the dtype the activation stands for (the result
    dtype of the layer that takes it)."""

    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    def dequantized(self) -> torch.Tensor:
        """The values in `dtype` (for a layer that cannot take e4m3 after all)."""
        flat = self.data.reshape(-1, self.data.shape[-1]).float() * self.scale
        return flat.to(self.dtype).reshape(self.data.shape)


def takes_fp8_rows(layer: torch.nn.Module, device: torch.device) -> bool:
    """Whether `layer` takes an `Fp8Rows` on `device` (its own `accepts_fp8_rows` says so)."""
    accepts = getattr(layer, "accepts_fp8_rows", None)
    return accepts is not None and bool(accepts(device))
