"""The single-kernel forms of the DiT's elementwise steps (models/fused.py, CUDA) against their eager
forms: compiled here on the CPU too, so a form that torch.compile cannot take whole, or that
writes the wrong memory, fails without a GPU."""

from __future__ import annotations

import logging

import pytest
import torch

import wan_lite.models.dit_ops as ops
from wan_lite.models import fused
from wan_lite.models.fused import Fused

B, L, D, HALF = 2, 37, 256, 64  # 2 heads of 128 channels; a token count no kernel tile divides


def _args(name: str) -> tuple:
    """Fresh arguments for one form; the first is the tensor it writes (where it writes one)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    bf = torch.bfloat16
    angles = torch.rand(L, HALF, generator=g, dtype=torch.float64) * 6
    return {
        "norm_modulate_into": (torch.empty(B, L, D, dtype=bf), r(B, L, D, dtype=bf), r(B, 1, D), r(B, 1, D), 1e-6),
        "norm_modulate_into_fp32": (torch.empty(B, L, D), r(B, L, D), r(B, 1, D), r(B, 1, D), 1e-6),
        "add_norm_modulate_into": (torch.empty(B, L, D, dtype=bf), r(B, L, D), r(B, L, D, dtype=bf), r(B, 1, D),
                                   r(B, 1, D), 1e-6),
        "norm_modulate_fp8_into": (torch.empty(B, L, D, dtype=torch.float8_e4m3fn), r(B, L, D), r(B, 1, D),
                                   r(B, 1, D), 1e-6, r(B, 1, 1).abs() * 20),
        "add_norm_modulate_fp8_into": (torch.empty(B, L, D, dtype=torch.float8_e4m3fn), r(B, L, D),
                                       r(B, L, D, dtype=bf), r(B, 1, D), r(B, 1, D), 1e-6, r(B, 1, 1).abs() * 20),
        "gated_add_inplace": (r(B, L, D), r(B, L, D, dtype=bf), r(B, 1, D)),
        "gated_add_into": (torch.empty(B, L, D), r(B, L, D, dtype=bf), r(B, L, D, dtype=bf), r(B, 1, D)),
        "rms_norm_rope_into": (torch.empty(B, L, D, dtype=bf), r(B, L, D, dtype=bf), r(D, dtype=bf), 1e-6,
                               angles.cos(), angles.sin()),
        "rms_norm_rope_fp8_into": (torch.empty(B, L, D, dtype=torch.float8_e4m3fn), r(B, L, D, dtype=bf),
                                   r(D, dtype=bf), 1e-6, angles.cos(), angles.sin(), r(D).abs() * 20),
        "rms_norm": (r(B, L, D, dtype=bf), r(D, dtype=bf), 1e-6),
        "layer_norm": (r(B, L, D, dtype=bf), r(D), r(D), 1e-6, bf),
        "layer_norm_fp32_in": (r(B, L, D), r(D), r(D), 1e-6, bf),  # the block's norm3: fp32 residual in
        "layer_norm_fp8": (r(B, L, D), r(D), r(D), 1e-6, torch.tensor(20.0)),
    }[name]


FORMS = {
    "norm_modulate_into": ops.norm_modulate_into_fn,
    "norm_modulate_into_fp32": ops.norm_modulate_into_fn,
    "add_norm_modulate_into": ops.add_norm_modulate_into_fn,
    "norm_modulate_fp8_into": ops.norm_modulate_fp8_into_fn,
    "add_norm_modulate_fp8_into": ops.add_norm_modulate_fp8_into_fn,
    "gated_add_inplace": ops.gated_add_inplace_fn,
    "gated_add_into": ops.gated_add_into_fn,
    "rms_norm_rope_into": ops.rms_norm_rope_into_fn,
    "rms_norm_rope_fp8_into": ops.rms_norm_rope_fp8_into_fn,
    "rms_norm": ops.rms_norm_fn,
    "layer_norm": ops.layer_norm_fn,
    "layer_norm_fp32_in": ops.layer_norm_fn,
    "layer_norm_fp8": ops.layer_norm_fp8_fn,
}


@torch.inference_mode()
def test_compiled_forms_match_eager() -> None:
    """Each form compiles whole (fullgraph, dynamic shapes, the casts kept) and gives the eager
    numbers, into the memory the eager form writes: also for a slice of a larger buffer."""
    for name, fn in FORMS.items():
        compiled = torch.compile(fn, dynamic=True, fullgraph=True, options={"emulate_precision_casts": True})
        want, got = _args(name), _args(name)
        r_want, r_got = fn(*want), compiled(*got)
        if r_want is None:  # writes its first argument
            r_want, r_got = want[0], got[0]
        assert r_got.dtype == r_want.dtype and r_got.shape == r_want.shape
        if r_want.dtype == torch.float32:
            torch.testing.assert_close(r_got, r_want, rtol=1e-5, atol=1e-5, msg=name)
        elif r_want.dtype == torch.float8_e4m3fn:  # a rare value one e4m3 step (1/8) away
            torch.testing.assert_close(r_got.float(), r_want.float(), rtol=2**-3, atol=2**-9, msg=name)
            assert (r_got.float() != r_want.float()).float().mean() < 0.01, name
        else:  # a statistic summed in another order may flip a rare result's last bf16 bit
            torch.testing.assert_close(r_got.float(), r_want.float(), rtol=2**-7, atol=1e-6, msg=name)
            assert (r_got != r_want).float().mean() < 0.01, name
        for a, b in zip(want[1:], got[1:], strict=True):  # inputs updated in place (residual adds) alike
            if isinstance(a, torch.Tensor):
                torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=f"{name}: an input")
    # slices of a bigger buffer (token chunks), compiled as Fused compiles: fixed shapes for the
    # first, then (a last chunk's other length) the token dimension dynamic; only the slices change
    compiled = torch.compile(ops.gated_add_inplace_fn, **fused.COMPILE)
    x, y, gate = _args("gated_add_inplace")
    whole, expect = x.clone(), x.clone()
    for s, e in ((0, 16), (16, 32), (32, L)):
        compiled(whole[:, s:e], y[:, s:e], gate)
        expect[:, s:e] += y[:, s:e] * gate
    torch.testing.assert_close(whole, expect, rtol=1e-6, atol=1e-6)


def test_fused_runs_eager_off_cuda(monkeypatch) -> None:
    def no_compile(*_a, **_k):
        raise AssertionError("torch.compile must not run for CPU tensors")

    monkeypatch.setattr(torch, "compile", no_compile)
    f = Fused(ops.rms_norm_fn)
    x, w, eps = _args("rms_norm")
    assert torch.equal(f(x, w, eps), ops.rms_norm_fn(x, w, eps))
    assert not f.failed


def test_int4_dequantization_off_cuda_runs_its_row_chunked_eager_form(monkeypatch) -> None:
    """Where it is not compiled, an int4 weight is dequantized a few rows at a time (`eager`), not
    with a float32 temporary of the whole matrix: the same numbers either way."""
    from wan_lite.runtime import int4, quant

    seen = []
    monkeypatch.setattr(int4, "_CHUNK_WEIGHTS", 2 * 128)  # two rows of 128 at a time
    monkeypatch.setattr(quant._fused_dequantize_int4, "eager",
                        lambda *a: seen.append(a[0].shape) or int4.dequantize_eager(*a))
    w = torch.randn(6, 128)
    packed, scale = int4.quantize(w)
    got = quant.dequantize_weight(packed, scale, "int4", torch.bfloat16, 128)
    assert seen == [packed.shape]
    assert torch.equal(got, int4.dequantize_rows(packed, scale, int4.pairs_table(w.device), torch.bfloat16))


@pytest.mark.gpu
def test_fused_falls_back_when_compile_fails(monkeypatch, caplog) -> None:
    def broken(*_a, **_k):
        raise RuntimeError("no Triton here")

    monkeypatch.setattr(torch, "compile", broken)
    f = Fused(ops.rms_norm_fn)
    x, w, eps = (a.cuda() if isinstance(a, torch.Tensor) else a for a in _args("rms_norm"))
    with caplog.at_level(logging.INFO, logger="wan_lite.models.fused"):
        out = f(x, w, eps)
    assert f.failed and "not fused" in caplog.text
    assert torch.equal(out, ops.rms_norm_fn(x, w, eps))


@pytest.mark.gpu
@torch.inference_mode()
def test_each_form_on_cuda_matches_eager() -> None:
    """The Triton kernels against the eager forms, on the GPU: fp32 results to float32 rounding,
    16-bit ones up to a rare last-bit flip (a reduction summed in another order)."""
    forms = {"norm_modulate_into": ops.norm_modulate_into, "norm_modulate_into_fp32": ops.norm_modulate_into,
             "add_norm_modulate_into": ops.add_norm_modulate_into,
             "norm_modulate_fp8_into": ops.norm_modulate_fp8_into,
             "add_norm_modulate_fp8_into": ops.add_norm_modulate_fp8_into,
             "gated_add_inplace": ops.gated_add_inplace, "gated_add_into": ops.gated_add_into,
             "rms_norm_rope_into": ops.rms_norm_rope_into, "rms_norm_rope_fp8_into": ops.rms_norm_rope_fp8_into,
             "rms_norm": ops.rms_norm,
             "layer_norm": ops.layer_norm, "layer_norm_fp32_in": ops.layer_norm,
             "layer_norm_fp8": ops.layer_norm_fp8}
    bad = []
    for name, form in forms.items():
        want = [a.cuda() if isinstance(a, torch.Tensor) else a for a in _args(name)]
        got = [a.cuda() if isinstance(a, torch.Tensor) else a for a in _args(name)]
        r_want, r_got = FORMS[name](*want), form(*got)
        if r_want is None:
            r_want, r_got = want[0], got[0]
        flips = (r_got.float() != r_want.float()).float().mean().item()
        diff = (r_got.float() - r_want.float()).abs().max().item()
        print(f"{name}: {flips:.2e} of the results differ, by at most {diff:.2e}")
        rtol = {torch.float32: 1e-5, torch.float8_e4m3fn: 2**-3}.get(r_want.dtype, 2**-7)
        close = torch.allclose(r_got.float(), r_want.float(), rtol=rtol, atol=1e-5)
        inputs = all(torch.allclose(b, a, rtol=1e-6, atol=1e-6) for a, b in zip(want[1:], got[1:], strict=True)
                     if isinstance(a, torch.Tensor))  # those updated in place (residual adds) alike
        if form.failed or not close or not inputs or (r_want.dtype != torch.float32 and flips >= 0.01):
            bad.append(name)
    assert not bad


@pytest.mark.gpu
@torch.inference_mode()
def test_fused_block_matches_eager_block_on_gpu() -> None:
    """A bf16 DiT on CUDA with the single-kernel forms and without: the same numbers up to the
    float32 rounding of fused multiply-adds, i.e. a rare bf16 rounding flip."""
    from tests.test_dit import context, latent, ti2v_timesteps, tiny_state
    from wan_lite.loading.build import build_dit
    from wan_lite.loading.tensors import DictSource

    state = {k: v.cuda() for k, v in tiny_state(48, 48, seed=4).items()}
    model = build_dit(DictSource(state), torch.bfloat16)
    x, ctx, t = latent(2, 48).cuda(), context(2).cuda(), ti2v_timesteps(2, 700.0).cuda()
    fused_out = model(x, t, ctx)
    old = fused.set_fusion(False)
    try:
        eager_out = model(x, t, ctx)
    finally:
        fused.set_fusion(old)
    forms = (ops.norm_modulate_into, ops.add_norm_modulate_into, ops.gated_add_inplace, ops.gated_add_into,
             ops.rms_norm, ops.rms_norm_rope_into, ops.layer_norm)
    assert not any(f.failed for f in forms), [f.__name__ for f in forms if f.failed]
    err = ((fused_out - eager_out).norm() / eager_out.norm()).item()
    print(f"fused vs eager bf16 DiT: rel L2 {err:.2e}")
    assert err < 2e-3


def test_a_kernel_switch_turns_off_after_a_failure_but_not_for_lack_of_memory(caplog) -> None:
    """The hand-written kernels' fallback (VAE norm, fp8 rows): a kernel that cannot build here is
    not tried again; running out of memory is the caller's to handle, and the kernel stays on."""
    switch = fused.KernelSwitch("test kernel", "eager form")
    assert switch.run(torch.add, torch.ones(2), 1).tolist() == [2.0, 2.0] and not switch.failed

    def oom() -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        switch.run(oom)
    assert not switch.failed

    def no_compiler() -> None:
        raise RuntimeError("Triton cannot compile here")

    with caplog.at_level(logging.INFO, logger="wan_lite.models.fused"):
        assert switch.run(no_compiler) is None
    assert switch.failed and "test kernel unavailable" in caplog.text
    assert switch.run(torch.add, torch.ones(2), 1) is None  # not tried again
