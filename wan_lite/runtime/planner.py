"""Memory planner: from a model's sizes, a request and a machine, decide how to run (a `Plan`).

`plan(model, request, hw, profile=None)` is pure (no torch, no probing): it picks the quantization,
the DiT blocks kept on the GPU (the rest streamed `prefetch` ahead from pinned or pageable RAM),
where the idle A14B expert waits, the text encoder's placement, VAE tile and dtype, FFN chunk and
CFG batching, and estimates peak VRAM, peak RAM and seconds (the preflight estimate). Choices are
greedy: quality first (bf16 unless it does not fit or is >25 % slower; on a CPU bf16 unless a
profile forces a quantization; 4-bit "int4" only where no bf16 / 8-bit plan holds the DiT in RAM
and the one streaming it from disk is >1.5x slower, or nothing else fits), then the token chunk
and CFG batching whose denoise is fastest with as many resident blocks as fit beside them, then
the largest VAE tile. `leaner(plan)` is the next plan to drop to after an out-of-memory error
mid-run. `fp8_attention_opted_in()` reads the user's fp8-attention switch that
`PlanRequest.fp8_attention` carries.

The memory and time model each choice is estimated with is plan_model.py's.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import replace
from typing import Any

from wan_lite.runtime.footprint import QUANTS, VAE_PARAMS, K, ModelFootprint  # noqa: F401  (re-exported)
from wan_lite.runtime.hardware import GIB, Hardware, MemoryProfile, get_profile
from wan_lite.runtime.plan_model import (
    CHOICE_FIELDS,
    CHUNKS,
    Choices,
    Geo,
    Plan,
    PlanRequest,
    default_chunk,
    estimate,
    evaluate,
    usable,
)
from wan_lite.units import duration

log = logging.getLogger(__name__)

# Set to 1 to let the fp8 compute path use an fp8 attention kernel (README, Memory); the plans
# then count its fp8 copies of q, k and v (`PlanRequest.fp8_attention`).
FP8_ATTENTION_ENV = "WAN_LITE_FP8_ATTENTION"


def fp8_attention_opted_in() -> bool:
    """Whether the user set WAN_LITE_FP8_ATTENTION=1 (plans then count fp8 attention's memory)."""
    return os.environ.get(FP8_ATTENTION_ENV) == "1"


# ------------------------------------------------------------------------------ choosing
_TEXT_OPTIONS = (("gpu", "bf16"), ("stream", "bf16"), ("gpu", "int8"), ("stream", "int8"), ("cpu", "bf16"))


def _stage(m: ModelFootprint, r: PlanRequest, hw: Hardware, ch: Choices, stage: str) -> float:
    return estimate(m, r, hw, ch)["vram"].get(stage, 0.0)


def _max_resident(m: ModelFootprint, r: PlanRequest, hw: Hardware, ch: Choices, usable: float) -> int:
    """Most blocks the denoise stage can keep on the GPU; -1 when even full streaming does not fit."""
    n = m.num_layers
    if _stage(m, r, hw, replace(ch, resident_blocks=n), "denoise") <= usable:
        return n
    base = _stage(m, r, hw, replace(ch, resident_blocks=0), "denoise")
    return -1 if base > usable else min(n - 1, int((usable - base) // m.block_bytes(ch.quantization)))


def _choose_for(m: ModelFootprint, r: PlanRequest, hw: Hardware, quant: str, forced: dict[str, Any]) -> Choices:
    """Greedy choices for one quantization: resident blocks first, then CFG batching, VAE, text
    encoder, keeping the DiT on the GPU, and what RAM allows (idle expert, kept encoder, pinning)."""
    uv, ur = usable(hw)
    n = m.num_layers

    def fix(ch: Choices) -> Choices:  # forced fields win, then what the request and n allow
        ch = replace(ch, **forced)
        if not r.cfg or r.cfg_batch is False:
            ch = replace(ch, cfg_batch=False)
        return replace(ch, keep_resident=False) if ch.resident_blocks < n else ch

    def ram_ok(ch: Choices) -> bool:
        return estimate(m, r, hw, ch)["ram"] <= ur

    ch = fix(Choices(quantization=quant, idle_expert="disk" if m.experts > 1 else "none",
                     ffn_chunk_tokens=default_chunk(m, Geo.of(m, r)), pinned=False))
    if not hw.has_gpu:
        ch = fix(replace(ch, resident_blocks=n, prefetch=0, text_encoder="cpu", vae_dtype="fp32"))
        if m.experts > 1 and "idle_expert" not in forced and ram_ok(replace(ch, idle_expert="ram")):
            ch = replace(ch, idle_expert="ram")
        return ch if ram_ok(ch) or "vae_dtype" in forced else replace(ch, vae_dtype="bf16")

    def pin(ch: Choices) -> Choices:  # streamed blocks wait in pinned RAM unless they would take too much
        if "pinned" in forced or ch.resident_blocks >= n:
            return ch
        streamed = (n - ch.resident_blocks) * m.block_bytes(ch.quantization)
        return replace(ch, pinned=streamed <= K.pin_fraction * hw.ram_available_gib * GIB)

    def denoise(ch: Choices, chunk: int | None, batch: bool) -> Choices | None:
        """The most resident blocks with `chunk` and CFG batching or not, then the idle expert on
        the GPU where it fits; None when the denoise stage does not fit even with every block streamed."""
        ch = replace(ch, ffn_chunk_tokens=chunk, cfg_batch=batch)
        best = _max_resident(m, r, hw, ch, uv)
        if best < 0:
            return None
        res = min(n, forced.get("resident_blocks", best))
        ch = fix(replace(ch, resident_blocks=res, prefetch=1 if res < n else 0))
        if m.experts > 1 and res == n and _stage(m, r, hw, replace(ch, idle_expert="gpu"), "denoise") <= uv:
            ch = fix(replace(ch, idle_expert="gpu"))
        return ch

    # The token chunk and CFG batching: the fastest denoise that fits (chunks cost time; resident
    # blocks save transfers, and so does a batch of 2, which streams each block once per step),
    # from the lowest-activation chunk unbatched on; forced ones are taken as given, a requested
    # batch where it fits.
    start = ch.ffn_chunk_tokens
    chunks = [start] if "ffn_chunk_tokens" in forced else [start] + [
        c for c in CHUNKS if c != start and (c is None or c < Geo.of(m, r).tokens)]
    batches = ([forced["cfg_batch"]] if "cfg_batch" in forced else [False] if not r.cfg or r.cfg_batch is False
               else [True, False] if r.cfg_batch else [False, True])
    found, best_s = None, math.inf
    for batch in batches:
        for c in chunks:
            o = denoise(ch, c, batch)
            s = estimate(m, r, hw, pin(o))["secs"]["denoise"] if o else math.inf
            if s < best_s * 0.999:
                found, best_s = o, s
        if found is not None and r.cfg_batch and batch:
            break  # batching was asked for, and it fits
    if found is None:  # nothing fits: the smallest activations, every block streamed
        c = start if "ffn_chunk_tokens" in forced else CHUNKS[-1]
        res = min(n, forced.get("resident_blocks", 0))
        found = fix(replace(ch, ffn_chunk_tokens=c, resident_blocks=res, prefetch=1 if res < n else 0,
                            cfg_batch=False))
    ch = found
    res = ch.resident_blocks

    def pick(ch: Choices) -> Choices:
        """VAE (untiled fp32 ... smallest tile) and text encoder options that fit their stages."""
        big = max(r.width, r.height)
        tiles = [t for t in K.vae_tiles if t < big]
        # fp32 first: the official VAE's precision. A speed-first job (Turbo) takes bf16, twice as
        # fast untiled on an H100 (docs/benchmarks.md gives its error against fp32).
        untiled = [("bf16", None), ("fp32", None)] if r.speed_first else [("fp32", None), ("bf16", None)]
        vaes = untiled + [("bf16", t) for t in tiles] + [("fp32", t) for t in tiles]
        vaes = [v for v in vaes if forced.get("vae_dtype", v[0]) == v[0] and forced.get("vae_tile", v[1]) == v[1]]
        for dtype, tile in vaes or [(ch.vae_dtype, ch.vae_tile)]:
            ch = fix(replace(ch, vae_dtype=dtype, vae_tile=tile))
            if max(_stage(m, r, hw, ch, "decode"), _stage(m, r, hw, ch, "encode")) <= uv:
                break
        texts = [t for t in _TEXT_OPTIONS if forced.get("text_encoder", t[0]) == t[0]
                 and forced.get("text_encoder_quant", t[1]) == t[1]]
        options = [fix(replace(ch, text_encoder=te, text_encoder_quant=tq)) for te, tq in texts] or [ch]
        fit = [o for o in options if _stage(m, r, hw, o, "text") <= uv] or options[-1:]
        return next((o for o in fit if ram_ok(o)), min(fit, key=lambda o: estimate(m, r, hw, o)["ram"]))

    ch = pick(replace(ch, keep_resident=False))
    if res == n and forced.get("keep_resident", True):
        stages = ("text", "encode", "decode")
        kept = replace(ch, keep_resident=True)
        if all(_stage(m, r, hw, kept, s) <= uv for s in stages):
            ch = kept  # the other stages fit beside the DiT: no RAM copy, no re-upload
        elif not ram_ok(ch):
            kept = pick(kept)
            if all(_stage(m, r, hw, kept, s) <= uv for s in stages) and ram_ok(kept):
                ch = kept
    if not ram_ok(ch) and "vae_dtype" not in forced and ch.vae_dtype == "fp32":
        ch = replace(ch, vae_dtype="bf16")
    if m.experts > 1 and ch.idle_expert == "disk" and "idle_expert" not in forced:
        if ram_ok(replace(ch, idle_expert="ram")):
            ch = replace(ch, idle_expert="ram")
    if "keep_text_encoder" not in forced and ram_ok(replace(ch, keep_text_encoder=True)):
        ch = replace(ch, keep_text_encoder=True)
    if hw.has_gpu and ch.vae_tile and "vae_lean" not in forced and not ram_ok(ch):
        ch = replace(ch, vae_lean=True)  # the tiles' input in RAM an eighth, for a little decode time
    if hw.has_gpu and "vae_on_disk" not in forced and not ram_ok(ch):
        ch = replace(ch, vae_on_disk=True)  # no VAE in RAM, for a read of its file per decode
    if hw.has_gpu and "blocks_from" not in forced and not ram_ok(ch):
        # RAM short: the DiT's copy stays in its file and its blocks stream from there (slower
        # where the disk is slower than the forward; the time estimate counts the reads)
        disk = replace(ch, blocks_from="disk", keep_text_encoder=forced.get("keep_text_encoder", False))
        if m.experts > 1 and disk.idle_expert == "ram" and "idle_expert" not in forced:
            disk = replace(disk, idle_expert="disk")
        disk = pick(disk)
        if ram_ok(disk) or estimate(m, r, hw, disk)["ram"] < estimate(m, r, hw, ch)["ram"]:
            ch = disk
        for taken in ("vae_on_disk", "vae_lean"):  # taken before the DiT went to disk: back where RAM allows
            if getattr(ch, taken) and taken not in forced and ram_ok(replace(ch, **{taken: False})):
                ch = replace(ch, **{taken: False})
    if ch.text_encoder == "gpu" and "text_encoder" not in forced:
        # Room for umT5 beside every stage: it stays on the GPU, so a new prompt costs only its
        # forward (moving 11 GB there and back took 5-14 s a job on an H100, run 2026-12-06-a).
        kept = replace(ch, text_encoder="resident")
        if all(_stage(m, r, hw, kept, s) <= uv for s in ("text", "encode", "denoise", "decode")):
            ch = kept
    return pin(ch)


def _plan(m: ModelFootprint, r: PlanRequest, hw: Hardware, forced: dict[str, Any], profile: str | None) -> Plan:
    best = _plan_8bit(m, r, hw, forced, profile)
    if hw.has_gpu and "quantization" not in forced and not (best.fits and best.blocks_from == "ram"):
        return _int4_instead(m, r, hw, forced, profile, best)
    return best


def _int4_instead(m: ModelFootprint, r: PlanRequest, hw: Hardware, forced: dict[str, Any], profile: str | None,
                  best: Plan) -> Plan:
    """The int4 plan where no bf16 / 8-bit plan holds the DiT in RAM, else `best`.

    Where `best` fits (its blocks streamed from disk), an int4 plan (the DiT in RAM where it fits
    there, else from disk: half the reads) is taken only when `best` takes more than K.int4_slack
    times its time: int4's error is 3-10x int8's (runtime/int4.py), worth it for a large saving
    only. On a consumer card a forward takes minutes and the disk reads hide behind it, so the
    8-bit (or bf16) disk plan stays; on a fast GPU with a slow disk they do not. Where nothing
    else fits, int4 is the last resort (its blocks and prefetch slots take half of int8's VRAM).
    The plan's `quant_note` says which, in numbers."""
    tries = [forced] if "blocks_from" in forced else [{**forced, "blocks_from": "ram"}, forced]
    four = next((p for p in (evaluate(m, r, hw, _choose_for(m, r, hw, "int4", f), profile) for f in tries)
                 if p.fits), None)
    if four is None:
        return best
    where = "in RAM" if four.blocks_from == "ram" else "from disk"
    if not best.fits:
        short = [f"{need:.1f} GiB {what}, {have:.1f} usable" for need, have, what in (
            (best.peak_vram_gib, best.usable_vram_gib, "of GPU memory"), (best.peak_ram_gib, best.usable_ram_gib, "RAM"))
            if need > have]
        note = f"4-bit weights: no 8-bit plan fits ({best.quantization} needs {' and '.join(short)})"
    elif best.seconds_estimate > K.int4_slack * four.seconds_estimate:
        note = (f"4-bit weights {where}: no 8-bit DiT fits in RAM, and {best.quantization} blocks from disk "
                f"would take ~{duration(best.seconds_estimate)} against ~{duration(four.seconds_estimate)}")
    else:
        return best
    return replace(four, quant_note=note)


def _plan_8bit(m: ModelFootprint, r: PlanRequest, hw: Hardware, forced: dict[str, Any], profile: str | None) -> Plan:
    """The best plan in bf16 or the GPU's 8-bit format (or the forced quantization): the DiT in
    RAM where one fits, else its blocks from disk."""
    fast = "fp8" if hw.fp8_tensor_cores else "int8"
    # A CPU runs the weights as loaded (bf16): it quantizes only when a memory profile asks.
    order = [forced["quantization"]] if "quantization" in forced else ["bf16", fast] if hw.has_gpu else ["bf16"]
    # the DiT in RAM first; its blocks streamed from disk only where no quantization fits RAM
    tries = [forced] if "blocks_from" in forced or not hw.has_gpu else [{**forced, "blocks_from": "ram"}, forced]
    for i, f in enumerate(tries):
        plans = [evaluate(m, r, hw, _choose_for(m, r, hw, q, f), profile) for q in order]
        fitting = [p for p in plans if p.fits]
        if fitting or i == len(tries) - 1:
            break
    if not fitting:
        return plans[-1]
    # quality first: bf16 unless it is much slower than the quantized plan
    if len(fitting) > 1 and fitting[0].seconds_estimate > K.bf16_slack * fitting[1].seconds_estimate:
        return fitting[1]
    return fitting[0]


def plan(model: ModelFootprint, request: Any, hw: Hardware, profile: str | MemoryProfile | None = None) -> Plan:
    """The plan for `request` ((width, height, frames[, cfg_batch]) or a PlanRequest) on `hw`.

    profile: a memory profile (name or object; None / "auto": plan for `hw` as it is) whose
    hardware caps `hw` and whose forced fields are taken as given. Pure: no probing, no torch.
    """
    r = PlanRequest.of(request)
    prof = get_profile(profile) if profile is None or isinstance(profile, str) else profile
    if prof is not None:
        hw = prof.apply(hw)
    forced = prof.forced if prof else {}
    p = _plan(model, r, hw, forced, prof.name if prof else None)
    if not p.fits:
        p = replace(p, reason=_reason(p, model, r, hw, forced))
    log.debug("plan: %s", p.summary())
    return p


def _reason(p: Plan, m: ModelFootprint, r: PlanRequest, hw: Hardware, forced: dict[str, Any]) -> str:
    """Why `p` does not fit, in numbers, and what would make it fit."""
    need, fixes = [], []
    if p.peak_vram_gib > p.usable_vram_gib:
        stages = dict(p.stage_vram_gib)
        need.append(f"needs {p.peak_vram_gib:.1f} GiB of GPU memory ({max(stages, key=stages.get)}), "
                    f"this GPU has {p.usable_vram_gib:.1f} GiB usable ({hw.vram_free_gib:.1f} of "
                    f"{hw.vram_total_gib:.1f} GiB free)")
        if hw.vram_free_gib < hw.vram_total_gib - 1.0:
            fixes.append("close other programs using the GPU")
    if p.peak_ram_gib > p.usable_ram_gib:
        need.append(f"needs {p.peak_ram_gib:.1f} GiB RAM, this machine has {p.usable_ram_gib:.1f} GiB usable "
                    f"({hw.ram_available_gib:.1f} of {hw.ram_total_gib:.1f} GiB available)")
        if hw.ram_available_gib < hw.ram_total_gib - max(3.0, 0.2 * hw.ram_total_gib):
            fixes.append("close other programs")
    if forced and _plan(m, r, hw, {}, None).fits:
        fixes.append("choose the Auto memory profile" + (
            f" (int8/fp8 instead of {forced['quantization']})" if forced.get("quantization") == "bf16" else ""))
    area = r.width * r.height
    for w, h in sorted(m.sizes, key=lambda s: -s[0] * s[1]):
        if w * h < area and _plan(m, replace(r, width=w, height=h), hw, forced, None).fits:
            fixes.append(f"a smaller size ({w}x{h} fits)")
            break
    lo, hi = 0, (r.frames - 2) // 4  # frame counts 4k+1 below the request
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _plan(m, replace(r, frames=4 * mid + 1), hw, forced, None).fits:
            lo = mid
        else:
            hi = mid - 1
    if r.frames > 1 and _plan(m, replace(r, frames=4 * lo + 1), hw, forced, None).fits:
        fixes.append(f"fewer frames ({4 * lo + 1} fit at {r.width}x{r.height})")
    if not any(f.startswith(("a smaller", "fewer", "choose")) for f in fixes):
        more = [w for w, short in (("a GPU with more memory", p.peak_vram_gib > p.usable_vram_gib),
                                   ("more RAM", p.peak_ram_gib > p.usable_ram_gib)) if short]
        fixes.append(" and ".join(more))
    tail = fixes[0] if len(fixes) == 1 else ", ".join(fixes[:-1]) + " or " + fixes[-1]
    return "; ".join(need) + ": " + tail + "."


# ------------------------------------------------------------------------------ after an OOM
def _moves(p: Plan, hw: Hardware, stage: str) -> list[Choices]:
    """Leaner variants of `p` for `stage`, cheapest first."""
    ch, out = p.choices, list[Choices]()
    if stage != "denoise" and ch.keep_resident:
        out.append(replace(ch, keep_resident=False))
    if stage == "denoise":
        if ch.cfg_batch:
            out.append(replace(ch, cfg_batch=False))
        if ch.idle_expert == "gpu":
            out.append(replace(ch, idle_expert="ram", keep_resident=False))
        # smaller token chunks (a few % slower) before streaming more blocks
        tokens = Geo.of(p.model, p.request).tokens if p.model and p.request else 1 << 30
        smaller = [c for c in CHUNKS[1:] if c < min(ch.ffn_chunk_tokens or tokens, tokens)]
        if smaller:
            out.append(replace(ch, ffn_chunk_tokens=smaller[0]))
        step = max(1, math.ceil(ch.resident_blocks / 4))
        out += [replace(ch, resident_blocks=k, prefetch=max(1, ch.prefetch), keep_resident=False)
                for k in range(ch.resident_blocks - step, -1, -step)]
        if ch.quantization == "bf16" and ch.blocks_from == "ram":  # a disk plan streams its cache's format
            out.append(replace(ch, quantization="fp8" if hw.fp8_tensor_cores else "int8"))
        if ch.prefetch > 1:
            out.append(replace(ch, prefetch=ch.prefetch - 1))
    elif stage in ("decode", "encode"):
        if ch.vae_dtype == "fp32":
            out.append(replace(ch, vae_dtype="bf16"))
        # every smaller tile: neighbours in K.vae_tiles can cut the frame into the same tiles
        out += [replace(ch, vae_tile=t) for t in K.vae_tiles if t < (ch.vae_tile or 1 << 30)]
    elif stage == "text":
        now = ("gpu" if ch.text_encoder == "resident" else ch.text_encoder, ch.text_encoder_quant)
        for te, tq in _TEXT_OPTIONS[_TEXT_OPTIONS.index(now) + 1:]:
            out.append(replace(ch, text_encoder=te, text_encoder_quant=tq))
    if ch.text_encoder == "resident":  # first of all: give the text encoder's place back
        out.insert(0, replace(ch, text_encoder="gpu"))
    return out


def leaner(p: Plan, stage: str | None = None) -> Plan | None:
    """The next plan to drop to after an out-of-memory error: for `stage` ("denoise", "decode",
    "encode", "text") a plan whose peak there is strictly lower; for None one whose overall peak
    is strictly lower. None when nothing leaner exists."""
    if p.model is None or p.request is None or p.hardware is None or not p.hardware.has_gpu:
        return None
    m, r, hw, cur = p.model, p.request, p.hardware, p

    def settle(ch: Choices) -> Choices:  # blocks newly streamed: pin them if RAM allows
        if p.resident_blocks >= m.num_layers > ch.resident_blocks:
            streamed = (m.num_layers - ch.resident_blocks) * m.block_bytes(ch.quantization)
            ch = replace(ch, pinned=streamed <= K.pin_fraction * hw.ram_available_gib * GIB)
        if ch.idle_expert == "ram" and estimate(m, r, hw, ch)["ram"] > usable(hw)[1]:
            ch = replace(ch, idle_expert="disk")
        return ch

    for _ in range(4 * len(CHOICE_FIELDS)):
        stages = dict(cur.stage_vram_gib)
        target = stage or max(stages, key=lambda s: stages[s])
        nxt = next((q for q in (evaluate(m, r, hw, settle(c), p.profile) for c in _moves(cur, hw, target))
                    if dict(q.stage_vram_gib).get(target, 0.0) < stages.get(target, 0.0)
                    and (q.peak_ram_gib <= max(q.usable_ram_gib, cur.peak_ram_gib))), None)
        if nxt is None:
            return None
        if stage is not None or nxt.peak_vram_gib < p.peak_vram_gib:
            return nxt if nxt.fits else replace(nxt, reason=_reason(nxt, m, r, hw, {}))
        cur = nxt
    return None
