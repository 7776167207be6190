"""The shared training loop's guards (common/trainer.py), driven through the PyTorch adapter:
non-finite steps, checkpoint retention and durability, strict JSON logs, data that cannot train."""
import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import backends.torch.train as torch_train  # noqa: E402
from backends.torch.train import TrainAdapter, train  # noqa: E402
from common.checkpoint import CheckpointError  # noqa: E402
from common.data import DataError  # noqa: E402
from common.trainer import run_training  # noqa: E402
from common.training import list_checkpoints, nonfinite_entries, retained_steps  # noqa: E402
from tests.test_torch_train import tiny_config  # noqa: E402


def strict_rows(log_path):
    """Every line of a log parsed as strict JSON (NaN / Infinity tokens are refused)."""
    def refuse(token):
        raise ValueError(f"non-JSON token {token}")

    return [json.loads(line, parse_constant=refuse) for line in log_path.read_text().splitlines()]


def steps_on_disk(run_dir):
    return [step for step, _ in list_checkpoints(run_dir / "checkpoints")]


def test_the_diverging_command_stops_cleanly_and_writes_no_nan(tmp_path, repo_root):
    run_dir = tmp_path / "nanrun"
    env = dict(os.environ, PYTHONPATH=str(repo_root), OMP_NUM_THREADS=os.environ["OMP_NUM_THREADS"])
    proc = subprocess.run([sys.executable, "-m", "backends.torch.train", "-c", "configs/train/digits.yaml",
                           "--lr", "1e4", "--grad_clip", "0", "--max_steps", "60", "--ckpt_every", "20",
                           "--run_dir", str(run_dir), "--resume", "null"],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step ") and "non-finite" in last and "update was not applied" in last, last
    for step in steps_on_disk(run_dir):  # whatever was written before the divergence is finite
        checkpoint = torch.load(run_dir / "checkpoints" / f"{step:07d}.pt", weights_only=True)
        assert nonfinite_entries({"model": checkpoint["model"], "ema": checkpoint["ema"]}) == []
    rows = strict_rows(run_dir / "log.jsonl")
    assert any(row.get("event") == "nonfinite" for row in rows)


class PoisonedAdapter(TrainAdapter):
    """Makes the gradients of the chosen (0-based) steps NaN, as a bad batch would."""

    def __init__(self, poison_steps):
        self.poison_steps, self.calls = set(poison_steps), 0

    def train_step(self, micro_batches, draws):
        values = super().train_step(micro_batches, draws)
        if self.calls in self.poison_steps:
            for param in self.model.parameters():
                param.grad.fill_(float("nan"))
            values["loss"], values["grad_norm"] = float("nan"), float("nan")
        self.calls += 1
        return values


def test_skip_drops_the_update_counts_it_and_stops_past_the_limit(tmp_path):
    config = tiny_config(tmp_path / "skip", "--max_steps", "6", "--on_nonfinite", "skip", "--log_every", "2")
    adapter = PoisonedAdapter({2})
    run_training(config, adapter)
    assert adapter.nonfinite_tensors() == []
    rows = strict_rows(tmp_path / "skip" / "log.jsonl")
    metrics = [row for row in rows if "loss" in row and "step" in row]
    assert metrics[1]["step"] == 4 and metrics[1]["loss"] is None and metrics[1]["nonfinite"] == ["loss", "grad_norm"]
    assert metrics[-1]["skipped_updates"] == 1 and rows[-1]["event"] == "end" and rows[-1]["skipped_updates"] == 1
    # The skipped step changed nothing: its parameters equal those of a run that stops right before it.
    before = train(tiny_config(tmp_path / "two", "--max_steps", "2"))["model"]
    poisoned = run_training(tiny_config(tmp_path / "three", "--max_steps", "3", "--on_nonfinite", "skip"),
                            PoisonedAdapter({2}))
    assert poisoned["step"] == 3
    after = torch.load(tmp_path / "three" / "checkpoints" / "0000003.pt", weights_only=True)["model"]
    for name, param in before.state_dict().items():
        assert torch.equal(after[name], param), name
    with pytest.raises(Exception, match=r"step 4: non-finite loss = nan, grad_norm = nan; the run stops \(2 skipped "
                                        r"updates, more than max_nonfinite_skips \(1\)\)"):
        run_training(tiny_config(tmp_path / "limit", "--max_steps", "6", "--on_nonfinite", "skip",
                                 "--max_nonfinite_skips", "1"), PoisonedAdapter({1, 3}))


def test_retention_keeps_the_newest_and_the_milestones(tmp_path):
    assert retained_steps(list(range(10, 130, 10)), 2, 50) == {50, 100, 110, 120}
    assert retained_steps([1, 2, 3], 0, 0) == {1, 2, 3}
    config = tiny_config(tmp_path / "keep", "--max_steps", "120", "--ckpt_every", "10", "--keep_last", "2",
                         "--keep_every", "50", "--log_every", "40")
    train(config)
    assert steps_on_disk(tmp_path / "keep") == [50, 100, 110, 120]
    assert not [p for p in (tmp_path / "keep" / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_a_failed_write_stops_the_run_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run_dir = tmp_path / "full"
    real_save = torch.save
    calls = []

    def disk_full_on_second(obj, path):
        calls.append(path)
        if len(calls) == 2:  # half a file, then the disk is full
            with open(path, "wb") as handle:
                handle.write(b"PK\x03\x04 half")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, path)

    monkeypatch.setattr(torch_train.torch, "save", disk_full_on_second)
    with pytest.raises(CheckpointError, match=r"step 6: writing .*0000006.pt failed \(No space left on device\); "
                                              r"nothing was written there, and the newest intact checkpoint is "
                                              r".*0000003.pt"):
        train(tiny_config(run_dir, "--max_steps", "9"))
    monkeypatch.setattr(torch_train.torch, "save", real_save)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["0000003.pt"]  # no temp file left
    resumed = train(tiny_config(run_dir, "--max_steps", "6", "--resume", "auto"))
    assert resumed["step"] == 6 and steps_on_disk(run_dir) == [3, 6]


def test_resume_auto_passes_over_a_nonfinite_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, "--max_steps", "6"))
    path = run_dir / "checkpoints" / "0000006.pt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["ema"]["final_layer.linear.bias"][0] = float("inf")
    torch.save(checkpoint, path)
    torch.save(checkpoint, tmp_path / "0000006.pt")  # the resumed run rewrites the one in run_dir
    result = train(tiny_config(run_dir, "--max_steps", "7", "--resume", "auto"))
    assert result["step"] == 7
    events = strict_rows(run_dir / "log.jsonl")
    skipped = [e for e in events if e.get("event") == "resume_skipped"]
    assert skipped[-1]["path"].endswith("0000006.pt") and skipped[-1]["nonfinite"] == ["ema.final_layer.linear.bias"]
    start = [e for e in events if e.get("event") == "start"][-1]
    assert start["resumed_from"].endswith("0000003.pt")
    with pytest.raises(CheckpointError, match=r"0000006.pt holds non-finite tensors \(ema.final_layer.linear.bias\)"):
        train(tiny_config(tmp_path / "other", "--max_steps", "7", "--resume", str(tmp_path / "0000006.pt")))


def test_data_that_cannot_train_stops_before_the_first_step(tmp_path):
    from tests.test_data import make_folder

    unreadable = make_folder(tmp_path / "bad", corrupt={("cat", 0), ("cat", 1), ("dog", 0), ("dog", 1)})
    with pytest.raises(DataError, match=r"unreadable files in a row .*refusing to train"):
        train(tiny_config(tmp_path / "r1", "--dataset", "imagefolder", "--data_path", str(unreadable),
                          "--global_batch_size", "4"))
    empty_class = make_folder(tmp_path / "empty")
    (empty_class / "zebra").mkdir()
    with pytest.raises(DataError, match=r"class folders without images under '.*empty': zebra"):
        train(tiny_config(tmp_path / "r2", "--dataset", "imagefolder", "--data_path", str(empty_class),
                          "--global_batch_size", "4"))
    small = make_folder(tmp_path / "small")
    with pytest.raises(DataError, match=r"small: 4 items, fewer than one global batch \(8\)"):
        train(tiny_config(tmp_path / "r3", "--dataset", "imagefolder", "--data_path", str(small)))
    latents = tmp_path / "latents"
    (latents / "x_features").mkdir(parents=True)
    (latents / "x_labels").mkdir()
    for i in range(3):
        np.save(latents / "x_features" / f"{i}.npy", np.zeros((4, 1, 1), np.float32))
    for i in range(2):
        np.save(latents / "x_labels" / f"{i}.npy", np.zeros(1, np.int64))
    with pytest.raises(DataError, match=r"hold different file names \(3 vs 2 files"):
        train(tiny_config(tmp_path / "r4", "--dataset", "latents", "--data_path", str(latents), "--image_size", "8"))
    for run in ("r1", "r2", "r3", "r4"):
        assert not (tmp_path / run / "checkpoints").exists()
