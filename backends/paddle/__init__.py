"""DiR in PaddlePaddle.

Importing this package (which every ``backends.paddle.*`` module does before Paddle loads) sets
``MKL_DEBUG_CPU_TYPE=5`` on AMD processors unless it is already set: Paddle's MKL otherwise takes its
generic GEMM path there (measured on an AMD EPYC: 32-38 GFLOP/s against PyTorch's 84-100, and a
DiR-S/2 training step 2.6x PyTorch's instead of 1.8x). Intel processors are left alone.
"""
import os


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


if "MKL_DEBUG_CPU_TYPE" not in os.environ and _cpu_vendor() == "AuthenticAMD":
    os.environ["MKL_DEBUG_CPU_TYPE"] = "5"
