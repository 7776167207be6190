"""DDP on CPU: torchrun with 2 gloo processes trains, and both ranks end with identical weights."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.test_torch_train import TINY  # noqa: E402

RANK_SCRIPT = textwrap.dedent("""
    import os, sys
    import numpy as np
    from backends.torch.train import train
    from common.config import TRAIN_SCHEMA, parse_cli

    config, _ = parse_cli(sys.argv[1:], TRAIN_SCHEMA, "ddp-test")
    result = train(config)
    rank = int(os.environ["RANK"])
    np.savez(os.path.join(config["run_dir"], f"rank{rank}.npz"),
             **{"model." + k: v for k, v in result["model"].canonical_state().items()},
             **{"ema." + k: v.detach().numpy() for k, v in result["ema"].state_dict().items()})
""")


def test_two_process_gloo_ranks_stay_identical(tmp_path, repo_root):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(repo_root), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           *TINY, "--run_dir", str(run_dir), "--max_steps", "3", "--grad_accum_steps", "2"]
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [np.load(run_dir / f"rank{r}.npz") for r in (0, 1)]
    assert set(ranks[0].files) == set(ranks[1].files) and len(ranks[0].files) > 20
    for name in ranks[0].files:
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name], err_msg=name)
    start = json.loads((run_dir / "log.jsonl").read_text().splitlines()[0])
    assert start["batch"] == ("world_size=2 micro_batch_per_process=2 grad_accum_steps=2 "
                              "batch_per_process=4 global_batch=8")
    checkpoint = torch.load(run_dir / "checkpoints" / "0000003.pt", weights_only=True)
    # No RNG state to keep: every draw of a step is a function of (seed, world_size, rank, step).
    assert checkpoint["rng"]["kind"] == "per-step" and checkpoint["rng"]["world_size"] == 2
    # The weights trained: the zero-initialised final layer moved away from zero on both ranks.
    assert np.abs(ranks[0]["model.final_layer.linear.weight"]).max() > 0


DYING_RANK_SCRIPT = textwrap.dedent("""
    import os, signal, sys, threading, time
    from pathlib import Path
    from backends.torch.train import main

    run_dir = Path(sys.argv[sys.argv.index("--run_dir") + 1])
    die_after = os.environ.get("DIE_AFTER_CHECKPOINT")
    how = getattr(signal, os.environ.get("DIE_HOW", "SIGKILL"))  # SIGSTOP: a rank that hangs
    if die_after and os.environ["RANK"] == "1":  # rank 1 is killed once that checkpoint is complete
        def killer():
            while not (run_dir / "checkpoints" / die_after).exists():
                time.sleep(0.01)
            os.kill(os.getpid(), how)
        threading.Thread(target=killer, daemon=True).start()
    main(sys.argv[1:])
""")


def test_a_dead_rank_stops_the_other_and_the_run_resumes(tmp_path, repo_root):
    import time

    script = tmp_path / "dying.py"
    script.write_text(DYING_RANK_SCRIPT)
    run_dir = tmp_path / "run"
    args = [*TINY, "--run_dir", str(run_dir), "--max_steps", "40", "--collective_timeout", "30", "--resume", "auto"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *args]
    env = dict(os.environ, PYTHONPATH=str(repo_root), OMP_NUM_THREADS="1", DIE_AFTER_CHECKPOINT="0000006.pt")
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0 and elapsed < 200, (proc.returncode, elapsed)
    assert "exitcode  : -9" in proc.stderr or "Signals.SIGKILL" in proc.stderr, proc.stderr[-3000:]
    steps = sorted(int(p.stem) for p in (run_dir / "checkpoints").glob("*.pt"))
    assert 6 in steps and max(steps) < 40 and not list((run_dir / "checkpoints").glob(".*.tmp"))
    newest = torch.load(run_dir / "checkpoints" / f"{max(steps):07d}.pt", weights_only=True)  # complete, loadable
    assert newest["step"] == max(steps)
    env.pop("DIE_AFTER_CHECKPOINT")
    again = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    start_events = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()
                    if '"event": "start"' in line]
    assert start_events[-1]["resumed_from"].endswith(f"{max(steps):07d}.pt")
    assert torch.load(run_dir / "checkpoints" / "0000040.pt", weights_only=True)["step"] == 40


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_without_a_launcher_the_surviving_rank_stops_with_a_message(tmp_path, repo_root, how):
    """Ranks started by hand (or by a scheduler that does not watch them): a dead peer fails the next
    collective at once, a hung one after collective_timeout; either way rank 0 ends with one line."""
    import socket
    import time

    script = tmp_path / "dying.py"
    script.write_text(DYING_RANK_SCRIPT)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = [*TINY, "--run_dir", str(tmp_path / "run"), "--max_steps", "400", "--collective_timeout", "5"]
    base = dict(os.environ, PYTHONPATH=str(repo_root), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port), WORLD_SIZE="2", DIE_HOW=how)
    ranks = [subprocess.Popen([sys.executable, str(script), *args], cwd=repo_root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(base, RANK=str(r), LOCAL_RANK=str(r),
                                       **({"DIE_AFTER_CHECKPOINT": "0000006.pt"} if r == 1 else {})))
             for r in (0, 1)]
    start = time.monotonic()
    try:
        _, err = ranks[0].communicate(timeout=120)
        elapsed = time.monotonic() - start
    finally:
        for proc in ranks:
            proc.kill()
            proc.wait()
    assert ranks[0].returncode == 2, err[-3000:]
    last = [line for line in err.splitlines() if line.startswith("error: ")][-1]
    assert last.startswith("error: rank 0: a collective with the other processes failed") and \
        "restart the run with resume: auto" in last and "0000006.pt" in last, last
    assert elapsed < 90, elapsed
