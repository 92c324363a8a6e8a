"""wan_lite: run the Wan 2.2 video models (TI2V-5B, T2V-A14B, I2V-A14B) on a consumer GPU.

Importing this package does no work (no device probing, no file access) beyond one default:
PyTorch's CUDA allocator uses expandable segments unless the user configured it. Without them,
a streamed A14B step fragments the cache until its reserved memory is ~1.2 GiB above what is
allocated, and an 8 GB card runs out of memory with 1.2 GiB unused (bench/results/2026-11-21-d).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from wan_lite.version import __version__ as __version__

if "PYTORCH_ALLOC_CONF" not in os.environ and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # read at the first CUDA allocation

if TYPE_CHECKING:
    from wan_lite.pipeline import WanPipeline


def load_pipeline(model_dir: Any, **kwargs: Any) -> WanPipeline:
    """Load a model folder (official layout) into a ready pipeline. See `WanPipeline.load`."""
    from wan_lite.pipeline import WanPipeline

    return WanPipeline.load(model_dir, **kwargs)
