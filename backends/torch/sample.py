"""Sample DiR with PyTorch: ``python -m backends.torch.sample -c configs/sample/digits.yaml [--key value ...]``.

Writes ``out_dir/grid.png``, ``out_dir/images/*.png`` and ``out_dir/samples.npz``
(``arr_0`` uint8 NHWC, ``arr_1`` labels). Class parsing, names and output
writing live in ``common/sampling.py``.
"""
from __future__ import annotations

import sys

import numpy as np
import torch
from tqdm.auto import tqdm

from backends.torch.diffusion import Sampler, guided_model
from backends.torch.models import DiR
from backends.torch.vae import VAEError
from common.checkpoint import CheckpointError, load_canonical
from common.config import SAMPLE_SCHEMA, ConfigError, check_sample_config, parse_cli
from common.diffusion import make_schedule
from common.images import to_uint8_nhwc
from common.sampling import (batches, class_names_for, diffusion_settings, is_latent_model, parse_classes,
                             sample_labels, write_outputs)
from common.spec import DiRSpec
from common.training import check_train_checkpoint, find_checkpoint

CHECKPOINT_EXTENSIONS = ("pt", "safetensors")


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("key 'device' = 'cuda' but no CUDA device is available")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def load_model(ckpt: str, weights: str, device) -> tuple[DiR, DiRSpec, dict | None]:
    """(model in eval mode, spec, the training config or None) from a run folder, .pt or .safetensors."""
    path = find_checkpoint(ckpt, CHECKPOINT_EXTENSIONS)
    if path.suffix == ".safetensors":
        state, spec = load_canonical(path)
        model = DiR(spec)
        model.load_canonical(state)
        return model.to(device).eval(), spec, None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({err})") from None
    spec = check_train_checkpoint(checkpoint, path)
    model = DiR(spec)
    model.load_state_dict(checkpoint[weights])
    tqdm.write(f"loaded {weights} weights of step {checkpoint['step']} from {path}")
    return model.to(device).eval(), spec, dict(checkpoint["config"]) or None  # converted files hold {}


@torch.no_grad()
def generate(model, spec: DiRSpec, sampler: Sampler, labels: np.ndarray, config: dict, device, vae=None) -> np.ndarray:
    """All images for ``labels`` as uint8 [N, H, W, C], batch by batch from one seeded generator."""
    generator = torch.Generator().manual_seed(config["seed"])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config["precision"] == "bf16")
    shape = (spec.in_channels, spec.input_size, spec.input_size)
    images = []
    for batch in tqdm(batches(labels, config["batch_size"]), desc=f"sampling ({sampler.kind}, {sampler.num_steps} steps)"):
        y = torch.from_numpy(batch).to(device)
        with autocast:
            x = sampler.sample(guided_model(model, y, config["cfg_scale"], spec.num_classes), (len(batch), *shape),
                               generator, device)
        if vae is not None:
            from backends.torch.vae import decode

            x = decode(vae, x.float())
        images.append(to_uint8_nhwc(x.float().cpu().numpy()))
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
                      config["num_sampling_steps"], config["eta"], config["clip_denoised"], device)
    vae = None
    if is_latent_model(spec, train_config):
        from backends.torch.vae import load_vae

        vae = load_vae(config["vae_path"], device)
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
        config, config_path = parse_cli(sys.argv[1:] if argv is None else argv, SAMPLE_SCHEMA, "python -m backends.torch.sample")
        sample(config, config_path or "command line")
    except (ConfigError, CheckpointError, VAEError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
