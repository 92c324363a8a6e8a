"""Model downloads from the Hugging Face Hub: only the files wan_lite needs, resumable, with a
disk-space check before the first byte.

`huggingface_hub.snapshot_download(local_dir=...)` resumes interrupted files by itself (partial
files live in `<folder>/.cache/huggingface/download/`), so a second click continues a download.
Progress is measured as the bytes present under the folder, which needs no hooks into the library.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from wan_lite.errors import WanLiteError
from wan_lite.registry import ModelSpec
from wan_lite.units import human_bytes  # noqa: F401  (re-exported: the panels import it from here)

log = logging.getLogger(__name__)

DISK_MARGIN_BYTES = 2 * 2**30  # room left for the OS and for the outputs


class DownloadError(WanLiteError):
    """A download cannot start or did not finish."""


def allow_patterns(spec: ModelSpec) -> list[str]:
    """Files of the official repo that wan_lite reads (no examples, assets or docs)."""
    dit: list[str] = []
    for part in spec.dits:
        dit += [f"{part.folder}/*"] if part.folder else ["config.json", "diffusion_pytorch_model*.safetensors*"]
    return [*dit, spec.vae_file, spec.t5_file, f"{spec.tokenizer_dir}/*"]


def existing_ancestor(path: Path) -> Path:
    """The nearest folder that exists (the target may not be created yet)."""
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@dataclass(frozen=True)
class DownloadPlan:
    total_bytes: int  # everything the model needs
    missing_bytes: int  # what still has to come
    free_bytes: int
    files: int

    @property
    def fits(self) -> bool:
        return self.missing_bytes + DISK_MARGIN_BYTES <= self.free_bytes


def plan_download(files: Iterable[tuple[str, int | None, bool]], free_bytes: int) -> DownloadPlan:
    """`files`: (name, size or None, will_download). Unknown sizes count as zero."""
    items = list(files)
    total = sum(size or 0 for _, size, _ in items)
    missing = sum(size or 0 for _, size, will in items if will)
    return DownloadPlan(total, missing, free_bytes, len(items))


def check_space(plan: DownloadPlan, folder: Path) -> None:
    """Refuse up front, in plain words, when the disk is too small."""
    if not plan.fits:
        raise DownloadError(
            f"Not enough disk space: the download needs {human_bytes(plan.missing_bytes)} (plus "
            f"{human_bytes(DISK_MARGIN_BYTES)} to spare) but only {human_bytes(plan.free_bytes)} is free "
            f"where the models go ({folder}).",
            "Free some space, or start wan_lite with --models-dir pointing to a bigger disk.",
        )


def folder_bytes(folder: Path) -> int:
    """Bytes under `folder`, counting partial downloads (hidden cache folders included)."""
    total = 0
    if folder.is_dir():
        for p in folder.rglob("*"):
            try:
                if p.is_file():
                    total += p.stat().st_size
            except OSError:  # a partial file renamed while we looked
                continue
    return total


@dataclass
class DownloadJob:
    """One running download; `poll()` yields (bytes so far, total bytes, done) until it ends."""

    spec: ModelSpec
    folder: Path
    plan: DownloadPlan
    start_bytes: int
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def poll(self, every_s: float = 1.0) -> Iterator[tuple[int, int]]:
        while not self.done.wait(every_s):
            yield folder_bytes(self.folder), self.plan.total_bytes
        yield folder_bytes(self.folder), self.plan.total_bytes
        if self.error is not None:
            raise DownloadError(
                f"The download of {self.spec.hf_repo} stopped: {self.error}",
                "Check the internet connection and click Download again; it continues where it stopped.",
            )


def start_download(spec: ModelSpec, folder: Path, token: str | None = None) -> DownloadJob:
    """Check the disk, then download in a background thread. Raises DownloadError up front."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:  # pragma: no cover - a requirement
        raise DownloadError("huggingface_hub is not installed.", "Run the launcher again to install it.") from err
    patterns = allow_patterns(spec)
    try:
        infos = snapshot_download(spec.hf_repo, local_dir=folder, allow_patterns=patterns, dry_run=True, token=token)
    except Exception as err:  # network, auth, unknown repo: all reported the same way
        raise DownloadError(
            f"Could not reach {spec.hf_repo} on Hugging Face ({type(err).__name__}: {err}).",
            "Check the internet connection, or download the files by hand into " + str(folder) + ".",
        ) from None
    plan = plan_download(((i.filename, i.file_size, i.will_download) for i in infos),
                         shutil.disk_usage(existing_ancestor(folder)).free)
    check_space(plan, folder)
    folder.mkdir(parents=True, exist_ok=True)
    job = DownloadJob(spec, folder, plan, folder_bytes(folder))

    def work() -> None:
        try:
            snapshot_download(spec.hf_repo, local_dir=folder, allow_patterns=patterns, token=token)
        except BaseException as err:  # reported through poll()
            job.error = err
        finally:
            job.done.set()

    log.info("Downloading %s (%s of %s still needed) into %s", spec.hf_repo,
             human_bytes(plan.missing_bytes), human_bytes(plan.total_bytes), folder)
    threading.Thread(target=work, name=f"download-{spec.name}", daemon=True).start()
    return job


def progress_text(done_bytes: int, total_bytes: int, started: float, start_bytes: int = 0) -> str:
    """"1.2 GB of 34.2 GB (4%), 55.0 MB/s"; the speed counts only this session's bytes."""
    elapsed = max(1e-6, time.monotonic() - started)
    pct = 100.0 * done_bytes / total_bytes if total_bytes else 0.0
    speed = max(0, done_bytes - start_bytes) / elapsed
    return f"{human_bytes(done_bytes)} of {human_bytes(total_bytes)} ({pct:.0f}%), {human_bytes(speed)}/s"
