"""wan_lite desktop app: `python app.py` (launch.sh / launch.bat run this after setting up).

Thin on purpose: parse the options, build the engine and the page, serve on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
log = logging.getLogger("wan_lite.app")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="app.py", description="wan_lite: make videos with Wan 2.2 on your own GPU.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to serve on (default 127.0.0.1: this computer only)")
    p.add_argument("--port", type=int, default=None, help="port (default: 7860 or the next free one)")
    p.add_argument("--listen", action="store_true",
                   help="serve on all network interfaces, so other computers can connect")
    p.add_argument("--share", action="store_true",
                   help="also make a public gradio.live link (anyone with it can use your GPU)")
    p.add_argument("--auth", default=None, metavar="USER:PASS or FILE",
                   help="ask for a user name and password: USER:PASS, or a file of USER:PASS lines "
                        "(a file keeps the password out of the process list); needed with --listen or --share")
    p.add_argument("--no-auth", action="store_true",
                   help="serve beyond this computer without a password (anyone who can reach it can use it)")
    p.add_argument("--models-dir", type=Path, default=ROOT / "models",
                   help="folder with the model folders (default: ./models)")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="where videos go (default: your Videos folder / wan_lite)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    p.add_argument("--device", default=None,
                   help="torch device, e.g. cuda:1 (default: the first GPU, else the CPU)")
    return p.parse_args(argv)


class StartError(Exception):
    """The options do not allow a safe start; the message says what to add."""


def parse_auth(value: str) -> list[tuple[str, str]]:
    """`--auth USER:PASS`, or a file with one USER:PASS a line (blank lines and # comments skipped)."""
    path = Path(value).expanduser()
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise StartError(f"--auth: cannot read {path} ({err}).") from None
        where = f"{path}, line {{n}}"
    elif ":" in value:
        lines, where = [value], "--auth"
    else:
        raise StartError(f"--auth {value!r} is neither USER:PASS nor a file.")
    pairs = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user.strip() or not password:
            raise StartError(where.format(n=n) + ": expected USER:PASS (a user name, a colon, a password).")
        pairs.append((user.strip(), password))
    if not pairs:
        raise StartError(f"--auth: {path} holds no USER:PASS line.")
    return pairs


def serving(args: argparse.Namespace) -> tuple[str, list[tuple[str, str]] | None]:
    """(host, auth) from the options. Serving beyond this computer (--listen, --share, another
    --host) needs --auth or an explicit --no-auth."""
    host = "0.0.0.0" if args.listen else args.host
    auth = parse_auth(args.auth) if args.auth else None
    if args.auth and args.no_auth:
        raise StartError("--auth and --no-auth contradict each other; give one.")
    remote = args.share or host not in LOCAL_HOSTS
    if remote and auth is None and not args.no_auth:
        what = "--share" if args.share else ("--listen" if args.listen else f"--host {host}")
        raise StartError(f"{what} lets other people open wan_lite and use your GPU, so it needs a password.\n"
                         "  -> Add --auth USER:PASS (or --auth FILE with USER:PASS lines), or --no-auth to serve "
                         "without one.")
    return host, auth


def models_dir_is_its_parent(folder: Path) -> None:
    """--models-dir is the folder that holds the model folders; one model's folder there (the
    CLI's --model-dir) would show every model as missing: say which was meant."""
    from wan_lite.loading.layout import model_in

    spec = model_in(folder) if folder.is_dir() else None
    if spec is not None:
        raise StartError(f"--models-dir takes the folder that holds the model folders, and {folder} is one model's "
                         f"folder ({spec.label}).\n  -> Did you mean --models-dir {folder.parent}? (Name the folder "
                         f"{spec.hf_repo.split('/')[-1]} there for the app to find it.)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        host, auth = serving(args)
        models_dir_is_its_parent(args.models_dir)
    except StartError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from wan_lite.ui.settings import default_output_dir, default_upload_dir

    output_dir = (args.output_dir or default_output_dir()).expanduser().resolve()
    upload_dir = default_upload_dir().resolve()
    for folder in (output_dir, upload_dir):
        folder.mkdir(parents=True, exist_ok=True)
    # Gradio keeps uploads (and copies of what it serves) in GRADIO_TEMP_DIR: make that our upload
    # folder, so the output and upload folders are the only places the server reads from.
    os.environ["GRADIO_TEMP_DIR"] = str(upload_dir)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    remote = args.share or host not in LOCAL_HOSTS
    if host not in LOCAL_HOSTS and auth is None:
        log.warning("Serving on %s without a password (--no-auth): other computers on your network can "
                    "open wan_lite and use your GPU.", host)
    if args.share:
        log.warning("--share: a public link will be created; anyone who has it can use your GPU "
                    "and see your videos.")
    ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    from wan_lite.paths import config_dir
    from wan_lite.ui.instance import AppLock, already_running

    lock = AppLock(config_dir())
    running = lock.claim()
    if running is not None:  # the launcher started twice: show the app that runs
        opening = isinstance(running.get("url"), str) and not (args.no_browser or ci)
        print(already_running(running, config_dir(), opening), flush=True)
        if opening:
            import webbrowser

            webbrowser.open(running["url"])
        return 0
    log.info("Models: %s | outputs: %s | uploads: %s", args.models_dir, output_dir, upload_dir)

    from wan_lite.engine import Engine
    from wan_lite.ui.app import build_ui, launch

    engine = Engine(args.models_dir.expanduser().resolve(), output_dir, device=args.device)
    # Beyond this computer, Scan and Save stay in the models folder and the remembered ComfyUI folders.
    ui = build_ui(engine, upload_dir, confine=remote)
    launch(ui, host=host, port=args.port, share=args.share, open_browser=not (args.no_browser or ci),
           output_dir=output_dir, auth=auth, on_ready=lock.announce)
    return 0


if __name__ == "__main__":
    sys.exit(main())
