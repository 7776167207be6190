"""Canonical weights on disk, and writing any file without leaving it half-written.

Canonical weights are a safetensors file whose metadata holds
``format = dir-canonical``, ``format_version`` and ``spec`` (the DiRSpec as JSON),
so any backend can rebuild the network from the file alone.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from common.params import check_state
from common.spec import DiRSpec, SpecError

CANONICAL_FORMAT = "dir-canonical"
FORMAT_VERSION = "1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or not what DiR expects."""


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
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` and rename the result onto ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)


def save_canonical(path, state: dict[str, np.ndarray], spec: DiRSpec, extra_metadata: dict[str, str] | None = None) -> None:
    """Write canonical weights (validated against the table) as safetensors."""
    from safetensors.numpy import save_file

    check_state(state, spec, source=str(path))
    metadata = {"format": CANONICAL_FORMAT, "format_version": FORMAT_VERSION, "spec": spec.to_json()}
    metadata.update(extra_metadata or {})
    tensors = {name: np.ascontiguousarray(value) for name, value in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Float tensors (bf16 and fp16 widened to float32 exactly) and metadata of a safetensors
    file, with a clear error if it is not one."""
    from common.formats import read_safetensors as read_stored  # formats builds on this module

    tensors, metadata = read_stored(path)
    return {name: stored.to_float32() if stored.dtype == "bfloat16" else stored.array
            for name, stored in tensors.items()}, metadata


def spec_from_metadata(metadata: dict[str, str], source: str) -> DiRSpec:
    if "spec" not in metadata:
        raise CheckpointError(f"{source}: metadata has no 'spec'; expected a DiR checkpoint written by this project")
    try:
        return DiRSpec.from_json(metadata["spec"], source=source)
    except SpecError as err:
        raise CheckpointError(str(err)) from None


def load_canonical(path) -> tuple[dict[str, np.ndarray], DiRSpec]:
    """Read canonical weights and their spec; every tensor is checked against the table."""
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != CANONICAL_FORMAT:
        raise CheckpointError(
            f"{path}: metadata format is {metadata.get('format')!r}, expected '{CANONICAL_FORMAT}'"
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {metadata.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    spec = spec_from_metadata(metadata, str(path))
    try:
        check_state(tensors, spec, source=str(path))
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    return tensors, spec
