"""WKV6: the chunked kernel against the sequential reference, and against a plain matmul.

Inputs are [B, T, H, K] with RWKV-6-like statistics: r, k, v ~ N(0, 0.5^2), the
log-decay w = -exp(U(-6, -1)) (the range DiR's init gives, ``common/params.py``)
and the bonus u ~ N(0, 0.1^2).

"Same FLOPs" (the matmul comparison): the chunked causal forward does, per batch
element and head, with chunk length L (64), K = V = head size and N = ceil(T/L)
chunks, these matrix products:

    within-chunk scores   (r e^B) (k e^-B)^T   2 L L K  per chunk
    scores @ v                                 2 L L V  per chunk
    chunk state update    (k e^A)^T v          2 L K V  per chunk   (only when N > 1)
    state read-out        (r e^B) S            2 L K V  per chunk   (only when N > 1)

so FLOPs = B H N * 2 L (L K + L V + 2 K V) -- the multiply-adds of the algorithm,
not counting its elementwise work (exps, cumsums, masks, the bonus), which is the
overhead being measured. The baseline is one ``torch.bmm`` of [B H N, L, K] by
[B H N, K, M] with M chosen so it does exactly that many FLOPs (M = 4 L = 256 at
L = K = V = 64): the same tile sizes and batch, with no elementwise work. A large
square GEMM gives the machine's peak matmul rate, also reported.
"""
from __future__ import annotations

import gc
import time

import torch

from backends.torch import wkv as wkv_module
from backends.torch.wkv import wkv6, wkv6_reference
from bench.util import measure, synchronize


def make_inputs(batch, length, heads, head_size, device, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, length, heads, head_size)
    r, k, v = (torch.randn(shape, generator=gen) * 0.5 for _ in range(3))
    w = -torch.exp(torch.empty(shape).uniform_(-6.0, -1.0, generator=gen))
    u = torch.randn(heads, head_size, generator=gen) * 0.1
    grad_out = torch.randn(shape, generator=gen)
    tensors = [x.to(device).requires_grad_(requires_grad) for x in (r, k, v, w, u)]
    return tensors, grad_out.to(device)


def chunked_matmul_flops(batch, length, heads, head_size, chunk=wkv_module.CHUNK_SIZE):
    """Multiply-add FLOPs of the chunked causal forward (see the module docstring)."""
    n_chunks = -(-length // chunk)
    k = v = head_size
    per_chunk = 2 * chunk * (chunk * k + chunk * v + (2 * k * v if n_chunks > 1 else 0))
    return batch * heads * n_chunks * per_chunk


def _fwd(fn, tensors):
    def run():
        with torch.no_grad():
            fn(*tensors)
    return run


def _fwd_bwd(fn, tensors, grad_out):
    def run():
        for x in tensors:
            x.grad = None
        fn(*tensors).backward(grad_out)
    return run


def peak_gemm_gflops(device, size=1024, warmup=2, repeats=5):
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    timing = measure(lambda: torch.mm(a, b), warmup=warmup, repeats=repeats, device=device)
    return {"size": size, "median_s": timing["median_s"], "gflops": 2 * size**3 / timing["median_s"] / 1e9}


def bench_wkv(lengths=(256, 1024, 4096), batch=2, heads=6, head_size=64, *, device="cpu",
              warmup=1, repeats=5, ref_repeats=None, gemm_size=1024, log=print) -> dict:
    """All WKV6 figures; ``ref_repeats`` maps T -> timed repeats of the slow reference."""
    ref_repeats = ref_repeats or {}
    rows = []
    # Warm both implementations up once at a small size (allocator, first-call dispatch).
    tensors, grad_out = make_inputs(batch, min(lengths), heads, head_size, device, requires_grad=True)
    _fwd_bwd(wkv6_reference, tensors, grad_out)()
    _fwd_bwd(wkv6, tensors, grad_out)()
    peak = peak_gemm_gflops(device, gemm_size)
    log(f"[wkv] peak GEMM {peak['size']}^3: {peak['gflops']:.1f} GFLOP/s")
    for length in lengths:
        row = {"T": length, "B": batch, "H": heads, "K": head_size}
        tensors, grad_out = make_inputs(batch, length, heads, head_size, device, requires_grad=True)
        # chunked: median of `repeats` after `warmup`
        chunk_fwd = measure(_fwd(wkv6, tensors), warmup=warmup, repeats=repeats, device=device)
        chunk_fb = measure(_fwd_bwd(wkv6, tensors, grad_out), warmup=warmup, repeats=repeats, device=device)
        # the reference: slow, so few repeats (its time is long enough that noise matters less)
        n_ref = ref_repeats.get(length, 1)
        outputs = {}

        def ref_forward():
            with torch.no_grad():
                outputs["reference"] = wkv6_reference(*tensors)

        ref_fwd = measure(ref_forward, warmup=0, repeats=n_ref, device=device)
        ref_fb = measure(_fwd_bwd(wkv6_reference, tensors, grad_out), warmup=0, repeats=n_ref, device=device)
        with torch.no_grad():
            err = (wkv6(*tensors) - outputs.pop("reference")).abs().max().item()
        # the same FLOPs as one plain batched matmul
        flops = chunked_matmul_flops(batch, length, heads, head_size)
        chunk = wkv_module.CHUNK_SIZE
        tiles = batch * heads * (-(-length // chunk))
        m = max(1, round(flops / (2 * tiles * chunk * head_size)))
        a = torch.randn(tiles, chunk, head_size, device=device)
        b = torch.randn(tiles, head_size, m, device=device)
        mm = measure(lambda: torch.bmm(a, b), warmup=warmup, repeats=repeats, device=device)
        row.update({
            "chunked_fwd_s": chunk_fwd["median_s"], "chunked_fwd_bwd_s": chunk_fb["median_s"],
            "reference_fwd_s": ref_fwd["median_s"], "reference_fwd_bwd_s": ref_fb["median_s"],
            "reference_repeats": n_ref, "chunked_repeats": chunk_fwd["repeats"],
            "speedup_fwd": ref_fwd["median_s"] / chunk_fwd["median_s"],
            "speedup_fwd_bwd": ref_fb["median_s"] / chunk_fb["median_s"],
            "max_abs_err_vs_reference": err,
            "chunked_fwd_matmul_flops": flops,
            "matmul_shape": [tiles, chunk, head_size, m],
            "matmul_s": mm["median_s"],
            "chunked_fwd_over_matmul": chunk_fwd["median_s"] / mm["median_s"],
            "chunked_fwd_gflops": flops / chunk_fwd["median_s"] / 1e9,
            "matmul_gflops": flops / mm["median_s"] / 1e9,
            "chunked_fwd_over_peak_gemm": chunk_fwd["median_s"] / (flops / (peak["gflops"] * 1e9)),
            "timings": {"chunked_fwd": chunk_fwd["times_s"], "chunked_fwd_bwd": chunk_fb["times_s"],
                        "reference_fwd": ref_fwd["times_s"], "reference_fwd_bwd": ref_fb["times_s"],
                        "matmul": mm["times_s"]},
        })
        log(f"[wkv] T={length}: fwd {row['speedup_fwd']:.1f}x, fwd+bwd {row['speedup_fwd_bwd']:.1f}x faster "
            f"than the reference; chunked fwd = {row['chunked_fwd_over_matmul']:.2f}x a same-FLOPs bmm "
            f"(max |err| {err:.1e})")
        rows.append(row)
        del tensors, grad_out, a, b
        gc.collect()
    synchronize(device)
    return {"config": {"lengths": list(lengths), "B": batch, "H": heads, "K": head_size,
                       "chunk_size": wkv_module.CHUNK_SIZE, "sub_chunk_size": wkv_module.SUB_CHUNK_SIZE,
                       "warmup": warmup, "repeats": repeats, "reference_repeats": ref_repeats,
                       "inputs": "r,k,v ~ N(0,0.25); w = -exp(U(-6,-1)); u ~ N(0,0.01); fp32; causal",
                       "flops": "2 L (L K + L V + 2 K V) per chunk per (batch, head) -- see bench/wkv_bench.py"},
            "peak_gemm": peak, "rows": rows}


if __name__ == "__main__":  # python -m bench.wkv_bench: the WKV section alone
    import argparse
    import json

    from bench.util import resolve_device, set_threads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ref-repeats", type=int, default=1)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    set_threads()
    dev = resolve_device(args.device)
    start = time.perf_counter()
    out = bench_wkv(args.lengths, device=dev, repeats=args.repeats,
                    ref_repeats={t: args.ref_repeats for t in args.lengths})
    out["wall_s"] = time.perf_counter() - start
    print(json.dumps({k: v for k, v in out.items()}, indent=1, default=str))
