"""Mutators: a valid file's bytes and a seeded ``random.Random`` -> the bytes of a mutated file.

Generic mutators work on any bytes (truncations, bit flips, interesting integers, inserted,
deleted and duplicated ranges). Format-aware ones parse the file and change what it
declares, fixing checksums where the format has them so the mutation reaches the parser:

* safetensors: the header length, each tensor's shape / dtype / data_offsets, duplicate keys,
  the metadata (spec, recipe, step), deep nesting;
* ``.npy`` (latents, and every ``.npz`` member): the header's shape, descr and fortran_order,
  its length field and version, non-literal headers;
* zip (``.npz``, ``.pth``): local and central header fields, the end record, member names,
  duplicate members, compression, and mutations of one member's payload with its CRC fixed;
  a deflate bomb (a tiny member declaring gigabytes);
* protobuf (``.ckpt``): length varints anywhere, dims, tensor_type, tags (duplicates), the
  CRC trailer (fixed, dropped or stale);
* pickle (``.pdparams``, ``.pth``'s data.pkl): integer and string arguments, opcodes deleted,
  duplicated, inserted; globals swapped for os.system & co; duplicate dict keys; a shared-
  reference bomb, deep nesting, huge declared lengths;
* YAML: duplicate keys, wrong types, nesting, huge numbers, anchors/aliases (billion laughs),
  tags, documents, encodings;
* PNG / JPEG / BMP / PPM: chunk and segment lengths, declared dimensions, valid decompression
  bombs (huge all-zero images in a few KB), extreme aspect ratios.

Every mutator is ``f(data, rng, variant) -> bytes`` and draws every choice from ``rng``, so a
case is reproducible from its seed.
"""
from __future__ import annotations

import functools
import io
import json
import pickle
import pickletools
import random
import re
import struct
import zipfile
import zlib

INTERESTING = [0, 1, 2, 7, 8, 15, 16, 31, 32, 63, 64, 127, 128, 255, 256, 511, 1000, 1024, 4095, 4096, 32767,
               32768, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**53, 2**62, 2**63 - 1, 2**63,
               2**64 - 1]
MARKER = "/tmp/dir-fuzz-pwned"  # what the crafted pickles ask os.system & co to create: it must never appear
HUGE = [2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**48, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 10**20]


def _pick_int(rng: random.Random, old: int | None = None) -> int:
    choice = rng.random()
    if old is not None and choice < 0.3:
        return rng.choice([old + 1, old - 1, old * 2, old // 2, old * 1000, -old, old + 2**32, 0])
    if choice < 0.6:
        return rng.choice(INTERESTING)
    if choice < 0.75:
        return -rng.choice(INTERESTING[1:])
    return rng.choice(HUGE)


def _position(data: bytes, rng: random.Random, head: int = 512) -> int:
    if not data:
        return 0
    if rng.random() < 0.5:
        return rng.randrange(min(len(data), head))
    return rng.randrange(len(data))


# ---- generic -------------------------------------------------------------------------------------

def truncate(data, rng, variant=None):
    kind = rng.random()
    if kind < 0.4:
        cut = rng.randrange(len(data) + 1)
    elif kind < 0.7:
        cut = rng.randrange(min(len(data), 600) + 1)
    else:
        cut = max(0, len(data) - rng.randint(1, 64))
    return data[:cut]


def bitflip(data, rng, variant=None):
    if not data:
        return data
    out = bytearray(data)
    for _ in range(rng.choice([1, 1, 1, 2, 3, 4, 8, 16, 64])):
        out[_position(out, rng)] ^= 1 << rng.randrange(8)
    return bytes(out)


def set_bytes(data, rng, variant=None):
    if not data:
        return data
    out = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 4, 8])):
        out[_position(out, rng)] = rng.choice([0, 0xFF, 0x7F, 0x80, 0x01, 0x20, 0x0A, 0x22, 0x5B, rng.randrange(256)])
    return bytes(out)


def set_int(data, rng, variant=None):
    if len(data) < 8:
        return bitflip(data, rng)
    size = rng.choice([2, 4, 4, 8])
    value = _pick_int(rng) % (1 << (8 * size))
    order = rng.choice(["<", ">"])
    at = min(_position(data, rng), len(data) - size)
    packed = value.to_bytes(size, "little" if order == "<" else "big")
    return data[:at] + packed + data[at + size:]


def insert(data, rng, variant=None):
    at = _position(data, rng)
    blob = bytes(rng.randrange(256) for _ in range(rng.choice([1, 2, 4, 8, 64])))
    if rng.random() < 0.3:
        blob = rng.choice([b"\x00" * 8, b"\xff" * 8, b"[" * 64, b"{" * 64, b"\n", b"PK\x03\x04", b"\x80\x04"])
    return data[:at] + blob + data[at:]


def delete(data, rng, variant=None):
    if not data:
        return data
    at = _position(data, rng)
    return data[:at] + data[at + rng.choice([1, 2, 4, 8, 64, 512]):]


def duplicate(data, rng, variant=None):
    if not data:
        return data
    at = _position(data, rng)
    piece = data[at:at + rng.choice([1, 4, 16, 128, 1024])]
    where = _position(data, rng)
    return data[:where] + piece + data[where:]


def append(data, rng, variant=None):
    return data + rng.choice([b"\x00", b"junk" * rng.randint(1, 100), data[: rng.randrange(len(data) + 1)],
                              bytes(rng.randrange(256) for _ in range(32))])


def zero_range(data, rng, variant=None):
    if not data:
        return data
    at = _position(data, rng)
    n = rng.choice([4, 16, 256, 4096])
    return data[:at] + b"\x00" * len(data[at:at + n]) + data[at + n:]


GENERIC = [(3, truncate), (4, bitflip), (2, set_bytes), (3, set_int), (1, insert), (1, delete), (1, duplicate),
           (1, append), (1, zero_range)]


# ---- safetensors ---------------------------------------------------------------------------------

def _st_split(data: bytes):
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    return header, data[8 + length:]


def _st_join(header_text: str | bytes, body: bytes, rng=None) -> bytes:
    text = header_text.encode() if isinstance(header_text, str) else header_text
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def _dump_pairs(pairs) -> str:
    """JSON object text from (key, value) pairs, duplicates kept."""
    return "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}"


def _mutate_shape(shape, rng):
    shape = list(shape)
    kind = rng.randrange(9)
    if kind == 0 and shape:
        i = rng.randrange(len(shape))
        shape[i] = _pick_int(rng, shape[i])
    elif kind == 1:
        shape.append(rng.choice([1, 2, 0, 2**40]))
    elif kind == 2 and shape:
        shape.pop(rng.randrange(len(shape)))
    elif kind == 3:
        shape = [1] * rng.choice([33, 40, 64, 100]) + shape
    elif kind == 4 and shape:
        shape[rng.randrange(len(shape))] = rng.choice([1.5, "3", True, None, [2], -1, 1e300])
    elif kind == 5:
        shape = rng.choice([None, "[]", {}, 3, [], [[1]]])
    elif kind == 6 and len(shape) >= 2:
        shape = shape[::-1]
    elif kind == 7 and shape:
        shape = [shape[0] * 2] + shape[1:] if rng.random() < 0.5 else [max(1, shape[0] // 2)] + shape[1:]
    else:
        shape = [int(__import__("math").prod(x for x in shape if isinstance(x, int)))]  # flattened
    return shape


def _mutate_json_text(text: str, rng) -> str:
    """Mutate a JSON document (a spec or a recipe): a field's value, a field removed or added, bad syntax."""
    try:
        obj = json.loads(text)
    except Exception:
        return text[: rng.randrange(len(text) + 1)]
    if not isinstance(obj, dict) or not obj or rng.random() < 0.15:
        return rng.choice(["[" * 5000 + "]" * 5000, text[:-1], "null", "[]", "\"x\"", text + "x", "{}",
                           '{"a": ' * 3000 + "1" + "}" * 3000])
    key = rng.choice(list(obj))
    kind = rng.randrange(7)
    if kind == 6:  # a number of more digits than Python converts (json.loads raises ValueError)
        obj[key] = "__HUGE__"
        return json.dumps(obj).replace('"__HUGE__"', "9" * rng.choice([4400, 20000]))
    if kind == 0:
        obj[key] = rng.choice([_pick_int(rng), -1, 0, 1.5, "x", None, True, [], {}, 10**400, 2**20, 3 * 10**6])
    elif kind == 1:
        del obj[key]
    elif kind == 2:
        obj["bogus_field"] = 1
    elif kind == 3:  # duplicate key, different value
        pairs = list(obj.items()) + [(key, rng.choice([0, 1, 64, 2**31, "x", None]))]
        return _dump_pairs(pairs)
    elif kind == 4 and isinstance(obj[key], int) and not isinstance(obj[key], bool):
        obj[key] = rng.choice([obj[key] * 2, obj[key] + 1, obj[key] * 100000, 2**40])
    else:
        obj[key] = rng.choice(["ddim", "linear", "flow", "cosine", "", "\u00b2", "a" * 10000])
    return json.dumps(obj)


def safetensors_header(data, rng, variant=None):
    header, body = _st_split(data)
    names = [k for k in header if k != "__metadata__"]
    kind = rng.randrange(15)
    if kind == 14:  # a dimension or an offset of more digits than Python converts
        text = json.dumps(header)
        field = rng.choice(['"shape":[', '"data_offsets":[', '"shape": [', '"data_offsets": ['])
        return _st_join(text.replace(field, field + "9" * rng.choice([4400, 30000]) + ",", 1), body)
    if kind == 0:  # the header length
        (length,) = struct.unpack("<Q", data[:8])
        value = rng.choice([_pick_int(rng, length) % 2**64, len(data), len(data) - 7, length + 8, 100 * 2**20 + 1])
        return struct.pack("<Q", value) + data[8:]
    name = rng.choice(names)
    entry = header[name]
    if kind == 1:
        entry["shape"] = _mutate_shape(entry["shape"], rng)
    elif kind == 2:
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[begin, _pick_int(rng, end)], [_pick_int(rng, begin), end],
                                            [end, begin], [begin - 1, end - 1], [begin + 4, end + 4], [begin],
                                            [begin, end, end], None, [str(begin), end], [begin, end + 0.5],
                                            [-4, end], [0, end - begin]])
    elif kind == 3:  # two tensors swap their data
        other = header[rng.choice(names)]
        entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
    elif kind == 4:
        entry["dtype"] = rng.choice(["F16", "BF16", "F64", "F32", "I32", "I64", "U8", "BOOL", "F8_E4M3", "f32",
                                     "", 12, None, "C64", "U16", "I8"])
    elif kind == 5:  # a duplicate key
        pairs = list(header.items())
        dup = (name, rng.choice([entry, header[rng.choice(names)], {"dtype": "F32", "shape": [1],
                                                                     "data_offsets": [0, 4]}]))
        pairs.insert(rng.randrange(len(pairs) + 1), dup)
        if rng.random() < 0.2:
            pairs.append(("__metadata__", {"format": "x"}))
        return _st_join(_dump_pairs(pairs), body)
    elif kind == 6:  # the metadata: spec, recipe, step, types
        meta = header.setdefault("__metadata__", {})
        key = rng.choice(["spec", "recipe", "step", "format", "converted", "new"])
        if key in ("spec", "recipe") and key in meta and rng.random() < 0.8:
            meta[key] = _mutate_json_text(meta[key], rng)
        elif key == "step":
            meta[key] = rng.choice(["\u00b2", "9" * 5000, "-1", "1e3", "", "\u0663", "12", 12])
        else:
            meta[key] = rng.choice([1, None, {"a": "b"}, ["x"], "v" * 100000, True])
        if rng.random() < 0.1:
            header["__metadata__"] = rng.choice([None, [], "x", 1, {}])
    elif kind == 7:
        del header[name]
    elif kind == 8:
        entry[rng.choice(["extra", "dtype2"])] = 1
    elif kind == 9:
        header["new.tensor"] = {"dtype": "F32", "shape": [2], "data_offsets": [len(body), len(body) + 8]}
    elif kind == 10:  # deep nesting / not an object
        depth = rng.choice([1000, 100000, 400000])
        text = rng.choice(["[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth, "[]", "null", "1"])
        return _st_join(text, body)
    elif kind == 11:  # not UTF-8 / not JSON
        text = json.dumps(header).encode()
        at = rng.randrange(len(text))
        return _st_join(text[:at] + rng.choice([b"\xff", b"\xc3", b"\x00", b"}", b'"']) + text[at + 1:], body)
    elif kind == 12:  # shape and offsets inflated consistently: declares more data than the file has
        factor = rng.choice([2, 1000, 2**20, 2**30])
        entry["shape"] = [entry["shape"][0] * factor if entry["shape"] else factor] + entry["shape"][1:]
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = [begin, begin + (end - begin) * factor]
    else:  # every offset shifted: a hole at the start
        shift = rng.choice([1, 4, 8, -8])
        for n in names:
            b, e = header[n]["data_offsets"]
            header[n]["data_offsets"] = [b + shift, e + shift]
    return _st_join(json.dumps(header), body)


# ---- .npy headers --------------------------------------------------------------------------------

_NPY_MAGIC = b"\x93NUMPY"


def _npy_split(data: bytes):
    major = data[6]
    if major == 1:
        (hlen,) = struct.unpack("<H", data[8:10])
        start = 10
    else:
        (hlen,) = struct.unpack("<I", data[8:12])
        start = 12
    return major, data[start:start + hlen].decode("latin1"), data[start + hlen:]


def _npy_join(major: int, text: str, body: bytes, pad: bool = True) -> bytes:
    raw = text.encode("latin1")
    prefix = 10 if major == 1 else 12
    if pad:
        raw = raw.rstrip(b"\n ")
        raw += b" " * ((-(prefix + len(raw) + 1)) % 64) + b"\n"
    if major == 1 and len(raw) >= 65536:
        major, prefix = 2, 12
        raw = raw.rstrip(b"\n ") + b" " * ((-(12 + len(raw.rstrip(b"\n ")) + 1)) % 64) + b"\n"
    length = struct.pack("<H", len(raw)) if major == 1 else struct.pack("<I", len(raw))
    return _NPY_MAGIC + bytes([major, 0]) + length + raw + body


def npy_header(data, rng, variant=None):
    if not data.startswith(_NPY_MAGIC):
        return bitflip(data, rng)
    major, text, body = _npy_split(data)
    try:
        header = eval(text, {"__builtins__": {}})  # our own valid file's header: a literal dict
    except Exception:
        return bitflip(data, rng)
    kind = rng.randrange(10)
    if kind == 0:
        header["shape"] = tuple(_mutate_shape(header["shape"], rng)) if rng.random() < 0.8 else \
            rng.choice([None, "x", 3, [1, 2], (2**64,), (10**30,), (-1,)])
    elif kind == 1:
        header["descr"] = rng.choice(["<f2", "<f4", "<f8", ">f4", "|u1", "<i8", "<i4", "|b1", "<c8", "|O", "<U4",
                                      "|S4", "|V16", "<M8[s]", "<m8[D]", "bogus", "<f16", "<f3", [("a", "<f4")],
                                      [("a", "|O")], "", 5, "<u8", "|i1"])
    elif kind == 2:
        header["fortran_order"] = rng.choice([True, 1, "x", None, 0])
    elif kind == 3:
        header.pop(rng.choice(list(header)))
    elif kind == 4:
        header["extra"] = 1
    elif kind == 5:  # the header length field
        prefix = 8
        size = 2 if major == 1 else 4
        (old,) = struct.unpack("<H" if size == 2 else "<I", data[prefix:prefix + size])
        value = _pick_int(rng, old) % (1 << (8 * size))
        return data[:prefix] + value.to_bytes(size, "little") + data[prefix + size:]
    elif kind == 6:  # the version
        return data[:6] + bytes([rng.choice([0, 2, 3, 4, 9, 255]), rng.choice([0, 0, 1])]) + data[8:]
    elif kind == 7:  # not a literal
        return _npy_join(major, rng.choice([
            "__import__('os').system('true')", "{'descr': '<f4', 'fortran_order': False, 'shape': (1,) * 10**6}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': " + "(" * 200 + ")" * 200 + "}",
            "[" * 5000 + "]" * 5000, "{" + " " * 200000 + "}", "{'descr': '<f4',", "", "1", "{1: 2}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 4, 4), 'descr': '<f8'}",
        ]), body, pad=rng.random() < 0.8)
    elif kind == 8:  # shape and data inflated consistently
        factor = rng.choice([2, 3, 16])
        shape = tuple(header["shape"])
        header["shape"] = ((shape[0] * factor,) + shape[1:]) if shape else (factor,)
        body = body * factor
    else:  # shape changed with the data size kept
        shape = tuple(header["shape"])
        total = 1
        for n in shape:
            total *= n
        header["shape"] = rng.choice([(total,), (1, total), (4, total // 4), tuple(reversed(shape)),
                                      (1, 1) + shape, (2, total // 2)])
    return _npy_join(major, repr(header), body)


# ---- zip (.npz, .pth) ----------------------------------------------------------------------------

_LOCAL, _CENTRAL, _END = b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06"
# (offset, size) of the fields of a local header, a central header and the end record
_LOCAL_FIELDS = {"version": (4, 2), "flags": (6, 2), "method": (8, 2), "crc": (14, 4), "csize": (18, 4),
                 "usize": (22, 4), "name_len": (26, 2), "extra_len": (28, 2)}
_CENTRAL_FIELDS = {"flags": (8, 2), "method": (10, 2), "crc": (16, 4), "csize": (20, 4), "usize": (24, 4),
                   "name_len": (28, 2), "extra_len": (30, 2), "comment_len": (32, 2), "disk": (34, 2),
                   "local_offset": (42, 4)}
_END_FIELDS = {"disk": (4, 2), "cd_disk": (6, 2), "entries_disk": (8, 2), "entries": (10, 2), "cd_size": (12, 4),
               "cd_offset": (16, 4), "comment_len": (20, 2)}


def _field_mutation(data: bytes, at: int, fields: dict, rng) -> bytes:
    name = rng.choice(list(fields))
    offset, size = fields[name]
    start = at + offset
    old = int.from_bytes(data[start:start + size], "little")
    if name == "method":
        value = rng.choice([0, 8, 12, 14, 93, 99, 1, 65535])
    elif name == "flags":
        value = old ^ rng.choice([1, 8, 64, 2048, 0x2041])
    else:
        value = _pick_int(rng, old) % (1 << (8 * size))
    return data[:start] + value.to_bytes(size, "little") + data[start + size:]


def zip_fields(data, rng, variant=None):
    spots = []
    for sig, fields in ((_LOCAL, _LOCAL_FIELDS), (_CENTRAL, _CENTRAL_FIELDS), (_END, _END_FIELDS)):
        start = data.find(sig)
        while start >= 0:
            spots.append((start, fields))
            start = data.find(sig, start + 1)
    if not spots:
        return bitflip(data, rng)
    at, fields = rng.choice(spots)
    return _field_mutation(data, at, fields, rng)


def _members(data: bytes):
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return [(info, archive.read(info)) for info in archive.infolist()]


def _rebuild(members, compression=zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are the point
        with zipfile.ZipFile(out, "w", compression) as archive:
            for name, payload in members:
                archive.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), payload,
                                 compress_type=compression)
    return out.getvalue()


def zip_members_mutation(data, rng, variant=None, payload_mutators=None):
    members = [(info.filename, payload) for info, payload in _members(data)]
    compression = rng.choice([zipfile.ZIP_STORED, zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
    kind = rng.randrange(8)
    i = rng.randrange(len(members))
    name, payload = members[i]
    if kind <= 2 and payload_mutators:  # one member's payload mutated, its CRC right
        weights, functions = zip(*payload_mutators)
        mutator = rng.choices(functions, weights)[0]
        members[i] = (name, mutator(payload, rng, variant))
    elif kind == 3:  # renamed
        members[i] = (rng.choice(["arr_9.npy", name + "x", name.replace(".npy", ""), "labels.npy", "arr_0.npy",
                                  "../evil.npy", "/abs.npy", name.upper(), "archive/data.pkl", "a/" + name]), payload)
    elif kind == 4:  # a duplicate member
        other = members[rng.randrange(len(members))][1]
        members.insert(rng.randrange(len(members) + 1), (name, rng.choice([payload, other, b"junk"])))
    elif kind == 5:
        del members[i]
    elif kind == 6:
        members.append((rng.choice(["extra.npy", "archive/extra", "x"]), rng.choice([b"", payload])))
    else:  # same members, other compression / order
        if rng.random() < 0.5:
            rng.shuffle(members)
        compression = zipfile.ZIP_DEFLATED if compression == zipfile.ZIP_STORED else zipfile.ZIP_STORED
    return _rebuild(members, compression)


@functools.lru_cache(maxsize=4)
def _zero_deflate(size: int) -> tuple[bytes, int]:
    """A raw deflate stream of ``size`` zero bytes and its CRC-32 (built in 1 MiB steps)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = bytes(1 << 20)
    parts, crc, left = [], 0, size
    while left:
        piece = chunk[:min(left, len(chunk))]
        parts.append(compressor.compress(piece))
        crc = zlib.crc32(piece, crc)
        left -= len(piece)
    parts.append(compressor.flush())
    return b"".join(parts), crc


def _zip_with_raw_member(members, bomb_name: str, bomb_header: bytes, bomb_size: int) -> bytes:
    """A zip of ``members`` (stored) plus a deflated member: ``bomb_header`` then ``bomb_size`` zero bytes."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, payload in members:
            archive.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), payload)
    data = out.getvalue()
    end = data.rfind(_END)
    cd_offset = int.from_bytes(data[end + 16:end + 20], "little")
    cd_size = int.from_bytes(data[end + 12:end + 16], "little")
    entries = int.from_bytes(data[end + 10:end + 12], "little")
    central = data[cd_offset:cd_offset + cd_size]
    local_part = data[:cd_offset]
    zeros, zero_crc = _zero_deflate(bomb_size)
    # the member's payload is the header followed by the zeros: deflate the header separately, then splice
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = compressor.compress(bomb_header) + compressor.flush(zlib.Z_FULL_FLUSH)
    stream = head + zeros
    crc = zlib.crc32(bytes(bomb_size), zlib.crc32(bomb_header)) if bomb_size <= 1 << 20 else \
        _crc_combine(zlib.crc32(bomb_header), zero_crc, bomb_size)
    usize = len(bomb_header) + bomb_size
    name = bomb_name.encode()
    zip64 = usize >= 0xFFFFFFFF
    extra_local = struct.pack("<HHQQ", 1, 16, usize, len(stream)) if zip64 else b""
    local = struct.pack("<4sHHHHHIIIHH", _LOCAL, 45 if zip64 else 20, 0, 8, 0, 0x21, crc,
                        0xFFFFFFFF if zip64 else len(stream), 0xFFFFFFFF if zip64 else usize, len(name),
                        len(extra_local)) + name + extra_local
    offset = len(local_part)
    extra_central = struct.pack("<HHQQ", 1, 16, usize, len(stream)) if zip64 else b""
    cent = struct.pack("<4sHHHHHHIIIHHHHHII", _CENTRAL, 45 if zip64 else 20, 45 if zip64 else 20, 0, 8, 0, 0x21,
                       crc, 0xFFFFFFFF if zip64 else len(stream), 0xFFFFFFFF if zip64 else usize, len(name),
                       len(extra_central), 0, 0, 0, 0, offset) + name + extra_central
    body = local_part + local + stream
    new_central = central + cent
    end_record = struct.pack("<4sHHHHIIH", _END, 0, 0, entries + 1, entries + 1, len(new_central), len(body), 0)
    return body + new_central + end_record


def _crc_combine(crc1: int, crc2: int, len2: int) -> int:
    """zlib's crc32_combine: the CRC of A+B from crc(A), crc(B) and len(B)."""
    def gf2_times(mat, vec):
        total, i = 0, 0
        while vec:
            if vec & 1:
                total ^= mat[i]
            vec >>= 1
            i += 1
        return total

    def gf2_square(mat):
        return [gf2_times(mat, mat[n]) for n in range(32)]

    odd = [0xEDB88320] + [1 << n for n in range(31)]
    even = gf2_square(odd)
    odd = gf2_square(even)
    while True:
        even = gf2_square(odd)
        if len2 & 1:
            crc1 = gf2_times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = gf2_square(even)
        if len2 & 1:
            crc1 = gf2_times(odd, crc1)
        len2 >>= 1
        if not len2:
            break
    return crc1 ^ crc2


def npz_bomb(data, rng, variant=None):
    """A valid .npz whose one member is a deflated array of gigabytes of zeros (a few MB on disk)."""
    members = [(info.filename, payload) for info, payload in _members(data)]
    target = rng.choice([m for m, _ in members])
    size = 1 << 30
    if target.startswith("arr_0"):
        side = 16
        count = size // (side * side)
        header = {"descr": "|u1", "fortran_order": False, "shape": (count, side, side, 1)}
    else:
        count = size // 8
        header = {"descr": "<i8", "fortran_order": False, "shape": (count,)}
    header_bytes = _npy_join(1, repr(header), b"")
    rest = [(m, p) for m, p in members if m != target]
    return _zip_with_raw_member(rest, target, header_bytes, size)


# ---- protobuf (.ckpt) ----------------------------------------------------------------------------

def _varint(data: bytes, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            return value, at
        shift += 7


def _encode_varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_fields(data: bytes, start: int, end: int, depth: int = 0, out=None):
    """(position of the length varint, its end, the payload end) of every length-delimited field, nested."""
    out = [] if out is None else out
    at = start
    while at < end:
        key, at = _varint(data, at)
        wire = key & 7
        if wire == 0:
            _, at = _varint(data, at)
        elif wire == 2:
            length_at = at
            length, at = _varint(data, at)
            out.append((length_at, at, at + length))
            if depth < 3 and (key >> 3) in (1, 2):  # Value in Checkpoint, TensorProto in Value
                try:
                    _length_fields(data, at, at + length, depth + 1, out)
                except IndexError:
                    pass
            at += length
        elif wire == 1:
            at += 8
        elif wire == 5:
            at += 4
        else:
            break
    return out


def _crc_split(data: bytes):
    if data[-17:-10] == b"crc_num":
        return data[:-17], True
    return data, False


def _crc_finish(body: bytes, had_crc: bool, rng) -> bytes:
    choice = rng.random()
    if not had_crc:
        return body if choice < 0.9 else body + b"crc_num" + (zlib.crc32(body)).to_bytes(10, "big")
    if choice < 0.7:
        return body + b"crc_num" + zlib.crc32(body).to_bytes(10, "big")
    if choice < 0.85:
        return body
    return body + b"crc_num" + (zlib.crc32(body) ^ 1).to_bytes(10, "big")


def protobuf_varint(data, rng, variant=None):
    body, had_crc = _crc_split(data)
    try:
        fields = _length_fields(body, 0, len(body))
    except IndexError:
        fields = []
    if not fields:
        return bitflip(data, rng)
    length_at, length_end, _ = rng.choice(fields)
    old, _ = _varint(body, length_at)
    kind = rng.random()
    if kind < 0.7:
        encoded = _encode_varint(_pick_int(rng, old))
    elif kind < 0.85:
        encoded = b"\xff" * rng.choice([9, 10, 11, 12]) + b"\x01"  # overlong
    else:
        encoded = bytes([(old & 0x7F) | 0x80]) + _encode_varint(old >> 7) if old >= 0 else b"\x00"  # non-minimal
    return _crc_finish(body[:length_at] + encoded + body[length_end:], had_crc, rng)


def protobuf_message(data, rng, variant=None):
    from common.formats import checkpoint_message_class

    body, had_crc = _crc_split(data)
    message = checkpoint_message_class()()
    message.ParseFromString(body)
    values = message.value
    i = rng.randrange(len(values))
    value = values[i]
    kind = rng.randrange(11)
    if kind == 0:
        dims = list(value.tensor.dims)
        del value.tensor.dims[:]
        value.tensor.dims.extend([d % 2**63 if d >= 0 else d for d in _mutate_shape(dims, rng)
                                  if isinstance(d, int) and not isinstance(d, bool)]
                                 if rng.random() < 0.8 else [1] * 40 + dims)
    elif kind == 1:
        value.tensor.tensor_type = rng.choice(["str", "Float32", "Float16", "BFloat16", "Float64", "Int64", "Int8",
                                               "Bool", "UInt8", "Complex64", "", "Float32\x00", "float32", "Int4"])
    elif kind == 2:  # a tag another entry has (a duplicate, consecutive or not)
        value.tag = rng.choice([v.tag for v in values])
    elif kind == 3:
        content = value.tensor.tensor_content
        value.tensor.tensor_content = rng.choice([content[:-1], content + b"\x00", content[:4], b"", content * 2,
                                                  content[: len(content) // 2]])
    elif kind == 4:
        new = values.add()
        new.CopyFrom(values[rng.randrange(len(values))])
    elif kind == 5:
        del values[i]
    elif kind == 6 and len(values) > 1:
        j = rng.randrange(len(values))
        a, b = type(value)(), type(value)()
        a.CopyFrom(values[i])
        b.CopyFrom(values[j])
        values[i].CopyFrom(b)
        values[j].CopyFrom(a)
    elif kind == 7:  # a string entry (spec, recipe, config) mutated
        strings = [v for v in values if v.tensor.tensor_type == "str"]
        if strings:
            target = rng.choice(strings)
            text = target.tensor.tensor_content.decode("utf-32-le", "replace").rstrip("\x00")
            target.tensor.tensor_content = _mutate_json_text(text, rng).encode("utf-32-le")
    elif kind == 8:
        value.maptensor.tensor.add().tensor_type = "Float32"
    elif kind == 9:  # odd UTF-32 / surrogates in a string entry
        value.tensor.tensor_type = "str"
        value.tensor.tensor_content = rng.choice([b"\x00\xd8\x00\x00", b"\xff\xff\xff\xff", b"abc",
                                                  "x".encode("utf-32-le") * 3])
    else:
        value.tag = rng.choice(["", "step", "spec", "ema.", "optimizer.x", "rng.state", "\udcff".encode(
            "utf-8", "surrogatepass").decode("utf-8", "replace"), "x" * 1000])
    return _crc_finish(message.SerializeToString(), had_crc, rng)


def ckpt_crc(data, rng, variant=None):
    """A generic byte mutation with the CRC trailer recomputed, so it reaches the protobuf parser."""
    body, had_crc = _crc_split(data)
    weights, functions = zip(*GENERIC)
    mutated = rng.choices(functions, weights)[0](body, rng)
    return _crc_finish(mutated, had_crc, rng)


# ---- pickle --------------------------------------------------------------------------------------

def _ops(data: bytes):
    out = []
    for opcode, arg, pos in pickletools.genops(data):
        out.append((opcode, arg, pos))
    ends = [pos for _, _, pos in out[1:]] + [len(data)]
    return [(op, arg, pos, end) for (op, arg, pos), end in zip(out, ends)]


def _p2(value) -> bytes:
    """The opcode(s) pickle protocol 2 writes for ``value`` (no frame, no memo), without PROTO and STOP."""
    return pickle.dumps(value, protocol=2)[2:-1]


def _unicode(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return (b"\x8c" + bytes([len(raw)]) + raw) if len(raw) < 256 else (b"X" + struct.pack("<I", len(raw)) + raw)


_ATTACK_GLOBALS = [("posix", "system"), ("os", "system"), ("builtins", "eval"), ("builtins", "exec"),
                   ("subprocess", "Popen"), ("builtins", "getattr"), ("numpy", "load"), ("builtins", "open"),
                   ("__builtin__", "eval"), ("torch", "load"), ("numpy.core.multiarray", "_reconstruct"),
                   ("numpy", "ndarray"), ("collections", "OrderedDict"), ("numpy", "dtype"), ("_codecs", "encode"),
                   ("builtins", "tuple"), ("torch._utils", "_rebuild_tensor_v2"), ("torch", "FloatStorage"),
                   ("builtins", "set"), ("builtins", "bytearray"), ("numpy", "frombuffer")]


def _memo_dicts(ops):
    """Memo indices of the dicts a pickle builds (EMPTY_DICT followed by a memo put), with their keys."""
    memo_count, found, last_dict = 0, [], None
    for op, arg, _, _ in ops:
        if op.name in ("EMPTY_DICT",):
            last_dict = True
            continue
        if op.name == "MEMOIZE":
            if last_dict:
                found.append(memo_count)
            memo_count += 1
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            if last_dict:
                found.append(int(arg))
        last_dict = None
    return found


def pickle_ops(data, rng, variant=None):
    """Mutate one opcode (its argument, or the opcode itself) of a pickle."""
    try:
        ops = _ops(data)
    except Exception:
        return bitflip(data, rng)
    kind = rng.randrange(9)
    op, arg, pos, end = rng.choice(ops[1:] if len(ops) > 1 else ops)
    if kind <= 1:  # an integer argument
        ints = [o for o in ops if isinstance(o[1], int) and o[0].name in (
            "BININT", "BININT1", "BININT2", "LONG1", "INT", "LONG", "LONG4", "BINGET", "LONG_BINGET", "BINPUT",
            "LONG_BINPUT", "NEWTRUE", "NEWFALSE")]
        if ints:
            op, arg, pos, end = rng.choice(ints)
            if op.name in ("BINGET", "LONG_BINGET"):
                new = b"j" + struct.pack("<I", _pick_int(rng, arg) % 2**32)
            else:
                new = _p2(_pick_int(rng, arg))
            return data[:pos] + new + data[end:]
    if kind == 2:  # a string argument: a dtype code, a key, a global's name
        strings = [o for o in ops if isinstance(o[1], str) and o[0].name in (
            "SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "SHORT_BINSTRING", "BINSTRING")]
        if strings:
            op, arg, pos, end = rng.choice(strings)
            replacement = rng.choice(["f8", "f2", "i4", "u2", "O", "U8", "V4", "M8", "b1", "c8", "<f4", ">f4", "",
                                      "x" * 300, arg + "x", arg[:-1], "posix", "system", "spec", "step", "ema",
                                      "model", "latin1", "utf-8", "\udcff"])
            return data[:pos] + _unicode(replacement) + data[end:]
    if kind == 3:  # a raw byte length (array data)
        blobs = [o for o in ops if o[0].name in ("SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "BYTEARRAY8")]
        if blobs:
            op, arg, pos, end = rng.choice(blobs)
            if rng.random() < 0.5:
                size = {"SHORT_BINBYTES": 1, "BINBYTES": 4, "BINBYTES8": 8, "BYTEARRAY8": 8}[op.name]
                value = _pick_int(rng, len(arg)) % (1 << (8 * size))
                return data[:pos + 1] + value.to_bytes(size, "little") + data[pos + 1 + size:]
            blob = rng.choice([arg[:-1], arg + b"\x00", arg[: len(arg) // 2], b"", arg * 2])
            return data[:pos] + b"B" + struct.pack("<I", len(blob)) + blob + data[end:]
    if kind == 4:
        return data[:pos] + data[end:]  # an opcode deleted
    if kind == 5:
        return data[:pos] + data[pos:end] * 2 + data[end:]  # duplicated
    if kind == 6:  # an opcode inserted
        new = rng.choice([b"(", b"0", b"2", b"}", b"]", b")", b"a", b"s", b"b", b"R", b"N", b".", b"\x94",
                          b"h\x00", b"h\xff", b"t", b"\x85", b"\x86", b"e", b"u", b"\x81", b"\x95" + b"\xff" * 8])
        return data[:pos] + new + data[pos:]
    if kind == 7:  # a global swapped
        globs = [o for o in ops if o[0].name in ("GLOBAL", "STACK_GLOBAL")]
        if globs:
            op, arg, pos, end = rng.choice(globs)
            module, name = rng.choice(_ATTACK_GLOBALS)
            if op.name == "GLOBAL":
                return data[:pos] + b"c" + f"{module}\n{name}\n".encode() + data[end:]
            # STACK_GLOBAL takes the two strings before it: replace the pair of pushes with a GLOBAL
            index = next(k for k, o in enumerate(ops) if o[2] == pos)
            pushes = [k for k in range(index - 1, -1, -1) if ops[k][0].name in (
                "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE")][:2]
            if len(pushes) == 2:
                # drop the memo puts between them too: simplest is to rewrite both strings in place
                first, second = ops[pushes[1]], ops[pushes[0]]
                out = (data[:first[2]] + _unicode(module) + data[first[3]:second[2]] + _unicode(name)
                       + data[second[3]:])
                return out
    if kind == 8:  # duplicate key in a dict the pickle builds (memoized): a SETITEM appended before STOP
        dicts = _memo_dicts(ops)
        stop = ops[-1][2] if ops[-1][0].name == "STOP" else len(data)
        if dicts:
            index = rng.choice(dicts)
            keys = [o[1] for o in ops if isinstance(o[1], str) and o[0].name in ("SHORT_BINUNICODE", "BINUNICODE")]
            key = rng.choice(keys or ["model"])
            memo_refs = [int(o[1]) for o in ops if o[0].name in ("BINPUT", "LONG_BINPUT")] or list(range(20))
            value = rng.choice([b"N", _p2(_pick_int(rng)), _unicode("x"), b"}", b"]",
                                b"j" + struct.pack("<I", rng.choice(memo_refs + list(range(60))))])
            ref = b"j" + struct.pack("<I", index)
            return data[:stop] + ref + _unicode(key) + value + b"s0" + data[stop:]
    return bitflip(data, rng)


def _attack_pickle(module: str, name: str, protocol: int, marker: str) -> bytes:
    arg = f"touch {marker}" if name in ("system", "Popen") else (
        f"__import__('os').system('touch {marker}')" if name in ("eval", "exec") else marker)
    if protocol == 0:
        return f"c{module}\n{name}\n(V{arg}\ntR.".encode()
    head = b"\x80" + bytes([protocol])
    return head + _unicode(module) + _unicode(name) + b"\x93" + _unicode(arg) + b"\x85R."


def pickle_attack(data, rng, variant=None):
    """A pickle that asks to call something (os.system & co): it must be refused, whatever else it holds."""
    kind = rng.randrange(4)
    if kind <= 1:
        module, name = rng.choice(_ATTACK_GLOBALS[:10])
        payload = _attack_pickle(module, name, rng.choice([0, 2, 4]), MARKER)
        if rng.random() < 0.5:  # inside a valid-looking dict: {"model": <call>}
            payload = b"\x80\x02}" + _unicode("model") + payload[2:-1] + b"s."
        return payload
    if kind == 2:  # BUILD on a whitelisted function
        return b"c_codecs\nencode\n(dV__defaults__\n(Vlatin1\ntsb."
    # the valid pickle with a call spliced in front of STOP: {"model": ..., "optimizer": os.system(...)}
    stop = data.rfind(b".")
    call = _attack_pickle(*rng.choice(_ATTACK_GLOBALS[:4]), 2, MARKER)[2:-1]
    return data[:stop] + _unicode("optimizer") + call + b"s" + data[stop:]


def pickle_crafted(data, rng, variant=None):
    """A pickle built to hurt: shared references expanding to 2**N, deep nesting, huge declared lengths,
    object arrays, dtypes rebuilt with objects, integers too long to print."""
    kind = rng.randrange(6)
    if kind == 0:  # shared references expanding to 2**k leaves (each level: (prev, prev))
        levels = rng.choice([30, 60, 200])
        out = bytearray(b"\x80\x02N")
        for level in range(levels):
            out += b"r" + struct.pack("<I", level) + b"0" + (b"j" + struct.pack("<I", level)) * 2 + b"\x86"
        return bytes(out) + b"."
    if kind == 1:  # deep nesting
        depth = rng.choice([100, 10000, 200000])
        return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."
    if kind == 2:  # huge declared lengths
        op = rng.choice([b"\x8e" + struct.pack("<Q", 2**40), b"B" + struct.pack("<I", 2**31 - 1),
                         b"\x8d" + struct.pack("<Q", 2**62), b"\x8b" + struct.pack("<i", 2**31 - 1),
                         b"\x95" + struct.pack("<Q", 2**60), b"\x96" + struct.pack("<Q", 2**50)])
        return b"\x80\x04" + op + b"abc."
    if kind == 3:  # an object array from the whitelist
        return (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R"
                b"(K\x01K\x01\x85cnumpy\ndtype\nX\x02\x00\x00\x00O8K\x00K\x01\x87R\x89]cbuiltins\nprint\natb.")
    if kind == 4:  # numpy dtype BUILD that makes it structured with objects
        return (b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00f4K\x00K\x01\x87R(K\x03X\x01\x00\x00\x00|N"
                b"X\x01\x00\x00\x00a\x85}X\x01\x00\x00\x00a(cnumpy\ndtype\nX\x02\x00\x00\x00O8K\x00K\x01\x87RK"
                b"\x00\x86sK\x08K\x01K?tb.")
    # the valid pickle with an integer too long to print, as a value or as a key
    stop = data.rfind(b".")
    huge = _p2(rng.choice([10**5000, -(2**70000), 2**64]))
    if rng.random() < 0.3:
        return data[:stop] + huge + b"N" + b"s" + data[stop:]
    return data[:stop] + _unicode(rng.choice(["step", "optimizer", "spec", "config"])) + huge + b"s" + data[stop:]


# ---- YAML ----------------------------------------------------------------------------------------

_YAML_VALUES = [
    "[1, 2]", "[[1, [2, [3]]]]", "{a: 1}", "'x'", "\"\\x00\"", "1" * 5000, "-" + "9" * 5000, "0x" + "f" * 5000,
    "0b" + "1" * 20000, "1e999", "-1e999", ".inf", "-.inf", ".nan", ".NaN", "yes", "no", "on", "off", "~", "null",
    "2001-12-14", "2001-12-14t21:59:43.10-05:00", "!!binary aGVsbG8=", "!!set {a, b}", "!!omap [a: 1, b: 2]",
    "!!python/object/apply:os.system ['true']", "!!python/name:os.system", "!!python/object/new:list []",
    "1:30:00", "0o17", "017", "1_000", "", "x" * 100000, "\"\\U0001F600\"", "*undefined", "&a", "!!str 5",
    "!!int x", "!!float abc", "!!bool maybe", "!!null x", "!!map [1]", "!!seq {a: 1}", "!<tag:yaml.org,2002:int> 3",
    "!custom 1", "|\n  block\n  text", ">\n  folded", "\"unterminated", "'unterminated", "[1, 2", "{a: 1",
    "@reserved", "`reserved", "%", "- 1\n- 2", "\n  nested: 1\n  deep: 2", "1e3", "2.0e-3", "-0", "+12", ".5",
    "1.7976931348623157e309", "4.9e-325", "0x7fffffffffffffff", "9223372036854775808", "-9223372036854775809",
    "18446744073709551616", "1" + "0" * 400, "\t1", "1 # comment", "\"\\ud800\"", "!!timestamp 2020-01-01",
]


def _yaml_lines(text: str):
    return [line for line in text.splitlines() if re.match(r"^[A-Za-z_][\w]*\s*:", line)]


def yaml_text(data, rng, variant=None):
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return bitflip(data, rng)
    lines = text.splitlines()
    keyed = [i for i, line in enumerate(lines) if re.match(r"^[A-Za-z_]\w*\s*:", line)]
    kind = rng.randrange(16)
    if not keyed:
        kind = 15
    i = rng.choice(keyed) if keyed else 0
    key = lines[i].split(":", 1)[0].strip() if keyed else "lr"
    if kind <= 1:  # a duplicate key (same or another value), adjacent or at the end
        dup = f"{key}: {rng.choice([lines[i].split(':', 1)[1].strip(), '1', 'x', '0.5', 'true'])}"
        lines.insert(rng.choice([i + 1, len(lines), 0]), dup)
    elif kind <= 4:  # a wrong type / a huge number / a tag / a syntax error as a value
        lines[i] = f"{key}: {rng.choice(_YAML_VALUES)}"
    elif kind == 5:  # nesting
        depth = rng.choice([50, 1000, 10000, 100000])
        style = rng.random()
        if style < 0.4:
            value = "[" * depth + "]" * depth
        elif style < 0.7:
            value = "{a: " * depth + "1" + "}" * depth
        else:
            value = "\n" + "\n".join("  " * (d + 1) + f"k{d}:" for d in range(min(depth, 2000))) + " 1"
        lines[i] = f"{key}: {value}"
    elif kind == 6:  # billion laughs
        levels = rng.choice([4, 9, 12])
        bomb = ['lol0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
        for level in range(1, levels):
            refs = ", ".join([f"*a{level - 1}"] * 9)
            bomb.append(f"lol{level}: &a{level} [{refs}]")
        target = rng.choice([key, "lol_top", "seed", "model", "classes"])
        if rng.random() < 0.5:  # anchors under a key the schema has, so the unknown-key check does not stop it first
            bomb = [line.replace(f"lol{n}:", f"{key}:" if n == 0 else f"lol{n}:", 1) for n, line in enumerate(bomb)]
        lines = bomb + lines + [f"{target}: *a{levels - 1}"]
    elif kind == 7:  # a recursive alias / an alias to a mapping
        lines.append(rng.choice([f"{key}: &r [*r]", f"{key}: &r [1, *r]", f"x: &m {{lr: 1}}\n{key}: *m",
                                 f"<<: {{lr: 0.5, {key}: 1}}", "<<: *nothing", f"{key}: &s 5\nseed: *s"]))
    elif kind == 8:  # documents, directives, top-level shapes
        choice = rng.randrange(7)
        if choice == 0:
            lines.insert(rng.randrange(len(lines) + 1), "---")
        elif choice == 1:
            lines.insert(0, "%YAML 1.1\n---")
        elif choice == 2:
            lines = ["- " + line for line in lines]
        elif choice == 3:
            lines = ["just a scalar"]
        elif choice == 4:
            lines = ["# only a comment"]
        elif choice == 5:
            lines.insert(0, "%YAML 9.9\n---")
        else:
            lines.append("...\nextra: 1")
    elif kind == 9:  # keys of odd kinds
        lines.append(rng.choice(["? [a, b]\n: 1", "1: 2", "~: 3", "true: 1", "'lr ': 1", "\"\\x00\": 1",
                                 "? {a: 1}\n: 2", f"{key.upper()}: 1", "lr : 1", "-1: x", "1.5: x", ".nan: 1"]))
    elif kind == 10:  # indentation: tabs, a nested line
        lines[i] = rng.choice(["\t" + lines[i], "  " + lines[i], lines[i].replace(": ", ":\t"),
                               lines[i] + "\n  sub: 1"])
    elif kind == 11:  # encodings
        raw = "\n".join(lines).encode("utf-8")
        choice = rng.randrange(6)
        if choice == 0:
            return b"\xef\xbb\xbf" + raw
        if choice == 1:
            return "\n".join(lines).encode("utf-16")
        if choice == 2:
            at = rng.randrange(len(raw) + 1)
            return raw[:at] + rng.choice([b"\xff", b"\xc3\x28", b"\x80", b"\xed\xa0\x80"]) + raw[at:]
        if choice == 3:
            return raw.replace(b"\n", b"\r\n")
        if choice == 4:
            at = rng.randrange(len(raw) + 1)
            return raw[:at] + b"\x00" + raw[at:]
        return raw.replace(b"\n", b"\r")
    elif kind == 12:  # an unknown key / a typo
        lines.append(rng.choice([f"{key}x: 1", f"{key[:-1]}: 1", "learning_rate: 1", "zzz: 1"]))
    elif kind == 13:  # huge strings, many keys
        lines.append(rng.choice([f"{key}: " + "a" * 200000, "\n".join(f"k{n}: {n}" for n in range(5000)),
                                 f"run_dir: '{'x' * 100000}'"]))
    elif kind == 14:  # a key removed
        del lines[i]
    else:
        weights, functions = zip(*GENERIC)
        return rng.choices(functions, weights)[0](data, rng)
    return ("\n".join(lines) + ("\n" if rng.random() < 0.9 else "")).encode("utf-8", "surrogatepass")


# ---- images --------------------------------------------------------------------------------------

_PNG_SIG = b"\x89PNG\r\n\x1a\n"


def _png_chunks(data: bytes):
    chunks, at = [], 8
    while at + 8 <= len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        kind = data[at + 4:at + 8]
        chunks.append([kind, data[at + 8:at + 8 + length]])
        at += 12 + length
        if kind == b"IEND":
            break
    return chunks


def _png_join(chunks, fix_crc: bool = True) -> bytes:
    out = bytearray(_PNG_SIG)
    for kind, body in chunks:
        crc = zlib.crc32(kind + body)
        out += struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc if fix_crc else crc ^ 1)
    return bytes(out)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@functools.lru_cache(maxsize=16)
def zero_png(width: int, height: int, bit_depth: int = 1, color: int = 0) -> bytes:
    """A valid PNG of ``width`` x ``height`` zero pixels: a few KB for hundreds of megapixels."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4, 3: 1}[color]
    row = 1 + (width * channels * bit_depth + 7) // 8
    compressor = zlib.compressobj(9)
    parts = []
    block = bytes(row * max(1, min(height, (1 << 22) // row)))
    rows_per_block = len(block) // row
    left = height
    while left:
        n = min(left, rows_per_block)
        parts.append(compressor.compress(block[:n * row]))
        left -= n
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color, 0, 0, 0)
    extra = _png_chunk(b"PLTE", b"\x00\x00\x00\xff\xff\xff") if color == 3 else b""
    return _PNG_SIG + _png_chunk(b"IHDR", ihdr) + extra + _png_chunk(b"IDAT", b"".join(parts)) + _png_chunk(b"IEND", b"")


def png_structure(data, rng, variant=None):
    if not data.startswith(_PNG_SIG):
        return image_bomb(data, rng)
    chunks = _png_chunks(data)
    fix = rng.random() < 0.8
    kind = rng.randrange(9)
    ihdr = next(c for c in chunks if c[0] == b"IHDR")
    if kind <= 1:  # declared dimensions
        w, h = struct.unpack(">II", ihdr[1][:8])
        choice = rng.random()
        if choice < 0.5:
            w, h = rng.choice([(w * 2, h), (w, h + 1), (65535, 65535), (30000, 30000), (1, 10**6), (10**6, 1),
                               (2**31 - 1, 1), (0, h), (w, 0), (8000, 8000), (20000, 9000), (w * 1000, h * 1000)])
        else:
            w, h = _pick_int(rng, w) % 2**32, _pick_int(rng, h) % 2**32
        ihdr[1] = struct.pack(">II", w, h) + ihdr[1][8:]
    elif kind == 2:  # bit depth, colour type, interlace, filter
        body = bytearray(ihdr[1])
        body[rng.choice([8, 9, 10, 11, 12])] = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 16, 255])
        ihdr[1] = bytes(body)
    elif kind == 3:  # a chunk length field (raw, so the stream desynchronises)
        out = bytearray(_png_join(chunks, fix))
        at, index = 8, rng.randrange(len(chunks))
        for c in chunks[:index]:
            at += 12 + len(c[1])
        out[at:at + 4] = struct.pack(">I", _pick_int(rng, len(chunks[index][1])) % 2**32)
        return bytes(out)
    elif kind == 4:  # image data corrupted (CRC right): other sizes, bad zlib, bad filter bytes
        idat = [c for c in chunks if c[0] == b"IDAT"]
        if idat:
            raw = zlib.decompress(b"".join(c[1] for c in idat))
            choice = rng.randrange(4)
            if choice == 0:
                raw = raw[: rng.randrange(len(raw) + 1)]
            elif choice == 1:
                raw = raw + raw
            elif choice == 2:
                raw = bytes([rng.choice([5, 7, 255])]) + raw[1:]
            else:
                raw = bytes(rng.randrange(256) for _ in range(len(raw)))
            for c in idat[1:]:
                chunks.remove(c)
            idat[0][1] = zlib.compress(raw) if rng.random() < 0.9 else zlib.compress(raw)[:-6]
    elif kind == 5:  # ancillary chunks: text bombs, huge profiles
        bomb = zlib.compress(bytes(rng.choice([10**6, 10**8])))
        chunks.insert(1, rng.choice([[b"zTXt", b"Comment\x00\x00" + bomb], [b"iCCP", b"icc\x00\x00" + bomb],
                                     [b"tEXt", b"k\x00" + b"v" * 100000], [b"iTXt", b"k\x00\x01\x00\x00\x00" + bomb],
                                     [b"pHYs", b"\x00" * 3], [b"gAMA", b"\xff\xff\xff\xff"]]))
    elif kind == 6:  # chunk order: IEND dropped, IHDR twice, IDAT before IHDR
        choice = rng.randrange(3)
        if choice == 0:
            chunks = [c for c in chunks if c[0] != b"IEND"]
        elif choice == 1:
            chunks.insert(2, list(ihdr))
        else:
            chunks.reverse()
    elif kind == 7:
        chunks.insert(rng.randrange(1, len(chunks)), [b"IDAT", zlib.compress(b"\x00" * 100)])
    else:
        return image_bomb(data, rng)
    return _png_join(chunks, fix)


def image_bomb(data, rng, variant=None):
    """A valid image declaring many pixels (or an extreme aspect ratio) in a few KB."""
    w, h = rng.choice([(13000, 13000), (9000, 9000), (8000, 6000), (1, 10**6), (10**6, 1), (3, 2 * 10**6),
                       (20000, 20000), (7000, 7000), (4000, 4000), (2, 30000)])
    depth, color = rng.choice([(1, 0), (8, 0), (1, 0), (8, 2), (8, 3), (1, 3)])
    return zero_png(w, h, depth, color)


def _jpeg_segments(data: bytes):
    """(marker, start, end) of each marker segment before the scan data."""
    out, at = [], 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            at += 2
            continue
        (length,) = struct.unpack(">H", data[at + 2:at + 4])
        out.append((marker, at, at + 2 + length))
        if marker == 0xDA:
            break
        at += 2 + length
    return out


def jpeg_structure(data, rng, variant=None):
    if not data.startswith(b"\xff\xd8"):
        return image_bomb(data, rng)
    segments = _jpeg_segments(data)
    if not segments:
        return bitflip(data, rng)
    kind = rng.randrange(5)
    sof = [s for s in segments if s[0] in (0xC0, 0xC1, 0xC2)]
    if kind <= 1 and sof:  # declared dimensions
        _, start, _ = sof[0]
        h, w = struct.unpack(">HH", data[start + 5:start + 9])
        h, w = rng.choice([(65535, 65535), (20000, 20000), (8000, 8000), (7000, 6000), (0, w), (h, 0), (h * 2, w),
                           (h + 1, w + 1), (1, 65535), (65535, 1), (h // 2, w)])
        return data[:start + 5] + struct.pack(">HH", h, w) + data[start + 9:]
    if kind == 2:  # a segment length
        marker, start, end = rng.choice(segments)
        value = rng.choice([0, 1, 2, 0xFFFF, end - start - 2 + 1, end - start - 2 - 1, 0x8000])
        return data[:start + 2] + struct.pack(">H", value) + data[start + 4:]
    if kind == 3 and sof:  # components, sampling factors, precision
        _, start, end = sof[0]
        body = bytearray(data[start:end])
        body[rng.choice([4, 9, 11, 12, min(len(body) - 1, 14)])] = rng.choice([0, 1, 3, 4, 12, 0x44, 0xFF, 16])
        return data[:start] + bytes(body) + data[end:]
    marker, start, end = rng.choice(segments)  # a table's contents scrambled
    body = bytearray(data[start + 4:end])
    for _ in range(rng.choice([1, 4, 16])):
        if body:
            body[rng.randrange(len(body))] = rng.randrange(256)
    return data[:start + 4] + bytes(body) + data[end:]


def header_ints(data, rng, variant=None):
    """BMP / TIFF / PPM / WEBP: an integer in the first 64 bytes (dimensions, offsets, bit counts)."""
    if data[:2] in (b"P5", b"P6"):  # PPM/PGM: ASCII header
        parts = data.split(b"\n", 3)
        if len(parts) == 4 and rng.random() < 0.7:
            dims = rng.choice([b"100000 100000", b"1 10000000", b"0 0", b"-1 5", b"27 2000", b"99999999999 1",
                               b"30000 30000"])
            maxval = rng.choice([parts[2], b"65535", b"0", b"256", b"99999"])
            return b"\n".join([parts[0], dims, maxval, parts[3]])
    if len(data) < 64:
        return set_int(data, rng)
    size = rng.choice([2, 4])
    at = rng.randrange(0, 60 - size)
    value = _pick_int(rng) % (1 << (8 * size))
    order = "big" if data[:2] == b"MM" else "little"
    return data[:at] + value.to_bytes(size, order) + data[at + size:]


# ---- registry ------------------------------------------------------------------------------------

def _npz_payload_mutators():
    return [(6, npy_header)] + [(w, f) for w, f in GENERIC]


def npz_members(data, rng, variant=None):
    return zip_members_mutation(data, rng, variant, _npz_payload_mutators())


def pth_bomb(data, rng, variant=None):
    """The .pth with one storage record replaced by a deflated gigabyte of zeros (a few MB on disk)."""
    members = [(info.filename, payload) for info, payload in _members(data)]
    records = [name for name, _ in members if "/data/" in name]
    target = rng.choice(records)
    return _zip_with_raw_member([(m, p) for m, p in members if m != target], target, b"", 1 << 30)


def pth_members(data, rng, variant=None):
    members = [(info.filename, payload) for info, payload in _members(data)]
    pkl = [i for i, (name, _) in enumerate(members) if name.endswith("data.pkl")]
    if pkl and rng.random() < 0.7:  # the pickle itself, CRC right
        i = pkl[0]
        mutator = rng.choice([pickle_ops, pickle_ops, pickle_ops, pickle_attack, pickle_crafted, bitflip, truncate])
        members[i] = (members[i][0], mutator(members[i][1], rng, variant))
        return _rebuild(members)
    return zip_members_mutation(data, rng, variant, [(w, f) for w, f in GENERIC])


MUTATORS = {
    "safetensors": GENERIC + [(14, safetensors_header)],
    "pdparams": GENERIC + [(12, pickle_ops), (3, pickle_attack), (3, pickle_crafted)],
    "ckpt": GENERIC + [(6, ckpt_crc), (6, protobuf_varint), (8, protobuf_message)],
    "pth": GENERIC + [(6, zip_fields), (12, pth_members), (1, pth_bomb)],
    "yaml": GENERIC + [(25, yaml_text)],
    "samples": GENERIC + [(5, zip_fields), (12, npz_members), (1, npz_bomb)],
    "image": GENERIC + [(10, png_structure), (6, jpeg_structure), (4, header_ints), (3, image_bomb)],
    "latent": GENERIC + [(14, npy_header)],
}

_FORMAT_SPECIFIC = {"png": png_structure, "jpg": jpeg_structure, "jpeg": jpeg_structure}


def mutate(reader: str, data: bytes, rng: random.Random, variant=None) -> tuple[bytes, str]:
    """(mutated bytes, the mutator's name) for case ``rng`` of ``reader``."""
    weights, functions = zip(*MUTATORS[reader])
    function = rng.choices(functions, weights)[0]
    if reader == "image" and function in (png_structure, jpeg_structure) and variant is not None:
        function = _FORMAT_SPECIFIC.get(variant.suffix, header_ints)  # the structure mutator of the file's format
    try:
        return function(data, rng, variant), function.__name__
    except Exception as error:  # noqa: BLE001 - a choice that cannot apply to this file: flip bits instead
        return bitflip(data, rng), f"bitflip (after {function.__name__}: {type(error).__name__})"
