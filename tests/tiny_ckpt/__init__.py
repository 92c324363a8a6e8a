"""Writers of tiny random checkpoints in the official file layouts and key names.

`write_model(root, name)` writes a complete model folder exactly as the official Hugging Face
repo lays it out (DiT shards + index + config.json, the VAE .pth, the T5 .pth and the tokenizer
folder), only with 2 blocks and small widths, so the real loaders infer a tiny architecture.
"""

from __future__ import annotations

from pathlib import Path

from wan_lite.registry import MODELS


def write_model(root: Path, name: str, *, seed: int = 0, dim: int = 128, ffn_dim: int = 256,
                num_layers: int = 2) -> Path:
    from tests.tiny_ckpt.dit import write_dit
    from tests.tiny_ckpt.t5 import write_t5
    from tests.tiny_ckpt.vae import write_vae

    spec = MODELS[name]
    root = Path(root)
    t5 = write_t5(root, seed=seed)
    in_dim = {"ti2v": spec.z_dim, "t2v": spec.z_dim, "i2v": 2 * spec.z_dim + 4}[spec.task]
    common = dict(in_dim=in_dim, out_dim=spec.z_dim, dim=dim, ffn_dim=ffn_dim, num_layers=num_layers,
                  model_type=spec.task, text_dim=t5["d_model"])
    if spec.experts:
        write_dit(root / "high_noise_model", seed=seed + 1, **common)
        write_dit(root / "low_noise_model", seed=seed + 2, **common)
    else:
        write_dit(root, seed=seed + 1, **common)
    write_vae(root / spec.vae_file, spec.vae_version, seed=seed + 3)
    return root
