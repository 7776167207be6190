"""Every DiR checkpoint format, read and written without trusting the file.

| format          | suffix             | read / written with                                 | needs     |
|-----------------|--------------------|-----------------------------------------------------|-----------|
| ``torch``       | ``.pth``, ``.pt``  | ``torch.load(weights_only=True)`` / ``torch.save``  | torch     |
| ``paddle``      | ``.pdparams``      | :class:`RestrictedUnpickler` / ``pickle`` protocol 4 | numpy     |
| ``mindspore``   | ``.ckpt``          | protobuf messages built in Python (no protoc)       | protobuf  |
| ``safetensors`` | ``.safetensors``   | the reader/writer below (header + raw bytes)        | numpy     |

A checkpoint is untrusted input: ``.pth`` loads with ``weights_only=True``; ``.pdparams``
goes through :class:`RestrictedUnpickler`, which admits numpy arrays, plain containers and
scalars and refuses everything else *before* anything is called; ``.ckpt`` and
``.safetensors`` are parsed as data with every size checked against the file.

How bfloat16 is stored (numpy has no bfloat16; here it is a ``uint16`` bit pattern):

* ``.pth``: ``torch.bfloat16`` tensors;
* ``.pdparams``: ``numpy.uint16`` arrays of the bf16 bits (what ``paddle.save`` writes for a
  bfloat16 tensor; ``paddle.load`` turns them back into bfloat16 tensors);
* ``.ckpt``: ``tensor_type "BFloat16"`` with the raw 2-byte values;
* ``.safetensors``: dtype ``BF16``.

Reading gives float32 in every case (bf16 and fp16 widen exactly).

What a file holds (its *layout*):

* a **training checkpoint**: ``.pth``/``.pdparams`` a dict ``{'model', 'ema', 'optimizer',
  'step', 'rng', 'config', 'spec'}``; ``.ckpt`` the model parameters under their MindSpore
  names, the EMA ones under ``ema.``, the optimizer's under ``optimizer.``, an Int64 ``step``
  and string entries ``format``, ``spec``, ``config`` and ``rng`` (JSON), as
  backends/mindspore/train.py writes it;
* a **bare state dict** (names -> tensors, optionally with a ``spec`` entry), or canonical
  ``.safetensors`` with the spec in its metadata.

Where a file carries no spec, ``FILE.spec.json`` beside it is read (see :func:`sidecar_path`).
"""
from __future__ import annotations

import binascii
import collections
import json
import math
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.checkpoint import CANONICAL_FORMAT, FORMAT_VERSION, CheckpointError, atomic_path
from common.param_mapping import from_framework, to_framework
from common.params import check_state, parameter_table
from common.spec import PRESETS, DiRSpec, SpecError, build_spec

FORMATS = ("torch", "paddle", "mindspore", "safetensors")
SUFFIX_FORMAT = {".pth": "torch", ".pt": "torch", ".pdparams": "paddle", ".ckpt": "mindspore",
                 ".safetensors": "safetensors"}
FORMAT_ALIASES = {"torch": "torch", "pytorch": "torch", "pth": "torch", "pt": "torch",
                  "paddle": "paddle", "pdparams": "paddle",
                  "mindspore": "mindspore", "ms": "mindspore", "ckpt": "mindspore",
                  "safetensors": "safetensors", "canonical": "safetensors"}
FORMAT_LABEL = {"torch": "PyTorch .pth/.pt", "paddle": "Paddle .pdparams", "mindspore": "MindSpore .ckpt",
                "safetensors": "canonical .safetensors"}
# Names and layouts of the tensors inside each format (see common/param_mapping.py).
FORMAT_FRAMEWORK = {"torch": "torch", "paddle": "paddle", "mindspore": "mindspore", "safetensors": "torch"}
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
WEIGHT_SETS = ("ema", "model")
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
PDPARAMS_PROTOCOL = 4  # paddle.save's default
MS_SLICE_BYTES = 512 * 1024 * 1024  # mindspore.save_checkpoint splits tensors above this along axis 0
MS_PREFIXES = ("ema.", "optimizer.")  # sections of a MindSpore training checkpoint
# Non-weight entries a MindSpore training checkpoint may hold besides the prefixed sections.
MS_TRAIN_FORMAT = "dir-mindspore-train"  # the 'format' string of backends/mindspore/train.py's checkpoints
MS_RESERVED_TAGS = ("spec", "config", "step", "epoch", "global_step", "rng", "converted", "format",
                    "format_version")


class FormatError(CheckpointError):
    """A checkpoint file is unreadable, refused, or does not hold what DiR expects."""


class UnsafeCheckpointError(FormatError):
    """The file asks to run code or build objects that are not plain data; it was not loaded."""


class MissingFrameworkError(FormatError):
    """The format needs a framework that is not installed."""


# ---- formats, paths --------------------------------------------------------------------------

def detect_format(path: str | os.PathLike, override: str | None = None, role: str = "file") -> str:
    """The format of ``path``: ``override`` (an alias such as ``pth`` or ``ckpt``) or its suffix."""
    if override:
        key = override.lower().lstrip(".")
        if key not in FORMAT_ALIASES:
            raise FormatError(f"unknown {role} format '{override}'; allowed: {', '.join(FORMATS)} "
                              f"(or a suffix: {', '.join(SUFFIX_FORMAT)})")
        return FORMAT_ALIASES[key]
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIX_FORMAT:
        raise FormatError(f"{path}: cannot tell the format from the suffix '{suffix}'; use one of "
                          f"{', '.join(SUFFIX_FORMAT)} or pass --{role}-format ({', '.join(FORMATS)})")
    return SUFFIX_FORMAT[suffix]


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where the spec of a file without metadata lives: ``FILE.spec.json`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".spec.json")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise FormatError(f"{path}: no such file")
    if not path.is_file():
        raise FormatError(f"{path}: not a file")


# ---- stored tensors and bfloat16 -----------------------------------------------------------

@dataclass
class Stored:
    """A tensor as a file holds it: ``array`` (for bfloat16 the uint16 bit pattern) and its dtype name."""

    array: np.ndarray
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.array.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    def to_float32(self) -> np.ndarray:
        if self.dtype == "bfloat16":
            return bf16_bits_to_float32(self.array)
        return np.ascontiguousarray(self.array, dtype=np.float32)

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> "Stored":
        array = np.asarray(array)
        return cls(array, array.dtype.name)


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly."""
    bits = np.ascontiguousarray(bits).view(np.uint16)
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even (as torch and paddle do)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = np.isnan(np.asarray(values, dtype=np.float32))
    rounded = np.where(nan, (bits >> 16) | 0x40, rounded)  # keep NaNs NaN (quiet bit set)
    return rounded.astype(np.uint16)


def cast_for_output(values: np.ndarray, dtype: str) -> Stored:
    """float32 ``values`` -> what a file of ``dtype`` (``fp32``/``fp16``/``bf16``) stores."""
    if dtype not in DTYPES:
        raise FormatError(f"unknown dtype '{dtype}'; allowed: {', '.join(DTYPES)}")
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "fp32":
        return Stored(values, "float32")
    if dtype == "fp16":
        with np.errstate(over="ignore"):
            return Stored(values.astype(np.float16), "float16")
    return Stored(float32_to_bf16_bits(values), "bfloat16")


# ---- safetensors (no framework, bfloat16 included) -------------------------------------------

_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
              "U8": "uint8", "BOOL": "bool"}
_ST_CODES = {name: code for code, name in _ST_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def _numpy_dtype(name: str) -> np.dtype:
    return np.dtype(np.uint16) if name == "bfloat16" else np.dtype(name).newbyteorder("<")


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
            header = json.loads(handle.read(header_len).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise bad(f"header is not JSON: {err}") from None
        if not isinstance(header, dict):
            raise bad("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise bad("__metadata__ must map strings to strings")
        data_size = size - 8 - header_len
        entries = []
        for name, info in header.items():
            if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
                raise bad(f"tensor '{name}': entry must hold dtype, shape and data_offsets")
            code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            if code not in _ST_DTYPES:
                raise bad(f"tensor '{name}': unsupported dtype {code!r} (supported: {', '.join(_ST_DTYPES)})")
            if not (isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                    for n in shape)):
                raise bad(f"tensor '{name}': shape {shape!r} is not a list of non-negative integers")
            if not (isinstance(offsets, list) and len(offsets) == 2
                    and all(isinstance(n, int) and not isinstance(n, bool) for n in offsets)
                    and 0 <= offsets[0] <= offsets[1]):
                raise bad(f"tensor '{name}': bad data_offsets {offsets!r}")
            dtype = _ST_DTYPES[code]
            nbytes = math.prod(shape) * _numpy_dtype(dtype).itemsize
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


# ---- .pdparams: a restricted unpickler ----------------------------------------------------------

class _Guarded:
    """A whitelisted global as the unpickler hands it out: callable, but nothing can be set on it.

    pickle's BUILD opcode would otherwise let a file rewrite attributes of a whitelisted
    function (its ``__defaults__``, say) and change how later files are read.
    """

    __slots__ = ("_function", "_label")

    def __init__(self, function, label: str):
        object.__setattr__(self, "_function", function)
        object.__setattr__(self, "_label", label)

    def __call__(self, *args):
        return self._function(*args)

    def __setattr__(self, name, value):
        raise UnsafeCheckpointError(f"it tries to set '{name}' on {self._label}")

    def __setstate__(self, state):
        raise UnsafeCheckpointError(f"it tries to change {self._label} (pickle BUILD on a function)")

    def __reduce__(self):
        raise TypeError("not picklable")


def _refuse_ndarray_call(*args):
    raise UnsafeCheckpointError("it calls numpy.ndarray directly, which numpy's own pickles never do")


_NDARRAY = _Guarded(_refuse_ndarray_call, "numpy.ndarray")  # what _reconstruct receives


def _safe_reconstruct(cls, shape, typecode):
    """numpy.core.multiarray._reconstruct as numpy's pickles call it: (ndarray, (0,), b'b')."""
    if cls is not _NDARRAY or tuple(shape) != (0,) or not isinstance(typecode, (bytes, str)):
        raise UnsafeCheckpointError("numpy _reconstruct called with arguments numpy's pickles never use")
    return np.ndarray.__new__(np.ndarray, (0,), np.uint8)


def _plain_dtype(dtype: np.dtype) -> bool:
    return dtype.kind in "biufc" and not dtype.hasobject and dtype.fields is None and dtype.subdtype is None


def _safe_dtype(spec, align=False, copy=True):
    if not isinstance(spec, str) or len(spec) > 8:
        raise UnsafeCheckpointError(f"numpy dtype {spec!r} is not a plain numeric dtype code")
    try:
        dtype = np.dtype(spec, bool(align), True)  # always a copy: BUILD must not touch numpy's cached dtypes
    except TypeError as err:
        raise UnsafeCheckpointError(f"numpy dtype {spec!r}: {err}") from None
    if not _plain_dtype(dtype):
        raise UnsafeCheckpointError(f"numpy dtype {spec!r} is not a plain numeric dtype")
    return dtype


def _safe_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or not _plain_dtype(dtype) or not isinstance(data, bytes):
        raise UnsafeCheckpointError("numpy scalar of a non-numeric dtype")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _safe_encode(text, encoding="utf-8"):
    """pickle protocol 2 stores bytes as _codecs.encode(str, 'latin1')."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _safe_tuple(items=()):
    if not isinstance(items, (list, tuple)):
        raise UnsafeCheckpointError("tuple() of something that is not a list")
    return tuple(items)


def _safe_ordered_dict(items=()):
    if items not in ((), []) and not isinstance(items, (list, tuple)):
        raise UnsafeCheckpointError("OrderedDict() of something that is not a list of pairs")
    return collections.OrderedDict(items)


# The whole whitelist: what paddle.save emits for state dicts of paddle tensors or numpy arrays
# (protocols 2, 3 and 4, numpy 1.x and 2.x module names). Each entry checks its arguments.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy", "dtype"): _safe_dtype,
    ("numpy.core.multiarray", "scalar"): _safe_scalar,
    ("numpy._core.multiarray", "scalar"): _safe_scalar,
    ("collections", "OrderedDict"): _safe_ordered_dict,
    ("builtins", "tuple"): _safe_tuple,
    ("__builtin__", "tuple"): _safe_tuple,
    ("_codecs", "encode"): _safe_encode,
}
_PICKLE_ALLOWED = {key: _Guarded(function, ".".join(key)) for key, function in _PICKLE_ALLOWED.items()}
_PICKLE_ALLOWED[("numpy", "ndarray")] = _NDARRAY


class RestrictedUnpickler(pickle.Unpickler):
    """Admits numpy arrays, plain containers and scalars; refuses any other global before it is used."""

    def find_class(self, module, name):
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise UnsafeCheckpointError(
                f"it references '{module}.{name}', which a file of numpy arrays never needs "
                "(only numpy arrays, plain containers and scalars are admitted)") from None

    def persistent_load(self, pid):
        raise UnsafeCheckpointError("it uses pickle persistent ids, which a file of numpy arrays never needs")


_PADDLE_NAME_TABLE = "StructuredToParameterName@@"


def _clean_pickled(obj, path: Path):
    """Check the unpickled tree is plain data; unwrap paddle's (name, array) pairs and drop its name table."""
    allowed_leaves = (str, bytes, int, float, bool, type(None), np.generic)
    ancestors: set[int] = set()

    def walk(value, where: str, depth: int):
        if depth > 64:
            raise UnsafeCheckpointError(f"nesting deeper than 64 levels at {where}")
        if isinstance(value, np.ndarray):
            if not _plain_dtype(value.dtype):
                raise UnsafeCheckpointError(f"array at {where} has dtype {value.dtype}, not a plain numeric dtype")
            return value
        if isinstance(value, np.generic):
            if not _plain_dtype(value.dtype):
                raise UnsafeCheckpointError(f"scalar at {where} has dtype {value.dtype}")
            return value.item()
        if isinstance(value, allowed_leaves):
            return value
        if not isinstance(value, (dict, list, tuple)):
            raise UnsafeCheckpointError(f"{where} is a {type(value).__name__}, not plain data")
        if id(value) in ancestors:
            raise UnsafeCheckpointError(f"{where} contains itself")
        # paddle.save writes a tensor nested in a dict as (internal name, array)
        if (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str)
                and isinstance(value[1], np.ndarray)):
            return walk(value[1], where, depth + 1)
        ancestors.add(id(value))
        try:
            if isinstance(value, dict):
                out = {}
                for key, item in value.items():
                    if not isinstance(key, (str, int)) or isinstance(key, bool):
                        raise UnsafeCheckpointError(f"dict key {key!r} at {where} is not a string or integer")
                    if key != _PADDLE_NAME_TABLE:
                        out[key] = walk(item, f"{where}[{key!r}]", depth + 1)
                return out
            items = [walk(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
            return items if isinstance(value, list) else tuple(items)
        finally:
            ancestors.discard(id(value))

    return walk(obj, "file", 0)


def load_pdparams(path, decode_bf16: bool = False):
    """Read a ``.pdparams`` (paddle.save) file without Paddle and without running code.

    Returns the saved object with numpy arrays for tensors, paddle's ``(name, array)`` pairs
    unwrapped and its ``StructuredToParameterName@@`` tables dropped. bfloat16 tensors are
    ``uint16`` bit patterns in the file (as ``paddle.load(..., return_numpy=True)`` returns
    them); ``decode_bf16=True`` turns every uint16 array into the float32 values it encodes
    (what a DiR loader wants: DiR has no integer tensors of that type). Raises
    :class:`UnsafeCheckpointError` for a file that references anything but numpy arrays,
    plain containers and scalars (nothing in it is called), :class:`FormatError` for a
    truncated or corrupt one.
    """
    path = Path(path)
    _check_file(path)
    try:
        with open(path, "rb") as handle:
            obj = RestrictedUnpickler(handle).load()
            if handle.read(1):
                raise FormatError(f"{path}: trailing bytes after the pickle (corrupt or not a .pdparams file)")
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(f"{path}: refused to load: {err}") from None
    except FormatError:
        raise
    except MemoryError:
        raise FormatError(f"{path}: not a readable .pdparams file (it asks for more memory than there is)") from None
    except Exception as err:  # truncated / corrupt pickles raise many types
        why = "truncated" if isinstance(err, EOFError) or "truncated" in str(err).lower() else "corrupt"
        raise FormatError(f"{path}: not a readable .pdparams pickle ({why}: {type(err).__name__}: {err})") from None
    try:
        obj = _clean_pickled(obj, path)
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(f"{path}: refused to load: {err}") from None
    return _decode_bf16(obj) if decode_bf16 else obj


def _decode_bf16(value):
    if isinstance(value, np.ndarray) and value.dtype == np.uint16:
        return bf16_bits_to_float32(value)
    if isinstance(value, dict):
        return {k: _decode_bf16(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_decode_bf16(v) for v in value)
    return value


def _pickle_ready(value):
    if isinstance(value, Stored):
        return value.array  # bfloat16: uint16 bits, as paddle.save writes them
    if isinstance(value, dict):
        return {k: _pickle_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_pickle_ready(v) for v in value)
    return value


def save_pdparams(path, obj) -> None:
    """Write ``obj`` (dicts of numpy arrays / :class:`Stored`, plain data) as paddle.save does, to ``path`` as given."""
    with open(path, "wb") as handle:
        pickle.dump(_pickle_ready(obj), handle, protocol=PDPARAMS_PROTOCOL)


# ---- .ckpt: MindSpore's protobuf ----------------------------------------------------------------

_MS_TYPES = {"Float32": "float32", "Float16": "float16", "BFloat16": "bfloat16", "Float64": "float64",
             "Int8": "int8", "Int16": "int16", "Int32": "int32", "Int64": "int64", "UInt8": "uint8",
             "UInt16": "uint16", "UInt32": "uint32", "UInt64": "uint64", "Bool": "bool"}
_MS_CODES = {name: code for code, name in _MS_TYPES.items()}
_CKPT_CLASS = None


def checkpoint_file_descriptor():
    """The FileDescriptorProto of common/mindspore_checkpoint.proto, built in Python (no protoc)."""
    from google.protobuf import descriptor_pb2

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="dir_mindspore_checkpoint.proto")
    ckpt = fdp.message_type.add(name="Checkpoint")
    ckpt.field.add(name="value", number=1, label=F.LABEL_REPEATED, type=F.TYPE_MESSAGE, type_name=".Checkpoint.Value")
    value = ckpt.nested_type.add(name="Value")
    value.field.add(name="tag", number=1, label=F.LABEL_REQUIRED, type=F.TYPE_STRING)
    value.field.add(name="tensor", number=2, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE, type_name=".TensorProto",
                    oneof_index=0)
    value.field.add(name="maptensor", number=3, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                    type_name=".MapTensorProto", oneof_index=0)
    value.oneof_decl.add(name="value")
    tensor = fdp.message_type.add(name="TensorProto")
    tensor.field.add(name="dims", number=1, label=F.LABEL_REPEATED, type=F.TYPE_INT64)
    tensor.field.add(name="tensor_type", number=2, label=F.LABEL_REQUIRED, type=F.TYPE_STRING)
    tensor.field.add(name="tensor_content", number=3, label=F.LABEL_REQUIRED, type=F.TYPE_BYTES)
    maptensor = fdp.message_type.add(name="MapTensorProto")
    maptensor.field.add(name="tensor", number=1, label=F.LABEL_REPEATED, type=F.TYPE_MESSAGE, type_name=".TensorProto")
    return fdp


def checkpoint_message_class():
    """The ``Checkpoint`` message class, in a private descriptor pool (no clash with MindSpore's own)."""
    global _CKPT_CLASS
    if _CKPT_CLASS is None:
        try:
            from google.protobuf import descriptor_pool, message_factory
        except ImportError:
            raise MissingFrameworkError(".ckpt files are read and written with the 'protobuf' package "
                                        "(pip install protobuf); MindSpore itself is not needed") from None
        pool = descriptor_pool.DescriptorPool()
        pool.Add(checkpoint_file_descriptor())
        _CKPT_CLASS = message_factory.GetMessageClass(pool.FindMessageTypeByName("Checkpoint"))
    return _CKPT_CLASS


def read_ms_checkpoint(path) -> dict[str, Stored | str]:
    """Entries of a MindSpore .ckpt in file order: tag -> :class:`Stored` tensor or str (append_dict strings)."""
    path = Path(path)
    _check_file(path)
    message = checkpoint_message_class()()  # first: a clear error if protobuf is missing
    from google.protobuf.message import DecodeError

    content = path.read_bytes()
    if content[-17:-10] == b"crc_num":  # save_checkpoint(crc_check=True) appends b"crc_num" + 10-byte crc32
        expected = int.from_bytes(content[-10:], "big")
        content = content[:-17]
        if binascii.crc32(content) != expected:
            raise FormatError(f"{path}: the .ckpt CRC check failed (the file is damaged or truncated)")
    try:
        message.ParseFromString(content)
    except (DecodeError, RuntimeError, ValueError) as err:
        raise FormatError(f"{path}: not a readable MindSpore .ckpt (truncated or corrupt protobuf: {err})") from None
    empty = not content
    del content  # the parsed message holds its own copy
    if not message.value:
        raise FormatError(f"{path}: not a MindSpore .ckpt ({'empty file' if empty else 'no entries'})")
    entries: dict[str, Stored | str] = {}
    values = list(message.value)
    i = 0
    while i < len(values):
        value = values[i]
        tag = value.tag
        if value.WhichOneof("value") != "tensor":
            raise FormatError(f"{path}: entry '{tag}' is a MindSpore map parameter, which DiR checkpoints never hold")
        # mindspore.save_checkpoint splits a big tensor into consecutive values with the same tag
        chunks = [value.tensor.tensor_content]
        while i + 1 < len(values) and values[i + 1].tag == tag:
            i += 1
            chunks.append(values[i].tensor.tensor_content)
        i += 1
        if tag in entries:
            raise FormatError(f"{path}: entry '{tag}' appears twice (not consecutively)")
        data = bytearray(b"".join(chunks))
        kind, dims = value.tensor.tensor_type, [int(n) for n in value.tensor.dims]
        if kind == "str":
            if len(data) % 4:
                raise FormatError(f"{path}: string entry '{tag}' has {len(data)} bytes, not UTF-32 (corrupt)")
            try:
                entries[tag] = bytes(data).decode("utf-32-le").rstrip("\x00")
            except UnicodeDecodeError as err:
                raise FormatError(f"{path}: string entry '{tag}' is not valid UTF-32 ({err})") from None
            continue
        if kind not in _MS_TYPES:
            raise FormatError(f"{path}: entry '{tag}' has tensor_type {kind!r}; supported: {', '.join(_MS_TYPES)}")
        if any(n < 0 for n in dims):
            raise FormatError(f"{path}: entry '{tag}' has negative dims {dims}")
        dtype = _MS_TYPES[kind]
        itemsize = _numpy_dtype(dtype).itemsize
        if dims == [0] and len(data) == itemsize:
            dims = []  # MindSpore writes some scalars with dims [0]
        expected = math.prod(dims) * itemsize
        if len(data) != expected:
            raise FormatError(f"{path}: entry '{tag}' holds {len(data)} bytes, expected {expected} for {kind} "
                              f"{dims} (truncated or corrupt)")
        array = np.frombuffer(data, dtype=_numpy_dtype(dtype)).reshape(dims)
        entries[tag] = Stored(array.astype(array.dtype.newbyteorder("="), copy=False), dtype)
    return entries


def write_ms_checkpoint(path, entries: dict[str, Any], crc_trailer: bool = True) -> None:
    """Write a .ckpt that mindspore.load_checkpoint reads, to ``path`` as given (no temp file).

    With ``crc_trailer`` the file ends like ``save_checkpoint(crc_check=True)`` files: b"crc_num"
    and the crc32 of everything before, so corruption anywhere in it is detected on reading.

    ``entries``: tag -> :class:`Stored`, numpy array, str (stored as MindSpore stores
    append_dict strings), bool, int (Int64 scalar) or float (Float32 scalar), in order.
    """
    cls = checkpoint_message_class()
    crc = 0
    with open(path, "wb") as handle:
        for tag, value in entries.items():
            if isinstance(value, str):
                pieces = [([0], "str", np.array(value, dtype=f"<U{max(1, len(value))}").tobytes())]
            else:
                if isinstance(value, bool):
                    value = Stored(np.array(value, dtype=np.bool_), "bool")
                elif isinstance(value, int):
                    value = Stored(np.array(value, dtype=np.int64), "int64")
                elif isinstance(value, float):
                    value = Stored(np.array(value, dtype=np.float32), "float32")
                elif isinstance(value, np.ndarray):
                    value = Stored.from_numpy(value)
                array = np.ascontiguousarray(value.array, dtype=_numpy_dtype(value.dtype))
                dims, code = list(value.shape), _MS_CODES[value.dtype]
                count = math.ceil(array.nbytes / MS_SLICE_BYTES) if array.ndim and array.nbytes > MS_SLICE_BYTES else 1
                parts = np.array_split(array, count) if count > 1 else [array]
                pieces = [(dims, code, part.tobytes()) for part in parts]
            for dims, code, blob in pieces:
                message = cls()
                item = message.value.add()
                item.tag = tag
                item.tensor.dims.extend(dims)
                item.tensor.tensor_type = code
                item.tensor.tensor_content = blob
                data = message.SerializeToString()
                crc = binascii.crc32(data, crc)
                handle.write(data)
        if crc_trailer:  # as save_checkpoint(crc_check=True): load_checkpoint strips it (and checks it if asked)
            handle.write(b"crc_num" + crc.to_bytes(10, "big"))


# ---- .pth: torch (the one format that needs its framework) ---------------------------------------

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


# ---- one view of any checkpoint -------------------------------------------------------------------

@dataclass
class Contents:
    """What a checkpoint file holds, whatever its format."""

    path: Path
    format: str
    layout: str  # "training" or "bare"
    sets: dict[str, dict[str, Stored]]  # "model"/"ema" (training) or "state" (bare)
    spec: DiRSpec | None = None
    spec_origin: str = ""
    step: int | None = None
    config: dict | None = None
    other: dict[str, str] = field(default_factory=dict)  # key -> short description

    @property
    def framework(self) -> str:
        return FORMAT_FRAMEWORK[self.format]

    def weight_set(self, weights: str = "ema") -> tuple[str, dict[str, Stored]]:
        """(name of the set used, its tensors): ``weights`` of a training checkpoint, the only set of a bare one."""
        if self.layout == "bare":
            return "state", self.sets["state"]
        if weights not in WEIGHT_SETS:
            raise FormatError(f"--weights must be one of {', '.join(WEIGHT_SETS)}, got '{weights}'")
        if weights not in self.sets:
            raise FormatError(f"{self.path}: this training checkpoint has no '{weights}' weights; it holds "
                              f"{', '.join(self.sets) or 'none'} (pick one with --weights)")
        return weights, self.sets[weights]


def _describe(value) -> str:
    if isinstance(value, Stored):
        return f"tensor {value.dtype} {list(value.shape)}"
    if isinstance(value, dict):
        count = _count_tensors(value)
        return f"dict of {len(value)} entries" + (f" ({count} tensors)" if count else "")
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    if value is None:
        return "None"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _count_tensors(value) -> int:
    if isinstance(value, Stored):
        return 1
    if isinstance(value, dict):
        return sum(_count_tensors(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_count_tensors(v) for v in value)
    return 0


def _parse_spec(value, origin: str) -> DiRSpec:
    try:
        if isinstance(value, DiRSpec):
            return value
        if isinstance(value, (str, bytes)):
            return DiRSpec.from_json(value.decode() if isinstance(value, bytes) else value, source=origin)
        if isinstance(value, dict):
            return DiRSpec.from_dict(dict(value), source=origin)
    except (SpecError, TypeError) as err:
        raise FormatError(f"{origin}: bad spec ({err})") from None
    raise FormatError(f"{origin}: the spec is a {type(value).__name__}, expected a dict or JSON text")


def _tensor_dict(value, where: str) -> dict[str, Stored]:
    if not isinstance(value, dict):
        raise FormatError(f"{where}: expected a dict of tensors, found {type(value).__name__}")
    out = {}
    for name, item in value.items():
        if isinstance(item, np.ndarray):
            item = Stored.from_numpy(item)
        if not isinstance(item, Stored):
            raise FormatError(f"{where}: entry '{name}' is {_describe(item)}, not a tensor")
        out[str(name)] = item
    return out


def _from_dict_checkpoint(obj, path: Path, fmt: str) -> Contents:
    """A .pth/.pdparams object (training dict or bare state dict) -> Contents."""
    if fmt == "paddle":
        obj = _paddle_stored(obj)
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: expected a dict (a state dict or a training checkpoint), found {_describe(obj)}")
    sections = [key for key in WEIGHT_SETS if isinstance(obj.get(key), dict)]
    if sections:
        sets = {key: _tensor_dict(obj[key], f"{path} ['{key}']") for key in ("model", "ema") if key in sections}
        contents = Contents(path, fmt, "training", sets)
        for key, value in obj.items():
            if key not in sets and key not in ("spec", "step", "config"):
                contents.other[str(key)] = _describe(value)
        if "step" in obj:
            if isinstance(obj["step"], bool) or not isinstance(obj["step"], int):
                raise FormatError(f"{path}: 'step' is {_describe(obj['step'])}, expected an integer")
            contents.step = int(obj["step"])
        if isinstance(obj.get("config"), dict):
            contents.config = dict(obj["config"])
    else:
        state = dict(obj)
        spec_value = state.pop("spec", None)
        contents = Contents(path, fmt, "bare", {"state": _tensor_dict(state, str(path))})
        if spec_value is not None:
            obj = {"spec": spec_value}
    if obj.get("spec") is not None:
        contents.spec, contents.spec_origin = _parse_spec(obj["spec"], f"{path} ['spec']"), "file"
    return contents


def _paddle_stored(value):
    if isinstance(value, np.ndarray):
        # paddle.save keeps bfloat16 as uint16 bits; DiR has no integer weights, so uint16 means bf16
        return Stored(value, "bfloat16") if value.dtype == np.uint16 else Stored.from_numpy(value)
    if isinstance(value, dict):
        return {k: _paddle_stored(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_paddle_stored(v) for v in value)
    return value


def _from_ms_entries(entries: dict[str, Stored | str], path: Path) -> Contents:
    tensors = {tag: v for tag, v in entries.items() if isinstance(v, Stored)}
    training = any(tag.startswith("ema.") for tag in tensors)
    model = {tag: v for tag, v in tensors.items()
             if not tag.startswith(MS_PREFIXES) and tag not in MS_RESERVED_TAGS and not tag.startswith("rng.")}
    if training:
        sets = {"ema": {tag[4:]: v for tag, v in tensors.items() if tag.startswith("ema.")}}
        if model:
            sets = {"model": model, **sets}
        contents = Contents(path, "mindspore", "training", sets)
    else:
        contents = Contents(path, "mindspore", "bare", {"state": model})
    optimizer = [tag for tag in tensors if tag.startswith("optimizer.")]
    if optimizer:
        contents.other["optimizer"] = f"{len(optimizer)} tensors under 'optimizer.'"
    for tag, value in entries.items():
        if tag in ("spec", "step", "config") or tag.startswith(MS_PREFIXES) or tag in model:
            continue
        contents.other[tag] = _describe(value)
    if "spec" in entries:
        contents.spec, contents.spec_origin = _parse_spec(entries["spec"], f"{path} ['spec']"), "file"
    step = entries.get("step")
    if isinstance(step, Stored) and step.array.size == 1 and step.dtype.startswith(("int", "uint")):
        contents.step = int(step.array.reshape(()))
    if isinstance(entries.get("config"), str):
        try:
            config = json.loads(entries["config"])
            contents.config = config if isinstance(config, dict) else None
        except json.JSONDecodeError:
            contents.other["config"] = _describe(entries["config"])
    return contents


def read_contents(path, fmt: str | None = None) -> Contents:
    """Read any DiR checkpoint (see the module docstring); the spec comes from the file or its sidecar."""
    path = Path(path)
    fmt = detect_format(path, fmt, "src")
    _check_file(path)
    if fmt == "safetensors":
        tensors, metadata = read_safetensors(path)
        contents = Contents(path, fmt, "bare", {"state": tensors})
        if "spec" in metadata:
            contents.spec, contents.spec_origin = _parse_spec(metadata["spec"], f"{path} metadata"), "file"
        if metadata.get("step", "").isdigit():
            contents.step = int(metadata["step"])
        contents.other.update({f"metadata {k}": v for k, v in metadata.items() if k not in ("spec", "step")})
    elif fmt == "mindspore":
        contents = _from_ms_entries(read_ms_checkpoint(path), path)
    elif fmt == "paddle":
        contents = _from_dict_checkpoint(load_pdparams(path), path, fmt)
    else:
        contents = _from_dict_checkpoint(load_torch(path), path, fmt)
    if contents.spec is None and sidecar_path(path).is_file():
        side = sidecar_path(path)
        try:
            text = side.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise FormatError(f"{side}: cannot read the spec ({err})") from None
        contents.spec, contents.spec_origin = _parse_spec(text, str(side)), f"sidecar {side.name}"
    return contents


def resolve_spec_argument(value: str) -> DiRSpec:
    """``--spec``: a preset name (DiR-S/2), a JSON object, or a JSON file."""
    if value in PRESETS:
        return build_spec(value)
    if value.lstrip().startswith("{"):
        return _parse_spec(value, "--spec")
    path = Path(value)
    if path.is_file():
        return _parse_spec(path.read_text(), str(path))
    raise FormatError(f"--spec '{value}' is neither a preset ({', '.join(PRESETS)}), a JSON object nor a file")


def canonical_weights(contents: Contents, weights: str = "ema", spec: DiRSpec | None = None
                      ) -> tuple[dict[str, np.ndarray], DiRSpec, str]:
    """(canonical float32 state, spec, name of the set used), checked against the parameter table.

    Raises :class:`FormatError` listing every missing, unexpected or wrongly shaped tensor
    (and any tensor that is not floating point).
    """
    if spec is not None and contents.spec is not None and spec != contents.spec:
        diffs = ", ".join(f"{k}: file {v!r} vs --spec {getattr(spec, k)!r}"
                          for k, v in contents.spec.to_dict().items() if getattr(spec, k) != v)
        raise FormatError(f"{contents.path}: --spec differs from the spec in the file ({diffs})")
    spec = spec or contents.spec
    if spec is None:
        raise FormatError(f"{contents.path}: no spec in the file and no {sidecar_path(contents.path).name} beside "
                          "it; pass --spec (a preset such as DiR-S/2, JSON, or a JSON file)")
    used, stored = contents.weight_set(weights)
    where = f"{contents.path}" + (f" ['{used}']" if contents.layout == "training" else "")
    problems = [f"not floating point: {name} has dtype {value.dtype}" for name, value in stored.items()
                if not value.is_float]
    try:
        state = from_framework(contents.framework, {n: v.to_float32() for n, v in stored.items() if v.is_float},
                               spec, source=where)
    except ValueError as err:
        if problems:
            raise FormatError(f"{err}\n  " + "\n  ".join(problems)) from None
        raise FormatError(str(err)) from None
    if problems:
        raise FormatError(f"{where} does not match the DiR parameter table:\n  " + "\n  ".join(problems))
    return state, spec, used


def read_checkpoint(path, fmt: str | None = None, weights: str = "ema", spec: DiRSpec | None = None
                    ) -> tuple[dict[str, np.ndarray], DiRSpec]:
    """Any DiR checkpoint -> (canonical float32 numpy state, spec). What a backend's loader can call."""
    state, spec, _ = canonical_weights(read_contents(path, fmt), weights, spec)
    return state, spec


# ---- writing ------------------------------------------------------------------------------------

def write_checkpoint(path, fmt: str, state: dict[str, np.ndarray], spec: DiRSpec, *, dtype: str = "fp32",
                     step: int | None = None, config: dict | None = None, bare: bool = False,
                     provenance: dict[str, str] | None = None) -> list[Path]:
    """Write canonical ``state`` as ``fmt`` (atomically: temp files, then renames). Returns the paths written.

    Default layout (what each backend's sample loads with no flags):

    * ``.pth``/``.pdparams``: ``{'model': sd, 'ema': sd (the same tensors), 'optimizer': None,
      'step', 'rng': None, 'config', 'spec': spec dict, 'converted': provenance}``;
    * ``.ckpt``: the parameters under MindSpore names, the same under ``ema.``, an Int64 ``step``
      and the string entries ``format`` (dir-mindspore-train), ``spec``, ``config`` and ``rng``
      (JSON; rng says there is no RNG state and where the weights came from);
    * ``.safetensors``: canonical tensors, spec (and step, provenance) in the metadata.

    ``bare``: ``.pth``/``.pdparams``/``.ckpt`` hold only the state dict, and the spec goes
    beside it as ``FILE.spec.json``.
    """
    path = Path(path)
    try:
        check_state(state, spec, source="the converted weights")
    except ValueError as err:
        raise FormatError(str(err)) from None
    if dtype not in DTYPES:
        raise FormatError(f"unknown dtype '{dtype}'; allowed: {', '.join(DTYPES)}")
    framework_state = to_framework(FORMAT_FRAMEWORK[fmt], state, spec)
    tensors = {name: cast_for_output(value, dtype) for name, value in framework_state.items()}
    step = int(step or 0)
    provenance = dict(provenance or {})
    config = dict(config or {})
    if fmt == "torch":
        _import_torch(path, "writing")

    if fmt == "safetensors":
        metadata = {"format": CANONICAL_FORMAT, "format_version": FORMAT_VERSION, "spec": spec.to_json(),
                    "step": str(step)}
        if provenance:
            metadata["converted"] = json.dumps(provenance, sort_keys=True)
        with atomic_path(path) as tmp:
            write_safetensors(tmp, tensors, metadata)
        return [path]

    if fmt == "mindspore":
        if bare:
            obj = dict(tensors)
        else:  # backends/mindspore/train.py's layout; its reader admits no other string entries
            rng = {"kind": "none", "note": "weights converted by tools/convert_ckpt.py: no RNG or optimizer state",
                   "converted": provenance}
            obj = {**tensors, **{f"ema.{name}": value for name, value in tensors.items()},
                   "format": MS_TRAIN_FORMAT, "step": step, "spec": spec.to_json(),
                   "config": json.dumps(config, sort_keys=True, default=str), "rng": json.dumps(rng, sort_keys=True)}
        writer = write_ms_checkpoint
    else:
        if bare:
            obj = dict(tensors)
        else:
            obj = {"model": tensors, "ema": tensors, "optimizer": None, "step": step, "rng": None,
                   "config": config, "spec": spec.to_dict()}
            if provenance:
                obj["converted"] = provenance
        writer = save_torch if fmt == "torch" else save_pdparams

    if bare:
        side = sidecar_path(path)
        with atomic_path(side) as side_tmp, atomic_path(path) as tmp:
            side_tmp.write_text(json.dumps(spec.to_dict(), indent=1, sort_keys=True) + "\n")
            writer(tmp, obj)
        return [path, side]
    with atomic_path(path) as tmp:
        writer(tmp, obj)
    return [path]


def parameter_summary(stored: dict[str, Stored]) -> tuple[int, dict[str, int]]:
    """(number of values, {dtype: tensor count}) of a weight set."""
    total = sum(int(np.prod(v.shape)) for v in stored.values())
    counts: dict[str, int] = {}
    for value in stored.values():
        counts[value.dtype] = counts.get(value.dtype, 0) + 1
    return total, counts


def table_order(stored: dict[str, Stored], spec: DiRSpec | None, framework: str) -> list[str]:
    """Tensor names in canonical table order (unknown names last, in file order)."""
    if spec is None:
        return list(stored)
    from common.param_mapping import framework_name

    order = [framework_name(framework, info.name, info.kind) for info in parameter_table(spec)]
    known = [name for name in order if name in stored]
    return known + [name for name in stored if name not in set(known)]
