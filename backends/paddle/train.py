"""Train DiR with PaddlePaddle: ``python -m backends.paddle.train -c configs/train/digits.yaml [--key value ...]``.

Several processes: ``python -m paddle.distributed.launch --nproc_per_node N backends/paddle/train.py -c ...``
(DataParallel; gloo on CPU), on GPU / XPU clusters the same command with ``--devices 0,1,...``.
The launcher runs a script path, not ``-m module``, so this file also runs as a script.
Everything that is not tensor work lives in common/: config, data, schedules, run layout, logging.

Checkpoints (``run_dir/checkpoints/NNNNNNN.pdparams``) are written with ``paddle.save`` of plain
numpy arrays, ints, floats, strings, lists and dicts only, so they load with a restricted
unpickler (no code runs on load): ``model`` and ``ema`` hold the Paddle state (canonical names,
Linear weights [in, out]), ``optimizer`` the AdamW moments keyed by canonical parameter name.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: put the repo root first, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import numpy as np
import paddle
import paddle.distributed as dist
from tqdm.auto import tqdm

from backends.paddle.data import build_loader
from backends.paddle.diffusion import Sampler, build_objective, guided_model
from backends.paddle.models import DiR
from common.checkpoint import CheckpointError, atomic_path
from common.config import TRAIN_SCHEMA, ConfigError, batch_layout, check_train_config, parse_cli, save_resolved
from common.data import DataError, StepSampler, UnreadableItemWarning, build_source
from common.diffusion import make_schedule
from common.images import save_grid
from common.spec import DiRSpec
from common.training import (
    RunLayout, RunLogger, Throughput, check_train_checkpoint, describe_batch, ema_decay, grid_classes,
    learning_rate, model_spec, plot_loss_curve, resolve_resume,
)

EXTENSION = "pdparams"
# What AdamW keeps per parameter, by the suffix Paddle gives its accumulators.
ADAMW_ACCUMULATORS = ("moment1", "moment2", "beta1_pow_acc", "beta2_pow_acc")


# ---- processes and devices -------------------------------------------------------------------

def _accelerator() -> str | None:
    """'gpu' or 'xpu' (Kunlun) when Paddle was built for one and a device is present."""
    if paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        return "gpu"
    if paddle.device.is_compiled_with_xpu() and paddle.device.xpu.device_count() > 0:
        return "xpu"
    return None


def setup_distributed(config: dict) -> tuple[int, int, str]:
    """(rank, world_size, device); starts the parallel environment under paddle.distributed.launch."""
    world_size = int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))
    rank = int(os.environ.get("PADDLE_TRAINER_ID", "0"))
    accelerator = _accelerator()
    if config["device"] == "cuda" and accelerator is None:
        raise ConfigError("key 'device' = 'cuda' but Paddle sees no GPU / XPU device")
    # The launcher gives each process its own card (FLAGS_selected_gpus / _xpus).
    paddle.set_device(accelerator if config["device"] != "cpu" and accelerator is not None else "cpu")
    if world_size > 1:
        dist.init_parallel_env()
    return rank, world_size, paddle.device.get_device()  # 'cpu', 'gpu:0', 'xpu:1', ...


def all_gather_objects(value, world_size: int) -> list:
    if world_size == 1:
        return [value]
    gathered = []
    dist.all_gather_object(gathered, value)
    return gathered


def sum_across_processes(values: dict[str, float], world_size: int, device) -> dict[str, float]:
    if world_size == 1:
        return values
    tensor = paddle.to_tensor(list(values.values()), dtype="float64")
    dist.all_reduce(tensor)
    return dict(zip(values, tensor.tolist()))


# ---- model, EMA, optimizer -----------------------------------------------------------------

def build_optimizer(model: paddle.nn.Layer, config: dict) -> paddle.optimizer.AdamW:
    """AdamW; weight decay only on parameters with 2+ dims (not biases, norms, mixes, decays).

    Paddle's AdamW decays as param * (1 - lr * coeff) before the Adam update, like torch's.
    The learning rate is set every step from ``common.training.learning_rate``.
    """
    params = [p for p in model.parameters() if not p.stop_gradient]
    decayed = {p.name for p in params if p.ndim >= 2}
    return paddle.optimizer.AdamW(learning_rate=config["lr"], parameters=params, beta1=0.9,
                                  beta2=config["adam_beta2"], epsilon=1e-8, weight_decay=config["weight_decay"],
                                  apply_decay_param_fun=lambda name: name in decayed)


@paddle.no_grad()
def update_ema(ema: paddle.nn.Layer, model: paddle.nn.Layer, decay: float) -> None:
    model_params = dict(model.named_parameters())
    for name, param in ema.named_parameters():
        param.scale_(decay).add_(model_params[name].detach() * (1.0 - decay))


def unwrap(model: paddle.nn.Layer) -> paddle.nn.Layer:
    return model._layers if isinstance(model, paddle.DataParallel) else model


def frozen_copy(model: DiR) -> DiR:
    """A copy of the model for the EMA: same weights, no gradients, eval mode."""
    ema = DiR(model.spec)
    ema.set_state_dict(model.state_dict())
    for param in ema.parameters():
        param.stop_gradient = True
    ema.eval()
    return ema


# ---- checkpoints ------------------------------------------------------------------------------

def numpy_state(layer: paddle.nn.Layer) -> dict[str, np.ndarray]:
    """Parameters as numpy arrays under their structured (canonical) names, Paddle layout."""
    return {name: param.numpy() for name, param in layer.named_parameters()}


def optimizer_state(optimizer, model: paddle.nn.Layer) -> dict:
    """AdamW's accumulators keyed ``<canonical name>.<accumulator>`` (Paddle's own keys use
    unique names like ``linear_3.w_0`` that depend on how many layers a process built)."""
    by_unique = {param.name: name for name, param in model.named_parameters()}
    state = {}
    for key, value in optimizer.state_dict().items():
        if key in ("LR_Scheduler", "master_weights"):
            continue
        for unique, name in by_unique.items():
            for acc in ADAMW_ACCUMULATORS:
                if key == f"{unique}_{acc}_0":
                    state[f"{name}.{acc}"] = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
    return {"accumulators": state, "lr": float(optimizer.get_lr())}


def load_optimizer_state(optimizer, model: paddle.nn.Layer, saved: dict, path) -> None:
    own = {name: param.name for name, param in model.named_parameters()}
    accumulators = saved.get("accumulators", {}) if isinstance(saved, dict) else {}
    state = {}
    for name, unique in own.items():
        for acc in ADAMW_ACCUMULATORS:
            key = f"{name}.{acc}"
            if key not in accumulators:
                raise CheckpointError(f"{path}: optimizer state lacks '{key}'")
            state[f"{unique}_{acc}_0"] = paddle.to_tensor(np.asarray(accumulators[key]))
    optimizer.set_state_dict(state)


def rng_state(device: str) -> dict:
    """Paddle's generator states as plain ints and int arrays (no pickled Paddle objects)."""
    states = []
    for state in paddle.get_rng_state():
        device_id, seed, offset, engine = state.__getstate__()
        states.append({"device": int(device_id), "seed": int(seed), "offset": int(offset),
                       "engine": np.asarray(engine, dtype=np.int64)})
    return {"paddle": states}


def _generator_state(values: dict):
    cls = type(paddle.get_rng_state()[0])
    state = cls.__new__(cls)
    state.__setstate__((int(values["device"]), int(values["seed"]), int(values["offset"]),
                        [int(c) for c in np.asarray(values["engine"])]))
    return state


def save_checkpoint(path, model, ema, optimizer, step: int, config: dict, spec: DiRSpec,
                    rank: int, world_size: int, device) -> None:
    """Every rank passes its RNG state; rank 0 writes to a temp file and renames it."""
    rng = all_gather_objects(rng_state(device), world_size)
    if rank == 0:
        checkpoint = {
            "model": numpy_state(unwrap(model)), "ema": numpy_state(ema),
            "optimizer": optimizer_state(optimizer, unwrap(model)),
            "step": step, "rng": {"per_rank": rng}, "config": dict(config), "spec": spec.to_dict(),
        }
        with atomic_path(path) as tmp:
            paddle.save(checkpoint, str(tmp))
    if world_size > 1:
        dist.barrier()


def read_checkpoint(path) -> dict:
    """A .pdparams file (what ``save_checkpoint`` writes) as a dict of numpy arrays and plain values,
    through the shared restricted unpickler (nothing in the file is ever called)."""
    from common.formats import load_pdparams

    return load_pdparams(path, decode_bf16=True)  # bf16 is stored as uint16 bits


def load_checkpoint(path, model, ema, optimizer, spec: DiRSpec) -> tuple[int, dict]:
    """Restore weights, EMA and optimizer; returns (step, rng states per rank)."""
    checkpoint = read_checkpoint(path)
    check_train_checkpoint(checkpoint, path, spec)
    for layer, key in ((model, "model"), (ema, "ema")):
        from common.param_mapping import from_framework

        try:
            from_framework("paddle", checkpoint[key], spec, source=f"{path} '{key}'")
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        layer.set_state_dict(checkpoint[key])
    load_optimizer_state(optimizer, model, checkpoint["optimizer"], path)
    return int(checkpoint["step"]), checkpoint["rng"]


def restore_rng(rng: dict, rank: int, world_size: int, device) -> None:
    per_rank = rng.get("per_rank", [])
    if len(per_rank) != world_size:
        warnings.warn(f"checkpoint holds RNG states of {len(per_rank)} processes, this run has {world_size}; "
                      "noise after the resume will differ from an uninterrupted run")
        return
    paddle.set_rng_state([_generator_state(values) for values in per_rank[rank]["paddle"]])


# ---- one step, grids --------------------------------------------------------------------------

def train_step(model, objective, optimizer, micro_batches, config: dict, device) -> dict[str, float]:
    """Accumulate gradients over the micro-batches, clip, step. Returns this process's means."""
    optimizer.clear_grad(set_to_zero=False)
    accum = len(micro_batches)
    totals = {"loss": 0.0, "mse": 0.0, "vb": 0.0, "skipped": 0.0}
    for j, (x, y, skipped) in enumerate(micro_batches):
        # Only the last micro-batch all-reduces gradients under DataParallel.
        sync = model.no_sync() if isinstance(model, paddle.DataParallel) and j < accum - 1 else contextlib.nullcontext()
        with sync:
            # bf16 autocast on accelerators only: Paddle's CPU has no bf16 kernels.
            with paddle.amp.auto_cast(enable=config["precision"] == "bf16" and device != "cpu", dtype="bfloat16"):
                losses = objective.training_losses(model, x, y)
                loss = losses["loss"].mean() / accum
            loss.backward()
        for key in ("loss", "mse", "vb"):
            if key in losses:
                totals[key] += float(losses[key].detach().mean()) / accum
        totals["skipped"] += float(skipped.sum())
    max_norm = config["grad_clip"] if config["grad_clip"] > 0 else float("inf")
    params = [p for p in model.parameters() if not p.stop_gradient]
    totals["grad_norm"] = float(paddle.nn.utils.clip_grad_norm_(params, max_norm))
    optimizer.step()
    return totals


@paddle.no_grad()
def write_grid(path, ema, spec: DiRSpec, config: dict, schedule, device) -> None:
    """A class-conditional grid from the EMA weights (fixed seed, so grids compare across steps)."""
    labels = paddle.to_tensor(grid_classes(spec.num_classes, config["sample_per_class"]), dtype="int64")
    sampler = Sampler(schedule, config["sample_sampler"], config["sample_steps"],
                      clip_denoised=config["dataset"] != "latents")
    cfg = config["sample_cfg_scale"] if spec.has_null_class else 1.0
    generator = np.random.default_rng(config["seed"])
    shape = (labels.shape[0], spec.in_channels, spec.input_size, spec.input_size)
    x = sampler.sample(guided_model(ema, labels, cfg, spec.num_classes), shape, generator)
    if config["dataset"] == "latents":
        from backends.paddle.vae import decode, load_vae

        x = decode(load_vae(config["vae_path"], device), x)
    save_grid(path, x.astype("float32").numpy(), nrow=config["sample_per_class"], upscale=max(1, 64 // spec.input_size))


def wants_grid(step: int, config: dict, last: bool) -> bool:
    if config["sample_every"] < 0 or (config["dataset"] == "latents" and not config["vae_path"]):
        return False
    return last or (config["sample_every"] > 0 and step % config["sample_every"] == 0)


# ---- main -------------------------------------------------------------------------------------

def train(config: dict, source_name: str = "config") -> dict:
    """Run one training job; returns the end state: {'step', 'loss', 'checkpoint', 'model', 'ema'}."""
    check_train_config(config, source_name)
    rank, world_size, device = setup_distributed(config)
    micro_batch = batch_layout(config["global_batch_size"], world_size, config["grad_accum_steps"], source_name)
    paddle.seed(config["seed"] * world_size + rank)

    source = build_source(config)
    spec = model_spec(config, source, source_name)
    model = DiR.from_spec(spec, seed=config["seed"])
    ema = frozen_copy(model)
    optimizer = build_optimizer(model, config)
    objective = build_objective(config, spec.learn_sigma)
    layout = RunLayout(config["run_dir"], EXTENSION)

    start_step, rng = 0, None
    resume_path = resolve_resume(config["resume"], layout.root, EXTENSION)
    if resume_path is not None:
        start_step, rng = load_checkpoint(resume_path, model, ema, optimizer, spec)
    if world_size > 1:
        model = paddle.DataParallel(model)

    step_sampler = StepSampler(len(source), config["global_batch_size"], world_size, rank,
                               config["grad_accum_steps"], config["seed"], config["random_flip"])
    batches = iter(build_loader(source, step_sampler, start_step, config["num_workers"]))
    if rng is not None:  # after the loader started (its workers draw seeds from the RNG)
        restore_rng(rng, rank, world_size, device)

    num_parameters = sum(int(p.size) for p in model.parameters())
    logger = RunLogger(layout) if rank == 0 else None
    if rank == 0:
        save_resolved(config, layout.config)
        logger.event("start", step=start_step, resumed_from=str(resume_path) if resume_path else None,
                     spec=spec.to_dict(), data=f"{config['dataset']}: {len(source)} items, {source.num_classes} classes",
                     batch=describe_batch(config, world_size, micro_batch), parameters=num_parameters)
        tqdm.write(f"DiR {config['model']} | {num_parameters:,} parameters | "
                   f"{config['dataset']} ({len(source)} items) | {describe_batch(config, world_size, micro_batch)} | "
                   f"device {device}" + (f" | resumed from {resume_path} at step {start_step}" if resume_path else ""))

    model.train()
    schedule = make_schedule(config["diffusion_steps"], config["noise_schedule"], spec.learn_sigma)
    meter, interval, skipped_total = Throughput(), [], 0
    progress = tqdm(total=config["max_steps"], initial=start_step, disable=rank != 0, desc="train", dynamic_ncols=True)
    step, values = start_step, {}
    with warnings.catch_warnings():
        warnings.simplefilter("always", UnreadableItemWarning)
        while step < config["max_steps"]:
            optimizer.set_lr(learning_rate(step, config))
            micro_batches = [next(batches) for _ in range(config["grad_accum_steps"])]
            values = train_step(model, objective, optimizer, micro_batches, config, device)
            update_ema(ema, unwrap(model), ema_decay(step, config))
            step += 1
            meter.add(micro_batch * config["grad_accum_steps"] * world_size)
            interval.append(values)
            if step % config["log_every"] == 0 or step == config["max_steps"]:
                sums = {k: sum(v[k] for v in interval) / (len(interval) * world_size) for k in ("loss", "mse", "vb", "grad_norm")}
                sums["skipped"] = sum(v["skipped"] for v in interval)
                means = sum_across_processes(sums, world_size, device)
                skipped_total += int(means.pop("skipped"))
                if rank == 0:
                    logger.metrics(step, {**means, "lr": learning_rate(step - 1, config), "images_per_s": meter.rate(),
                                          "skipped_images": skipped_total})
                    progress.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{meter.rate():.0f}")
                meter.reset()
                interval = []
            progress.update(1)
            last = step == config["max_steps"]
            if step % config["ckpt_every"] == 0 or last:
                save_checkpoint(layout.checkpoint(step), model, ema, optimizer, step, config, spec, rank, world_size, device)
                if rank == 0:
                    logger.event("checkpoint", step=step, path=str(layout.checkpoint(step)))
            if rank == 0 and wants_grid(step, config, last):
                write_grid(layout.grid(step), ema, spec, config, schedule, device)
    progress.close()
    if rank == 0:
        logger.event("end", step=step, skipped_images=skipped_total)
        logger.close()
        plot_loss_curve(layout.log, layout.loss_curve)
    if world_size > 1:
        dist.barrier()
    return {"step": step, "loss": values.get("loss"), "checkpoint": str(layout.checkpoint(step)),
            "model": unwrap(model), "ema": ema}


def main(argv=None) -> None:
    try:
        config, config_path = parse_cli(sys.argv[1:] if argv is None else argv, TRAIN_SCHEMA, "python -m backends.paddle.train")
        train(config, config_path or "command line")
    except (ConfigError, DataError, CheckpointError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
