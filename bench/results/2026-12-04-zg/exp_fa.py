"""A/B on the H200: (1) FA3 fp8 with q/k from the RoPE kernel (static scales) vs dynamically
re-quantized q/k; (2) GELU + fp8 row quantization: compiled form vs hand-written Triton kernels."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_dit import MODELS, build_wan  # noqa: E402

from wan_lite.models import dit  # noqa: E402
from wan_lite.models.attention import dequantize_heads, set_attention_backend  # noqa: E402
from wan_lite.models.dit import WanDiTConfig  # noqa: E402
from wan_lite.runtime import fa3_attention as fa3  # noqa: E402
from wan_lite.runtime import quant
from wan_lite.runtime.attention_select import select_fp8_attention  # noqa: E402


def ms(fn, reps=10):
    for _ in range(3):
        fn()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def fa_part(model_name, size=None):
    cfg, stride, (w, h), frames = MODELS[model_name]
    w, h = size or (w, h)
    cfg = WanDiTConfig(**{**cfg.__dict__, "num_layers": 1})
    x = torch.randn(1, cfg.in_dim, (frames - 1) // stride[0] + 1, h // stride[1], w // stride[2], device="cuda")
    ctx = torch.randn(1, 512, cfg.text_dim, device="cuda")
    t = torch.tensor([500.0], device="cuda")
    m = build_wan(cfg, 0)
    quant.quantize_model(m, "fp8", compute="fp8")
    pick = select_fp8_attention("cuda")
    set_attention_backend(pick.backend)
    got = {}
    orig = dit.attention_fp8_qk
    def cap(q8, k8, v, dq, dk):
        got.setdefault("a", (q8, k8, v, dq, dk))
        return orig(q8, k8, v, dq, dk)
    dit.attention_fp8_qk = cap
    with torch.inference_mode():
        m(x, t, ctx)
        q8, k8, v, dq, dk = got["a"]
        f = fa3._flash_attn_func()
        v8, dv = fa3._quantize_heads(v)
        print(model_name, "q8", tuple(q8.shape), q8.stride(), "k8", k8.stride(), "v", v.stride(), "v8", v8.stride(), "dq", tuple(dq.shape))
        qd, kd = dequantize_heads(q8, dq, torch.bfloat16), dequantize_heads(k8, dk, torch.bfloat16)
        q8d, dqd = fa3._quantize_heads(qd)
        k8d, dkd = fa3._quantize_heads(kd)
        def sub(z):
            return (z.float().abs() < 2 ** -6).float().mean().item()

        print(f"  subnormal fraction static q {sub(q8):.3f} k {sub(k8):.3f}; dynamic q {sub(q8d):.3f}; static/dynamic descale q {(dq / dqd).mean().item():.1f} k {(dk / dkd).mean().item():.1f}")
        def run(a, b, da, db):
            return f(a, b, v8, q_descale=da, k_descale=db, v_descale=dv)

        print(f"  FA3 fp8 static q/k {ms(lambda: run(q8, k8, dq, dk)):.3f} ms; dynamic q/k {ms(lambda: run(q8d, k8d, dqd, dkd)):.3f} ms; "
              f"static q/k contiguous copies {ms(lambda: run(q8.contiguous(), k8.contiguous(), dq, dk)):.3f} ms (incl. copy)")
        zq = torch.zeros_like(q8)
        print(f"  FA3 fp8 zeros q {ms(lambda: run(zq, k8d, dqd, dkd)):.3f} ms; bf16 FA3 {ms(lambda: f(qd, kd, v)):.3f} ms")
    dit.attention_fp8_qk = orig
    set_attention_backend("sdpa")


@triton.jit
def _gelu_tanh(x, APPROX: tl.constexpr):
    z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    if APPROX:
        th = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [z], dtype=tl.float32, is_pure=True, pack=1)
    else:
        e = tl.exp(-2.0 * tl.abs(z))
        th = (1.0 - e) / (1.0 + e)
        th = tl.where(z < 0, -th, th)
    return 0.5 * x * (1.0 + th)


@triton.jit
def _gelu_quant_rows(x_ptr, out_ptr, scale_ptr, K, stride, target, neg_bound,
                     BLOCK: tl.constexpr, APPROX: tl.constexpr, ONE: tl.constexpr):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * stride
    obase = out_ptr + row.to(tl.int64) * K
    if ONE:
        offs = tl.arange(0, BLOCK)
        mask = offs < K
        x = tl.load(base + offs, mask=mask, other=float("-inf")).to(tl.float32)
        amax = tl.maximum(tl.max(x, axis=0), neg_bound)
        inv = target / amax
        y = _gelu_tanh(tl.where(mask, x, 0.0), APPROX) * inv
        tl.store(obase + offs, y.to(tl.float8e4nv), mask=mask)
    else:
        acc = tl.full([BLOCK], float("-inf"), tl.float32)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            acc = tl.maximum(acc, tl.load(base + offs, mask=offs < K, other=float("-inf")).to(tl.float32))
        amax = tl.maximum(tl.max(acc, axis=0), neg_bound)
        inv = target / amax
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            mask = offs < K
            x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(obase + offs, (_gelu_tanh(x, APPROX) * inv).to(tl.float8e4nv), mask=mask)
    tl.store(scale_ptr + row, 1.0 / inv)


def tri(x, approx, one, warps, block=None):
    M, K = x.shape
    out = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    blk = block or (triton.next_power_of_2(K) if one else 2048)
    _gelu_quant_rows[(M,)](x, out, scale, K, x.stride(0), quant._FP8_ACT_TARGET, quant._GELU_NEG_BOUND,
                           BLOCK=blk, APPROX=approx, ONE=one, num_warps=warps)
    return out, scale


def gelu_part(M, K):
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16) * 2
    ref = F.gelu(x.float(), approximate="tanh")
    cur8, cur_s = quant._quantize_rows(x, "tanh")
    def err(o):
        return ((o[0].float() * o[1] - ref).norm() / ref.norm()).item()

    print(f"GELU+quant {M}x{K}: bytes-time at 4.0 TB/s {M*K*3/4e12*1e6:.0f} us")
    print(f"  compiled current {ms(lambda: quant._quantize_rows(x, 'tanh')) * 1000:.0f} us err {err((cur8, cur_s)):.5f}")
    print(f"  compiled no gelu {ms(lambda: quant._quantize_rows(x)) * 1000:.0f} us")
    for approx in (False, True):
        for one, warps in ((False, 4), (False, 8), (True, 8), (True, 16)):
            o = tri(x, approx, one, warps)
            same = (o[0].float() * o[1] - cur8.float() * cur_s).abs().max().item()
            print(f"  triton approx={approx} one_pass={one} warps={warps}: {ms(lambda: tri(x, approx, one, warps)) * 1000:.0f} us "
                  f"err {err(o):.5f} max|diff vs current| {same:.4f}")


if __name__ == "__main__":
    torch.manual_seed(0)
    with torch.inference_mode():
        gelu_part(27280, 14336)
        gelu_part(75600, 13824)
    fa_part("5b")
    fa_part("a14b", (1280, 720))
