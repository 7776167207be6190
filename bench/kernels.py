"""Token-mixing kernels side by side: WKV6 chunked (``backends/torch/wkv.py: wkv6``), WKV6 through
flash-linear-attention (``wkv6_fla``, CUDA only) and DiT's attention (``scaled_dot_product_attention``),
forward + backward, at the widths of DiR-S/2 (384 = 6 heads of 64) and DiR-XL/2 (1152 = 18 heads).

On CUDA the inputs are bf16 (what training uses; WKV6's state stays fp32 in both WKV kernels); on a
CPU they are fp32 (no bf16 matmul worth timing) and fla is reported as "needs CUDA". WKV6 runs
bidirectional (DiR's default); attention is unmasked. Batch = max(1, token_budget // tokens). Each
figure is the median of ``repeats`` timed calls after ``warmup`` untimed ones, with its spread;
ratios are to SDPA at the same size, measured in the same run.

    python -m bench.kernels --tokens 256 1024 4096
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from backends.torch.wkv import fla_installed, wkv6, wkv6_fla
from bench.util import measure

WIDTHS = {"DiR-S/2": 384, "DiR-XL/2": 1152}
HEAD_SIZE = 64
KERNELS = ("chunked", "fla", "sdpa")


def _inputs(kernel, batch, tokens, heads, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, tokens, heads, HEAD_SIZE)
    if kernel == "sdpa":  # [B, H, T, K], like DiT's attention
        tensors = [torch.randn(batch, heads, tokens, HEAD_SIZE, generator=gen) for _ in range(3)]
    else:
        r, k, v = (0.5 * torch.randn(shape, generator=gen) for _ in range(3))
        w = -torch.exp(torch.empty(shape).uniform_(-6.0, -1.0, generator=gen))
        u = 0.1 * torch.randn(heads, HEAD_SIZE, generator=gen)
        tensors = [r, k, v, w, u]
    return [x.to(device, dtype).requires_grad_() for x in tensors]


def _step(kernel, tensors):
    def run():
        if kernel == "sdpa":
            out = F.scaled_dot_product_attention(*tensors)
        elif kernel == "fla":
            out = wkv6_fla(*tensors, bidirectional=True)
        else:
            out = wkv6(*tensors, bidirectional=True)
        out.float().square().mean().backward()
        for x in tensors:
            x.grad = None
    return run


def bench_kernels(tokens_list=(256, 1024, 4096), widths=tuple(WIDTHS), *, token_budget=8192, device="cpu",
                  warmup=2, repeats=5, log=print) -> dict:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    fla_ok = device.startswith("cuda") and fla_installed()
    rows = []
    for width_name in widths:
        heads = WIDTHS[width_name] // HEAD_SIZE
        for tokens in tokens_list:
            batch = max(1, token_budget // tokens)
            row = {"width": width_name, "heads": heads, "tokens": tokens, "batch": batch}
            for kernel in KERNELS:
                if kernel == "fla" and not fla_ok:
                    row[kernel] = {"status": "needs CUDA" if not device.startswith("cuda") else "fla not installed"}
                    continue
                try:
                    timing = measure(_step(kernel, _inputs(kernel, batch, tokens, heads, device, dtype)),
                                     warmup=warmup, repeats=repeats, device=device)
                    row[kernel] = {"status": "ok", "fwd_bwd_s": timing["median_s"], "times_s": timing["times_s"],
                                   "spread": timing["spread"]}
                except (RuntimeError, MemoryError) as err:
                    row[kernel] = {"status": "OOM" if "memory" in str(err).lower() else "failed",
                                   "error": str(err)[-300:]}
            for kernel in ("chunked", "fla"):
                if row[kernel]["status"] == "ok" and row["sdpa"]["status"] == "ok":
                    row[f"{kernel}_over_sdpa"] = row[kernel]["fwd_bwd_s"] / row["sdpa"]["fwd_bwd_s"]
            rows.append(row)
            log(f"[kernels] {width_name} T={tokens:5d} B={batch}: " + ", ".join(
                f"{k} {row[k]['fwd_bwd_s'] * 1e3:.2f} ms" if row[k]["status"] == "ok" else f"{k} {row[k]['status']}"
                for k in KERNELS))
    return {"config": {"tokens": list(tokens_list), "widths": {w: WIDTHS[w] for w in widths}, "head_size": HEAD_SIZE,
                       "token_budget": token_budget, "dtype": str(dtype).replace("torch.", ""), "device": device,
                       "warmup": warmup, "repeats": repeats, "wkv": "bidirectional",
                       "step": "forward + backward of the op alone (mean square of the output)"},
            "rows": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--widths", nargs="+", choices=list(WIDTHS), default=list(WIDTHS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    bench_kernels(args.tokens, args.widths, device=args.device, repeats=args.repeats)


if __name__ == "__main__":
    main()
