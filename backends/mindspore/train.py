"""Train DiR with MindSpore: ``python -m backends.mindspore.train -c configs/train/digits.yaml [--key value ...]``.

Same config keys, log lines, progress bar, sample grids and run folder as
``backends/torch/train.py``; checkpoints are ``.ckpt`` (``mindspore.save_checkpoint``).
One extra command-line flag picks MindSpore's execution mode (not a config key, so
configs stay shared): ``--mode pynative`` (default) or ``--mode graph``; the
environment variable ``DIR_MINDSPORE_MODE`` does the same.

Several processes (data parallel, gradients averaged, data sharded by rank)::

    PATH=$PWD/.venv/bin:$PATH msrun --worker_num 2 --local_worker_num 2 --join True \\
        backends/mindspore/train.py -c configs/train/digits.yaml

Differences from PyTorch, MindSpore idiom:

* The step is two Cells, ``ForwardBackward`` (loss and gradients by
  ``mindspore.value_and_grad``) and ``ApplyGradients`` (all-reduce mean across ranks,
  global-norm clipping as ``torch.nn.utils.clip_grad_norm_``, AdamW). Their
  ``construct`` is compiled under ``--mode graph`` and run op by op under PyNative.
* The optimizer is ``mindspore.experimental.optim.AdamW`` (PyTorch's AdamW: bias
  correction, decoupled decay), weight decay only on parameters with 2+ dims.
* Timesteps, noise and label dropout come from a host numpy generator seeded by
  (seed, world_size, rank, step, micro-batch), not a stateful framework RNG, so a
  resumed run draws exactly what the uninterrupted one would have.

Checkpoint layout (``run_dir/checkpoints/NNNNNNN.ckpt``, written to a temp file and
renamed): model parameters under their MindSpore names (``blocks.0.att.key.weight``,
``y_embedder.embedding_table.embedding_table``, ``blocks.0.att.ln_x.gamma``), EMA under
``ema.`` + the same name, AdamW state under ``optimizer.`` (``optimizer.exp_avg.<name>``,
``optimizer.exp_avg_sq.<name>``, ``optimizer.state_step``), ``step`` (Int64 scalar), and
strings (UTF-32-LE, MindSpore's ``append_dict`` encoding) ``spec``, ``config`` and ``rng``
holding JSON, ``format`` = ``dir-mindspore-train``.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a file (msrun starts workers with a script path)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402
from mindspore import Tensor, nn, ops  # noqa: E402
from mindspore.experimental.optim import AdamW  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from backends.mindspore.data import build_loader  # noqa: E402
from backends.mindspore.diffusion import DDPMObjective, Sampler, guided_model  # noqa: E402
from backends.mindspore.models import DiR, set_execution_mode  # noqa: E402
from common.checkpoint import CheckpointError, atomic_path  # noqa: E402
from common.config import TRAIN_SCHEMA, ConfigError, batch_layout, check_train_config, parse_cli, save_resolved  # noqa: E402
from common.data import DataError, StepSampler, UnreadableItemWarning, build_source  # noqa: E402
from common.diffusion import make_schedule  # noqa: E402
from common.images import save_grid  # noqa: E402
from common.spec import DiRSpec  # noqa: E402
from common.training import (  # noqa: E402
    RunLayout, RunLogger, Throughput, check_train_checkpoint, describe_batch, ema_decay, grid_classes,
    learning_rate, model_spec, plot_loss_curve, resolve_resume,
)

EXTENSION = "ckpt"
CHECKPOINT_FORMAT = "dir-mindspore-train"
MODES = ("pynative", "graph")
EMA_PREFIX, OPTIMIZER_PREFIX = "ema.", "optimizer."


# ---- processes and devices -------------------------------------------------------------------

def _launched_by_msrun() -> bool:
    return "MS_WORKER_NUM" in os.environ or "MS_ROLE" in os.environ


def setup_distributed(config: dict, mode: str = "pynative") -> tuple[int, int, str]:
    """(rank, world_size, device target); joins the collective group under msrun."""
    if config["precision"] == "bf16":
        raise ConfigError("key 'precision' = 'bf16' is not supported by the MindSpore backend "
                          "(no bf16 kernels on CPU; use fp32)")
    target = set_execution_mode(mode, config["device"])
    if config["device"] == "cuda" and target != "GPU":
        raise ConfigError("key 'device' = 'cuda' but MindSpore has no GPU here")
    if not _launched_by_msrun():
        return 0, 1, target
    from mindspore.communication import get_group_size, get_rank, init

    init()
    return get_rank(), get_group_size(), target


def sum_across_processes(values: dict[str, float], world_size: int) -> dict[str, float]:
    if world_size == 1:
        return values
    total = ops.AllReduce()(Tensor(np.asarray(list(values.values()), dtype=np.float32)))
    return dict(zip(values, (float(v) for v in total.asnumpy())))


# ---- model, EMA, optimizer -----------------------------------------------------------------

def build_optimizer(model: DiR, config: dict) -> AdamW:
    """AdamW; weight decay only on parameters with 2+ dims (not biases, norms, mixes, decays)."""
    params = model.trainable_params()
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config["weight_decay"]},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return AdamW(groups, lr=config["lr"], betas=(0.9, config["adam_beta2"]), eps=1e-8)


def set_learning_rate(optimizer: AdamW, lr: float) -> None:
    """In place (``ops.assign``): ``set_data`` would swap the tensor a compiled step already holds."""
    for group in optimizer.param_groups:
        ops.assign(group["lr"], Tensor(lr, ms.float32))


def build_ema(model: DiR) -> DiR:
    """A frozen copy of ``model`` whose parameters are named ``ema.<name>``."""
    ema = DiR(model.spec)
    ema.load_canonical(model.canonical_state())
    ema.update_parameters_name(EMA_PREFIX)
    for param in ema.get_parameters():
        param.requires_grad = False
    ema.set_train(False)
    return ema


class EMAUpdate(nn.Cell):
    """ema <- decay * ema + (1 - decay) * param, for every parameter (one compiled step in Graph mode)."""

    def __init__(self, ema: DiR, model: DiR):
        super().__init__()
        own = model.named_parameters()
        self.ema_params = ms.ParameterTuple([p for _, p in ema.parameters_and_names()])
        self.model_params = ms.ParameterTuple([own[name] for name, _ in ema.parameters_and_names()])

    def construct(self, decay):
        for ema_param, param in zip(self.ema_params, self.model_params):
            ops.assign(ema_param, ema_param * decay + param * (1.0 - decay))
        return decay


def update_ema(ema_update: EMAUpdate, decay: float) -> None:
    ema_update(Tensor(decay, ms.float32))


# ---- one step -------------------------------------------------------------------------------

class ForwardBackward(nn.Cell):
    """Loss of one micro-batch (divided by the accumulation count) and its gradients."""

    def __init__(self, model: DiR, objective: DDPMObjective, weights, accum: int):
        super().__init__(auto_prefix=False)
        self.model = model
        self.objective = objective
        self.accum = float(accum)
        self.learn_sigma = objective.learn_sigma
        self.grad_fn = ms.value_and_grad(self.loss_fn, None, weights, has_aux=True)

    def loss_fn(self, x, y, t, noise, drop):
        losses = self.objective.training_losses(self.model, x, y, t, noise, drop)
        vb = losses["vb"].mean() if self.learn_sigma else ops.zeros((), ms.float32)
        return losses["loss"].mean() / self.accum, losses["mse"].mean(), vb

    def construct(self, x, y, t, noise, drop):
        (loss, mse, vb), grads = self.grad_fn(x, y, t, noise, drop)
        return loss, mse, vb, grads


class ApplyGradients(nn.Cell):
    """Average gradients across ranks, clip their global norm, take an AdamW step. Returns the norm."""

    def __init__(self, optimizer: AdamW, grad_clip: float, world_size: int):
        super().__init__(auto_prefix=False)
        self.optimizer = optimizer
        self.clip = grad_clip > 0
        self.max_norm = grad_clip
        self.world_size = world_size
        self.reduce = ops.AllReduce() if world_size > 1 else None

    @ms.jit  # also under PyNative: the experimental AdamW re-tuples the grads, which its own jit
    def construct(self, grads):  # would see as new constants (and recompile) every eager call
        if self.world_size > 1:
            grads = tuple(self.reduce(g) / self.world_size for g in grads)
        norms = ops.stack([ops.sqrt((g * g).sum()) for g in grads])
        total_norm = ops.sqrt((norms * norms).sum())
        if self.clip:  # torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6))
            coef = ops.clamp(self.max_norm / (total_norm + 1e-6), max=1.0)
            grads = tuple(g * coef for g in grads)
        self.optimizer(grads)
        return total_norm


def step_noise(config: dict, spec: DiRSpec, num_timesteps: int, shape, world_size: int, rank: int,
               step: int, micro: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t [B] int64, noise float32, label-drop mask [B] int32) of one micro-batch: a pure
    function of (seed, world_size, rank, step, micro), so resumed runs redraw them exactly."""
    rng = np.random.default_rng([config["seed"], world_size, rank, step, micro])
    t = rng.integers(0, num_timesteps, size=shape[0], dtype=np.int64)
    noise = rng.standard_normal(shape, dtype=np.float32)
    drop = (rng.random(shape[0]) < spec.class_dropout_prob).astype(np.int32)
    return t, noise, drop


def train_step(forward_backward: ForwardBackward, apply_gradients: ApplyGradients, micro_batches, draws) -> dict[str, float]:
    """Accumulate gradients over the micro-batches, reduce, clip, step. Returns this process's means.

    ``draws``: per micro-batch (t, noise, drop) from :func:`step_noise`.
    """
    accum = len(micro_batches)
    totals = {"loss": 0.0, "mse": 0.0, "vb": 0.0, "skipped": 0.0}
    grads = None
    for (x, y, skipped), (t, noise, drop) in zip(micro_batches, draws):
        loss, mse, vb, micro_grads = forward_backward(Tensor(x), Tensor(y), Tensor(t), Tensor(noise), Tensor(drop))
        grads = micro_grads if grads is None else tuple(a + b for a, b in zip(grads, micro_grads))
        totals["loss"] += float(loss.asnumpy())
        totals["mse"] += float(mse.asnumpy()) / accum
        totals["vb"] += float(vb.asnumpy()) / accum
        totals["skipped"] += float(np.sum(skipped))
    totals["grad_norm"] = float(apply_gradients(ms.mutable(tuple(grads))).asnumpy())
    return totals


# ---- checkpoints ------------------------------------------------------------------------------

def _entries(prefix: str, params) -> list[dict]:
    return [{"name": prefix + p.name if prefix else p.name, "data": Tensor(p.asnumpy())} for p in params]


def save_checkpoint(path, model: DiR, ema: DiR, optimizer: AdamW, step: int, config: dict, spec: DiRSpec,
                    rank: int, world_size: int) -> None:
    """Rank 0 writes to a temp file and renames it (every rank holds the same weights)."""
    if rank == 0:
        model_entries = [{"name": name, "data": Tensor(p.asnumpy())} for name, p in model.parameters_and_names()]
        ema_entries = [{"name": EMA_PREFIX + name, "data": Tensor(p.asnumpy())} for name, p in ema.parameters_and_names()]
        opt_params = list(optimizer.exp_avg) + list(optimizer.exp_avg_sq) + [optimizer.state_step]
        opt_entries = [{"name": OPTIMIZER_PREFIX + p.name, "data": Tensor(p.asnumpy())} for p in opt_params]
        rng = {"kind": "numpy-per-step", "seed": config["seed"], "world_size": world_size,
               "note": "t, noise and label dropout of (rank, step, micro) come from "
                       "numpy.random.default_rng([seed, world_size, rank, step, micro])"}
        extra = {"format": CHECKPOINT_FORMAT, "step": int(step), "spec": spec.to_json(),
                 "config": json.dumps(config), "rng": json.dumps(rng)}
        with atomic_path(path) as tmp:
            written = Path(str(tmp) + ".ckpt")  # save_checkpoint appends '.ckpt' to other names
            try:
                ms.save_checkpoint(model_entries + ema_entries + opt_entries, str(written), append_dict=extra)
                os.replace(written, tmp)
            finally:
                if written.exists():
                    written.unlink()
    if world_size > 1:
        _barrier()


def _barrier() -> None:
    ops.AllReduce()(Tensor(np.zeros(1, np.float32))).asnumpy()


def read_checkpoint(path) -> dict:
    """A training .ckpt as {'model': {name: ndarray}, 'ema': ..., 'optimizer': ..., 'step', 'rng',
    'config', 'spec'} (the layout ``common.training.check_train_checkpoint`` expects)."""
    try:
        raw = ms.load_checkpoint(str(path))
    except Exception as err:  # noqa: BLE001 - MindSpore raises ValueError/RuntimeError for bad files
        raise CheckpointError(f"{path}: not a readable MindSpore checkpoint ({err})") from None
    checkpoint = {"model": {}, "ema": {}, "optimizer": {}}
    for name, value in raw.items():
        if name in ("format", "spec", "config", "rng", "recipe"):
            checkpoint[name] = value if isinstance(value, str) else None
        elif name == "step":
            checkpoint["step"] = int(value.asnumpy())
        elif name.startswith(EMA_PREFIX):
            checkpoint["ema"][name[len(EMA_PREFIX):]] = value.asnumpy()
        elif name.startswith(OPTIMIZER_PREFIX):
            checkpoint["optimizer"][name[len(OPTIMIZER_PREFIX):]] = value.asnumpy()
        else:
            checkpoint["model"][name] = value.asnumpy()
    try:
        for key in ("spec", "config", "rng"):
            if isinstance(checkpoint.get(key), str):
                checkpoint[key] = json.loads(checkpoint[key])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: entry is not valid JSON ({err})") from None
    return checkpoint


def load_state(model_like: DiR, state: dict[str, np.ndarray], path, what: str) -> None:
    """Copy a framework-named state (names as ``parameters_and_names`` gives them) into a model."""
    from common.param_mapping import from_framework

    try:
        canonical = from_framework("mindspore", state, model_like.spec, source=f"{path} ({what})")
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    model_like.load_canonical(canonical)


def load_checkpoint(path, model: DiR, ema: DiR, optimizer: AdamW, spec: DiRSpec) -> tuple[int, dict]:
    """Restore weights, EMA and optimizer; returns (step, rng description)."""
    checkpoint = read_checkpoint(path)
    check_train_checkpoint(checkpoint, path, spec)
    load_state(model, checkpoint["model"], path, "model")
    load_state(ema, checkpoint["ema"], path, "ema")
    saved = checkpoint["optimizer"]
    for param in list(optimizer.exp_avg) + list(optimizer.exp_avg_sq) + [optimizer.state_step]:
        if param.name not in saved:
            raise CheckpointError(f"{path}: optimizer state '{OPTIMIZER_PREFIX}{param.name}' is missing")
        param.set_data(Tensor(saved[param.name]).astype(param.dtype))
    return int(checkpoint["step"]), checkpoint["rng"]


# ---- grids ------------------------------------------------------------------------------------

def write_grid(path, ema: DiR, spec: DiRSpec, config: dict, schedule) -> None:
    """A class-conditional grid from the EMA weights (fixed seed, so grids compare across steps)."""
    labels = Tensor(np.asarray(grid_classes(spec.num_classes, config["sample_per_class"]), dtype=np.int64))
    sampler = Sampler(schedule, config["sample_sampler"], config["sample_steps"],
                      clip_denoised=config["dataset"] != "latents")
    cfg = config["sample_cfg_scale"] if spec.has_null_class else 1.0
    generator = np.random.default_rng(config["seed"])
    shape = (len(labels), spec.in_channels, spec.input_size, spec.input_size)
    x = sampler.sample(guided_model(ema, labels, cfg, spec.num_classes), shape, generator)
    if config["dataset"] == "latents":
        from backends.mindspore.vae import decode, load_vae

        x = decode(load_vae(config["vae_path"]), x)
    save_grid(path, x.astype(ms.float32).asnumpy(), nrow=config["sample_per_class"],
              upscale=max(1, 64 // spec.input_size))


def wants_grid(step: int, config: dict, last: bool) -> bool:
    if config["sample_every"] < 0 or (config["dataset"] == "latents" and not config["vae_path"]):
        return False
    return last or (config["sample_every"] > 0 and step % config["sample_every"] == 0)


# ---- main -------------------------------------------------------------------------------------

def train(config: dict, source_name: str = "config", mode: str = "pynative") -> dict:
    """Run one training job; returns {'step', 'loss', 'checkpoint', 'model'} of the end state."""
    check_train_config(config, source_name)
    rank, world_size, target = setup_distributed(config, mode)
    micro_batch = batch_layout(config["global_batch_size"], world_size, config["grad_accum_steps"], source_name)
    ms.set_seed(config["seed"] * world_size + rank)

    source = build_source(config)
    spec = model_spec(config, source, source_name)
    model = DiR.from_spec(spec, seed=config["seed"])
    ema = build_ema(model)
    optimizer = build_optimizer(model, config)
    objective = DDPMObjective(config["diffusion_steps"], config["noise_schedule"], spec.learn_sigma)
    layout = RunLayout(config["run_dir"], EXTENSION)

    start_step = 0
    resume_path = resolve_resume(config["resume"], layout.root, EXTENSION)
    if resume_path is not None:
        start_step, _ = load_checkpoint(resume_path, model, ema, optimizer, spec)

    step_sampler = StepSampler(len(source), config["global_batch_size"], world_size, rank,
                               config["grad_accum_steps"], config["seed"], config["random_flip"])
    batches = build_loader(source, step_sampler, start_step, config["num_workers"])
    forward_backward = ForwardBackward(model, objective, optimizer.parameters, config["grad_accum_steps"])
    apply_gradients = ApplyGradients(optimizer, config["grad_clip"], world_size)
    ema_update = EMAUpdate(ema, model)
    num_params = sum(int(np.prod(p.shape)) for p in model.get_parameters())

    logger = RunLogger(layout) if rank == 0 else None
    if rank == 0:
        save_resolved(config, layout.config)
        logger.event("start", step=start_step, resumed_from=str(resume_path) if resume_path else None,
                     spec=spec.to_dict(), data=f"{config['dataset']}: {len(source)} items, {source.num_classes} classes",
                     batch=describe_batch(config, world_size, micro_batch), parameters=num_params,
                     framework=f"mindspore {ms.__version__}", mode=mode)
        tqdm.write(f"DiR {config['model']} | {num_params:,} parameters | "
                   f"{config['dataset']} ({len(source)} items) | {describe_batch(config, world_size, micro_batch)} | "
                   f"device {target} ({mode} mode)"
                   + (f" | resumed from {resume_path} at step {start_step}" if resume_path else ""))

    model.set_train(True)
    schedule = make_schedule(config["diffusion_steps"], config["noise_schedule"], spec.learn_sigma)
    meter, interval, skipped_total = Throughput(), [], 0
    progress = tqdm(total=config["max_steps"], initial=start_step, disable=rank != 0, desc="train", dynamic_ncols=True)
    step, values = start_step, {}
    with warnings.catch_warnings():
        warnings.simplefilter("always", UnreadableItemWarning)
        while step < config["max_steps"]:
            set_learning_rate(optimizer, learning_rate(step, config))
            micro_batches = [next(batches) for _ in range(config["grad_accum_steps"])]
            draws = [step_noise(config, spec, config["diffusion_steps"], mb[0].shape, world_size, rank, step, j)
                     for j, mb in enumerate(micro_batches)]
            values = train_step(forward_backward, apply_gradients, micro_batches, draws)
            update_ema(ema_update, ema_decay(step, config))
            step += 1
            meter.add(micro_batch * config["grad_accum_steps"] * world_size)
            interval.append(values)
            if step % config["log_every"] == 0 or step == config["max_steps"]:
                sums = {k: sum(v[k] for v in interval) / (len(interval) * world_size) for k in ("loss", "mse", "vb", "grad_norm")}
                sums["skipped"] = sum(v["skipped"] for v in interval)
                means = sum_across_processes(sums, world_size)
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
                save_checkpoint(layout.checkpoint(step), model, ema, optimizer, step, config, spec, rank, world_size)
                if rank == 0:
                    logger.event("checkpoint", step=step, path=str(layout.checkpoint(step)))
            if rank == 0 and wants_grid(step, config, last):
                write_grid(layout.grid(step), ema, spec, config, schedule)
    progress.close()
    if rank == 0:
        logger.event("end", step=step, skipped_images=skipped_total)
        logger.close()
        plot_loss_curve(layout.log, layout.loss_curve)
    if world_size > 1:
        _barrier()
    return {"step": step, "loss": values.get("loss"), "checkpoint": str(layout.checkpoint(step)), "model": model}


def pop_mode(argv: list[str]) -> tuple[str, list[str]]:
    """Take ``--mode pynative|graph`` (or ``--mode=...``) out of argv; default from DIR_MINDSPORE_MODE."""
    mode, rest, i = os.environ.get("DIR_MINDSPORE_MODE", "pynative"), [], 0
    while i < len(argv):
        if argv[i] == "--mode" and i + 1 < len(argv):
            mode, i = argv[i + 1], i + 2
        elif argv[i].startswith("--mode="):
            mode, i = argv[i].split("=", 1)[1], i + 1
        else:
            rest.append(argv[i])
            i += 1
    if mode not in MODES:
        raise ConfigError(f"command line: --mode '{mode}' is not allowed; allowed: {', '.join(MODES)}")
    return mode, rest


def main(argv=None) -> None:
    try:
        mode, argv = pop_mode(list(sys.argv[1:] if argv is None else argv))
        config, config_path = parse_cli(argv, TRAIN_SCHEMA, "python -m backends.mindspore.train [--mode pynative|graph]")
        train(config, config_path or "command line", mode)
    except (ConfigError, DataError, CheckpointError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
