"""``.ckpt``: MindSpore's checkpoint, read and written with the protobuf package alone (no MindSpore).

A ``.ckpt`` is a sequence of serialized ``Checkpoint`` protobuf messages (the schema of
``common/mindspore_checkpoint.proto``, rebuilt here in Python so no ``protoc`` is needed,
in a private descriptor pool so it never clashes with MindSpore's own), each holding
``Value`` entries: a tag and a ``TensorProto`` (dims, a tensor_type name such as
``Float32`` or ``BFloat16``, and the raw little-endian bytes). ``save_checkpoint`` splits a
tensor above 512 MiB into consecutive values with the same tag, stores ``append_dict``
strings as ``tensor_type "str"`` in UTF-32, and with ``crc_check=True`` ends the file
with ``b"crc_num"`` and a 10-byte crc32 of everything before.

The file is parsed as data: the CRC trailer (when present) is checked first, map
parameters and unknown tensor types are refused, split tensors must be consecutive, and
every tensor's byte count must equal what its dims and type need before it is viewed as
an array. Nothing in the file is executed.
"""
from __future__ import annotations

import binascii
import math
from pathlib import Path
from typing import Any

import numpy as np

from common.formats.errors import FormatError, MissingFrameworkError, _check_file
from common.formats.stored import Stored, _numpy_dtype

MS_SLICE_BYTES = 512 * 1024 * 1024  # mindspore.save_checkpoint splits tensors above this along axis 0
MS_PREFIXES = ("ema.", "optimizer.")  # sections of a MindSpore training checkpoint
# Non-weight entries a MindSpore training checkpoint may hold besides the prefixed sections.
MS_TRAIN_FORMAT = "dir-mindspore-train"  # the 'format' string of backends/mindspore/train.py's checkpoints
MS_RESERVED_TAGS = ("spec", "config", "step", "epoch", "global_step", "rng", "converted", "format",
                    "format_version", "recipe")

_MS_TYPES = {"Float32": "float32", "Float16": "float16", "BFloat16": "bfloat16", "Float64": "float64",
             "Int8": "int8", "Int16": "int16", "Int32": "int32", "Int64": "int64", "UInt8": "uint8",
             "UInt16": "uint16", "UInt32": "uint32", "UInt64": "uint64", "Bool": "bool"}
_MS_CODES = {name: code for code, name in _MS_TYPES.items()}
_CKPT_CLASS = None
_MAX_DIMS = 32  # numpy's limit (NPY_MAXDIMS)


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
        if not isinstance(tag, str):  # protobuf hands out bytes for a proto2 string that is not UTF-8
            raise FormatError(f"{path}: entry {i} has a tag that is not UTF-8 text ({bytes(tag)[:60]!r}; corrupt)")
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
        if len(dims) > _MAX_DIMS:
            raise FormatError(f"{path}: entry '{tag}' has {len(dims)} dims, more than numpy's {_MAX_DIMS} (corrupt)")
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
