"""DiR against DiT: forward+backward time per image and peak memory against token count.

Each (model, tokens) configuration runs in a fresh child process
(``python -m bench.scaling --model ... --tokens ...``), so its memory high-water
mark is its own and one OOM does not end the run; the parent collects the tagged
JSON line each child prints.

Memory. On CPU, "peak memory" is the child's resident-set high-water mark
(VmHWM in /proc/self/status; ru_maxrss would carry the parent's peak across
fork+exec), reported twice: the whole process (interpreter, torch, model, inputs:
``peak_mem_mb``) and the growth during the warm-up and timed steps (``step_peak_mb``:
the high-water mark is reset to the current RSS just before them through
/proc/self/clear_refs, so this is the activations, gradients and workspace a step
needs). RSS sees every allocation torch makes on CPU (tracemalloc would not); it is
taken in a second child of one step run with ``MALLOC_MMAP_THRESHOLD_=131072``, so glibc
returns every freed tensor to the system and the high-water mark follows the live tensors
rather than the heap's cached pages (with glibc's adaptive default the same step read up to
1.5x higher, and varied run to run). On CUDA it is ``torch.cuda.max_memory_allocated`` minus
the bytes allocated before the steps.
"""
from __future__ import annotations

import argparse
import math
import time

MODELS = ("dit", "dir-causal", "dir-bidirectional")
RECOMPUTE_SUFFIX = "+recompute"  # "dir-bidirectional+recompute": the same model with recompute: true
ALL_MODELS = MODELS + tuple(m + RECOMPUTE_SUFFIX for m in MODELS if m != "dit")
# glibc serves allocations below its (adaptive, up to 32 MB) mmap threshold from the heap and keeps
# freed heap pages resident, so the RSS high-water mark would count memory long freed. A fixed
# 128 kB threshold maps every tensor of note on its own and unmaps it when freed: the peak RSS then
# follows the live tensors. It slows allocation, so memory is measured in a child of its own.
MEMORY_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def build(model: str, tokens: int, depth: int, width: int, head_size: int, patch: int = 2,
          in_channels: int = 4, num_classes: int = 1000):
    import torch  # noqa: F401

    from backends.torch.models import DiR
    from bench.dit import DiT
    from common.spec import build_spec

    side = math.isqrt(tokens)
    if side * side != tokens:
        raise SystemExit(f"--tokens {tokens} is not a square grid")
    recompute = model.endswith(RECOMPUTE_SUFFIX)
    model = model.removesuffix(RECOMPUTE_SUFFIX)
    scan = "causal" if model == "dir-causal" else "bidirectional"
    spec = build_spec("DiR-S/2", input_size=side * patch, patch_size=patch, in_channels=in_channels,
                      num_classes=num_classes, depth=depth, hidden_size=width, head_size=head_size,
                      scan=scan, mix_lora_rank=min(32, width // 4), decay_lora_rank=min(64, width // 2))
    net = DiT(spec) if model == "dit" else DiR.from_spec(spec, seed=0)
    if recompute:
        net.set_recompute(True)
    return net, spec


def worker(args) -> dict:
    import torch

    from bench.util import current_rss_mb, emit, measure, peak_rss_mb, reset_peak_rss, set_threads, synchronize

    set_threads()
    device = args.device
    torch.manual_seed(0)
    net, spec = build(args.model, args.tokens, args.depth, args.width, args.head_size)
    net = net.to(device).train()
    n = args.batch
    x = torch.randn(n, spec.in_channels, spec.input_size, spec.input_size, device=device)
    t = torch.randint(0, 1000, (n,), device=device)
    y = torch.randint(0, spec.num_classes, (n,), device=device)
    target = torch.randn(n, spec.out_channels, spec.input_size, spec.input_size, device=device)

    def step():
        net.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(net(x, t, y), target)
        loss.backward()

    rss_before = current_rss_mb() if reset_peak_rss() else None
    if rss_before is None:  # no reset: the high-water mark so far is the baseline
        rss_before = peak_rss_mb()
    if device.startswith("cuda"):
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        allocated_before = torch.cuda.memory_allocated()
    timing = measure(step, warmup=args.warmup, repeats=args.repeats, device=device)
    result = {
        "model": args.model, "tokens": args.tokens, "batch": n, "depth": args.depth, "width": args.width,
        "heads": spec.num_heads, "head_size": spec.head_size, "patch_size": spec.patch_size,
        "input_size": spec.input_size, "params": sum(p.numel() for p in net.parameters()),
        "fwd_bwd_s": timing["median_s"], "per_image_s": timing["median_s"] / n,
        "times_s": timing["times_s"], "warmup": timing["warmup"], "repeats": timing["repeats"],
        "device": device,
    }
    if device.startswith("cuda"):
        result["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["step_peak_mb"] = (torch.cuda.max_memory_allocated() - allocated_before) / 2**20
        result["memory_method"] = "torch.cuda.max_memory_allocated"
    else:
        peak = peak_rss_mb()
        result["peak_mem_mb"] = peak
        result["step_peak_mb"] = max(0.0, peak - rss_before)
        result["memory_method"] = "VmHWM of a fresh child process, reset before the timed steps"
    if args.model == "dit":
        from bench.dit import sdpa_backend

        result["sdpa_backend"] = sdpa_backend(device, args.tokens, spec.num_heads, spec.head_size)
    emit(result)
    return result


def fit_slope(tokens, times):
    """Least-squares slope of log(time) against log(tokens)."""
    pts = [(math.log(a), math.log(b)) for a, b in zip(tokens, times) if a and b]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def run_scaling(tokens_list, *, depth, width=384, head_size=64, token_budget=4096, warmup=1, repeats=5,
                repeats_large=None, device="cpu", timeout=900, models=MODELS, threads=None, in_process=False,
                log=print) -> dict:
    """Every (model, tokens) pair in its own child; batch = max(1, token_budget // tokens). On CPU
    the memory comes from a second child of one step (``MEMORY_CHILD_ENV``).

    ``in_process`` runs them here instead (no process start-up, no memory isolation: the
    smoke mode's shortcut, never used for figures).
    """
    from bench.util import run_child

    rows = []
    for tokens in tokens_list:
        batch = max(1, token_budget // tokens)
        reps = repeats_large if (repeats_large and tokens >= 16384) else repeats
        for model in models:
            args = ["-m", "bench.scaling", "--model", model, "--tokens", str(tokens), "--batch", str(batch),
                    "--depth", str(depth), "--width", str(width), "--head-size", str(head_size),
                    "--warmup", str(warmup), "--repeats", str(reps), "--device", device]
            start = time.perf_counter()
            if in_process:
                try:
                    res = dict(worker(build_parser().parse_args(args[2:])), status="ok")
                except (MemoryError, RuntimeError) as err:
                    res = {"status": "OOM" if "memory" in str(err).lower() else "failed", "error": str(err)[-500:]}
            else:
                res = run_child(args, timeout=timeout, threads=threads)
                if res["status"] == "ok" and not device.startswith("cuda"):
                    one_step = args[:args.index("--warmup")] + ["--warmup", "0", "--repeats", "1", "--device", device]
                    mem = run_child(one_step, timeout=timeout, threads=threads, env_extra=MEMORY_CHILD_ENV)
                    if mem["status"] == "ok":
                        res.update(peak_mem_mb=mem["peak_mem_mb"], step_peak_mb=mem["step_peak_mb"],
                                   memory_method=mem["memory_method"] + " (a one-step child with "
                                   "MALLOC_MMAP_THRESHOLD_=131072, so freed tensors leave the RSS)")
                    else:
                        res.update(memory_status=mem["status"])
            res.update({"model": model, "tokens": tokens, "batch": batch, "depth": depth})
            rows.append(res)
            if res["status"] == "ok":
                log(f"[scaling] {model:18s} T={tokens:6d} batch={batch}: {res['per_image_s'] * 1e3:9.1f} ms/image, "
                    f"peak {res['peak_mem_mb']:.0f} MB (step {res['step_peak_mb']:.0f} MB)")
            else:
                log(f"[scaling] {model:18s} T={tokens:6d}: {res['status']} after {time.perf_counter() - start:.0f} s")
    summary = summarise(rows, tokens_list, models)
    return {"config": {"tokens": list(tokens_list), "depth": depth, "width": width, "head_size": head_size,
                       "heads": width // head_size, "patch_size": 2, "in_channels": 4,
                       "token_budget": token_budget, "batch_rule": "batch = max(1, token_budget // tokens)",
                       "warmup": warmup, "repeats": repeats, "repeats_large": repeats_large,
                       "isolation": "in-process (smoke)" if in_process else "one child process per configuration",
                       "step": "model(x, t, y) -> MSE against a random target -> backward (no optimizer)",
                       "memory": " ".join(__doc__.split("Memory.", 1)[1].split()).replace("``", "`")},
            "rows": rows, "summary": summary}


def summarise(rows, tokens_list, models=MODELS) -> dict:
    ok = {(r["model"], r["tokens"]): r for r in rows if r.get("status") == "ok"}
    summary = {"slopes": {}, "slopes_last_two": {}, "ratios": {}}
    for model in models:
        pts = [(t, ok[(model, t)]["per_image_s"]) for t in tokens_list if (model, t) in ok]
        summary["slopes"][model] = fit_slope([p[0] for p in pts], [p[1] for p in pts])
        summary["slopes_last_two"][model] = fit_slope([p[0] for p in pts[-2:]], [p[1] for p in pts[-2:]])
    ratios = {}
    for t in tokens_list:
        if ("dit", t) not in ok:
            continue
        for model in models:
            if model != "dit" and (model, t) in ok:
                ratios[f"dit_over_{model}@{t}"] = ok[("dit", t)]["per_image_s"] / ok[(model, t)]["per_image_s"]
    for model in models:
        if (model, 16384) in ok and (model, 4096) in ok:
            ratios[f"{model}_16384_over_4096"] = ok[(model, 16384)]["per_image_s"] / ok[(model, 4096)]["per_image_s"]
    summary["ratios"] = ratios
    return summary


def build_parser():
    parser = argparse.ArgumentParser(description="One DiR/DiT forward+backward configuration (a bench child).")
    parser.add_argument("--model", choices=ALL_MODELS, required=True)
    parser.add_argument("--tokens", type=int, required=True, help="a square number: (input_size/2)^2")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    return parser


def main(argv=None):
    worker(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
