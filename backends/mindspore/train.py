"""Train DiR with MindSpore: ``python -m backends.mindspore.train -c configs/train/digits.yaml [--key value ...]``.

Several processes (data parallel, gradients averaged, data sharded by rank)::

    PATH=$PWD/.venv/bin:$PATH msrun --worker_num 2 --local_worker_num 2 --join True \\
        backends/mindspore/train.py -c configs/train/digits.yaml

The loop, schedules, draws, logs, resume and grids are ``common.trainer.run_training``;
this file is its MindSpore adapter. The config key ``mindspore_mode`` picks Graph mode (the
step's Cells compiled; the default, as in mindone) or PyNative (op by op, for debugging).

Differences from PyTorch, MindSpore idiom:

* The step is Cells: ``ForwardBackward`` (loss and gradients of one micro-batch by
  ``mindspore.value_and_grad``), ``ReduceGradients`` (mean across ranks and the global
  norm) and ``ApplyGradients`` (clipping as ``torch.nn.utils.clip_grad_norm_``, AdamW).
  Their ``construct`` is compiled in Graph mode and runs op by op in PyNative.
* The optimizer is :class:`AdamW`: PyTorch's AdamW (bias correction, decoupled decay) through
  MindSpore's fused ``ops.Adam`` kernel; weight decay only on parameters with 2+ dims.
  ``mindspore.experimental.optim.AdamW`` (the same update in ~10 ops a tensor) is its reference
  in the tests.
* Gradients are returned by ``value_and_grad``, not kept on the parameters, so the
  adapter holds the last step's reduced gradients until ``apply_update`` (or
  ``discard_update``) uses them.

Checkpoint layout (``run_dir/checkpoints/NNNNNNN.ckpt``, ``mindspore.save_checkpoint``,
written to a temp file and renamed): model parameters under their MindSpore names
(``blocks.0.att.key.weight``, ``y_embedder.embedding_table.embedding_table``,
``blocks.0.att.ln_x.gamma``), EMA under ``ema.`` + the same name, AdamW state under
``optimizer.`` (``optimizer.exp_avg.<name>``, ``optimizer.exp_avg_sq.<name>``,
``optimizer.state_step``), ``step`` (Int64 scalar), and strings (UTF-32-LE, MindSpore's
``append_dict`` encoding) ``spec``, ``recipe``, ``config`` and ``rng`` holding JSON,
``format`` = ``dir-mindspore-train``. Every draw of a step is a pure function of seed,
rank and step (``common.objectives.step_draws``), so there is no RNG state to save.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (msrun starts workers with a script path)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402
from mindspore import Parameter, Tensor, nn, ops  # noqa: E402

from backends.mindspore.data import build_loader  # noqa: E402
from backends.mindspore.models import DiR, set_execution_mode  # noqa: E402
from backends.mindspore.objectives import build_objective, generate  # noqa: E402
from common.atomic import atomic_path  # noqa: E402
from common.checkpoint import CheckpointError  # noqa: E402
from common.cli import run_cli  # noqa: E402
from common.conditions import drop_conditions  # noqa: E402
from common.config import TRAIN_SCHEMA, ConfigError, parse_cli, resolve_wkv_kernel  # noqa: E402
from common.trainer import TrainBackend, run_training  # noqa: E402

EXTENSION = "ckpt"
CHECKPOINT_FORMAT = "dir-mindspore-train"
EMA_PREFIX, OPTIMIZER_PREFIX = "ema.", "optimizer."
JSON_ENTRIES = ("spec", "recipe", "config", "rng")


# Per-parameter updates go through ``ops.HyperMap`` over tuples of parameters: Graph mode unrolls a
# Python loop over them into nested calls, and past ~300 parameters (DiR-S/2 at depth 12) that
# exceeds its call depth limit of 1000 ("Exceed function call depth limit"); a HyperMap is one node.
_decay_weights = ops.MultitypeFuncGraph("decay_weights")
_adam_update = ops.MultitypeFuncGraph("adam_update")
_ema_update = ops.MultitypeFuncGraph("ema_update")
_scale = ops.MultitypeFuncGraph("scale")
_square_norm = ops.MultitypeFuncGraph("square_norm")


@_decay_weights.register("Tensor", "Number", "Tensor")
def _decay_one(lr, weight_decay, param):
    return ops.assign(param, param * (1.0 - lr * weight_decay))


@_adam_update.register("Function", "Tensor", "Tensor", "Tensor", "Number", "Number", "Tensor",
                       "Tensor", "Tensor", "Tensor", "Tensor")
def _adam_one(adam, beta1_power, beta2_power, lr, beta1, beta2, eps, param, exp_avg, exp_avg_sq, grad):
    return adam(param, exp_avg, exp_avg_sq, beta1_power, beta2_power, lr, beta1, beta2, eps, grad)


@_ema_update.register("Tensor", "Tensor", "Tensor")
def _ema_one(decay, ema_param, param):
    return ops.assign(ema_param, ema_param * decay + param * (1.0 - decay))


@_scale.register("Tensor", "Tensor")
def _scale_one(coef, grad):
    return grad * coef


@_square_norm.register("Tensor")
def _square_norm_one(grad):
    # a dot product (BLAS) rather than (grad * grad).sum(): MindSpore's CPU reduction took 29 ms over
    # the text demo's 8.4M-entry caption embedding, the product 9 ms (relative difference ~1e-6)
    flat = grad.reshape((1, -1))
    return ops.matmul(flat, flat.T).reshape(())


class AdamW(nn.Cell):
    """PyTorch's ``torch.optim.AdamW`` with one fused ``ops.Adam`` kernel per parameter.

    ``mindspore.experimental.optim.AdamW`` takes about ten ops a tensor (155 vs 17 ms a step
    over the text demo's 10.4M parameters on 2 CPU cores). ``ops.Adam`` updates
    ``w -= lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + e)``; PyTorch's
    ``w -= lr / (1 - b1^t) m / (sqrt(v) / sqrt(1 - b2^t) + eps)`` is the same update with
    ``e = eps sqrt(1 - b2^t)``. Decoupled decay ``w *= 1 - lr wd`` comes first, as in PyTorch.

    ``groups``: ``[{"params": [...], "weight_decay": wd}, ...]``. State as the experimental
    optimizer names it (so checkpoints carry over): ``exp_avg.<name>``, ``exp_avg_sq.<name>``
    and ``state_step`` (float32 ``[1]``, steps taken). Call with the gradients, in the order of
    ``parameters``.
    """

    def __init__(self, groups, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(auto_prefix=False)
        self.parameters = ms.ParameterTuple([p for group in groups for p in group["params"]])
        decayed = [(p, float(group["weight_decay"])) for group in groups for p in group["params"]
                   if group["weight_decay"] > 0]
        self.decayed_parameters = ms.ParameterTuple([p for p, _ in decayed])
        self.decayed_rates = tuple(rate for _, rate in decayed)
        self.exp_avg = self.parameters.clone(prefix="exp_avg", init="zeros")
        self.exp_avg_sq = self.parameters.clone(prefix="exp_avg_sq", init="zeros")
        self.state_step = Parameter(Tensor([0], ms.float32), name="state_step", requires_grad=False)
        self.lr = Parameter(Tensor(lr, ms.float32), name="learning_rate", requires_grad=False)
        self.beta1, self.beta2, self.eps = float(betas[0]), float(betas[1]), float(eps)
        self.adam = ops.Adam()
        self.hyper_map = ops.HyperMap()

    def construct(self, gradients):
        ops.assign_add(self.state_step, ops.ones_like(self.state_step))
        step = self.state_step.squeeze()
        beta1_power = ops.pow(Tensor(self.beta1, ms.float32), step)
        beta2_power = ops.pow(Tensor(self.beta2, ms.float32), step)
        eps = self.eps * ops.sqrt(1.0 - beta2_power)
        decayed = self.hyper_map(ops.partial(_decay_weights, self.lr), self.decayed_rates, self.decayed_parameters)
        gradients = ops.depend(gradients, decayed)  # decay first, as PyTorch's AdamW
        return self.hyper_map(ops.partial(_adam_update, self.adam, beta1_power, beta2_power, self.lr,
                                          self.beta1, self.beta2, eps),
                              self.parameters, self.exp_avg, self.exp_avg_sq, gradients)


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
    ops.assign(optimizer.lr, Tensor(lr, ms.float32))


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
        self.hyper_map = ops.HyperMap()

    def construct(self, decay):
        done = self.hyper_map(ops.partial(_ema_update, decay), self.ema_params, self.model_params)
        return ops.depend(decay, done)


def update_ema(ema_update: EMAUpdate, decay: float) -> None:
    ema_update(Tensor(decay, ms.float32))


class ForwardBackward(nn.Cell):
    """Loss terms of one micro-batch and the gradients of its loss (divided by the accumulation count).

    Returns (loss, term names, per-term means, gradients): Graph mode cannot return a dict
    from ``value_and_grad``'s auxiliary outputs, but it can return the names as constants.
    """

    def __init__(self, model: DiR, objective, weights, accum: int):
        super().__init__(auto_prefix=False)
        self.model = model
        self.objective = objective
        self.accum = float(accum)
        self.grad_fn = ms.value_and_grad(self.loss_fn, None, weights, has_aux=True)

    def loss_fn(self, x, cond, inputs, noise):
        losses = self.objective.losses_from_inputs(self.model, x, cond, inputs, noise)
        return losses["loss"].mean() / self.accum, tuple(losses), tuple(losses[k].mean() for k in losses)

    def construct(self, x, cond, inputs, noise):
        (loss, names, means), grads = self.grad_fn(x, cond, inputs, noise)
        return loss, names, means, grads


class ReduceGradients(nn.Cell):
    """Average gradients across ranks; returns them and their global norm (one process: the norm only,
    the gradients being the caller's own)."""

    def __init__(self, world_size: int):
        super().__init__(auto_prefix=False)
        self.world_size = world_size
        self.reduce = ops.AllReduce() if world_size > 1 else None
        self.hyper_map = ops.HyperMap()

    def construct(self, grads):
        if self.world_size > 1:
            grads = self.hyper_map(ops.partial(_scale, Tensor(1.0 / self.world_size, ms.float32)),
                                   self.hyper_map(self.reduce, grads))
            return grads, ops.sqrt(ops.stack(self.hyper_map(_square_norm, grads)).sum())
        # one process: the gradients are unchanged, so only the norm leaves the graph (returning
        # them copies every gradient out of it: 42 of the text demo step's 250 ms)
        return ops.sqrt(ops.stack(self.hyper_map(_square_norm, grads)).sum())


class ApplyGradients(nn.Cell):
    """Clip gradients to a global norm (``torch.nn.utils.clip_grad_norm_``) and take an AdamW step."""

    def __init__(self, optimizer: AdamW, grad_clip: float):
        super().__init__(auto_prefix=False)
        self.optimizer = optimizer
        self.clip = grad_clip > 0
        self.max_norm = grad_clip
        self.hyper_map = ops.HyperMap()

    @ms.jit  # also under PyNative: one compiled update instead of a few hundred eager ops
    def construct(self, grads, total_norm):
        if self.clip:  # scale by min(1, max_norm / (norm + 1e-6))
            coef = ops.clamp(self.max_norm / (total_norm + 1e-6), max=1.0)
            grads = self.hyper_map(ops.partial(_scale, coef), grads)
        return ops.depend(total_norm, self.optimizer(grads))


def train_step(forward_backward: ForwardBackward, reduce_gradients: ReduceGradients, micro_batches):
    """Accumulate gradients over prepared micro-batches ``(x, cond, inputs, noise, skipped)`` and
    average them across ranks (the caller then applies them with ``ApplyGradients``, or drops
    them when they are not finite).

    Returns (this process's means of the loss terms, the gradient norm and the skipped count;
    (gradients, norm tensor) for ``ApplyGradients``). The per-sample loss inputs go in as
    ``ms.mutable``: a plain dict is a constant to Graph mode, recompiled for every new value.
    """
    accum = len(micro_batches)
    totals: dict[str, float] = {"skipped": 0.0}
    grads = None
    for x, cond, inputs, noise, skipped in micro_batches:
        _, names, means, micro_grads = forward_backward(x, cond, ms.mutable(inputs), noise)
        grads = micro_grads if grads is None else tuple(a + b for a, b in zip(grads, micro_grads))
        for key, value in zip(names, means):
            totals[key] = totals.get(key, 0.0) + float(value.asnumpy()) / accum
        totals["skipped"] += float(skipped)
    if reduce_gradients.world_size > 1:
        grads, norm = reduce_gradients(ms.mutable(tuple(grads)))
    else:
        norm = reduce_gradients(ms.mutable(tuple(grads)))
    totals["grad_norm"] = float(norm.asnumpy())
    return totals, (grads, norm)


def read_checkpoint(path) -> dict:
    """A training .ckpt as {'model': {name: ndarray}, 'ema': ..., 'optimizer': ..., 'step', 'rng',
    'config', 'spec'(, 'recipe')} (the layout ``common.training.check_train_checkpoint`` expects;
    the JSON entries decoded)."""
    try:
        raw = ms.load_checkpoint(str(path))
    except Exception as err:  # noqa: BLE001 - MindSpore raises ValueError/RuntimeError for bad files
        raise CheckpointError(f"{path}: not a readable MindSpore checkpoint ({err})") from None
    checkpoint = {"model": {}, "ema": {}, "optimizer": {}}
    for name, value in raw.items():
        if name == "format" or name in JSON_ENTRIES:
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
        for key in JSON_ENTRIES:
            if isinstance(checkpoint.get(key), str):
                checkpoint[key] = json.loads(checkpoint[key])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: entry '{key}' is not valid JSON ({err})") from None
    return checkpoint


def _load_state(model_like: DiR, state: dict[str, np.ndarray], path, what: str) -> None:
    """Copy a MindSpore-named state (names as ``parameters_and_names`` gives them) into a model."""
    from common.param_mapping import from_framework

    try:
        canonical = from_framework("mindspore", state, model_like.spec, source=f"{path} ({what})")
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    model_like.load_canonical(canonical)


def _launched_by_msrun() -> bool:
    return "MS_WORKER_NUM" in os.environ or "MS_ROLE" in os.environ


def _barrier() -> None:
    ops.AllReduce()(Tensor(np.zeros(1, np.float32))).asnumpy()


class TrainAdapter(TrainBackend):
    """The MindSpore side of ``common.trainer.run_training``."""

    framework = "mindspore"
    extension = EXTENSION

    def setup(self, config: dict) -> None:
        self.config = config
        resolve_wkv_kernel(config.get("wkv_kernel", "auto"), "mindspore", on_cuda=False, fla_installed=False)  # "fla" is refused
        if config["precision"] == "bf16":
            raise ConfigError("key 'precision' = 'bf16' is not supported by the MindSpore backend "
                              "(no bf16 kernels on CPU; use fp32)")
        target = set_execution_mode(config["mindspore_mode"], config["device"])
        if config["device"] == "cuda" and target != "GPU":
            raise ConfigError("key 'device' = 'cuda' but MindSpore has no GPU here")
        self.device = f"{target} ({config['mindspore_mode']} mode)"
        if _launched_by_msrun():
            from mindspore.communication import get_group_size, get_rank, init

            init()
            self.rank, self.world_size = get_rank(), get_group_size()

    def build(self, spec, recipe, config) -> int:
        self.spec, self.recipe = spec, recipe
        self.model = DiR.from_spec(spec, seed=config["seed"])
        self.model.set_recompute(config.get("recompute", False))
        self.ema = build_ema(self.model)
        self.optimizer = build_optimizer(self.model, config)
        self.objective = build_objective(recipe, spec.learn_sigma)
        self.forward_backward = ForwardBackward(self.model, self.objective, self.optimizer.parameters,
                                                config["grad_accum_steps"])
        self.reduce_gradients = ReduceGradients(self.world_size)
        self.apply_gradients = ApplyGradients(self.optimizer, config["grad_clip"])
        self.ema_update = EMAUpdate(self.ema, self.model)
        self.pending = None
        self.model.set_train(True)
        return sum(int(np.prod(p.shape)) for p in self.model.get_parameters())

    def read_checkpoint(self, path) -> dict:
        return read_checkpoint(path)

    def restore(self, checkpoint: dict, path) -> None:
        if not checkpoint["optimizer"]:
            raise CheckpointError(f"{path}: holds weights only (no optimizer state), so training cannot resume "
                                  "from it; sample from it, or start a new run from its weights")
        _load_state(self.model, checkpoint["model"], path, "model")
        _load_state(self.ema, checkpoint["ema"], path, "ema")
        saved = checkpoint["optimizer"]
        for param in list(self.optimizer.exp_avg) + list(self.optimizer.exp_avg_sq) + [self.optimizer.state_step]:
            if param.name not in saved:
                raise CheckpointError(f"{path}: optimizer state '{OPTIMIZER_PREFIX}{param.name}' is missing")
            param.set_data(Tensor(saved[param.name]).astype(param.dtype))

    def loader(self, source, step_sampler, start_step: int, num_workers: int):
        return build_loader(source, step_sampler, start_step, num_workers)

    def set_learning_rate(self, lr: float) -> None:
        set_learning_rate(self.optimizer, lr)

    def train_step(self, micro_batches, draws) -> dict[str, float]:
        prepared = []
        for (x, y, skipped), d in zip(micro_batches, draws):
            cond = Tensor(drop_conditions(self.spec, y, d.drop))
            inputs = {k: Tensor(v) for k, v in d.inputs.items()}
            prepared.append((Tensor(x), cond, inputs, Tensor(d.noise), int(skipped.sum())))
        totals, self.pending = train_step(self.forward_backward, self.reduce_gradients, prepared)
        return totals

    def apply_update(self) -> None:
        grads, norm = self.pending
        self.apply_gradients(ms.mutable(grads), norm)
        self.pending = None

    def discard_update(self) -> None:
        self.pending = None

    def nonfinite_tensors(self) -> list[str]:
        return [f"{prefix}.{name}" for prefix, cell in (("model", self.model), ("ema", self.ema))
                for name, param in cell.parameters_and_names() if not np.isfinite(param.asnumpy()).all()]

    def update_ema(self, decay: float) -> None:
        update_ema(self.ema_update, decay)

    def save_checkpoint(self, path, step: int, metadata: dict) -> None:
        if self.rank == 0:
            model_entries = [{"name": name, "data": Tensor(p.asnumpy())} for name, p in self.model.parameters_and_names()]
            ema_entries = [{"name": EMA_PREFIX + name, "data": Tensor(p.asnumpy())}
                           for name, p in self.ema.parameters_and_names()]
            opt_params = list(self.optimizer.exp_avg) + list(self.optimizer.exp_avg_sq) + [self.optimizer.state_step]
            opt_entries = [{"name": OPTIMIZER_PREFIX + p.name, "data": Tensor(p.asnumpy())} for p in opt_params]
            extra = {"format": CHECKPOINT_FORMAT, "step": int(step),
                     **{key: json.dumps(metadata[key]) for key in JSON_ENTRIES if key in metadata}}
            with atomic_path(path) as tmp:
                written = Path(str(tmp) + ".ckpt")  # save_checkpoint appends '.ckpt' to other names
                try:
                    ms.save_checkpoint(model_entries + ema_entries + opt_entries, str(written), append_dict=extra)
                    os.replace(written, tmp)
                finally:
                    if written.exists():
                        written.unlink()
        if self.world_size > 1:
            _barrier()

    def sample_grid(self, labels: np.ndarray, settings, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        x, _ = generate(self.ema, self.spec, self.recipe, settings, labels, rng)
        if self.recipe.is_latent:
            from backends.mindspore.vae import decode, load_vae

            vae = load_vae(self.config["vae_path"])
            x = decode(vae, Tensor(x), self.recipe.latent_scale).astype(ms.float32).asnumpy()
        return x

    def all_reduce_sum(self, values: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1:
            return values
        total = ops.AllReduce()(Tensor(np.asarray(list(values.values()), dtype=np.float32)))
        return dict(zip(values, total.asnumpy().tolist()))

    def finish(self) -> None:
        if self.world_size > 1:
            _barrier()


def train(config: dict, source_name: str = "config") -> dict:
    """Run one training job; returns the end state {'step', 'loss', 'checkpoint', 'recipe', 'model', 'ema'}."""
    backend = TrainAdapter()
    result = run_training(config, backend, source_name)
    return {**result, "model": backend.model, "ema": backend.ema}


def main(argv=None) -> None:
    def run():
        config, config_path = parse_cli(sys.argv[1:] if argv is None else argv, TRAIN_SCHEMA,
                                        "python -m backends.mindspore.train")
        train(config, config_path or "command line")

    run_cli(run)


if __name__ == "__main__":
    main()
