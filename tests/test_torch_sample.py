"""PyTorch sampling CLI (backends/torch/sample.py) and the shared output/class logic (common/sampling.py)."""
import json
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from backends.torch.sample import main as sample_main, sample  # noqa: E402
from backends.torch.train import train  # noqa: E402
from common.checkpoint import save_canonical  # noqa: E402
from common.config import SAMPLE_SCHEMA, ConfigError, parse_cli  # noqa: E402
from common.recipe import recipe_from_config  # noqa: E402
from common.sampling import (  # noqa: E402
    class_names_for, imagenet_class_names, imagenet_wnids, load_samples, parse_classes, read_weights,
)
from common.spec import DiRSpec  # noqa: E402
from tests.conftest import cli_error  # noqa: E402
from tests.test_torch_train import tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    train(tiny_config(run_dir, "--max_steps", "2", "--ckpt_every", "2"))
    return run_dir


def sample_config(ckpt, out_dir, *extra):
    config, _ = parse_cli(["--ckpt", str(ckpt), "--out_dir", str(out_dir), "--sampler", "ddim",
                           "--num_sampling_steps", "3", "--batch_size", "3", *extra], SAMPLE_SCHEMA, "test")
    return config


def test_sample_writes_grid_pngs_and_npz(trained, tmp_path):
    out = tmp_path / "out"
    sample(sample_config(trained, out, "--classes", "three,7", "--num_per_class", "2", "--cfg_scale", "2.0"))
    images, labels = load_samples(out / "samples.npz")
    assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8
    assert labels.tolist() == [3, 3, 7, 7]
    with np.load(out / "samples.npz") as data:
        assert data["arr_1"].tolist() == [3, 3, 7, 7]
    pngs = sorted(p.name for p in (out / "images").iterdir())
    assert pngs == ["000000_c3.png", "000001_c3.png", "000002_c7.png", "000003_c7.png"]
    from PIL import Image

    assert Image.open(out / "grid.png").size == (2 * 10 + 2, 2 * 10 + 2)  # 2x2 of 8 px + 2 px padding
    info = json.loads((out / "info.json").read_text())
    assert info["class_names"] == ["three", "seven"]
    assert info["sampler"] == {"sampler": "ddim", "cfg_scale": 2.0, "num_steps": 3, "eta": 0.0,
                               "clip_denoised": False, "nfe": 3}
    assert info["recipe"]["objective"] == "ddpm" and info["recipe"]["noise_schedule"] == "linear"
    assert info["recipe"]["diffusion_steps"] == 1000 and info["recipe"]["class_names"][3] == "three"
    assert info["weights_source"]["path"].endswith("0000002.pt") and info["weights_source"]["weights"] == "ema"
    assert info["weights_source"]["step"] == 2 and info["framework"] == "torch" and info["seed"] == 0


def test_sampling_is_deterministic_and_weights_selectable(trained, tmp_path):
    sample(sample_config(trained, tmp_path / "a", "--classes", "[1]", "--num_per_class", "3", "--sampler", "ddpm"))
    sample(sample_config(trained, tmp_path / "b", "--classes", "[1]", "--num_per_class", "3", "--sampler", "ddpm"))
    sample(sample_config(trained, tmp_path / "c", "--classes", "[1]", "--num_per_class", "3", "--sampler", "ddpm", "--seed", "1"))
    a, b, c = (load_samples(tmp_path / k / "samples.npz")[0] for k in "abc")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    checkpoint = torch.load(trained / "checkpoints" / "0000002.pt", weights_only=True)
    for weights in ("ema", "model"):
        state, spec, recipe, source = read_weights(str(trained), weights)
        assert spec.num_classes == 10 and recipe.objective == "ddpm" and source["weights"] == weights
        name = "final_layer.adaLN_modulation.1.weight"
        np.testing.assert_array_equal(state[name], checkpoint[weights][name].numpy())


def test_sample_from_canonical_safetensors(trained, tmp_path):
    checkpoint = torch.load(trained / "checkpoints" / "0000002.pt", weights_only=True)
    spec = DiRSpec.from_dict(checkpoint["spec"])
    from backends.torch.models import DiR

    model = DiR(spec)
    model.load_state_dict(checkpoint["ema"])
    save_canonical(tmp_path / "ema.safetensors", model.canonical_state(), spec)  # weights and spec only
    sample(sample_config(trained, tmp_path / "pt", "--classes", "[2]", "--num_per_class", "2", "--class_names", "none"))
    with pytest.raises(Exception, match=r"ema.safetensors carries no training recipe .* --objective ddpm"):
        sample(sample_config(tmp_path / "ema.safetensors", tmp_path / "st", "--classes", "[2]", "--num_per_class", "2"))
    with pytest.raises(Exception, match=r"with --objective ddpm also pass --noise_schedule"):
        sample(sample_config(tmp_path / "ema.safetensors", tmp_path / "st", "--objective", "ddpm",
                             "--diffusion_steps", "1000"))
    sample(sample_config(tmp_path / "ema.safetensors", tmp_path / "st", "--classes", "[2]", "--num_per_class", "2",
                         "--objective", "ddpm", "--diffusion_steps", "1000", "--noise_schedule", "linear"))
    np.testing.assert_array_equal(load_samples(tmp_path / "pt" / "samples.npz")[0],
                                  load_samples(tmp_path / "st" / "samples.npz")[0])
    # A key that contradicts the recipe the file carries stops instead of sampling with the wrong schedule.
    with pytest.raises(Exception, match=r"trained with a different recipe .*\(noise_schedule: file 'linear' vs config 'cosine'"):
        sample(sample_config(trained, tmp_path / "x", "--noise_schedule", "cosine"))


def test_sample_cli_errors(trained, tmp_path, capsys):
    message = cli_error(sample_main, ["--ckpt", str(trained), "--classes", "sevn", "--out_dir", str(tmp_path)], capsys)
    assert re.search(r"unknown class name 'sevn' \(did you mean 'seven'\?\)", message), message
    message = cli_error(sample_main, ["--ckpt", str(trained), "--classes", "[12]", "--out_dir", str(tmp_path)], capsys)
    assert re.search(r"class index 12 is out of range; the model has classes 0..9", message), message
    message = cli_error(sample_main, ["--ckpt", str(tmp_path / "nothing")], capsys)
    assert re.search(r"checkpoint '.*nothing' not found", message), message
    (tmp_path / "empty").mkdir()
    message = cli_error(sample_main, ["--ckpt", str(tmp_path / "empty")], capsys)
    assert re.search(r"is a folder without checkpoints", message), message
    message = cli_error(sample_main, ["--ckpt", str(trained), "--cfg_scale", "0.5"], capsys)
    assert re.search(r"key 'cfg_scale' = 0.5 must be >= 1", message), message


def test_imagenet_table_and_class_parsing():
    names, wnids = imagenet_class_names(), imagenet_wnids()
    assert len(names) == 1000 and len(set(wnids)) == 1000
    assert names[0] == "tench, Tinca tinca" and names[207] == "golden retriever" and names[999].startswith("toilet tissue")
    assert wnids[0] == "n01440764" and wnids[1] == "n01443537"
    assert parse_classes(["goldfish", "Golden Retriever", 3, "tiger shark"], 1000, names) == [1, 207, 3, 3]
    assert parse_classes("all", 4, None) == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="is a name but this model's classes have no names"):
        parse_classes(["cat"], 4, None)
    latent = recipe_from_config({"objective": "ddpm", "dataset": "latents"})
    assert class_names_for("auto", 1000, latent)[1].startswith("goldfish")
    digits = recipe_from_config({"objective": "ddpm", "dataset": "digits"}, ["zero", "one", "two", "three", "four",
                                                                           "five", "six", "seven", "eight", "nine"])
    assert class_names_for("auto", 10, digits)[7] == "seven"
    assert class_names_for("auto", 5, None) is None
    with pytest.raises(ConfigError, match="gives 10 names but the model has 5 classes"):
        class_names_for("digits", 5, None)
