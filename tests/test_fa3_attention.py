"""FlashAttention-3 (wan_lite/runtime/fa3_attention.py) and its part in the start-up choice of the
attention kernel (wan_lite/runtime/attention_select.py).

Without CUDA only the quantization, the plumbing against a stand-in `flash_attn_func` and the
choice (stubbed checks and timings) run; the GPU tests need a Hopper GPU and `fa3-fwd` installed.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from tests.test_fp8_attention import _qkv, _rel_l2
from wan_lite.models import attention as attn_mod
from wan_lite.runtime import attention_select as sel
from wan_lite.runtime import fa3_attention as fa3

# ------------------------------------------------------------------------------ CPU


def test_unavailable_without_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fa3.fa3_backend() is None and fa3.fa3_backend(fp8=True) is None
    assert "CUDA GPU" in fa3.fa3_unavailable_reason()
    assert not fa3.is_hopper("cuda")


def test_only_hopper_and_an_installed_build(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 9))
    assert "Hopper" in fa3.fa3_unavailable_reason("cuda") and "8.9" in fa3.fa3_unavailable_reason("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(fa3, "_loaded", {})
    for name in fa3.MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ModuleNotFoundError
    assert fa3.fa3_unavailable_reason("cuda") == "it is not installed (optional: pip install fa3-fwd)"
    broken = types.ModuleType("fa3_fwd_interface")  # installed, but not the API we call
    monkeypatch.setitem(sys.modules, "fa3_fwd_interface", broken)
    assert "does not load" in fa3.fa3_unavailable_reason("cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_per_head_quantization_round_trips(dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 4, 128, generator=gen)
    x = (x * torch.tensor([0.01, 1.0, 30.0, 500.0]).view(1, 1, 4, 1)).to(dtype)  # heads of very different size
    x8, descale = fa3._quantize_heads_eager(x)
    assert x8.dtype == torch.float8_e4m3fn and x8.shape == x.shape
    assert descale.shape == (2, 4) and descale.dtype == torch.float32
    amax = x.float().abs().amax(dim=(1, 3))
    torch.testing.assert_close(descale, amax / 448, rtol=2**-8, atol=0)
    assert (x8.float().abs().amax(dim=(1, 3)) == 448.0).all()  # every head uses the whole e4m3 range
    back = x8.float() * descale[:, None, :, None]
    err = (back - x.float()).abs()
    bound = x.float().abs() * (2**-4 + 2**-8) + descale[:, None, :, None] * 2**-10
    assert (err <= bound).all()
    # each head's scale is its own: scaling one head leaves the others' codes alone
    y = x.clone()
    y[:, :, 3] *= 4
    y8, _ = fa3._quantize_heads_eager(y)
    assert torch.equal(y8[:, :, :3].view(torch.uint8), x8[:, :, :3].view(torch.uint8))


def test_zero_heads_quantize_to_zeros() -> None:
    x8, descale = fa3._quantize_heads_eager(torch.zeros(1, 5, 2, 128, dtype=torch.bfloat16))
    assert not x8.float().any() and torch.isfinite(descale).all()


def _stand_in_flash_attn_func(q, k, v, softmax_scale=None, causal=False, q_descale=None, k_descale=None,
                              v_descale=None):
    """Plays FlashAttention-3: [B, L, H, D]; fp8 inputs are multiplied by their [B, H] descales
    (its documented contract), the result is bf16 for fp8 inputs, q's dtype otherwise."""
    assert not causal and softmax_scale is None

    def real(t, descale):
        t = t.float()
        return t if descale is None else t * descale[:, None, :, None]

    qf, kf, vf = real(q, q_descale), real(k, k_descale), real(v, v_descale)
    out = torch.nn.functional.scaled_dot_product_attention(qf.transpose(1, 2), kf.transpose(1, 2),
                                                           vf.transpose(1, 2)).transpose(1, 2)
    return out.to(torch.bfloat16 if q.dtype == torch.float8_e4m3fn else q.dtype)


@pytest.fixture
def stand_in(monkeypatch):
    """FlashAttention-3 'installed' as the stand-in, on a 'Hopper' that takes CPU tensors."""
    module = types.ModuleType("fa3_fwd_interface")
    module.flash_attn_func = _stand_in_flash_attn_func
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    monkeypatch.setitem(sys.modules, "fa3_fwd_interface", module)
    monkeypatch.setattr(fa3, "_loaded", {})
    monkeypatch.setattr(fa3, "fa3_unavailable_reason", lambda device=None: None)
    monkeypatch.setattr(fa3, "_refusal", lambda q, k, v: None if q.dtype == torch.bfloat16 else "not bf16")
    monkeypatch.setattr(fa3, "_FAILED", {})
    return module


def test_fp8_plumbing_against_a_stand_in(stand_in) -> None:
    """The descales reach the kernel in its [batch, heads] layout: per-head scales that differ by
    10^4 still give SDPA's result within fp8 rounding (a mix-up of heads or batch entries would not)."""
    gen = torch.Generator().manual_seed(1)
    scale = torch.tensor([0.01, 1.0, 100.0]).view(1, 1, 3, 1)  # q small where k is large: ordinary logits
    q, k, v = (torch.randn(2, n, 3, 128, generator=gen) for n in (300, 5000, 5000))
    q, k, v = (q * scale).to(torch.bfloat16), (k / scale).to(torch.bfloat16), (v * scale).to(torch.bfloat16)
    v[1] *= 7  # batch entries of different size too
    ref = attn_mod.sdpa_attention(q, k, v)
    out = fa3.fa3_backend(fp8=True)(q, k, v)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    err = _rel_l2(out, ref)
    assert 1e-4 < err < sel.FP8_TOLERANCE, err
    bf16 = fa3.fa3_backend()(q, k, v)
    assert _rel_l2(bf16, ref) < 1e-2


def _static_fp8(x: torch.Tensor, loose: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, L, H, D] in e4m3 with a per-(batch, head) scale `loose` times above its max-abs, as
    the DiT's bound-based q and k scales are (`WanSelfAttention.fp8_qk_scales`)."""
    mult = 448.0 / (x.float().abs().amax(dim=(1, 3)) * loose)  # [B, H]
    return (x.float() * mult[:, None, :, None]).to(torch.float8_e4m3fn), mult.reciprocal()


def test_fp8_qk_entry_against_a_stand_in(stand_in, monkeypatch, caplog) -> None:
    """The fp8 kernel's entry for q and k already in e4m3 (scales 20x looser than their max, as
    the DiT's bounds): SDPA's result within fp8 rounding, only v quantized here; inputs it does not
    take, and a kernel that fails, run SDPA on the dequantized q and k."""
    monkeypatch.setattr(fa3, "_qk8_refusal", lambda q8, k8, v, dq, dk: None if v.dtype == torch.bfloat16 else "v")
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, n, 3, 128, generator=gen).to(torch.bfloat16) for n in (300, 5000, 5000))
    ref = attn_mod.sdpa_attention(q, k, v)
    (q8, dq), (k8, dk) = _static_fp8(q, 20.0), _static_fp8(k, 20.0)
    fn = fa3.fa3_backend(fp8=True)
    assert fa3.fa3_backend().__dict__.get("fp8_qk") is None  # the bf16 kernel has no such entry
    out = fn.fp8_qk(q8, k8, v, dq, dk)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    err = _rel_l2(out, ref)
    assert 1e-4 < err < sel.FP8_TOLERANCE, err
    assert err < 1.2 * _rel_l2(fn(q, k, v), ref) + 1e-3  # as precise as quantizing q and k by their max
    v32 = v.float()  # not taken: SDPA on the dequantized q and k
    want = attn_mod.sdpa_attention(attn_mod.dequantize_heads(q8, dq, v32.dtype),
                                   attn_mod.dequantize_heads(k8, dk, v32.dtype), v32)
    assert torch.equal(fn.fp8_qk(q8, k8, v32, dq, dk), want)
    with pytest.raises(ValueError, match="does not take"):
        fa3.fa3_backend(fp8=True, strict=True).fp8_qk(q8, k8, v32, dq, dk)

    def broken(*a, **kw):
        raise RuntimeError("FlashAttention only supports ... this shape")

    monkeypatch.setattr(stand_in, "flash_attn_func", broken)
    monkeypatch.setattr(fa3, "_loaded", {})
    fn = fa3.fa3_backend(fp8=True)
    want = attn_mod.sdpa_attention(attn_mod.dequantize_heads(q8, dq, v.dtype),
                                   attn_mod.dequantize_heads(k8, dk, v.dtype), v)
    with caplog.at_level("INFO", logger="wan_lite.runtime.fa3_attention"):
        assert torch.equal(fn.fp8_qk(q8, k8, v, dq, dk), want)
        assert torch.equal(fn.fp8_qk(q8, k8, v, dq, dk), want)
    assert caplog.text.count("This shape runs PyTorch SDPA from now on") == 1


def test_qk8_refusals() -> None:
    q8 = torch.zeros(1, 10, 2, 128, dtype=torch.float8_e4m3fn)
    v = torch.zeros(1, 10, 2, 128, dtype=torch.bfloat16)
    d = torch.ones(1, 2)
    assert "not float8_e4m3fn" in fa3._qk8_refusal(v, q8, v, d, d)
    assert "bfloat16 only" in fa3._qk8_refusal(q8, q8, v.float(), d, d)
    assert "CUDA" in fa3._qk8_refusal(q8, q8, v, d, d)  # these are CPU tensors


def test_dit_hands_fp8_q_and_k_to_a_kernel_that_takes_them(stand_in, monkeypatch) -> None:
    """With an fp8 kernel that `takes_fp8_qk`, the DiT's RoPE kernel writes q and k in e4m3 with
    the static per-head scales, unchunked and in token chunks, TI2V's two timestep runs included;
    the forward stays within fp8 error of SDPA's."""
    from tests.test_dit import context, latent, rel_err, ti2v_timesteps, tiny_state
    from wan_lite.loading.build import build_dit
    from wan_lite.loading.tensors import DictSource

    monkeypatch.setattr(fa3, "_qk8_refusal", lambda q8, k8, v, dq, dk: None)
    model = build_dit(DictSource(tiny_state(48, 48, seed=5)), torch.bfloat16)
    x, ctx, t = latent(2, 48), context(2), ti2v_timesteps(2, 700.0)
    with torch.inference_mode():
        ref = model(x, t, ctx)
    kernel = fa3.fa3_backend(fp8=True)
    seen = []

    def qk8(q8, k8, v, dq, dk):
        seen.append((q8.dtype, k8.dtype, tuple(dq.shape)))
        return kernel.fp8_qk(q8, k8, v, dq, dk)

    kernel_fn = lambda q, k, v: kernel(q, k, v)  # noqa: E731
    kernel_fn.fp8_qk = qk8
    model.set_attention(kernel_fn)
    try:
        assert attn_mod.takes_fp8_qk(kernel_fn)
        with torch.inference_mode():
            out = model(x, t, ctx)
            for block in model.blocks:
                block.chunk_tokens = 5
            chunked = model(x, t, ctx)
    finally:
        model.set_attention(attn_mod.sdpa_attention)
        for block in model.blocks:
            block.chunk_tokens = None
    assert not attn_mod.takes_fp8_qk(attn_mod.sdpa_attention)
    assert seen == [(torch.float8_e4m3fn, torch.float8_e4m3fn, (2, 2))] * (2 * len(model.blocks))
    err = rel_err(out, ref)
    assert 1e-4 < err < 0.05, err
    assert rel_err(chunked, out) < 1e-2


def test_short_keys_and_other_inputs_run_sdpa(stand_in, monkeypatch, caplog) -> None:
    calls = []
    real = stand_in.flash_attn_func
    monkeypatch.setattr(stand_in, "flash_attn_func", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = (torch.randn(1, n, 2, 128).to(torch.bfloat16) for n in (64, 512, 512))
    fn = fa3.fa3_backend(fp8=True)
    assert torch.equal(fn(q, k, v), attn_mod.sdpa_attention(q, k, v)) and not calls  # text cross-attention
    fa3.fa3_backend(fp8=True, strict=True)(q, k, v)
    assert calls  # strict: the kernel itself
    q32 = q.float()
    assert torch.equal(fn(q32, k.float(), v.float()), attn_mod.sdpa_attention(q32, k.float(), v.float()))
    with pytest.raises(ValueError, match="does not take"):
        fa3.fa3_backend(strict=True)(q32, k.float(), v.float())

    def broken(*a, **kw):
        raise RuntimeError("FlashAttention only supports ... this shape")

    monkeypatch.setattr(stand_in, "flash_attn_func", broken)
    monkeypatch.setattr(fa3, "_loaded", {})
    fn = fa3.fa3_backend()
    with caplog.at_level("INFO", logger="wan_lite.runtime.fa3_attention"):
        assert torch.equal(fn(q, k, v), attn_mod.sdpa_attention(q, k, v))
        assert torch.equal(fn(q, k, v), attn_mod.sdpa_attention(q, k, v))
    assert caplog.text.count("This shape runs PyTorch SDPA from now on") == 1


def test_fa3_is_chosen_when_fastest(monkeypatch) -> None:
    """bf16: the fastest of SageAttention and FlashAttention-3 that beats SDPA; fp8: the fastest of
    cuDNN's and FlashAttention-3's. Kernels, checks and timings are stubbed: no GPU needed."""
    def kernel(q, k, v):
        return attn_mod.sdpa_attention(q, k, v)

    sage_module = types.ModuleType("sageattention")
    sage_module.sageattn = lambda q, k, v, tensor_layout="NHD", is_causal=False: kernel(q, k, v)
    monkeypatch.setitem(sys.modules, "sageattention", sage_module)
    monkeypatch.setattr(sel, "is_hopper", lambda dev: True)
    monkeypatch.setattr(sel, "fa3_unavailable_reason", lambda dev=None: None)
    fa3_kernels = {}

    def fa3_backend(fp8=False, strict=False):
        fa3_kernels.setdefault((fp8, strict), lambda q, k, v: kernel(q, k, v))
        return fa3_kernels[(fp8, strict)]

    monkeypatch.setattr(sel, "fa3_backend", fa3_backend)
    monkeypatch.setattr(sel, "cudnn_fp8_unavailable_reason", lambda dev=None: None)
    cudnn_kernel = lambda q, k, v: kernel(q, k, v)  # noqa: E731
    monkeypatch.setattr(sel, "cudnn_fp8_backend", lambda strict=False: cudnn_kernel)
    monkeypatch.setattr(sel, "self_check", lambda fn, dev, tolerance=sel.TOLERANCE: (True, 0.01, "passed"))
    times, shapes = {}, set()

    def speed(fn, dev, shape=None):
        shapes.add(shape)
        for (fp8, strict), f in fa3_kernels.items():
            if f is fn:
                return times["fa3-fp8" if fp8 else "fa3"], 15.0
        return times["cudnn-fp8" if fn is cudnn_kernel else "sage"], 15.0

    monkeypatch.setattr(sel, "compare_speed", speed)
    cuda = torch.device("cuda")
    times.update({"sage": 12.0, "fa3": 10.0, "cudnn-fp8": 11.0, "fa3-fp8": 8.0})
    choice = sel.select_attention(cuda)
    assert choice.backend == "fa3"
    assert choice.note.startswith("Attention: FlashAttention-3 (1.50x the speed of SDPA")
    assert sel.select_fp8_attention(cuda).backend == "fa3-fp8"
    assert shapes == {sel._DIT_SPEED_SHAPE}  # on Hopper every kernel is timed at the DiT's scale
    times.update({"sage": 9.0, "cudnn-fp8": 7.0})
    assert sel.select_attention(cuda).backend == "sage"
    assert sel.select_fp8_attention(cuda).backend == "cudnn-fp8"
    times.update({"sage": 15.0, "fa3": 15.0, "cudnn-fp8": 15.0, "fa3-fp8": 15.0})
    none = sel.select_fp8_attention(cuda)
    assert none.backend == "sdpa" and "FlashAttention-3 fp8 is not used: SDPA is about as fast" in none.note
    assert "Attention: PyTorch SDPA - SDPA is about as fast or faster than the installed SageAttention" in none.note
    monkeypatch.setattr(sel, "fa3_unavailable_reason", lambda dev=None: "it is not installed (optional: pip install fa3-fwd)")
    absent = sel.select_attention(cuda)
    assert absent.backend == "sdpa" and "FlashAttention-3 is not installed (optional: pip install fa3-fwd)" in absent.note


# ------------------------------------------------------------------------------ GPU


@pytest.fixture
def kernels():
    if fa3.fa3_unavailable_reason() is not None:
        pytest.skip(f"FlashAttention-3: {fa3.fa3_unavailable_reason()}")
    return {"bf16": fa3.fa3_backend(strict=True), "fp8": fa3.fa3_backend(fp8=True, strict=True)}


@pytest.mark.gpu
@pytest.mark.parametrize("lk", [1000, 512], ids=["self", "cross"])
@pytest.mark.parametrize("kind", ["bf16", "fp8"])
def test_cuda_fa3_matches_sdpa(kernels, kind, lk) -> None:
    q, k, v = _qkv(1000, lk)
    with torch.no_grad():
        out = kernels[kind](q, k, v)
        ref = attn_mod.sdpa_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    err = _rel_l2(out, ref)
    if kind == "bf16":
        assert err < 1e-2, err
    else:
        assert 1e-4 < err < sel.FP8_TOLERANCE, err


@pytest.mark.gpu
def test_cuda_fa3_fp8_qk_entry(kernels) -> None:
    """q and k handed over in e4m3 with loose static scales (the DiT's way): SDPA's result within
    fp8 rounding, as precise as the entry that quantizes q and k by their own max."""
    q, k, v = _qkv(1000, 1000)
    (q8, dq), (k8, dk) = _static_fp8(q, 20.0), _static_fp8(k, 20.0)
    with torch.no_grad():
        out = kernels["fp8"].fp8_qk(q8, k8, v, dq, dk)
        ref = attn_mod.sdpa_attention(q, k, v)
        full = kernels["fp8"](q, k, v)
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    err = _rel_l2(out, ref)
    assert 1e-4 < err < sel.FP8_TOLERANCE, err
    assert err < 1.2 * _rel_l2(full, ref) + 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["bf16", "fp8"])
def test_cuda_fa3_layout(kernels, kind) -> None:
    """[B, L, H, D] in and out; swapped heads or batch entries swap in the output; a strided q (a
    slice of a fused qkv tensor) gives the contiguous result."""
    fn = kernels[kind]
    q, k, v = _qkv(300, 300)
    with torch.no_grad():
        out = fn(q, k, v)
        heads = [1, 0, 2, 3]
        swapped = fn(q[:, :, heads], k[:, :, heads], v[:, :, heads])
        batch = fn(q.flip(0), k.flip(0), v.flip(0))
        fused = torch.stack([q, k, v], dim=2)
        strided = fn(fused[:, :, 0], fused[:, :, 1], fused[:, :, 2])
    assert out.shape == q.shape
    assert _rel_l2(swapped, out[:, :, heads]) < 1e-3
    assert _rel_l2(batch, out.flip(0)) < 1e-3
    assert _rel_l2(strided, out) < 1e-3


@pytest.mark.gpu
def test_cuda_attention_choices_run() -> None:
    """Whatever the GPU picks, in bf16 and fp8 plans, computes attention."""
    q, k, v = _qkv(777, 5000, batch=1)
    for pick, limit in ((sel.select_attention, 0.05), (sel.select_fp8_attention, sel.FP8_TOLERANCE)):
        choice = pick("cuda")
        with torch.no_grad():
            err = _rel_l2(choice.fn(q, k, v), attn_mod.sdpa_attention(q, k, v))
        assert err < limit, (choice.note, err)
