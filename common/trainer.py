"""The training loop, once for every backend: ``run_training(config, backend)``.

Everything that is not tensor work happens here: config checks, data, the model spec
and the recipe, the run folder, resume, the step loop with its learning-rate and EMA
schedules, every random draw of a step (``common.objectives.step_draws``), logging
(JSONL, TensorBoard, progress bar), checkpoint cadence and the sample grids. A backend's
``train.py`` supplies a small adapter, a subclass of :class:`TrainBackend`, that does
the framework's part: processes and devices, the model/EMA/optimizer, one optimizer
step, the EMA update, checkpoint files in its own format, and sampling a grid. The
adapter holds no objective-specific code: the objective comes from
``backends.<fw>.objectives.build_objective(recipe)``.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from tqdm.auto import tqdm

from common.checkpoint import CheckpointError
from common.config import batch_layout, check_train_config, save_resolved
from common.data import DataError, StepSampler, UnreadableItemWarning, build_source
from common.images import save_grid
from common.objectives import SamplerSettings, grid_settings, step_draws
from common.recipe import Recipe, RecipeError, recipe_from_config
from common.spec import DiRSpec
from common.training import (
    NonFiniteError, RunLayout, RunLogger, Throughput, check_train_checkpoint, checkpoint_recipe, describe_batch,
    ema_decay, grid_classes, latest_checkpoint, learning_rate, list_checkpoints, model_spec, nonfinite_entries,
    plot_loss_curve, prune_checkpoints, resolve_resume,
)


class TrainBackend:
    """What a framework supplies to :func:`run_training` (each backend's ``train.py`` subclasses it).

    Attributes set by :meth:`setup`: ``rank``, ``world_size``, ``device`` (a label for the log).
    """

    framework = "?"
    extension = "?"  # checkpoint suffix: pt | pdparams | ckpt

    rank, world_size, device = 0, 1, "cpu"

    def setup(self, config: dict) -> None:
        """Start the process group (under a launcher), pick the device, set rank and world_size."""
        raise NotImplementedError

    def build(self, spec: DiRSpec, recipe: Recipe, config: dict) -> int:
        """Model (seeded canonical init), EMA copy, optimizer and objective; returns the parameter count."""
        raise NotImplementedError

    def read_checkpoint(self, path) -> dict:
        """A training checkpoint of this backend as a dict with ``common.training.TRAIN_CHECKPOINT_KEYS``."""
        raise NotImplementedError

    def restore(self, checkpoint: dict, path) -> None:
        """Load model, EMA and optimizer state from what :meth:`read_checkpoint` returned."""
        raise NotImplementedError

    def distribute(self) -> None:
        """Wrap the model for data parallelism (after a resume loaded the weights). No-op by default."""

    def loader(self, source, step_sampler, start_step: int, num_workers: int):
        """Endless iterator of micro-batches ``(x, y, skipped)`` in the framework's types."""
        raise NotImplementedError

    def set_learning_rate(self, lr: float) -> None:
        raise NotImplementedError

    def train_step(self, micro_batches: list, draws: list) -> dict[str, float]:
        """Accumulate gradients over the micro-batches (each with its ``StepDraws``) and clip them;
        the update is applied by :meth:`apply_update` (or dropped by :meth:`discard_update`).

        Returns this process's means of every loss term, ``grad_norm`` (of the gradients averaged
        over processes, before clipping) and ``skipped`` (a count of unreadable items).
        """
        raise NotImplementedError

    def apply_update(self) -> None:
        """Take the optimizer step with the gradients of the last :meth:`train_step`."""
        raise NotImplementedError

    def discard_update(self) -> None:
        """Drop the gradients of the last :meth:`train_step` (a non-finite step being skipped)."""
        raise NotImplementedError

    def nonfinite_tensors(self) -> list[str]:
        """Names of model or EMA parameters holding NaN or inf (none may reach a checkpoint)."""
        raise NotImplementedError

    def update_ema(self, decay: float) -> None:
        raise NotImplementedError

    def save_checkpoint(self, path, step: int, metadata: dict) -> None:
        """Every rank calls; rank 0 writes model, EMA, optimizer and ``metadata`` atomically."""
        raise NotImplementedError

    def sample_grid(self, labels: np.ndarray, settings: SamplerSettings, seed: int) -> np.ndarray:
        """Samples of the EMA weights for ``labels`` as float [N, C, H, W] in [-1, 1] (decoded when latent)."""
        raise NotImplementedError

    def all_reduce_sum(self, values: dict[str, float]) -> dict[str, float]:
        return values

    def finish(self) -> None:
        """Last barrier and process-group teardown."""


def grid_conditions(spec: DiRSpec, config: dict, source) -> np.ndarray:
    """The training grid's conditions: the first classes, ``sample_per_class`` each; or for
    captions the grid prompts as token ids, ``sample_per_class`` each."""
    if spec.condition == "text":
        from common.captions import grid_prompts

        prompts = grid_prompts(config, source, config["sample_per_class"])
        ids, _ = source.tokenizer.encode_batch(prompts, spec.text_max_tokens, fixed_length=True)
        return ids
    return np.asarray(grid_classes(spec.num_classes, config["sample_per_class"]), dtype=np.int64)


def wants_grid(step: int, config: dict, last: bool) -> bool:
    if config["sample_every"] < 0 or (config["dataset"] == "latents" and not config["vae_path"]):
        return False
    return last or (config["sample_every"] > 0 and step % config["sample_every"] == 0)


def interval_means(interval: list[dict[str, float]], world_size: int) -> dict[str, float]:
    """Per-key means over a log interval (divided by world_size: summed across processes next)."""
    keys = [key for key in interval[0] if key != "skipped"]
    means = {key: sum(v[key] for v in interval) / (len(interval) * world_size) for key in keys}
    means["skipped"] = float(sum(v["skipped"] for v in interval))
    return means


def nonfinite_terms(values: dict[str, float]) -> list[str]:
    return [key for key, value in values.items() if key != "skipped" and not math.isfinite(value)]


def resume_checkpoint(config: dict, layout: RunLayout, backend: TrainBackend, spec: DiRSpec, logger_events: list):
    """(path, checkpoint dict) to resume from, or (None, None).

    ``resume: auto`` takes the newest checkpoint whose weights are finite, saying which
    ones it passed over; a checkpoint named explicitly must be finite.
    """
    if config["resume"] == "auto":
        candidates = [path for _, path in reversed(list_checkpoints(layout.checkpoints, backend.extension))]
    else:
        path = resolve_resume(config["resume"], layout.root, backend.extension)
        candidates = [] if path is None else [path]
    for path in candidates:
        checkpoint = backend.read_checkpoint(path)
        check_train_checkpoint(checkpoint, path, spec)
        bad = nonfinite_entries({key: checkpoint[key] for key in ("model", "ema") if isinstance(checkpoint.get(key), dict)})
        if not bad:
            return path, checkpoint
        message = (f"{path} holds non-finite tensors ({', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}); "
                   "not resuming from it")
        if config["resume"] != "auto":
            raise CheckpointError(message)
        tqdm.write(f"warning: {message}; trying the one before")
        logger_events.append(("resume_skipped", {"path": str(path), "nonfinite": bad[:20]}))
    return None, None


def save_checkpoint(backend: TrainBackend, layout: RunLayout, step: int, metadata: dict, config: dict) -> None:
    """Write the step's checkpoint (never one with non-finite weights), then rotate the old ones.

    A failed write (disk full, no permission) stops the run and leaves the previous checkpoint
    as it was: the new one goes to a temp file that is renamed only when complete.
    """
    bad = backend.nonfinite_tensors()
    if bad:
        raise NonFiniteError(f"step {step}: the weights hold NaN or inf ({', '.join(bad[:4])}"
                             f"{' ...' if len(bad) > 4 else ''}); no checkpoint was written")
    path = layout.checkpoint(step)
    previous = latest_checkpoint(layout.root, backend.extension)
    try:
        backend.save_checkpoint(path, step, metadata)
    except OSError as err:
        raise CheckpointError(f"step {step}: writing {path} failed ({err.strerror or err}); nothing was written "
                              f"there, and the newest intact checkpoint is {previous or 'none'}") from None
    if backend.rank == 0:
        prune_checkpoints(layout, config["keep_last"], config["keep_every"])


def check_trainable(source, config: dict) -> None:
    """Stop before the first step when the data cannot fill a step (the path and what was found)."""
    where = config.get("data_path") or config["dataset"]
    samples = getattr(source, "samples", None)
    if config["dataset"] == "imagefolder" and samples is not None:
        counts = np.bincount([label for _, label in samples], minlength=source.num_classes)
        empty = [source.class_names[i] for i in np.flatnonzero(counts == 0)]
        if empty:
            raise DataError(f"imagefolder: class folders without images under '{where}': {', '.join(empty[:10])}"
                            f"{' ...' if len(empty) > 10 else ''}; remove them or add images (labels follow the "
                            "sorted folder names)")
    if len(source) < config["global_batch_size"]:
        raise DataError(f"{where}: {len(source)} items, fewer than one global batch ({config['global_batch_size']}); "
                        "lower global_batch_size or add data")
    source[(0, False)]  # the first readable item, or a DataError naming the files that are not


def run_training(config: dict, backend: TrainBackend, source_name: str = "config") -> dict:
    """Run one training job; returns ``{'step', 'loss', 'checkpoint', 'recipe'}`` of the end state."""
    check_train_config(config, source_name)
    backend.setup(config)
    rank, world_size = backend.rank, backend.world_size
    micro_batch = batch_layout(config["global_batch_size"], world_size, config["grad_accum_steps"], source_name)

    source = build_source(config)
    check_trainable(source, config)
    spec = model_spec(config, source, source_name)
    try:
        recipe = recipe_from_config(config, source.class_names)
    except RecipeError as err:
        raise RecipeError(f"{source_name}: {err}") from None
    num_parameters = backend.build(spec, recipe, config)
    layout = RunLayout(config["run_dir"], backend.extension)

    start_step, events = 0, []
    resume_path, checkpoint = resume_checkpoint(config, layout, backend, spec, events)
    if resume_path is not None:
        saved = checkpoint_recipe(checkpoint, resume_path)
        if saved is not None and saved.to_dict() != recipe.to_dict():
            raise CheckpointError(f"{resume_path}: the checkpoint was trained with recipe {saved.to_json()}, the "
                                  f"config asks for {recipe.to_json()}; use another run_dir to train anew")
        backend.restore(checkpoint, resume_path)
        start_step = int(checkpoint["step"])
    backend.distribute()

    step_sampler = StepSampler(len(source), config["global_batch_size"], world_size, rank,
                               config["grad_accum_steps"], config["seed"], config["random_flip"])
    batches = iter(backend.loader(source, step_sampler, start_step, config["num_workers"]))
    batch_shape = (micro_batch, spec.in_channels, spec.input_size, spec.input_size)

    logger = RunLogger(layout) if rank == 0 else None
    if rank == 0:
        save_resolved(config, layout.config)
        for kind, fields in events:
            logger.event(kind, **fields)
        logger.event("start", step=start_step, resumed_from=str(resume_path) if resume_path else None,
                     spec=spec.to_dict(), recipe=recipe.to_dict(), framework=backend.framework,
                     data=f"{config['dataset']}: {len(source)} items, "
                          + (f"{source.num_classes} classes" if spec.condition == "class" else "captioned"),
                     batch=describe_batch(config, world_size, micro_batch), parameters=num_parameters)
        tqdm.write(f"DiR {config['model']} | {num_parameters:,} parameters | {recipe.objective} | "
                   f"{config['dataset']} ({len(source)} items) | {describe_batch(config, world_size, micro_batch)} | "
                   f"{backend.framework} on {backend.device}"
                   + (f" | resumed from {resume_path} at step {start_step}" if resume_path else ""))

    grid = grid_settings(config, recipe)
    metadata = {"config": dict(config), "spec": spec.to_dict(), "recipe": recipe.to_dict(),
                "rng": {"kind": "per-step", "seed": config["seed"], "world_size": world_size,
                        "note": "every draw of (rank, step, micro) comes from numpy.random.default_rng("
                                "[seed, world_size, rank, step, micro]) (common.objectives.step_draws)"}}
    meter, interval, skipped_total, nonfinite_skips = Throughput(), [], 0, 0
    progress = tqdm(total=config["max_steps"], initial=start_step, disable=rank != 0, desc="train", dynamic_ncols=True)
    step, values = start_step, {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", UnreadableItemWarning)
            while step < config["max_steps"]:
                backend.set_learning_rate(learning_rate(step, config))
                micro_batches = [next(batches) for _ in range(config["grad_accum_steps"])]
                draws = [step_draws(recipe, spec.class_dropout_prob, batch_shape, config["seed"], world_size, rank, step, j)
                         for j in range(config["grad_accum_steps"])]
                values = backend.train_step(micro_batches, draws)
                bad = nonfinite_terms(values)
                if world_size > 1 and backend.all_reduce_sum({"bad": float(bool(bad))})["bad"] > 0 and not bad:
                    bad = ["loss on another rank"]  # every rank takes the same decision
                if bad:
                    backend.discard_update()
                    nonfinite_skips += 1
                    what = ", ".join(f"{key} = {values.get(key, float('nan'))}" for key in bad)
                    if rank == 0:
                        logger.event("nonfinite", step=step + 1, terms=bad, action=config["on_nonfinite"])
                    if config["on_nonfinite"] == "stop" or nonfinite_skips > config["max_nonfinite_skips"]:
                        newest = latest_checkpoint(layout.root, backend.extension)
                        reason = ("on_nonfinite: stop" if config["on_nonfinite"] == "stop" else
                                  f"{nonfinite_skips} skipped updates, more than max_nonfinite_skips "
                                  f"({config['max_nonfinite_skips']})")
                        if rank == 0:
                            logger.close()
                        raise NonFiniteError(
                            f"step {step + 1}: non-finite {what}; the run stops ({reason}) and the update was not applied. "
                            f"The newest checkpoint ({newest or 'none yet'}) holds finite weights. Lower lr, set "
                            "grad_clip, or set on_nonfinite: skip to pass over rare bad batches")
                    tqdm.write(f"warning: step {step + 1}: non-finite {what}; update skipped "
                               f"({nonfinite_skips} of at most {config['max_nonfinite_skips']})")
                else:
                    backend.apply_update()
                    backend.update_ema(ema_decay(step, config))
                step += 1
                meter.add(micro_batch * config["grad_accum_steps"] * world_size)
                interval.append(values)
                last = step == config["max_steps"]
                if step % config["log_every"] == 0 or last:
                    means = backend.all_reduce_sum(interval_means(interval, world_size))
                    skipped_total += int(means.pop("skipped"))
                    if rank == 0:
                        extra = {}
                        if spec.condition == "text":  # counted where items are read: here only without workers
                            extra["cut_captions"] = source.cut_captions if config["num_workers"] == 0 else None
                        logger.metrics(step, {**means, "lr": learning_rate(step - 1, config), "images_per_s": meter.rate(),
                                              "skipped_images": skipped_total, "skipped_updates": nonfinite_skips,
                                              **extra})
                        progress.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{meter.rate():.0f}")
                    meter.reset()
                    interval = []
                progress.update(1)
                if step % config["ckpt_every"] == 0 or last:
                    save_checkpoint(backend, layout, step, metadata, config)
                    if rank == 0:
                        logger.event("checkpoint", step=step, path=str(layout.checkpoint(step)))
                if rank == 0 and wants_grid(step, config, last):
                    conds = grid_conditions(spec, config, source)
                    images = backend.sample_grid(conds, grid, config["seed"])
                    save_grid(layout.grid(step), images, nrow=config["sample_per_class"],
                              upscale=max(1, 64 // images.shape[-1]))
    finally:  # an error ends the progress bar's line first, so its message starts a line of its own
        progress.close()
    if rank == 0:
        logger.event("end", step=step, skipped_images=skipped_total, skipped_updates=nonfinite_skips)
        logger.close()
        plot_loss_curve(layout.log, layout.loss_curve)
    backend.finish()
    return {"step": step, "loss": values.get("loss"), "checkpoint": str(layout.checkpoint(step)), "recipe": recipe}
