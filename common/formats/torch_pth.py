"""``.pth``/``.pt``: PyTorch's ``torch.save`` files (the one format that needs its framework).

A ``.pth`` is a zip archive holding a pickle of the saved object (here a state dict or a
training checkpoint dict) and one storage record per tensor. It is read with
``torch.load(weights_only=True)``, whose unpickler admits only tensors, plain containers
and scalars and refuses any other global before it is built; anything it refuses is
reported as refused, never retried without the restriction. Only dense (strided,
unquantized) tensors are accepted; they become :class:`Stored` numpy arrays (bf16 as its
uint16 bits). Writing is ``torch.save`` of plain dicts of tensors, tensors shared between
sections (model and EMA) saved once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from common.formats.errors import FormatError, MissingFrameworkError, UnsafeCheckpointError, _check_file
from common.formats.stored import Stored


def _import_torch(path, action: str):
    try:
        import torch
    except ImportError:
        raise MissingFrameworkError(f"{path}: {action} .pth/.pt files needs PyTorch (pip install torch); "
                                    ".safetensors, .pdparams and .ckpt need no framework") from None
    return torch


def _torch_to_stored(value, torch, where: str):
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.is_quantized:
            raise FormatError(f"{where}: a {value.layout} tensor, DiR checkpoints hold dense tensors")
        tensor = value.detach().cpu().contiguous()
        if tensor.dtype == torch.bfloat16:
            return Stored(tensor.view(torch.int16).numpy().view(np.uint16), "bfloat16")
        try:
            return Stored.from_numpy(tensor.numpy())
        except TypeError as err:
            raise FormatError(f"{where}: tensor of dtype {tensor.dtype} has no numpy equivalent ({err})") from None
    if isinstance(value, dict):
        return {k: _torch_to_stored(v, torch, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_torch_to_stored(v, torch, f"{where}[{i}]") for i, v in enumerate(value))
    return value


def load_torch(path):
    """torch.load(weights_only=True) of ``path``, tensors turned into :class:`Stored`."""
    path = Path(path)
    _check_file(path)
    torch = _import_torch(path, "reading")
    try:
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
