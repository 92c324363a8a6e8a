"""Errors a user can cause. Each carries a message that says what is wrong and what to do.

The CLI and the UI print `str(error)` and nothing else for these; a traceback is only shown for
genuine bugs (anything that is not a `WanLiteError`).
"""

from __future__ import annotations


class WanLiteError(Exception):
    """Base class of every error caused by input, files or hardware rather than by a bug."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  -> {hint}")


class CheckpointError(WanLiteError):
    """A model file is missing, truncated, corrupt, of the wrong kind or has wrong shapes."""


class InputError(WanLiteError):
    """A request field (prompt, image, size, frames, ...) cannot be used."""


class OutOfMemoryError(WanLiteError):
    """The request cannot fit this machine, even with the leanest plan."""


class Cancelled(WanLiteError):
    """The user cancelled the job; work done so far (saved latents) is kept."""

    def __init__(self, message: str = "Cancelled by the user.") -> None:
        super().__init__(message)
