"""Sample DiR with PaddlePaddle: ``python -m backends.paddle.sample -c configs/sample/digits.yaml [--key value ...]``.

Writes ``out_dir/grid.png``, ``out_dir/images/*.png`` and ``out_dir/samples.npz``
(``arr_0`` uint8 NHWC, ``arr_1`` labels). Class parsing, names and output
writing live in ``common/sampling.py``.

``DIR_PADDLE_TO_STATIC=1`` runs the network through ``paddle.jit.to_static`` (one
trace per batch shape, then the static program); the images equal the eager ones.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import paddle
from tqdm.auto import tqdm

from backends.paddle.diffusion import Sampler, guided_model
from backends.paddle.models import DiR
from backends.paddle.train import read_checkpoint
from backends.paddle.vae import VAEError
from common.checkpoint import CheckpointError, load_canonical
from common.config import SAMPLE_SCHEMA, ConfigError, check_sample_config, parse_cli
from common.diffusion import make_schedule
from common.images import to_uint8_nhwc
from common.param_mapping import from_framework
from common.sampling import (batches, class_names_for, diffusion_settings, is_latent_model, parse_classes,
                             sample_labels, write_outputs)
from common.spec import DiRSpec
from common.training import check_train_checkpoint, find_checkpoint

CHECKPOINT_EXTENSIONS = ("pdparams", "safetensors")
STATIC_ENV = "DIR_PADDLE_TO_STATIC"


def pick_device(name: str) -> str:
    from backends.paddle.train import _accelerator

    accelerator = _accelerator()
    if name == "cuda" and accelerator is None:
        raise ConfigError("key 'device' = 'cuda' but Paddle sees no GPU / XPU device")
    paddle.set_device(accelerator if name != "cpu" and accelerator is not None else "cpu")
    return paddle.device.get_device()


def to_static(model: DiR) -> DiR:
    """The same model with ``forward`` run by ``paddle.jit.to_static`` (forward_with_cfg calls it)."""
    return paddle.jit.to_static(model)


def load_model(ckpt: str, weights: str, device) -> tuple[DiR, DiRSpec, dict | None]:
    """(model in eval mode, spec, the training config or None) from a run folder, .pdparams or .safetensors."""
    path = find_checkpoint(ckpt, CHECKPOINT_EXTENSIONS)
    if path.suffix == ".safetensors":
        state, spec = load_canonical(path)
        model = DiR(spec)
        model.load_canonical(state)
        model.eval()
        return model, spec, None
    checkpoint = read_checkpoint(path)
    spec = check_train_checkpoint(checkpoint, path)
    model = DiR(spec)
    try:
        model.load_canonical(from_framework("paddle", checkpoint[weights], spec, source=f"{path} '{weights}'"))
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    tqdm.write(f"loaded {weights} weights of step {checkpoint['step']} from {path}")
    model.eval()
    return model, spec, dict(checkpoint["config"]) or None  # converted files hold {}


@paddle.no_grad()
def generate(model, spec: DiRSpec, sampler: Sampler, labels: np.ndarray, config: dict, device, vae=None) -> np.ndarray:
    """All images for ``labels`` as uint8 [N, H, W, C], batch by batch from one seeded generator."""
    generator = np.random.default_rng(config["seed"])
    # bf16 autocast on accelerators only: Paddle's CPU has no bf16 kernels.
    use_bf16 = config["precision"] == "bf16" and device != "cpu"
    shape = (spec.in_channels, spec.input_size, spec.input_size)
    images = []
    for batch in tqdm(batches(labels, config["batch_size"]), desc=f"sampling ({sampler.kind}, {sampler.num_steps} steps)"):
        y = paddle.to_tensor(batch)
        with paddle.amp.auto_cast(enable=use_bf16, dtype="bfloat16"):  # a fresh context each batch
            x = sampler.sample(guided_model(model, y, config["cfg_scale"], spec.num_classes), (len(batch), *shape),
                               generator)
        if vae is not None:
            from backends.paddle.vae import decode

            x = decode(vae, x.astype("float32"))
        images.append(to_uint8_nhwc(x.astype("float32").numpy()))
    return np.concatenate(images)


def sample(config: dict, source_name: str = "config") -> dict:
    """Run one sampling job; returns the written paths."""
    check_sample_config(config, source_name)
    device = pick_device(config["device"])
    model, spec, train_config = load_model(config["ckpt"], config["weights"], device)
    if config["cfg_scale"] > 1.0 and not spec.has_null_class:
        raise ConfigError(f"{source_name}: key 'cfg_scale' = {config['cfg_scale']} needs a model trained with "
                          "class_dropout_prob > 0 (it has no null class); set cfg_scale: 1")
    names = class_names_for(config["class_names"], spec.num_classes, train_config)
    labels = sample_labels(parse_classes(config["classes"], spec.num_classes, names), config["num_per_class"])
    steps, noise_schedule = diffusion_settings(train_config)
    sampler = Sampler(make_schedule(steps, noise_schedule, spec.learn_sigma), config["sampler"],
                      config["num_sampling_steps"], config["eta"], config["clip_denoised"])
    vae = None
    if is_latent_model(spec, train_config):
        from backends.paddle.vae import load_vae

        vae = load_vae(config["vae_path"], device)
    if os.environ.get(STATIC_ENV, "0") not in ("", "0"):
        model = to_static(model)
    images = generate(model, spec, sampler, labels, config, device, vae)
    metadata = {"sampler": sampler.kind, "steps": sampler.num_steps, "cfg_scale": config["cfg_scale"],
                "seed": config["seed"], "ckpt": str(config["ckpt"]), "weights": config["weights"],
                "class_names": [names[int(c)] for c in np.unique(labels)] if names else None}
    paths = write_outputs(config["out_dir"], images, labels, nrow=config["num_per_class"],
                          save_images=config["save_images"], grid_upscale=config["grid_upscale"], metadata=metadata)
    tqdm.write(f"wrote {len(labels)} samples: {paths['grid']}, {paths['npz']}")
    return paths


def main(argv=None) -> None:
    try:
        config, config_path = parse_cli(sys.argv[1:] if argv is None else argv, SAMPLE_SCHEMA, "python -m backends.paddle.sample")
        sample(config, config_path or "command line")
    except (ConfigError, CheckpointError, VAEError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
