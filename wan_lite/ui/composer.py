"""The prompt composer: the user's text + chosen cinematic terms + a style template -> the exact
prompt the model gets, following the official Wan 2.2 prompt rules:

- style first (a visual-style term opens the prompt; a style template wraps everything);
- at most four aesthetic-control terms (more are kept, with a gentle warning);
- no camera angle when a camera movement is chosen (the angle is left out, with a note);
- film-aesthetic terms do little for 2D/illustration styles (a note);
- image-to-video: the picture already fixes subject, scene and style, so only motion and camera
  words are used (the rest is left out, with a note).

Deterministic: the same inputs give the same prompt, whatever order the terms were clicked in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from wan_lite.registry import DEFAULT_NEGATIVE_PROMPT
from wan_lite.ui.presets import Presets, Term

MAX_AESTHETIC_TERMS = 4
I2V_GROUPS = ("motion", "camera")
SHORT_PROMPT_WORDS = 12


@dataclass(frozen=True)
class Composition:
    prompt: str
    negative_prompt: str
    warnings: tuple[str, ...]
    used_terms: tuple[str, ...]  # ids that made it into the prompt, in prompt order


def _phrase(term: Term, language: str, first: bool) -> str:
    if language == "zh":
        return term.zh + ("风格" if term.group == "style" and not term.zh.endswith("风格") else "")
    text = term.en
    # Lower-case inside a list ("Sunset, backlighting"), but not acronyms or digits ("3D", "2D").
    if not first and len(text) > 1 and text[0].isupper() and text[1].islower():
        text = text[0].lower() + text[1:]
    return text


def _sentence(parts: list[str], language: str) -> str:
    if not parts:
        return ""
    sep, end = ("，", "。") if language == "zh" else (", ", ".")
    return sep.join(parts) + end


def _end(text: str, language: str) -> str:
    """Close the user's text with a full stop if it has no final punctuation."""
    if not text or text[-1] in ".!?。！？…":
        return text
    return text + ("。" if language == "zh" else ".")


def compose(
    presets: Presets,
    prompt: str,
    term_ids: Iterable[str] = (),
    style: str | None = None,
    *,
    image_to_video: bool = False,
    language: str = "en",
    negative_prompt: str | None = None,
) -> Composition:
    """Build the final prompt and negative prompt; `warnings` are short sentences for people."""
    language = "zh" if language == "zh" else "en"
    warnings: list[str] = []
    known = presets.terms()
    chosen = set(term_ids)
    unknown = sorted(chosen - set(known))
    if unknown:
        warnings.append(f"Unknown terms ignored: {', '.join(unknown)}.")
    terms = [t for tid, t in known.items() if tid in chosen]  # vocabulary order, not click order
    template = presets.styles.get(style) if style else None
    if style and template is None:
        warnings.append(f"Style {style!r} no longer exists; composed without it.")

    if image_to_video:
        dropped = [t for t in terms if t.group not in I2V_GROUPS]
        if dropped or template:
            names = [t.en for t in dropped] + ([f"style “{template.name}”"] if template else [])
            warnings.append(
                "Image-to-video: the picture already sets the look, so these were left out: "
                f"{', '.join(names)}. Describe the motion and the camera instead."
            )
        terms = [t for t in terms if t.group in I2V_GROUPS]
        template = None
    else:
        moves = [t for t in terms if t.group == "camera"]
        angles = [t for t in terms if t.category == "camera_angle"]
        if moves and angles:
            warnings.append(
                f"Camera angle left out ({', '.join(t.en for t in angles)}): with a camera movement the "
                "official rules describe only the movement."
            )
            terms = [t for t in terms if t.category != "camera_angle"]
        aesthetic = [t for t in terms if t.group == "aesthetic"]
        if len(aesthetic) > MAX_AESTHETIC_TERMS:
            warnings.append(
                f"{len(aesthetic)} lighting/framing terms chosen; Wan 2.2 follows at most "
                f"{MAX_AESTHETIC_TERMS} well. Consider keeping the ones that matter most."
            )
        styles = [t for t in terms if t.group == "style"]
        if len(styles) > 1:
            warnings.append(f"{len(styles)} visual styles chosen; they may blend unpredictably.")
        illustration = any(t.illustration for t in styles) or bool(template and template.illustration)
        if illustration and aesthetic:
            warnings.append("Film lighting and lens terms have little effect on 2D/illustration styles.")

    text = re.sub(r"\s+", " ", prompt or "").strip()
    lowered = text.lower()
    # A term the user already wrote is not repeated.
    terms = [t for t in terms if t.en.lower() not in lowered and t.zh not in text]

    groups = {g: [t for t in terms if t.group == g] for g in ("style", "aesthetic", "effect", "motion", "camera")}
    style_part = _sentence([_phrase(t, language, i == 0) for i, t in enumerate(groups["style"])], language)
    look_terms = groups["aesthetic"] + groups["effect"]
    look_part = _sentence([_phrase(t, language, i == 0) for i, t in enumerate(look_terms)], language)
    move_terms = groups["motion"] + groups["camera"]
    move_part = _sentence([_phrase(t, language, i == 0) for i, t in enumerate(move_terms)], language)

    core = " ".join(p for p in (style_part, _end(text, language), look_part, move_part) if p)
    if language == "zh":
        core = core.replace("。 ", "。")
    final = template.apply(core) if template else core

    if not text:
        warnings.append(
            "Describe what should move in the picture." if image_to_video
            else "Write what the video shows: subject, scene and motion."
        )
    elif not image_to_video and len(text.split()) < SHORT_PROMPT_WORDS and language == "en":
        warnings.append("Tip: Wan 2.2 does best with a detailed prompt (subject, scene, motion; 60–200 words).")

    negative = (negative_prompt or "").strip() or DEFAULT_NEGATIVE_PROMPT
    if template and template.negative_prompt and template.negative_prompt not in negative:
        negative = f"{negative}, {template.negative_prompt}"
    used = tuple(t.id for t in groups["style"] + look_terms + move_terms)
    return Composition(final, negative, tuple(warnings), used)
