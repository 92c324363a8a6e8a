"""Everything wan_lite writes: the mp4 (settings JSON inside), the sidecar JSON and the latents.

Every file is written to a hidden temporary file in the target folder and then moved into place
with `os.replace`, so a crash, a full disk or a cancelled job never leaves a half-written file
under the final name (and never destroys an older file of that name).

Video encoding follows the official `save_video`: [-1, 1] -> [0, 255] by truncation, H.264 (libx264) at imageio's quality 8 (crf 10),
yuv420p, through imageio-ffmpeg's bundled ffmpeg.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wan_lite.errors import InputError, WanLiteError
from wan_lite.paths import PARTIAL_SUFFIX, atomic_path, json_text
from wan_lite.paths import write_json_atomic as write_json_atomic  # re-exported: sidecars

logger = logging.getLogger(__name__)

MP4_QUALITY = 8  # imageio's scale; libx264 -crf int((1 - 8/10) * 51) = 10, as the reference writes
LATENTS_FORMAT = "wan_lite.latents"
LATENTS_SUFFIX = ".latents.safetensors"
# Linux caps one command-line argument at 128 KiB; the settings JSON goes through one.
_MAX_METADATA_BYTES = 100_000


# ----------------------------------------------------------------------------------------------
# Video


def video_to_uint8(video: torch.Tensor) -> np.ndarray:
    """Decoded video [3, F, H, W] (or [1, 3, F, H, W]) in [-1, 1] -> uint8 frames [F, H, W, 3].

    Like the reference: clamp to [-1, 1], map to [0, 1] with (x + 1) / 2, multiply by 255 and
    TRUNCATE (no rounding). NaNs, which only a numerical failure produces, become mid-grey.
    """
    if video.dim() == 5 and video.shape[0] == 1:
        video = video[0]
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a video [3, F, H, W], got shape {tuple(video.shape)}")
    x = video.detach().float()
    if torch.isnan(x).any():
        logger.warning("The decoded video contains NaN values; they are written as grey pixels.")
        x = torch.nan_to_num(x, nan=0.0)
    x = (x.clamp(-1.0, 1.0) + 1.0) / 2.0
    x = (x * 255).to(torch.uint8)  # float -> uint8 truncates toward zero
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def _check_frame(frame: np.ndarray) -> np.ndarray:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        desc = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
        raise ValueError(f"frames must be uint8 arrays [H, W, 3], got {desc}")
    return frame


def _even(frame: np.ndarray) -> np.ndarray:
    """yuv420p needs even sizes: repeat the last row/column instead of letting ffmpeg rescale."""
    h, w = frame.shape[:2]
    if h % 2 == 0 and w % 2 == 0:
        return frame
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def write_mp4(
    path: str | os.PathLike[str],
    frames: np.ndarray | Iterable[np.ndarray],
    fps: float,
    metadata: dict[str, Any] | None = None,
    *,
    overwrite: bool = True,
) -> Path:
    """Encode frames to an H.264 mp4 atomically, with `metadata` as JSON in the `comment` tag.

    Args:
        frames: uint8 [F, H, W, 3], or an iterable of uint8 [H, W, 3] frames (encoded as they come,
            so a decoder can stream them). Sizes that are multiples of 16 are encoded as they are
            (every size the models make); an odd width or height gets its last column/row repeated
            once, because yuv420p cannot hold odd sizes; nothing is ever rescaled.
        fps: frames per second (16 for the A14B models, 24 for TI2V-5B).
        overwrite: False keeps an existing file of that name (FileExistsError, nothing written).
    Returns the path written.
    """
    import imageio_ffmpeg

    target = Path(path)
    if not fps or fps <= 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    it = iter(frames)
    try:
        first = _check_frame(next(it))
    except StopIteration:
        raise ValueError("no frames to write") from None
    h, w = first.shape[:2]
    if h % 2 or w % 2:
        logger.warning("Frame size %dx%d is odd; padding to %dx%d by repeating the edge "
                       "(yuv420p needs even sizes).", w, h, w + w % 2, h + h % 2)
    enc_w, enc_h = w + w % 2, h + h % 2
    output_params = ["-f", "mp4"]  # the temporary name has no .mp4 suffix to infer it from
    if metadata:
        text = json_text(metadata)
        if len(text.encode("utf-8")) <= _MAX_METADATA_BYTES:
            output_params += ["-metadata", f"comment={text}"]
        else:
            logger.warning("Settings are %d bytes, too long to embed in %s; they stay in the sidecar "
                           "JSON only.", len(text.encode("utf-8")), target.name)
    with atomic_path(target, overwrite=overwrite) as tmp:
        writer = imageio_ffmpeg.write_frames(
            str(tmp), (enc_w, enc_h), fps=fps, codec="libx264", quality=MP4_QUALITY, pix_fmt_out="yuv420p",
            # 16 is the reference's value; with even sizes that are not multiples of 16, 2 keeps the
            # writer from rescaling (it would otherwise scale up to the next multiple of 16).
            macro_block_size=16 if enc_w % 16 == 0 and enc_h % 16 == 0 else 2,
            ffmpeg_log_level="error", output_params=output_params,
        )
        writer.send(None)  # start ffmpeg
        try:
            count = 0
            for frame in _chain(first, it):
                frame = _check_frame(frame)
                if frame.shape[:2] != (h, w):
                    raise ValueError(f"frame {count} is {frame.shape[1]}x{frame.shape[0]}, expected {w}x{h}")
                writer.send(np.ascontiguousarray(_even(frame)))
                count += 1
        finally:
            writer.close()  # ffmpeg finishes the file; on error atomic_path then deletes it
        # write_frames does not report ffmpeg's exit status; an mp4 whose index (written last)
        # is missing or broken does not open, so opening it catches a failed finish (disk full).
        probe = _ffmpeg(["-v", "error", "-i", str(tmp), "-f", "ffmetadata", "-"])
        if probe.returncode != 0:
            raise OSError(f"ffmpeg could not finish {target.name}: "
                          f"{probe.stderr.decode('utf-8', 'replace').strip()[-300:]}")
    logger.info("Wrote %s (%d frames, %dx%d, %g fps)", target, count, w, h, fps)
    return target


def _chain(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest


def _ffmpeg(args: list[str]) -> subprocess.CompletedProcess[bytes]:
    import imageio_ffmpeg

    return subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", *args],
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=120, check=False)


def _existing(path: str | os.PathLike[str], what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} not found: {p}", "Check the path (and that the file was not moved).")
    return p


def _parse_ffmetadata(text: str) -> dict[str, str]:
    """Global tags from ffmpeg's `-f ffmetadata` output (key=value lines; '=', ';', '#', '\\' and
    newline escaped with a backslash). Stops at the first [STREAM]/[CHAPTER] section."""
    tags: dict[str, str] = {}
    lines: list[tuple[str, int]] = []  # (unescaped line, index of the first unescaped '=' or -1)
    buf: list[str] = []
    eq = -1
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            buf.append(next(chars, ""))
        elif ch == "\n":
            lines.append(("".join(buf), eq))
            buf, eq = [], -1
        else:
            if ch == "=" and eq < 0:
                eq = len(buf)
            buf.append(ch)
    lines.append(("".join(buf), eq))
    for line, eq in lines:
        if line.startswith("["):
            break
        if not line or line.startswith((";", "#")) or eq < 0:
            continue
        tags[line[:eq]] = line[eq + 1:]
    return tags


def read_mp4_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings dict `write_mp4` stored in a video; {} for a video without wan_lite settings."""
    p = _existing(path, "Video")
    result = _ffmpeg(["-v", "error", "-i", str(p), "-f", "ffmetadata", "-"])
    if result.returncode != 0:
        err = result.stderr.decode("utf-8", "replace").strip().splitlines()
        raise InputError(f"Cannot read {p.name} as a video: {err[-1] if err else 'ffmpeg failed'}",
                         "Choose an mp4 file that wan_lite (or another video tool) wrote.")
    tags = _parse_ffmetadata(result.stdout.decode("utf-8", "replace"))
    for key in ("comment", "description"):
        try:
            value = json.loads(tags.get(key, ""))
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return {}


def read_mp4(path: str | os.PathLike[str]) -> tuple[np.ndarray, float]:
    """Decode a video to uint8 frames [F, H, W, 3] and its fps (for tests and previews)."""
    import imageio_ffmpeg

    p = _existing(path, "Video")
    reader = imageio_ffmpeg.read_frames(str(p))
    try:
        meta = next(reader)
        w, h = meta["size"]
        frames = [np.frombuffer(b, dtype=np.uint8).reshape(h, w, 3) for b in reader]
    except (OSError, RuntimeError) as e:
        raise InputError(f"Cannot read {p.name} as a video: {e}".splitlines()[0],
                         "Choose an mp4 file that wan_lite (or another video tool) wrote.") from e
    finally:
        reader.close()
    data = np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8)
    return data, float(meta["fps"])


# ----------------------------------------------------------------------------------------------
# Latents


def save_latents(path: str | os.PathLike[str], latents: torch.Tensor, metadata: dict[str, Any], *,
                 overwrite: bool = True) -> Path:
    """Save final latents as safetensors (one tensor "latents"), settings as JSON in the header.
    `overwrite=False`: an existing file is kept (FileExistsError, nothing written)."""
    from safetensors.torch import save_file

    header = {"format": LATENTS_FORMAT, "version": "1", "wan_lite": json_text(metadata)}
    tensor = latents.detach().to("cpu").contiguous()
    with atomic_path(path, overwrite=overwrite) as tmp:
        save_file({"latents": tensor}, str(tmp), metadata=header)
    return Path(path)


def load_latents(path: str | os.PathLike[str]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Load latents saved by `save_latents`: (tensor as saved, settings dict)."""
    from safetensors import safe_open

    p = _existing(path, "Latents file")
    hint = f"Choose a *{LATENTS_SUFFIX} file that wan_lite saved next to a video."
    try:
        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
            keys = list(f.keys())
            if header.get("format") != LATENTS_FORMAT or "latents" not in keys:
                raise InputError(f"{p.name} is a safetensors file but not wan_lite latents.", hint)
            tensor = f.get_tensor("latents")
    except InputError:
        raise
    except Exception as e:  # safetensors raises its own error types for foreign or truncated files
        raise InputError(f"{p.name} is not a readable latents file ({type(e).__name__}: {e}).", hint) from e
    try:
        settings = json.loads(header.get("wan_lite", "{}"))
    except (ValueError, RecursionError) as e:
        raise InputError(f"The settings stored in {p.name} are damaged ({type(e).__name__}).", hint) from None
    if not isinstance(settings, dict):
        raise InputError(f"The settings stored in {p.name} are damaged (a JSON {type(settings).__name__}, "
                         "not an object).", hint)
    problem = _latents_record_problem(settings)
    if problem:
        raise InputError(f"The settings stored in {p.name} are damaged: {problem}.", hint)
    return tensor, settings


def _latents_record_problem(record: dict[str, Any]) -> str | None:
    """What is wrong with the shape of a latents file's record (`Engine._record`), None if nothing:
    decode reads settings (model, seed, sizes, timings), model_dir and components from it."""
    settings = record.get("settings", {})
    if not isinstance(settings, dict):
        return f"'settings' is a {type(settings).__name__}, not an object"
    model = settings.get("model")
    if model is not None and not isinstance(model, str):
        return f"the model is {model!r}, not a name"
    seed = settings.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        return f"the seed is {seed!r}, not a whole number"
    timings = settings.get("timings", {})
    if not isinstance(timings, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in timings.values()):
        return "'timings' is not an object of seconds"
    components = record.get("components", {})
    if not isinstance(components, dict) or not all(isinstance(v, str) for v in components.values()):
        return "'components' is not an object of file names"
    if not isinstance(record.get("model_dir", ""), (str, type(None))):
        return "'model_dir' is not a folder name"
    return None


# ----------------------------------------------------------------------------------------------
# Names


def _slug(text: str, max_len: int) -> str:
    """ASCII, lower case, words joined by '-', cut at a word boundary where possible."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    if len(slug) > max_len:
        cut = slug[:max_len]
        slug = cut.rsplit("-", 1)[0] if "-" in cut[max_len // 2:] else cut
    return slug.strip("-")


def output_stem(
    out_dir: str | os.PathLike[str],
    prompt: str,
    seed: int | None,
    model: str,
    now: datetime | None = None,
) -> Path:
    """A new, readable file stem in `out_dir`: `20250131-142501_ti2v-5b_s42_a-cat-playing-piano`.

    Callers add the suffixes (".mp4", ".json", LATENTS_SUFFIX). The stem is ASCII (prompts in other
    scripts give "untitled") and no file in `out_dir` starts with it followed by a dot: if the
    name is taken, "-2", "-3", ... is appended.
    """
    folder = Path(out_dir)
    now = now or datetime.now()
    parts = [now.strftime("%Y%m%d-%H%M%S"), _slug(model, 24) or "model"]
    if seed is not None:
        parts.append(f"s{int(seed)}")
    parts.append(_slug(prompt, 48) or "untitled")
    return free_stem(folder / "_".join(parts))


def stem_taken(stem: Path) -> bool:
    """Whether `stem` itself or any `stem.*` file (mp4, sidecar, latents, ...) exists."""
    return stem.exists() or any(stem.parent.glob(glob.escape(stem.name) + ".*"))


def free_stem(base: Path) -> Path:
    """`base`, or `base-2`, `base-3`, ... : the first stem no file uses (`stem_taken`)."""
    stem, n = base, 2
    while stem_taken(stem):
        stem, n = base.with_name(f"{base.name}-{n}"), n + 1
    return stem


def output_files(stem: Path) -> dict[str, Path]:
    """The files of one result: video, sidecar JSON, latents."""
    return {"video": stem.with_name(stem.name + ".mp4"), "sidecar": stem.with_name(stem.name + ".json"),
            "latents": stem.with_name(stem.name + LATENTS_SUFFIX)}


# ----------------------------------------------------------------------------------------------
# Targets and faults: what a run may write, checked before any model loads

# A 720p 121-frame job writes an mp4 of a few MB and latents of tens of MB; this leaves room.
MIN_FREE_BYTES = 300 * 2**20
_WRITE_HINT = "Free some space or choose another output folder (--out), then try again."
_REASONS = {errno.ENOSPC: "the disk is full", errno.EROFS: "the folder is on a read-only disk",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied",
            errno.EDQUOT: "the disk quota is used up"}


class OutputError(WanLiteError):
    """An output cannot be written: the name is taken, or the folder is read-only or full."""


def is_our_sidecar(path: Path) -> bool:
    """Whether `path` is a sidecar wan_lite wrote (a JSON object with a "wan_lite" key)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return False
    return isinstance(data, dict) and "wan_lite" in data


def stem_for_out(out: str | os.PathLike[str]) -> Path:
    """The stem of a result the user named (`--out NAME.mp4`)."""
    path = Path(out)
    if path.suffix.lower() != ".mp4" or not path.stem:
        raise OutputError(f"--out must name an .mp4 file, got {path}.",
                          "Give a file name ending in .mp4; its settings JSON and latents go next to it.")
    return path.with_suffix("")


def check_targets(stem: Path, overwrite: bool, kinds: tuple[str, ...] = ("video", "sidecar", "latents")) -> None:
    """Refuse, before a run, to write over a file: any of the result's files that exists, unless
    `overwrite`; a sidecar name that holds a file wan_lite did not write, always (--out config.mp4
    next to a model would otherwise replace its config.json)."""
    files = output_files(stem)
    sidecar = files["sidecar"]
    if "sidecar" in kinds and sidecar.exists() and not is_our_sidecar(sidecar):
        raise OutputError(f"{sidecar} exists and is not a wan_lite settings file; the settings of a video "
                          f"named {stem.name}.mp4 would replace it.",
                          "Choose another --out name or folder (the settings JSON is named after the video).")
    if overwrite:
        return
    for kind in kinds:
        if files[kind].exists():
            raise OutputError(f"{files[kind]} already exists; it is kept.",
                              "Choose another --out name, or add --overwrite to replace the earlier result.")


def check_output_folder(folder: Path, need_bytes: int = MIN_FREE_BYTES) -> None:
    """Refuse a folder the result cannot be written to (not creatable, read-only, nearly full)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".wan_lite-write-check-", suffix=PARTIAL_SUFFIX, dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        reason = _REASONS.get(err.errno or 0) or err.strerror or str(err)
        raise OutputError(f"Cannot write to the output folder {folder}: {reason}.",
                          "Choose a folder you can write to (--out, or --output-dir in the app).") from None
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise OutputError(f"The output folder {folder} has {free / 2**20:.0f} MB free; a video and its "
                          f"latents need up to {need_bytes / 2**20:.0f} MB.", _WRITE_HINT)


def write_failed(err: OSError, path: Path, latents: Path | None) -> OutputError:
    """The error to show when writing `path` failed anyway; says where the latents are, if kept."""
    reason = _REASONS.get(err.errno or 0) or err.strerror or str(err)
    if latents is not None and latents.is_file():
        kept = (f" The latents are kept in {latents}: `python -m wan_lite decode {latents}` makes the video "
                "from them without running the model again.")
    else:
        kept = " Nothing of this result was saved."
    return OutputError(f"Could not write {path.name} in {path.parent}: {reason}.{kept}", _WRITE_HINT)
