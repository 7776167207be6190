"""Sample DiR with PaddlePaddle: ``python -m backends.paddle.sample -c configs/sample/digits.yaml [--key value ...]``.

Reads a checkpoint of any backend (a run folder, ``.pt``/``.pth``, ``.pdparams``, ``.ckpt``
or canonical ``.safetensors``) with its training recipe, and writes ``out_dir/grid.png``,
``out_dir/images/*.png``, ``out_dir/samples.npz`` (``arr_0`` uint8 NHWC, ``arr_1`` labels) and
``out_dir/info.json``. The flow (weights, recipe, classes, batches, outputs) is
``common.sampling.run_sampling``; this file is its Paddle adapter.

``paddle_to_static: true`` runs the network through ``paddle.jit.to_static`` (one trace per
batch shape, then the static program); the images equal the eager ones.

Several processes: ``python -m paddle.distributed.launch --nproc_per_node N backends/paddle/sample.py -c ...``
(a script path, so this file also runs as a script) deals the batches out to the processes; rank 0
writes the one ``samples.npz``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: put the repo root first, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import numpy as np
import paddle

from backends.paddle.models import DiR
from backends.paddle.objectives import generate
from backends.paddle.vae import VAEError
from common.cli import run_cli
from common.config import SAMPLE_SCHEMA, ConfigError, parse_cli, resolve_wkv_kernel
from common.sampling import SampleBackend, read_weights, run_sampling


def pick_device(name: str) -> str:
    from backends.paddle.train import _accelerator

    accelerator = _accelerator()
    if name == "cuda" and accelerator is None:
        raise ConfigError("key 'device' = 'cuda' but Paddle sees no GPU / XPU device")
    paddle.set_device(accelerator if name != "cpu" and accelerator is not None else "cpu")
    return paddle.device.get_device()


def to_static(model: DiR) -> DiR:
    """The same model with ``forward`` run by ``paddle.jit.to_static``."""
    return paddle.jit.to_static(model)


class SampleAdapter(SampleBackend):
    """The Paddle side of ``common.sampling.run_sampling``."""

    framework = "paddle"

    def setup(self, config: dict) -> str:
        resolve_wkv_kernel(config.get("wkv_kernel", "auto"), "paddle", on_cuda=False, fla_installed=False)  # "fla" is refused
        self.rank = int(os.environ.get("PADDLE_TRAINER_ID", "0"))  # the launcher's; no collectives are needed
        self.world_size = int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))
        self.device = pick_device(config["device"])
        if config.get("precision") == "bf16" and self.device == "cpu":
            raise ConfigError("key 'precision' = 'bf16' needs a GPU or XPU with Paddle (its CPU build has no bf16 "
                              "kernels); use fp32")
        self.static = config["paddle_to_static"]
        return self.device

    def load_model(self, state, spec) -> DiR:
        model = DiR(spec)
        model.load_canonical(state)
        model.eval()
        return to_static(model) if self.static else model

    def load_vae(self, path):
        from backends.paddle.vae import load_vae

        return load_vae(path, self.device)

    def generate(self, model, spec, recipe, settings, labels, rng, config, null=None) -> np.ndarray:
        return generate(model, spec, recipe, settings, labels, rng, self.device, config["precision"], null)

    def decode(self, vae, latents: np.ndarray, latent_scale: float) -> np.ndarray:
        from backends.paddle.vae import decode

        return decode(vae, paddle.to_tensor(latents), latent_scale).astype("float32").numpy()


def load_model(ckpt: str, weights: str = "ema", device: str = "cpu"):
    """(model in eval mode, spec, recipe or None) from any backend's checkpoint or a run folder."""
    state, spec, recipe, _ = read_weights(ckpt, weights)
    backend = SampleAdapter()
    backend.setup({"device": device, "paddle_to_static": False})
    return backend.load_model(state, spec), spec, recipe


def sample(config: dict, source_name: str = "config", keep_raw: bool = False) -> dict:
    """Run one sampling job; returns the written paths."""
    return run_sampling(config, SampleAdapter(), source_name, keep_raw)


def main(argv=None) -> None:
    def run():
        config, config_path = parse_cli(sys.argv[1:] if argv is None else argv, SAMPLE_SCHEMA, "python -m backends.paddle.sample")
        sample(config, config_path or "command line")

    run_cli(run, (VAEError,))


if __name__ == "__main__":
    main()
