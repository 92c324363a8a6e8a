"""Fill a module built on the `meta` device from a TensorSource, casting tensor by tensor.

No RAM is spent on random initialisation, and the peak while loading is the finished model plus
one source tensor. Every mismatch is reported with the key, the expected and the found shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from wan_lite.errors import CheckpointError
from wan_lite.loading.tensors import TensorSource

KeepDtype = Callable[[str], bool]


def fill_module(
    module: nn.Module,
    source: TensorSource,
    dtype: torch.dtype | None,
    *,
    key_map: Callable[[str], str] | None = None,
    keep_fp32: KeepDtype | None = None,
    what: str = "model",
    convert: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> nn.Module:
    """Assign every parameter and buffer of `module` (built on meta) from `source`.

    key_map: module key -> source key (identity when None).
    keep_fp32: module keys that stay float32 whatever `dtype` is.
    convert: optional per-tensor transform applied after reading (e.g. dequantisation).
    Raises CheckpointError listing missing keys or a wrong shape (key, expected, found).
    """
    expected = module.state_dict(keep_vars=True)
    src_keys = {name: (key_map(name) if key_map else name) for name in expected}
    missing = [s for s in src_keys.values() if s not in source]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(
            f"The {what} file(s) {source.describe()} lack {len(missing)} tensor(s): {shown}.",
            "This is not the expected checkpoint or it is incomplete; check the file or download it again.",
        )
    loaded: dict[str, torch.Tensor] = {}
    for name, ref in expected.items():
        key = src_keys[name]
        found = tuple(source.shape(key))
        if found != tuple(ref.shape):
            raise CheckpointError(
                f"Tensor {key!r} in {source.describe()} has shape {list(found)}, "
                f"expected {list(ref.shape)} for this {what}.",
                "The file belongs to a different model or version.",
            )
        target = ref.dtype if not ref.is_floating_point() else dtype or source.dtype(key)
        if keep_fp32 is not None and keep_fp32(name) and ref.is_floating_point():
            target = torch.float32
        if convert is None:
            tensor = source.read(key, target)  # cast as it is read: one tensor in flight
        else:
            tensor = convert(key, source[key])
        loaded[name] = tensor.to(target) if tensor.dtype != target else tensor
    module.load_state_dict(loaded, assign=True, strict=True)
    module.requires_grad_(False)  # inference only: no autograd bookkeeping anywhere
    module.eval()
    return module
