"""Step cache: skip DiT forwards whose blocks would change little, and reuse their residual.

A DiT forward is embed -> blocks -> head; across consecutive denoising steps the blocks' residual
r = blocks(x) - x changes slowly for most of the schedule. MagCache (Ma et al., NeurIPS 2025)
predicts that change from the ratio of residual norms between steps, a curve that depends on the
model but hardly on the prompt, calibrated once on the released weights (`_MAG_RATIOS`). At step i
of an expert and guidance branch the cache multiplies the ratios since the last computed step
into an accumulated ratio R and adds |1 - R| to an accumulated error E; while E stays below the
threshold and at most `max_skips` steps in a row were skipped, the forward skips its blocks and
adds the residual cached at the last computed step to the embedded tokens (the head still runs).
Otherwise it computes, caches the new residual and resets R and E.

Rules that hold whatever the calibration says:
- one residual per expert and guidance branch ("cond" / "uncond"); a skip never reuses another
  expert's residual, and the first steps of each expert (`retain`, at least one) always compute;
- with CFG batching both branches of a step skip together or compute together;
- `off` attaches nothing: bit-identical to no cache (tested).

Memory: one residual [1, L, D] per branch in the DiT's compute dtype (bf16: 2 bytes per token and
channel; 0.16 GiB per branch for TI2V-5B 720p, 0.72 GiB for A14B 720p), on the GPU when the plan
keeps every block resident, else in host memory (copied in at a skip, out after a computed step:
a few tens of ms against a forward of seconds). A skipped forward runs no block, so a streamed
plan streams nothing for it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from wan_lite.api import CACHE_MODES
from wan_lite.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    """Magnitude ratios per step of the calibrated schedule, per branch; `switch_step`: the first
    low-noise step of an A14B run (the ratios there compare two experts and are not used)."""

    cond: tuple[float, ...]
    uncond: tuple[float, ...]
    switch_step: int | None = None


@dataclass(frozen=True)
class Setting:
    """threshold: the accumulated error under which a forward may skip; max_skips: skips in a
    row; retain: the share of each expert's steps (of the whole run for TI2V-5B) computed first,
    high- and low-noise expert."""

    threshold: float
    max_skips: int
    retain: tuple[float, float]


# MagCache's magnitude ratios for Wan 2.2, one per step and guidance branch: the mean ratio of
# the norms of consecutive steps' block residuals, ||r_t|| / ||r_t-1||, measured by the MagCache
# authors on the released weights (UniPC, the official shift and step count: TI2V-5B 50 steps,
# A14B 40 steps; a 1 stands for the first step, which has no predecessor). Source: MagCache
# (Zehong Ma et al., "MagCache: Fast Video Generation with Magnitude-Aware Cache", NeurIPS 2025),
# their published Wan 2.2 calibration; docs/step_cache.md says where and how. Random test weights
# cannot show this behaviour, which is why the rule rests on these published figures.
_MAG_RATIOS: dict[str, Calibration] = {
    "ti2v-5b": Calibration(
        cond=(
            1, 0.99505, 0.99441, 0.99558, 0.99499, 0.99534, 0.99468, 0.99463, 0.9946, 0.99408, 0.9945, 0.99409,
            0.99403, 0.99382, 0.99349, 0.99377, 0.9933, 0.99303, 0.99217, 0.992, 0.99201, 0.99133, 0.99112,
            0.99155, 0.98958, 0.98959, 0.98838, 0.98826, 0.9883, 0.98711, 0.98562, 0.98511, 0.98414, 0.98284,
            0.98104, 0.97981, 0.97849, 0.97557, 0.97398, 0.97171, 0.96917, 0.96511, 0.96263, 0.95839, 0.95483,
            0.94942, 0.9468, 0.94583, 0.94843, 0.96949,
        ),
        uncond=(
            1, 0.99389, 0.9957, 0.99551, 0.9945, 0.99548, 0.9946, 0.99458, 0.99453, 0.99404, 0.99441, 0.99398,
            0.99397, 0.99377, 0.99343, 0.99378, 0.99328, 0.99301, 0.99216, 0.99201, 0.99202, 0.99132, 0.9911,
            0.99155, 0.98957, 0.98958, 0.98835, 0.98825, 0.98828, 0.98709, 0.98561, 0.9851, 0.98412, 0.98282,
            0.98101, 0.97979, 0.97849, 0.97554, 0.97395, 0.97166, 0.96913, 0.96507, 0.96257, 0.95835, 0.95475,
            0.94936, 0.94678, 0.94594, 0.94872, 0.97015,
        ),
        ),
    "ti2v-5b+image": Calibration(
        cond=(
            1, 0.99512, 0.99559, 0.99595, 0.99512, 0.99546, 0.99543, 0.99496, 0.99504, 0.99444, 0.99481,
            0.99435, 0.9943, 0.99411, 0.99373, 0.99413, 0.99363, 0.99335, 0.99244, 0.99229, 0.99239, 0.99163,
            0.99149, 0.99191, 0.9898, 0.9899, 0.98849, 0.98846, 0.98861, 0.9874, 0.98588, 0.98539, 0.98444,
            0.9831, 0.98119, 0.98001, 0.97862, 0.97555, 0.97392, 0.97152, 0.96871, 0.96435, 0.96129, 0.95639,
            0.95176, 0.94446, 0.93972, 0.93575, 0.93537, 0.96655,
        ),
        uncond=(
            1, 0.99559, 0.99561, 0.99577, 0.99512, 0.99534, 0.99531, 0.99491, 0.99499, 0.99449, 0.99481,
            0.99435, 0.99431, 0.99406, 0.99376, 0.99405, 0.99359, 0.99331, 0.99243, 0.99229, 0.99236, 0.9916,
            0.99151, 0.99192, 0.98981, 0.98987, 0.98849, 0.98846, 0.98861, 0.98738, 0.98589, 0.98534, 0.98439,
            0.98309, 0.98118, 0.98, 0.97859, 0.97558, 0.97388, 0.97145, 0.9687, 0.96434, 0.96127, 0.95638,
            0.95175, 0.94452, 0.93974, 0.9359, 0.93552, 0.96616,
        ),
        ),
    "t2v-a14b": Calibration(
        cond=(
            1, 1.00124, 0.99822, 0.99696, 0.99703, 0.9966, 0.99602, 0.99578, 0.99484, 0.99633, 0.99659, 0.99534,
            0.99584, 0.99681, 0.99563, 0.9944, 0.99594, 0.99466, 0.99453, 0.99389, 0.99391, 0.99354, 0.99283,
            0.99268, 0.99057, 0.99125, 0.65523, 0.98808, 0.98765, 0.9851, 0.98311, 0.9805, 0.97776, 0.97278,
            0.96731, 0.95857, 0.94385, 0.92118, 0.88108, 0.80263,
        ),
        uncond=(
            1, 1.00155, 0.99851, 0.99687, 0.99732, 0.99679, 0.99658, 0.99664, 0.9949, 0.996, 0.99683, 0.99549,
            0.99577, 0.99694, 0.99554, 0.99473, 0.9964, 0.99461, 0.99481, 0.99365, 0.99406, 0.99361, 0.99278,
            0.99263, 0.99091, 0.99126, 0.65252, 0.98852, 0.98736, 0.98535, 0.98339, 0.9806, 0.97771, 0.97286,
            0.96728, 0.95855, 0.94385, 0.921, 0.88076, 0.80181,
        ),
        switch_step=26,
        ),
    "i2v-a14b": Calibration(
        cond=(
            1, 0.99191, 0.99356, 0.99326, 0.99251, 0.99393, 0.9943, 0.99276, 0.99389, 0.99274, 0.99316, 0.99379,
            0.99268, 0.99222, 0.99175, 0.91076, 0.98931, 0.99087, 0.98852, 0.98895, 0.98806, 0.9871, 0.98613,
            0.98434, 0.983, 0.98185, 0.98131, 0.9783, 0.97619, 0.97264, 0.97088, 0.96568, 0.96045, 0.95322,
            0.94579, 0.93297, 0.91699, 0.89174, 0.8541, 0.79823,
        ),
        uncond=(
            1, 0.99144, 0.99337, 0.99285, 0.99264, 0.99366, 0.9943, 0.99288, 0.99393, 0.99289, 0.9931, 0.99377,
            0.99271, 0.99227, 0.9916, 0.91046, 0.98933, 0.99088, 0.98855, 0.98896, 0.98808, 0.98711, 0.98618,
            0.98435, 0.98307, 0.98187, 0.98131, 0.97835, 0.9762, 0.9727, 0.97098, 0.9658, 0.96055, 0.95335,
            0.94594, 0.93311, 0.9172, 0.89202, 0.85446, 0.79902,
        ),
        switch_step=15,
        ),
}

# "balanced": MagCache's published Wan 2.2 threshold and run length (error 0.06, 2 skips in a row);
# the share of each expert computed first is theirs for TI2V-5B (0.2) and shorter for A14B (0.2 of
# each expert where they keep 0.4 for T2V; half the high-noise expert where they keep all of it for
# I2V), so that a whole 720p job takes <= 0.6x the cache-off one. "fast": twice the error, 3 skips
# in a row, less computed first. Forwards computed at the official steps: docs/step_cache.md.
SETTINGS: dict[str, dict[str, Setting]] = {
    "balanced": {
        "ti2v-5b": Setting(0.06, 2, (0.2, 0.2)),
        "t2v-a14b": Setting(0.06, 2, (0.2, 0.2)),
        "i2v-a14b": Setting(0.06, 2, (0.5, 0.1)),
    },
    "fast": {
        "ti2v-5b": Setting(0.12, 3, (0.1, 0.1)),
        "t2v-a14b": Setting(0.12, 3, (0.1, 0.1)),
        "i2v-a14b": Setting(0.12, 3, (0.25, 0.1)),
    },
}


def _nearest(values: tuple[float, ...], n: int) -> list[float]:
    """`values` resampled to n points by nearest index (the ends kept)."""
    if n <= 0:
        return []
    if n == 1 or len(values) == 1:
        return [values[0]] * n
    scale = (len(values) - 1) / (n - 1)
    return [values[int(math.floor(i * scale + 0.5))] for i in range(n)]


def _ratios(cal: Calibration, branch: str, segments: list[tuple[int, int]]) -> list[float]:
    """Per step of this job: the calibrated ratios of each expert's segment, resampled to the
    job's segment (so the switch falls where this job switches)."""
    values = cal.cond if branch == "cond" else cal.uncond
    cal_segments = [values] if cal.switch_step is None else [values[: cal.switch_step], values[cal.switch_step:]]
    out: list[float] = []
    for (start, end), seg in zip(segments, cal_segments, strict=False):
        out += _nearest(seg, end - start)
    return out


def expert_segments(experts: list[str]) -> list[tuple[int, int]]:
    """[(start, end)] of each run of one expert over the steps, in order."""
    segments: list[tuple[int, int]] = []
    for i, e in enumerate(experts):
        if i == 0 or e != experts[i - 1]:
            segments.append((i, i + 1))
        else:
            segments[-1] = (segments[-1][0], i + 1)
    return segments


def calibration_for(model: str, image: bool) -> Calibration:
    return _MAG_RATIOS["ti2v-5b+image" if model == "ti2v-5b" and image else model]


@dataclass
class _Branch:
    """The running state of one expert and guidance branch."""

    ratio: float = 1.0
    error: float = 0.0
    skips: int = 0
    residual: torch.Tensor | None = None

    def reset(self) -> None:
        self.ratio, self.error, self.skips = 1.0, 0.0, 0


def plan_skips(model: str, mode: str, experts: list[str], *, image: bool = False) -> list[bool]:
    """Which steps skip their DiT forward, for the cond branch (the uncond branch's calibrated
    ratios differ from it in the fourth decimal, and with CFG batching both follow the pair).
    Pure arithmetic: the planner counts the forwards with it, and a test checks it against a
    computation by hand."""
    cache = StepCache(model, mode, experts, image=image)
    return [cache.decide(i, ("cond",)) for i in range(len(experts))]


class StepCache:
    """The MagCache rule for one job over its steps (`experts`: the expert of each step).
    `attach(pipe)` registers it on the pipeline's step hooks and each DiT's block loop;
    `detach()` takes it off and frees the residuals."""

    _CHUNK = 8192  # tokens per slice when a residual is taken (bounds the float32 temporary)

    def __init__(self, model: str, mode: str, experts: list[str], *, image: bool = False,
                 residual_device: torch.device | str | None = None) -> None:
        if mode not in SETTINGS:
            raise InputError(f"Unknown step cache setting {mode!r}.", f"Use one of: {', '.join(CACHE_MODES)}.")
        if model not in SETTINGS[mode]:
            raise InputError(f"The step cache has no calibration for {model}.", "Run it with the cache off.")
        self.setting = SETTINGS[mode][model]
        self.mode = mode
        self.experts = list(experts)
        segments = expert_segments(self.experts)
        cal = calibration_for(model, image)
        self._ratios = {b: _ratios(cal, b, segments) for b in ("cond", "uncond")}
        # the first steps of each expert's segment always compute (at least one)
        self.retained: set[int] = set()
        for k, (start, end) in enumerate(segments):
            share = self.setting.retain[min(k, 1)]
            self.retained.update(range(start, start + max(1, int((end - start) * share))))
        self.residual_device = residual_device
        self._state: dict[tuple[str, str], _Branch] = {}
        self._decided: dict[tuple[int, tuple[str, ...]], bool] = {}
        self._current: tuple[int, tuple[str, ...]] | None = None
        self._handles: list[Any] = []
        self._pipe: Any = None

    # ------------------------------------------------------------------ the rule
    def decide(self, step: int, branches: tuple[str, ...]) -> bool:
        """Whether the DiT call of `branches` at `step` may skip its blocks, by the ratios alone;
        updates the accumulated ratio and error as that call will (reset where it computes).
        Asked again for the same call (a retry after an out-of-memory error), it answers the same."""
        key = (step, branches)
        if key not in self._decided:
            self._decided[key] = self._decide(step, branches)
        return self._decided[key]

    def _decide(self, step: int, branches: tuple[str, ...]) -> bool:
        states = [self._state.setdefault((self.experts[step], b), _Branch()) for b in branches]
        skip = step not in self.retained
        if skip:
            for b, s in zip(branches, states, strict=True):
                s.ratio *= self._ratios[b][step]
                s.skips += 1
                s.error += abs(1.0 - s.ratio)
                skip = skip and s.error < self.setting.threshold and s.skips <= self.setting.max_skips
        if not skip:
            for s in states:
                s.reset()
        return skip

    # ------------------------------------------------------------------ the hooks
    def attach(self, pipe: Any) -> StepCache:
        self._pipe = pipe
        pipe.step_hooks.append(self._step_hook)
        self._handles = [dit.register_block_loop_hook(self._block_hook) for dit in pipe.dits.values()]
        return self

    def detach(self) -> None:
        if self._pipe is not None and self._step_hook in self._pipe.step_hooks:
            self._pipe.step_hooks.remove(self._step_hook)
        for h in self._handles:
            h.remove()
        self._handles, self._pipe, self._state = [], None, {}

    def __enter__(self) -> StepCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def _step_hook(self, info: Any, call: Callable[[], torch.Tensor]) -> torch.Tensor:
        self._current = (info.index, info.branches)
        try:
            return call()
        finally:
            self._current = None

    def _block_hook(self, state: Any, inner: Callable[[Any], torch.Tensor]) -> torch.Tensor:
        if self._current is None:  # a DiT call outside the denoising loop: not ours to cache
            return inner(state)
        step, branches = self._current
        entries = [self._state.setdefault((self.experts[step], b), _Branch()) for b in branches]
        if self.decide(step, branches) and all(e.residual is not None for e in entries):
            parts = [e.residual.to(state.x.device, non_blocking=True) for e in entries]  # type: ignore[union-attr]
            return state.x + (torch.cat(parts) if len(parts) > 1 else parts[0])
        for e in entries:
            e.reset()
        # A bf16 x (block 0's input in a bf16 model) is not touched by the blocks; an fp32 one
        # is updated in place, so it is kept first.
        x0 = state.x.clone() if state.x.dtype == torch.float32 else state.x
        out = inner(state)
        device = self.residual_device or out.device
        for row, e in enumerate(entries):
            e.residual = self._residual(out[row:row + 1], x0[row:row + 1], state.context.dtype, device)
        return out

    def _residual(self, out: torch.Tensor, x0: torch.Tensor, dtype: torch.dtype,
                  device: torch.device | str) -> torch.Tensor:
        """(out - x0) in `dtype` on `device`, taken slice by slice of tokens."""
        res = torch.empty(out.shape, dtype=dtype, device=device)
        for s in range(0, out.shape[1], self._CHUNK):
            e = s + self._CHUNK
            res[:, s:e] = (out[:, s:e] - x0[:, s:e].float()).to(dtype)
        return res


def step_experts(model: str, steps: int, shift: float, sampler: str = "unipc") -> list[str]:
    """The expert of each step of a job ("main" for one-DiT models), as the pipeline switches."""
    from wan_lite.registry import get_spec
    from wan_lite.sampling import make_sampler

    spec = get_spec(model)
    return [spec.dit_role_at(int(t)) for t in make_sampler(sampler, steps, shift).timesteps]


def computed_share(model: str, mode: str, steps: int, shift: float, sampler: str = "unipc", *,
                   image: bool = False) -> float:
    """The share of DiT forwards a job computes with this step cache setting (1.0 when off)."""
    if mode == "off":
        return 1.0
    experts = step_experts(model, steps, shift, sampler)
    return 1.0 - sum(plan_skips(model, mode, experts, image=image)) / len(experts)
