"""The Models tab's "Use files you already have" section, without Gradio: what a scan found as a
table, the choices per component slot, and saving the user's picks through the engine.

The engine does the work (wan_lite.engine.Engine.scan_components / choose_components, which read
headers only); this module turns its plain results into page texts and dropdown choices.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from wan_lite.engine import Engine, FoundFile
from wan_lite.errors import WanLiteError
from wan_lite.registry import MODELS, all_slots, get_spec
from wan_lite.ui.downloads import human_bytes
from wan_lite.ui.jobs import error_message

log = logging.getLogger(__name__)

SLOT_LABELS = {
    "dit": "DiT (diffusion transformer)",
    "dit_high": "High-noise expert (DiT)",
    "dit_low": "Low-noise expert (DiT)",
    "vae": "VAE",
    "text_encoder": "Text encoder (umT5-XXL)",
    "tokenizer": "Tokenizer (a ComfyUI umT5 file carries one)",
}
ALL_SLOTS = all_slots()  # one dropdown per slot any model has; a model's own are shown
FROM_FOLDER = ("From the model folder", "")
LOCATIONS = {"hf-cache": "Hugging Face cache", "comfyui": "ComfyUI", "wan_lite": "wan_lite models/",
             "user": "your folder", "folder": "your folder"}


def slots_of(model: str) -> tuple[str, ...]:
    """The component slots of `model`: one DiT, or the two experts of an A14B model."""
    return get_spec(model).slots


def slot_label(slot: str) -> str:
    return SLOT_LABELS.get(slot, slot)


def parse_dirs(text: str | None) -> list[str]:
    """Folders typed in the ComfyUI box: one, or several separated by ';' or new lines."""
    return [p.strip() for p in (text or "").replace("\n", ";").split(";") if p.strip()]


def dirs_text(dirs: Iterable[Path]) -> str:
    return "; ".join(str(d) for d in dirs)


def serves_text(f: FoundFile) -> str:
    """ "TI2V-5B DiT; T2V-A14B high/low-noise expert" from the (model, slot) pairs."""
    by_model: dict[str, list[str]] = {}
    for model, slot in f.serves:
        by_model.setdefault(model, []).append(slot_label(slot).split(" (")[0])
    return "; ".join(f"{MODELS[m].label}: {', '.join(s)}" for m, s in by_model.items())


def found_markdown(found: list[FoundFile], note: str = "") -> str:
    """The scan's results as a table, usable files first; copies of one file and files that
    cannot be used are flagged."""
    if not found:
        return "No Wan 2.2 model files were found in those places." + (f"\n\n_{html.escape(note)}_" if note else "")
    lines = ["| What | Format | Precision | Size | Use for | Where | File |", "|---|---|---|---|---|---|---|"]
    for f in sorted(found, key=lambda f: (f.problem is not None or not f.serves, f.location, str(f.path))):
        what = html.escape(f.what)
        if f.problem:  # one line: a line break would end the table row
            what = f"⛔ {what}: {html.escape(' '.join(f.problem.split()))}"
        elif not f.serves:
            what = f"{what} (not used by wan_lite)"
        if f.copies:
            what += " · ⧉ same file as " + ", ".join(html.escape(_where_short(c)) for c in f.copies)
        where = LOCATIONS.get(f.location, f.location) + (f" ({html.escape(f.repo)})" if f.repo else "")
        lines.append(f"| {what} | {f.format} | {f.precision or '?'} | {human_bytes(f.size_bytes)} | "
                     f"{html.escape(serves_text(f)) or '–'} | {where} | `{html.escape(str(f.path))}` |")
    copies = sum(1 for f in found if f.copies)
    summary = f"Found {len(found)} file(s)" + (f"; {copies} are copies of one another (the same file twice on disk)"
                                                if copies else "") + "."
    return "\n".join([summary, "", *lines] + ([f"\n_{html.escape(note)}_"] if note else []))


def _where_short(path: Path) -> str:
    """ "vae/copy.safetensors": enough to tell a copy apart without a full path."""
    return "/".join(Path(path).parts[-2:])


def slot_choices(found: list[FoundFile], model: str, slot: str, current: str | Path | None) -> list[tuple[str, str]]:
    """Dropdown choices for one slot: the model folder's own file, what the scan found for the
    slot, and the current choice (a typed path stays selectable)."""
    choices = [FROM_FOLDER]
    for f in found:
        if (model, slot) in f.serves:
            label = f"{f.path.name} · {f.format}, {f.precision or '?'}, {human_bytes(f.size_bytes)} · " \
                    f"{LOCATIONS.get(f.location, f.location)}"
            choices.append((label, str(f.path)))
    if current and str(current) not in {v for _, v in choices}:
        choices.append((f"{Path(current).name} · chosen earlier", str(current)))
    return choices


@dataclass
class SlotView:
    """What one slot dropdown shows for a model."""

    slot: str
    visible: bool
    choices: list[tuple[str, str]]
    value: str


def slot_views(engine: Engine, found: list[FoundFile], model: str) -> list[SlotView]:
    """Every slot widget's state for `model` (slots the model lacks are hidden)."""
    try:
        chosen = {k: str(v) for k, v in engine.chosen_components(model).items()}
    except Exception as err:  # the section must still draw
        log.warning("Could not read the chosen components of %s: %s", model, err)
        chosen = {}
    own = slots_of(model)
    return [SlotView(slot, slot in own, slot_choices(found, model, slot, chosen.get(slot)) if slot in own
                     else [FROM_FOLDER], chosen.get(slot, "")) for slot in ALL_SLOTS]


def known_folders(engine: Engine) -> list[Path]:
    """The folders a page served beyond this computer may scan and pick files from: the models
    folder and the ComfyUI folders remembered on this computer."""
    try:
        comfy = engine.comfy_dirs()
    except Exception as err:  # an unreadable choices file: the models folder alone
        log.warning("Remembered ComfyUI folders not read: %s", err)
        comfy = []
    return [Path(p).expanduser().resolve() for p in (engine.models_root, *comfy)]


def outside_known(engine: Engine, paths: Iterable[str | Path]) -> list[str]:
    """The paths (as typed) outside `known_folders` (symbolic links are followed first)."""
    roots = known_folders(engine)
    return [str(p) for p in paths if not any(Path(p).expanduser().resolve().is_relative_to(r) for r in roots)]


def _confined_message(what: str, engine: Engine) -> str:
    # The same words whether the path exists or not: a remote user learns nothing about this disk.
    return (f"⛔ This page is shared over the network, so {what} only in the models folder and the ComfyUI "
            f"folders remembered on this computer ({html.escape(dirs_text(known_folders(engine)))}). "
            "Add other folders on the computer running wan_lite (`python -m wan_lite models --comfy FOLDER`).")


def scan(engine: Engine, comfy_text: str | None, confine: bool = False) -> tuple[list[FoundFile], str]:
    """Scan the usual places and the typed ComfyUI folder(s), remembered for next time.
    `confine` (a page served beyond this computer): only known folders (`known_folders`).
    Returns (found, markdown)."""
    if confine and outside_known(engine, parse_dirs(comfy_text)):
        return [], _confined_message("Scan looks", engine)
    try:
        found = engine.scan_components(parse_dirs(comfy_text))
    except Exception as err:
        if not isinstance(err, WanLiteError):
            log.exception("Scan failed")
        return [], f"⛔ {html.escape(error_message(err))}"
    return found, found_markdown(found)


def save(engine: Engine, model: str, picks: dict[str, str | None], confine: bool = False) -> str:
    """Check and remember the picks for `model`; the message says what is in use now, whether the
    model is complete, or (for a wrong file) what the file is and what was expected. `confine`:
    files outside `known_folders` are refused and nothing is saved."""
    own = slots_of(model)
    if confine and outside_known(engine, [v for k, v in picks.items() if k in own and v]):
        return _confined_message("files can be chosen", engine)
    try:
        used = engine.choose_components(model, {k: v for k, v in picks.items() if k in own})
        status = next((s for s in engine.model_status() if s.name == get_spec(model).name), None)
    except Exception as err:
        if not isinstance(err, WanLiteError):
            log.exception("Saving the component choices failed")
        return f"⛔ {html.escape(error_message(err))}"
    title = get_spec(model).short_title
    parts = ", ".join(f"{slot_label(k).split(' (')[0]}: `{html.escape(str(v))}`" for k, v in used.items())
    text = f"✅ Saved for {title}: " + (parts or "every part from the model folder") + "."
    if status is not None and status.state == "installed":
        text += f"\n\n{title} is ready to use."
    elif status is not None:
        text += f"\n\n⚠️ {title} is not complete yet:\n" + "\n".join(
            f"- {html.escape(p)}" for p in dict.fromkeys([*status.missing, *status.problems]))
    return text
