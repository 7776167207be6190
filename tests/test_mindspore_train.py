"""MindSpore training and sampling: run folder, .ckpt layout, exact resume, sample CLI, flow
matching end to end, and 2-worker data parallel through msrun (ranks end with identical weights).

Every MindSpore run is its own process (``python -m backends.mindspore.train ...``, or this
file as the msrun worker script), tiny sizes; DDPM in PyNative mode, flow matching in Graph mode.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY = ["--dataset", "digits", "--image_size", "8", "--hidden_size", "64", "--depth", "2", "--global_batch_size", "8",
        "--lr", "1e-3", "--warmup_steps", "2", "--lr_schedule", "constant", "--ema_decay", "0.9", "--log_every", "1",
        "--ckpt_every", "1", "--sample_every", "-1", "--seed", "7", "--mix_lora_rank", "8", "--decay_lora_rank", "16"]
FLOW = ["--objective", "flow", "--flow_path", "gvp", "--flow_time_sampling", "logit_normal", "--mindspore_mode", "graph"]


def worker(run_dir: str, *extra: str) -> None:
    """msrun worker: train, then dump this rank's canonical weights."""
    from backends.mindspore.train import train
    from common.config import TRAIN_SCHEMA, parse_cli

    config, _ = parse_cli([*TINY, "--run_dir", run_dir, *extra], TRAIN_SCHEMA, "test")
    result = train(config)
    rank = int(os.environ.get("RANK_ID", "0"))
    np.savez(Path(run_dir) / f"rank{rank}_weights.npz", **result["model"].canonical_state())


if __name__ != "__main__":
    import pytest

    pytest.importorskip("mindspore")
    from common.formats import read_checkpoint as read_weights
    from common.training import read_metrics
    from tests.conftest import REPO_ROOT, free_port, run_python

    def ms_train(run_dir, *extra):
        return run_python(["-m", "backends.mindspore.train", *TINY, "--run_dir", str(run_dir), *extra],
                          env_extra={"OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"]}, cwd=run_dir.parent)  # Graph mode may write rank_0/

    def read(path):
        code = ("import json,sys; from backends.mindspore.train import TrainAdapter;"
                "c=TrainAdapter().read_checkpoint(sys.argv[1]);"
                "print(json.dumps({'step': c['step'], 'spec': c['spec'], 'config_seed': c['config']['seed'],"
                "'recipe': c['recipe'], 'rng': c['rng'], 'model': sorted(c['model']), 'ema': sorted(c['ema']),"
                "'optimizer': sorted(c['optimizer'])}))")
        out = run_python(["-c", code, str(path)]).stdout
        return json.loads(out.strip().splitlines()[-1])

    def losses(run_dir):
        return {row["step"]: row["loss"] for row in read_metrics(run_dir / "log.jsonl")}

    @pytest.fixture(scope="module")
    def runs(tmp_path_factory):
        root = tmp_path_factory.mktemp("ms_train")
        full, part = root / "full", root / "part"
        full.mkdir(), part.mkdir()
        ms_train(full, "--max_steps", "2", "--grad_accum_steps", "2")
        ms_train(part, "--max_steps", "1", "--grad_accum_steps", "2")
        ms_train(part, "--max_steps", "2", "--grad_accum_steps", "2", "--resume", "auto")
        return full, part

    def test_run_layout_and_checkpoint_layout(runs):
        full, _ = runs
        for name in ("config.yaml", "log.jsonl", "loss.png", "checkpoints/0000001.ckpt", "checkpoints/0000002.ckpt"):
            assert (full / name).is_file(), name
        checkpoint = read(full / "checkpoints/0000002.ckpt")
        assert checkpoint["step"] == 2 and checkpoint["spec"]["hidden_size"] == 64 and checkpoint["config_seed"] == 7
        assert checkpoint["recipe"]["objective"] == "ddpm" and checkpoint["recipe"]["diffusion_steps"] == 1000
        assert checkpoint["rng"]["kind"] == "per-step" and checkpoint["rng"]["seed"] == 7
        assert "blocks.0.att.key.weight" in checkpoint["model"]
        assert "y_embedder.embedding_table.embedding_table" in checkpoint["model"]
        assert "blocks.0.att.ln_x.gamma" in checkpoint["model"]
        assert checkpoint["ema"] == checkpoint["model"]
        assert "exp_avg.blocks.0.att.key.weight" in checkpoint["optimizer"] and "state_step" in checkpoint["optimizer"]
        assert not list((full / "checkpoints").glob("*.tmp*"))
        # Graph mode is the default, as in mindone (PyNative is about 20x slower on CPU)
        assert "mindspore_mode: graph" in (full / "config.yaml").read_text()

    def test_resume_is_exact(runs):
        full, part = runs
        a, b = losses(full), losses(part)
        assert sorted(a) == sorted(b) == [1, 2]
        for step in a:
            assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])

    def test_sample_cli_writes_outputs(runs, tmp_path):
        full, _ = runs
        out = tmp_path / "samples"
        run_python(["-m", "backends.mindspore.sample", "--ckpt", str(full), "--num_per_class", "1",
                    "--sampler", "ddim", "--num_sampling_steps", "3", "--cfg_scale", "2.0", "--classes", "[0, 3]",
                    "--out_dir", str(out), "--save_images", "false"], env_extra={"OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"]}, cwd=tmp_path)
        with np.load(out / "samples.npz") as data:
            assert data["arr_0"].shape == (2, 8, 8, 1) and data["arr_0"].dtype == np.uint8
            assert list(data["arr_1"]) == [0, 3]
        assert (out / "grid.png").is_file()

    def test_cli_errors(tmp_path):
        with pytest.raises(AssertionError, match=r"failed \(2\)(.|\n)*error: command line: unknown key '--max_step'"):
            run_python(["-m", "backends.mindspore.train", "--max_step", "3"], cwd=tmp_path)
        with pytest.raises(AssertionError, match="key 'mindspore_mode' = 'eager' is not allowed; allowed: pynative, graph"):
            run_python(["-m", "backends.mindspore.train", "--mindspore_mode", "eager"], cwd=tmp_path)

    @pytest.fixture(scope="module")
    def flow_runs(tmp_path_factory):
        """A Graph-mode flow run of 2 steps, and a second run resumed from its step-1 checkpoint."""
        root = tmp_path_factory.mktemp("ms_flow")
        full, resumed = root / "full", root / "resumed"
        full.mkdir(), resumed.mkdir()
        ms_train(full, *FLOW, "--max_steps", "2")
        ms_train(resumed, *FLOW, "--max_steps", "2", "--resume", str(full / "checkpoints/0000001.ckpt"))
        return full, resumed

    def test_flow_run_writes_its_recipe_and_resumes_exactly(flow_runs):
        full, resumed = flow_runs
        checkpoint = read(full / "checkpoints/0000002.ckpt")
        assert checkpoint["recipe"]["objective"] == "flow" and checkpoint["recipe"]["flow_path"] == "gvp"
        assert checkpoint["recipe"]["flow_time_sampling"] == "logit_normal" and "diffusion_steps" not in checkpoint["recipe"]
        assert checkpoint["spec"]["learn_sigma"] is False
        a, b = losses(full), losses(resumed)
        assert sorted(a) == [1, 2] and sorted(b) == [2]
        assert abs(a[2] - b[2]) <= 1e-6 * abs(a[2]), (a[2], b[2])
        for weights in ("model", "ema"):
            x = read_weights(full / "checkpoints/0000002.ckpt", weights=weights)[0]
            y = read_weights(resumed / "checkpoints/0000002.ckpt", weights=weights)[0]
            worst = max(float(np.abs(x[k] - y[k]).max() / (np.abs(x[k]).max() + 1e-30)) for k in x)
            assert worst <= 1e-6, (weights, worst)

    def test_flow_run_samples_in_graph_mode(flow_runs, tmp_path):
        full, _ = flow_runs
        out = tmp_path / "samples"
        run_python(["-m", "backends.mindspore.sample", "--ckpt", str(full), "--num_per_class", "1", "--sampler", "heun",
                    "--num_sampling_steps", "3", "--cfg_scale", "2.0", "--classes", "[2, 5]", "--out_dir", str(out),
                    "--save_images", "false", "--mindspore_mode", "graph"], env_extra={"OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"]},
                   cwd=tmp_path)
        info = json.loads((out / "info.json").read_text())
        assert info["recipe"]["objective"] == "flow" and info["mindspore_mode"] == "graph"
        assert info["sampler"] == {"sampler": "heun", "cfg_scale": 2.0, "num_steps": 3, "nfe": 5}
        with np.load(out / "samples.npz") as data:
            assert data["arr_0"].shape == (2, 8, 8, 1) and list(data["arr_1"]) == [2, 5]
        with pytest.raises(AssertionError, match="'dopri5' .* exists in the PyTorch backend only; with mindspore use "
                                                 "euler, heun or sde"):
            run_python(["-m", "backends.mindspore.sample", "--ckpt", str(full), "--sampler", "dopri5",
                        "--out_dir", str(tmp_path / "none")], cwd=tmp_path)

    @pytest.mark.skipif(shutil.which("msrun", path=str(Path(sys.executable).parent)) is None, reason="msrun not installed")
    @pytest.mark.parametrize("mode", ["pynative", "graph"])
    def test_fused_adamw_is_torch_adamw(mode, tmp_path):
        """ops.Adam with e = eps sqrt(1 - b2^t) is PyTorch's AdamW; the experimental optimizer agrees too."""
        out = tmp_path / "adamw.npz"
        run_python([str(Path(__file__)), "adamw", mode, str(out)], cwd=tmp_path)
        got = np.load(out)
        for name in ("w", "b", "steps"):
            reference = got[f"reference/{name}"]
            scale = np.abs(reference).max()
            for kind in ("fused", "experimental"):
                np.testing.assert_allclose(got[f"{kind}/{name}"], reference, rtol=0, atol=2e-6 * scale,
                                           err_msg=f"{kind} AdamW, {name}, {mode}")
        assert np.abs(got["reference/w"] - got["start/w"]).min() > 1e-3  # every entry moved: the check has teeth

    def test_msrun_two_workers_hold_identical_weights(tmp_path):
        run_dir = tmp_path / "ddp"
        run_dir.mkdir()
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1",
                   PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
        port = free_port()
        proc = subprocess.run(["msrun", "--worker_num", "2", "--local_worker_num", "2", "--join", "True",
                               "--master_port", port, "--log_dir", str(tmp_path / "logs"),
                               str(Path(__file__).resolve()), "worker", str(run_dir), "--max_steps", "2"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        logs = "\n".join(p.read_text()[-3000:] for p in sorted((tmp_path / "logs").glob("*.log")))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + logs
        a, b = np.load(run_dir / "rank0_weights.npz"), np.load(run_dir / "rank1_weights.npz")
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        assert "world_size=2" in (run_dir / "log.jsonl").read_text()
        assert (run_dir / "checkpoints/0000002.ckpt").is_file()


    def test_graph_mode_trains_a_model_with_hundreds_of_parameters(tmp_path):
        """Graph mode compiles the optimizer, the gradient norm and the EMA update over every
        parameter (about 375 here; DiR-S/2 has 323, DiR-XL/2 739): as a Python loop over them
        that exceeded MindSpore's call depth limit of 1000 from DiR-S/2's depth of 12 on."""
        run_dir = tmp_path / "deep"
        run_dir.mkdir()
        ms_train(run_dir, "--depth", "14", "--mindspore_mode", "graph", "--max_steps", "1")
        checkpoint = read(run_dir / "checkpoints" / "0000001.ckpt")
        assert checkpoint["step"] == 1 and len(checkpoint["model"]) > 350
        assert len(checkpoint["ema"]) == len(checkpoint["model"])
        assert np.isfinite(losses(run_dir)[1])

    def test_a_skipped_nonfinite_step_changes_nothing(tmp_path):
        run_python([str(Path(__file__).resolve()), "poisoned", str(tmp_path)], env_extra={"OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"]},
                   cwd=tmp_path)
        weights = np.load(tmp_path / "weights.npz")
        assert weights["nonfinite"].size == 0
        names = [n[len("reference."):] for n in weights.files if n.startswith("reference.")]
        for name in names:
            np.testing.assert_array_equal(weights[f"poisoned.{name}"], weights[f"reference.{name}"], err_msg=name)
        end = json.loads((tmp_path / "three" / "log.jsonl").read_text().splitlines()[-1])
        assert end["event"] == "end" and end["skipped_updates"] == 1

    @pytest.mark.skipif(shutil.which("msrun", path=str(Path(sys.executable).parent)) is None, reason="msrun not installed")
    def test_msrun_stops_when_a_worker_dies_and_the_run_resumes(tmp_path):
        """msrun watches its workers: when one is killed it stops the other and fails; the newest
        complete checkpoint is intact and a new msrun resumes from it."""
        import time

        run_dir = tmp_path / "dead"
        run_dir.mkdir()
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", DIE_AFTER_CHECKPOINT="0000002.ckpt",
                   PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
        port = free_port()

        def launch():
            return subprocess.run(["msrun", "--worker_num", "2", "--local_worker_num", "2", "--join", "True",
                                   "--master_port", port, "--log_dir", str(tmp_path / "logs"),
                                   str(Path(__file__).resolve()), "dying", str(run_dir), "--max_steps", "40",
                                   "--resume", "auto"],
                                  cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

        start = time.monotonic()
        proc = launch()
        assert proc.returncode != 0 and time.monotonic() - start < 300, proc.stdout[-2000:] + proc.stderr[-2000:]
        steps = sorted(int(p.stem) for p in (run_dir / "checkpoints").glob("*.ckpt"))
        assert 2 in steps and max(steps) < 40
        assert read(run_dir / "checkpoints" / f"{max(steps):07d}.ckpt")["step"] == max(steps)  # complete
        env.pop("DIE_AFTER_CHECKPOINT")
        env["DIR_TEST_MAX_STEPS"] = str(max(steps) + 2)
        again = launch()
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
        starts = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()
                  if '"event": "start"' in line]
        assert starts[-1]["resumed_from"].endswith(f"{max(steps):07d}.ckpt")
        assert read(run_dir / "checkpoints" / f"{max(steps) + 2:07d}.ckpt")["step"] == max(steps) + 2


def poisoned_worker(out: str) -> None:
    """A run whose third step has NaN gradients, skipped, against a run that stops after two steps."""
    import mindspore as ms

    from backends.mindspore.train import TrainAdapter
    from common.config import TRAIN_SCHEMA, parse_cli
    from common.trainer import run_training

    class Poisoned(TrainAdapter):
        calls = 0

        def train_step(self, micro_batches, draws):
            values = super().train_step(micro_batches, draws)
            if self.calls == 2:
                grads, norm = self.pending
                self.pending = (tuple(ms.Tensor(np.full(g.shape, np.nan, np.float32)) for g in grads), norm)
                values["loss"] = float("nan")
            self.calls += 1
            return values

    def config(run_dir, steps, *extra):
        return parse_cli([*TINY, "--run_dir", run_dir, "--max_steps", str(steps), *extra], TRAIN_SCHEMA, "test")[0]

    reference, poisoned = TrainAdapter(), Poisoned()
    run_training(config(f"{out}/two", 2), reference)
    run_training(config(f"{out}/three", 3, "--on_nonfinite", "skip"), poisoned)
    np.savez(f"{out}/weights.npz", **{f"reference.{k}": v for k, v in reference.model.canonical_state().items()},
             **{f"poisoned.{k}": v for k, v in poisoned.model.canonical_state().items()},
             nonfinite=np.asarray(poisoned.nonfinite_tensors(), dtype=str))


def adamw_case(mode: str, out: str) -> None:
    """The trainer's fused AdamW against ``mindspore.experimental.optim.AdamW`` and a float64
    numpy transcription of ``torch.optim.AdamW``: 5 steps, changing learning rates, a decayed
    matrix and an undecayed vector, through ``ApplyGradients`` (clipping off) as the trainer
    calls it. Writes ``{fused,experimental,reference}/<name>`` to ``out``."""
    import mindspore as ms
    from mindspore import Parameter, Tensor
    from mindspore.experimental.optim import AdamW as ExperimentalAdamW

    from backends.mindspore import train as ms_train
    from backends.mindspore.models import set_execution_mode

    set_execution_mode(mode, "cpu")
    rng = np.random.default_rng(3)
    start = {"w": rng.standard_normal((6, 5)), "b": rng.standard_normal(5)}
    grads = [{k: rng.standard_normal(v.shape) * 10.0 ** rng.integers(-3, 2) for k, v in start.items()}
             for _ in range(5)]
    # eps near the smaller gradients' size, so where it enters the update (the bias-corrected
    # denominator) shows: at the trainer's 1e-8 a misplaced eps would pass unseen
    lrs, betas, eps, decay = [1e-2, 3e-2, 2e-2, 5e-3, 1e-2], (0.9, 0.95), 1e-3, 0.1
    results = {}
    for kind in ("fused", "experimental"):
        params = {k: Parameter(Tensor(v.astype(np.float32)), name=f"{kind}.{k}") for k, v in start.items()}
        groups = [{"params": [params["w"]], "weight_decay": decay}, {"params": [params["b"]], "weight_decay": 0.0}]
        if kind == "fused":
            optimizer = ms_train.AdamW(groups, lr=lrs[0], betas=betas, eps=eps)
        else:
            optimizer = ExperimentalAdamW(groups, lr=lrs[0], betas=betas, eps=eps)
        apply = ms_train.ApplyGradients(optimizer, 0.0)
        for lr, g in zip(lrs, grads):
            if kind == "fused":
                ms_train.set_learning_rate(optimizer, lr)
            else:
                for group in optimizer.param_groups:
                    ms.ops.assign(group["lr"], Tensor(lr, ms.float32))
            apply(ms.mutable((Tensor(g["w"].astype(np.float32)), Tensor(g["b"].astype(np.float32)))),
                  Tensor(1.0, ms.float32))
        for k, p in params.items():
            results[f"{kind}/{k}"] = p.asnumpy()
        results[f"{kind}/steps"] = np.asarray(optimizer.state_step.asnumpy(), dtype=np.float64).reshape(-1)
    state = {k: v.copy() for k, v in start.items()}
    m = {k: np.zeros_like(v) for k, v in start.items()}
    v2 = {k: np.zeros_like(v) for k, v in start.items()}
    for t, (lr, g) in enumerate(zip(lrs, grads), start=1):  # torch.optim.AdamW, written out
        for k in state:
            state[k] *= 1.0 - lr * (decay if k == "w" else 0.0)
            m[k] = betas[0] * m[k] + (1 - betas[0]) * g[k]
            v2[k] = betas[1] * v2[k] + (1 - betas[1]) * g[k] ** 2
            denom = np.sqrt(v2[k]) / np.sqrt(1 - betas[1] ** t) + eps
            state[k] -= lr / (1 - betas[0] ** t) * m[k] / denom
    for k, v in state.items():
        results[f"reference/{k}"] = v
    results["reference/steps"] = np.array([len(lrs)], dtype=np.float64)
    results["start/w"] = start["w"]
    np.savez(out, **results)


def dying_worker(run_dir: str, *extra: str) -> None:
    """msrun worker whose rank 1 is killed once DIE_AFTER_CHECKPOINT is complete."""
    import signal
    import threading
    import time

    die_after = os.environ.get("DIE_AFTER_CHECKPOINT")
    if die_after and os.environ.get("RANK_ID") == "1":
        def killer():
            while not (Path(run_dir) / "checkpoints" / die_after).exists():
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=killer, daemon=True).start()
    extra = list(extra)
    if "DIR_TEST_MAX_STEPS" in os.environ:  # the resumed launch stops soon after the checkpoint it resumes
        extra[extra.index("--max_steps") + 1] = os.environ["DIR_TEST_MAX_STEPS"]
    from backends.mindspore.train import main

    main([*TINY, "--ckpt_every", "2", "--run_dir", run_dir, *extra])


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        worker(sys.argv[2], *sys.argv[3:])
    elif sys.argv[1] == "dying":
        dying_worker(sys.argv[2], *sys.argv[3:])
    elif sys.argv[1] == "adamw":
        adamw_case(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "poisoned":
        poisoned_worker(sys.argv[2])
