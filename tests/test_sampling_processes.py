"""Sampling with several processes (common/sampling.py run_sampling under torchrun,
paddle.distributed.launch and msrun): 2 processes give exactly the images 1 process gives,
and rank 0 writes the one samples.npz. All three read the same PyTorch checkpoint."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from tests.conftest import REPO_ROOT, free_port, run_python  # noqa: E402
from tests.test_torch_train import TINY  # noqa: E402

SAMPLE = ["--sampler", "ddim", "--num_sampling_steps", "3", "--classes", "all", "--num_per_class", "3",
          "--batch_size", "4", "--cfg_scale", "2.0", "--save_images", "false"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    run_python(["-m", "backends.torch.train", *TINY, "--run_dir", str(run_dir), "--max_steps", "3",
                "--lr", "0.05", "--ema_decay", "0.5"])
    return run_dir / "checkpoints" / "0000003.pt"


def one_process(framework, checkpoint, out_dir):
    run_python(["-m", f"backends.{framework}.sample", "--ckpt", str(checkpoint), "--out_dir", str(out_dir), *SAMPLE],
               env_extra={"OMP_NUM_THREADS": "1"})
    return out_dir


def launched(cmd, out_dir):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    proc = subprocess.run(cmd, cwd=out_dir.parent, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out_dir


def assert_same_samples(single, multi, world_size=2):
    with np.load(single / "samples.npz") as a, np.load(multi / "samples.npz") as b:
        assert a["arr_0"].shape == (30, 8, 8, 1) and a["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(b["arr_0"], a["arr_0"])  # the same images, in the same order
        np.testing.assert_array_equal(b["labels"], a["labels"])
        assert a["arr_0"].std() > 0  # real samples, not a constant
    info = json.loads((multi / "info.json").read_text())
    assert info["world_size"] == world_size and info["num_images"] == 30
    assert not (multi / ".parts").exists()


def test_torchrun_two_processes_give_the_single_process_images(checkpoint, tmp_path):
    single = one_process("torch", checkpoint, tmp_path / "one")
    multi = launched([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                      "-m", "backends.torch.sample", "--ckpt", str(checkpoint), "--out_dir", str(tmp_path / "two"),
                      *SAMPLE], tmp_path / "two")
    assert_same_samples(single, multi)


def test_paddle_launch_two_processes_give_the_single_process_images(checkpoint, tmp_path):
    pytest.importorskip("paddle")
    single = one_process("paddle", checkpoint, tmp_path / "one")
    multi = launched([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
                      str(tmp_path / "logs"), str(REPO_ROOT / "backends/paddle/sample.py"), "--ckpt", str(checkpoint),
                      "--out_dir", str(tmp_path / "two"), *SAMPLE], tmp_path / "two")
    assert_same_samples(single, multi)


@pytest.mark.skipif(shutil.which("msrun", path=str(Path(sys.executable).parent)) is None, reason="msrun not installed")
def test_msrun_two_workers_give_the_single_process_images(checkpoint, tmp_path):
    pytest.importorskip("mindspore")
    single = one_process("mindspore", checkpoint, tmp_path / "one")
    port = free_port()
    multi = launched(["msrun", "--worker_num", "2", "--local_worker_num", "2", "--join", "True", "--master_port", port,
                      "--log_dir", str(tmp_path / "logs"), str(REPO_ROOT / "backends/mindspore/sample.py"),
                      "--ckpt", str(checkpoint), "--out_dir", str(tmp_path / "two"), *SAMPLE], tmp_path / "two")
    assert_same_samples(single, multi)
