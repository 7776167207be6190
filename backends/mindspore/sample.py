"""Sample DiR with MindSpore: ``python -m backends.mindspore.sample -c configs/sample/digits.yaml [--key value ...]``.

Same keys and outputs as ``backends/torch/sample.py``: ``out_dir/grid.png``,
``out_dir/images/*.png`` and ``out_dir/samples.npz`` (``arr_0`` uint8 NHWC, ``arr_1``
labels). Reads a run folder (its latest ``.ckpt``), a training ``.ckpt`` or canonical
``.safetensors``. ``--mode pynative|graph`` (or DIR_MINDSPORE_MODE) picks the execution
mode; under Graph mode the network is compiled once per batch shape.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402
from mindspore import Tensor  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from backends.mindspore.diffusion import Sampler, guided_model  # noqa: E402
from backends.mindspore.models import DiR, set_execution_mode  # noqa: E402
from backends.mindspore.train import load_state, pop_mode, read_checkpoint  # noqa: E402
from common.checkpoint import CheckpointError, load_canonical  # noqa: E402
from common.config import SAMPLE_SCHEMA, ConfigError, check_sample_config, parse_cli  # noqa: E402
from common.diffusion import make_schedule  # noqa: E402
from common.images import to_uint8_nhwc  # noqa: E402
from common.sampling import (batches, class_names_for, diffusion_settings, is_latent_model, parse_classes,
                             sample_labels, write_outputs)  # noqa: E402
from common.spec import DiRSpec  # noqa: E402
from common.training import check_train_checkpoint, find_checkpoint  # noqa: E402

CHECKPOINT_EXTENSIONS = ("ckpt", "safetensors")


def pick_device(name: str, mode: str = "pynative") -> str:
    target = set_execution_mode(mode, name)
    if name == "cuda" and target != "GPU":
        raise ConfigError("key 'device' = 'cuda' but MindSpore has no GPU here")
    return target


def load_model(ckpt: str, weights: str) -> tuple[DiR, DiRSpec, dict | None]:
    """(model in eval mode, spec, the training config or None) from a run folder, .ckpt or .safetensors."""
    path = find_checkpoint(ckpt, CHECKPOINT_EXTENSIONS)
    if path.suffix == ".safetensors":
        state, spec = load_canonical(path)
        model = DiR(spec)
        model.load_canonical(state)
        model.set_train(False)
        return model, spec, None
    checkpoint = read_checkpoint(path)
    spec = check_train_checkpoint(checkpoint, path)
    model = DiR(spec)
    load_state(model, checkpoint[weights], path, weights)
    tqdm.write(f"loaded {weights} weights of step {checkpoint['step']} from {path}")
    model.set_train(False)
    return model, spec, dict(checkpoint["config"]) or None  # converted files hold {}


def generate(model, spec: DiRSpec, sampler: Sampler, labels: np.ndarray, config: dict, vae=None) -> np.ndarray:
    """All images for ``labels`` as uint8 [N, H, W, C], batch by batch from one seeded generator."""
    generator = np.random.default_rng(config["seed"])
    shape = (spec.in_channels, spec.input_size, spec.input_size)
    images = []
    for batch in tqdm(batches(labels, config["batch_size"]), desc=f"sampling ({sampler.kind}, {sampler.num_steps} steps)"):
        y = Tensor(batch)
        x = sampler.sample(guided_model(model, y, config["cfg_scale"], spec.num_classes), (len(batch), *shape), generator)
        if vae is not None:
            from backends.mindspore.vae import decode

            x = decode(vae, x.astype(ms.float32))
        images.append(to_uint8_nhwc(x.astype(ms.float32).asnumpy()))
    return np.concatenate(images)


def sample(config: dict, source_name: str = "config", mode: str = "pynative") -> dict:
    """Run one sampling job; returns the written paths."""
    check_sample_config(config, source_name)
    if config["precision"] == "bf16":
        raise ConfigError(f"{source_name}: key 'precision' = 'bf16' is not supported by the MindSpore backend "
                          "(no bf16 kernels on CPU; use fp32)")
    pick_device(config["device"], mode)
    model, spec, train_config = load_model(config["ckpt"], config["weights"])
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
        from backends.mindspore.vae import load_vae

        vae = load_vae(config["vae_path"])
    images = generate(model, spec, sampler, labels, config, vae)
    metadata = {"sampler": sampler.kind, "steps": sampler.num_steps, "cfg_scale": config["cfg_scale"],
                "seed": config["seed"], "ckpt": str(config["ckpt"]), "weights": config["weights"],
                "class_names": [names[int(c)] for c in np.unique(labels)] if names else None,
                "framework": f"mindspore {ms.__version__}", "mode": mode}
    paths = write_outputs(config["out_dir"], images, labels, nrow=config["num_per_class"],
                          save_images=config["save_images"], grid_upscale=config["grid_upscale"], metadata=metadata)
    tqdm.write(f"wrote {len(labels)} samples: {paths['grid']}, {paths['npz']}")
    return paths


def main(argv=None) -> None:
    try:
        mode, argv = pop_mode(list(sys.argv[1:] if argv is None else argv))
        config, config_path = parse_cli(argv, SAMPLE_SCHEMA, "python -m backends.mindspore.sample [--mode pynative|graph]")
        sample(config, config_path or "command line", mode)
    except (ConfigError, CheckpointError) as err:
        raise SystemExit(f"error: {err}") from None
    except Exception as err:  # the VAE's errors carry their own explanation
        from backends.mindspore.vae import VAEError

        if isinstance(err, VAEError):
            raise SystemExit(f"error: {err}") from None
        raise


if __name__ == "__main__":
    main()
