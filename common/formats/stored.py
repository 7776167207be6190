"""A tensor as a file holds it, and bfloat16 without a framework.

numpy has no bfloat16, so a bf16 tensor is kept as its ``uint16`` bit pattern with the
dtype name beside it (:class:`Stored`); reading widens bf16 and fp16 to float32 exactly,
and writing rounds float32 to bf16 to nearest-even, as torch and paddle do. No file is
read here: this module is the common currency of the format modules.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.formats.errors import FormatError

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


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


def _numpy_dtype(name: str) -> np.dtype:
    """The little-endian numpy dtype a file stores ``name`` as (bfloat16: uint16 bits)."""
    return np.dtype(np.uint16) if name == "bfloat16" else np.dtype(name).newbyteorder("<")
