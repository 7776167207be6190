"""Training bookkeeping shared by every backend: schedules, run-folder layout, resume, logs.

Nothing here touches tensors; a backend's train.py calls these and does the math.
"""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import numpy as np

from common.checkpoint import CheckpointError, atomic_write
from common.config import ConfigError, spec_overrides
from common.data import model_input_size
from common.recipe import Recipe, RecipeError, recipe_from_config
from common.spec import DiRSpec, SpecError, build_spec

CHECKPOINT_PATTERN = re.compile(r"^(\d{7,})\.(pt|pdparams|ckpt)$")
# What every backend's training checkpoint holds (the converter reads 'model', 'ema', 'spec').
TRAIN_CHECKPOINT_KEYS = ("model", "ema", "optimizer", "step", "rng", "config", "spec")


class NonFiniteError(ValueError):
    """A training step produced a NaN or inf loss or gradient norm (the run stops cleanly)."""


class ProcessGroupError(RuntimeError):
    """A collective failed or timed out: another process of the run died or hangs."""


def process_group_failure(rank: int, run_dir, extension: str, err: BaseException) -> ProcessGroupError:
    """The one-line stop of a rank whose peers are gone, naming what to resume from."""
    newest = latest_checkpoint(run_dir, extension)
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ProcessGroupError(f"rank {rank}: a collective with the other processes failed ({first[:300]}); another "
                             f"process probably died. The newest complete checkpoint is {newest or 'none yet'}; "
                             "restart the run with resume: auto")


def model_spec(config: dict, source, source_name: str = "config") -> DiRSpec:
    """The spec a train config asks for: preset + overrides, sized to the data."""
    overrides = spec_overrides(config)
    if config.get("objective") == "flow":  # flow matching learns no variance: no second half of channels
        overrides.setdefault("learn_sigma", False)
    num_classes = overrides.setdefault("num_classes", source.num_classes or 1)  # captions: no classes
    if source.num_classes is not None and num_classes < source.num_classes:
        raise ConfigError(f"{source_name}: key 'num_classes' = {num_classes} but the data has "
                          f"{source.num_classes} classes")
    try:
        return build_spec(config["model"], input_size=model_input_size(config),
                          in_channels=source.in_channels, **overrides)
    except SpecError as err:
        raise ConfigError(f"{source_name}: {err}") from None


def check_train_checkpoint(checkpoint, path, spec: DiRSpec | None = None) -> DiRSpec:
    """Check a loaded training checkpoint's layout (and its spec against ``spec``); returns its spec."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: expected a dict with keys {', '.join(TRAIN_CHECKPOINT_KEYS)}, "
                              f"found {type(checkpoint).__name__}")
    missing = [key for key in TRAIN_CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: missing keys {missing}; a DiR training checkpoint holds "
                              f"{', '.join(TRAIN_CHECKPOINT_KEYS)}")
    try:
        saved = DiRSpec.from_dict(dict(checkpoint["spec"]), source=str(path))
    except (SpecError, TypeError) as err:
        raise CheckpointError(f"{path}: bad 'spec' ({err})") from None
    if spec is not None and saved != spec:
        diffs = {k: (v, getattr(spec, k)) for k, v in saved.to_dict().items() if getattr(spec, k) != v}
        raise CheckpointError(f"{path}: the checkpoint's model differs from the config's "
                              + ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diffs.items())
                              + "; use another run_dir (or resume: null) to train the new model from scratch")
    return saved


def checkpoint_recipe(checkpoint: dict, path) -> Recipe | None:
    """The recipe a training checkpoint was trained with: its 'recipe', or (older checkpoints)
    the one its config implies; None for a converted file without either."""
    try:
        recipe = checkpoint.get("recipe")
        if isinstance(recipe, str):  # .ckpt keeps it as JSON text
            return Recipe.from_json(recipe, source=f"{path} ['recipe']")
        if recipe:
            return Recipe.from_dict(dict(recipe), source=f"{path} ['recipe']")
        config = checkpoint.get("config")
        if config and ("objective" in config or "diffusion_steps" in config):
            return recipe_from_config(dict(config))
    except (RecipeError, TypeError) as err:
        raise CheckpointError(f"{path}: bad recipe ({err})") from None
    return None


# ---- schedules -------------------------------------------------------------------------------

def learning_rate(step: int, config: dict) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then constant or cosine."""
    peak, warmup, total = config["lr"], config["warmup_steps"], config["max_steps"]
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if config["lr_schedule"] == "constant":
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return config["min_lr"] + 0.5 * (peak - config["min_lr"]) * (1.0 + math.cos(math.pi * progress))


def ema_decay(step: int, config: dict) -> float:
    """EMA decay for the update after optimizer step ``step`` (0-based).

    With ``ema_warmup`` the decay ramps as (1+step)/(10+step) so a short run's EMA
    follows the model early on instead of averaging in the random init.
    """
    decay = config["ema_decay"]
    if config["ema_warmup"]:
        decay = min(decay, (1.0 + step) / (10.0 + step))
    return decay


# ---- run folder ------------------------------------------------------------------------------

class RunLayout:
    """Where a run writes: ``run_dir/{config.yaml, log.jsonl, tensorboard/, checkpoints/, samples/}``."""

    def __init__(self, run_dir: str | Path, extension: str = "pt"):
        self.root = Path(run_dir)
        self.extension = extension

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def log(self) -> Path:
        return self.root / "log.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def loss_curve(self) -> Path:
        return self.root / "loss.png"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"{step:07d}.{self.extension}"

    def grid(self, step: int) -> Path:
        return self.samples / f"{step:07d}.png"


def list_checkpoints(folder: str | Path, extension: str | None = None) -> list[tuple[int, Path]]:
    """(step, path) of every finished checkpoint in ``folder``, oldest first.

    Temp files of an interrupted write (``.0001000.pt.xxxx.tmp``) never match.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and (extension is None or match.group(2) == extension) and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def retained_steps(steps: list[int], keep_last: int, keep_every: int) -> set[int]:
    """Which checkpoint steps survive rotation: the newest ``keep_last`` (all when 0) and every
    multiple of ``keep_every`` (the milestones)."""
    steps = sorted(steps)
    keep = set(steps if keep_last <= 0 else steps[-keep_last:])
    if keep_every > 0:
        keep |= {step for step in steps if step % keep_every == 0}
    return keep


def prune_checkpoints(layout: RunLayout, keep_last: int, keep_every: int) -> list[Path]:
    """Delete the checkpoints rotation does not keep; call it only after the newest one is durable."""
    if keep_last <= 0:
        return []
    found = list_checkpoints(layout.checkpoints, layout.extension)
    keep = retained_steps([step for step, _ in found], keep_last, keep_every)
    deleted = []
    for step, path in found:
        if step not in keep:
            path.unlink()
            deleted.append(path)
    if deleted:
        from common.atomic import fsync_folder

        fsync_folder(layout.checkpoints)
    return deleted


def nonfinite_entries(tree, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a (nested) checkpoint dict holding NaN or inf.

    Tensors are numpy arrays or anything with a numpy view (``.detach().cpu().numpy()``
    for torch, ``.numpy()`` / ``.asnumpy()`` for Paddle and MindSpore).
    """
    found = []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, (dict, list, tuple)):
            found += nonfinite_entries(value, name + ".")
            continue
        array = value
        if hasattr(array, "detach"):
            array = array.detach().float().cpu().numpy()
        elif hasattr(array, "asnumpy"):
            array = array.asnumpy()
        elif hasattr(array, "numpy") and not isinstance(array, np.ndarray):
            array = array.numpy()
        if isinstance(array, np.ndarray) and array.dtype.kind == "f" and not np.isfinite(array).all():
            found.append(name)
    return found


def latest_checkpoint(run_dir: str | Path, extension: str | None = None) -> Path | None:
    found = list_checkpoints(RunLayout(run_dir).checkpoints, extension)
    return found[-1][1] if found else None


def resolve_resume(resume: str | None, run_dir: str | Path, extension: str) -> Path | None:
    """The checkpoint ``--resume`` points at: None, ``auto`` (latest in run_dir, if any) or a path."""
    if resume is None or resume == "":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir, extension)
    path = Path(resume)
    if path.is_dir():
        return find_checkpoint(path, (extension,))
    if not path.is_file():
        raise CheckpointError(f"resume: checkpoint '{path}' not found")
    return path


def find_checkpoint(path: str | Path, extensions: tuple[str, ...]) -> Path:
    """A checkpoint file from a file path or a run folder (its latest checkpoint)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for folder in (RunLayout(path).checkpoints, path):
            found = [item for item in list_checkpoints(folder) if item[1].suffix.lstrip(".") in extensions]
            if found:
                return found[-1][1]
        raise CheckpointError(f"'{path}' is a folder without checkpoints (*.{' / *.'.join(extensions)}) "
                              f"in it or in its checkpoints/ folder")
    raise CheckpointError(f"checkpoint '{path}' not found")


# ---- logging ----------------------------------------------------------------------------------

class TensorBoardScalars:
    """Scalar logging straight through the ``tensorboard`` package (no framework needed)."""

    def __init__(self, logdir: Path):
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event, self._summary = Event, Summary
        logdir.mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(logdir))

    def add(self, step: int, values: dict) -> None:
        summary = self._summary(value=[self._summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])
        self._writer.add_event(self._event(wall_time=time.time(), step=step, summary=summary))

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


def json_line(record: dict) -> str:
    """One strict-JSON line: a NaN or inf value becomes null and its key is listed under 'nonfinite'
    (json.dumps would write the bare tokens NaN / Infinity, which JSON readers reject)."""
    bad = [key for key, value in record.items() if isinstance(value, float) and not math.isfinite(value)]
    if bad:
        record = {**{k: (None if k in bad else v) for k, v in record.items()}, "nonfinite": bad}
    return json.dumps(record, allow_nan=False, default=str)


class RunLogger:
    """JSONL log (one object per line) plus TensorBoard scalars when tensorboard is installed.

    Only rank 0 should build one. A resumed run appends to the same log.
    """

    def __init__(self, layout: RunLayout, use_tensorboard: bool = True):
        layout.root.mkdir(parents=True, exist_ok=True)
        self.path = layout.log
        self._file = open(self.path, "a", buffering=1)
        self.tensorboard = None
        if use_tensorboard:
            try:
                self.tensorboard = TensorBoardScalars(layout.tensorboard)
            except ImportError:
                self.tensorboard = None

    def event(self, kind: str, **fields) -> None:
        """A non-metric record (run start, resume, checkpoint written, warnings)."""
        self._file.write(json_line({"event": kind, "time": round(time.time(), 3), **fields}) + "\n")

    def metrics(self, step: int, values: dict) -> None:
        self._file.write(json_line({"step": step, **values}) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.add(step, {k: v for k, v in values.items() if isinstance(v, (int, float))})

    def close(self) -> None:
        self._file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(log_path: str | Path) -> list[dict]:
    """Metric rows (those with a 'step') of a JSONL log, last value per step (resume overlaps)."""
    rows: dict[int, dict] = {}
    path = Path(log_path)
    if not path.is_file():
        return []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if "step" in row and isinstance(row.get("loss"), (int, float)):
            rows[row["step"]] = row
    return [rows[k] for k in sorted(rows)]


def plot_loss_curve(log_path: str | Path, png_path: str | Path) -> bool:
    """Loss (and its running mean) against step as a PNG; False when there is nothing to plot."""
    rows = read_metrics(log_path)
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in rows]
    losses = [row["loss"] for row in rows]
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    axis.plot(steps, losses, lw=1, label="loss (mean over log interval)")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    atomic_write(png_path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)
    return True


class Throughput:
    """Images per second over the current log interval."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.images = time.perf_counter(), 0

    def add(self, images: int) -> None:
        self.images += images

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.images / elapsed if elapsed > 0 else 0.0


def describe_batch(config: dict, world_size: int, micro_batch: int) -> str:
    """The log line that states the per-process and global batch."""
    per_process = micro_batch * config["grad_accum_steps"]
    return (f"world_size={world_size} micro_batch_per_process={micro_batch} grad_accum_steps={config['grad_accum_steps']} "
            f"batch_per_process={per_process} global_batch={per_process * world_size}")


def grid_classes(num_classes: int, per_class: int, max_classes: int = 10) -> list[int]:
    """Labels for the training sample grid: the first classes, ``per_class`` each, row-major."""
    classes = list(range(min(num_classes, max_classes)))
    return [c for c in classes for _ in range(per_class)]
