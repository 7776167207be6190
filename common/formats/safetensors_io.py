"""``.safetensors``: the canonical DiR format, read and written without the safetensors package.

A safetensors file is an 8-byte little-endian header length, a JSON header (each
tensor's dtype, shape and byte range, plus ``__metadata__``: strings only), and the raw
tensor bytes. Canonical DiR weights are safetensors under the canonical (PyTorch) names
whose metadata holds ``format = dir-canonical``, ``format_version``, ``spec`` (the
DiRSpec as JSON) and, when known, ``recipe`` (the training recipe as JSON).

Reading trusts nothing: the header length is checked against the file (and capped), the
header must be a JSON object of the expected fields naming no key twice, every dtype must
be known, every shape at most 32-dimensional, every byte range must match its dtype and
shape, and the ranges must tile the data exactly (no overlap, hole, truncation or trailing
bytes) before a byte of tensor data is read. bf16
(``BF16``) stays as its uint16 bits (see ``stored.py``).
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np

from common.formats.errors import FormatError, _check_file
from common.formats.stored import Stored, _numpy_dtype

CANONICAL_FORMAT = "dir-canonical"
FORMAT_VERSION = "1"

_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
              "U8": "uint8", "BOOL": "bool"}
_ST_CODES = {name: code for code, name in _ST_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
_MAX_DIMS = 32  # numpy's limit (NPY_MAXDIMS)


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs):
    """json object_pairs_hook: a header that names a tensor (or __metadata__) twice is refused, not last-wins."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _preview(value, limit: int = 120) -> str:
    """repr(value), cut to ``limit`` characters (a header value can be as long as the header)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_safetensors(path) -> tuple[dict[str, Stored], dict[str, str]]:
    """Tensors (bf16 as bits) and metadata of a safetensors file, every offset checked."""
    path = Path(path)
    _check_file(path)
    size = path.stat().st_size

    def bad(why: str) -> FormatError:
        return FormatError(f"{path}: not a readable safetensors file ({why})")

    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, too short for the 8-byte header length")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, _MAX_HEADER):
            raise bad(f"header length {header_len} exceeds the file ({size} bytes); truncated or not safetensors")
        try:
            header = json.loads(handle.read(header_len).decode("utf-8"), object_pairs_hook=_unique_keys)
        except _DuplicateKey as err:
            raise bad(f"the header names {err.args[0]!r} twice") from None
        except RecursionError:
            raise bad("header is not JSON: nested too deeply") from None
        except ValueError as err:  # UnicodeDecodeError, JSONDecodeError, an integer of too many digits
            raise bad(f"header is not JSON: {err}") from None
        if not isinstance(header, dict):
            raise bad("header is not a JSON object")
        metadata = header.pop("__metadata__", None)
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise bad("__metadata__ must map strings to strings")
        data_size = size - 8 - header_len
        entries = []
        for name, info in header.items():
            if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
                raise bad(f"tensor '{name}': entry must hold dtype, shape and data_offsets")
            code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            if code not in _ST_DTYPES:
                raise bad(f"tensor '{name}': unsupported dtype {_preview(code)} (supported: {', '.join(_ST_DTYPES)})")
            if not (isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                    for n in shape)):
                raise bad(f"tensor '{name}': shape {_preview(shape)} is not a list of non-negative integers")
            if len(shape) > _MAX_DIMS:
                raise bad(f"tensor '{name}': {len(shape)} dimensions, more than numpy's {_MAX_DIMS}")
            if not (isinstance(offsets, list) and len(offsets) == 2
                    and all(isinstance(n, int) and not isinstance(n, bool) for n in offsets)
                    and 0 <= offsets[0] <= offsets[1]):
                raise bad(f"tensor '{name}': bad data_offsets {_preview(offsets)}")
            dtype = _ST_DTYPES[code]
            nbytes = math.prod(shape) * _numpy_dtype(dtype).itemsize
            if nbytes >= 2**63:
                raise bad(f"tensor '{name}': shape {_preview(shape)} declares 2**63 bytes or more")
            if offsets[1] - offsets[0] != nbytes:
                raise bad(f"tensor '{name}': {offsets[1] - offsets[0]} bytes of data, expected {nbytes} for "
                          f"{code} {shape}")
            entries.append((offsets[0], offsets[1], name, dtype, shape))
        entries.sort()
        position = 0
        for begin, end, name, _, _ in entries:
            if begin != position:
                raise bad(f"tensor '{name}' starts at byte {begin}, expected {position} (overlap or hole)")
            position = end
        if position != data_size:
            raise bad(f"the tensors need {position} bytes of data but the file holds {data_size}"
                      + (" (truncated)" if data_size < position else " (trailing bytes)"))
        base = 8 + header_len
        where = {name: (begin, end, dtype, shape) for begin, end, name, dtype, shape in entries}
        tensors: dict[str, Stored] = {}
        for name in header:  # file order
            begin, end, dtype, shape = where[name]
            handle.seek(base + begin)
            raw = bytearray(end - begin)
            if handle.readinto(raw) != end - begin:
                raise bad(f"tensor '{name}' is cut off (truncated)")
            array = np.frombuffer(raw, dtype=_numpy_dtype(dtype)).reshape(shape)
            tensors[name] = Stored(array.astype(array.dtype.newbyteorder("="), copy=False), dtype)
    return tensors, dict(metadata)


def write_safetensors(path, tensors: dict[str, Stored], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file (the ``safetensors`` package reads it) to ``path`` as given (no temp file)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = []
    for name, stored in tensors.items():
        array = np.ascontiguousarray(stored.array, dtype=_numpy_dtype(stored.dtype))
        header[name] = {"dtype": _ST_CODES[stored.dtype], "shape": list(stored.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the safetensors package pads the header to 8 bytes
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        for array in arrays:  # one tensor at a time: no second copy of the whole model
            handle.write(memoryview(array.reshape(-1)).cast("B"))
