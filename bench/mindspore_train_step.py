"""One DiR training step in MindSpore (PyNative or Graph mode), timed.

The same step as bench/torch_train_step.py: t ~ U{0..999}, DiT's linear-beta
schedule, eps MSE on the first in_channels output channels, AdamW (lr 1e-4, weight
decay 0). The gradients come from ``mindspore.value_and_grad``; under ``--mode graph``
the whole step (forward, backward, AdamW) is one compiled ``construct``, under
``--mode pynative`` it runs op by op (the AdamW update is ``ms.jit`` as in training).

    python -m bench.mindspore_train_step --model DiR-S/2 --input-size 32 --batch 8 --mode graph

prints one JSON line ``{"mode": ..., "step_s": ...}`` (the median; plus the build/compile
time and the losses); with ``--tag`` it is prefixed ``BENCH_RESULT `` like the torch child.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    from bench.util import step_parser

    parser = step_parser("MindSpore", device_default="cpu", device_choices=["auto", "cpu", "ascend", "gpu"])
    parser.add_argument("--mode", default="graph", choices=["pynative", "graph"])
    parser.add_argument("--tag", action="store_true", help="prefix the JSON line with 'BENCH_RESULT '")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import mindspore as ms
    import numpy as np
    from mindspore import Tensor, nn, ops
    from mindspore.experimental.optim import AdamW

    from backends.mindspore.models import DiR, set_execution_mode
    from bench.util import measure, step_spec

    target = set_execution_mode(args.mode, args.device)
    threads = int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count() or 1
    ms.set_context(runtime_num_threads=threads)
    spec = step_spec(args)
    ms.set_seed(args.seed)
    build_start = time.perf_counter()
    model = DiR.from_spec(spec, seed=args.seed)
    model.set_train(True)
    optimizer = AdamW(model.trainable_params(), lr=1e-4, weight_decay=0.0)
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    alphas_cumprod = Tensor(np.cumprod(1.0 - betas).astype(np.float32))
    c = spec.in_channels

    class Step(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.model, self.optimizer = model, optimizer
            self.grad_fn = ms.value_and_grad(self.loss_fn, None, optimizer.parameters)

        def loss_fn(self, x0, y, t, noise):
            abar = ops.gather(alphas_cumprod, t, 0).reshape(-1, 1, 1, 1)
            x_t = ops.sqrt(abar) * x0 + ops.sqrt(1 - abar) * noise
            return ((self.model(x_t, t, y)[:, :c] - noise) ** 2).mean()

        def construct(self, x0, y, t, noise):
            loss, grads = self.grad_fn(x0, y, t, noise)
            self.optimizer(ms.mutable(grads))  # a variable tuple, so an eager call does not recompile
            return loss

    step_cell = Step()
    if args.mode == "pynative":  # the AdamW update compiled, as in backends/mindspore/train.py
        step_cell.optimizer.construct = ms.jit(step_cell.optimizer.construct)
    rng = np.random.default_rng(args.seed)
    n, s = args.batch, spec.input_size
    x0 = Tensor(rng.standard_normal((n, c, s, s), dtype=np.float32))
    y = Tensor(rng.integers(0, spec.num_classes, n))
    build_s = time.perf_counter() - build_start
    losses = []

    def step():
        t = Tensor(rng.integers(0, 1000, n))
        noise = Tensor(rng.standard_normal((n, c, s, s), dtype=np.float32))
        losses.append(float(step_cell(x0, y, t, noise).asnumpy()))

    first_start = time.perf_counter()
    step()
    first_s = time.perf_counter() - first_start
    timing = measure(step, warmup=max(0, args.warmup - 1), repeats=args.repeats)  # asnumpy() synchronises
    result = {"backend": "mindspore", "framework_version": ms.__version__, "mode": args.mode, "device": target,
              "threads": threads, "model": args.model, "spec": spec.to_dict(), "batch": n, "tokens": spec.num_patches,
              "step_s": timing["median_s"], "times_s": timing["times_s"],
              "first_step_s": first_s, "build_s": build_s, "warmup": args.warmup, "repeats": args.repeats,
              "loss_first": losses[0], "loss_last": losses[-1]}
    print(("BENCH_RESULT " if args.tag else "") + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
