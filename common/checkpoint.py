"""Canonical weights on disk.

Canonical weights are a safetensors file whose metadata holds
``format = dir-canonical``, ``format_version`` and ``spec`` (the DiRSpec as JSON),
so any backend can rebuild the network from the file alone. The file formats
themselves live in ``common/formats``; this module builds on them.
"""
from __future__ import annotations

import numpy as np

from common.atomic import atomic_path, atomic_write  # re-exported until backends import common.atomic
from common.formats import CANONICAL_FORMAT, FORMAT_VERSION, CheckpointError
from common.formats import read_safetensors as _read_stored
from common.params import check_state
from common.spec import DiRSpec, SpecError

__all__ = ["CANONICAL_FORMAT", "FORMAT_VERSION", "CheckpointError", "atomic_path", "atomic_write", "save_canonical",
           "read_safetensors", "spec_from_metadata", "load_canonical"]


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
    tensors, metadata = _read_stored(path)
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
