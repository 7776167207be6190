"""``.pth``/``.pt``: PyTorch's ``torch.save`` files (the one format that needs its framework).

A ``.pth`` is a zip archive holding a pickle of the saved object (here a state dict or a
training checkpoint dict) and one storage record per tensor. It is read with
``torch.load(weights_only=True)``, whose unpickler admits only tensors, plain containers
and scalars and refuses any other global before it is built; anything it refuses is
reported as refused, never retried without the restriction. Only dense (strided,
unquantized) tensors whose elements do not overlap are accepted (a stride-0 view of a few
bytes would otherwise become gigabytes); they become :class:`Stored` numpy arrays (bf16 as
its uint16 bits). Before torch reads the archive, a compressed record that would unpack to
far more than the file holds is refused, and the unpickled tree is bounded in depth and in
the objects it expands to through shared references. Writing is ``torch.save`` of plain
dicts of tensors, tensors shared between sections (model and EMA) saved once.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from common.formats.errors import (
    FormatError, MissingFrameworkError, UnsafeCheckpointError, _check_file, _short,
)
from common.formats.stored import Stored


def _import_torch(path, action: str):
    try:
        import torch
    except ImportError:
        raise MissingFrameworkError(f"{path}: {action} .pth/.pt files needs PyTorch (pip install torch); "
                                    ".safetensors, .pdparams and .ckpt need no framework") from None
    return torch


MAX_DEPTH = 64  # nesting of dicts/lists/tuples
MAX_OBJECTS = 1_000_000  # containers and leaves, counted as often as they are referenced


def _torch_to_stored(value, torch, where: str, depth: int = 0, visits=None):
    visits = [0] if visits is None else visits
    visits[0] += 1
    if depth > MAX_DEPTH:
        raise FormatError(f"{where}: nested deeper than {MAX_DEPTH} levels (corrupt or crafted)")
    if visits[0] > MAX_OBJECTS:  # shared references can make a few bytes of pickle expand to 2**N objects
        raise FormatError(f"{where}: the file expands to more than {MAX_OBJECTS:,} objects through shared "
                          "references; a checkpoint holds a few thousand (corrupt or crafted)")
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.is_quantized:
            raise FormatError(f"{where}: a {value.layout} tensor, DiR checkpoints hold dense tensors")
        storage_bytes = value.untyped_storage().nbytes()
        if value.numel() * value.element_size() > storage_bytes:  # overlapping strides (stride 0): a bomb
            raise FormatError(f"{where}: a tensor of shape {list(value.shape)} (strides {list(value.stride())}) "
                              f"over a storage of {storage_bytes} bytes: its elements overlap, which "
                              "torch.save of a DiR model never writes (corrupt or crafted)")
        tensor = value.detach().cpu().contiguous()
        if tensor.dtype == torch.bfloat16:
            return Stored(tensor.view(torch.int16).numpy().view(np.uint16), "bfloat16")
        try:
            return Stored.from_numpy(tensor.numpy())
        except TypeError as err:
            raise FormatError(f"{where}: tensor of dtype {tensor.dtype} has no numpy equivalent ({err})") from None
    if isinstance(value, dict):
        return {k: _torch_to_stored(v, torch, f"{where}[{_short(k)}]", depth + 1, visits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_torch_to_stored(v, torch, f"{where}[{i}]", depth + 1, visits) for i, v in enumerate(value))
    return value


def load_torch(path):
    """torch.load(weights_only=True) of ``path``, tensors turned into :class:`Stored`."""
    path = Path(path)
    _check_file(path)
    torch = _import_torch(path, "reading")
    _check_archive(path)
    try:
        with warnings.catch_warnings():  # torch's warnings about a file it then refuses (its pickle protocol,
            warnings.filterwarnings("ignore", module=r"torch(\.|$)")  # classes a crafted pickle names): not ours

            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        text = str(err)
        lowered = text.lower()
        if any(key in lowered for key in ("unsupported global", "not an allowed global", "is blocked",
                                          "unsupported operand")):
            detail = next((line.strip() for line in text.splitlines() if "global" in line.lower()
                           or "unsupported" in line.lower()), text.splitlines()[0])
            raise UnsafeCheckpointError(
                f"{path}: refused to load: torch.load(weights_only=True) rejects it, so it asks to build objects "
                f"other than tensors and plain containers ({detail})") from None
        if "weights only load failed" in lowered:  # corrupt pickle inside a valid archive
            detail = next((line.strip() for line in text.splitlines()[1:] if line.strip()), "")
            raise FormatError(f"{path}: not a readable PyTorch checkpoint (corrupt: {detail})") from None
        first = text.splitlines()[0] if text else type(err).__name__
        raise FormatError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt: {first})") from None
    return _torch_to_stored(obj, torch, str(path))


# torch.save stores its records uncompressed; a compressed one may declare at most this many bytes per
# compressed byte (deflate's own limit is ~1032), or it could unpack to gigabytes from a small file.
_MAX_EXPANSION = 200
_ALWAYS_ALLOWED_BYTES = 64 << 20


def _check_archive(path: Path) -> None:
    """Refuse a zip whose records would unpack to far more than the file holds (torch.load reads each whole)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except Exception:  # noqa: BLE001 - not a zip, or a damaged one: torch.load says what it makes of it
        return
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED and \
                info.file_size > max(_ALWAYS_ALLOWED_BYTES, _MAX_EXPANSION * info.compress_size):
            raise FormatError(f"{path}: not a readable PyTorch checkpoint (record '{_short(info.filename)}' declares "
                              f"{info.file_size:,} bytes from {info.compress_size:,} compressed bytes; refusing to "
                              "unpack it: a decompression bomb?)")


def save_torch(path, obj) -> None:
    """torch.save ``obj`` (with :class:`Stored` leaves made torch tensors; shared objects stay shared)."""
    torch = _import_torch(path, "writing")
    made: dict[int, Any] = {}

    def convert(value):
        if isinstance(value, Stored):
            if id(value) not in made:
                array = np.ascontiguousarray(value.array)
                if not array.flags.writeable:
                    array = array.copy()
                if value.dtype == "bfloat16":
                    made[id(value)] = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
                else:
                    made[id(value)] = torch.from_numpy(array)
            return made[id(value)]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(convert(v) for v in value)
        return value

    torch.save(convert(obj), path)
