"""Paddle against PyTorch on the same canonical weights and the same inputs (fp32).

Each framework runs in its own interpreter (``WORKER`` below) and writes its results
to an .npz; the tests compare them with the relative error ||a - b|| / ||b||:

* model forward for each option family (causal / bidirectional scan, skips, each
  pos-embed kind, learn_sigma on and off, q_shift, alternate and zigzag orders): <= 1e-5;
* WKV6 (chunked, a strong-decay sequence that takes the sub-chunk path): <= 1e-5;
* training loss and every parameter's gradient: <= 1e-4;
* parameters (and EMA) after 10 AdamW steps (lr 1e-4, DiT's) with warmup, cosine decay,
  weight decay and clipping, through each backend's own ``train_step``: <= 1e-5;
* a 20-step DDIM sample with classifier-free guidance from the same noise: <= 1e-4;
* flow matching (GVP path, logit-normal times, q_shift with zigzag orders): the loss and every gradient <= 1e-4, and
  20-step Euler, 20-step Heun and 20-step SDE samples with guidance from the same noise
  (the samplers draw it from the same numpy seed, in the same order): <= 1e-4.

The timesteps (or flow times), the noise and the dropped labels (the null class, passed
explicitly) come from the .npz, as the trainer passes its seeded draws.
``DIR_PARITY_REPORT=path`` writes the measured figures as JSON.
"""
import json
import os

import numpy as np
import pytest

pytest.importorskip("paddle")
pytest.importorskip("torch")

from tests.conftest import run_python  # noqa: E402

pytestmark = pytest.mark.paddle

WORKER = r'''
import sys
import numpy as np
fw, inputs_path, out_path = sys.argv[1:4]
from common.objectives import training_inputs
from common.recipe import Recipe
from common.spec import DiRSpec
from common.training import learning_rate, ema_decay
data = dict(np.load(inputs_path, allow_pickle=False))
specs = {name[5:]: DiRSpec.from_json(str(data[name])) for name in data if name.startswith("spec_")}
recipes = {name[7:]: Recipe.from_json(str(data[name])) for name in data if name.startswith("recipe_")}
if fw == "torch":
    import torch
    from backends.torch import diffusion, flow, models, objectives, train, wkv
    T = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    N = lambda t: t.detach().numpy()
    def grads(model):
        return {n: N(p.grad) for n, p in model.named_parameters()}
    def set_lr(opt, lr):
        for g in opt.param_groups:
            g["lr"] = lr
    device = torch.device("cpu")
else:
    import paddle
    from backends.paddle import diffusion, flow, models, objectives, train, wkv
    from common.param_mapping import from_framework
    T = lambda a: paddle.to_tensor(np.ascontiguousarray(a))
    N = lambda t: t.detach().numpy()
    def grads(model):
        # canonical layout, so torch and paddle gradients compare name by name
        return from_framework("paddle", {n: N(p.grad) for n, p in model.named_parameters()}, model.spec)
    def set_lr(opt, lr):
        opt.set_lr(lr)
    device = "cpu"

def build(spec, state):
    model = models.DiR(spec)
    model.load_canonical(state)
    model.eval()
    return model

def weights(prefix):
    return {k[len(prefix) + 1:]: v for k, v in data.items() if k.startswith(prefix + ".")}

out = {}
x, t, y = data["x"], data["t"], data["y"]
for name, spec in specs.items():
    if name.startswith("fwd_"):
        model = build(spec, weights(f"w_{name}"))
        out[name] = N(model(T(x), T(t), T(y)))

# WKV6 alone, with decays strong enough for the sub-chunk path
out["wkv_bi"] = N(wkv.wkv6(*(T(data[f"wkv_{k}"]) for k in "rkvwu"), bidirectional=True))
out["wkv_causal"] = N(wkv.wkv6(*(T(data[f"wkv_{k}"]) for k in "rkvwu")))

# DDPM loss and gradients, with the given timesteps and noise
spec, recipe = specs["train"], recipes["ddpm"]
state = weights("w_train")
model = build(spec, state)
losses = diffusion.DDPMObjective(recipe, spec.learn_sigma).training_losses(
    model, T(data["x0"]), T(data["y_train"]), t=T(data["t_train"]), noise=T(data["noise"]))
losses["loss"].mean().backward()
for key in ("loss", "mse", "vb"):
    out[f"loss_{key}"] = N(losses[key])
for n, g in grads(model).items():
    out[f"grad.{n}"] = g

# 10 AdamW steps through the backend's own train_step (warmup, cosine, decay, clipping)
config = {"lr": 1e-4, "weight_decay": 0.05, "adam_beta2": 0.99, "grad_clip": 0.5, "precision": "fp32",
          "warmup_steps": 4, "max_steps": 10, "lr_schedule": "cosine", "min_lr": 1e-4,
          "ema_decay": 0.9, "ema_warmup": True}
model = build(spec, state)
ema = build(spec, state)
optimizer = train.build_optimizer(model, config)
objective = objectives.build_objective(recipe, spec.learn_sigma)
norms = []
for step in range(10):
    set_lr(optimizer, learning_rate(step, config))
    inputs = {k: T(v) for k, v in training_inputs(recipe, data["t_steps"][step]).items()}
    batch = [(T(data["x0_steps"][step]), T(data["y_train"]), inputs, T(data["noise_steps"][step]), 0)]
    values = train.train_step(model, objective, optimizer, batch, config, device)
    optimizer.step()
    train.update_ema(ema, model, ema_decay(step, config))
    norms.append(values["grad_norm"])
out["grad_norms"] = np.asarray(norms)
for n, v in model.canonical_state().items():
    out[f"adamw.{n}"] = v
for n, v in ema.canonical_state().items():
    out[f"ema.{n}"] = v
for n, v in state.items():
    out[f"init.{n}"] = v

def guided(model, spec, scale):
    return objectives.guided_model(model, T(data["y_sample"]), T(np.full(3, spec.num_classes)), scale,
                                   spec.in_channels)

# 20-step DDIM with guidance, its initial noise from the shared seed (eta = 0: no noise after it)
spec = specs["sample"]
sampler = diffusion.DDPMSampler(recipe, True, "ddim", 20, eta=0.0)
out["ddim"] = N(sampler.sample(guided(build(spec, weights("w_sample")), spec, 4.0), (3, 4, 8, 8),
                               np.random.default_rng(int(data["seed_sample"]))))

# flow matching: loss and gradients on a non-trivial path, then Euler / Heun / SDE samples with guidance
spec, recipe = specs["flow"], recipes["flow"]
model = build(spec, weights("w_flow"))
losses = flow.FlowObjective(recipe).training_losses(model, T(data["x0"]), T(data["y_train"]),
                                                    t=data["t_flow"], noise=T(data["noise"]))
losses["loss"].mean().backward()
for key in ("loss", "mse"):
    out[f"flow_loss_{key}"] = N(losses[key])
for n, g in grads(model).items():
    out[f"flow_grad.{n}"] = g
model = build(spec, weights("w_flow"))
for kind in ("euler", "heun", "sde"):
    sampler = flow.FlowSampler(recipe, kind, 20)
    out[f"flow_{kind}"] = N(sampler.sample(guided(model, spec, 4.0), (3, 4, 8, 8),
                                           np.random.default_rng(int(data["seed_sample"]))))
np.savez(out_path, **out)
'''

BASE = dict(hidden_size=64, depth=2, head_size=32, input_size=8, num_classes=10,
            mix_lora_rank=8, decay_lora_rank=16)
FAMILIES = {
    "bidirectional": {},
    "causal": {"scan": "causal"},
    "skip": {"skip": True, "depth": 4},
    "pos_learned": {"pos_embed": "learned"},
    "pos_none": {"pos_embed": "none"},
    "no_learn_sigma": {"learn_sigma": False, "scan": "causal"},
    "q_shift": {"token_shift": "q_shift"},
    "alternate_causal": {"scan": "causal", "scan_order": "alternate"},
    "zigzag_q_shift_skip": {"token_shift": "q_shift", "scan_order": "zigzag", "skip": True, "depth": 4},
}
FORWARD_TOL, WKV_TOL, GRAD_TOL, ADAMW_TOL, DDIM_TOL, FLOW_TOL = 1e-5, 1e-5, 1e-4, 1e-5, 1e-4, 1e-4


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _perturbed(spec, seed):
    """Canonical weights with every tensor nudged, so zero-init layers (adaLN-Zero, final)
    do not hide differences."""
    from common.params import init_canonical

    rng = np.random.default_rng(seed + 100)
    return {k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in init_canonical(spec, seed).items()}


def _inputs():
    from common.recipe import recipe_from_config
    from common.spec import build_spec

    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((3, 4, 8, 8)).astype(np.float32),
            "t": np.array([0, 431, 999]), "y": np.array([1, 7, 10])}  # 10 = the null class
    for i, (name, overrides) in enumerate(FAMILIES.items()):
        spec = build_spec("DiR-Tiny/2", **{**BASE, **overrides})
        data[f"spec_fwd_{name}"] = np.array(spec.to_json())
        data.update({f"w_fwd_{name}.{k}": v for k, v in _perturbed(spec, i).items()})
    heads, length, size = 2, 100, 16
    shape = (2, length, heads, size)
    for k in "rkv":
        data[f"wkv_{k}"] = rng.standard_normal(shape).astype(np.float32)
    data["wkv_w"] = (-np.exp(rng.standard_normal(shape) * 1.5 + 0.5)).astype(np.float32)
    data["wkv_u"] = rng.standard_normal((heads, size)).astype(np.float32)

    train_spec = build_spec("DiR-Tiny/2", **{**BASE, "skip": True, "pos_embed": "learned"})
    data["spec_train"] = np.array(train_spec.to_json())
    data.update({f"w_train.{k}": v for k, v in _perturbed(train_spec, 7).items()})
    n = 4
    data["x0"] = np.clip(rng.standard_normal((n, 4, 8, 8)), -1, 1).astype(np.float32)
    data["t_train"] = np.array([0, 3, 500, 999])
    data["noise"] = rng.standard_normal((n, 4, 8, 8)).astype(np.float32)
    data["y_train"] = np.array([2, 10, 5, 9])
    data["x0_steps"] = np.clip(rng.standard_normal((10, n, 4, 8, 8)), -1, 1).astype(np.float32)
    data["t_steps"] = rng.integers(0, 1000, (10, n))
    data["noise_steps"] = rng.standard_normal((10, n, 4, 8, 8)).astype(np.float32)

    sample_spec = build_spec("DiR-Tiny/2", **BASE)
    data["spec_sample"] = np.array(sample_spec.to_json())
    data.update({f"w_sample.{k}": v for k, v in _perturbed(sample_spec, 11).items()})
    data["y_sample"] = np.array([0, 3, 9])
    data["seed_sample"] = np.array(20)
    data["recipe_ddpm"] = np.array(recipe_from_config({"objective": "ddpm", "diffusion_steps": 1000,
                                                       "noise_schedule": "linear"}).to_json())

    # the 2-D layout too, so its gathers are tied in the gradients and the samplers
    flow_spec = build_spec("DiR-Tiny/2", **{**BASE, "learn_sigma": False, "skip": True, "token_shift": "q_shift",
                                            "scan_order": "zigzag"})
    data["spec_flow"] = np.array(flow_spec.to_json())
    data.update({f"w_flow.{k}": v for k, v in _perturbed(flow_spec, 13).items()})
    data["recipe_flow"] = np.array(recipe_from_config({"objective": "flow", "flow_path": "gvp",
                                                       "flow_time_sampling": "logit_normal"}).to_json())
    data["t_flow"] = np.array([0.03, 0.31, 0.62, 0.97])
    return data


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("paddle_parity")
    inputs = folder / "inputs.npz"
    np.savez(inputs, **_inputs())
    out = {}
    for fw in ("torch", "paddle"):  # one framework per interpreter
        path = folder / f"{fw}.npz"
        run_python(["-c", WORKER, fw, str(inputs), str(path)], env_extra={"OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"]})
        out[fw] = dict(np.load(path))
    report = {}
    yield out["torch"], out["paddle"], report
    if os.environ.get("DIR_PARITY_REPORT"):
        with open(os.environ["DIR_PARITY_REPORT"], "w") as handle:
            json.dump(report, handle, indent=2)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_matches_torch(results, family):
    ref, pd, report = results
    err = rel(pd[f"fwd_{family}"], ref[f"fwd_{family}"])
    report[f"forward/{family}"] = err
    assert pd[f"fwd_{family}"].shape == ref[f"fwd_{family}"].shape
    assert err <= FORWARD_TOL


def test_wkv6_matches_torch(results):
    ref, pd, report = results
    for key in ("wkv_bi", "wkv_causal"):
        report[key] = rel(pd[key], ref[key])
        assert report[key] <= WKV_TOL, key


def test_loss_and_every_gradient_match_torch(results):
    ref, pd, report = results
    for key in ("loss_loss", "loss_mse", "loss_vb"):
        report[key] = rel(pd[key], ref[key])
        assert report[key] <= GRAD_TOL, key
    names = [k for k in ref if k.startswith("grad.")]
    assert names and set(names) == {k for k in pd if k.startswith("grad.")}
    errors = {name: rel(pd[name], ref[name]) for name in names}
    worst = max(errors, key=errors.get)
    report["grad_max"], report["grad_worst"] = errors[worst], worst
    assert errors[worst] <= GRAD_TOL, (worst, errors[worst])


def test_params_after_ten_adamw_steps_match_torch(results):
    ref, pd, report = results
    report["grad_norms"] = rel(pd["grad_norms"], ref["grad_norms"])
    assert report["grad_norms"] <= GRAD_TOL
    for prefix in ("adamw.", "ema."):
        names = [k for k in ref if k.startswith(prefix)]
        errors = {name: rel(pd[name], ref[name]) for name in names}
        worst = max(errors, key=errors.get)
        report[f"{prefix}max"], report[f"{prefix}worst"] = errors[worst], worst
        assert errors[worst] <= ADAMW_TOL, (worst, errors[worst])
    # For scale: how far the 10 updates themselves (params - init) agree.
    updates = {name: rel(pd[name] - pd["init." + name[6:]], ref[name] - ref["init." + name[6:]])
               for name in ref if name.startswith("adamw.")}
    report["adamw_update_max"] = max(updates.values())


def test_ddim_cfg_sample_matches_torch(results):
    ref, pd, report = results
    report["ddim20_cfg"] = rel(pd["ddim"], ref["ddim"])
    assert np.isfinite(pd["ddim"]).all()
    assert report["ddim20_cfg"] <= DDIM_TOL


def test_flow_loss_and_every_gradient_match_torch(results):
    ref, pd, report = results
    for key in ("flow_loss_loss", "flow_loss_mse"):
        report[key] = rel(pd[key], ref[key])
        assert report[key] <= FLOW_TOL, key
    names = [k for k in ref if k.startswith("flow_grad.")]
    assert names and set(names) == {k for k in pd if k.startswith("flow_grad.")}
    errors = {name: rel(pd[name], ref[name]) for name in names}
    worst = max(errors, key=errors.get)
    report["flow_grad_max"], report["flow_grad_worst"] = errors[worst], worst
    assert errors[worst] <= FLOW_TOL, (worst, errors[worst])


@pytest.mark.parametrize("kind", ["euler", "heun", "sde"])
def test_flow_cfg_samples_match_torch(results, kind):
    ref, pd, report = results
    report[f"flow_{kind}20_cfg"] = rel(pd[f"flow_{kind}"], ref[f"flow_{kind}"])
    assert np.isfinite(pd[f"flow_{kind}"]).all()
    assert report[f"flow_{kind}20_cfg"] <= FLOW_TOL
