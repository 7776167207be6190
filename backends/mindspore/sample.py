"""Sample DiR with MindSpore: ``python -m backends.mindspore.sample -c configs/sample/digits.yaml [--key value ...]``.

Reads a checkpoint of any backend (a run folder, ``.pt``/``.pth``, ``.pdparams``, ``.ckpt``
or canonical ``.safetensors``) with its training recipe, and writes ``out_dir/grid.png``,
``out_dir/images/*.png``, ``out_dir/samples.npz`` (``arr_0`` uint8 NHWC, ``arr_1`` labels) and
``out_dir/info.json``. The flow (weights, recipe, classes, batches, outputs) is
``common.sampling.run_sampling``; this file is its MindSpore adapter. The config key
``mindspore_mode`` picks PyNative or Graph mode (the network compiled once per batch shape).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402
from mindspore import Tensor  # noqa: E402

from backends.mindspore.models import DiR, set_execution_mode  # noqa: E402
from backends.mindspore.objectives import generate  # noqa: E402
from backends.mindspore.vae import VAEError  # noqa: E402
from common.cli import run_cli  # noqa: E402
from common.config import SAMPLE_SCHEMA, ConfigError, parse_cli, resolve_wkv_kernel  # noqa: E402
from common.sampling import SampleBackend, read_weights, run_sampling  # noqa: E402


def pick_device(name: str, mode: str = "graph") -> str:
    """Set the execution mode and the device target (auto | cpu | cuda); returns the target."""
    target = set_execution_mode(mode, name)
    if name == "cuda" and target != "GPU":
        raise ConfigError("key 'device' = 'cuda' but MindSpore has no GPU here")
    return target


class SampleAdapter(SampleBackend):
    """The MindSpore side of ``common.sampling.run_sampling``."""

    framework = "mindspore"

    def setup(self, config: dict) -> str:
        resolve_wkv_kernel(config.get("wkv_kernel", "auto"), "mindspore", on_cuda=False, fla_installed=False)  # "fla" is refused
        if config["precision"] == "bf16":
            raise ConfigError("key 'precision' = 'bf16' is not supported by the MindSpore backend "
                              "(no bf16 kernels on CPU; use fp32)")
        target = pick_device(config["device"], config["mindspore_mode"])
        if "MS_WORKER_NUM" in os.environ or "MS_ROLE" in os.environ:  # under msrun: one device per worker
            from mindspore.communication import get_group_size, get_rank, init

            init()
            self.rank, self.world_size = get_rank(), get_group_size()
        return f"{target} ({config['mindspore_mode']} mode)"

    def load_model(self, state, spec) -> DiR:
        model = DiR(spec)
        model.load_canonical(state)
        model.set_train(False)
        return model

    def load_vae(self, path):
        from backends.mindspore.vae import load_vae

        return load_vae(path)

    def generate(self, model, spec, recipe, settings, labels, rng, config, null=None) -> np.ndarray:
        return generate(model, spec, recipe, settings, labels, rng, null)

    def decode(self, vae, latents: np.ndarray, latent_scale: float) -> np.ndarray:
        from backends.mindspore.vae import decode

        return decode(vae, Tensor(latents), latent_scale).astype(ms.float32).asnumpy()


def load_model(ckpt: str, weights: str = "ema", device: str = "cpu"):
    """(model in eval mode, spec, recipe or None) from any backend's checkpoint or a run folder,
    built in the execution mode already set (PyNative unless the caller chose Graph)."""
    state, spec, recipe, _ = read_weights(ckpt, weights)
    backend = SampleAdapter()
    mode = "graph" if ms.get_context("mode") == ms.GRAPH_MODE else "pynative"
    backend.setup({"device": device, "mindspore_mode": mode, "precision": "fp32"})
    return backend.load_model(state, spec), spec, recipe


def sample(config: dict, source_name: str = "config", keep_raw: bool = False) -> dict:
    """Run one sampling job; returns the written paths."""
    return run_sampling(config, SampleAdapter(), source_name, keep_raw)


def main(argv=None) -> None:
    def run():
        config, config_path = parse_cli(sys.argv[1:] if argv is None else argv, SAMPLE_SCHEMA,
                                        "python -m backends.mindspore.sample")
        sample(config, config_path or "command line")

    run_cli(run, (VAEError,))


if __name__ == "__main__":
    main()
