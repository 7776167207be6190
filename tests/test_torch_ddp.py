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
