"""Prompt presets: the cinematic vocabulary, style templates and named bundles, read from JSON.

Built-in files live in `presets/` (vocabulary.json, styles.json, bundles.json); users add their own
JSON files of the same shape to a folder of their own (see `user_presets_dir`). Every file may hold
any of three sections:

    {"categories": [{"key", "en", "zh", "group", "terms": [{"id", "en", "zh", "illustration"?}]}],
     "styles":     [{"name", "prompt" (with one {prompt} slot), "negative_prompt", "illustration"?}],
     "bundles":    [{"name", "terms": ["category.term", ...], "style": name or null, "description"?}]}

A bare JSON list is read as a list of styles, so Fooocus style files can be dropped in as they are.
Problems never stop the app: each one is reported as "file: key: what is wrong (allowed values)"
and only the broken entry (or file) is skipped.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wan_lite.paths import config_path, write_json_atomic

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).resolve().parents[2] / "presets"
BUILTIN_FILES = ("vocabulary.json", "styles.json", "bundles.json")
USER_FILE = "my_presets.json"  # where "save as preset" writes
GROUPS = ("aesthetic", "camera", "motion", "style", "effect")
SECTIONS = ("categories", "styles", "bundles")
PROMPT_SLOT = "{prompt}"
_ID = re.compile(r"^[a-z0-9_]+$")


@dataclass(frozen=True)
class Term:
    """One word of the vocabulary; `id` is "category.term", unique across all categories."""

    id: str
    category: str
    group: str  # one of GROUPS
    en: str
    zh: str
    illustration: bool = False  # a 2D/illustration style (film-aesthetic terms do little there)

    @property
    def label(self) -> str:
        return f"{self.en} · {self.zh}"


@dataclass(frozen=True)
class Category:
    key: str
    en: str
    zh: str
    group: str
    terms: tuple[Term, ...]

    @property
    def label(self) -> str:
        return f"{self.en} · {self.zh}"


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str  # contains PROMPT_SLOT exactly once
    negative_prompt: str = ""
    illustration: bool = False
    source: str = ""

    def apply(self, text: str) -> str:
        # str.replace, not str.format: user text may contain braces.
        return self.prompt.replace(PROMPT_SLOT, text).strip()


@dataclass(frozen=True)
class Bundle:
    name: str
    terms: tuple[str, ...]
    style: str | None = None
    description: str = ""
    source: str = ""


@dataclass
class Presets:
    categories: dict[str, Category] = field(default_factory=dict)
    styles: dict[str, Style] = field(default_factory=dict)
    bundles: dict[str, Bundle] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def terms(self) -> dict[str, Term]:
        """All terms by id, in vocabulary order (category order, then term order)."""
        return {t.id: t for c in self.categories.values() for t in c.terms}


def user_presets_dir() -> Path:
    """The folder for the user's own preset files (inside the wan_lite config folder, or where an
    earlier version kept them: `wan_lite.paths.config_path`)."""
    return config_path("presets")


class _Problem(Exception):
    """One invalid entry; the message already names the key and the value."""


def _text(entry: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = entry.get(key, None if required else "")
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise _Problem(f"{key}: expected a non-empty text, got {value!r}")
    return value.strip()


def _flag(entry: dict[str, Any], key: str) -> bool:
    value = entry.get(key, False)
    if not isinstance(value, bool):
        raise _Problem(f"{key}: expected true or false, got {value!r}")
    return value


def _parse_category(entry: Any, known: dict[str, Category], problems: list[str], where: str) -> Category:
    if not isinstance(entry, dict):
        raise _Problem(f"expected an object, got {type(entry).__name__}")
    key = _text(entry, "key")
    if not _ID.match(key):
        raise _Problem(f"key: {key!r} must use only a-z, 0-9 and _")
    base = known.get(key)
    group = entry.get("group", base.group if base else None)
    if group not in GROUPS:
        raise _Problem(f"group: {group!r} is not one of {', '.join(GROUPS)}")
    raw_terms = entry.get("terms")
    if not isinstance(raw_terms, list):
        raise _Problem(f"terms: expected a list, got {raw_terms!r}")
    terms: list[Term] = list(base.terms) if base else []
    seen = {t.id for t in terms}
    for j, raw in enumerate(raw_terms):
        try:
            if not isinstance(raw, dict):
                raise _Problem(f"expected an object, got {type(raw).__name__}")
            tid = _text(raw, "id")
            if not _ID.match(tid):
                raise _Problem(f"id: {tid!r} must use only a-z, 0-9 and _")
            full = f"{key}.{tid}"
            if full in seen:
                raise _Problem(f"id: {tid!r} appears twice in category {key!r}")
            terms.append(Term(full, key, group, _text(raw, "en"), _text(raw, "zh"), _flag(raw, "illustration")))
            seen.add(full)
        except _Problem as err:
            problems.append(f"{where}.terms[{j}]: {err}")
    en = _text(entry, "en", required=base is None) or (base.en if base else key)
    zh = _text(entry, "zh", required=base is None) or (base.zh if base else key)
    return Category(key, en, zh, group, tuple(terms))


def _parse_style(entry: Any, source: str) -> Style:
    if not isinstance(entry, dict):
        raise _Problem(f"expected an object, got {type(entry).__name__}")
    name = _text(entry, "name")
    prompt = _text(entry, "prompt")
    if prompt.count(PROMPT_SLOT) != 1:
        raise _Problem(f"prompt: must contain {PROMPT_SLOT} exactly once, got {prompt!r}")
    return Style(name, prompt, _text(entry, "negative_prompt", required=False), _flag(entry, "illustration"), source)


def _parse_bundle(entry: Any, source: str, presets: Presets) -> Bundle:
    if not isinstance(entry, dict):
        raise _Problem(f"expected an object, got {type(entry).__name__}")
    name = _text(entry, "name")
    terms = entry.get("terms", [])
    if not isinstance(terms, list) or not all(isinstance(t, str) for t in terms):
        raise _Problem(f"terms: expected a list of term ids like \"time_of_day.sunset\", got {terms!r}")
    known = presets.terms()
    unknown = [t for t in terms if t not in known]
    if unknown:
        raise _Problem(f"terms: unknown term ids {unknown} (ids are \"category.term\" from vocabulary.json)")
    style = entry.get("style")
    if style is not None and style not in presets.styles:
        raise _Problem(f"style: {style!r} is not a known style (known: {', '.join(presets.styles) or 'none'})")
    return Bundle(name, tuple(terms), style, _text(entry, "description", required=False), source)


def _read_json(path: Path, problems: list[str]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        problems.append(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); file skipped")
    except (OSError, UnicodeDecodeError) as err:
        problems.append(f"{path}: cannot be read ({err}); file skipped")
    return None


def _sections(path: Path, data: Any, problems: list[str]) -> dict[str, list[Any]]:
    if isinstance(data, list):  # a Fooocus style file
        return {"styles": data}
    if not isinstance(data, dict):
        problems.append(f"{path}: expected an object with {', '.join(SECTIONS)}; file skipped")
        return {}
    out: dict[str, list[Any]] = {}
    for key, value in data.items():
        if key in ("version", "about"):
            continue
        if key not in SECTIONS:
            problems.append(f"{path}: {key}: unknown section (allowed: {', '.join(SECTIONS)}); ignored")
        elif not isinstance(value, list):
            problems.append(f"{path}: {key}: expected a list, got {type(value).__name__}; ignored")
        else:
            out[key] = value
    return out


def load_presets(builtin_dir: Path | None = None, user_dir: Path | None = None) -> Presets:
    """Read the built-in presets, then the user's (which add to them and override by name).

    Categories are read from every file first, then styles, then bundles, so a bundle may refer
    to a term or style defined in any file.
    """
    builtin_dir = BUILTIN_DIR if builtin_dir is None else builtin_dir
    files = [builtin_dir / name for name in BUILTIN_FILES if (builtin_dir / name).is_file()]
    if user_dir is not None and user_dir.is_dir():
        files += sorted(p for p in user_dir.glob("*.json") if p.is_file())
    presets = Presets()
    parsed = [(p, _sections(p, data, presets.problems)) for p in files
              if (data := _read_json(p, presets.problems)) is not None]

    for path, sections in parsed:
        for i, entry in enumerate(sections.get("categories", [])):
            where = f"{path}: categories[{i}]"
            try:
                cat = _parse_category(entry, presets.categories, presets.problems, where)
                presets.categories[cat.key] = cat
            except _Problem as err:
                presets.problems.append(f"{where}: {err}; skipped")
    for path, sections in parsed:
        for i, entry in enumerate(sections.get("styles", [])):
            try:
                style = _parse_style(entry, str(path))
                presets.styles[style.name] = style
            except _Problem as err:
                presets.problems.append(f"{path}: styles[{i}]: {err}; skipped")
    for path, sections in parsed:
        for i, entry in enumerate(sections.get("bundles", [])):
            try:
                bundle = _parse_bundle(entry, str(path), presets)
                presets.bundles[bundle.name] = bundle
            except _Problem as err:
                presets.problems.append(f"{path}: bundles[{i}]: {err}; skipped")
    for problem in presets.problems:
        log.warning("Preset problem: %s", problem)
    return presets


def save_user_bundle(user_dir: Path, bundle: Bundle, presets: Presets) -> Path:
    """Add or replace `bundle` (by name) in the user's preset file; returns the file written.

    Raises InputError when the bundle is empty or refers to unknown terms or styles.
    """
    from wan_lite.errors import InputError

    if not bundle.name.strip():
        raise InputError("The preset has no name.", "Type a name for it first.")
    if not bundle.terms and not bundle.style:
        raise InputError("The preset is empty.", "Pick some cinematic terms or a style first.")
    try:
        _parse_bundle({"name": bundle.name, "terms": list(bundle.terms), "style": bundle.style}, "", presets)
    except _Problem as err:
        raise InputError(f"The preset cannot be saved: {err}.") from None
    path = user_dir / USER_FILE
    data: dict[str, Any] = {"version": 1, "bundles": []}
    if path.is_file():
        existing = _read_json(path, [])
        if isinstance(existing, dict):
            data = existing
    bundles = [b for b in data.get("bundles", []) if not (isinstance(b, dict) and b.get("name") == bundle.name)]
    entry: dict[str, Any] = {"name": bundle.name.strip(), "terms": list(bundle.terms), "style": bundle.style}
    if bundle.description:
        entry["description"] = bundle.description
    data["bundles"] = [*bundles, entry]
    write_json_atomic(path, data)
    return path


def term_choices(category: Category) -> list[tuple[str, str]]:
    """(label, id) pairs for a Gradio CheckboxGroup: bilingual labels, ids as values."""
    return [(t.label, t.id) for t in category.terms]


def ordered(ids: Iterable[str], presets: Presets) -> list[str]:
    """Known ids in vocabulary order, duplicates removed (so the result never depends on click order)."""
    wanted = set(ids)
    return [tid for tid in presets.terms() if tid in wanted]


def memory_profiles(folder: Path | None = None) -> list[tuple[str, str]]:
    """Dropdown choices: ("Auto", "auto"), then one (title, key) per presets/memory_profiles/*.json.

    The profiles belong to the planner; only their key (file stem) and a title are read here, and a
    missing folder or an unreadable file just means fewer choices.
    """
    folder = BUILTIN_DIR / "memory_profiles" if folder is None else folder
    choices = [("Auto (fit this computer)", "auto")]
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        data = _read_json(path, [])
        title = path.stem
        if isinstance(data, dict):
            title = str(data.get("title") or data.get("name") or path.stem)
            if isinstance(data.get("description"), str) and data["description"]:
                title = f"{title} — {data['description']}"
        choices.append((title, path.stem))
    return choices
