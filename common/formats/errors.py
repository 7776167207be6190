"""The errors every DiR checkpoint reader and writer raises, and the check each reader starts with.

``CheckpointError`` is the root (``common.checkpoint`` re-exports it); a command line
catches it and prints one line with exit code 2. ``FormatError`` is a file that is
unreadable, refused or not what DiR expects; ``UnsafeCheckpointError`` a file that asks to
run code or build objects (it was not loaded); ``MissingFrameworkError`` a format whose
package is not installed.
"""
from __future__ import annotations

from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or not what DiR expects."""


class FormatError(CheckpointError):
    """A checkpoint file is unreadable, refused, or does not hold what DiR expects."""


class UnsafeCheckpointError(FormatError):
    """The file asks to run code or build objects that are not plain data; it was not loaded."""


class MissingFrameworkError(FormatError):
    """The format needs a framework that is not installed."""


def _check_file(path: Path) -> None:
    if not path.exists():
        raise FormatError(f"{path}: no such file")
    if not path.is_file():
        raise FormatError(f"{path}: not a file")


def _short(value, limit: int = 80) -> str:
    """repr(value) for a message, cut to ``limit`` characters; an integer too long to print is described."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 1000:
        return f"<an integer of {value.bit_length()} bits>"
    try:
        text = repr(value)
    except ValueError:  # e.g. a container holding an integer of more digits than Python prints
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."
