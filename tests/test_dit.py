"""The Wan 2.2 DiT against independent references, on tiny random checkpoints (CPU, fp32).

Oracle: diffusers' WanTransformer3DModel (test-only dependency) loaded with the same weights,
renamed to diffusers' names. A naive per-token forward written here from the official forward
checks the once-per-distinct-timestep modulation.
"""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

from tests.tiny_ckpt.dit import official_dit_shapes, random_dit_state, write_dit
from wan_lite.errors import CheckpointError, InputError
from wan_lite.loading.build import build_dit
from wan_lite.loading.tensors import DictSource, SafetensorsSource
from wan_lite.models import attention as attn_mod
from wan_lite.models.dit import WanDiT, WanDiTConfig, name_matches, timestep_runs

DIM, FFN, LAYERS, TEXT_DIM = 256, 512, 2, 64  # 2 heads of 128 channels, tiny T5 width
GRID = (3, 4, 6)  # latent frames, height, width -> 3 x 2 x 3 = 18 tokens
TOKENS_PER_FRAME = (GRID[1] // 2) * (GRID[2] // 2)
L = GRID[0] * TOKENS_PER_FRAME


def tiny_state(in_dim: int, out_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    shapes = official_dit_shapes(in_dim=in_dim, out_dim=out_dim, dim=DIM, ffn_dim=FFN, num_layers=LAYERS,
                                 text_dim=TEXT_DIM)
    return random_dit_state(shapes, seed)


def ours(state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> WanDiT:
    return build_dit(DictSource(state), dtype)


def context(batch: int, real_rows: tuple[int, ...] = (7, 11), seed: int = 1) -> torch.Tensor:
    """[B, 512, TEXT_DIM]: a few real T5 rows, zero padding after them (the pipeline's convention)."""
    gen = torch.Generator().manual_seed(seed)
    ctx = torch.zeros(batch, 512, TEXT_DIM)
    for b in range(batch):
        n = real_rows[b % len(real_rows)]
        ctx[b, :n] = torch.randn(n, TEXT_DIM, generator=gen)
    return ctx


def latent(batch: int, channels: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, channels, *GRID, generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------------------------------- diffusers oracle
def diffusers_name(key: str) -> str:
    """Official WanModel key -> diffusers WanTransformer3DModel key."""
    top = {
        "text_embedding.0.": "condition_embedder.text_embedder.linear_1.",
        "text_embedding.2.": "condition_embedder.text_embedder.linear_2.",
        "time_embedding.0.": "condition_embedder.time_embedder.linear_1.",
        "time_embedding.2.": "condition_embedder.time_embedder.linear_2.",
        "time_projection.1.": "condition_embedder.time_proj.",
        "head.head.": "proj_out.",
        "head.modulation": "scale_shift_table",
        "patch_embedding.": "patch_embedding.",
    }
    for old, new in top.items():
        if key.startswith(old):
            return new + key[len(old):]
    _, n, rest = key.split(".", 2)
    inner = {
        "modulation": "scale_shift_table",
        "norm3.weight": "norm2.weight",  # the affine cross-attention norm
        "norm3.bias": "norm2.bias",
        "ffn.0.weight": "ffn.net.0.proj.weight",
        "ffn.0.bias": "ffn.net.0.proj.bias",
        "ffn.2.weight": "ffn.net.2.weight",
        "ffn.2.bias": "ffn.net.2.bias",
    }
    if rest in inner:
        return f"blocks.{n}.{inner[rest]}"
    attn, proj, param = rest.split(".")
    attn = {"self_attn": "attn1", "cross_attn": "attn2"}[attn]
    proj = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}.get(proj, proj)  # norm_q/norm_k keep names
    return f"blocks.{n}.{attn}.{proj}.{param}"


def diffusers_model(state: dict[str, torch.Tensor], in_dim: int, out_dim: int):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=DIM // 128, attention_head_dim=128, in_channels=in_dim,
        out_channels=out_dim, text_dim=TEXT_DIM, freq_dim=256, ffn_dim=FFN, num_layers=LAYERS,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
    )
    model.load_state_dict({diffusers_name(k): v for k, v in state.items()}, strict=True)
    return model.eval()


def ti2v_timesteps(batch: int, t: float) -> torch.Tensor:
    """[B, L]: frame-0 tokens clean (t = 0), the rest at t, as the TI2V image-to-video path does."""
    tt = torch.full((batch, L), t)
    tt[:, :TOKENS_PER_FRAME] = 0.0
    return tt


CASES = {
    "ti2v-scalar-t": (48, 48, 0, lambda: torch.tensor([700.0])),
    "ti2v-per-token-t": (48, 48, 0, lambda: ti2v_timesteps(2, 812.5)),
    "ti2v-random-per-token-t": (48, 48, 0, lambda: torch.rand(2, L, generator=torch.Generator().manual_seed(5)) * 999),
    "t2v": (16, 16, 0, lambda: torch.tensor([999, 412])),
    "i2v": (36, 16, 20, lambda: torch.tensor([950, 950])),
}


@pytest.mark.parametrize("case", list(CASES))
@torch.inference_mode()
def test_matches_diffusers(case: str) -> None:
    in_dim, out_dim, y_ch, make_t = CASES[case]
    state = tiny_state(in_dim, out_dim)
    t = make_t()
    batch = 2  # cond + uncond, as the pipeline batches them
    x = latent(batch, in_dim - y_ch)
    y = latent(batch, y_ch, seed=3) if y_ch else None
    ctx = context(batch)
    got = ours(state)(x, t, ctx, y=y)
    assert got.dtype == torch.float32 and got.shape == (batch, out_dim, *GRID)

    ref_t = t.expand(batch) if t.ndim == 1 else t
    x_in = torch.cat([x, y], dim=1) if y is not None else x
    want = diffusers_model(state, in_dim, out_dim)(x_in, ref_t, ctx, return_dict=False)[0]
    err = rel_err(got, want)
    print(f"{case}: rel err {err:.2e}, max abs {(got - want).abs().max().item():.2e}")
    assert err < 1e-4


# ------------------------------------------------------------------------- naive per-token reference
def naive_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor,
                  distinct_time_rows: bool = False) -> torch.Tensor:
    """The spec's forward, literally, in the official code's order of casts: everything per token
    ([B, L, 6, D] modulation), complex float64 RoPE, the reference's autocast(fp32) islands.

    fp32 weights on CPU: plain fp32. bf16 weights on CUDA under autocast(bf16): the reference run.
    distinct_time_rows: run the time MLP on the distinct t values, then gather per token (same math;
    the matmuls then see the row count that WanDiT uses, so their fp32 rounding matches too).
    """
    B, _, T, H, W = x.shape
    f, h, w = T, H // 2, W // 2
    n_heads, eps = DIM // 128, 1e-6
    fp32_island = (lambda: torch.autocast("cuda", dtype=torch.float32)) if x.is_cuda else contextlib.nullcontext
    lin = lambda u, p: F.linear(u, sd[p + ".weight"], sd[p + ".bias"])  # noqa: E731

    def ln(u, p=None):  # WanLayerNorm: fp32 statistics, cast back to the input's dtype
        wb = (sd[p + ".weight"].float(), sd[p + ".bias"].float()) if p else (None, None)
        return F.layer_norm(u.float(), (DIM,), *wb, eps=eps).type_as(u)

    def rms(u, p):  # WanRMSNorm over all heads
        uf = u.float()
        return (uf * torch.rsqrt(uf.pow(2).mean(-1, keepdim=True) + eps)).type_as(u) * sd[p + ".weight"]

    u = F.conv3d(x, sd["patch_embedding.weight"], sd["patch_embedding.bias"], stride=(1, 2, 2))
    u = u.flatten(2).transpose(1, 2)
    with fp32_island():
        tt = t.to(torch.float64).reshape(B, -1).expand(B, L)
        rows, inv = torch.unique(tt, return_inverse=True) if distinct_time_rows else (tt, None)
        ang = rows[..., None] * torch.pow(10000, -torch.arange(128, dtype=torch.float64, device=x.device) / 128)
        sin = torch.cat([ang.cos(), ang.sin()], -1).float()  # [B, L, 256] (or [U, 256])
        e = lin(F.silu(lin(sin, "time_embedding.0")), "time_embedding.2")  # [B, L, D]
        e0 = lin(F.silu(e), "time_projection.1").unflatten(-1, (6, DIM))  # [B, L, 6, D]
        if inv is not None:
            e, e0 = e[inv], e0[inv]
    c = lin(F.gelu(lin(ctx, "text_embedding.0"), approximate="tanh"), "text_embedding.2")

    def rope_params(d: int) -> torch.Tensor:  # the reference's 1024-position complex table
        a = torch.outer(torch.arange(1024), 1.0 / torch.pow(10000, torch.arange(0, d, 2).to(torch.float64).div(d)))
        return torch.polar(torch.ones_like(a), a).to(x.device)

    tab = torch.cat([rope_params(44), rope_params(42), rope_params(42)], dim=1)
    ft, fh, fw = tab.split([22, 21, 21], dim=1)
    freqs = torch.cat([ft[:f, None, None].expand(f, h, w, -1), fh[None, :h, None].expand(f, h, w, -1),
                       fw[None, None, :w].expand(f, h, w, -1)], -1).reshape(L, 1, 64)

    def rope(q: torch.Tensor) -> torch.Tensor:
        qc = torch.view_as_complex(q.to(torch.float64).reshape(B, L, n_heads, 64, 2))
        return torch.view_as_real(qc * freqs).flatten(3).float()

    def mha(q, k, v):  # flash_attention: half-precision inputs on CUDA, output in q's dtype
        half = (lambda z: z.to(torch.bfloat16)) if x.is_cuda and v.dtype == torch.bfloat16 else (lambda z: z)
        qh, kh, vh = (half(z).unflatten(2, (n_heads, 128)).transpose(1, 2) for z in (q, k, v))
        return F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).flatten(2).to(q.dtype)

    for n in range(LAYERS):
        p = f"blocks.{n}"
        with fp32_island():
            m = sd[p + ".modulation"][None] + e0  # [B, L, 6, D], fp32
        a_in = ln(u).float() * (1 + m[:, :, 1]) + m[:, :, 0]
        q = rope(rms(lin(a_in, p + ".self_attn.q"), p + ".self_attn.norm_q").unflatten(2, (n_heads, 128))).flatten(2)
        k = rope(rms(lin(a_in, p + ".self_attn.k"), p + ".self_attn.norm_k").unflatten(2, (n_heads, 128))).flatten(2)
        y = lin(mha(q, k, lin(a_in, p + ".self_attn.v")), p + ".self_attn.o")
        with fp32_island():
            u = u + y * m[:, :, 2]
        q = rms(lin(ln(u, p + ".norm3"), p + ".cross_attn.q"), p + ".cross_attn.norm_q")
        k = rms(lin(c, p + ".cross_attn.k"), p + ".cross_attn.norm_k")
        u = u + lin(mha(q, k, lin(c, p + ".cross_attn.v")), p + ".cross_attn.o")
        y = lin(F.gelu(lin(ln(u).float() * (1 + m[:, :, 4]) + m[:, :, 3], p + ".ffn.0"), approximate="tanh"),
                p + ".ffn.2")
        with fp32_island():
            u = u + y * m[:, :, 5]
    with fp32_island():
        hm = sd["head.modulation"][None] + e[:, :, None]  # [B, L, 2, D]
        out = lin(ln(u) * (1 + hm[:, :, 1]) + hm[:, :, 0], "head.head")  # [B, L, 4 * C]
    C = out.shape[-1] // 4
    out = out.view(B, f, h, w, 1, 2, 2, C).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return out.reshape(B, C, T, H, W).float()


@pytest.mark.parametrize("kind", ["scalar", "ti2v", "random"])
@torch.inference_mode()
def test_distinct_timestep_modulation_matches_per_token(kind: str) -> None:
    state = tiny_state(48, 48, seed=4)
    t = {
        "scalar": torch.tensor([640.0, 640.0]),
        "ti2v": ti2v_timesteps(2, 640.0),
        # rows differ and values repeat in no pattern: many runs, several table rows per run
        "random": torch.randint(0, 4, (2, L), generator=torch.Generator().manual_seed(9)).float() * 250,
    }[kind]
    x, ctx = latent(2, 48), context(2)
    got = ours(state)(x, t, ctx)
    want = naive_forward(state, x, t, ctx)
    err = rel_err(got, want)
    print(f"{kind}: rel err vs naive per-token {err:.2e}")
    assert err < 1e-5
    # With the time MLP run on the same rows the results agree bit for bit: the rest is exact.
    assert torch.equal(got, naive_forward(state, x, t, ctx, distinct_time_rows=True))


def test_timestep_runs() -> None:
    values, runs = timestep_runs(ti2v_timesteps(2, 500.0), 2, L)
    assert values.tolist() == [0.0, 500.0]
    assert [(s, e, idx.tolist()) for s, e, idx in runs] == [(0, TOKENS_PER_FRAME, [0, 0]), (TOKENS_PER_FRAME, L, [1, 1])]
    values, runs = timestep_runs(torch.tensor([999, 10]), 2, L)
    assert values.tolist() == [10, 999] and len(runs) == 1 and runs[0][2].tolist() == [1, 0]
    with pytest.raises(InputError):
        timestep_runs(torch.zeros(2, L + 1), 2, L)


# ------------------------------------------------------------------------- memory knob
def chunks_exact_here(model: WanDiT, n: int) -> bool:
    """Whether this machine's kernels give bit-identical rows when run on n-token pieces.

    BLAS and the CPU SDPA pick kernels and blocking by the row count (and thread split), so
    chunking is bitwise neutral only for some n on some machines (e.g. MKL/AVX-512: 2n % 4 == 0)."""
    gen = torch.Generator().manual_seed(0)
    block = model.blocks[0]
    for linear in (block.self_attn.q, block.ffn[0], block.ffn[2]):
        z = torch.randn(2, L, linear.in_features, generator=gen)
        full = linear(z)
        if not all(torch.equal(linear(z[:, s:s + n].contiguous()), full[:, s:s + n]) for s in range(0, L, n)):
            return False
    q, k, v = (torch.randn(2, rows, DIM // 128, 128, generator=gen) for rows in (L, 512, 512))
    full = attn_mod.sdpa_attention(q, k, v)
    return all(torch.equal(attn_mod.sdpa_attention(q[:, s:s + n], k, v), full[:, s:s + n]) for s in range(0, L, n))


@pytest.mark.parametrize("kind", ["ti2v", "random"])
@torch.inference_mode()
def test_chunked_block_is_identical(kind: str) -> None:
    state = tiny_state(48, 48, seed=6)
    model = ours(state)
    x, ctx = latent(2, 48), context(2)
    t = ti2v_timesteps(2, 300.0) if kind == "ti2v" else torch.rand(2, L, generator=torch.Generator().manual_seed(1))
    plain = model(x, t, ctx)
    exact = []
    # Chunks of 4 and 5 tokens: [4, 8) and [5, 10) straddle the end of the frame-0 run (token 6).
    for n in (4, 5, 6, 8):
        for block in model.blocks:
            block.chunk_tokens = n
        chunked = model(x, t, ctx)
        # The chunking itself is exact; only kernels may round differently for fewer rows.
        assert rel_err(chunked, plain) < 1e-6, n
        if chunks_exact_here(model, n):
            assert torch.equal(chunked, plain), n
            exact.append(n)
    print(f"chunked == plain bit for bit for chunk sizes {exact}")


@torch.inference_mode()
def test_block_updates_fp32_residual_in_place() -> None:
    model = ours(tiny_state(16, 16))
    block = model.blocks[1]
    x = torch.randn(2, L, DIM)
    e0 = torch.randn(1, 6, DIM) * 0.1
    args = (model.text_embedding(context(2)), e0, [(0, L, torch.tensor([0, 0]))], model._rope((3, 2, 3), x.device))
    want = block(x.clone(), *args)
    assert block(x, *args) is x and torch.equal(x, want)
    x16 = torch.randn(2, L, DIM).bfloat16()
    out = block(x16, *args)
    assert out.dtype == torch.float32 and out is not x16


# ------------------------------------------------------------------------- loading
def test_written_checkpoint_loads_identically(tmp_path) -> None:
    state = write_dit(tmp_path, in_dim=36, out_dim=16, dim=DIM, ffn_dim=FFN, num_layers=3, model_type="i2v",
                      seed=7, shards=2, text_dim=TEXT_DIM)
    config = json.loads((tmp_path / "config.json").read_text())
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert config["model_type"] == "i2v" and config["num_heads"] == 2
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in state.values())
    shards = sorted(tmp_path.glob("diffusion_pytorch_model-*-of-00002.safetensors"))
    assert len(shards) == 2

    source = SafetensorsSource(shards)
    cfg = WanDiTConfig.from_shapes(source.shapes())
    assert cfg == WanDiTConfig(dim=DIM, ffn_dim=FFN, num_heads=2, num_layers=3, in_dim=36, out_dim=16,
                               text_dim=TEXT_DIM, freq_dim=256)
    from_file = build_dit(source, torch.float32)
    assert set(from_file.state_dict()) == set(state) and len(state) == 27 * 3 + 15
    in_memory = WanDiT(cfg)
    in_memory.load_state_dict(state)
    x, y, ctx, t = latent(1, 16), latent(1, 20, seed=3), context(1), torch.tensor([900])
    with torch.inference_mode():
        assert torch.equal(from_file(x, t, ctx, y=y), in_memory(x, t, ctx, y=y))


def test_bf16_model_stays_close_to_fp32() -> None:
    state = tiny_state(48, 48, seed=8)
    fp32, bf16 = ours(state), ours(state, torch.bfloat16)
    assert bf16.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert bf16.patch_embedding.weight.dtype == torch.bfloat16
    assert bf16.blocks[1].modulation.dtype == torch.float32 and bf16.head.modulation.dtype == torch.float32
    x, ctx, t = latent(2, 48), context(2), ti2v_timesteps(2, 700.0)
    with torch.inference_mode():
        want, got = fp32(x, t, ctx), bf16(x, t, ctx)
    err = rel_err(got, want)
    print(f"bf16 vs fp32 rel err {err:.2e}")
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert 1e-4 < err < 3e-2  # bf16 rounding visible, but small


def test_wrong_shape_names_key_and_shapes() -> None:
    state = tiny_state(16, 16)
    state["blocks.1.self_attn.k.weight"] = torch.zeros(DIM, DIM + 128)
    with pytest.raises(CheckpointError) as info:
        ours(state)
    msg = str(info.value)
    assert "blocks.1.self_attn.k.weight" in msg and str([DIM, DIM + 128]) in msg and str([DIM, DIM]) in msg


def test_from_shapes_rejects_non_dit() -> None:
    with pytest.raises(CheckpointError, match="head.modulation"):
        WanDiTConfig.from_shapes({"encoder.conv1.weight": (96, 3, 3, 3, 3)})
    shapes = official_dit_shapes(in_dim=16, out_dim=16, dim=DIM, ffn_dim=FFN, num_layers=1)
    shapes["head.modulation"] = (1, 2, 200)
    with pytest.raises(CheckpointError, match="multiple"):
        WanDiTConfig.from_shapes(shapes)


def test_input_errors() -> None:
    model = ours(tiny_state(16, 16))
    with pytest.raises(InputError, match="16 input channels"):
        model(latent(1, 48), torch.tensor([1]), context(1))
    with pytest.raises(InputError, match="Text context"):
        model(latent(1, 16), torch.tensor([1]), torch.zeros(1, 512, 4096))


def test_declared_patterns() -> None:
    names = set(ours(tiny_state(16, 16)).state_dict())
    keep = {n for n in names if name_matches(n, WanDiT.keep_fp32_patterns)}
    assert keep == {"head.modulation", *(f"blocks.{i}.modulation" for i in range(LAYERS))}
    never = {n for n in names if name_matches(n, WanDiT.no_quantize_patterns)}
    assert "blocks.0.ffn.0.weight" not in never and "blocks.0.self_attn.q.weight" not in never
    assert {"time_projection.1.weight", "head.head.weight", "patch_embedding.weight", "text_embedding.0.weight",
            "blocks.0.norm3.weight", "blocks.0.self_attn.norm_q.weight"} <= never


# ------------------------------------------------------------------------- attention backend switch
def test_sdpa_attention_is_softmax_attention() -> None:
    q, k, v = (torch.randn(1, 5, 2, 128, generator=torch.Generator().manual_seed(i)) for i in range(3))
    ref = torch.softmax(q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) / math.sqrt(128), -1)
    ref = (ref @ v.transpose(1, 2)).transpose(1, 2)
    assert torch.allclose(attn_mod.sdpa_attention(q, k, v), ref, atol=1e-5)


@torch.inference_mode()
def test_attention_kernel_belongs_to_each_model() -> None:
    """Two DiTs in one process run two kernels: each model's blocks call the kernel it was given
    (self- and cross-attention), the other model keeps SDPA, and the outputs stay the same."""
    state = tiny_state(48, 48, seed=3)
    spied, plain = (build_dit(DictSource(state), torch.float32) for _ in range(2))
    x, ctx, t = latent(1, 48), context(1), torch.tensor([500.0])
    ref = plain(x, t, ctx)
    calls: list[tuple[int, ...]] = []

    def spy(q, k, v):
        calls.append(tuple(k.shape))
        return attn_mod.sdpa_attention(q, k, v)

    spied.set_attention(spy)
    assert torch.equal(spied(x, t, ctx), ref)
    n = len(spied.blocks)
    assert len(calls) == 2 * n and sum(s[1] == 512 for s in calls) == n  # n cross-attentions over the text
    calls.clear()
    assert torch.equal(plain(x, t, ctx), ref) and calls == []  # the other model never calls it


# ------------------------------------------------------------------------- GPU: the reference's bf16 run
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["scalar", "ti2v"])
@torch.inference_mode()
def test_bf16_matches_reference_autocast_run_on_gpu(kind: str) -> None:
    """A bf16 model (no autocast) against the official order of casts run under CUDA autocast(bf16)
    with bf16 weights (the reference's --convert_model_dtype run)."""
    dev = torch.device("cuda")
    state = tiny_state(48, 48, seed=10)
    sd16 = {k: v.to(dev, torch.bfloat16) for k, v in state.items()}
    sd32 = {k: v.to(dev) for k, v in state.items()}
    t = (ti2v_timesteps(2, 700.0) if kind == "ti2v" else torch.tensor([700.0, 700.0])).to(dev)
    x, ctx = latent(2, 48).to(dev), context(2).to(dev)
    got = build_dit(DictSource(sd16), torch.bfloat16, keep_fp32=False)(x, t, ctx.bfloat16())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        literal = naive_forward(sd16, x, t, ctx.bfloat16())
        same_rows = naive_forward(sd16, x, t, ctx.bfloat16(), distinct_time_rows=True)
    ideal = naive_forward(sd32, x, t, ctx)
    got32 = build_dit(DictSource(sd32), torch.float32)(x, t, ctx)
    err, gap, err32 = rel_err(got, literal), rel_err(literal, ideal), rel_err(got32, ideal)
    print(f"gpu: bf16 vs reference bf16 run {err:.2e} (bf16 vs fp32 gap {gap:.2e}); fp32 vs reference {err32:.2e}")
    assert got.device.type == "cuda" and got.dtype == torch.float32
    # Every cast matches the reference; what differs is RoPE done in fp32 rather than float64 for a
    # bf16 model (error ~1e-7 before the bf16 rounding), so a rare q/k element rounds the other way.
    assert rel_err(got, same_rows) < gap / 10
    # ... and otherwise off only by fp32 matmul rounding in e0, amplified by later bf16 roundings.
    assert err < gap / 4
    assert err32 < 1e-5


def test_static_fp8_scales_bound_q_and_k() -> None:
    """`fp8_qk_scales` bounds every value the RMSNorm + RoPE kernel can write, so its e4m3 output
    is always finite (a token with all its energy in one channel reaches sqrt(D) * |w|), and the
    e4m3 q and k equal the bf16 ones to e4m3 precision."""
    import wan_lite.models.dit as dit
    import wan_lite.models.dit_ops as ops

    torch.manual_seed(0)
    sa = dit.WanSelfAttention(DIM, DIM // 128, 1e-6)
    sa.norm_q.weight.data = (torch.randn(DIM) * 2).to(torch.bfloat16)
    sa.norm_k.weight.data = torch.rand(DIM).to(torch.bfloat16)
    y = torch.randn(1, 40, DIM).to(torch.bfloat16)
    top = sa.norm_q.weight.float().abs().argmax().item()
    y[0, 0] = 0
    y[0, 0, top] = 1000.0  # all the energy in the channel of the largest weight: |n| = sqrt(D)
    y[0, 1] *= 1e-3
    angles = torch.rand(40, 64, dtype=torch.float64) * 6
    mults, descales = sa.fp8_qk_scales()
    assert mults.shape == (2, DIM) and descales.shape == (2, DIM // 128)
    torch.testing.assert_close(mults[:, ::128].reciprocal(), descales)
    for row, norm in enumerate((sa.norm_q, sa.norm_k)):
        out8 = torch.empty(y.shape, dtype=torch.float8_e4m3fn)
        ops.rms_norm_rope_fp8_into_fn(out8, y, norm.weight, norm.eps, angles.cos(), angles.sin(), mults[row])
        assert torch.isfinite(out8.float()).all()
        out16 = torch.empty(y.shape, dtype=torch.bfloat16)
        ops.rms_norm_rope_into_fn(out16, y, norm.weight, norm.eps, angles.cos(), angles.sin())
        deq = out8.float() / mults[row]
        assert rel_err(deq, out16.float()) < 0.04
        if row == 0:  # the one-hot token lands near the top of e4m3's range, not past it
            assert 300 < out8[0, 0].float().abs().max() <= 448


def test_modulated_fp8_scale_bounds_every_value() -> None:
    """The e4m3 form of the modulated LayerNorm (the fp8 GEMMs' input) stays finite for a token
    with all its energy in the channel of the largest modulation, and equals the bf16 form to e4m3
    precision."""
    import wan_lite.models.dit_ops as ops

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 30, DIM, generator=gen)
    shift, scale = torch.randn(2, 1, DIM, generator=gen) * 0.5, torch.randn(2, 1, DIM, generator=gen) * 3
    scale[0, 0, 3] = 50.0
    x[0, 0] = 0
    x[0, 0, 3] = 1.0e4  # |n| = sqrt(D - 1) in the channel scaled by 51
    mult = ops.modulated_multiplier(shift, scale)
    assert mult.shape == (2, 1, 1)
    out8 = torch.empty(x.shape, dtype=torch.float8_e4m3fn)
    ops.norm_modulate_fp8_into_fn(out8, x, shift, scale, 1e-6, mult)
    assert torch.isfinite(out8.float()).all() and 300 < out8[0, 0].float().abs().max() <= 448
    out16 = torch.empty(x.shape, dtype=torch.bfloat16)
    ops.norm_modulate_into_fn(out16, x, shift, scale, 1e-6)
    assert rel_err(out8.float() / mult, out16.float()) < 0.04


def test_affine_layer_norm_fp8_scale_bounds_every_value() -> None:
    """norm3's e4m3 form (the cross-attention q's input) is finite for a one-hot token in the
    channel of the largest weight and equals the bf16 form to e4m3 precision."""
    import wan_lite.models.dit_ops as ops

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 30, DIM, generator=gen)
    w, b = torch.randn(DIM, generator=gen) * 2, torch.randn(DIM, generator=gen) * 0.1
    top = w.abs().argmax().item()
    x[0, 0] = 0
    x[0, 0, top] = 1.0e4
    mult = ops.affine_multiplier(w, b)
    out8 = ops.layer_norm_fp8_fn(x, w, b, 1e-6, mult)
    assert out8.dtype == torch.float8_e4m3fn
    assert torch.isfinite(out8.float()).all() and 300 < out8[0, 0].float().abs().max() <= 448
    ref = ops.layer_norm_fn(x, w, b, 1e-6, torch.bfloat16)
    assert rel_err(out8.float() / mult, ref.float()) < 0.04
