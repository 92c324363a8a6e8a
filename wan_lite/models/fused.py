"""One-kernel forms of the models' small elementwise functions, on CUDA.

Eager PyTorch makes one pass over memory per operation: the DiT's LayerNorm-then-modulate, for
instance, reads and writes its [tokens, dim] fp32 input about eight times, and its RMSNorm-then-
RoPE of q and k a dozen times, which at 720p costs as much time as a good part of the matrix
products. `Fused(fn)` wraps a pure tensor function: on CUDA tensors it runs `torch.compile(fn)`
(Inductor generates one Triton kernel: each input read once, each output written once); on the
CPU, and wherever torch.compile cannot run (no Triton, no C compiler), it runs `fn` itself. The
intermediate casts of `fn` (the reference rounds some results to bf16 before going on in fp32)
are kept in the compiled form (`emulate_precision_casts`), so the two agree to float32 rounding
(fused multiply-adds), far below the bf16 rounding of the results.

The first call of each function on a GPU compiles it for its exact shapes (seconds, cached on
disk by torch for later starts); a later call with another token count compiles it once more with
that dimension dynamic (torch's automatic dynamic shapes), the others still fixed. Fixed sizes
let Inductor vectorise: on an H200, compiled with every dimension dynamic instead, an fp8 TI2V-5B
forward took 95.3 ms per 4 blocks instead of 85.6 (bench/results/2026-12-03-y).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

_enabled = True


def set_fusion(enabled: bool) -> bool:
    """Turn the compiled forms on or off (for comparisons); returns the previous setting."""
    global _enabled
    old, _enabled = _enabled, enabled
    return old


def fusion_enabled() -> bool:
    """Whether the compiled forms (and the hand-written kernels that stand in for some) run."""
    return _enabled


# Each new combination of argument dtypes (and batch size 1 vs more) is one more compiled
# variant; torch's default limit of 8 per function would fall back to eager in long sessions.
RECOMPILE_LIMIT = 64


# One graph per function; fixed shapes until a dimension changes (see the module's docstring).
COMPILE = {"dynamic": None, "fullgraph": True}


def _allow_recompiles() -> None:
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), RECOMPILE_LIMIT))
            return


class Fused:
    """`fn`, compiled into one kernel when its first tensor argument is on a CUDA device.
    eager: what runs where it is not compiled (default `fn`): the same numbers, e.g. `fn` a few
    rows at a time, where `fn` whole would make a float32 temporary of a whole weight."""

    def __init__(self, fn: Callable[..., Any], *, exact_casts: bool = True,
                 eager: Callable[..., Any] | None = None) -> None:
        self.fn = fn
        self.eager = eager or fn
        self._options = {"emulate_precision_casts": True} if exact_casts else {}
        self._compiled: Callable[..., Any] | None = None
        self.failed = False  # torch.compile could not run here: the eager form is used from now on
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", "fused")

    def __call__(self, *args: Any) -> Any:
        if not (_enabled and args[0].is_cuda) or self.failed:
            return self.eager(*args)
        try:
            if self._compiled is None:
                _allow_recompiles()
                self._compiled = torch.compile(self.fn, **COMPILE, options=self._options)
            return self._compiled(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # no Triton, no compiler: the eager form gives the same numbers
            self.failed = True
            log.info("%s is not fused (torch.compile unavailable: %s).", self.__name__, err)
            return self.eager(*args)


class KernelSwitch:
    """A hand-written Triton kernel's switch: on until a call fails for another reason than memory
    (a Triton build that cannot compile it), then off for the process, with one log line. The
    callers then run their eager or compiled form, which gives the same numbers."""

    def __init__(self, what: str, instead: str) -> None:
        self.what, self.instead = what, instead
        self.failed = False

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args), or None where the kernel failed (now or before)."""
        if self.failed:
            return None
        try:
            return fn(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:
            self.failed = True
            log.info("%s unavailable (%s); using the %s.", self.what, err, self.instead)
            return None
