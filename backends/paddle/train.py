"""Train DiR with PaddlePaddle: ``python -m backends.paddle.train -c configs/train/digits.yaml [--key value ...]``.

Several processes: ``python -m paddle.distributed.launch --nproc_per_node N backends/paddle/train.py -c ...``
(DataParallel; gloo on CPU), on GPU / XPU clusters the same command with ``--devices 0,1,...``.
The launcher runs a script path, not ``-m module``, so this file also runs as a script. The
loop, schedules, draws, logs, resume and grids are ``common.trainer.run_training``; this file
is its Paddle adapter.

Checkpoints (``run_dir/checkpoints/NNNNNNN.pdparams``) are written with ``paddle.save`` of plain
numpy arrays, ints, floats, strings, lists and dicts only, so they load with a restricted
unpickler (no code runs on load): ``model`` and ``ema`` hold the Paddle state (canonical names,
Linear weights [in, out]), ``optimizer`` the AdamW moments keyed by canonical parameter name,
then ``step``, ``config``, ``spec``, ``recipe`` and ``rng`` (a description: every draw is a pure
function of seed, rank and step, so there is no RNG state to save).
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: put the repo root first, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import numpy as np
import paddle
import paddle.distributed as dist

from backends.paddle.data import build_loader
from backends.paddle.models import DiR
from backends.paddle.objectives import build_objective, generate
from common.atomic import atomic_path
from common.checkpoint import CheckpointError
from common.cli import run_cli
from common.conditions import drop_conditions
from common.config import TRAIN_SCHEMA, ConfigError, parse_cli, resolve_wkv_kernel
from common.trainer import TrainBackend, run_training

EXTENSION = "pdparams"
# What AdamW keeps per parameter, by the suffix Paddle gives its accumulators.
ADAMW_ACCUMULATORS = ("moment1", "moment2", "beta1_pow_acc", "beta2_pow_acc")


def _accelerator() -> str | None:
    """'gpu' or 'xpu' (Kunlun) when Paddle was built for one and a device is present."""
    if paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        return "gpu"
    if paddle.device.is_compiled_with_xpu() and paddle.device.xpu.device_count() > 0:
        return "xpu"
    return None


def build_optimizer(model: paddle.nn.Layer, config: dict) -> paddle.optimizer.AdamW:
    """AdamW; weight decay only on parameters with 2+ dims (not biases, norms, mixes, decays).

    Paddle's AdamW decays as param * (1 - lr * coeff) before the Adam update, like torch's.
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


def read_checkpoint(path) -> dict:
    """A .pdparams file (what ``TrainAdapter.save_checkpoint`` writes) as a dict of numpy arrays and
    plain values, through the shared restricted unpickler (nothing in the file is ever called)."""
    from common.formats import load_pdparams

    return load_pdparams(path, decode_bf16=True)  # bf16 is stored as uint16 bits


def train_step(model, objective, optimizer, micro_batches, config: dict, device) -> dict[str, float]:
    """Accumulate gradients over prepared micro-batches ``(x, cond, inputs, noise, skipped)`` and clip
    them (the caller then takes ``optimizer.step()``, or drops them when they are not finite).

    Returns this process's means of the loss terms, the gradient norm and the skipped count.
    """
    optimizer.clear_grad(set_to_zero=False)
    accum = len(micro_batches)
    totals: dict[str, float] = {"skipped": 0.0}
    for j, (x, cond, inputs, noise, skipped) in enumerate(micro_batches):
        # Only the last micro-batch all-reduces gradients under DataParallel.
        sync = model.no_sync() if isinstance(model, paddle.DataParallel) and j < accum - 1 else contextlib.nullcontext()
        with sync:
            # bf16 autocast on accelerators only: Paddle's CPU has no bf16 kernels.
            with paddle.amp.auto_cast(enable=config["precision"] == "bf16" and device != "cpu", dtype="bfloat16"):
                losses = objective.losses_from_inputs(model, x, cond, inputs, noise)
                loss = losses["loss"].mean() / accum
            loss.backward()
        for key, value in losses.items():
            totals[key] = totals.get(key, 0.0) + float(value.detach().mean()) / accum
        totals["skipped"] += float(skipped)
    max_norm = config["grad_clip"] if config["grad_clip"] > 0 else float("inf")
    totals["grad_norm"] = _clip_grad_norm([p for p in model.parameters() if not p.stop_gradient], max_norm)
    return totals


@paddle.no_grad()  # scaling a gradient in place
def _clip_grad_norm(params, max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_``: the global 2-norm of the gradients, returned, and every
    gradient scaled by max_norm / (norm + 1e-6) where that is below 1.

    Not ``paddle.nn.utils.clip_grad_norm_``: its per-tensor ``p_norm`` kernel sums the squares
    one after another in fp32, 0.5% low over the text model's 8.4M-entry caption embedding
    (2880.0 against 2894.9 for unit normal entries), and took 33 of the text demo step's 214 ms
    on 2 CPU cores; ``square().sum()`` reduces pairwise. Scaling by exactly 1 is skipped (the
    norm is read on the host anyway)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    # bf16/fp16 gradients summed in fp32; fp32 and fp64 in their own precision
    wide = [g if g.dtype in (paddle.float32, paddle.float64) else g.astype("float32") for g in grads]
    total = float(paddle.stack([paddle.square(g).sum() for g in wide]).sum().sqrt())
    scale = max_norm / (total + 1e-6)
    if scale < 1.0:
        for g in grads:
            g.scale_(scale)
    return total


class TrainAdapter(TrainBackend):
    """The Paddle side of ``common.trainer.run_training``."""

    framework = "paddle"
    extension = EXTENSION

    def setup(self, config: dict) -> None:
        self.config = config
        resolve_wkv_kernel(config.get("wkv_kernel", "auto"), "paddle", on_cuda=False, fla_installed=False)  # "fla" is refused
        self.world_size = int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))
        self.rank = int(os.environ.get("PADDLE_TRAINER_ID", "0"))
        accelerator = _accelerator()
        if config["device"] == "cuda" and accelerator is None:
            raise ConfigError("key 'device' = 'cuda' but Paddle sees no GPU / XPU device")
        # The launcher gives each process its own card (FLAGS_selected_gpus / _xpus).
        paddle.set_device(accelerator if config["device"] != "cpu" and accelerator is not None else "cpu")
        self.device = paddle.device.get_device()  # 'cpu', 'gpu:0', 'xpu:1', ...
        if config.get("precision") == "bf16" and self.device == "cpu":
            raise ConfigError("key 'precision' = 'bf16' needs a GPU or XPU with Paddle (its CPU build has no bf16 "
                              "kernels); use fp32")
        if self.world_size > 1:
            dist.init_parallel_env()

    def build(self, spec, recipe, config) -> int:
        self.spec, self.recipe = spec, recipe
        self.model = DiR.from_spec(spec, seed=config["seed"])
        self.model.set_recompute(config.get("recompute", False))
        self.ema = frozen_copy(self.model)
        self.optimizer = build_optimizer(self.model, config)
        self.objective = build_objective(recipe, spec.learn_sigma, self.device)
        self.model.train()
        return sum(int(p.size) for p in self.model.parameters())

    def read_checkpoint(self, path) -> dict:
        return read_checkpoint(path)

    def restore(self, checkpoint: dict, path) -> None:
        from common.param_mapping import from_framework

        if checkpoint["optimizer"] is None:
            raise CheckpointError(f"{path}: holds weights only (no optimizer state), so training cannot resume "
                                  "from it; sample from it, or start a new run from its weights")
        for layer, key in ((self.model, "model"), (self.ema, "ema")):
            try:
                from_framework("paddle", checkpoint[key], self.spec, source=f"{path} '{key}'")
            except ValueError as err:
                raise CheckpointError(str(err)) from None
            layer.set_state_dict(checkpoint[key])
        load_optimizer_state(self.optimizer, self.model, checkpoint["optimizer"], path)

    def distribute(self) -> None:
        if self.world_size > 1:
            self.model = paddle.DataParallel(self.model)

    def loader(self, source, step_sampler, start_step: int, num_workers: int):
        return build_loader(source, step_sampler, start_step, num_workers)

    def set_learning_rate(self, lr: float) -> None:
        self.optimizer.set_lr(lr)

    def train_step(self, micro_batches, draws) -> dict[str, float]:
        prepared = []
        for (x, y, skipped), d in zip(micro_batches, draws):
            cond = paddle.to_tensor(drop_conditions(self.spec, y.numpy(), d.drop))
            inputs = {k: paddle.to_tensor(v) for k, v in d.inputs.items()}
            prepared.append((x, cond, inputs, paddle.to_tensor(d.noise), int(skipped.sum())))
        return train_step(self.model, self.objective, self.optimizer, prepared, self.config, self.device)

    def apply_update(self) -> None:
        self.optimizer.step()

    def discard_update(self) -> None:
        self.optimizer.clear_grad(set_to_zero=False)

    def nonfinite_tensors(self) -> list[str]:
        return [f"{prefix}.{name}" for prefix, layer in (("model", unwrap(self.model)), ("ema", self.ema))
                for name, param in layer.named_parameters() if not bool(paddle.isfinite(param).all())]

    def update_ema(self, decay: float) -> None:
        update_ema(self.ema, unwrap(self.model), decay)

    def save_checkpoint(self, path, step: int, metadata: dict) -> None:
        if self.rank == 0:
            model = unwrap(self.model)
            checkpoint = {"model": numpy_state(model), "ema": numpy_state(self.ema),
                          "optimizer": optimizer_state(self.optimizer, model), "step": step, **metadata}
            with atomic_path(path) as tmp:
                paddle.save(checkpoint, str(tmp))
        if self.world_size > 1:
            dist.barrier()

    def sample_grid(self, labels: np.ndarray, settings, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        x, _ = generate(self.ema, self.spec, self.recipe, settings, labels, rng, self.device)
        if self.recipe.is_latent:
            from backends.paddle.vae import decode, load_vae

            vae = load_vae(self.config["vae_path"], self.device)
            x = decode(vae, paddle.to_tensor(x), self.recipe.latent_scale).astype("float32").numpy()
        return x

    def all_reduce_sum(self, values: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1:
            return values
        tensor = paddle.to_tensor(list(values.values()), dtype="float64")
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


def main(argv=None) -> None:
    def run():
        config, config_path = parse_cli(sys.argv[1:] if argv is None else argv, TRAIN_SCHEMA, "python -m backends.paddle.train")
        train(config, config_path or "command line")

    run_cli(run)


if __name__ == "__main__":
    main()
