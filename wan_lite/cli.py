"""Command line: `python -m wan_lite generate | decode | info | models | plan`.

User mistakes (bad paths, empty prompts, missing files, memory that cannot fit) print a plain
message and exit with status 2; only genuine bugs show a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from wan_lite import paths
from wan_lite.api import CACHE_MODES, SAMPLERS
from wan_lite.errors import WanLiteError
from wan_lite.registry import MODELS
from wan_lite.sizing import read_size

log = logging.getLogger("wan_lite")


def _home(path: Path) -> str:
    """`path` with the home folder written as ~ (shorter in --help; not on Windows, whose shells
    have no ~)."""
    if os.name == "nt":
        return str(path)
    try:
        return "~/" + path.relative_to(Path.home()).as_posix()
    except ValueError:
        return str(path)


def _size(text: str) -> tuple[int, int]:
    size = read_size(text)
    if size is None or min(size) <= 0:
        raise argparse.ArgumentTypeError(f"size must look like 1280x704 (width x height), got {text!r}")
    return size


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="make a video from a prompt (and optionally an image)",
                       description="Make a video. Unset options take the model's official defaults. The video "
                                   "(.mp4), its settings (.json) and its latents (.latents.safetensors, for "
                                   f"`decode`) go to {_home(paths.output_dir())}, the app's outputs folder, "
                                   "unless --out or --output-dir says otherwise.")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="one model's folder: the official layout (e.g. models/Wan2.2-TI2V-5B) or a diffusers "
                        "pipeline folder (model_index.json)")
    p.add_argument("--model", choices=list(MODELS), default=None,
                   help="which model (default: read from the folder or the DiT file; without either, the model "
                        "installed in --models-dir, TI2V-5B where it is there)")
    p.add_argument("--models-dir", type=Path, default=None,
                   help="the folder that holds the model folders, as the app's --models-dir; with --model and "
                        f"no --model-dir its model runs (default: {_home(paths.models_dir())})")
    _add_component_args(p)
    p.add_argument("--remember", action="store_true",
                   help="remember the component files given here for this model (used when none are given)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="what the video shows")
    what.add_argument("--prompts-file", type=Path, metavar="FILE",
                      help="many videos: a .txt file with one prompt a line (# comments), or a .jsonl file with "
                           'one JSON object a line of request fields over these options ({"prompt": "...", '
                           '"seed": 7, "size": "704x1280"}); every line is checked before the first runs, a '
                           "failed job is reported and the next one runs; with --gpus N the jobs run one per "
                           "GPU where that is faster than splitting each")
    p.add_argument("--negative-prompt", default=None, help="what to avoid (default: the official negative prompt)")
    p.add_argument("--image", type=Path, default=None, help="start image: image-to-video")
    p.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT, e.g. 1280x704 (TI2V-5B) or 1280x720")
    p.add_argument("--frames", type=int, default=None, help="frame count, 4n+1 (121 for TI2V-5B, 81 for A14B)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (50 for TI2V-5B, 40 for A14B)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (A14B: the high-noise expert's)")
    p.add_argument("--guidance-low", type=float, default=None, help="A14B only: the low-noise expert's guidance")
    p.add_argument("--shift", type=float, default=None, help="noise schedule shift (5.0; 12.0 for T2V-A14B)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random; printed at the end)")
    p.add_argument("--sampler", default=None, choices=list(SAMPLERS), help="flow sampler (default: unipc; euler with --turbo)")
    p.add_argument("--turbo", action=argparse.BooleanOptionalAction, default=None,
                   help="run a speed LoRA as trained: 4 steps, guidance 1, shift 5, euler, for every option not "
                        "given (default: on when a --lora is a known speed LoRA: Lightning, lightx2v distill)")
    p.add_argument("--turbo-phases", type=int, default=None, choices=(2, 3),
                   help="3: Turbo with a first guided step without the speed LoRA, against its slow motion "
                        "(8 steps, shift 3, guidance 3.5 then 1, A14B experts switched at t=800; implies --turbo)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH|:HIGH,LOW]",
                   help="apply a LoRA (.safetensors, any common key layout); repeatable. STRENGTH defaults to 1; "
                        "for A14B, HIGH,LOW are the high- and low-noise experts' strengths (0 leaves one alone)")
    p.add_argument("--cache", default="off", choices=list(CACHE_MODES),
                   help="step cache: skip DiT forwards that would change little and reuse their result "
                        "(balanced: about half the forwards; fast: about a third; off: every forward)")
    p.add_argument("--profile", default="auto", help="memory profile name or 'auto' (see `plan`)")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when present)")
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="split one video over N GPUs of this machine (sequence and CFG parallel, docs/multigpu.md)")
    p.add_argument("--out", type=Path, default=None,
                   help="output .mp4; its .json and latents go next to it (default: a new name in --output-dir)")
    p.add_argument("--output-dir", "--outputs-dir", type=Path, default=None,
                   help=f"where videos go, as in the app, whose History lists them (default: {_home(paths.output_dir())})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out video with its .json and latents (default: refuse)")


def _add_component_args(p: argparse.ArgumentParser) -> None:
    """The component-file options (`cli_run.components_from_args` reads them into slots)."""
    g = p.add_argument_group("component files", "use files you already have, in any supported format "
                             "(official, diffusers folders, ComfyUI single files incl. fp8_scaled, GGUF); "
                             "they replace the matching part of --model-dir")
    g.add_argument("--dit", type=Path, help="TI2V-5B DiT file or folder")
    g.add_argument("--high-noise", type=Path, help="A14B high-noise expert file or folder")
    g.add_argument("--low-noise", type=Path, help="A14B low-noise expert file or folder")
    g.add_argument("--vae", type=Path, help="VAE file or folder")
    g.add_argument("--text-encoder", type=Path, help="umT5-XXL encoder file or folder")
    g.add_argument("--tokenizer", type=Path, help="tokenizer folder (or a ComfyUI umT5 file that carries one)")


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="find the Wan 2.2 files already on this computer (HF cache, ComfyUI, models/)")
    p.add_argument("--comfy", type=Path, action="append", default=[],
                   help="a ComfyUI 'models' folder to scan (remembered for next time)")
    p.add_argument("--scan", type=Path, action="append", default=[], help="another folder to scan")
    p.add_argument("--hash", action="store_true", help="also print a content hash of each file (slow)")


def _add_decode(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("decode", help="decode saved latents (.latents.safetensors) into an mp4 again")
    p.add_argument("latents", type=Path)
    p.add_argument("--model-dir", type=Path, default=None,
                   help="model folder (default: the one recorded in the latents file)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=None,
                   help="output .mp4 (default: NAME.decoded.mp4 next to the latents; the original video stays)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out, or without --out the original NAME.mp4 and NAME.json")


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="what a model folder holds, what is missing, sizes")
    p.add_argument("--model-dir", required=True, type=Path)


def build_parser() -> argparse.ArgumentParser:
    from wan_lite.runtime.plan_cli import add_plan_parser

    parser = argparse.ArgumentParser(
        prog="python -m wan_lite", description="Run the Wan 2.2 video models (TI2V-5B, T2V-A14B, I2V-A14B).",
        epilog=f"Videos go to {_home(paths.output_dir())} (the app's outputs folder: its History lists them); "
               f"models are looked for in {_home(paths.models_dir())}. `python -m wan_lite COMMAND --help` "
               "tells more.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_decode(sub)
    _add_info(sub)
    _add_models(sub)
    add_plan_parser(sub)
    from wan_lite.runtime.cache_cli import add_cache_parser

    add_cache_parser(sub)
    return parser


def _sigterm_as_interrupt() -> object:
    """SIGTERM (a service manager, `kill`, a closed terminal) stops a run like Ctrl+C does, so the
    same cleanup runs: a half-written file is deleted, finished latents stay."""
    import signal
    import threading

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is not threading.main_thread():  # signal handlers: main thread only
        return None
    return signal.signal(signal.SIGTERM, interrupt)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = _sigterm_as_interrupt()
    try:
        return _run(args)
    finally:
        if previous is not None:  # main() called from Python (tests, scripts): give the handler back
            import signal

            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            from wan_lite.cli_run import run_generate

            return run_generate(args)
        if args.command == "decode":
            from wan_lite.cli_run import run_decode

            return run_decode(args)
        if args.command == "info":
            return run_info(args)
        if args.command == "models":
            return run_models(args)
        if args.command == "plan":
            from wan_lite.parallel.plan import plan_gpus
            from wan_lite.runtime.plan_cli import run_plan

            return run_plan(args, plan_gpus=plan_gpus)
        if args.command == "cache":
            from wan_lite.runtime.cache_cli import run_cache

            return run_cache(args)
    except WanLiteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 1


def run_info(args: argparse.Namespace) -> int:
    from wan_lite.cli_run import check_folder_options
    from wan_lite.loading.layout import inspect_folder

    check_folder_options(args)  # the folder that holds the model folders: say which one was meant
    report = inspect_folder(args.model_dir)
    title = report.spec.title if report.spec else "unknown model"
    print(f"{report.root}: {title} — {report.state}, {report.size_bytes / 1e9:.2f} GB on disk")
    for rel, size in report.found:
        print(f"  {size / 1e9:9.3f} GB  {rel}")
    for problem in report.problems:
        print(f"  problem: {problem}")
    if report.state != "installed":
        repos = ", ".join(s.hf_repo for s in MODELS.values())
        print(f"  The official repos are: {repos}")
    return 0 if report.state == "installed" else 1


def run_models(args: argparse.Namespace) -> int:
    from wan_lite.loading.discovery import RememberedChoices, content_hash, default_places, find_copies, scan

    choices = RememberedChoices()
    for folder in args.comfy:
        choices.add_comfy_dir(folder)
    if args.comfy:
        choices.save()
    places = default_places(paths.models_dir(), choices.comfy_dirs) + [("folder", Path(p)) for p in args.scan]
    found = scan(places)
    if not found:
        print("No Wan 2.2 files found in: " + ", ".join(str(p) for _, p in places))
        return 1
    for f in found:
        print(f.describe())
        if args.hash:
            for path in f.component.files:
                print(f"    sha256 {content_hash(path)}  {path.name}")
    for group in find_copies(found).values():
        print(f"same file in {len(group)} places: " + ", ".join(str(f.component.path) for f in group))
    return 0
