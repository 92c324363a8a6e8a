"""Flow-matching samplers of Wan 2.2: the schedule, FlowUniPC (the default), DPM++ 2M and Euler.

The model predicts the velocity ``v = noise - x0`` of the straight path
``x_sigma = (1 - sigma) * x0 + sigma * noise``; every sampler turns it into the data prediction
``m = x - sigma * v`` (UniPC, DPM++) or integrates it directly (Euler).

Numerics follow the official schedulers (FlowUniPCMultistepScheduler and
FlowDPMSolverMultistepScheduler, as Wan 2.2 configures them): sigmas are float32, every scalar
coefficient (lambda, h, the B(h) terms, the corrector's rho) is computed with 0-dim float32 CPU
tensors in the reference's order of operations, and the tensor updates are float32. Because the
coefficients depend only on the schedule, they are computed once per sampler, not per step.

A sampler never modifies its inputs in place and keeps references (not copies) of the tensors it
needs later, so `state_dict()` is cheap and a pipeline can resume from step i after an OOM and get a
bit-identical result. A step commits its new state only after all its tensor math succeeded: a step
that raises (out of memory, wrong shape) leaves the sampler as it was.
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from wan_lite.api import SAMPLERS
from wan_lite.errors import InputError

logger = logging.getLogger(__name__)

NUM_TRAIN_TIMESTEPS = 1000
# The reference's training grid ends at sigma 1 - 1/1000, stored in float32; as a Python float
# this is 0.9990000128746033 and it is where the UniPC schedule starts.
UNIPC_SIGMA_MAX = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))


def flow_schedule(steps: int, shift: float, kind: str = "unipc") -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's timesteps and sigmas for `steps` steps.

    kind "unipc" (also used by Euler): s = linspace(float32(0.999), 0, N+1)[:-1] in float64;
    kind "dpm++": s = linspace(1, 0, N+1)[:-1]. Both are shifted by s' = shift*s / (1 + (shift-1)*s).

    Returns:
        timesteps: int64 [N], s' * 1000 truncated toward zero (what the DiT and the expert switch see).
        sigmas: float32 [N+1], s' with a final 0 appended (what the solver uses).
    """
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise InputError(f"Invalid number of steps: {steps!r}.", "Use a whole number of steps, 1 or more.")
    if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not np.isfinite(shift) or shift <= 0:
        raise InputError(f"Invalid shift: {shift!r}.", "Use a positive shift (the models use 5.0 or 12.0).")
    steps, shift = int(steps), float(shift)
    if kind == "unipc":
        s = np.linspace(UNIPC_SIGMA_MAX, 0.0, steps + 1)[:-1]
    elif kind == "dpm++":
        s = np.linspace(1.0, 0.0, steps + 1)[:steps]
    else:
        raise ValueError(f"unknown schedule kind {kind!r}; expected 'unipc' or 'dpm++'")
    s = shift * s / (1 + (shift - 1) * s)
    # numpy's float -> int64 cast truncates toward zero, as the reference's torch conversion does.
    timesteps = torch.from_numpy((s * NUM_TRAIN_TIMESTEPS).astype(np.int64))
    sigmas = torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32))
    return timesteps, sigmas


@runtime_checkable
class Sampler(Protocol):
    """What a pipeline needs from a sampler.

    `timesteps` int64 [N] and `sigmas` float32 [N+1] are the schedule; `index` is the step the next
    `step()` call performs (0..N); `step(v, x)` takes the velocity and the current latent (any shape,
    same for both) and returns the latent at the next sigma, float32.
    """

    name: str
    steps: int
    timesteps: torch.Tensor
    sigmas: torch.Tensor

    @property
    def index(self) -> int: ...

    def step(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """lambda = ln(alpha) - ln(sigma) of a 0-dim float32 sigma, as the reference computes it
    (+inf at sigma 0, -inf at sigma 1)."""
    return torch.log(1 - sigma) - torch.log(sigma)


class _FlowSampler:
    """Shared bookkeeping: schedule, step index, a 2-slot history of data predictions and the
    sample the last predictor started from (UniPC's corrector needs it)."""

    name = ""
    schedule_kind = "unipc"

    def __init__(self, steps: int, shift: float) -> None:
        self.timesteps, self.sigmas = flow_schedule(steps, shift, self.schedule_kind)
        self.steps = int(steps)
        self.shift = float(shift)
        # 0-dim float32 CPU scalars, one per sigma, so coefficient math matches the reference bit for bit.
        self._sig = [self.sigmas[i].clone() for i in range(self.steps + 1)]
        self._lam = [_log_snr(s) for s in self._sig]
        self._index = 0
        self._history: list[torch.Tensor | None] = [None, None]  # [m_{i-2}, m_{i-1}] before step i
        self._last_sample: torch.Tensor | None = None

    @property
    def index(self) -> int:
        """The step the next `step()` call performs; equals `steps` when sampling is done."""
        return self._index

    @property
    def done(self) -> bool:
        return self._index >= self.steps

    def __len__(self) -> int:
        return self.steps

    def _begin(self, v: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._index >= self.steps:
            raise RuntimeError(f"{self.name} sampler: all {self.steps} steps are done; make a new sampler")
        if v.shape != x.shape:
            raise ValueError(f"velocity shape {tuple(v.shape)} differs from latent shape {tuple(x.shape)}")
        return v.float(), x.float()

    def state_dict(self) -> dict[str, Any]:
        """A snapshot of the whole state. Tensors are references (the sampler never changes them in
        place), kept on their device: cheap to take before every step."""
        return {
            "name": self.name,
            "steps": self.steps,
            "shift": self.shift,
            "index": self._index,
            "history": list(self._history),
            "last_sample": self._last_sample,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a snapshot taken from a sampler of the same name, steps and shift."""
        mine = (self.name, self.steps, self.shift)
        theirs = (state.get("name"), state.get("steps"), state.get("shift"))
        if mine != theirs:
            raise ValueError(f"sampler state of {theirs} cannot be loaded into {mine}")
        if not 0 <= int(state["index"]) <= self.steps:
            raise ValueError(f"sampler state index {state['index']} outside 0..{self.steps}")
        self._index = int(state["index"])
        self._history = list(state["history"])
        self._last_sample = state["last_sample"]

    def step(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps}, shift={self.shift}, index={self._index})"


@dataclass(frozen=True)
class _UniStep:
    """Scalar coefficients of one UniP predictor or UniC corrector update (0-dim float32 tensors).

    x_new = ratio * x_from - c_m0 * m0 - c_res * residual, where residual is 0.5 * D1 (predictor,
    order 2) or rho1 * D1 + rho2 * (m_t - m0) (corrector), with D1 = (m_older - m0) / rk.
    """

    order: int
    ratio: torch.Tensor  # sigma_to / sigma_from
    c_m0: torch.Tensor  # alpha_to * expm1(-h)
    c_res: torch.Tensor  # alpha_to * B(h), B(h) = expm1(-h) for bh2
    rk: torch.Tensor | None = None  # (lambda_older - lambda_from) / h, order 2 only
    rho: torch.Tensor | None = None  # corrector weights [rho1, rho2] (order 2) or [0.5] (order 1)


class FlowUniPC(_FlowSampler):
    """UniPC, order 2, B(h) = expm1(-h) ("bh2"), data prediction, corrector at every step > 0,
    lower order at the first and the last step; the last step returns the data prediction."""

    name = "unipc"
    schedule_kind = "unipc"

    def __init__(self, steps: int, shift: float) -> None:
        super().__init__(steps, shift)
        n = steps
        # Predictor order at step i: 1 at the first step (no history) and the last (lower_order_final).
        self._orders = [min(2, n - i, i + 1) for i in range(n)]
        self._pred = [self._coefficients(i, i + 1, self._orders[i], corrector=False) for i in range(n)]
        # The corrector at step i redoes the update sigma_{i-1} -> sigma_i with the order of step i-1.
        self._corr: list[_UniStep | None] = [None] + [
            self._coefficients(i - 1, i, self._orders[i - 1], corrector=True) for i in range(1, n)
        ]

    def _coefficients(self, s: int, t: int, order: int, *, corrector: bool) -> _UniStep:
        """Coefficients for an update from sigma_s to sigma_t, in the reference's order of float32 ops."""
        sigma_t, sigma_s0 = self._sig[t], self._sig[s]
        alpha_t = 1 - sigma_t
        h = self._lam[t] - self._lam[s]
        hh = -h  # predict_x0
        h_phi_1 = torch.expm1(hh)
        b_h = torch.expm1(hh)  # bh2
        rk = None
        rks: list[torch.Tensor | float] = []
        if order == 2:
            rk = (self._lam[s - 1] - self._lam[s]) / h
            rks.append(rk)
        rks.append(1.0)
        rho = None
        if corrector:
            if order == 1:
                rho = torch.tensor([0.5], dtype=torch.float32)
            else:
                # b_k = g_k * k! / B(h) with g_1 = phi/hh - 1 and g_{k+1} = g_k/hh - 1/(k+1)!
                rks_t = torch.tensor(rks, dtype=torch.float32)
                h_phi_k = h_phi_1 / hh - 1
                factorial_i = 1
                big_r, b = [], []
                for i in range(1, order + 1):
                    big_r.append(torch.pow(rks_t, i - 1))
                    b.append(h_phi_k * factorial_i / b_h)
                    factorial_i *= i + 1
                    h_phi_k = h_phi_k / hh - 1 / factorial_i
                rho = torch.linalg.solve(torch.stack(big_r), torch.stack(b))
        return _UniStep(order=order, ratio=sigma_t / sigma_s0, c_m0=alpha_t * h_phi_1, c_res=alpha_t * b_h,
                        rk=rk, rho=rho)

    def step(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One step: data prediction, UniC correction of x (i > 0), UniP prediction to sigma_{i+1}.

        v, x: the velocity and the latent at sigma_i, same shape (e.g. [C, T, h, w]).
        Returns the latent at sigma_{i+1}, float32 (at the last step: the data prediction).
        """
        v, x = self._begin(v, x)
        i = self._index
        m_prev, m_last = self._history
        m = x - self._sig[i] * v  # from the uncorrected x, as the reference does
        corr = self._corr[i]
        if corr is not None and self._last_sample is not None:
            x = self._correct(corr, self._last_sample, m_prev, m_last, m)
        pred = self._pred[i]
        x_next = pred.ratio * x - pred.c_m0 * m
        if pred.order == 2:
            d1 = (m_last - m) / pred.rk
            x_next = x_next - pred.c_res * (0.5 * d1)
        # Commit only now, so a step that failed above leaves the state untouched.
        self._history = [m_last, m]
        self._last_sample = x
        self._index = i + 1
        return x_next

    @staticmethod
    def _correct(c: _UniStep, x_prev: torch.Tensor, m_older: torch.Tensor | None, m0: torch.Tensor,
                 m_t: torch.Tensor) -> torch.Tensor:
        """UniC: recompute the previous update from x_prev with the new data prediction m_t."""
        x_c = c.ratio * x_prev - c.c_m0 * m0
        if c.order == 2:
            d1 = (m_older - m0) / c.rk
            res = c.rho[0] * d1 + c.rho[-1] * (m_t - m0)
        else:
            res = c.rho[-1] * (m_t - m0)
        return x_c - c.c_res * res


class FlowDPMpp2M(_FlowSampler):
    """DPM-Solver++ 2M (midpoint), deterministic; its schedule starts at sigma exactly 1.

    First order at step 0 (no history) and at the last step (final sigma 0); second order otherwise.
    """

    name = "dpm++"
    schedule_kind = "dpm++"

    def __init__(self, steps: int, shift: float) -> None:
        super().__init__(steps, shift)
        self._coef = [self._coefficients(i) for i in range(steps)]

    def _coefficients(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(order, sigma_{i+1}/sigma_i, alpha_{i+1} (e^-h - 1), 1/r0 or None)."""
        sigma_t, sigma_s0 = self._sig[i + 1], self._sig[i]
        alpha_t = 1 - sigma_t
        h = self._lam[i + 1] - self._lam[i]
        c = alpha_t * (torch.exp(-h) - 1.0)
        order = 1 if i == 0 or i == self.steps - 1 else 2
        inv_r0 = None
        if order == 2:
            # sigma_0 = 1 gives lambda_0 = -inf, so r0 = inf and 1/r0 = 0 at step 1: first order in effect.
            r0 = (self._lam[i] - self._lam[i - 1]) / h
            inv_r0 = 1.0 / r0
        return order, sigma_t / sigma_s0, c, inv_r0

    def step(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One DPM++ 2M step from sigma_i to sigma_{i+1}; v, x same shape; returns float32."""
        v, x = self._begin(v, x)
        i = self._index
        m_last = self._history[1]
        m = x - self._sig[i] * v
        order, ratio, c, inv_r0 = self._coef[i]
        x_next = ratio * x - c * m
        if order == 2:
            d1 = inv_r0 * (m - m_last)
            x_next = x_next - (0.5 * c) * d1
        self._history = [m_last, m]
        self._index = i + 1
        return x_next


class FlowEuler(_FlowSampler):
    """Euler on the velocity: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v, on the UniPC schedule."""

    name = "euler"
    schedule_kind = "unipc"

    def step(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One Euler step; v, x same shape; returns float32 (at the last step: x - sigma v = x0 estimate)."""
        v, x = self._begin(v, x)
        i = self._index
        x_next = x + (self._sig[i + 1] - self._sig[i]) * v
        self._index = i + 1
        return x_next


_CLASSES: dict[str, type[_FlowSampler]] = {"unipc": FlowUniPC, "dpm++": FlowDPMpp2M, "euler": FlowEuler}
_ALIASES = {"dpmpp": "dpm++", "dpm": "dpm++", "dpm++2m": "dpm++", "uni_pc": "unipc"}


def make_sampler(name: str, steps: int, shift: float) -> Sampler:
    """A fresh sampler: "unipc" (the reference default), "dpm++" or "euler"."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    cls = _CLASSES.get(key)
    if cls is None:
        raise InputError(f"Unknown sampler {name!r}.", f"Choose one of: {', '.join(SAMPLERS)}.")
    return cls(steps, shift)


@dataclass(frozen=True)
class StepInfo:
    """One DiT call of the denoising loop, as the pipeline's step hooks see it.

    index: the step (0-based) of `total`; timestep: what the DiT sees (int, the expert switch's
    scale); expert: "main" (TI2V-5B), "high" or "low" (A14B); branches: what each batch row of
    this call is, "cond" (the prompt) or "uncond" (the negative prompt), in batch order."""

    index: int
    total: int
    timestep: int
    expert: str
    branches: tuple[str, ...]
