"""Paddle training and sampling end to end on a tiny model (each run in its own interpreter):
checkpoints that load without running code, an exact resume, the sample CLI, and
2-process CPU data parallel through paddle.distributed.launch."""
import json
import shutil
import sys

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


def train(run_dir, *extra, steps=4):
    return run_python(["-m", "backends.paddle.train", *TINY, "--run_dir", str(run_dir), "--max_steps", str(steps),
                       *extra])


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
    assert set(TRAIN_CHECKPOINT_KEYS) <= set(checkpoint)
    spec = DiRSpec.from_dict(checkpoint["spec"])
    for key in ("model", "ema"):
        canonical = from_framework("paddle", checkpoint[key], spec)  # same names, Linear weights [in, out]
        assert all(np.isfinite(v).all() for v in canonical.values())
    assert checkpoint["step"] == 4 and checkpoint["config"]["max_steps"] == 4
    accumulators = checkpoint["optimizer"]["accumulators"]
    assert "blocks.0.att.key.weight.moment1" in accumulators
    assert checkpoint["rng"]["per_rank"][0]["paddle"][0]["engine"].dtype == np.int64


def test_resume_continues_exactly(run, tmp_path):
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "checkpoints" / "0000002.pdparams", resumed / "checkpoints")
    proc = train(resumed, "--resume", "auto", "--sample_every", "-1")
    assert "resumed from" in proc.stdout + proc.stderr
    a = load_pdparams(run / "checkpoints" / "0000004.pdparams")
    b = load_pdparams(resumed / "checkpoints" / "0000004.pdparams")
    for key in ("model", "ema"):
        assert all(np.array_equal(a[key][name], b[key][name]) for name in a[key]), key
    for name, value in a["optimizer"]["accumulators"].items():
        assert np.array_equal(value, b["optimizer"]["accumulators"][name]), name


def test_sample_cli_writes_the_common_outputs(run, tmp_path):
    out = tmp_path / "samples"
    run_python(["-m", "backends.paddle.sample", "-c", "configs/sample/digits.yaml", "--ckpt", str(run),
                "--classes", "[1, three]", "--num_per_class", "2", "--sampler", "ddim", "--num_sampling_steps", "3",
                "--batch_size", "3", "--out_dir", str(out)],
               env_extra={"DIR_PADDLE_TO_STATIC": "0"})
    with np.load(out / "samples.npz") as data:
        assert data["arr_0"].shape == (4, 8, 8, 1) and data["arr_0"].dtype == np.uint8
        assert list(data["arr_1"]) == [1, 1, 3, 3]
    assert (out / "grid.png").is_file() and len(list((out / "images").iterdir())) == 4


def test_bad_checkpoint_is_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "0000001.pdparams"
    path.write_bytes(b"not a pickle")
    with pytest.raises(AssertionError, match="error: .*0000001.pdparams"):
        run_python(["-m", "backends.paddle.sample", "-c", "configs/sample/digits.yaml", "--ckpt", str(path)])


DDP_WORKER = r'''
import sys
import numpy as np
from backends.paddle import train

original = train.save_checkpoint

def save_and_dump(path, model, ema, optimizer, step, config, spec, rank, world_size, device):
    np.savez(f"{config['run_dir']}/rank{rank}_step{step}.npz", **train.numpy_state(train.unwrap(model)))
    original(path, model, ema, optimizer, step, config, spec, rank, world_size, device)

train.save_checkpoint = save_and_dump
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
    assert len(checkpoint["rng"]["per_rank"]) == 2
    assert "world_size=2" in (run_dir / "log.jsonl").read_text()
    spec = DiRSpec.from_dict(checkpoint["spec"])
    from common.params import init_canonical

    init = init_canonical(spec, 0)
    trained = from_framework("paddle", dict(rank0), spec)
    assert any(not np.array_equal(trained[name], init[name]) for name in init)  # it trained
