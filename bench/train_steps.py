"""Training-step time of each installed backend on one config, as ratios to PyTorch.

Each backend runs ``python -m bench.train_step --backend B`` in its own child process
(one framework per process): the trainer's real step through the backend's
``TrainAdapter``. A backend whose framework is not importable is reported as
"not available", never as a failed run. The backends are run in turn, ``rounds``
times (interleaved: torch, paddle, mindspore, torch, ...), so slow drift of the
machine's load reaches every backend alike; a backend's figure is the median over all
its timed steps, with the spread.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

from bench.util import REPO_ROOT, RESULT_TAG, child_env, looks_like_oom, spread

BACKENDS = ("torch", "paddle", "mindspore")
# config key -> bench.train_step option
OPTIONS = {"model": "--model", "input_size": "--input-size", "in_channels": "--in-channels",
           "num_classes": "--num-classes", "depth": "--depth", "patch_size": "--patch-size", "scan": "--scan",
           "batch": "--batch", "warmup": "--warmup", "repeats": "--repeats", "device": "--device",
           "objective": "--objective", "mindspore_mode": "--mindspore-mode", "condition": "--condition",
           "text_depth": "--text-depth", "text_max_tokens": "--text-max-tokens"}
FLAGS = {"recompute": "--recompute"}


def command(backend: str, config: dict) -> list[str]:
    args = ["-m", "bench.train_step", "--backend", backend]
    for key, value in config.items():
        if key in FLAGS:
            args += [FLAGS[key]] if value else []
        elif value is not None:
            if key not in OPTIONS:
                raise KeyError(f"bench config key '{key}' is not a bench.train_step option "
                               f"(known: {', '.join(sorted({**OPTIONS, **FLAGS}))})")
            args += [OPTIONS[key], str(value)]
    return args


def parse_result(stdout: str):
    """The child's BENCH_RESULT dict, or None."""
    result = None
    for line in stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
    return result


def run_once(backend: str, config: dict, *, timeout: float, threads=None) -> dict:
    args = command(backend, config)
    row = {"backend": backend, "command": " ".join(["python", *args])}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=child_env(threads), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        row.update(status="timeout", timeout_s=timeout)
        return row
    row["process_wall_s"] = time.perf_counter() - start
    result = parse_result(proc.stdout) if proc.returncode == 0 else None
    if result is None:
        tail = (proc.stderr or "")[-1500:] + (proc.stdout or "")[-500:]
        status = ("not available" if proc.returncode == 3 else
                  "OOM" if looks_like_oom(tail, proc.returncode) else "failed")
        row.update(status=status, returncode=proc.returncode, output_tail=tail)
        if status == "not available":
            row["reason"] = tail.strip().splitlines()[-1] if tail.strip() else "framework not installed"
        return row
    row.update(status="ok", step_s=result["step_s"], result=result)
    return row


def run_backend(backend: str, config: dict, *, timeout: float, threads=None, rounds: int = 1, log=print) -> dict:
    """``rounds`` runs of one backend (the caller interleaves backends): pooled timings."""
    return merge_rounds([run_once(backend, config, timeout=timeout, threads=threads) for _ in range(rounds)])


def merge_rounds(runs: list[dict]) -> dict:
    """One row from a backend's rounds: the median over every timed step of every round."""
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return runs[-1]
    times = [t for r in ok for t in r["result"]["times_s"]]
    row = dict(ok[-1], step_s=statistics.median(times), times_s=times, spread=spread(times),
               round_medians_s=[r["step_s"] for r in ok], rounds=len(ok))
    if len(ok) < len(runs):
        row["failed_rounds"] = [r["status"] for r in runs if r["status"] != "ok"]
    return row


def run_backends(config: dict, backends=BACKENDS, *, timeout=600, threads=None, rounds: int = 1, log=print) -> dict:
    runs = {backend: [] for backend in backends}
    for _ in range(rounds):
        for backend in backends:
            if runs[backend] and runs[backend][-1]["status"] == "not available":
                continue
            runs[backend].append(run_once(backend, config, timeout=timeout, threads=threads))
    rows = []
    for backend in backends:
        row = merge_rounds(runs[backend])
        rows.append(row)
        if row["status"] == "ok":
            s = row["spread"]
            log(f"[backends] {backend:10s} {row['step_s'] * 1e3:9.1f} ms/step (median of {len(row['times_s'])}, "
                f"{s['min_s'] * 1e3:.1f}..{s['max_s'] * 1e3:.1f})")
        else:
            log(f"[backends] {backend:10s} {row['status']}: {row.get('reason', row.get('output_tail', ''))[-300:]}")
    torch_row = next((r for r in rows if r["backend"] == "torch" and r["status"] == "ok"), None)
    for row in rows:
        if torch_row and row["status"] == "ok":
            row["ratio_to_torch"] = row["step_s"] / torch_row["step_s"]
    return {"config": config, "rows": rows, "rounds": rounds,
            "step": "each backend's trainer step (bench/train_step.py: TrainAdapter.train_step + apply_update + "
                    "update_ema) on random data; median seconds per step over every timed step of every round, "
                    "the backends interleaved round by round, each in its own process"}
