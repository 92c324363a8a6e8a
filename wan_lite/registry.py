"""The Wan 2.2 models wan_lite runs: one `ModelSpec` record per variant holds every fact about it.

A record says what the DiT looks like (`DiTShape`), which DiT files it has and where the official
and diffusers layouts keep them (`DiTPart`), which VAE (`VaeSpec`), text encoder and tokenizer it
takes, how a start image enters the model (`conditioning`), the timestep form, the official
defaults and the sizes it was trained at. Everything else (footprints, layout help, component
slots, checkpoint detection, the UI's sizes) is derived from these records, so a variant that
differs only in data is one more entry in `MODELS`.

Values come from the official Wan 2.2 configs and the official command line's defaults.
Sizes are (width, height).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

TEXT_LEN = 512
NUM_TRAIN_TIMESTEPS = 1000

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
SHARED_SLOTS = ("vae", "text_encoder", "tokenizer")  # the component slots besides the DiT(s)

# How a start image enters the model:
#   "none":           text only (T2V-A14B).
#   "first_latent":   the image's latent replaces latent frame 0 and its tokens get timestep 0
#                     (TI2V-5B; without an image it is text-to-video).
#   "channel_concat": y = [mask (vae_stride[0] channels) | VAE latent of the image followed by
#                     zero frames] is concatenated to the latent on channels (I2V-A14B).
Conditioning = Literal["none", "first_latent", "channel_concat"]


@dataclass(frozen=True)
class DiTShape:
    """The DiT's hidden sizes (the input / output channels follow from the VAE and the
    conditioning: `ModelSpec.dit_in_dim`, `dit_out_dim`). Heads are 128 wide."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    text_dim: int = 4096
    freq_dim: int = 256

    def same_size(self, cfg: Any) -> bool:
        """Whether a DiT config (anything with dim, num_layers and optionally ffn_dim) has this size."""
        return (cfg.dim, cfg.num_layers, getattr(cfg, "ffn_dim", self.ffn_dim)) == (
            self.dim, self.num_layers, self.ffn_dim)


@dataclass(frozen=True)
class DiTPart:
    """One DiT file set of a model: the single DiT, or one A14B expert.

    role: the pipeline's name for it ("main", "high", "low"); slot: the component slot a user
    fills ("dit", "dit_high", "dit_low"); folder: where the official repo keeps it ("" = the
    repo's root); diffusers_folder: its subfolder in a diffusers pipeline."""

    role: str
    slot: str
    folder: str
    diffusers_folder: str

    @property
    def label(self) -> str:
        """ "the DiT", "the high-noise expert"."""
        return "the DiT" if self.role == "main" else f"the {self.role}-noise expert"


ONE_DIT = (DiTPart("main", "dit", "", "transformer"),)
# The high-noise expert comes first: it runs first (t >= boundary) and takes guidance[0].
TWO_EXPERTS = (DiTPart("high", "dit_high", "high_noise_model", "transformer"),
               DiTPart("low", "dit_low", "low_noise_model", "transformer_2"))


@dataclass(frozen=True)
class VaeSpec:
    """One VAE release. file: the official file; comfy_file: ComfyUI's repack of it; params:
    (encoder, decoder) parameter counts."""

    version: str
    file: str
    comfy_file: str
    z_dim: int
    stride: tuple[int, int, int]  # (t, h, w)
    params: tuple[int, int]


VAES: dict[str, VaeSpec] = {
    "2.1": VaeSpec("2.1", "Wan2.1_VAE.pth", "wan_2.1_vae.safetensors", 16, (4, 8, 8), (53_596_928, 73_295_603)),
    "2.2": VaeSpec("2.2", "Wan2.2_VAE.pth", "wan2.2_vae.safetensors", 48, (4, 16, 16), (149_637_088, 555_051_580)),
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything about one model variant (see the module docstring)."""

    name: str  # "ti2v-5b", "t2v-a14b", "i2v-a14b"
    title: str  # "Wan2.2 TI2V-5B (text/image to video, 720p 24 fps)": short title, then a note
    hf_repo: str
    task: str  # the DiT config.json's model_type: "ti2v", "t2v" or "i2v"
    dit: DiTShape
    dits: tuple[DiTPart, ...]  # ONE_DIT, or TWO_EXPERTS switched at `boundary`
    vae: VaeSpec
    conditioning: Conditioning
    timestep_dtype: Literal["float32", "int64"]  # the dtype of the timesteps the DiT is given
    steps: int
    shift: float
    guidance: tuple[float, float]  # (high-noise expert, low-noise expert); equal for one DiT
    boundary: float | None  # timestep of the expert switch (high-noise while t >= boundary)
    fps: int
    frames: int
    sizes: tuple[tuple[int, int], ...]  # the trained sizes, (width, height); the first is the default
    draft_size: tuple[int, int]  # the UI's Draft mode size (landscape)
    needs_image: bool
    patch_size: tuple[int, int, int] = (1, 2, 2)
    t5_file: str = T5_FILE
    tokenizer_dir: str = TOKENIZER_DIR
    # (pixels, steps) below which results are known to be poor (the UI warns); None: no such quirk
    quality_floor: tuple[int, int] | None = None
    image_variant: str | None = None  # the model an image switches to (T2V-A14B -> I2V-A14B)
    text_variant: str | None = None  # the model without an image (I2V-A14B -> T2V-A14B)
    wan21_lookalike: str | None = None  # a Wan 2.1 DiT with the same shapes, told apart by its file name

    # ------------------------------------------------------------------ names
    @property
    def short_title(self) -> str:
        """ "Wan2.2 T2V-A14B"."""
        return self.title.split(" (")[0]

    @property
    def label(self) -> str:
        """ "T2V-A14B"."""
        return self.short_title.removeprefix("Wan2.2 ")

    # ------------------------------------------------------------------ components
    @property
    def experts(self) -> bool:
        """Two experts (high- and low-noise) rather than one DiT."""
        return len(self.dits) > 1

    @property
    def dit_roles(self) -> tuple[str, ...]:
        return tuple(p.role for p in self.dits)

    @property
    def dit_slots(self) -> tuple[str, ...]:
        return tuple(p.slot for p in self.dits)

    @property
    def slots(self) -> tuple[str, ...]:
        """Every component slot: the DiT(s), "vae", "text_encoder", "tokenizer"."""
        return (*self.dit_slots, *SHARED_SLOTS)

    def dit_part(self, role_or_slot: str) -> DiTPart:
        for p in self.dits:
            if role_or_slot in (p.role, p.slot):
                return p
        raise KeyError(f"{self.name} has no DiT {role_or_slot!r}")

    def slot_of(self, role: str) -> str:
        """ "main" -> "dit", "high" -> "dit_high"."""
        return self.dit_part(role).slot

    def dit_role_at(self, t: float) -> str:
        """The DiT that denoises at timestep t: the high-noise expert while t >= boundary."""
        if not self.experts or self.boundary is None:
            return self.dits[0].role
        return self.dits[0].role if t >= self.boundary else self.dits[1].role

    def guidance_index(self, role: str) -> int:
        """Which of the two guidance scales (`guidance`, a job's pair) a DiT role uses."""
        return self.dit_roles.index(role)

    # ------------------------------------------------------------------ VAE
    @property
    def vae_version(self) -> str:
        return self.vae.version

    @property
    def vae_file(self) -> str:
        return self.vae.file

    @property
    def z_dim(self) -> int:
        return self.vae.z_dim

    @property
    def vae_stride(self) -> tuple[int, int, int]:
        return self.vae.stride

    # ------------------------------------------------------------------ conditioning
    @property
    def mask_channels(self) -> int:
        """Channels of the image mask in `y` ("channel_concat": one per frame of a latent frame)."""
        return self.vae.stride[0] if self.conditioning == "channel_concat" else 0

    @property
    def dit_in_dim(self) -> int:
        """The DiT's input channels: the latent, plus mask and image latent for "channel_concat"."""
        extra = self.mask_channels + self.z_dim if self.conditioning == "channel_concat" else 0
        return self.z_dim + extra

    @property
    def dit_out_dim(self) -> int:
        return self.z_dim

    @property
    def takes_image(self) -> bool:
        return self.conditioning != "none"

    @property
    def encodes_video(self) -> bool:
        """The VAE encodes a whole clip (image + zero frames), not one image."""
        return self.conditioning == "channel_concat"

    @property
    def crops_image(self) -> bool:
        """A start image is scaled to cover the size and centre-cropped ("first_latent"), rather
        than resized to the official image-to-video size for its aspect ratio."""
        return self.conditioning == "first_latent"

    # ------------------------------------------------------------------ sizes
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
            dit=DiTShape(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30),
            dits=ONE_DIT,
            vae=VAES["2.2"],
            conditioning="first_latent",
            timestep_dtype="float32",
            steps=50,
            shift=5.0,
            guidance=(5.0, 5.0),
            boundary=None,
            fps=24,
            frames=121,
            sizes=((1280, 704), (704, 1280)),
            draft_size=(640, 352),  # about 360p: a quick look only
            needs_image=False,
            quality_floor=(1280 * 704, 30),
        ),
        ModelSpec(
            name="t2v-a14b",
            title="Wan2.2 T2V-A14B (text to video, two 14B experts)",
            hf_repo="Wan-AI/Wan2.2-T2V-A14B",
            task="t2v",
            dit=DiTShape(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
            dits=TWO_EXPERTS,
            vae=VAES["2.1"],
            conditioning="none",
            timestep_dtype="int64",
            steps=40,
            shift=12.0,
            guidance=(4.0, 3.0),
            boundary=875.0,
            fps=16,
            frames=81,
            sizes=((1280, 720), (720, 1280), (832, 480), (480, 832)),
            draft_size=(832, 480),  # trained there
            needs_image=False,
            image_variant="i2v-a14b",
            wan21_lookalike="Wan 2.1 T2V-14B",
        ),
        ModelSpec(
            name="i2v-a14b",
            title="Wan2.2 I2V-A14B (image to video, two 14B experts)",
            hf_repo="Wan-AI/Wan2.2-I2V-A14B",
            task="i2v",
            dit=DiTShape(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
            dits=TWO_EXPERTS,
            vae=VAES["2.1"],
            conditioning="channel_concat",
            timestep_dtype="int64",
            steps=40,
            shift=5.0,
            guidance=(3.5, 3.5),
            boundary=900.0,
            fps=16,
            frames=81,
            sizes=((1280, 720), (720, 1280), (832, 480), (480, 832)),
            draft_size=(832, 480),
            needs_image=True,
            text_variant="t2v-a14b",
        ),
    )
}

DEFAULT_MODEL = "ti2v-5b"


def get_spec(name: str) -> ModelSpec:
    from wan_lite.errors import InputError

    key = name.lower().replace("_", "-")
    if key not in MODELS:
        raise InputError(f"Unknown model {name!r}.", f"Choose one of: {', '.join(MODELS)}.")
    return MODELS[key]


def spec_for_task(task: str, *, experts: bool | None = None) -> ModelSpec:
    """The first spec whose checkpoint declares this model_type ("ti2v", "t2v", "i2v")."""
    for spec in MODELS.values():
        if spec.task == task and experts in (None, spec.experts):
            return spec
    raise KeyError(task)


def match_dit(in_dim: int, out_dim: int, dim: int | None = None, num_layers: int | None = None, *,
              experts: bool | None = None) -> ModelSpec | None:
    """The model whose DiT has these input / output channels; where several have, the one of
    this size (dim, num_layers), else the first. None when no model has these channels."""
    fits = [s for s in MODELS.values() if (s.dit_in_dim, s.dit_out_dim) == (in_dim, out_dim)
            and experts in (None, s.experts)]
    sized = [s for s in fits if (s.dit.dim, s.dit.num_layers) == (dim, num_layers)]
    return (sized or fits or [None])[0]


def model_for_image(name: str, has_image: bool) -> str:
    """The model a request runs with or without a start image: an image turns T2V-A14B into
    I2V-A14B and back; a model that takes both (TI2V-5B) stays."""
    spec = get_spec(name)
    other = spec.image_variant if has_image else spec.text_variant
    return other or spec.name


def dit_slots() -> tuple[str, ...]:
    """Every DiT slot name any model has ("dit", "dit_high", "dit_low"), in registry order."""
    return tuple(dict.fromkeys(slot for s in MODELS.values() for slot in s.dit_slots))


def all_slots() -> tuple[str, ...]:
    return (*dit_slots(), *SHARED_SLOTS)


def vae_for(version: str) -> VaeSpec:
    from wan_lite.errors import InputError

    if version not in VAES:
        raise InputError(f"Unknown VAE version {version!r}.", f"Choose one of: {', '.join(VAES)}.")
    return VAES[version]
