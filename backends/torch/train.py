"""Train DiR with PyTorch: ``python -m backends.torch.train -c configs/train/digits.yaml [--key value ...]``.

Several processes: ``torchrun --nproc_per_node N -m backends.torch.train -c ...`` (DDP;
gloo on CPU, nccl on GPU). The loop, schedules, draws, logs, resume and grids are
``common.trainer.run_training``; this file is its PyTorch adapter.

Checkpoints (``run_dir/checkpoints/NNNNNNN.pt``, ``torch.save`` of a dict, read back with
``weights_only=True``): ``model`` and ``ema`` state dicts (canonical names), ``optimizer``
(AdamW's state dict), ``step``, ``config``, ``spec``, ``recipe`` and ``rng`` (a description:
every draw is a pure function of seed, rank and step, so there is no RNG state to save).
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from backends.torch.data import build_loader
from backends.torch.models import DiR
from backends.torch.objectives import build_objective, generate
from backends.torch.wkv import fla_installed
from common.atomic import atomic_path
from common.checkpoint import CheckpointError
from common.cli import run_cli
from common.conditions import drop_conditions
from common.config import TRAIN_SCHEMA, ConfigError, parse_cli, resolve_wkv_kernel
from common.trainer import TrainBackend, run_training
from common.training import process_group_failure

EXTENSION = "pt"


def build_optimizer(model: torch.nn.Module, config: dict) -> torch.optim.AdamW:
    """AdamW; weight decay only on parameters with 2+ dims (not biases, norms, mixes, decays)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config["weight_decay"]},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # fused: one kernel per parameter group on CPU and CUDA; the default for CPU tensors is a Python loop
    # of ~10 ops a tensor (a step over the text model's 10.4M parameters, 2 cores: 38 ms, fused 5 ms)
    return torch.optim.AdamW(groups, lr=config["lr"], betas=(0.9, config["adam_beta2"]), eps=1e-8, fused=True)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    model_params = dict(model.named_parameters())
    for name, param in ema.named_parameters():
        param.mul_(decay).add_(model_params[name].detach(), alpha=1.0 - decay)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def train_step(model, objective, optimizer, micro_batches, config: dict, device) -> dict[str, float]:
    """Accumulate gradients over prepared micro-batches ``(x, cond, inputs, noise, skipped)`` and clip
    them (the caller then takes ``optimizer.step()``, or drops them when they are not finite).

    Returns this process's means of the loss terms, the gradient norm and the skipped count.
    """
    optimizer.zero_grad(set_to_none=True)
    accum = len(micro_batches)
    totals: dict[str, float] = {"skipped": 0.0}
    for j, (x, cond, inputs, noise, skipped) in enumerate(micro_batches):
        # Only the last micro-batch all-reduces gradients under DDP.
        sync = model.no_sync() if isinstance(model, DistributedDataParallel) and j < accum - 1 else contextlib.nullcontext()
        with sync:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config["precision"] == "bf16"):
                losses = objective.losses_from_inputs(model, x, cond, inputs, noise)
                loss = losses["loss"].mean() / accum
            loss.backward()
        for key, value in losses.items():
            totals[key] = totals.get(key, 0.0) + float(value.detach().mean()) / accum
        totals["skipped"] += float(skipped)
    max_norm = config["grad_clip"] if config["grad_clip"] > 0 else float("inf")
    totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    return totals


def is_collective_failure(err: BaseException) -> bool:
    """A gloo / NCCL error of a collective (a dead or hung peer), not a bug in the step."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(mark in text for mark in ("gloo", "NCCL", "Connection reset",
                                                                          "Connection closed", "Timed out"))


class TrainAdapter(TrainBackend):
    """The PyTorch side of ``common.trainer.run_training``."""

    framework = "torch"
    extension = EXTENSION

    def setup(self, config: dict) -> None:
        self.config = config
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        use_cuda = config["device"] == "cuda" or (config["device"] == "auto" and torch.cuda.is_available())
        if config["device"] == "cuda" and not torch.cuda.is_available():
            raise ConfigError("key 'device' = 'cuda' but no CUDA device is available")
        if use_cuda:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
            self.torch_device = torch.device("cuda", local_rank)
        else:
            self.torch_device = torch.device("cpu")
        self.device = str(self.torch_device)
        if self.world_size > 1:  # a dead peer fails the others' collectives after the timeout instead of hanging
            dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                    timeout=datetime.timedelta(seconds=config["collective_timeout"]))

    def build(self, spec, recipe, config) -> int:
        self.spec, self.recipe = spec, recipe
        self.model = DiR.from_spec(spec, seed=config["seed"]).to(self.torch_device)
        self.model.set_recompute(config.get("recompute", False))
        self.model.set_wkv_kernel(resolve_wkv_kernel(config.get("wkv_kernel", "auto"), "torch", self.torch_device.type == "cuda",
                                                     fla_installed()))
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.optimizer = build_optimizer(self.model, config)
        self.objective = build_objective(recipe, spec.learn_sigma, self.torch_device)
        self.model.train()
        return sum(p.numel() for p in self.model.parameters())

    def read_checkpoint(self, path) -> dict:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises many kinds for a bad file
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({err})") from None

    def restore(self, checkpoint: dict, path) -> None:
        if checkpoint["optimizer"] is None:
            raise CheckpointError(f"{path}: holds weights only (no optimizer state), so training cannot resume "
                                  "from it; sample from it, or start a new run from its weights")
        self.model.load_state_dict(checkpoint["model"])
        self.ema.load_state_dict(checkpoint["ema"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])

    def distribute(self) -> None:
        if self.world_size > 1:
            device_ids = [self.torch_device.index] if self.torch_device.type == "cuda" else None
            self.model = DistributedDataParallel(self.model, device_ids=device_ids)

    def loader(self, source, step_sampler, start_step: int, num_workers: int):
        return build_loader(source, step_sampler, start_step, num_workers)

    def set_learning_rate(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @contextlib.contextmanager
    def collectives(self):
        """Turn a failed collective into a one-line stop that says what to resume from."""
        try:
            yield
        except RuntimeError as err:
            if self.world_size > 1 and is_collective_failure(err):
                _BROKEN_PROCESS_GROUP.append(self.rank)
                raise process_group_failure(self.rank, self.config["run_dir"], EXTENSION, err) from None
            raise

    def train_step(self, micro_batches, draws) -> dict[str, float]:
        with self.collectives():
            return self._train_step(micro_batches, draws)

    def _train_step(self, micro_batches, draws) -> dict[str, float]:
        device = self.torch_device
        prepared = []
        for (x, y, skipped), d in zip(micro_batches, draws):
            cond = torch.from_numpy(drop_conditions(self.spec, y.numpy(), d.drop)).to(device)
            inputs = {k: torch.from_numpy(v).to(device) for k, v in d.inputs.items()}
            prepared.append((x.to(device, non_blocking=True), cond, inputs, torch.from_numpy(d.noise).to(device),
                             int(skipped.sum())))
        return train_step(self.model, self.objective, self.optimizer, prepared, self.config, device)

    def apply_update(self) -> None:
        self.optimizer.step()

    def discard_update(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def nonfinite_tensors(self) -> list[str]:
        return [f"{prefix}.{name}" for prefix, module in (("model", unwrap(self.model)), ("ema", self.ema))
                for name, param in module.named_parameters() if not bool(torch.isfinite(param).all())]

    def update_ema(self, decay: float) -> None:
        update_ema(self.ema, unwrap(self.model), decay)

    def save_checkpoint(self, path, step: int, metadata: dict) -> None:
        if self.rank == 0:
            checkpoint = {"model": unwrap(self.model).state_dict(), "ema": self.ema.state_dict(),
                          "optimizer": self.optimizer.state_dict(), "step": step, **metadata}
            with atomic_path(path) as tmp:
                torch.save(checkpoint, tmp)
        if self.world_size > 1:
            with self.collectives():
                dist.barrier()

    def sample_grid(self, labels: np.ndarray, settings, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        x, _ = generate(self.ema, self.spec, self.recipe, settings, labels, rng, self.torch_device)
        if self.recipe.is_latent:
            from backends.torch.vae import decode, load_vae

            vae = load_vae(self.config["vae_path"], self.torch_device)
            x = decode(vae, torch.from_numpy(x).to(self.torch_device), self.recipe.latent_scale).float().cpu().numpy()
        return x

    def all_reduce_sum(self, values: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1:
            return values
        tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=self.torch_device)
        with self.collectives():
            dist.all_reduce(tensor)
        return dict(zip(values, tensor.tolist()))

    def finish(self) -> None:
        if self.world_size > 1:
            dist.barrier()
            dist.destroy_process_group()


def train(config: dict, source_name: str = "config") -> dict:
    """Run one training job; returns the end state {'step', 'loss', 'checkpoint', 'recipe', 'model', 'ema'}."""
    backend = TrainAdapter()
    result = run_training(config, backend, source_name)
    return {**result, "model": unwrap(backend.model), "ema": backend.ema}


# Set when a collective failed: a gloo process group whose peer died cannot be shut down, and its
# threads can abort the interpreter's normal exit (std::terminate, "terminate called without an
# active exception", exit code -6 instead of 2), so ``main`` then leaves without C++ destructors.
_BROKEN_PROCESS_GROUP: list[int] = []


def main(argv=None) -> None:
    def run():
        config, config_path = parse_cli(sys.argv[1:] if argv is None else argv, TRAIN_SCHEMA, "python -m backends.torch.train")
        train(config, config_path or "command line")

    try:
        run_cli(run)
    except SystemExit as stop:
        if _BROKEN_PROCESS_GROUP:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(stop.code if isinstance(stop.code, int) else 1)
        raise


if __name__ == "__main__":
    main()
