"""The Models tab: what is installed where, how big it is, and how to get what is missing."""

from __future__ import annotations

import html
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from wan_lite.engine import Engine, ModelStatus
from wan_lite.registry import MODELS, get_spec
from wan_lite.ui.downloads import download_bytes, human_bytes, progress_text, shared_available, start_download
from wan_lite.ui.jobs import error_message

log = logging.getLogger(__name__)

STATE_LABELS = {"installed": "✅ installed", "partial": "⚠️ partly installed", "missing": "⬇️ missing",
                "unknown": "❔ not checked"}


def statuses(engine: Engine) -> tuple[list[ModelStatus], str]:
    """The engine's view of the model folders, or registry rows plus a note when it cannot tell."""
    try:
        return engine.model_status(), ""
    except Exception as err:  # the page must still open
        if not isinstance(err, NotImplementedError):
            log.exception("model_status failed")
        rows = [ModelStatus(s.name, s.title, s.hf_repo, model_folder(engine, s.name), "unknown", 0) for s in MODELS.values()]
        return rows, f"Could not check the model folders: {error_message(err)}"


def model_folder(engine: Engine, name: str) -> Path:
    try:
        return engine.model_folder(name)
    except Exception:  # engine not ready: the registry name under the models root
        return engine.models_root / get_spec(name).hf_repo.split("/")[-1]


def download_text(rows: list[ModelStatus], row: ModelStatus) -> str:
    """"34.2 GB" before a download; "114.8 GB (umT5 shared, 11.4 GB)" when another model's
    folder already holds parts this one shares."""
    spec = get_spec(row.name)
    others = [r.folder for r in rows if r.name != row.name]
    have = shared_available(spec, Path(row.folder), others)
    total, shared = download_bytes(spec, have)
    if not shared:
        return human_bytes(total)
    names = {spec.t5_file: "umT5", spec.vae_file: "VAE", spec.tokenizer_dir: "tokenizer"}
    return (f"{human_bytes(total - shared)} ({', '.join(names[k] for k in have)} shared with another model: "
            f"{human_bytes(shared)} less)")


def status_markdown(rows: list[ModelStatus], note: str = "") -> str:
    lines = [
        "| Model | State | Size on disk | Download | Folder | Where from |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        how = f"Hugging Face `{r.hf_repo}`" + (" — use Download below" if r.state != "installed" else "")
        state = STATE_LABELS.get(r.state, r.state)
        size = human_bytes(r.size_bytes) if r.size_bytes else "–"
        try:
            dl = "–" if r.state == "installed" else download_text(rows, r)
        except (KeyError, OSError):
            dl = "–"
        lines.append(f"| **{html.escape(r.title)}** | {state} | {size} | {dl} | `{html.escape(str(r.folder))}` | {how} |")
    chosen = [f"- **{html.escape(r.name)}**: " + ", ".join(f"{slot} `{html.escape(str(path))}`"
                                                          for slot, path in r.components.items())
              for r in rows if r.components]
    if chosen:
        lines += ["", "**Files you chose (used instead of the folder's):**", *chosen]
    details = []
    for r in rows:
        for item in dict.fromkeys([*r.missing, *r.problems]):  # the engine may list a file in both
            if r.state == "missing" and str(r.folder) in item:
                continue  # "the folder does not exist": the row already says missing, where, and how to get it
            details.append(f"- **{html.escape(r.name)}**: {html.escape(item)}")
    if details:
        lines += ["", "**What is missing or broken:**", *details]
    if note:
        lines += ["", f"_{html.escape(note)}_"]
    return "\n".join(lines)


def download_events(engine: Engine, name: str) -> Iterator[str]:
    """Markdown progress lines for downloading one model; the last one says how it ended."""
    try:
        spec = get_spec(name)
        rows = statuses(engine)[0]
        folder = next((r.folder for r in rows if r.name == spec.name), model_folder(engine, spec.name))
        others = [Path(r.folder) for r in rows if r.name != spec.name]
        yield f"Checking what {spec.hf_repo} needs and the free disk space…"
        job = start_download(spec, Path(folder), others=others)
        started = time.monotonic()
        for done_bytes, total in job.poll():
            yield f"Downloading {spec.hf_repo} into `{folder}`: {progress_text(done_bytes, total, started, job.start_bytes)}"
        yield f"✅ {spec.title} downloaded into `{folder}`."
    except Exception as err:
        if not isinstance(err, NotImplementedError):
            log.warning("Download failed: %s", err)
        yield f"⛔ {html.escape(error_message(err))}"
