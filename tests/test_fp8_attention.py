"""cuDNN's fp8 attention (wan_lite/runtime/fp8_attention.py) and its start-up choice
(`select_fp8_attention` in wan_lite/runtime/attention_select.py).

Without CUDA or without the optional cuDNN frontend only the fallbacks and the quantization run;
the GPU tests need an sm_90+ GPU and `nvidia-cudnn-frontend` installed.
"""

from __future__ import annotations

import sys

import pytest
import torch

from wan_lite.models import attention as attn_mod
from wan_lite.runtime import attention_select as sel
from wan_lite.runtime import fp8_attention as fp8


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ------------------------------------------------------------------------------ CPU


def test_backend_is_none_without_cuda(monkeypatch) -> None:
    if not torch.cuda.is_available():
        assert fp8.cudnn_fp8_backend() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(fp8, "_cudnn", lambda: object())  # installed or not: no GPU decides
    assert fp8.cudnn_fp8_backend() is None
    assert "CUDA GPU" in fp8.cudnn_fp8_unavailable_reason()


def test_backend_is_none_without_the_cudnn_frontend(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "cudnn", None)  # `import cudnn` raises ModuleNotFoundError
    monkeypatch.setattr(fp8, "_cudnn_module", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the missing package decides
    assert fp8.cudnn_fp8_backend() is None
    assert "not installed" in fp8.cudnn_fp8_unavailable_reason()


def test_select_fp8_attention_on_cpu_falls_back_with_a_note(caplog) -> None:
    with caplog.at_level("INFO", logger="wan_lite.runtime.attention_select"):
        choice = sel.select_fp8_attention("cpu")
    assert choice.backend == "sdpa" and choice.fn is attn_mod.sdpa_attention and not choice.failed
    assert choice.note.startswith("Attention: PyTorch SDPA")
    assert "cuDNN fp8 attention is not used: it needs a CUDA GPU (running on cpu)." in choice.note
    assert "cuDNN fp8 attention is not used" in caplog.text


def test_fp8_attention_is_used_only_when_correct_and_faster(monkeypatch) -> None:
    """The decision with stubbed kernel, check and timings: no GPU needed."""
    def kernel(q, k, v):
        return attn_mod.sdpa_attention(q, k, v)

    monkeypatch.setattr(sel, "cudnn_fp8_unavailable_reason", lambda dev=None: None)
    monkeypatch.setattr(sel, "cudnn_fp8_backend", lambda strict=False: kernel)
    monkeypatch.setattr(sel, "select_attention",
                        lambda dev, allow_sage=True: sel.AttentionChoice("sdpa", "Attention: PyTorch SDPA (stub)."))
    checks = []

    def check(fn, dev, tolerance):
        checks.append(tolerance)
        return True, 0.045, "passed"

    monkeypatch.setattr(sel, "self_check", check)
    cuda = torch.device("cuda")

    monkeypatch.setattr(sel, "compare_speed", lambda fn, dev, shape: (10.0, 15.0))
    faster = sel.select_fp8_attention(cuda)
    assert faster.backend == "cudnn-fp8"
    assert "cuDNN fp8 attention (1.50x the speed of SDPA" in faster.note and "4.50% rel. error" in faster.note
    assert checks == [sel.FP8_TOLERANCE]

    monkeypatch.setattr(sel, "compare_speed", lambda fn, dev, shape: (15.0, 15.0))
    slower = sel.select_fp8_attention(cuda)
    assert slower.backend == "sdpa" and not slower.failed
    assert slower.note.startswith("Attention: PyTorch SDPA (stub).") and "SDPA is about as fast or faster" in slower.note

    monkeypatch.setattr(sel, "self_check", lambda fn, dev, tolerance: (False, 0.4, "its output differs from SDPA"))
    wrong = sel.select_fp8_attention(cuda)
    assert wrong.backend == "sdpa" and wrong.failed and "failed its self-check" in wrong.note

    monkeypatch.setattr(sel, "cudnn_fp8_unavailable_reason", lambda dev=None: "it is not installed")
    absent = sel.select_fp8_attention(cuda)
    assert absent.backend == "sdpa" and not absent.failed and absent.note.endswith("it is not installed.")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_per_tensor_quantization_round_trips(dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 37, 4, 128, generator=gen) * 3).to(dtype)
    x8, descale = fp8._quantize_tensor_eager(x)
    amax = x.abs().max().float()
    assert x8.dtype == torch.float8_e4m3fn and x8.shape == x.shape
    assert descale.shape == (1, 1, 1, 1) and descale.dtype == torch.float32
    # descale = amax / 448, up to the rounding of the multiplier 448 / amax to x's dtype
    torch.testing.assert_close(descale.reshape(()), amax / 448, rtol=2**-8, atol=0)
    assert x8.float().abs().max().item() == 448.0  # the largest element uses the whole e4m3 range
    # e4m3 keeps 3 mantissa bits: half an ulp is 2^-4 relative (plus the multiply's own rounding),
    # and subnormals (below 2^-6 * descale * 448 / 448) are spaced 2^-9 * descale apart.
    err = (x8.float() * descale - x.float()).abs()
    bound = x.float().abs() * (2**-4 + 2**-8) + descale * 2**-10
    assert (err <= bound).all()
    # one scale per tensor: 4 * x gets 4 times the descale and the same fp8 codes
    _, k8, _, dq, dk, _ = fp8._quantize_qkv_eager(x, x * 4, x)
    assert torch.equal(dk, dq * 4) and torch.equal(k8.view(torch.uint8), x8.view(torch.uint8))


def test_zero_tensor_quantizes_to_zeros() -> None:
    x8, descale = fp8._quantize_tensor_eager(torch.zeros(3, 5, 2, 128, dtype=torch.bfloat16))
    assert not x8.float().any() and torch.isfinite(descale).all()


def test_short_key_sequences_run_sdpa(stand_in) -> None:
    """Text cross-attention (512 keys) runs SDPA unless strict; self-attention goes to cuDNN."""
    cudnn = stand_in()
    q, k, v = (torch.randn(1, 64, 2, 128).to(torch.bfloat16) for _ in range(3))
    assert torch.equal(fp8._attention(q, k, v, strict=False), attn_mod.sdpa_attention(q, k, v))
    assert not cudnn.built
    fp8._attention(q, k, v, strict=True)
    assert cudnn.built


def test_kernel_falls_back_to_sdpa_on_cpu() -> None:
    q, k, v = (torch.randn(1, 9, 2, 128) for _ in range(3))
    assert torch.equal(fp8._attention(q, k, v, strict=False), attn_mod.sdpa_attention(q, k, v))
    with pytest.raises(ValueError, match="CUDA"):
        fp8._attention(q, k, v, strict=True)


class _StandIn:
    """Plays the cuDNN frontend with the contract wan_lite relies on: a graph reads and writes its
    buffers through the dims and strides it was given ([B, H, L, D] over our [B, L, H, D] memory),
    multiplies by the descales, rounds P * scale_s to e4m3 and O * scale_o to the output type. So a
    wrong stride, scale or port on our side shows up here as a wrong result, on a CPU."""

    class NotSupported(Exception):
        pass

    def __init__(self, refuse=()):
        # what does not build: graphs with these output types ("bf16", "f16", "fp8"), "virtual Amax_S"
        self.refuse = set(refuse)
        self.built, self.runs, self.streams = [], [], []
        self.data_type = _Names(FP8_E4M3="fp8", FLOAT="f32", BFLOAT16="bf16", HALF="f16")
        self.heur_mode = _Names(A="A", FALLBACK="FALLBACK")
        stand_in = self

        class Graph:
            def __init__(self, io_data_type, intermediate_data_type, compute_data_type, handle):
                assert (io_data_type, intermediate_data_type, compute_data_type) == ("fp8", "f32", "f32")
                self.handle, self.ports = handle, {}

            def tensor(self, name, dim, stride, data_type):
                self.ports[name] = _Port(name, dim, stride, data_type)
                return self.ports[name]

            def sdpa_fp8(self, q, k, v, descale_q, descale_k, descale_v, descale_s, scale_s, scale_o,
                         generate_stats, attn_scale, name):
                assert generate_stats is False
                self.args = dict(q=q, k=k, v=v, descale_q=descale_q, descale_k=descale_k, descale_v=descale_v,
                                 descale_s=descale_s, scale_s=scale_s, scale_o=scale_o, attn_scale=attn_scale)
                self.o, self.amax_s, self.amax_o = _Port("O"), _Port("Amax_S"), _Port("Amax_O")
                return [self.o, None, self.amax_s, self.amax_o]

            def validate(self):
                assert self.o.output and self.o.dim and self.o.stride[-1] == 1

            def build_operation_graph(self):
                pass

            def create_execution_plans(self, modes):
                assert modes == ["A", "FALLBACK"]

            def check_support(self):
                pass

            def build_plans(self):
                if self.o.data_type in stand_in.refuse:
                    raise _StandIn.NotSupported(f"no engine for an {self.o.data_type} output")
                if "virtual Amax_S" in stand_in.refuse and not self.amax_s.output:
                    raise _StandIn.NotSupported("Amax_S must be an output")
                stand_in.built.append(self.o.data_type + (" amax_s" if self.amax_s.output else ""))

            def get_workspace_size(self):
                return 64

            def execute(self, pack, workspace, handle):
                assert handle is self.handle and workspace.dtype == torch.uint8 and workspace.numel() == 64
                for port in (self.o, self.amax_o, self.amax_s):
                    assert (port in pack) == port.output
                a = self.args

                def read(port, scale):
                    t = pack[port]
                    return torch.as_strided(t, port.dim, port.stride, t.storage_offset()).float() * pack[scale]

                q, k, v = read(a["q"], a["descale_q"]), read(a["k"], a["descale_k"]), read(a["v"], a["descale_v"])
                p = torch.softmax(q @ k.transpose(-1, -2) * a["attn_scale"], dim=-1)
                p8 = (p * pack[a["scale_s"]]).to(torch.float8_e4m3fn).float() * pack[a["descale_s"]]
                o = (p8 @ v) * pack[a["scale_o"]]
                out = pack[self.o]
                torch.as_strided(out, self.o.dim, self.o.stride, out.storage_offset()).copy_(o.to(out.dtype))
                stand_in.runs.append(self.o.data_type)

        self.pygraph = Graph

    def create_handle(self):
        return object()

    def set_stream(self, handle, stream):
        self.streams.append(stream)


class _Names:
    def __init__(self, **names):
        self.__dict__.update(names)


class _Port:
    def __init__(self, name, dim=None, stride=None, data_type=None):
        self.name, self.dim, self.stride, self.data_type, self.output = name, dim, stride, data_type, False

    def set_output(self, value):
        self.output = value
        return self

    def set_dim(self, dim):
        self.dim = list(dim)
        return self

    def set_stride(self, stride):
        self.stride = list(stride)
        return self

    def set_data_type(self, data_type):
        self.data_type = data_type
        return self


class _NoDevice:
    def __init__(self, device):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def stand_in(monkeypatch):
    """fp8_attention on the CPU against a `_StandIn` cuDNN, with fresh caches."""
    def use(refuse=()):
        cudnn = _StandIn(refuse)
        monkeypatch.setattr(fp8, "_cudnn", lambda: cudnn)
        return cudnn

    from collections import OrderedDict
    from types import SimpleNamespace

    monkeypatch.setattr(fp8, "_refusal", lambda q, k, v: None)  # CPU tensors are fine for the stand-in
    monkeypatch.setattr(torch.cuda, "device", _NoDevice)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=7))
    for name, value in (("_GRAPHS", OrderedDict()), ("_FAILED", {}), ("_HANDLES", {}), ("_CONSTANTS", {})):
        monkeypatch.setattr(fp8, name, value)
    return use


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_graph_plumbing_against_a_stand_in_cudnn(stand_in, caplog, dtype) -> None:
    caplog.set_level("INFO", logger="wan_lite.runtime.fp8_attention")
    cudnn = stand_in()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, 128, generator=gen).to(dtype) for n in (200, 77, 77))
    ref = attn_mod.sdpa_attention(q, k, v)
    out = fp8._attention(q, k, v, strict=True)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert 1e-4 < _rel_l2(out, ref) < sel.FP8_TOLERANCE
    assert cudnn.built == [{torch.bfloat16: "bf16", torch.float16: "f16"}[dtype]] and cudnn.streams == [7]
    assert not caplog.records  # the first graph variant built: nothing to say
    fused = torch.stack([q, k[:, :1].expand(-1, 200, -1, -1), q], dim=2)  # a strided q: a slice of this
    torch.testing.assert_close(fp8._attention(fused[:, :, 0], k, v, strict=True), out, rtol=0, atol=0)
    assert fp8.cached_graph_count() == 1  # the same shapes and fp8 strides: the same graph
    fp8._attention(k, q, q, strict=True)  # other shapes: a second graph
    assert fp8.cached_graph_count() == 2 and len(cudnn.runs) == 3


@pytest.mark.parametrize("refuse, built, logged", [
    ({"bf16"}, "fp8", "uses a graph with fp8 output; this cuDNN refused bfloat16 output: NotSupported"),
    ({"virtual Amax_S"}, "bf16 amax_s", "uses a graph with bfloat16 output, Amax_S declared"),
    ({"bf16", "virtual Amax_S"}, "fp8 amax_s", "uses a graph with fp8 output, Amax_S declared"),
])
def test_other_graph_variants_where_cudnn_refuses_the_first(stand_in, caplog, refuse, built, logged) -> None:
    """An fp8 output (dequantized here) where cuDNN gives no bf16 one; Amax_S declared where it must be."""
    cudnn = stand_in(refuse=refuse)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, n, 2, 128, generator=gen).to(torch.bfloat16) for n in (150, 150, 150))
    with caplog.at_level("INFO", logger="wan_lite.runtime.fp8_attention"):
        out = fp8._attention(q, k, v, strict=True)
    assert cudnn.built == [built] and logged in caplog.text
    assert out.dtype == torch.bfloat16 and _rel_l2(out, attn_mod.sdpa_attention(q, k, v)) < sel.FP8_TOLERANCE


def test_a_shape_cudnn_refuses_runs_sdpa_with_one_log_line(stand_in, caplog, monkeypatch) -> None:
    stand_in(refuse={"bf16", "fp8"})
    monkeypatch.setattr(fp8, "MIN_KEYS", 1)  # these short test keys would run SDPA before trying cuDNN
    q, k, v = (torch.randn(1, 64, 2, 128).to(torch.bfloat16) for _ in range(3))
    with caplog.at_level("INFO", logger="wan_lite.runtime.fp8_attention"):
        for _ in range(2):
            assert torch.equal(fp8._attention(q, k, v, strict=False), attn_mod.sdpa_attention(q, k, v))
    lines = [r.getMessage() for r in caplog.records if "is not used for q" in r.getMessage()]
    assert len(lines) == 1 and "SDPA from now on" in lines[0]
    assert "bfloat16 output: NotSupported: no engine for an bf16 output" in lines[0]
    assert "fp8 output, Amax_S declared: NotSupported: no engine for an fp8 output" in lines[0]
    with pytest.raises(RuntimeError, match="failed on this shape before"):
        fp8._attention(q, k, v, strict=True)
    # the graph cache stays bounded
    stand_in()
    monkeypatch.setattr(fp8, "MAX_CACHED_GRAPHS", 2)
    for n in (10, 11, 12):
        fp8._attention(q[:, :n], k, v, strict=True)
    assert fp8.cached_graph_count() == 2


# ------------------------------------------------------------------------------ GPU


@pytest.fixture
def kernel():
    """The strict kernel (raises instead of quietly running SDPA), or a skip that says why."""
    pytest.importorskip("cudnn")
    reason = fp8.cudnn_fp8_unavailable_reason()
    if reason is not None:
        pytest.skip(f"cuDNN fp8 attention: {reason}")
    return fp8.cudnn_fp8_backend(strict=True)


def _qkv(lq: int, lk: int, heads: int = 4, dim: int = 128, batch: int = 2, dtype=torch.bfloat16, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(torch.randn(batch, n, heads, dim, generator=gen, device="cuda").to(dtype) for n in (lq, lk, lk))


@pytest.mark.gpu
@pytest.mark.parametrize("lk", [1000, 512], ids=["self", "cross"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_fp8_attention_matches_sdpa(kernel, lk, dtype) -> None:
    q, k, v = _qkv(1000, lk, dtype=dtype)
    with torch.no_grad():
        out = kernel(q, k, v)
        ref = attn_mod.sdpa_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    assert torch.isfinite(out).all()
    err = _rel_l2(out, ref)
    assert err < sel.FP8_TOLERANCE, err
    assert err > 1e-4  # fp8 really ran (SDPA itself would match exactly)


@pytest.mark.gpu
def test_cuda_fp8_attention_layout(kernel) -> None:
    """[B, L, H, D] in and out: swapping two heads (or two batch entries) of the inputs swaps them in
    the output; a strided q (a slice of a fused qkv tensor) gives the same result as a contiguous one."""
    q, k, v = _qkv(300, 300)
    with torch.no_grad():
        out = kernel(q, k, v)
        heads = [1, 0, 2, 3]
        swapped = kernel(q[:, :, heads], k[:, :, heads], v[:, :, heads])
        batch = kernel(q.flip(0), k.flip(0), v.flip(0))
        fused = torch.stack([q, k, v], dim=2)  # [B, L, 3, H, D]: q below is not contiguous
        strided = kernel(fused[:, :, 0], fused[:, :, 1], fused[:, :, 2])
    assert out.is_contiguous() and out.shape == q.shape
    # the same fp8 codes in other places: the same numbers there (a layout mix-up is off by ~100%)
    assert _rel_l2(swapped, out[:, :, heads]) < 1e-3
    assert _rel_l2(batch, out.flip(0)) < 1e-3
    assert _rel_l2(strided, out) < 1e-3


@pytest.mark.gpu
def test_cuda_fp8_attention_reuses_its_graph(kernel) -> None:
    q, k, v = _qkv(777, 333, heads=3, batch=1)
    with torch.no_grad():
        first = kernel(q, k, v)
        built = fp8.cached_graph_count()
        second = kernel(*_qkv(777, 333, heads=3, batch=1, seed=1))  # same shapes, other numbers
        assert fp8.cached_graph_count() == built
        again = kernel(q, k, v)
    assert not torch.equal(first, second)
    assert torch.equal(first, again)  # deterministic, and nothing stale from the other call


@pytest.mark.gpu
def test_cuda_head_size_64_is_plain_sdpa() -> None:
    pytest.importorskip("cudnn")
    fn = fp8.cudnn_fp8_backend()
    if fn is None:
        pytest.skip(f"cuDNN fp8 attention: {fp8.cudnn_fp8_unavailable_reason()}")
    q, k, v = _qkv(500, 500, dim=64)
    with torch.no_grad():
        assert torch.equal(fn(q, k, v), attn_mod.sdpa_attention(q, k, v))
        q32, k32, v32 = (t.float() for t in (q, k, v))
        assert torch.equal(fn(q32, k32, v32), attn_mod.sdpa_attention(q32, k32, v32))  # fp32: SDPA too


@pytest.mark.gpu
def test_cuda_select_fp8_attention() -> None:
    choice = sel.select_fp8_attention("cuda")
    if choice.backend not in ("cudnn-fp8", "fa3-fp8"):  # FlashAttention-3 fp8 may win on Hopper
        assert "cuDNN fp8 attention is not used:" in choice.note
    q, k, v = _qkv(777, fp8.MIN_KEYS + 77, batch=1)
    with torch.no_grad():
        out = choice.fn(q, k, v)
        ref = attn_mod.sdpa_attention(q, k, v)
        short = _qkv(777, 512, batch=1)  # text cross-attention: SDPA itself
        assert torch.equal(choice.fn(*short), attn_mod.sdpa_attention(*short))
    assert _rel_l2(out, ref) < sel.FP8_TOLERANCE
