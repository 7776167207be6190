"""Training-step time of each installed backend on one config, as ratios to PyTorch.

Each backend has a script ``bench/<backend>_train_step.py`` run as its own child
process (``python -m bench.<backend>_train_step`` from the repo root; one framework
per process). PyTorch's is ``bench/torch_train_step.py``;
Paddle's and MindSpore's are written by those backends. The runner reads each
script's ``--help`` and passes the shared config with whichever spelling of each
option the script accepts (``--batch`` / ``--batch-size`` / ``--batch_size`` ...),
then reads the step time from the JSON the script prints (a ``BENCH_RESULT {json}``
line, or the last JSON object on stdout). A missing script, or one whose framework
is not importable, is reported as "not available", never as a failed run.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

from bench.util import REPO_ROOT, RESULT_TAG, child_env, looks_like_oom

BACKENDS = ("torch", "paddle", "mindspore")
FRAMEWORK_MODULE = {"torch": "torch", "paddle": "paddle", "mindspore": "mindspore"}

# config key -> the option spellings a script may use for it
OPTION_ALIASES = {
    "model": ["--model", "--preset"],
    "input_size": ["--input-size", "--input_size", "--image-size", "--image_size", "--size"],
    "in_channels": ["--in-channels", "--in_channels", "--channels"],
    "num_classes": ["--num-classes", "--num_classes", "--classes"],
    "depth": ["--depth"],
    "patch_size": ["--patch-size", "--patch_size"],
    "scan": ["--scan"],
    "batch": ["--batch", "--batch-size", "--batch_size", "--bs"],
    "warmup": ["--warmup", "--warmup-steps", "--warmup_steps", "--warm-up"],
    "repeats": ["--repeats", "--steps", "--iters", "--repeat", "--n-steps", "--num-steps", "--num_steps"],
    "device": ["--device"],
}
# keys whose value is a step time in seconds / milliseconds, most specific first
SECONDS_KEYS = ("step_s", "step_time_s", "median_step_s", "median_s", "seconds_per_step", "sec_per_step",
                "time_per_step_s", "step_time")
# device names a backend's script spells differently from torch's
DEVICE_NAMES = {"paddle": {"cuda": "gpu"}, "mindspore": {"cuda": "gpu"}}
MS_KEYS = ("step_ms", "step_time_ms", "median_ms", "median_step_ms", "ms_per_step")


def script_path(backend: str):
    return REPO_ROOT / "bench" / f"{backend}_train_step.py"


def _option_map(help_text: str) -> dict:
    """config key -> the first alias of it that the script's --help lists."""
    offered = set(re.findall(r"(?<![\w-])(--[A-Za-z0-9][A-Za-z0-9_-]*)", help_text))
    found = {}
    for key, aliases in OPTION_ALIASES.items():
        for alias in aliases:
            if alias in offered:
                found[key] = alias
                break
    return found


def _framework_importable(backend: str, timeout: float) -> tuple[bool, str]:
    code = f"import {FRAMEWORK_MODULE[backend]} as m; print(getattr(m, '__version__', '?'))"
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=child_env(), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, "import timed out"
    if proc.returncode != 0:
        return False, (proc.stderr.strip().splitlines() or ["import failed"])[-1]
    return True, proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "?"


def parse_result(stdout: str):
    """The script's result dict: a BENCH_RESULT line, else the last JSON object line."""
    result = None
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
    if result is not None:
        return result
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    text = stdout.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    return None


def step_seconds(result: dict):
    for key in SECONDS_KEYS:
        if isinstance(result.get(key), (int, float)):
            return float(result[key])
    for key in MS_KEYS:
        if isinstance(result.get(key), (int, float)):
            return float(result[key]) / 1e3
    for key, value in result.items():  # last resort: any *step*_s number
        if "step" in key and key.endswith("_s") and isinstance(value, (int, float)):
            return float(value)
    return None


def run_backend(backend: str, config: dict, *, timeout: float, threads=None, log=print) -> dict:
    script = script_path(backend)
    row = {"backend": backend, "script": f"bench/{script.name}"}
    if not script.exists():
        row.update(status="not available", reason=f"{row['script']} not installed")
        return row
    module = f"bench.{backend}_train_step"  # run as a module from the repo root (bench/ not on sys.path)
    env = child_env(threads)
    if backend == "torch":  # our own script: torch is importable (we run on it) and its options are known
        import torch

        row["framework_version"] = torch.__version__
        options = {key: aliases[0] for key, aliases in OPTION_ALIASES.items()}
    else:
        ok, version = _framework_importable(backend, timeout=min(timeout, 180))
        if not ok:
            row.update(status="not available", reason=f"{backend} not importable: {version}")
            return row
        row["framework_version"] = version
        try:
            help_text = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO_ROOT, env=env,
                                       capture_output=True, text=True, timeout=min(timeout, 180)).stdout
        except subprocess.TimeoutExpired:
            help_text = ""
        options = _option_map(help_text)
    args = [sys.executable, "-m", module]
    for key, value in config.items():
        if value is None:
            continue
        if key in options:
            if key == "device":
                value = DEVICE_NAMES.get(backend, {}).get(value, value)
            args += [options[key], str(value)]
        elif key not in ("device", "scan"):  # the ones a script may legitimately not take
            row.setdefault("options_not_taken", []).append(key)
    row["command"] = " ".join(["python", *args[1:]])
    start = time.perf_counter()
    try:
        proc = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        row.update(status="timeout", timeout_s=timeout)
        return row
    row["process_wall_s"] = time.perf_counter() - start
    result = parse_result(proc.stdout) if proc.returncode == 0 else None
    seconds = step_seconds(result) if result else None
    if seconds is None:
        tail = (proc.stderr or "")[-1500:] + (proc.stdout or "")[-500:]
        if proc.returncode == 3 or f"no module named '{FRAMEWORK_MODULE[backend]}" in tail.lower():
            status = "not available"
        elif looks_like_oom(tail, proc.returncode):
            status = "OOM"
        else:
            status = "failed"
        row.update(status=status, returncode=proc.returncode, output_tail=tail)
        return row
    row.update(status="ok", step_s=seconds, result=result)
    return row


def run_backends(config: dict, backends=BACKENDS, *, timeout=600, threads=None, log=print) -> dict:
    rows = []
    for backend in backends:
        row = run_backend(backend, config, timeout=timeout, threads=threads, log=log)
        rows.append(row)
        if row["status"] == "ok":
            log(f"[backends] {backend:10s} {row['step_s'] * 1e3:9.1f} ms/step")
        else:
            log(f"[backends] {backend:10s} {row['status']}: {row.get('reason', row.get('output_tail', ''))[-300:]}")
    torch_row = next((r for r in rows if r["backend"] == "torch" and r["status"] == "ok"), None)
    for row in rows:
        if torch_row and row["status"] == "ok":
            row["ratio_to_torch"] = row["step_s"] / torch_row["step_s"]
    return {"config": config, "rows": rows,
            "step": "random latents -> DDPM noising (linear betas, 1000 steps) -> DiR -> eps MSE -> backward "
                    "-> AdamW; median seconds per step after warm-up, each backend in its own process"}
