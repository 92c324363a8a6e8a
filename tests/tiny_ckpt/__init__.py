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
    common = dict(in_dim=spec.dit_in_dim, out_dim=spec.dit_out_dim, dim=dim, ffn_dim=ffn_dim,
                  num_layers=num_layers, model_type=spec.task, text_dim=t5["d_model"])
    for i, part in enumerate(spec.dits):
        write_dit(root / part.folder, seed=seed + 1 + i, **common)
    write_vae(root / spec.vae_file, spec.vae_version, seed=seed + 3)
    return root
