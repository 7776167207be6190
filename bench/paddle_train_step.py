"""One DiR training step in PaddlePaddle, timed: the same step as bench/torch_train_step.py.

Self-contained like the PyTorch script (it does not use backends/paddle/train.py):
sample t ~ U{0..999}, noise x0 with DiT's linear-beta schedule (1e-4 .. 0.02, 1000
steps), predict eps with DiR (the first in_channels output channels; the
learned-sigma half is ignored), MSE against the noise, backward, AdamW step (lr 1e-4,
weight decay 0). Inputs are random latents and labels, fixed across steps.

    python -m bench.paddle_train_step --model DiR-S/2 --input-size 32 --depth 2 --batch 8

prints a line ``BENCH_RESULT {json}`` with ``step_s`` (the median seconds per step
after --warmup untimed steps) and ``spec``.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:  # also runs as a file
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.util import emit, measure, peak_rss_mb  # noqa: E402  (bench.util imports no framework at module level)


def parse_args(argv=None):
    from bench.util import step_parser

    parser = step_parser("PaddlePaddle", device_help="auto | cpu | cuda (gpu) | xpu")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import numpy as np
    import paddle
    import paddle.nn.functional as F

    from backends.paddle.models import DiR
    from bench.util import step_spec

    threads = int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count() or 1
    if args.device == "auto":
        device = "gpu" if paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() else "cpu"
    else:
        device = {"cuda": "gpu"}.get(args.device, args.device)
    paddle.set_device(device)
    spec = step_spec(args)
    paddle.seed(args.seed)
    build_start = time.perf_counter()
    model = DiR.from_spec(spec, seed=args.seed)
    model.train()
    build_s = time.perf_counter() - build_start
    optimizer = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=model.parameters(), weight_decay=0.0)
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    alphas_cumprod = paddle.to_tensor(np.cumprod(1.0 - betas).astype(np.float32))

    n, c, s = args.batch, spec.in_channels, spec.input_size
    x0 = paddle.randn([n, c, s, s])
    y = paddle.randint(0, spec.num_classes, [n], dtype="int64")
    losses = []

    def step():
        t = paddle.randint(0, 1000, [n], dtype="int64")
        noise = paddle.randn(x0.shape)
        abar = paddle.gather(alphas_cumprod, t).reshape([n, 1, 1, 1])
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        loss = F.mse_loss(model(x_t, t, y)[:, :c], noise)
        optimizer.clear_grad(set_to_zero=False)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))  # like torch's .item(): waits for the device

    timing = measure(step, warmup=args.warmup, repeats=args.repeats)  # each step ends in float(loss): synchronised
    emit({"backend": "paddle", "framework_version": paddle.__version__, "device": device, "threads": threads,
          "model": args.model, "spec": spec.to_dict(), "batch": n, "tokens": spec.num_patches,
          "params": sum(int(p.size) for p in model.parameters()),
          "step_s": timing["median_s"], "times_s": timing["times_s"], "warmup": timing["warmup"],
          "repeats": timing["repeats"], "build_s": build_s,
          "peak_rss_mb": peak_rss_mb(),
          "loss_first": losses[0], "loss_last": losses[-1]})


if __name__ == "__main__":
    main()
