"""Every DiR checkpoint format, read and written without trusting the file.

| format      | suffix            | module             | read / written with                               | needs    |
|-------------|-------------------|--------------------|---------------------------------------------------|----------|
| torch       | ``.pth``, ``.pt`` | ``torch_pth``      | ``torch.load(weights_only=True)``, ``torch.save`` | torch    |
| paddle      | ``.pdparams``     | ``pdparams``       | :class:`RestrictedUnpickler`, pickle protocol 4   | numpy    |
| mindspore   | ``.ckpt``         | ``mindspore_ckpt`` | protobuf messages built in Python (no protoc)     | protobuf |
| safetensors | ``.safetensors``  | ``safetensors_io`` | a small reader/writer (header + raw bytes)        | numpy    |

``stored`` holds the tensor type every format reads into (bfloat16 as bits), ``errors``
the error classes, and ``contents`` the one reader and writer over all of them:
:func:`read_contents`, :func:`canonical_weights`, :func:`read_checkpoint`,
:func:`write_checkpoint`. Import everything from ``common.formats``.

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
  'step', 'rng', 'config', 'spec', 'recipe'}``; ``.ckpt`` the model parameters under their
  MindSpore names, the EMA ones under ``ema.``, the optimizer's under ``optimizer.``, an
  Int64 ``step`` and string entries ``format``, ``spec``, ``recipe``, ``config`` and ``rng``
  (JSON), as backends/mindspore/train.py writes it;
* a **bare state dict** (names -> tensors, optionally with ``spec`` and ``recipe`` entries),
  or canonical ``.safetensors`` with the spec and recipe in its metadata.

Where a file carries no spec, ``FILE.spec.json`` beside it is read (see :func:`sidecar_path`):
``{"spec": {...}, "recipe": {...}}``, or (older files, and files without a recipe) the spec
object alone.

The training recipe (``common.recipe.Recipe``: objective, schedule, data) is stored as

* ``.pth``/``.pdparams``: top-level key ``'recipe'``, a dict (``Recipe.to_dict()``);
* ``.ckpt``: string entry ``recipe``, JSON text (like ``spec``);
* ``.safetensors``: metadata key ``recipe``, JSON text;
* a bare state dict: ``"recipe"`` in ``FILE.spec.json``.

A training checkpoint without one (written before recipes travelled) gets the recipe its
training config describes (``Contents.recipe_origin == "config"``).
"""
from __future__ import annotations

import sys
import types

from common.formats import contents, errors, mindspore_ckpt, pdparams, safetensors_io, stored, torch_pth
from common.formats.contents import (
    FORMAT_ALIASES, FORMAT_FRAMEWORK, FORMAT_LABEL, FORMATS, SUFFIX_FORMAT, WEIGHT_SETS, Contents,
    canonical_weights, detect_format, parameter_summary, read_checkpoint, read_contents, resolve_recipe_argument,
    resolve_spec_argument, sidecar_path, table_order, write_checkpoint,
)
from common.formats.errors import CheckpointError, FormatError, MissingFrameworkError, UnsafeCheckpointError
from common.formats.mindspore_ckpt import (
    MS_PREFIXES, MS_RESERVED_TAGS, MS_SLICE_BYTES, MS_TRAIN_FORMAT, checkpoint_file_descriptor,
    checkpoint_message_class, read_ms_checkpoint, write_ms_checkpoint,
)
from common.formats.pdparams import PDPARAMS_PROTOCOL, RestrictedUnpickler, load_pdparams, save_pdparams
from common.formats.safetensors_io import CANONICAL_FORMAT, FORMAT_VERSION, read_safetensors, write_safetensors
from common.formats.stored import (
    DTYPES, FLOAT_DTYPES, Stored, bf16_bits_to_float32, cast_for_output, float32_to_bf16_bits,
)
from common.formats.torch_pth import load_torch, save_torch

__all__ = [
    # one view of any checkpoint
    "Contents", "read_contents", "canonical_weights", "read_checkpoint", "write_checkpoint", "detect_format",
    "sidecar_path", "resolve_spec_argument", "resolve_recipe_argument", "parameter_summary", "table_order",
    # errors
    "CheckpointError", "FormatError", "UnsafeCheckpointError", "MissingFrameworkError",
    # constants
    "FORMATS", "SUFFIX_FORMAT", "FORMAT_ALIASES", "FORMAT_LABEL", "FORMAT_FRAMEWORK", "DTYPES", "WEIGHT_SETS",
    "FLOAT_DTYPES", "PDPARAMS_PROTOCOL", "MS_SLICE_BYTES", "MS_PREFIXES", "MS_TRAIN_FORMAT", "MS_RESERVED_TAGS",
    "CANONICAL_FORMAT", "FORMAT_VERSION",
    # stored tensors
    "Stored", "bf16_bits_to_float32", "float32_to_bf16_bits", "cast_for_output",
    # the formats
    "read_safetensors", "write_safetensors",
    "RestrictedUnpickler", "load_pdparams", "save_pdparams",
    "checkpoint_file_descriptor", "checkpoint_message_class", "read_ms_checkpoint", "write_ms_checkpoint",
    "load_torch", "save_torch",
]

_PARTS = (errors, stored, safetensors_io, pdparams, mindspore_ckpt, torch_pth, contents)
_MISSING = object()


class _FormatsPackage(types.ModuleType):
    """``common.formats`` reads and writes as the single module it used to be.

    A name not re-exported above (a private helper such as ``_CKPT_CLASS``) is found in
    the module that defines it. Setting a name here also rebinds it in every module that
    holds the same object under that name, so the code that uses it sees the change:
    ``monkeypatch.setattr(common.formats, "MS_SLICE_BYTES", 4096)`` makes the .ckpt writer
    split at 4 KiB, and ``common.formats._CKPT_CLASS = None`` drops its cached message class.
    """

    def __getattr__(self, name):
        for part in _PARTS:
            if name in vars(part):
                return vars(part)[name]
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")

    def __setattr__(self, name, value):
        old = self.__dict__.get(name, _MISSING)
        if old is _MISSING:
            old = next((vars(part)[name] for part in _PARTS if name in vars(part)), _MISSING)
        forwarded = False
        if old is not _MISSING:
            for part in _PARTS:
                if vars(part).get(name, _MISSING) is old:
                    setattr(part, name, value)
                    forwarded = True
        if name in self.__dict__ or not forwarded:
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _FormatsPackage
