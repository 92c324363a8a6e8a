"""Model downloads from the Hugging Face Hub: only the files wan_lite needs, resumable, with a
disk-space check before the first byte.

`huggingface_hub.snapshot_download(local_dir=...)` resumes interrupted files by itself (partial
files live in `<folder>/.cache/huggingface/download/`), so a second click continues a download.
Progress is measured as the bytes present under the folder, which needs no hooks into the library.
"""

from __future__ import annotations

import logging
import os
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
# `snapshot_download(dry_run=True)` (the size and disk check before the first byte) came with 1.0.
MIN_HUB_VERSION = (1, 0)
# What the official repos' files weigh (published sizes, bytes), shown before Download is clicked.
DIT_BYTES = {"ti2v-5b": 20_000_000_000, "t2v-a14b": 2 * 57_150_000_000, "i2v-a14b": 2 * 57_160_000_000}
VAE_BYTES = {"2.2": 2_818_754_672, "2.1": 507_609_880}
T5_BYTES = 11_361_820_672
TOKENIZER_BYTES = 21_000_000


def shared_files(spec: ModelSpec) -> list[str]:
    """Files of a model that other models' repos carry identically (umT5 and its tokenizer for
    all three, the Wan 2.1 VAE for both A14B): downloaded once, then shared."""
    return [spec.t5_file, spec.vae_file, spec.tokenizer_dir]


def download_bytes(spec: ModelSpec, shared_have: Iterable[str] = ()) -> tuple[int, int]:
    """(bytes to download, bytes of it that another model already has on disk) for `spec`."""
    have = set(shared_have)
    parts = {spec.t5_file: T5_BYTES, spec.vae_file: VAE_BYTES.get(spec.vae_version, 0),
             spec.tokenizer_dir: TOKENIZER_BYTES}
    total = DIT_BYTES.get(spec.name, 0) + sum(parts.values())
    return total, sum(v for k, v in parts.items() if k in have)


def _present(folder: Path, rel: str) -> bool:
    """A complete file (or a non-empty folder of them): the Hub writes a file under its final
    name only once it is whole (partial ones live under .cache/huggingface/download)."""
    path = folder / rel
    if path.is_dir():
        return any(p.is_file() for p in path.rglob("*"))
    return path.is_file()


def shared_available(spec: ModelSpec, folder: Path, others: Iterable[Path]) -> dict[str, Path]:
    """Shared files `spec` still needs in `folder` that another model's folder already holds."""
    out: dict[str, Path] = {}
    for rel in shared_files(spec):
        if _present(folder, rel):
            continue
        for other in others:
            if Path(other).resolve() != Path(folder).resolve() and _present(Path(other), rel):
                out[rel] = Path(other) / rel
                break
    return out


def share_parts(spec: ModelSpec, folder: Path, others: Iterable[Path]) -> list[str]:
    """Give `folder` the shared files other model folders already hold, as hard links (no copy,
    no second download; a symbolic link where hard links are not possible). Returns what was
    shared, relative to `folder`."""
    done = []
    for rel, src in shared_available(spec, folder, others).items():
        files = [p for p in src.rglob("*") if p.is_file()] if src.is_dir() else [src]
        try:
            for f in files:
                target = folder / rel / f.relative_to(src) if src.is_dir() else folder / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(f, target)
                except OSError:
                    os.symlink(f.resolve(), target)
        except OSError as err:  # not shared: it is downloaded like the rest
            log.warning("Could not share %s from %s: %s", rel, src, err)
            continue
        done.append(rel)
    return done


class DownloadError(WanLiteError):
    """A download cannot start or did not finish."""


def allow_patterns(spec: ModelSpec, skip: Iterable[str] = ()) -> list[str]:
    """Files of the official repo that wan_lite reads (no examples, assets or docs), less the
    shared files in `skip` (already there)."""
    dit: list[str] = []
    for part in spec.dits:
        dit += [f"{part.folder}/*"] if part.folder else ["config.json", "diffusion_pytorch_model*.safetensors*"]
    skip = set(skip)
    shared = [p for rel, p in ((spec.vae_file, spec.vae_file), (spec.t5_file, spec.t5_file),
                               (spec.tokenizer_dir, f"{spec.tokenizer_dir}/*")) if rel not in skip]
    return [*dit, *shared]


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
            log.warning("Download of %s stopped: %s: %s", self.spec.hf_repo, type(self.error).__name__, self.error)
            raise DownloadError(
                f"The download of {self.spec.hf_repo} stopped. {_plain_network_error(self.error, self.spec.hf_repo)}",
                "Check the internet connection and click Download again; it continues where it stopped.",
            )


def hub_version_problem(version: str) -> str | None:
    """Why this huggingface_hub cannot check a download before it starts (None: it can)."""
    try:
        parts = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        return None
    if parts >= MIN_HUB_VERSION:
        return None
    need = ".".join(map(str, MIN_HUB_VERSION))
    return f"huggingface_hub {version} is too old for downloads from wan_lite (it needs {need} or newer)."


def _plain_network_error(err: BaseException, repo: str) -> str:
    """What went wrong talking to the Hub, in words (the library's own text goes to the log)."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    name = type(err).__name__
    if status in (401, 403) or "GatedRepo" in name:
        return f"Hugging Face refused access to {repo} (a login or accepting its licence on huggingface.co may be needed)."
    if status == 404 or "RepositoryNotFound" in name or "EntryNotFound" in name:
        return f"{repo} was not found on Hugging Face."
    if "Offline" in name or isinstance(err, (ConnectionError, TimeoutError, OSError)) or "Connect" in name:
        return "Could not reach Hugging Face: this computer seems to be offline."
    return f"Hugging Face did not answer as expected for {repo}."


def start_download(spec: ModelSpec, folder: Path, token: str | None = None,
                   others: Iterable[Path] = ()) -> DownloadJob:
    """Check the disk, then download in a background thread. Raises DownloadError up front.
    `others`: the other models' folders; the parts they share with `spec` (umT5, its tokenizer,
    the Wan 2.1 VAE) are linked from there instead of downloaded again."""
    try:
        import huggingface_hub
        from huggingface_hub import snapshot_download
    except ImportError as err:  # pragma: no cover - a requirement
        raise DownloadError("huggingface_hub is not installed.", "Run the launcher again to install it.") from err
    problem = hub_version_problem(getattr(huggingface_hub, "__version__", ""))
    if problem:
        raise DownloadError(problem, "Run the launcher again (it installs requirements.txt), or "
                                     "pip install -U 'huggingface_hub>=1.0'.")
    folder.mkdir(parents=True, exist_ok=True)
    shared = share_parts(spec, folder, others)
    if shared:
        log.info("Shared with the other models (not downloaded again): %s", ", ".join(shared))
    patterns = allow_patterns(spec, skip=[rel for rel in shared_files(spec) if _present(folder, rel)])
    try:
        infos = snapshot_download(spec.hf_repo, local_dir=folder, allow_patterns=patterns, dry_run=True, token=token)
    except Exception as err:  # network, auth, unknown repo: in plain words here, the details in the log
        log.warning("Download check of %s failed: %s: %s", spec.hf_repo, type(err).__name__, err)
        raise DownloadError(
            _plain_network_error(err, spec.hf_repo),
            "Check the internet connection and click Download again, or download the files by hand into "
            + str(folder) + ".",
        ) from None
    plan = plan_download(((i.filename, i.file_size, i.will_download) for i in infos),
                         shutil.disk_usage(existing_ancestor(folder)).free)
    check_space(plan, folder)
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
