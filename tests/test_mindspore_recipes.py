"""Recipes travel with the weights between PyTorch and MindSpore: the same seed gives the same samples.

* PyTorch trains two tiny runs (DDPM with the cosine schedule; flow matching), each ``.pt`` is
  converted to ``.ckpt`` with ``tools/convert_ckpt.py``, and MindSpore's ``sample`` of the
  converted file (which names no schedule or objective: the recipe in the file says it)
  reproduces PyTorch's own samples of the ``.pt`` at the same seed;
* MindSpore trains a tiny run, its ``.ckpt`` is converted to ``.pt``, and PyTorch's samples of
  the converted file reproduce MindSpore's samples of its own checkpoint.

Relative error ||a - b|| / ||b|| of the float samples (``sample(config, keep_raw=True)``) <= 1e-4.
Each framework runs in its own interpreter (``python tests/test_mindspore_recipes.py
torch|mindspore|torch-reverse ROOT``); they exchange .npz files.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY = ["--dataset", "digits", "--image_size", "8", "--hidden_size", "64", "--depth", "2", "--global_batch_size", "8",
        "--lr", "1e-3", "--warmup_steps", "1", "--ema_decay", "0.5", "--log_every", "1", "--ckpt_every", "2",
        "--max_steps", "2", "--sample_every", "-1", "--seed", "3", "--mix_lora_rank", "8", "--decay_lora_rank", "16"]
# run -> (training keys, sampling keys); the sampling keys name a sampler only, never the recipe.
RUNS = {
    "ddpm_cosine": (["--noise_schedule", "cosine"],
                    ["--sampler", "ddpm", "--num_sampling_steps", "4", "--clip_denoised", "true"]),
    "flow": (["--objective", "flow", "--flow_path", "gvp"], ["--sampler", "sde", "--num_sampling_steps", "4"]),
}
MINDSPORE_RUN = (["--noise_schedule", "linear"],
                 ["--sampler", "ddim", "--num_sampling_steps", "4", "--eta", "1.0", "--clip_denoised", "true"])
SAMPLE = ["--classes", "[1, 7]", "--num_per_class", "2", "--cfg_scale", "2.0", "--batch_size", "4", "--seed", "11",
          "--save_images", "false"]
THRESHOLD = 1e-4


def train_config(run_dir: Path, extra):
    from common.config import TRAIN_SCHEMA, parse_cli

    return parse_cli([*TINY, "--run_dir", str(run_dir), *extra], TRAIN_SCHEMA, "test")[0]


def sample_raw(sample, ckpt: Path, out_dir: Path, extra) -> np.ndarray:
    from common.config import SAMPLE_SCHEMA, parse_cli

    config = parse_cli(["--ckpt", str(ckpt), "--out_dir", str(out_dir), *SAMPLE, *extra], SAMPLE_SCHEMA, "test")[0]
    return sample(config, "test", keep_raw=True)["raw"]


def run_torch(root: Path) -> None:
    """Train the PyTorch runs, sample their .pt, convert them to .ckpt."""
    from backends.torch.sample import sample
    from backends.torch.train import train
    from tools.convert_ckpt import main as convert

    raw = {}
    for name, (train_keys, sample_keys) in RUNS.items():
        result = train(train_config(root / name, train_keys))
        raw[name] = sample_raw(sample, Path(result["checkpoint"]), root / f"{name}_torch", sample_keys)
        assert convert(["--src", result["checkpoint"], "--dst", str(root / f"{name}.ckpt")]) == 0
    np.savez(root / "torch.npz", **raw)


def run_mindspore(root: Path) -> None:
    """Sample the converted files; train a MindSpore run and sample its own checkpoint."""
    from backends.mindspore.sample import sample
    from backends.mindspore.train import train

    raw = {name: sample_raw(sample, root / f"{name}.ckpt", root / f"{name}_mindspore", sample_keys)
           for name, (_, sample_keys) in RUNS.items()}
    train_keys, sample_keys = MINDSPORE_RUN
    result = train(train_config(root / "mindspore_run", train_keys))
    raw["mindspore_run"] = sample_raw(sample, Path(result["checkpoint"]), root / "mindspore_run_mindspore",
                                      sample_keys)
    np.savez(root / "mindspore.npz", checkpoint=result["checkpoint"], **raw)


def run_torch_reverse(root: Path) -> None:
    """Convert MindSpore's checkpoint to .pt and sample it with PyTorch."""
    from backends.torch.sample import sample
    from tools.convert_ckpt import main as convert

    checkpoint = str(np.load(root / "mindspore.npz")["checkpoint"])
    assert convert(["--src", checkpoint, "--dst", str(root / "mindspore_run.pt")]) == 0
    raw = sample_raw(sample, root / "mindspore_run.pt", root / "mindspore_run_torch", MINDSPORE_RUN[1])
    np.savez(root / "torch_reverse.npz", mindspore_run=raw)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


if __name__ != "__main__":
    import pytest

    pytest.importorskip("mindspore")
    pytest.importorskip("torch")
    from tests.conftest import run_python

    @pytest.fixture(scope="module")
    def samples(tmp_path_factory):
        root = tmp_path_factory.mktemp("ms_recipes")
        script = str(Path(__file__).resolve())
        env = {"OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"]}
        for part in ("torch", "mindspore", "torch-reverse"):
            run_python([script, part, str(root)], env_extra=env, cwd=root)  # compile failures write rank_0/ here
        with np.load(root / "torch.npz") as a, np.load(root / "mindspore.npz") as b, \
                np.load(root / "torch_reverse.npz") as c:
            return root, {k: a[k] for k in a.files}, {k: b[k] for k in b.files}, {k: c[k] for k in c.files}

    @pytest.mark.parametrize("name", RUNS)
    def test_mindspore_samples_a_converted_torch_run_as_torch_does(samples, name):
        root, torch_raw, mindspore_raw, _ = samples
        assert mindspore_raw[name].shape == torch_raw[name].shape == (4, 1, 8, 8)
        error = rel(mindspore_raw[name], torch_raw[name])
        print(f"\n{name}: MindSpore on the converted .ckpt vs PyTorch on the .pt: {error:.2e}")
        assert error <= THRESHOLD
        info = json.loads((root / f"{name}_mindspore" / "info.json").read_text())
        assert info["weights_source"]["recipe_from"] == "file" and info["framework"] == "mindspore"
        expected = {"ddpm_cosine": ("ddpm", "noise_schedule", "cosine"), "flow": ("flow", "flow_path", "gvp")}[name]
        assert (info["recipe"]["objective"], info["recipe"][expected[1]]) == (expected[0], expected[2])

    def test_torch_samples_a_converted_mindspore_run_as_mindspore_does(samples):
        _, _, mindspore_raw, reverse = samples
        error = rel(reverse["mindspore_run"], mindspore_raw["mindspore_run"])
        print(f"\nPyTorch on the converted .pt vs MindSpore on its own .ckpt: {error:.2e}")
        assert error <= THRESHOLD


if __name__ == "__main__":
    {"torch": run_torch, "mindspore": run_mindspore, "torch-reverse": run_torch_reverse}[sys.argv[1]](Path(sys.argv[2]))
