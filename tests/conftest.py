from __future__ import annotations

import os
import tempfile

import pytest
import torch

# Never read or write the developer's own settings and remembered model choices.
os.environ["WAN_LITE_CONFIG_DIR"] = tempfile.mkdtemp(prefix="wan_lite_test_config_")
os.environ["WAN_LITE_CACHE_DIR"] = tempfile.mkdtemp(prefix="wan_lite_test_cache_")

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """The three tiny models, written once per test session in the official layout."""
    from tests.tiny_ckpt import write_model

    root = tmp_path_factory.mktemp("tiny_models")
    return {name: write_model(root / name, name) for name in ("ti2v-5b", "t2v-a14b", "i2v-a14b")}


@pytest.fixture(scope="module")
def state():
    """The tiny DiT's weights of the LoRA tests (tests/tiny_ckpt/lora.py)."""
    from tests.tiny_ckpt.lora import tiny_state

    return tiny_state()


@pytest.fixture(scope="module")
def inputs():
    """Inputs of the LoRA tests' tiny DiT: (latent, t, context)."""
    from tests.tiny_ckpt.lora import tiny_inputs

    return tiny_inputs()


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    """A 56x40 random RGB PNG: a start image for the image-to-video tests."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("img") / "start.png"
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(path)
    return path
