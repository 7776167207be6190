"""How each reader is run on a (mutated) file, and how its outcome is judged.

``run(target, variant, touched)`` runs in the forked child and returns an outcome dict:
``{"status": "accepted" | "rejected" | "failure", "message": ...}``. An exception escaping
it is a failure (a traceback). What each reader must do:

* checkpoints (``pth``, ``pdparams``, ``ckpt``, ``safetensors``): ``tools/convert_ckpt.py
  inspect FILE`` exits 0, or 2 with one line starting ``convert_ckpt: error:`` (never the
  catch-all ``unexpected``: the child runs with ``CONVERT_CKPT_DEBUG=1`` so a bug keeps its
  traceback). When it exits 0, ``read_contents`` + ``canonical_weights`` either refuse with
  a :class:`CheckpointError` (inspect's check line reports the mismatch; counted as rejected)
  or give float32 tensors of the parameter table's shapes whose values equal the valid
  file's wherever the mutation did not touch them (a tensor counts as touched when a changed
  byte lies in its stored data, or when the mutation changed the file's structure: bytes
  outside every tensor's data, or the length);
* ``yaml``: ``parse_cli(["-c", FILE], TRAIN_SCHEMA)`` + ``check_train_config`` under
  ``common.cli.run_cli``: a dict of exactly the schema's keys whose values pass the schema
  again (finite floats, 64-bit ints), or exit 2 with one ``error:`` line;
* ``samples``: ``tools/eval_digits.py FILE`` exits 0 (and ``load_samples`` gives uint8
  [N, H, W, C] images with N int64 labels) or 2 with one ``error:`` line;
* ``image`` / ``latent``: ``source[(0, False)]`` gives float32 [3, S, S] in [-1, 1]
  (images) or finite float32 [4, s, s] and a label in range (latents); or ``read`` raises
  an exception (not MemoryError) and ``source[(0, False)]`` skips it with a warning naming
  the file and then refuses (one file only) with :class:`DataError`.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from tests.fuzz import seeds


def accepted(message: str = "", **extra) -> dict:
    return {"status": "accepted", "message": message, **extra}


def rejected(message: str, **extra) -> dict:
    return {"status": "rejected", "message": message, **extra}


def failure(message: str, **extra) -> dict:
    return {"status": "failure", "message": message, **extra}


def _one_line_error(text: str, prefix: str) -> str | None:
    """Why ``text`` (a command's stderr) is not one ``prefix`` line, or None."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        return f"expected one line on stderr, got {len(lines)}: {text[-2000:]!r}"
    if not lines[0].startswith(prefix):
        return f"stderr does not start with {prefix!r}: {lines[0][:2000]!r}"
    if "Traceback" in text:
        return f"a traceback on stderr: {text[-2000:]!r}"
    return None


# ---- checkpoints -----------------------------------------------------------------------------------

def _touched_names(variant, touched) -> set[str] | None:
    """Canonical names whose values the mutation may have changed (None: all of them)."""
    if touched is None:
        return None
    spans = variant.info["spans"]
    names = set()
    for begin, end in touched:
        hit = False
        for name, ranges in spans.items():
            if any(begin < b_end and b_begin < end for b_begin, b_end in ranges):
                names.add(name)
                hit = True
        if not hit:  # a byte outside every tensor's data: structure or metadata changed
            return None
    return names


def run_checkpoint(path: Path, variant, touched) -> dict:
    from common.checkpoint import CheckpointError
    from common.formats import canonical_weights, read_contents
    from common.params import parameter_table
    from tools import convert_ckpt

    os.environ["CONVERT_CKPT_DEBUG"] = "1"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = convert_ckpt.main(["inspect", str(path)])
    if code == 2:
        why = _one_line_error(err.getvalue(), "convert_ckpt: error: ")
        return failure(why) if why else rejected(err.getvalue().strip())
    if code != 0:
        return failure(f"inspect exited {code}: {err.getvalue()[-2000:]}")
    try:
        contents = read_contents(path)
        state, spec, _ = canonical_weights(contents)
    except CheckpointError as error:
        return rejected("inspect check: " + " ".join(str(error).split())[:500])
    table = {info.name: info.shape for info in parameter_table(spec)}
    if set(state) != set(table):
        return failure(f"canonical_weights gave names that are not the table's: {sorted(set(state) ^ set(table))[:5]}")
    original = variant.info["state"]
    may_change = _touched_names(variant, touched)
    changed, nonfinite = [], []
    for name, value in state.items():
        if not isinstance(value, np.ndarray) or value.dtype != np.float32 or tuple(value.shape) != tuple(table[name]):
            return failure(f"tensor {name}: {type(value).__name__} {getattr(value, 'dtype', '?')} "
                           f"{getattr(value, 'shape', '?')}, expected float32 {table[name]}")
        same = name in original and original[name].shape == value.shape and np.array_equal(
            original[name].view(np.uint32), value.view(np.uint32))
        if same:
            continue
        changed.append(name)
        if not np.isfinite(value).all():
            nonfinite.append(name)
        if may_change is not None and name not in may_change:
            return failure(f"tensor {name} changed although the mutation touched only the data of "
                           f"{sorted(may_change)[:3]}")
    return accepted(f"{len(changed)} tensors changed", changed=len(changed), nonfinite=len(nonfinite))


# ---- configs ---------------------------------------------------------------------------------------

def run_yaml(path: Path, variant, touched) -> dict:
    from common.cli import run_cli
    from common.config import TRAIN_SCHEMA, check_mapping, check_train_config, parse_cli

    holder = {}

    def main():
        config, source = parse_cli(["-c", str(path)], TRAIN_SCHEMA, "fuzz")
        check_train_config(config, source)
        holder["config"] = config

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            run_cli(main)
    except SystemExit as stop:
        if stop.code != 2:
            return failure(f"exit code {stop.code}: {err.getvalue()[-2000:]}")
        why = _one_line_error(err.getvalue(), "error: ")
        return failure(why) if why else rejected(err.getvalue().strip())
    config = holder["config"]
    if not isinstance(config, dict) or set(config) != set(TRAIN_SCHEMA):
        return failure(f"the config's keys are not the schema's: {sorted(set(config) ^ set(TRAIN_SCHEMA))[:5]}")
    check_mapping(config, TRAIN_SCHEMA, "recheck")  # raises (a failure) if a value does not pass again
    for key, value in config.items():
        if isinstance(value, float) and not math.isfinite(value):
            return failure(f"key '{key}' = {value!r} accepted (not a finite number)")
        if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
            return failure(f"key '{key}' = an integer of {value.bit_length()} bits accepted")
    return accepted()


# ---- samples ---------------------------------------------------------------------------------------

def run_samples(path: Path, variant, touched) -> dict:
    from common.sampling import load_samples
    from tools import eval_digits

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = eval_digits.main([str(path)])
    if code == 2:
        why = _one_line_error(err.getvalue(), "error: ")
        return failure(why) if why else rejected(err.getvalue().strip())
    if code != 0:
        return failure(f"eval_digits exited {code}: {err.getvalue()[-2000:]}")
    images, labels = load_samples(path)
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4):
        return failure(f"images are {getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}")
    if not (isinstance(labels, np.ndarray) and labels.dtype == np.int64 and labels.shape == (len(images),)):
        return failure(f"labels are {labels.dtype} {labels.shape} for {len(images)} images")
    same = images.shape == variant.info["images"].shape and np.array_equal(images, variant.info["images"])
    return accepted("same images" if same else f"images {images.shape}")


# ---- data files ------------------------------------------------------------------------------------

def _read_item(source, path: Path) -> tuple[dict | None, tuple | None]:
    """(an outcome if the read was refused or went wrong, else None; the item read)."""
    from common.data import DataError, UnreadableItemWarning

    read_error = None
    try:
        source.read(0)
    except MemoryError as error:
        return failure(f"MemoryError in read(): {error}"), None
    except Exception as error:  # noqa: BLE001 - what _read_with_skips catches
        read_error = error
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            item = source[(0, False)]
        except DataError as error:
            if read_error is None:
                return failure(f"read() succeeded but source[(0, False)] refused: {error}"), None
            skips = [w for w in caught if issubclass(w.category, UnreadableItemWarning)]
            if not skips or str(path) not in str(skips[0].message):
                return failure(f"no skip warning naming {path}: {[str(w.message) for w in caught]}"), None
            return rejected(f"{type(read_error).__name__}: {' '.join(str(read_error).split())[:300]}"), None
    if read_error is not None:
        return failure(f"read() raised {read_error!r} but source[(0, False)] succeeded"), None
    return None, item


def run_image(target, variant, touched) -> dict:
    from common.data import ImageFolderSource

    root, path = target
    source = ImageFolderSource(root, seeds.IMAGE_SIZE)
    outcome, item = _read_item(source, path)
    if outcome:
        return outcome
    x, label, skipped = item
    s = seeds.IMAGE_SIZE
    if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.shape == (3, s, s)):
        return failure(f"image read as {getattr(x, 'dtype', type(x))} {getattr(x, 'shape', '')}, expected float32 "
                       f"[3, {s}, {s}]")
    if not (np.isfinite(x).all() and x.min() >= -1.0 and x.max() <= 1.0):
        return failure(f"image values outside [-1, 1]: {x.min()}..{x.max()}")
    if label != 0 or skipped != 0:
        return failure(f"label {label}, skipped {skipped}")
    return accepted()


def run_latent(target, variant, touched) -> dict:
    from common.data import LatentSource

    root, path = target
    source = LatentSource(root, seeds.LATENT_SIZE, num_classes=seeds.LATENT_CLASSES)
    outcome, item = _read_item(source, path)
    if outcome:
        return outcome
    x, label, skipped = item
    s = seeds.LATENT_SIZE
    if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.shape == (4, s, s)):
        return failure(f"latent read as {getattr(x, 'dtype', type(x))} {getattr(x, 'shape', '')}")
    if not np.isfinite(x).all():
        return failure("latent with non-finite values accepted")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < seeds.LATENT_CLASSES:
        return failure(f"label {label!r} accepted (num_classes {seeds.LATENT_CLASSES})")
    return accepted()


# ---- the readers -----------------------------------------------------------------------------------

@dataclass
class Reader:
    name: str
    seed_kind: str  # seeds.build_all(kind)
    run: Callable
    can_accept: bool = True


READERS = {
    "pth": Reader("pth", "torch", run_checkpoint),
    "pdparams": Reader("pdparams", "paddle", run_checkpoint),
    "ckpt": Reader("ckpt", "mindspore", run_checkpoint),
    "safetensors": Reader("safetensors", "safetensors", run_checkpoint),
    "yaml": Reader("yaml", "yaml", run_yaml),
    "samples": Reader("samples", "samples", run_samples),
    "image": Reader("image", "image", run_image),
    "latent": Reader("latent", "latent", run_latent),
}


def place(reader: str, workdir: Path, variant, data: bytes, label: bytes | None = None):
    """Write the mutated file where the reader looks for it; returns the reader's target."""
    workdir.mkdir(parents=True, exist_ok=True)
    if reader == "image":
        folder = workdir / "images" / "class_a"
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
        path = folder / f"0.{variant.suffix}"
        path.write_bytes(data)
        return workdir / "images", path
    if reader == "latent":
        features, labels = workdir / "latents" / "fuzz_features", workdir / "latents" / "fuzz_labels"
        features.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        (features / "0.npy").write_bytes(data)
        (labels / "0.npy").write_bytes(variant.info["label"] if label is None else label)
        return workdir / "latents", features / "0.npy"
    path = workdir / f"case.{variant.suffix}"
    path.write_bytes(data)
    return path


def prepare(reader: str) -> None:
    """Import and warm everything a reader needs, in the parent, before any child is forked."""
    import PIL.Image
    import yaml  # noqa: F401

    import common.cli  # noqa: F401
    import common.config  # noqa: F401
    import common.data  # noqa: F401
    import common.formats
    import tools.convert_ckpt  # noqa: F401

    PIL.Image.init()
    if reader == "ckpt":
        common.formats.checkpoint_message_class()
    if reader == "pth":
        import torch

        torch.set_num_threads(1)
    if reader == "samples":
        from tools import eval_digits

        eval_digits.judge_for(seeds.IMAGE_SIZE, 0)
