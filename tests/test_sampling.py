"""Samplers: the official UniPC and DPM++ schedules, the straight-line sanity check, diffusers as an
independent oracle for UniPC and DPM++, and snapshot/restore."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wan_lite.errors import InputError
from wan_lite.sampling import (
    UNIPC_SIGMA_MAX,
    FlowDPMpp2M,
    FlowEuler,
    FlowUniPC,
    Sampler,
    flow_schedule,
    make_sampler,
)

T2V_A14B = [999, 997, 995, 993, 990, 988, 985, 982, 979, 976, 972, 969, 965, 961, 956, 952, 947,
            941, 936, 929, 922, 915, 907, 898, 888, 877, 865, 852, 837, 819, 799, 776, 749, 717, 678,
            631, 571, 492, 386, 235]
I2V_A14B = [999, 994, 989, 983, 978, 972, 965, 959, 952, 944, 937, 929, 920, 911, 902, 892, 882,
            870, 859, 846, 833, 818, 803, 786, 768, 749, 728, 706, 681, 654, 624, 591, 555, 514, 468,
            416, 356, 288, 208, 113]
TI2V_5B = [999, 995, 991, 987, 982, 978, 973, 968, 963, 957, 952, 946, 940, 934, 927, 920, 913, 906,
           898, 890, 882, 873, 863, 854, 843, 833, 821, 809, 796, 783, 768, 753, 737, 720, 701, 681,
           660, 636, 611, 584, 555, 522, 487, 448, 405, 356, 302, 241, 172, 92]


def _sig(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize(
    "steps, shift, expected, boundary, n_high, sig_head, sig_tail",
    [
        (40, 12.0, T2V_A14B, 875, 26, [0.99991661, 0.99778265, 0.99554616], [0.38684696, 0.23510954, 0.0]),
        (40, 5.0, I2V_A14B, 900, 15, [0.99979985, 0.99469477], [0.20815970, 0.11353305, 0.0]),
        (50, 5.0, TI2V_5B, None, None, [0.99979985, 0.99573237], [0.17226514, 0.09250686, 0.0]),
    ],
    ids=["t2v-A14B", "i2v-A14B", "ti2v-5B"],
)
def test_reference_unipc_schedules(steps, shift, expected, boundary, n_high, sig_head, sig_tail):
    timesteps, sigmas = flow_schedule(steps, shift)
    assert timesteps.dtype == torch.int64 and sigmas.dtype == torch.float32
    assert timesteps.tolist() == expected
    assert sigmas.shape == (steps + 1,)
    # The spec prints the float32 values to 8 decimals: equal to half a unit of the last one.
    torch.testing.assert_close(sigmas[: len(sig_head)].double(), _sig(sig_head), rtol=0, atol=5e-9)
    torch.testing.assert_close(sigmas[-len(sig_tail):].double(), _sig(sig_tail), rtol=0, atol=5e-9)
    assert sigmas[-1].item() == 0.0
    # The solver sigma is the float32 shifted sigma, not timestep / 1000.
    assert sigmas[0].item() != timesteps[0].item() / 1000
    if boundary is not None:
        high = (timesteps >= boundary).sum().item()
        assert (high, steps - high) == (n_high, steps - n_high)
    # Euler uses the UniPC schedule.
    euler = make_sampler("euler", steps, shift)
    assert torch.equal(euler.timesteps, timesteps) and torch.equal(euler.sigmas, sigmas)


def test_unipc_schedule_start_is_float32_0_999():
    assert UNIPC_SIGMA_MAX == 0.9990000128746033
    _, sigmas = flow_schedule(10, 1.0)
    assert sigmas[0].item() == pytest.approx(0.9990000128746033, abs=1e-7)


def test_dpmpp_schedule_t2v():
    timesteps, sigmas = flow_schedule(40, 12.0, kind="dpm++")
    assert timesteps[:3].tolist() == [1000, 997, 995]
    assert timesteps[-3:].tolist() == [493, 387, 235]
    assert sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0 and len(sigmas) == 41
    sampler = make_sampler("dpm++", 40, 12.0)
    assert torch.equal(sampler.timesteps, timesteps) and torch.equal(sampler.sigmas, sigmas)


def test_make_sampler_names_and_errors():
    assert isinstance(make_sampler("unipc", 4, 5.0), FlowUniPC)
    assert isinstance(make_sampler("DPM++", 4, 5.0), FlowDPMpp2M)
    assert isinstance(make_sampler("euler", 4, 5.0), FlowEuler)
    for name in ("unipc", "dpm++", "euler"):
        assert isinstance(make_sampler(name, 3, 5.0), Sampler)
    with pytest.raises(InputError) as err:
        make_sampler("ddim", 10, 5.0)
    assert all(n in str(err.value) for n in ("unipc", "dpm++", "euler"))
    with pytest.raises(InputError):
        make_sampler("unipc", 0, 5.0)
    with pytest.raises(InputError):
        make_sampler("unipc", 10, -1.0)


@pytest.mark.parametrize("name", ["unipc", "dpm++", "euler"])
@pytest.mark.parametrize("steps, shift", [(1, 5.0), (2, 5.0), (7, 12.0), (40, 5.0)])
def test_straight_line_velocity_returns_x0(name, steps, shift):
    """v = (x - x0) / sigma is the exact velocity of a single data point: every sampler lands on
    the straight path at every sigma and returns x0."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 4, 5, generator=g)
    noise = torch.randn(2, 3, 4, 5, generator=g)
    sampler = make_sampler(name, steps, shift)
    x = (1 - sampler.sigmas[0]) * x0 + sampler.sigmas[0] * noise
    for i in range(steps):
        sigma = sampler.sigmas[i]
        v = (x - x0) / sigma
        x = sampler.step(v, x)
        expected = (1 - sampler.sigmas[i + 1]) * x0 + sampler.sigmas[i + 1] * noise
        torch.testing.assert_close(x, expected, rtol=0, atol=2e-5)
    assert sampler.index == steps
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-5)


def _velocity(x: torch.Tensor, sigma: float, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """A fixed nonlinear velocity field v(x, sigma), mixing channels, standing in for the DiT."""
    mixed = torch.einsum("oc,bc...->bo...", w, x)
    return torch.tanh(mixed + c) - 0.3 * float(sigma) * torch.sin(2.0 * x) + 0.1 * x


def _field(shape: tuple[int, ...]):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape[1], shape[1], generator=g) / shape[1] ** 0.5
    c = torch.randn(shape, generator=g)
    x = torch.randn(shape, generator=g)
    return w, c, x


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _run_both(ref, ours) -> tuple[float, torch.Tensor]:
    """Step a diffusers scheduler and ours over the same velocity field from the same start;
    returns (worst relative difference over the run, our final sample)."""
    w, c, x = _field((1, 4, 3, 4, 4))
    x_ref = x_ours = x
    worst = 0.0
    for i, t in enumerate(ours.timesteps):
        x_ref = ref.step(_velocity(x_ref, ref.sigmas[i], w, c), t, x_ref).prev_sample
        x_ours = ours.step(_velocity(x_ours, ours.sigmas[i], w, c), x_ours)
        worst = max(worst, _rel(x_ours, x_ref))
    return worst, x_ours


@pytest.mark.parametrize("steps, shift", [(40, 12.0), (12, 5.0)])
def test_unipc_matches_diffusers(steps, shift):
    from diffusers import UniPCMultistepScheduler

    ref = UniPCMultistepScheduler(
        num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction", predict_x0=True,
        solver_type="bh2", lower_order_final=True, disable_corrector=[], use_flow_sigmas=True,
        flow_shift=shift, final_sigmas_type="zero",
    )
    # diffusers' own flow grid starts at 1.0; the official one starts at float32(0.999). Passing the
    # unshifted official grid makes diffusers shift it exactly as the reference does.
    ref.set_timesteps(sigmas=np.linspace(UNIPC_SIGMA_MAX, 0.0, steps + 1)[:-1])
    ours = make_sampler("unipc", steps, shift)
    assert torch.equal(ref.timesteps, ours.timesteps)
    assert torch.equal(ref.sigmas, ours.sigmas)

    worst, x_ours = _run_both(ref, ours)
    assert worst < 1e-5, f"max rel error over the run {worst:.3e}"
    assert torch.isfinite(x_ours).all()


@pytest.mark.parametrize("steps, shift", [(40, 12.0), (9, 5.0)])
def test_dpmpp_matches_diffusers(steps, shift):
    from diffusers import DPMSolverMultistepScheduler

    ref = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction",
        algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
        final_sigmas_type="zero", use_flow_sigmas=True, flow_shift=shift,
    )
    ref.set_timesteps(steps)
    ours = make_sampler("dpm++", steps, shift)
    # diffusers cannot build the official DPM++ grid (it starts at 1.0, diffusers' at 0.999), so it
    # steps on identical sigmas given explicitly; the step math is then compared.
    ref.sigmas = ours.sigmas.clone()
    ref.timesteps = ours.timesteps.clone()

    worst, _ = _run_both(ref, ours)
    assert worst < 1e-5, f"max rel error over the run {worst:.3e}"


def test_euler_update_rule():
    s = make_sampler("euler", 5, 5.0)
    x, v = torch.ones(3), torch.full((3,), 2.0)
    out = s.step(v, x)
    torch.testing.assert_close(out, x + (s.sigmas[1] - s.sigmas[0]) * v, rtol=0, atol=0)


def _run(sampler, x, w, c, start: int = 0, stop: int | None = None):
    stop = sampler.steps if stop is None else stop
    for i in range(start, stop):
        x = sampler.step(_velocity(x, sampler.sigmas[i], w, c), x)
    return x


@pytest.mark.parametrize("name", ["unipc", "dpm++", "euler"])
def test_snapshot_restore_is_bit_identical(name):
    w, c, x = _field((1, 4, 2, 3, 3))
    steps = 10
    full = _run(make_sampler(name, steps, 5.0), x, w, c)

    # Snapshot before step 6, run on (as if the step had failed with OOM), restore and redo.
    s = make_sampler(name, steps, 5.0)
    x_mid = _run(s, x, w, c, 0, 6)
    snap = s.state_dict()
    _run(s, x_mid, w, c, 6, 8)
    assert s.index == 8
    s.load_state_dict(snap)
    assert s.index == 6
    assert torch.equal(_run(s, x_mid, w, c, 6), full)

    # A fresh sampler restored from the snapshot resumes identically too.
    fresh = make_sampler(name, steps, 5.0)
    fresh.load_state_dict(snap)
    assert torch.equal(_run(fresh, x_mid, w, c, 6), full)


def test_failed_step_leaves_state_untouched():
    w, c, x = _field((1, 4, 2, 3, 3))
    s = make_sampler("unipc", 6, 5.0)
    x = _run(s, x, w, c, 0, 3)
    before = s.state_dict()
    with pytest.raises(ValueError):
        s.step(torch.zeros(1, 4, 2, 3, 4), x)  # wrong shape
    after = s.state_dict()
    assert after["index"] == before["index"] == 3
    assert all(a is b for a, b in zip(after["history"], before["history"], strict=True))
    assert after["last_sample"] is before["last_sample"]


def test_misuse_is_reported():
    s = make_sampler("euler", 2, 5.0)
    x = torch.zeros(3)
    s.step(x, x)
    s.step(x, x)
    with pytest.raises(RuntimeError):
        s.step(x, x)
    with pytest.raises(ValueError):
        make_sampler("unipc", 2, 5.0).load_state_dict(s.state_dict())
