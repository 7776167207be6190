"""Train DiR with PyTorch: ``python -m backends.torch.train -c configs/train/digits.yaml [--key value ...]``.

Several processes: ``torchrun --nproc_per_node N -m backends.torch.train -c ...`` (DDP;
gloo on CPU, nccl on GPU). Everything that is not tensor work lives in common/:
config, data, schedules, run layout, logging.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from backends.torch.data import build_loader
from backends.torch.diffusion import Sampler, build_objective, guided_model
from backends.torch.models import DiR
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

EXTENSION = "pt"


# ---- processes and devices -------------------------------------------------------------------

def setup_distributed(config: dict) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); starts the process group under torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = config["device"] == "cuda" or (config["device"] == "auto" and torch.cuda.is_available())
    if config["device"] == "cuda" and not torch.cuda.is_available():
        raise ConfigError("key 'device' = 'cuda' but no CUDA device is available")
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return rank, world_size, device


def all_gather_objects(value, world_size: int) -> list:
    if world_size == 1:
        return [value]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered


def sum_across_processes(values: dict[str, float], world_size: int, device) -> dict[str, float]:
    if world_size == 1:
        return values
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return dict(zip(values, tensor.tolist()))


# ---- model, EMA, optimizer -----------------------------------------------------------------

def build_optimizer(model: torch.nn.Module, config: dict) -> torch.optim.AdamW:
    """AdamW; weight decay only on parameters with 2+ dims (not biases, norms, mixes, decays)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config["weight_decay"]},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config["lr"], betas=(0.9, config["adam_beta2"]), eps=1e-8)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    model_params = dict(model.named_parameters())
    for name, param in ema.named_parameters():
        param.mul_(decay).add_(model_params[name].detach(), alpha=1.0 - decay)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


# ---- checkpoints ------------------------------------------------------------------------------

def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(path, model, ema, optimizer, step: int, config: dict, spec: DiRSpec,
                    rank: int, world_size: int, device) -> None:
    """Every rank passes its RNG state; rank 0 writes to a temp file and renames it."""
    rng = all_gather_objects(rng_state(device), world_size)
    if rank == 0:
        checkpoint = {
            "model": unwrap(model).state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
            "step": step, "rng": {"per_rank": rng}, "config": dict(config), "spec": spec.to_dict(),
        }
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
    if world_size > 1:
        dist.barrier()


def load_checkpoint(path, model, ema, optimizer, spec: DiRSpec) -> tuple[int, dict]:
    """Restore weights, EMA and optimizer; returns (step, rng states per rank)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({err})") from None
    check_train_checkpoint(checkpoint, path, spec)
    if checkpoint["optimizer"] is None:
        raise CheckpointError(f"{path}: holds weights only (no optimizer state), so training cannot resume "
                              "from it; sample from it, or convert it to canonical .safetensors")
    model.load_state_dict(checkpoint["model"])
    ema.load_state_dict(checkpoint["ema"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    return int(checkpoint["step"]), checkpoint["rng"]


def restore_rng(rng: dict, rank: int, world_size: int, device) -> None:
    per_rank = rng.get("per_rank", [])
    if len(per_rank) != world_size:
        warnings.warn(f"checkpoint holds RNG states of {len(per_rank)} processes, this run has {world_size}; "
                      "noise after the resume will differ from an uninterrupted run")
        return
    torch.set_rng_state(per_rank[rank]["torch"])
    if device.type == "cuda" and "cuda" in per_rank[rank]:
        torch.cuda.set_rng_state(per_rank[rank]["cuda"], device)


# ---- one step, grids --------------------------------------------------------------------------

def train_step(model, objective, optimizer, micro_batches, config: dict, device) -> dict[str, float]:
    """Accumulate gradients over the micro-batches, clip, step. Returns this process's means."""
    optimizer.zero_grad(set_to_none=True)
    accum = len(micro_batches)
    totals = {"loss": 0.0, "mse": 0.0, "vb": 0.0, "skipped": 0.0}
    for j, (x, y, skipped) in enumerate(micro_batches):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # Only the last micro-batch all-reduces gradients under DDP.
        sync = model.no_sync() if isinstance(model, DistributedDataParallel) and j < accum - 1 else contextlib.nullcontext()
        with sync:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config["precision"] == "bf16"):
                losses = objective.training_losses(model, x, y)
                loss = losses["loss"].mean() / accum
            loss.backward()
        for key in ("loss", "mse", "vb"):
            if key in losses:
                totals[key] += float(losses[key].detach().mean()) / accum
        totals["skipped"] += float(skipped.sum())
    max_norm = config["grad_clip"] if config["grad_clip"] > 0 else float("inf")
    totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    optimizer.step()
    return totals


@torch.no_grad()
def write_grid(path, ema, spec: DiRSpec, config: dict, schedule, device) -> None:
    """A class-conditional grid from the EMA weights (fixed seed, so grids compare across steps)."""
    labels = torch.tensor(grid_classes(spec.num_classes, config["sample_per_class"]), device=device)
    sampler = Sampler(schedule, config["sample_sampler"], config["sample_steps"],
                      clip_denoised=config["dataset"] != "latents", device=device)
    cfg = config["sample_cfg_scale"] if spec.has_null_class else 1.0
    generator = torch.Generator().manual_seed(config["seed"])
    shape = (len(labels), spec.in_channels, spec.input_size, spec.input_size)
    x = sampler.sample(guided_model(ema, labels, cfg, spec.num_classes), shape, generator, device)
    if config["dataset"] == "latents":
        from backends.torch.vae import decode, load_vae

        x = decode(load_vae(config["vae_path"], device), x)
    save_grid(path, x.float().cpu().numpy(), nrow=config["sample_per_class"], upscale=max(1, 64 // spec.input_size))


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
    torch.manual_seed(config["seed"] * world_size + rank)

    source = build_source(config)
    spec = model_spec(config, source, source_name)
    model = DiR.from_spec(spec, seed=config["seed"]).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = build_optimizer(model, config)
    objective = build_objective(config, spec.learn_sigma, device)
    layout = RunLayout(config["run_dir"], EXTENSION)

    start_step, rng = 0, None
    resume_path = resolve_resume(config["resume"], layout.root, EXTENSION)
    if resume_path is not None:
        start_step, rng = load_checkpoint(resume_path, model, ema, optimizer, spec)
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    step_sampler = StepSampler(len(source), config["global_batch_size"], world_size, rank,
                               config["grad_accum_steps"], config["seed"], config["random_flip"])
    batches = iter(build_loader(source, step_sampler, start_step, config["num_workers"]))
    if rng is not None:  # after the loader started (its workers draw seeds from the RNG)
        restore_rng(rng, rank, world_size, device)

    logger = RunLogger(layout) if rank == 0 else None
    if rank == 0:
        save_resolved(config, layout.config)
        logger.event("start", step=start_step, resumed_from=str(resume_path) if resume_path else None,
                     spec=spec.to_dict(), data=f"{config['dataset']}: {len(source)} items, {source.num_classes} classes",
                     batch=describe_batch(config, world_size, micro_batch),
                     parameters=sum(p.numel() for p in model.parameters()))
        tqdm.write(f"DiR {config['model']} | {sum(p.numel() for p in model.parameters()):,} parameters | "
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
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, config)
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
        dist.destroy_process_group()
    return {"step": step, "loss": values.get("loss"), "checkpoint": str(layout.checkpoint(step)),
            "model": unwrap(model), "ema": ema}


def main(argv=None) -> None:
    try:
        config, config_path = parse_cli(sys.argv[1:] if argv is None else argv, TRAIN_SCHEMA, "python -m backends.torch.train")
        train(config, config_path or "command line")
    except (ConfigError, DataError, CheckpointError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
