"""Shared bench helpers: thread set-up, timing (warm-up, then the median of repeats),
peak memory, the machine description, and the child-process protocol.

Every measured figure here is a median of ``repeats`` timed calls after ``warmup``
untimed ones; on CUDA each call is bracketed by ``torch.cuda.synchronize``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULT_TAG = "BENCH_RESULT "  # a child prints its result as one line: BENCH_RESULT {json}


def set_threads(threads: int | None = None) -> int:
    """Pin torch's intra-op threads (OMP_NUM_THREADS, else every core). Returns the count."""
    import torch

    if threads is None:
        threads = int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def resolve_device(name: str = "auto") -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def measure(fn, *, warmup: int, repeats: int, device: str = "cpu") -> dict:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; seconds."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times,
            "spread": spread(times), "warmup": warmup, "repeats": len(times)}


def spread(times) -> dict:
    """How far repeated timings scatter: min, max, quartiles, and (max - min) / median."""
    times = sorted(times)
    mid = statistics.median(times)
    if len(times) >= 2:
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    else:
        q1 = q3 = mid
    return {"min_s": times[0], "max_s": times[-1], "q1_s": q1, "q3_s": q3,
            "range_over_median": (times[-1] - times[0]) / mid if mid > 0 else None}


def load_warning(when: str) -> str | None:
    """A warning when the 1-minute load average exceeds the core count (timings are then noise)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    if load > cores:
        return (f"load average {load:.1f} at the {when} is above the {cores} cores: other work shared the "
                "machine, so absolute times are noisy (ratios measured side by side less so)")
    return None


def _proc_status_mb(field: str):
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mb() -> float:
    """This process's resident-set high-water mark in MiB.

    Linux: VmHWM of /proc/self/status (this process image only). Not ru_maxrss: Linux
    carries that across fork+exec, so a child would report its parent's peak.
    """
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def current_rss_mb():
    return _proc_status_mb("VmRSS")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    import torch

    info = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "device": device,
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        with open("/proc/meminfo") as handle:
            info["memory_gb"] = round(int(handle.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def emit(result: dict) -> None:
    """A child's last word: its result as one tagged JSON line on stdout."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def child_env(threads: int | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def looks_like_oom(text: str, returncode: int) -> bool:
    lowered = text.lower()
    return (returncode in (-9, 137) or "out of memory" in lowered or "memoryerror" in lowered
            or "can't allocate memory" in lowered or "not enough memory" in lowered
            or "defaultcpuallocator" in lowered)


def run_child(args: list[str], *, timeout: float, threads: int | None = None, env_extra: dict | None = None) -> dict:
    """Run ``python args...`` from the repo root; return its tagged result or a status.

    The result dict always has ``status``: "ok", "OOM", "timeout", "failed" or
    "not available" (a child that exits with code 3 reports its backend missing).
    """
    cmd = [sys.executable, *args]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env={**child_env(threads), **(env_extra or {})},
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        return {"status": "timeout", "timeout_s": timeout, "command": " ".join(args),
                "stderr_tail": (err.stderr or "")[-1500:] if isinstance(err.stderr, str) else ""}
    wall = time.perf_counter() - start
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
    if proc.returncode == 0 and result is not None:
        result.setdefault("status", "ok")
        result["process_wall_s"] = wall
        return result
    tail = (proc.stderr or "")[-1500:] + (proc.stdout or "")[-500:]
    if proc.returncode == 3:
        status = "not available"
    elif looks_like_oom(tail, proc.returncode):
        status = "OOM"
    else:
        status = "failed"
    return {"status": status, "returncode": proc.returncode, "command": " ".join(args),
            "stderr_tail": tail, "process_wall_s": wall}


def median(values):
    return statistics.median(values) if values else None


def step_spec(args):
    """The DiRSpec a step timer's parsed options (``step_parser``) describe."""
    from common.spec import build_spec

    overrides = {"input_size": args.input_size, "in_channels": args.in_channels, "num_classes": args.num_classes}
    for key in ("depth", "scan", "patch_size"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    return build_spec(args.model, **overrides)


def step_parser(framework: str, device_default: str = "auto", device_help: str | None = None,
                device_choices=None) -> argparse.ArgumentParser:
    """The options every backend's training-step timer shares (bench/*_train_step.py)."""
    parser = argparse.ArgumentParser(description=f"Time a DiR training step in {framework}.")
    parser.add_argument("--model", default="DiR-S/2", help="spec preset (common/spec.py)")
    parser.add_argument("--input-size", type=int, default=32, help="latent side; tokens = (side/patch)^2")
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--depth", type=int, default=None, help="override the preset's depth")
    parser.add_argument("--patch-size", type=int, default=None, help="override the preset's patch size")
    parser.add_argument("--scan", default=None, choices=["causal", "bidirectional"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (the first compiles in graph modes)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=device_default, choices=device_choices, help=device_help)
    return parser
