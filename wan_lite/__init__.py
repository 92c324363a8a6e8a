"""wan_lite: run the Wan 2.2 video models (TI2V-5B, T2V-A14B, I2V-A14B) on a consumer GPU.

Importing this package does no work: no device probing, no file access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from wan_lite.pipeline import WanPipeline


def load_pipeline(model_dir: Any, **kwargs: Any) -> WanPipeline:
    """Load a model folder (official layout) into a ready pipeline. See `WanPipeline.load`."""
    from wan_lite.pipeline import WanPipeline

    return WanPipeline.load(model_dir, **kwargs)
