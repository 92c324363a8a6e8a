"""The hand-written fp8 row quantization (runtime/fp8_row_kernel.py) against the exact values and
the eager form it stands in for; on the CPU the eager form runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wan_lite.models.fused import set_fusion
from wan_lite.runtime import fp8_row_kernel, quant


def _exact(x: torch.Tensor, gelu: str | None) -> torch.Tensor:
    x = x.float()
    return x if gelu is None else F.gelu(x, approximate=gelu)


def _err(x8: torch.Tensor, scale: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x8.float() * scale - ref).norm() / ref.norm()).item()


def test_cpu_rows_run_the_eager_form() -> None:
    torch.manual_seed(0)
    x = torch.randn(40, 96, dtype=torch.bfloat16)
    assert not fp8_row_kernel.takes(x, "tanh")
    for gelu in (None, "tanh"):
        for got, want in zip(quant._quantize_rows(x, gelu), quant._quantize_rows_eager(x, gelu), strict=True):
            assert torch.equal(got.float(), want.float())


def _rows(k: int) -> torch.Tensor:
    """Random rows, one all zero, one with an outlier, one all negative (under a GELU: its bound)."""
    torch.manual_seed(k)
    x = torch.randn(700, k, device="cuda", dtype=torch.bfloat16) * 2
    x[3] = 0
    x[5, k // 2] = 300.0
    x[7] = -x[7].abs() - 1
    return x


@pytest.mark.gpu
@pytest.mark.parametrize("gelu", [None, "tanh", "none"])
@pytest.mark.parametrize("k", [1000, 3072, 14336, 20000])  # 20000: wider than one pass, read twice
def test_cuda_row_kernel_matches_the_eager_quantization(gelu: str | None, k: int) -> None:
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 tensor cores (cc >= 8.9) needed")
    x = _rows(k)
    assert fp8_row_kernel.takes(x, gelu) and quant._fp8_tensor_cores(x.device)
    x8, s = fp8_row_kernel.quantize_rows(x, gelu, quant._FP8_ACT_TARGET, quant._GELU_NEG_BOUND)
    e8, es = quant._quantize_rows_eager(x, gelu)
    ref = _exact(x, gelu)
    assert x8.dtype == torch.float8_e4m3fn and x8.shape == x.shape and s.shape == (700, 1)
    assert torch.isfinite(x8.float()).all() and x8.float().abs().max() <= 448
    assert torch.allclose(s, es, rtol=1e-2)  # the same bound; eager rounds its multiplier to bf16
    # rounded once (fp32 multiplier, e4m3) instead of through bf16: no less exact than the eager form
    assert _err(x8, s, ref) <= _err(e8, es, ref) * 1.01 + 1e-5 < 0.03
    assert torch.equal(x8[3].float(), torch.zeros(k, device="cuda")) and torch.isfinite(s[3]).all()
    assert (x8[5].float() * s[5] - ref[5]).abs().max() <= 0.07 * ref[5].abs().max()


@pytest.mark.gpu
def test_cuda_row_kernel_reads_strided_rows_and_serves_the_dispatch() -> None:
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 tensor cores (cc >= 8.9) needed")
    wide = _rows(4096)
    x = wide[:, :3000]  # rows 4096 apart, as a slice of a wider activation
    direct = fp8_row_kernel.quantize_rows(x.contiguous(), "tanh", quant._FP8_ACT_TARGET, quant._GELU_NEG_BOUND)
    got = quant._quantize_rows(x, "tanh")
    assert not quant._ROW_KERNEL.failed  # the kernel really ran
    assert torch.equal(got[0].float(), direct[0].float()) and torch.equal(got[1], direct[1])
    old = set_fusion(False)  # the comparisons without fused kernels run the eager form
    try:
        assert not fp8_row_kernel.takes(x, "tanh")
    finally:
        set_fusion(old)
