"""The work behind `python -m wan_lite generate` and `decode`: progress bar, timings summary."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wan_lite.api import STAGE_TITLES, GenerateRequest, Progress


class _ProgressBar:
    """One tqdm bar per stage on stderr; denoising shows step, rate and ETA."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self.bar = None
        self.stage: str | None = None

    def __call__(self, p: Progress) -> None:
        if p.stage != self.stage:
            self.close()
            self.stage = p.stage
            self.bar = self._tqdm(total=p.total, desc=STAGE_TITLES.get(p.stage, p.stage), file=sys.stderr,
                                  unit="step" if p.total > 1 else "", leave=True, dynamic_ncols=True)
        if self.bar is not None:
            self.bar.n = p.step
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _summary(result, notes: bool = True) -> None:
    print(f"video:   {result.video_path}")
    print(f"latents: {result.latents_path}")
    print(f"seed:    {result.seed}   size: {result.width}x{result.height}, {result.frames} frames @ {result.fps} fps")
    print("timings:")
    for stage, seconds in result.timings.items():
        print(f"  {STAGE_TITLES.get(stage, stage):<20} {seconds:8.1f} s")
    print(f"  {'total':<20} {sum(result.timings.values()):8.1f} s")
    for note in result.notes if notes else []:
        print(f"note: {note}")


def _engine(model_dir: Path | None, name: str | None, out: Path | None, device: str | None,
            components: dict[str, Path] | None = None):
    from wan_lite.engine import Engine

    folders = {name: model_dir} if (model_dir and name) else {}
    return Engine(models_root=Path("models"), output_dir=(out.parent if out else Path("outputs")),
                  device=device, folders=folders, components={name: components} if components else None)


def _which_model(args: argparse.Namespace, components: dict[str, Path]) -> str:
    from wan_lite.errors import InputError
    from wan_lite.loading.components import resolve_sources
    from wan_lite.loading.layout import detect_spec

    if args.model:
        return args.model
    if args.model_dir is not None and not components:
        return detect_spec(args.model_dir).name
    if args.model_dir is None and not components:
        raise InputError("Say which model to run.", "Give --model-dir FOLDER, or --model NAME with component files.")
    return resolve_sources(args.model_dir, components)[0].name


def components_from_args(args: argparse.Namespace) -> dict[str, Path]:
    """The component files given on the command line (`cli._add_component_args`), slot -> path."""
    pairs = {"dit": args.dit, "dit_high": args.high_noise, "dit_low": args.low_noise, "vae": args.vae,
             "text_encoder": args.text_encoder, "tokenizer": args.tokenizer}
    return {slot: path for slot, path in pairs.items() if path is not None}


def run_generate(args: argparse.Namespace) -> int:
    from wan_lite.loading.discovery import RememberedChoices

    components = components_from_args(args)
    choices = RememberedChoices()
    name = _which_model(args, components)
    if not components and args.model_dir is None:
        components = choices.resolve(name)  # the files remembered for this model
    if args.remember and components:
        from wan_lite.loading.formats import detect, pick

        for slot, path in components.items():
            found = pick(detect(path), "dit" if slot.startswith("dit") else slot)
            if found is not None:
                choices.choose(name, slot, found)
        choices.save()

    width, height = args.size if args.size else (None, None)
    request = GenerateRequest(prompt=args.prompt, model=name, negative_prompt=args.negative_prompt,
                              image=str(args.image) if args.image else None, width=width, height=height,
                              frames=args.frames, steps=args.steps, guidance=args.guidance,
                              guidance_low=args.guidance_low, shift=args.shift, seed=args.seed,
                              sampler=args.sampler, memory_profile=args.profile, cache=args.cache,
                              loras=tuple(args.lora), turbo=args.turbo,
                              turbo_phases=args.turbo_phases, gpus=args.gpus)
    engine = _engine(args.model_dir, name, args.out, args.device, components)
    job = engine.resolve(request)
    for note in job.notes:
        print(f"note: {note}", file=sys.stderr)
    bar = _ProgressBar()
    try:
        result = engine.generate(job, on_progress=bar, out_path=args.out, overwrite=args.overwrite)
    finally:
        bar.close()
    _summary(result, notes=False)
    return 0


def run_decode(args: argparse.Namespace) -> int:
    engine = _engine(None, None, args.out or args.latents, args.device)
    result = engine.decode_latents(args.latents, out_path=args.out, model_dir=args.model_dir,
                                   overwrite=args.overwrite)
    _summary(result)
    return 0
