"""The DiR benchmark, every section in one run: ``python -m bench.run [--quick | --full | --smoke]``.

Sections (``--sections`` picks a subset):

  wkv       WKV6 chunked vs the sequential reference, forward and forward+backward,
            and the chunked forward against a plain bmm of the same FLOPs
  scaling   DiR (causal, bidirectional) vs a DiT baseline of the same width, depth and
            patch: forward+backward time per image and peak memory against tokens
  kernels   WKV6 chunked vs fla's fused kernel (CUDA) vs DiT's SDPA attention, fwd+bwd, bf16 on
            CUDA, at DiR-S/2 and DiR-XL/2 widths (bench/kernels.py)
  backends_demo  one training step of the digits demo config (configs/train/digits.yaml)
            in each installed backend (PyTorch, Paddle, MindSpore), as ratios to PyTorch
  backends_text  the same for the text demo config (configs/train/digits_text.yaml: the demo's
            network plus a 2-block caption encoder with its 65,536-row embedding)
  backends  the same for DiR-S/2 at 256 tokens

Writes bench/results/<date>-<host>.json (``-full`` / ``-smoke`` appended for those
modes), the same figures as a Markdown table (.md) and PNG plots next to them. It
runs on CUDA when a device is present (``--device`` overrides) and says so in the
results. See bench/README.md for every field.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
from pathlib import Path

from bench.util import REPO_ROOT

SECTIONS = ("wkv", "scaling", "kernels", "backends_demo", "backends_text", "backends")
# configs/train/digits.yaml as a step: DiR-Tiny, 16x16x1 pixels in 4x4 patches (16 tokens), depth 4, batch 32
DEMO_STEP = dict(model="DiR-Tiny/2", input_size=16, patch_size=4, in_channels=1, num_classes=10, depth=4, batch=32)
# configs/train/digits_text.yaml as a step: the same network, captions of up to 24 ids through 2 text blocks
TEXT_STEP = dict(DEMO_STEP, condition="text", text_depth=2, text_max_tokens=24)

MODES = {
    # a few seconds: the shape of the output, not the figures (tests/test_bench_smoke.py)
    "smoke": {
        "wkv": dict(lengths=(32, 128), batch=1, heads=2, head_size=16, warmup=1, repeats=2,
                    ref_repeats={32: 1, 128: 1}, gemm_size=256),
        "scaling": dict(tokens=(16, 64), width=64, head_size=32, depth=1, token_budget=64, warmup=0, repeats=1,
                        repeats_large=None, timeout=120, in_process=True),
        "kernels": dict(tokens=(16, 64), widths=("DiR-S/2",), token_budget=64, warmup=0, repeats=1),
        "backends_demo": dict(config=dict(DEMO_STEP, depth=1, batch=2, warmup=0, repeats=1), timeout=120,
                              backends=("torch",)),
        "backends_text": dict(config=dict(TEXT_STEP, depth=1, text_depth=1, batch=2, warmup=0, repeats=1),
                              timeout=120, backends=("torch",)),
        "backends": dict(config=dict(model="DiR-Tiny/2", input_size=8, in_channels=4, num_classes=10, depth=1,
                                     batch=2, warmup=0, repeats=1), timeout=120, backends=("torch",)),
    },
    # under 10 minutes on a 2-core CPU
    "quick": {
        "wkv": dict(lengths=(256, 1024, 4096), batch=2, heads=6, head_size=64, warmup=1, repeats=7,
                    ref_repeats={256: 5, 1024: 5, 4096: 5}),
        "scaling": dict(tokens=(256, 1024, 4096, 16384), width=384, head_size=64, depth=2, token_budget=4096,
                        warmup=1, repeats=5, repeats_large=5, timeout=900,
                        models=("dit", "dir-causal", "dir-bidirectional", "dir-bidirectional+recompute")),
        "kernels": dict(tokens=(256, 1024, 4096), widths=("DiR-S/2", "DiR-XL/2"), token_budget=4096, warmup=1,
                        repeats=5),
        "backends_demo": dict(config=dict(DEMO_STEP, warmup=2, repeats=10), timeout=900,
                              backends=("torch", "paddle", "mindspore")),
        "backends_text": dict(config=dict(TEXT_STEP, warmup=2, repeats=10), timeout=900,
                              backends=("torch", "paddle", "mindspore")),
        "backends": dict(config=dict(model="DiR-S/2", input_size=32, in_channels=4, num_classes=1000, depth=2,
                                     batch=8, warmup=2, repeats=5), timeout=900,
                         backends=("torch", "paddle", "mindspore")),
    },
    # the figures to quote; about 35-45 minutes on a 2-core CPU (see bench/README.md)
    "full": {
        "wkv": dict(lengths=(256, 1024, 4096), batch=2, heads=6, head_size=64, warmup=2, repeats=11,
                    ref_repeats={256: 7, 1024: 5, 4096: 5}),
        "scaling": dict(tokens=(256, 1024, 4096, 16384), width=384, head_size=64, depth=4, token_budget=4096,
                        warmup=1, repeats=7, repeats_large=5, timeout=1800,
                        models=("dit", "dir-causal", "dir-bidirectional", "dir-bidirectional+recompute")),
        "kernels": dict(tokens=(256, 1024, 4096), widths=("DiR-S/2", "DiR-XL/2"), token_budget=8192, warmup=2,
                        repeats=11),
        "backends_demo": dict(config=dict(DEMO_STEP, warmup=3, repeats=15), timeout=1800, rounds=2,
                              backends=("torch", "paddle", "mindspore")),
        "backends_text": dict(config=dict(TEXT_STEP, warmup=3, repeats=15), timeout=1800, rounds=2,
                              backends=("torch", "paddle", "mindspore")),
        "backends": dict(config=dict(model="DiR-S/2", input_size=32, in_channels=4, num_classes=1000, depth=12,
                                     batch=8, warmup=2, repeats=5), timeout=1800, rounds=2,
                         backends=("torch", "paddle", "mindspore")),
    },
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="the default: under 10 minutes on a 2-core CPU")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="more repeats, depth 2 scaling, the full-depth DiR-S/2 step")
    mode.add_argument("--smoke", dest="mode", action="store_const", const="smoke",
                      help="tiny sizes, seconds; checks the pipeline, not the figures")
    parser.set_defaults(mode="quick")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="sections to run, in this order (default: wkv scaling backends); the results "
                             "files are rewritten after each one")
    parser.add_argument("--backends", nargs="+", choices=("torch", "paddle", "mindspore"), default=None,
                        help="backends for the training-step section (default: the mode's list)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads here and in every child (default: OMP_NUM_THREADS, else all cores)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    import torch  # noqa: F401  (after the thread variables)

    from bench.util import machine_info, resolve_device, set_threads

    threads = set_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    device = resolve_device(args.device)
    plan = MODES[args.mode]
    start = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - start:7.1f}s] {message}", flush=True)

    results = {
        "schema": 1,
        "date": datetime.date.today().isoformat(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "mode": args.mode,
        "command": "python -m bench.run " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "machine": machine_info(device),
        "section_wall_s": {},
        "notes": [],
    }
    if device.startswith("cuda"):
        results["notes"].append(f"ran on CUDA ({results['machine'].get('cuda_device')}); peak memory is "
                                "torch.cuda.max_memory_allocated")
    else:
        results["notes"].append("ran on CPU (no CUDA device); peak memory is the resident-set high-water "
                                "mark (VmHWM) of a fresh child process per configuration")
    log(f"mode {args.mode} on {device}, {threads} threads, sections {' '.join(args.sections)}")
    from bench.util import load_warning

    if warning := load_warning("start"):
        log(f"WARNING: {warning}")
        results["notes"].append(warning)

    from bench.report import evaluate_targets, write_all

    def finish(complete: bool):
        results["complete"] = complete
        results["targets"] = evaluate_targets(results) if args.mode != "smoke" else []
        results["wall_s"] = time.perf_counter() - start
        try:
            results["machine"]["load_average_end"] = list(os.getloadavg())
        except OSError:
            pass
        loads = [results["machine"].get("load_average", [0])[0], results["machine"].get("load_average_end", [0])[0]]
        cores = results["machine"].get("cpu_count") or 1
        results["notes"] = [n for n in results["notes"] if not n.startswith("the machine was busy")]
        if max(loads) > cores:
            results["notes"].append(
                f"the machine was busy: load average {loads[0]:.1f} at the start and {loads[1]:.1f} at the end on "
                f"{cores} cores (other processes competing for the cores). Many small kernels (the reference loop, "
                "the chunked kernel's elementwise work) suffer most when torch's threads are descheduled, so "
                "absolute times and the WKV ratios are pessimistic; rerun on an idle machine for figures to quote")
        return write_all(results, args.out_dir)

    for section in dict.fromkeys(args.sections):  # in the order given, each once
        t0 = time.perf_counter()
        if section == "wkv":
            from bench.wkv_bench import bench_wkv

            cfg = plan["wkv"]
            results["wkv"] = bench_wkv(cfg["lengths"], cfg["batch"], cfg["heads"], cfg["head_size"], device=device,
                                       warmup=cfg["warmup"], repeats=cfg["repeats"], ref_repeats=cfg["ref_repeats"],
                                       gemm_size=cfg.get("gemm_size", 1024), log=log)
        elif section == "scaling":
            from bench.scaling import run_scaling

            cfg = dict(plan["scaling"])
            results["scaling"] = run_scaling(cfg.pop("tokens"), device=device, threads=threads, log=log, **cfg)
        elif section == "kernels":
            from bench.kernels import bench_kernels

            cfg = dict(plan["kernels"])
            results["kernels"] = bench_kernels(cfg.pop("tokens"), cfg.pop("widths"), device=device, log=log, **cfg)
        elif section in ("backends_demo", "backends_text", "backends"):
            from bench.train_steps import run_backends

            cfg = plan[section]
            config = dict(cfg["config"], device=device)
            results[section] = run_backends(config, tuple(args.backends or cfg["backends"]),
                                            timeout=cfg["timeout"], threads=threads, rounds=cfg.get("rounds", 1),
                                            log=log)
        results["section_wall_s"][section] = time.perf_counter() - t0
        finish(complete=False)  # what is measured so far is on disk if a later section is cut short

    paths = finish(complete=True)
    for target in results["targets"]:
        state = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
        value = "-" if target["measured"] is None else f"{target['measured']:.2f}"
        log(f"target: {target['target']} {target['rule']}: {value} ({state})")
    log(f"wrote {', '.join(str(p.relative_to(REPO_ROOT) if p.is_relative_to(REPO_ROOT) else p) for p in paths.values())}")
    return results


if __name__ == "__main__":
    main()
