"""The recipe travels with the weights between PyTorch and Paddle: tiny runs of each framework
(DDPM with the cosine schedule, and flow matching), converted with tools/convert_ckpt.py, sampled
by the other framework with no recipe flags, give the samples the training framework gives of
its own checkpoint at the same seed (relative error <= 1e-4).

Each framework trains and samples in its own interpreter; the samplers draw their noise from
the same numpy seed in the same order, so the comparison covers the recipe (schedule, path,
time scale), the weights' layout and the noise order at once.
"""
import json

import numpy as np
import pytest

pytest.importorskip("paddle")
pytest.importorskip("torch")

from tests.conftest import run_python  # noqa: E402

pytestmark = pytest.mark.paddle

RTOL = 1e-4
TINY = ["--dataset", "digits", "--image_size", "8", "--patch_size", "4", "--hidden_size", "32", "--head_size", "16",
        "--depth", "1", "--mix_lora_rank", "4", "--decay_lora_rank", "8", "--global_batch_size", "8", "--lr", "0.05",
        "--warmup_steps", "1", "--log_every", "1", "--ckpt_every", "100", "--sample_every", "-1", "--seed", "3",
        "--max_steps", "3", "--ema_decay", "0.5"]  # a large lr and a short EMA: three steps move the sampled (EMA)
# weights of the zero-initialised output layers well away from zero, so the network shapes the samples
RECIPES = {"ddpm": ["--noise_schedule", "cosine"],
           "flow": ["--objective", "flow", "--learn_sigma", "false", "--flow_path", "gvp"]}
# Samplers that draw noise at every step, so the noise order is compared too.
SAMPLERS = {"ddpm": ["--sampler", "ddpm", "--num_sampling_steps", "4"],
            "flow": ["--sampler", "sde", "--num_sampling_steps", "4"]}
SAMPLE = ["--classes", "[1, 4]", "--num_per_class", "2", "--cfg_scale", "2.0", "--batch_size", "4", "--seed", "5",
          "--save_images", "false"]
SUFFIX = {"torch": "pt", "paddle": "pdparams"}

TRAIN = r'''
import importlib, json, sys
from common.config import TRAIN_SCHEMA, parse_cli
fw, runs = sys.argv[1], json.loads(sys.argv[2])
train = importlib.import_module(f"backends.{fw}.train").train
for run_dir, args in runs:
    config, _ = parse_cli([*args, "--run_dir", run_dir], TRAIN_SCHEMA, "round-trip test")
    train(config)
'''

SAMPLE_RAW = r'''
import importlib, json, sys
import numpy as np
from common.config import SAMPLE_SCHEMA, parse_cli
fw, jobs = sys.argv[1], json.loads(sys.argv[2])
sample = importlib.import_module(f"backends.{fw}.sample").sample
for ckpt, out_dir, args in jobs:
    config, _ = parse_cli(["--ckpt", ckpt, "--out_dir", out_dir, *args], SAMPLE_SCHEMA, "round-trip test")
    np.save(out_dir + "/raw.npy", sample(config, keep_raw=True)["raw"])
'''

CONVERT = r'''
import json, sys
from tools.convert_ckpt import main
for src, dst in json.loads(sys.argv[1]):
    assert main(["--src", src, "--dst", dst]) == 0, (src, dst)
'''


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """{(trained by, sampled by, objective): (raw samples, info.json)} for both directions, and
    {(trained by, objective): the sampled weights} under 'weights'."""
    root = tmp_path_factory.mktemp("round_trip")
    for fw in ("torch", "paddle"):
        runs = [[str(root / f"{fw}_{objective}"), [*TINY, *extra]] for objective, extra in RECIPES.items()]
        run_python(["-c", TRAIN, fw, json.dumps(runs)])
    conversions, jobs = [], {"torch": [], "paddle": []}
    for trained, other in (("torch", "paddle"), ("paddle", "torch")):
        for objective in RECIPES:
            run = root / f"{trained}_{objective}"
            converted = root / f"{trained}_{objective}_converted.{SUFFIX[other]}"
            conversions.append([str(run / "checkpoints" / f"0000003.{SUFFIX[trained]}"), str(converted)])
            for sampler, ckpt in ((trained, run), (other, converted)):
                out = root / f"{trained}_{objective}_by_{sampler}"
                out.mkdir()
                jobs[sampler].append([str(ckpt), str(out), [*SAMPLERS[objective], *SAMPLE]])
    run_python(["-c", CONVERT, json.dumps(conversions)])
    for fw in ("torch", "paddle"):
        run_python(["-c", SAMPLE_RAW, fw, json.dumps(jobs[fw])])
    from common.formats import read_checkpoint

    found = {"weights": {}}
    for trained in ("torch", "paddle"):
        for objective in RECIPES:
            pdparams = (root / f"torch_{objective}_converted.pdparams" if trained == "torch"
                        else root / f"paddle_{objective}" / "checkpoints" / "0000003.pdparams")
            found["weights"][trained, objective] = read_checkpoint(pdparams)[0]  # EMA, canonical
            for sampler in ("torch", "paddle"):
                out = root / f"{trained}_{objective}_by_{sampler}"
                found[trained, sampler, objective] = (np.load(out / "raw.npy"),
                                                      json.loads((out / "info.json").read_text()))
    return found


@pytest.mark.parametrize("objective", list(RECIPES))
@pytest.mark.parametrize("trained,other", [("torch", "paddle"), ("paddle", "torch")])
def test_converted_checkpoint_samples_as_its_own_framework_does(samples, trained, other, objective):
    final = samples["weights"][trained, objective]["final_layer.linear.weight"]
    assert np.abs(final).max() > 1e-2  # the network, not only the shared noise, shapes the samples
    own, own_info = samples[trained, trained, objective]
    theirs, info = samples[trained, other, objective]
    assert own.shape == theirs.shape == (4, 1, 8, 8) and np.isfinite(theirs).all()
    assert info["framework"] == other and info["weights_source"]["format"] == other
    assert info["recipe"] == own_info["recipe"]  # read from the converted file, not guessed
    assert info["recipe"]["objective"] == objective
    if objective == "ddpm":
        assert info["recipe"]["noise_schedule"] == "cosine"
    else:
        assert info["recipe"]["flow_path"] == "gvp"
    assert info["sampler"] == own_info["sampler"]
    error = rel(theirs, own)
    print(f"{trained} -> {other} {objective}: relative error {error:.2e}")
    assert error <= RTOL, error
