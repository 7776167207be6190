"""One reader and one writer over every format: what a checkpoint holds, whatever its format.

:func:`read_contents` reads a file with its format's module and tells its *layout*
(a training checkpoint, or a bare state dict) into :class:`Contents`: the weight sets,
the spec and the training recipe (each with where it came from), the step and the
training config. :func:`canonical_weights` turns a weight set into canonical float32
weights checked against the parameter table; :func:`write_checkpoint` writes canonical
weights, the spec and the recipe in any format, atomically.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.atomic import atomic_path
from common.formats.errors import FormatError, _check_file, _short
from common.formats.mindspore_ckpt import (
    MS_PREFIXES, MS_RESERVED_TAGS, MS_TRAIN_FORMAT, read_ms_checkpoint, write_ms_checkpoint,
)
from common.formats.pdparams import _paddle_stored, load_pdparams, save_pdparams
from common.formats.safetensors_io import CANONICAL_FORMAT, FORMAT_VERSION, read_safetensors, write_safetensors
from common.formats.stored import DTYPES, Stored, cast_for_output
from common.formats.torch_pth import _import_torch, load_torch, save_torch
from common.param_mapping import from_framework, to_framework
from common.params import check_state, parameter_table
from common.recipe import Recipe, RecipeError, recipe_from_config
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
WEIGHT_SETS = ("ema", "model")
# Entries of a file that describe the weights rather than being weights (not listed under 'other').
_DESCRIPTIVE_KEYS = ("spec", "step", "config", "recipe")


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
    """Where the spec (and recipe) of a file without metadata lives: ``FILE.spec.json`` beside it.

    Its layout is ``{"spec": {...}, "recipe": {...}}``; a file holding only a spec object
    (the older layout, still written when there is no recipe) is read as a spec with no recipe.
    """
    path = Path(path)
    return path.with_name(path.name + ".spec.json")


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
    recipe: Recipe | None = None  # how the weights were trained (None: the file does not say)
    recipe_origin: str = ""  # "file", "config" (derived from the training config), "sidecar NAME"

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
    return _short(value, 60)


def _count_tensors(value) -> int:
    if isinstance(value, Stored):
        return 1
    if isinstance(value, dict):
        return sum(_count_tensors(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_count_tensors(v) for v in value)
    return 0


def _refuse_duplicate_keys(text, origin: str, what: str) -> None:
    """JSON text with an object that names a key twice is refused (``json.loads`` would keep the last one)."""
    def hook(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise FormatError(f"{origin}: bad {what} (key '{key[:60]}' given twice)")
            seen.add(key)

    try:
        json.loads(text, object_pairs_hook=hook)
    except FormatError:
        raise
    except (ValueError, RecursionError, TypeError):
        pass  # not JSON: the parser proper says so


def _parse_spec(value, origin: str) -> DiRSpec:
    try:
        if isinstance(value, DiRSpec):
            return value
        if isinstance(value, (str, bytes)):
            text = value.decode() if isinstance(value, bytes) else value
            _refuse_duplicate_keys(text, origin, "spec")
            return DiRSpec.from_json(text, source=origin)
        if isinstance(value, dict):
            return DiRSpec.from_dict(dict(value), source=origin)
    except FormatError:
        raise
    except (SpecError, TypeError) as err:
        raise FormatError(f"{origin}: bad spec ({err})") from None
    except RecursionError:
        raise FormatError(f"{origin}: bad spec (nested too deeply)") from None
    except ValueError as err:  # JSON numbers of more digits than Python converts, bad UTF-8
        raise FormatError(f"{origin}: bad spec ({type(err).__name__}: {err})") from None
    raise FormatError(f"{origin}: the spec is a {type(value).__name__}, expected a dict or JSON text")


def _parse_recipe(value, origin: str) -> Recipe:
    """A recipe as a file holds it (a dict, or JSON text) -> :class:`Recipe`; FormatError naming ``origin``."""
    if isinstance(value, Recipe):
        return value
    try:
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        if isinstance(value, str):
            _refuse_duplicate_keys(value, origin, "recipe")
            return Recipe.from_json(value, source=origin)
        return Recipe.from_dict(value, source=origin)
    except FormatError:
        raise
    except RecipeError as err:  # its message starts with ``origin`` and names the key
        raise FormatError(str(err)) from None
    except (TypeError, UnicodeDecodeError) as err:  # e.g. class_names that is not a list
        raise FormatError(f"{origin}: bad recipe ({err})") from None
    except RecursionError:
        raise FormatError(f"{origin}: bad recipe (nested too deeply)") from None
    except ValueError as err:  # JSON numbers of more digits than Python converts
        raise FormatError(f"{origin}: bad recipe ({type(err).__name__}: {err})") from None


def _tensor_dict(value, where: str) -> dict[str, Stored]:
    if not isinstance(value, dict):
        raise FormatError(f"{where}: expected a dict of tensors, found {type(value).__name__}")
    out = {}
    for name, item in value.items():
        if isinstance(item, np.ndarray):
            item = Stored.from_numpy(item)
        if not isinstance(item, Stored):
            raise FormatError(f"{where}: entry '{name if isinstance(name, str) else _short(name)}' is "
                              f"{_describe(item)}, not a tensor")
        out[name if isinstance(name, str) else _short(name)] = item
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
            if key not in sets and key not in _DESCRIPTIVE_KEYS:
                contents.other[key if isinstance(key, str) else _short(key)] = _describe(value)
        if "step" in obj:
            if isinstance(obj["step"], bool) or not isinstance(obj["step"], int) or not -2**63 <= obj["step"] < 2**63:
                raise FormatError(f"{path}: 'step' is {_describe(obj['step'])}, expected a 64-bit integer")
            contents.step = int(obj["step"])
        if isinstance(obj.get("config"), dict):
            contents.config = dict(obj["config"])
    else:
        state = dict(obj)
        described = {key: state.pop(key, None) for key in ("spec", "recipe")}  # what a bare dict may say of itself
        contents = Contents(path, fmt, "bare", {"state": _tensor_dict(state, str(path))})
        obj = described
    if obj.get("spec") is not None:
        contents.spec, contents.spec_origin = _parse_spec(obj["spec"], f"{path} ['spec']"), "file"
    if obj.get("recipe") is not None:
        contents.recipe, contents.recipe_origin = _parse_recipe(obj["recipe"], f"{path} ['recipe']"), "file"
    return contents


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
        if tag in _DESCRIPTIVE_KEYS or tag.startswith(MS_PREFIXES) or tag in model:
            continue
        contents.other[tag] = _describe(value)
    if "spec" in entries:
        contents.spec, contents.spec_origin = _parse_spec(entries["spec"], f"{path} ['spec']"), "file"
    if "recipe" in entries:
        contents.recipe, contents.recipe_origin = _parse_recipe(entries["recipe"], f"{path} ['recipe']"), "file"
    step = entries.get("step")
    if isinstance(step, Stored) and step.array.size == 1 and step.dtype.startswith(("int", "uint")):
        contents.step = int(step.array.reshape(()))
    if isinstance(entries.get("config"), str):
        _refuse_duplicate_keys(entries["config"], f"{path} ['config']", "training config")
        try:
            config = json.loads(entries["config"])
            contents.config = config if isinstance(config, dict) else None
        except (ValueError, RecursionError):  # not JSON, nested too deeply, a number of too many digits
            contents.other["config"] = _describe(entries["config"])
    return contents


def _read_sidecar(contents: Contents) -> None:
    """Take the spec (and the recipe, if the file has none) from ``FILE.spec.json``."""
    side = sidecar_path(contents.path)
    try:
        text = side.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise FormatError(f"{side}: cannot read the spec ({err})") from None
    _refuse_duplicate_keys(text, str(side), "spec file")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        data = None  # _parse_spec below says what is wrong with it
    origin = f"sidecar {side.name}"
    if isinstance(data, dict) and "spec" in data:  # {"spec": {...}, "recipe": {...} or null}
        unknown = sorted(set(data) - {"spec", "recipe"})
        if unknown:
            raise FormatError(f"{side}: unknown keys {unknown}; a spec file holds 'spec' and 'recipe'")
        contents.spec, contents.spec_origin = _parse_spec(data["spec"], f"{side} ['spec']"), origin
        if data.get("recipe") is not None and contents.recipe is None:
            contents.recipe, contents.recipe_origin = _parse_recipe(data["recipe"], f"{side} ['recipe']"), origin
    else:  # the older layout: the spec object itself
        contents.spec, contents.spec_origin = _parse_spec(text, str(side)), origin


def read_contents(path, fmt: str | None = None) -> Contents:
    """Read any DiR checkpoint (see the package docstring); the spec comes from the file or its sidecar.

    The recipe comes from the file (or the sidecar of a bare state dict); a training
    checkpoint without one, written before recipes travelled, gets the recipe its
    training config describes (``recipe_origin == "config"``). A malformed recipe is a
    :class:`FormatError` naming the file and the key.
    """
    path = Path(path)
    fmt = detect_format(path, fmt, "src")
    _check_file(path)
    if fmt == "safetensors":
        tensors, metadata = read_safetensors(path)
        contents = Contents(path, fmt, "bare", {"state": tensors})
        if "spec" in metadata:
            contents.spec, contents.spec_origin = _parse_spec(metadata["spec"], f"{path} metadata"), "file"
        if "recipe" in metadata:
            contents.recipe = _parse_recipe(metadata["recipe"], f"{path} metadata 'recipe'")
            contents.recipe_origin = "file"
        if re.fullmatch(r"[0-9]{1,18}", metadata.get("step", "")):  # ASCII digits only ('²'.isdigit() is True)
            contents.step = int(metadata["step"])
        contents.other.update({f"metadata {k}": v for k, v in metadata.items() if k not in ("spec", "step", "recipe")})
    elif fmt == "mindspore":
        contents = _from_ms_entries(read_ms_checkpoint(path), path)
    elif fmt == "paddle":
        contents = _from_dict_checkpoint(load_pdparams(path), path, fmt)
    else:
        contents = _from_dict_checkpoint(load_torch(path), path, fmt)
    if contents.spec is None and sidecar_path(path).is_file():
        _read_sidecar(contents)
    # Older training checkpoints of this project hold no 'recipe', but their config always
    # named the DDPM schedule; a config without those keys is not guessed from.
    if contents.recipe is None and contents.layout == "training" and contents.config \
            and ("objective" in contents.config or "diffusion_steps" in contents.config):
        try:
            contents.recipe = recipe_from_config(contents.config)
        except (RecipeError, TypeError, ValueError) as err:
            raise FormatError(f"{path}: the checkpoint has no 'recipe' and its training config does not give "
                              f"one ({err})") from None
        contents.recipe_origin = "config"
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


def resolve_recipe_argument(value: str) -> Recipe:
    """``--recipe``: a JSON object of recipe keys, or a JSON file holding one."""
    if value.lstrip().startswith("{"):
        return _parse_recipe(value, "--recipe")
    path = Path(value)
    if path.is_file():
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise FormatError(f"--recipe {path}: cannot read it ({err})") from None
        return _parse_recipe(text, f"--recipe {path}")
    raise FormatError(f"--recipe '{value}' is neither a JSON object nor a file (expected e.g. "
                      '\'{"objective": "ddpm", "diffusion_steps": 1000, "noise_schedule": "linear"}\')')


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
    if spec.num_blocks > len(stored):  # every block has tensors: no need to list a table of millions
        raise FormatError(f"{where} does not match the DiR parameter table: the spec has {spec.num_blocks} blocks "
                          f"but the file holds only {len(stored)} tensors")
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
    """Any DiR checkpoint -> (canonical float32 numpy state, spec). What a backend's loader can call.

    (The recipe is in ``read_contents(path).recipe``.)
    """
    state, spec, _ = canonical_weights(read_contents(path, fmt), weights, spec)
    return state, spec


# ---- writing ------------------------------------------------------------------------------------

def write_checkpoint(path, fmt: str, state: dict[str, np.ndarray], spec: DiRSpec, *, dtype: str = "fp32",
                     step: int | None = None, config: dict | None = None, bare: bool = False,
                     provenance: dict[str, str] | None = None, recipe: Recipe | None = None) -> list[Path]:
    """Write canonical ``state`` as ``fmt`` (atomically: temp files, then renames). Returns the paths written.

    Default layout (what each backend's sample loads with no flags):

    * ``.pth``/``.pdparams``: ``{'model': sd, 'ema': sd (the same tensors), 'optimizer': None,
      'step', 'rng': None, 'config', 'spec': spec dict, 'recipe': recipe dict, 'converted': provenance}``;
    * ``.ckpt``: the parameters under MindSpore names, the same under ``ema.``, an Int64 ``step``
      and the string entries ``format`` (dir-mindspore-train), ``spec``, ``recipe``, ``config`` and
      ``rng`` (JSON; rng says there is no RNG state and where the weights came from);
    * ``.safetensors``: canonical tensors, spec, recipe (and step, provenance) in the metadata.

    ``bare``: ``.pth``/``.pdparams``/``.ckpt`` hold only the state dict, and the spec and recipe
    go beside it as ``FILE.spec.json`` (``{"spec": ..., "recipe": ...}``; without a recipe the
    file holds the spec object alone, as it did before recipes).

    ``recipe`` None writes none: the file then says nothing about how it was trained.
    """
    path = Path(path)
    try:
        check_state(state, spec, source="the converted weights")
    except ValueError as err:
        raise FormatError(str(err)) from None
    if dtype not in DTYPES:
        raise FormatError(f"unknown dtype '{dtype}'; allowed: {', '.join(DTYPES)}")
    if recipe is not None:
        recipe = _parse_recipe(recipe, "the recipe to write")
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
        if recipe is not None:
            metadata["recipe"] = recipe.to_json()
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
                   "format": MS_TRAIN_FORMAT, "step": step, "spec": spec.to_json()}
            if recipe is not None:
                obj["recipe"] = recipe.to_json()
            obj.update({"config": json.dumps(config, sort_keys=True, default=str),
                        "rng": json.dumps(rng, sort_keys=True)})
        writer = write_ms_checkpoint
    else:
        if bare:
            obj = dict(tensors)
        else:
            obj = {"model": tensors, "ema": tensors, "optimizer": None, "step": step, "rng": None,
                   "config": config, "spec": spec.to_dict()}
            if recipe is not None:
                obj["recipe"] = recipe.to_dict()
            if provenance:
                obj["converted"] = provenance
        writer = save_torch if fmt == "torch" else save_pdparams

    if bare:
        side = sidecar_path(path)
        described = spec.to_dict() if recipe is None else {"spec": spec.to_dict(), "recipe": recipe.to_dict()}
        with atomic_path(side) as side_tmp, atomic_path(path) as tmp:
            side_tmp.write_text(json.dumps(described, indent=1, sort_keys=True) + "\n")
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
