"""Sample DiR with PyTorch: ``python -m backends.torch.sample -c configs/sample/digits.yaml [--key value ...]``.

Reads a checkpoint of any backend (a run folder, ``.pt``/``.pth``, ``.pdparams``, ``.ckpt``
or canonical ``.safetensors``) with its training recipe, and writes ``out_dir/grid.png``,
``out_dir/images/*.png``, ``out_dir/samples.npz`` (``arr_0`` uint8 NHWC, ``arr_1`` labels) and
``out_dir/info.json``. The flow (weights, recipe, classes, batches, outputs) is
``common.sampling.run_sampling``; this file is its PyTorch adapter.

Several processes: ``torchrun --nproc_per_node N -m backends.torch.sample -c ...`` deals the batches
out to the processes (one GPU each); rank 0 writes the one ``samples.npz``.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

from backends.torch.models import DiR
from backends.torch.objectives import generate
from backends.torch.vae import VAEError
from backends.torch.wkv import fla_installed
from common.cli import run_cli
from common.config import SAMPLE_SCHEMA, ConfigError, parse_cli, resolve_wkv_kernel
from common.sampling import SampleBackend, read_weights, run_sampling


def pick_device(name: str) -> torch.device:
    """The device a sampling process uses: under torchrun, the GPU of its LOCAL_RANK."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("key 'device' = 'cuda' but no CUDA device is available")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


class SampleAdapter(SampleBackend):
    """The PyTorch side of ``common.sampling.run_sampling``."""

    framework = "torch"

    def setup(self, config: dict) -> str:
        self.rank = int(os.environ.get("RANK", "0"))  # torchrun's; the processes need no process group
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.torch_device = pick_device(config["device"])
        self.wkv_kernel = resolve_wkv_kernel(config.get("wkv_kernel", "auto"), "torch", self.torch_device.type == "cuda",
                                             fla_installed())
        return str(self.torch_device)

    def load_model(self, state, spec) -> DiR:
        model = DiR(spec)
        model.load_canonical(state)
        model.set_wkv_kernel(self.wkv_kernel)
        return model.to(self.torch_device).eval()

    def load_vae(self, path):
        from backends.torch.vae import load_vae

        return load_vae(path, self.torch_device)

    def generate(self, model, spec, recipe, settings, labels, rng, config, null=None) -> np.ndarray:
        return generate(model, spec, recipe, settings, labels, rng, self.torch_device, config["precision"], null)

    def decode(self, vae, latents: np.ndarray, latent_scale: float) -> np.ndarray:
        from backends.torch.vae import decode

        return decode(vae, torch.from_numpy(latents).to(self.torch_device), latent_scale).float().cpu().numpy()


def load_model(ckpt: str, weights: str = "ema", device: str = "cpu"):
    """(model in eval mode, spec, recipe or None) from any backend's checkpoint or a run folder."""
    state, spec, recipe, _ = read_weights(ckpt, weights)
    backend = SampleAdapter()
    backend.setup({"device": device})
    return backend.load_model(state, spec), spec, recipe


def sample(config: dict, source_name: str = "config", keep_raw: bool = False) -> dict:
    """Run one sampling job; returns the written paths."""
    return run_sampling(config, SampleAdapter(), source_name, keep_raw)


def main(argv=None) -> None:
    def run():
        config, config_path = parse_cli(sys.argv[1:] if argv is None else argv, SAMPLE_SCHEMA, "python -m backends.torch.sample")
        sample(config, config_path or "command line")

    run_cli(run, (VAEError,))


if __name__ == "__main__":
    main()
