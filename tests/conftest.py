"""Shared test set-up: thread counts first (torch slows badly when cores are oversubscribed)."""
import os
import subprocess
import sys
from pathlib import Path

# Under pytest-xdist (the README's command runs two workers) each worker and every process it
# starts gets one thread, so two workers never oversubscribe the two cores.
THREADS = "1" if os.environ.get("PYTEST_XDIST_WORKER") else os.environ.get("OMP_NUM_THREADS", "2")
os.environ["OMP_NUM_THREADS"] = THREADS
os.environ["MKL_NUM_THREADS"] = THREADS

import pytest  # noqa: E402

# MindSpore and Paddle both ship libdnnl.so.3, and Paddle's lacks symbols MindSpore needs:
# whichever test files are collected, MindSpore must be loaded first.
try:
    import mindspore  # noqa: E402,F401
except ImportError:
    pass

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_python(code_or_args, *, env_extra=None, timeout=600, cwd=REPO_ROOT):
    """Run a fresh interpreter from the repo root (one framework per process).

    ``code_or_args`` is a list of arguments after ``python`` (for example
    ``["-m", "backends.torch.train", ...]``). Raises with the child's output on failure.
    """
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), **(env_extra or {}))
    proc = subprocess.run([sys.executable, *code_or_args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"python {' '.join(map(str, code_or_args))} failed ({proc.returncode}):\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


def free_port() -> str:
    """A TCP port nobody listens on now (tests run in parallel workers: no fixed ports)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


@pytest.fixture
def repo_root():
    return REPO_ROOT


def cli_error(main, argv, capsys) -> str:
    """Run a command line's ``main(argv)`` expecting bad input: exit code 2 and one line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2, f"exit code {exit_info.value.code}, expected 2"
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]
