"""The three Wan 2.2 models wan_lite runs, with their official defaults (one place for all of them).

Values come from the official Wan 2.2 configs and the official command line's defaults.
Sizes are (width, height).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

TEXT_LEN = 512
NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class ModelSpec:
    """Everything that differs between the three models, apart from tensor shapes."""

    name: str  # "ti2v-5b", "t2v-a14b", "i2v-a14b"
    title: str
    hf_repo: str
    task: str  # "ti2v", "t2v" or "i2v" (the checkpoint's model_type)
    vae_version: str  # "2.1" or "2.2"
    vae_file: str
    z_dim: int
    vae_stride: tuple[int, int, int]  # (t, h, w)
    patch_size: tuple[int, int, int]
    experts: bool  # two experts (high_noise_model/, low_noise_model/) or one DiT at the root
    steps: int
    shift: float
    guidance: tuple[float, float]  # (high-noise expert, low-noise expert); equal for ti2v
    boundary: float | None  # timestep of the expert switch (high-noise while t >= boundary)
    fps: int
    frames: int
    sizes: tuple[tuple[int, int], ...]  # the trained sizes, (width, height)
    needs_image: bool

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this (VAE stride x DiT patch)."""
        return self.vae_stride[1] * self.patch_size[1]

    @property
    def default_size(self) -> tuple[int, int]:
        return self.sizes[0]


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="ti2v-5b",
            title="Wan2.2 TI2V-5B (text/image to video, 720p 24 fps)",
            hf_repo="Wan-AI/Wan2.2-TI2V-5B",
            task="ti2v",
            vae_version="2.2",
            vae_file="Wan2.2_VAE.pth",
            z_dim=48,
            vae_stride=(4, 16, 16),
            patch_size=(1, 2, 2),
            experts=False,
            steps=50,
            shift=5.0,
            guidance=(5.0, 5.0),
            boundary=None,
            fps=24,
            frames=121,
            sizes=((1280, 704), (704, 1280)),
            needs_image=False,
        ),
        ModelSpec(
            name="t2v-a14b",
            title="Wan2.2 T2V-A14B (text to video, two 14B experts)",
            hf_repo="Wan-AI/Wan2.2-T2V-A14B",
            task="t2v",
            vae_version="2.1",
            vae_file="Wan2.1_VAE.pth",
            z_dim=16,
            vae_stride=(4, 8, 8),
            patch_size=(1, 2, 2),
            experts=True,
            steps=40,
            shift=12.0,
            guidance=(4.0, 3.0),
            boundary=875.0,
            fps=16,
            frames=81,
            sizes=((1280, 720), (720, 1280), (832, 480), (480, 832)),
            needs_image=False,
        ),
        ModelSpec(
            name="i2v-a14b",
            title="Wan2.2 I2V-A14B (image to video, two 14B experts)",
            hf_repo="Wan-AI/Wan2.2-I2V-A14B",
            task="i2v",
            vae_version="2.1",
            vae_file="Wan2.1_VAE.pth",
            z_dim=16,
            vae_stride=(4, 8, 8),
            patch_size=(1, 2, 2),
            experts=True,
            steps=40,
            shift=5.0,
            guidance=(3.5, 3.5),
            boundary=900.0,
            fps=16,
            frames=81,
            sizes=((1280, 720), (720, 1280), (832, 480), (480, 832)),
            needs_image=True,
        ),
    )
}

DEFAULT_MODEL = "ti2v-5b"

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"


def get_spec(name: str) -> ModelSpec:
    from wan_lite.errors import InputError

    key = name.lower().replace("_", "-")
    if key not in MODELS:
        raise InputError(f"Unknown model {name!r}.", f"Choose one of: {', '.join(MODELS)}.")
    return MODELS[key]


def spec_for_task(task: str) -> ModelSpec:
    """The spec whose checkpoint declares this model_type ("ti2v", "t2v", "i2v")."""
    for spec in MODELS.values():
        if spec.task == task:
            return spec
    raise KeyError(task)
