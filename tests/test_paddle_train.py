"""Paddle training and sampling end to end on a tiny model (each run in its own interpreter):
checkpoints that load without running code and carry the recipe, an exact resume (DDPM and
flow matching), the sample CLI, and 2-process CPU data parallel through paddle.distributed.launch."""
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("paddle")

from common.formats import load_pdparams  # noqa: E402
from common.param_mapping import from_framework  # noqa: E402
from common.spec import DiRSpec  # noqa: E402
from common.training import TRAIN_CHECKPOINT_KEYS  # noqa: E402
from tests.conftest import run_python  # noqa: E402

pytestmark = pytest.mark.paddle

TINY = ["-c", "configs/train/digits.yaml", "--image_size", "8", "--patch_size", "4", "--depth", "1",
        "--hidden_size", "32", "--head_size", "16", "--mix_lora_rank", "4", "--decay_lora_rank", "8",
        "--global_batch_size", "8", "--warmup_steps", "2", "--log_every", "1", "--ckpt_every", "2",
        "--sample_steps", "2", "--sample_per_class", "1", "--resume", "null"]


FLOW = ["--objective", "flow", "--learn_sigma", "false", "--flow_time_sampling", "logit_normal",
        "--sample_sampler", "euler"]


def train(run_dir, *extra, steps=4, as_file=False):
    """``as_file``: run backends/paddle/train.py as a script, the way paddle.distributed.launch runs it."""
    entry = ["backends/paddle/train.py"] if as_file else ["-m", "backends.paddle.train"]
    return run_python([*entry, *TINY, "--run_dir", str(run_dir), "--max_steps", str(steps), *extra])


def losses(run_dir):
    return {row["step"]: row["loss"] for row in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())
            if "loss" in row}


def assert_resume_is_exact(run, resumed, *extra):
    """Resume a copy of ``run``'s step-2 checkpoint to step 4: the same losses, weights and AdamW moments."""
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "checkpoints" / "0000002.pdparams", resumed / "checkpoints")
    proc = train(resumed, "--resume", "auto", "--sample_every", "-1", *extra)
    assert "resumed from" in proc.stdout + proc.stderr
    assert [losses(resumed)[k] for k in (3, 4)] == [losses(run)[k] for k in (3, 4)]  # bit-exact in fp32
    a = load_pdparams(run / "checkpoints" / "0000004.pdparams")
    b = load_pdparams(resumed / "checkpoints" / "0000004.pdparams")
    for key in ("model", "ema"):
        assert all(np.array_equal(a[key][name], b[key][name]) for name in a[key]), key
    for name, value in a["optimizer"]["accumulators"].items():
        assert np.array_equal(value, b["optimizer"]["accumulators"][name]), name


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("paddle_run")
    train(run_dir)
    return run_dir


def test_run_writes_checkpoints_logs_and_a_grid(run):
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["0000002.pdparams", "0000004.pdparams"]
    assert (run / "samples" / "0000004.png").is_file() and (run / "config.yaml").is_file()
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    metrics = [row for row in rows if "loss" in row]
    assert [row["step"] for row in metrics] == [1, 2, 3, 4]
    assert all(np.isfinite(row["loss"]) and row["grad_norm"] > 0 for row in metrics)
    assert rows[0]["event"] == "start" and rows[-1]["event"] == "end"


def test_checkpoint_is_plain_data_in_canonical_names(run):
    checkpoint = load_pdparams(run / "checkpoints" / "0000004.pdparams")  # refuses anything but arrays/plain data
    assert set(checkpoint) == {*TRAIN_CHECKPOINT_KEYS, "recipe"}
    assert checkpoint["recipe"]["objective"] == "ddpm" and checkpoint["recipe"]["noise_schedule"] == "cosine"
    spec = DiRSpec.from_dict(checkpoint["spec"])
    for key in ("model", "ema"):
        canonical = from_framework("paddle", checkpoint[key], spec)  # same names, Linear weights [in, out]
        assert all(np.isfinite(v).all() for v in canonical.values())
    assert checkpoint["step"] == 4 and checkpoint["config"]["max_steps"] == 4
    accumulators = checkpoint["optimizer"]["accumulators"]
    assert "blocks.0.att.key.weight.moment1" in accumulators
    # No RNG state to keep: every draw of a step is a function of (seed, world_size, rank, step).
    assert checkpoint["rng"]["kind"] == "per-step" and checkpoint["rng"]["world_size"] == 1


def test_resume_continues_exactly(run, tmp_path):
    assert_resume_is_exact(run, tmp_path / "resumed")


def test_flow_run_trains_resumes_exactly_and_samples(tmp_path):
    run = tmp_path / "flow"
    train(run, *FLOW, as_file=True)
    checkpoint = load_pdparams(run / "checkpoints" / "0000004.pdparams")
    recipe = checkpoint["recipe"]
    assert recipe["objective"] == "flow" and recipe["flow_time_sampling"] == "logit_normal"
    assert recipe["flow_path"] == "linear" and "diffusion_steps" not in recipe
    assert not DiRSpec.from_dict(checkpoint["spec"]).learn_sigma  # a flow model predicts no variance
    assert (run / "samples" / "0000004.png").is_file()  # the training grid, with the euler sampler
    assert all(np.isfinite(v) for v in losses(run).values())
    assert_resume_is_exact(run, tmp_path / "resumed", *FLOW)
    out = tmp_path / "samples"
    run_python(["-m", "backends.paddle.sample", "-c", "configs/sample/digits.yaml", "--ckpt", str(run),
                "--classes", "[0, 5]", "--num_per_class", "2", "--sampler", "sde", "--num_sampling_steps", "3",
                "--out_dir", str(out)])
    info = json.loads((out / "info.json").read_text())
    assert info["recipe"]["objective"] == "flow" and info["sampler"]["sampler"] == "sde"
    assert info["sampler"]["nfe"] == 3 and info["framework"] == "paddle"
    with np.load(out / "samples.npz") as data:
        assert data["arr_0"].shape == (4, 8, 8, 1) and list(data["arr_1"]) == [0, 0, 5, 5]


def test_sample_cli_writes_the_common_outputs(run, tmp_path):
    out = tmp_path / "samples"
    run_python(["-m", "backends.paddle.sample", "-c", "configs/sample/digits.yaml", "--ckpt", str(run),
                "--classes", "[1, three]", "--num_per_class", "2", "--sampler", "ddim", "--num_sampling_steps", "3",
                "--batch_size", "3", "--out_dir", str(out), "--paddle_to_static", "false"])
    with np.load(out / "samples.npz") as data:
        assert data["arr_0"].shape == (4, 8, 8, 1) and data["arr_0"].dtype == np.uint8
        assert list(data["arr_1"]) == [1, 1, 3, 3]
    assert (out / "grid.png").is_file() and len(list((out / "images").iterdir())) == 4


def test_bad_checkpoint_is_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "0000001.pdparams"
    path.write_bytes(b"not a pickle")
    with pytest.raises(AssertionError, match="error: .*0000001.pdparams"):
        run_python(["-m", "backends.paddle.sample", "-c", "configs/sample/digits.yaml", "--ckpt", str(path)])


def test_bf16_is_refused_on_cpu_with_a_clear_error(tmp_path):
    with pytest.raises(AssertionError, match=r"failed \(2\)[\s\S]*error: key 'precision' = 'bf16' needs a GPU or XPU"):
        train(tmp_path, "--precision", "bf16", steps=1)


DDP_WORKER = r'''
import sys
import numpy as np
from backends.paddle import train

original = train.TrainAdapter.save_checkpoint

def save_and_dump(self, path, step, metadata):
    np.savez(f"{self.config['run_dir']}/rank{self.rank}_step{step}.npz", **train.numpy_state(train.unwrap(self.model)))
    original(self, path, step, metadata)

train.TrainAdapter.save_checkpoint = save_and_dump
train.main(sys.argv[1:])
'''


def test_two_process_data_parallel_keeps_ranks_identical(tmp_path):
    worker = tmp_path / "ddp_worker.py"
    worker.write_text(DDP_WORKER)
    run_dir = tmp_path / "ddp"
    run_python(["-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(tmp_path / "logs"),
                str(worker), *TINY, "--run_dir", str(run_dir), "--max_steps", "3", "--ckpt_every", "3",
                "--sample_every", "-1"],
               env_extra={"OMP_NUM_THREADS": "1"})
    rank0, rank1 = np.load(run_dir / "rank0_step3.npz"), np.load(run_dir / "rank1_step3.npz")
    assert set(rank0.files) == set(rank1.files)
    for name in rank0.files:
        np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=name)
    checkpoint = load_pdparams(run_dir / "checkpoints" / "0000003.pdparams")
    assert checkpoint["rng"]["kind"] == "per-step" and checkpoint["rng"]["world_size"] == 2
    assert "world_size=2" in (run_dir / "log.jsonl").read_text()
    spec = DiRSpec.from_dict(checkpoint["spec"])
    from common.params import init_canonical

    init = init_canonical(spec, 0)
    trained = from_framework("paddle", dict(rank0), spec)
    assert any(not np.array_equal(trained[name], init[name]) for name in init)  # it trained


DYING_WORKER = r'''
import os, signal, sys, threading, time
from pathlib import Path
from backends.paddle.train import main

run_dir = Path(sys.argv[sys.argv.index("--run_dir") + 1])
die_after = os.environ.get("DIE_AFTER_CHECKPOINT")
if die_after and os.environ.get("PADDLE_TRAINER_ID") == "1":  # rank 1 is killed once that checkpoint is complete
    def killer():
        while not (run_dir / "checkpoints" / die_after).exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=killer, daemon=True).start()
main(sys.argv[1:])
'''


def test_a_dead_rank_stops_the_launch_and_the_run_resumes(tmp_path):
    """paddle.distributed.launch watches its workers: when one dies it terminates the others and fails."""
    import os
    import subprocess
    import sys
    import time

    from tests.conftest import REPO_ROOT

    worker = tmp_path / "dying.py"
    worker.write_text(DYING_WORKER)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
           str(tmp_path / "logs"), str(worker), *TINY, "--run_dir", str(run_dir), "--max_steps", "30",
           "--sample_every", "-1", "--resume", "auto"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", DIE_AFTER_CHECKPOINT="0000004.pdparams")
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and time.monotonic() - start < 200, proc.stdout[-2000:] + proc.stderr[-2000:]
    steps = sorted(int(p.stem) for p in (run_dir / "checkpoints").glob("*.pdparams"))
    assert 4 in steps and max(steps) < 30
    assert load_pdparams(run_dir / "checkpoints" / f"{max(steps):07d}.pdparams")["step"] == max(steps)
    env.pop("DIE_AFTER_CHECKPOINT")
    again = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    starts = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if '"event": "start"' in line]
    assert starts[-1]["resumed_from"].endswith(f"{max(steps):07d}.pdparams")
    assert load_pdparams(run_dir / "checkpoints" / "0000030.pdparams")["step"] == 30


def test_gradient_clipping_reads_the_norm_of_a_large_gradient_exactly():
    """The trainer's clip (``_clip_grad_norm``) on the text model's largest gradient, 8.4M entries:
    the global norm to fp32 accuracy against a float64 sum (Paddle's own clip_grad_norm_ reads
    0.5% low here), and after clipping the gradients' norm is max_norm; under max_norm nothing moves."""
    import paddle

    from backends.paddle.train import _clip_grad_norm

    rng = np.random.default_rng(0)
    big, small = rng.standard_normal((65536, 128)), rng.standard_normal(7)
    params = []
    for value in (big, small):
        param = paddle.create_parameter(list(value.shape), "float32")
        (param * paddle.to_tensor(value.astype(np.float32))).sum().backward()  # grad = value
        params.append(param)
    exact = float(np.sqrt((big.astype(np.float32).astype(np.float64) ** 2).sum() + (small.astype(np.float32) ** 2).sum()))
    assert abs(_clip_grad_norm(params, float("inf")) - exact) / exact < 1e-5
    np.testing.assert_array_equal(params[1].grad.numpy(), small.astype(np.float32))  # below max_norm: untouched
    assert abs(_clip_grad_norm(params, 10.0) - exact) / exact < 1e-5
    clipped = np.sqrt(sum((p.grad.numpy().astype(np.float64) ** 2).sum() for p in params))
    assert abs(clipped - 10.0) < 1e-4
