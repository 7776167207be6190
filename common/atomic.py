"""Writing a file without ever leaving it half-written.

Everything the project writes that a reader may pick up later (checkpoints, converted
weights, sample grids, configs, metrics) goes through :func:`atomic_path`: the data is
written to a temp file beside the target, flushed to disk, and renamed onto the target
in one step, so a reader sees the old file or the new one, never a torn one.

This module depends on nothing else in the project, so any module can use it.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is renamed onto ``path``.

    A crash or exception inside the block leaves ``path`` as it was (the old file,
    or nothing) and removes the temp file: readers never see a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
        fsync_folder(path.parent)  # the rename itself survives a power cut only once the folder is synced
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def fsync_folder(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (renames, deletions) to disk, where the OS allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders; the file itself is synced
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` and rename the result onto ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)
