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
    p.add_argument("--models-dir", type=Path, default=ROOT / "models",
                   help="folder with the model folders (default: ./models)")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="where videos go (default: your Videos folder / wan_lite)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    p.add_argument("--device", default=None,
                   help="torch device, e.g. cuda:1 (default: the first GPU, else the CPU)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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

    host = "0.0.0.0" if args.listen else args.host
    if host not in LOCAL_HOSTS:
        log.warning("Serving on %s: other computers on your network can open wan_lite and use your GPU.", host)
    if args.share:
        log.warning("--share: a public link will be created; anyone who has it can use your GPU "
                    "and see your videos.")
    ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    log.info("Models: %s | outputs: %s | uploads: %s", args.models_dir, output_dir, upload_dir)

    from wan_lite.engine import Engine
    from wan_lite.ui.app import build_ui, launch

    engine = Engine(args.models_dir.expanduser().resolve(), output_dir, device=args.device)
    ui = build_ui(engine, upload_dir)
    launch(ui, host=host, port=args.port, share=args.share, open_browser=not (args.no_browser or ci),
           output_dir=output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
