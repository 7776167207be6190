"""``.pdparams``: what ``paddle.save`` writes, read and written without Paddle and without running code.

A ``.pdparams`` file is a Python pickle (``paddle.save`` uses protocol 4; older files 2
or 3) of a dict of numpy arrays: a state dict, or a training checkpoint dict. Paddle
nests a tensor as ``(internal name, array)`` and may add a ``StructuredToParameterName@@``
name table; bfloat16 tensors are ``uint16`` arrays of the bf16 bits.

A pickle is a program, so the file is read with :class:`RestrictedUnpickler`: the only
globals it hands out are the handful numpy's and paddle's pickles use (array and dtype
reconstruction, ``OrderedDict``, ``tuple``, ``_codecs.encode``), each wrapped so it checks
its arguments and cannot be modified by pickle's BUILD; any other global, and any
persistent id, is refused *before* anything is called. The unpickled tree is then
checked to be plain data (plain numeric dtypes only, no object arrays, no cycles, bounded
depth, and at most ``MAX_PICKLED_OBJECTS`` objects counted through shared references, so a
few bytes of memo references cannot expand into 2**N). Writing is ``pickle.dump`` of plain
dicts and arrays.
"""
from __future__ import annotations

import collections
import contextlib
import io
import pickle
import sys
from pathlib import Path

import numpy as np

from common.formats.errors import FormatError, UnsafeCheckpointError, _check_file, _short
from common.formats.stored import Stored, bf16_bits_to_float32

PDPARAMS_PROTOCOL = 4  # paddle.save's default
MAX_PICKLED_OBJECTS = 1_000_000  # containers and leaves, counted as often as they are referenced


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
    visits = [0]

    def walk(value, where: str, depth: int):
        if depth > 64:
            raise UnsafeCheckpointError(f"nesting deeper than 64 levels at {where}")
        visits[0] += 1
        if visits[0] > MAX_PICKLED_OBJECTS:  # shared references can make a few bytes expand to 2**N objects
            raise UnsafeCheckpointError(f"it expands to more than {MAX_PICKLED_OBJECTS:,} objects (shared "
                                        "references); a checkpoint holds a few thousand")
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
                        raise UnsafeCheckpointError(f"dict key {_short(key)} at {where} is not a string or integer")
                    if key != _PADDLE_NAME_TABLE:
                        out[key] = walk(item, f"{where}[{_short(key)}]", depth + 1)
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
    chatter = io.StringIO()
    try:
        with open(path, "rb") as handle:
            # CPython 3.11's C unpickler prints "SystemError: deallocated bytearray object has exported
            # buffers" on stderr when a crafted BYTEARRAY8 declares 2**50 bytes (besides raising MemoryError):
            # what it prints goes to a buffer, passed on only if the file loads
            with contextlib.redirect_stderr(chatter):
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
    if chatter.getvalue():
        sys.stderr.write(chatter.getvalue())
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


def _paddle_stored(value):
    """What :func:`load_pdparams` returns, with arrays made :class:`Stored` (uint16 arrays as bfloat16)."""
    if isinstance(value, np.ndarray):
        # paddle.save keeps bfloat16 as uint16 bits; DiR has no integer weights, so uint16 means bf16
        return Stored(value, "bfloat16") if value.dtype == np.uint16 else Stored.from_numpy(value)
    if isinstance(value, dict):
        return {k: _paddle_stored(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_paddle_stored(v) for v in value)
    return value
