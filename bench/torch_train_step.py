"""One DiR training step in PyTorch, timed: the reference the other backends are compared to.

The step is self-contained (it does not use backends/torch/train.py): sample
t ~ U{0..999}, noise x0 with DiT's linear-beta schedule (1e-4 .. 0.02, 1000 steps),
predict eps with DiR (the first in_channels output channels; the learned-sigma
half is ignored), MSE against the noise, backward, AdamW step (lr 1e-4, weight
decay 0). Inputs are random latents and labels, fixed across steps.

    python -m bench.torch_train_step --model DiR-S/2 --input-size 32 --depth 2 --batch 8

prints a line ``BENCH_RESULT {json}`` with ``step_s`` (median seconds per step
after --warmup untimed steps) among other fields.
"""
from __future__ import annotations

import time


def parse_args(argv=None):
    from bench.util import step_parser

    return step_parser("PyTorch").parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F

    from backends.torch.models import DiR
    from bench.util import emit, measure, peak_rss_mb, resolve_device, set_threads
    from bench.util import step_spec

    threads = set_threads()
    device = resolve_device(args.device)
    spec = step_spec(args)
    torch.manual_seed(args.seed)
    build_start = time.perf_counter()
    model = DiR.from_spec(spec, seed=args.seed).to(device).train()
    build_s = time.perf_counter() - build_start
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1.0 - betas, 0).float().to(device)

    n, c, s = args.batch, spec.in_channels, spec.input_size
    x0 = torch.randn(n, c, s, s, device=device)
    y = torch.randint(0, spec.num_classes, (n,), device=device)
    losses = []

    def step():
        t = torch.randint(0, 1000, (n,), device=device)
        noise = torch.randn_like(x0)
        abar = alphas_cumprod[t].view(n, 1, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        loss = F.mse_loss(model(x_t, t, y)[:, :c], noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    timing = measure(step, warmup=args.warmup, repeats=args.repeats, device=device)
    emit({"backend": "torch", "framework_version": torch.__version__, "device": device, "threads": threads,
          "model": args.model, "spec": spec.to_dict(), "batch": n, "tokens": spec.num_patches,
          "params": sum(p.numel() for p in model.parameters()),
          "step_s": timing["median_s"], "times_s": timing["times_s"], "warmup": timing["warmup"],
          "repeats": timing["repeats"], "build_s": build_s, "peak_rss_mb": peak_rss_mb(),
          "loss_first": losses[0], "loss_last": losses[-1]})


if __name__ == "__main__":
    main()
