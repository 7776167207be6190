"""PyTorch training (backends/torch/train.py): exact resume, atomic checkpoints, logs, errors."""
import json
import re
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from backends.torch.train import main as train_main, train  # noqa: E402
from common.config import TRAIN_SCHEMA, parse_cli  # noqa: E402
from tests.conftest import cli_error  # noqa: E402
from common.training import TRAIN_CHECKPOINT_KEYS, latest_checkpoint, list_checkpoints, read_metrics  # noqa: E402

TINY = ["--dataset", "digits", "--image_size", "8", "--hidden_size", "64", "--depth", "2", "--global_batch_size", "8",
        "--lr", "1e-3", "--warmup_steps", "2", "--lr_schedule", "constant", "--ema_decay", "0.9", "--log_every", "1",
        "--ckpt_every", "3", "--sample_every", "-1", "--seed", "7"]


def tiny_config(run_dir, *extra):
    config, _ = parse_cli([*TINY, "--run_dir", str(run_dir), *extra], TRAIN_SCHEMA, "test")
    return config


def losses(run_dir):
    return {row["step"]: row["loss"] for row in read_metrics(run_dir / "log.jsonl")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    result = train(tiny_config(run_dir, "--max_steps", "6", "--grad_accum_steps", "2"))
    return run_dir, result


def test_run_layout_and_checkpoint_contents(uninterrupted):
    run_dir, result = uninterrupted
    assert result["step"] == 6
    assert [step for step, _ in list_checkpoints(run_dir / "checkpoints")] == [3, 6]
    checkpoint = torch.load(run_dir / "checkpoints" / "0000006.pt", weights_only=True)
    assert set(checkpoint) == {*TRAIN_CHECKPOINT_KEYS, "recipe"}
    assert checkpoint["recipe"]["objective"] == "ddpm" and checkpoint["recipe"]["diffusion_steps"] == 1000
    assert checkpoint["step"] == 6 and checkpoint["spec"]["hidden_size"] == 64 and checkpoint["config"]["seed"] == 7
    assert "blocks.0.att.time_decay" in checkpoint["ema"]
    assert not torch.equal(checkpoint["ema"]["final_layer.linear.weight"], checkpoint["model"]["final_layer.linear.weight"])
    rows = losses(run_dir)
    assert sorted(rows) == [1, 2, 3, 4, 5, 6] and all(np.isfinite(v) for v in rows.values())
    events = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    start = events[0]
    assert start["event"] == "start" and "micro_batch_per_process=4 grad_accum_steps=2" in start["batch"]
    assert "global_batch=8" in start["batch"]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "loss.png").stat().st_size > 1000
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    metrics = [e for e in events if "step" in e and "loss" in e]
    assert metrics[0]["lr"] == pytest.approx(5e-4) and metrics[2]["lr"] == pytest.approx(1e-3)  # warmup then constant


def test_resume_is_exact(uninterrupted, tmp_path):
    full_dir, _ = uninterrupted
    train(tiny_config(tmp_path, "--max_steps", "3", "--grad_accum_steps", "2"))
    assert latest_checkpoint(tmp_path).name == "0000003.pt"
    train(tiny_config(tmp_path, "--max_steps", "6", "--grad_accum_steps", "2", "--resume", "auto"))
    full, resumed = losses(full_dir), losses(tmp_path)
    assert [resumed[k] for k in (4, 5, 6)] == [full[k] for k in (4, 5, 6)]  # bit-exact in fp32
    a = torch.load(full_dir / "checkpoints" / "0000006.pt", weights_only=True)
    b = torch.load(tmp_path / "checkpoints" / "0000006.pt", weights_only=True)
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key])


KILLER = textwrap.dedent("""
    import os, signal, sys
    import backends.torch.train as train_module
    from common.config import TRAIN_SCHEMA, parse_cli

    def dying_save(obj, path):  # half a file, then the process is killed mid-write
        with open(path, "wb") as handle:
            handle.write(b"PK\\x03\\x04 half a checkpoint")
            handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    train_module.torch.save = dying_save
    config, _ = parse_cli(sys.argv[1:], TRAIN_SCHEMA, "killer")
    train_module.train(config)
""")


def test_kill_during_checkpoint_write_keeps_previous(uninterrupted, tmp_path, repo_root):
    full_dir, _ = uninterrupted
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    previous = run_dir / "checkpoints" / "0000003.pt"
    previous.write_bytes((full_dir / "checkpoints" / "0000003.pt").read_bytes())
    env = dict(os.environ, PYTHONPATH=str(repo_root), OMP_NUM_THREADS="1")
    args = [*TINY, "--run_dir", str(run_dir), "--max_steps", "6", "--grad_accum_steps", "2", "--resume", "auto"]
    proc = subprocess.run([sys.executable, "-c", KILLER, *args], cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "0000006.pt" not in names and any(n.endswith(".tmp") for n in names)  # only the temp file is half
    assert latest_checkpoint(run_dir) == previous
    config = tiny_config(run_dir, "--max_steps", "6", "--grad_accum_steps", "2", "--resume", "auto")
    train(config)  # resumes from the intact step-3 checkpoint and finishes
    assert losses(run_dir)[6] == losses(full_dir)[6]


def test_resume_refuses_a_different_model(uninterrupted, tmp_path):
    full_dir, _ = uninterrupted
    config = tiny_config(tmp_path, "--max_steps", "4", "--depth", "3",
                         "--resume", str(full_dir / "checkpoints" / "0000003.pt"))
    with pytest.raises(Exception, match=r"0000003.pt: the checkpoint's model differs from the config's depth: checkpoint 2 vs config 3"):
        train(config)


def test_corrupt_checkpoint_and_cli_errors(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    message = cli_error(train_main, [*TINY, "--run_dir", str(tmp_path), "--max_steps", "1", "--resume", str(bad)], capsys)
    assert re.search(r"error: .*bad.pt: not a readable PyTorch checkpoint", message), message
    message = cli_error(train_main, ["--max_step", "3"], capsys)
    assert re.search(r"error: command line: unknown key '--max_step' \(did you mean 'max_steps'\?\)", message), message
    message = cli_error(train_main, ["-c", "missing.yaml"], capsys)
    assert re.search(r"error: config file 'missing.yaml' not found", message), message
    message = cli_error(train_main, [*TINY, "--run_dir", str(tmp_path), "--resume", str(tmp_path / "nothing.pt")], capsys)
    assert re.search(r"resume: checkpoint '.*nothing.pt' not found", message), message


def test_resume_rejects_wrong_layout_and_another_recipe(tmp_path, uninterrupted):
    torch.save({"model": {}, "step": 1}, tmp_path / "partial.pt")
    with pytest.raises(Exception, match=r"partial.pt: missing keys \['ema', 'optimizer', 'rng', 'config', 'spec'\]"):
        train(tiny_config(tmp_path, "--resume", str(tmp_path / "partial.pt")))
    full_dir, _ = uninterrupted
    with pytest.raises(Exception, match=r"0000003.pt: the checkpoint was trained with recipe .*\"linear\".* the "
                                        r"config asks for .*\"cosine\""):
        train(tiny_config(tmp_path / "cosine", "--noise_schedule", "cosine",
                          "--resume", str(full_dir / "checkpoints" / "0000003.pt")))


def test_bf16_autocast_trains(tmp_path):
    result = train(tiny_config(tmp_path, "--max_steps", "2", "--precision", "bf16", "--ckpt_every", "5"))
    assert result["step"] == 2 and np.isfinite(result["loss"])


def test_corrupt_image_is_skipped_and_counted_in_the_log(tmp_path):
    from tests.test_data import make_folder

    root = make_folder(tmp_path / "images", corrupt={("cat", 1)})
    config = tiny_config(tmp_path / "run", "--dataset", "imagefolder", "--data_path", str(root), "--max_steps", "2",
                         "--global_batch_size", "4", "--random_flip", "true")
    with pytest.warns(UserWarning, match=r"skipping unreadable file .*cat/1.png"):
        result = train(config)
    assert result["step"] == 2
    rows = read_metrics(tmp_path / "run" / "log.jsonl")
    assert rows[-1]["skipped_images"] >= 2  # every epoch meets the bad file once per step-batch of all 4 images
    end = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert end["event"] == "end" and end["skipped_images"] == rows[-1]["skipped_images"]
