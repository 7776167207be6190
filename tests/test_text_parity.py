"""Text-conditioned DiR (``condition: text``): Paddle and MindSpore (PyNative and Graph) against PyTorch.

One small caption model (hidden 64, depth 2, heads of 32; a 2-block text encoder 32 wide, so the
projection to 64 is used; captions of at most 8 ids) on perturbed canonical weights, so no
zero-initialised gate hides a difference. The captions cover every pooling case: several
lengths, a second end-of-text after the first (the first one counts), the empty caption
(end-of-text first: the learned null embedding), a row with no end-of-text at all (the null
embedding too, as Di-R) and one whose end-of-text is the last id. Relative error
||a - b|| / ||b|| in fp32:

* the model forward and (Paddle, MindSpore PyNative) the text encoder alone: <= 1e-5; the
  pooling positions (``first_eos_position``) equal ``common.text.first_eos`` exactly;
* the DDPM loss terms (learned sigma, so the variational bound too) and every parameter's gradient
  (the null embedding and every text encoder tensor included): <= 1e-4. The timesteps leave out
  t = 0, the discretised-decoder likelihood, whose fp32 cancellation (cdf_plus - cdf_min over a
  1/255 bin) shows MindSpore's CPU ``tanh`` (up to 1e-4 off; torch's is 3e-8): with t = 0 the
  vb term of that row is 1e-4 off, and the gradients reached mostly through that row 1e-3 to 3e-3
  (the text encoder's on a captioned row, the null embedding's on the empty one), while forward
  and mse agree to 1e-7. That is ``backends/mindspore/diffusion.py``'s to settle, not the
  caption encoder's;
* a 20-step DDIM sample (denoised estimates clipped) through each backend's ``objectives.generate`` with classifier-free
  guidance 4 (the null caption, so the null embedding, for three rows; a negative prompt's ids for
  the third), from the same numpy seed: <= 1e-4.

Each framework runs in its own interpreter (``python tests/test_text_parity.py torch|paddle|mindspore
CASE_DIR [graph,pynative]``) and writes an .npz; ``python tests/test_text_parity.py all DIR`` runs
them all and prints the figures. The helpers (``rel``, ``perturbed_state``, ``run_python``) are the
ones of ``tests/test_mindspore_parity.py`` and ``tests/conftest.py``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.spec import build_spec  # noqa: E402

SPEC = dict(hidden_size=64, depth=2, head_size=32, input_size=8, in_channels=4, mix_lora_rank=8,
            decay_lora_rank=16, class_dropout_prob=0.1, condition="text", text_depth=2, text_width=32,
            text_max_tokens=8, text_vocab=256)
IDS = np.array([
    [5, 17, 42, 1, 6, 1, 0, 0],  # 3 ids; a second end-of-text after the first
    [1, 0, 0, 0, 0, 0, 0, 0],  # the empty caption: the null embedding
    [7, 8, 9, 10, 11, 12, 13, 14],  # no end-of-text: the null embedding (Di-R's argmax gives 0)
    [200, 1, 0, 0, 0, 0, 0, 0],  # 1 id
    [3, 4, 5, 6, 7, 8, 9, 1],  # 7 ids, the end-of-text last
    [250, 99, 1, 0, 0, 0, 0, 0],  # 2 ids
    [11, 1, 1, 1, 1, 1, 1, 1],  # 1 id, end-of-text repeated
    [60, 61, 62, 63, 64, 1, 0, 0],  # 5 ids
], dtype=np.int64)
LOSS_ROWS = [0, 1, 2, 3]  # the empty and the EOS-less caption too, so the null embedding has a gradient
SAMPLE_ROWS = [0, 3, 4, 7]
NEGATIVE = np.array([9, 33, 1, 0, 0, 0, 0, 0], dtype=np.int64)  # a negative prompt for the third sample row
NEGATIVE_ROW = 2
DDPM_RECIPE = {"objective": "ddpm", "diffusion_steps": 1000, "noise_schedule": "linear"}
DDIM_STEPS, CFG, SAMPLE_SEED = 20, 4.0, 7
THRESHOLDS = {"text": 1e-5, "forward": 1e-5, "loss": 1e-4, "grads": 1e-4, "ddim": 1e-4}
MODES = ("pynative", "graph")
# One MindSpore process runs both modes (its start-up is a good part of this file's time), Graph first:
# in MindSpore 2.10 a Graph compile after PyNative calls of the same functions fails in that process
# ("unexpected keyword argument 'branch'" from wkv6), while PyNative after Graph runs as in a fresh one.
MINDSPORE_ORDER = "graph,pynative"


def text_spec():
    return build_spec("DiR-Tiny/2", **SPEC)


def make_case(case_dir: Path) -> None:
    """Perturbed canonical weights and every input, in ``case_dir/case.npz``."""
    from common.conditions import null_condition
    from tests.test_mindspore_parity import perturbed_state

    spec = text_spec()
    rng = np.random.default_rng(4321)
    state = perturbed_state(spec, rng)
    n, c, s = len(IDS), spec.in_channels, spec.input_size
    null = null_condition(spec, len(SAMPLE_ROWS))
    null[NEGATIVE_ROW] = NEGATIVE
    np.savez(case_dir / "case.npz", spec=spec.to_json(), **{f"w/{k}": v for k, v in state.items()},
             ids=IDS, x=rng.standard_normal((n, c, s, s)).astype(np.float32),
             t=np.array([0, 17, 250, 500, 640, 800, 999, 3], dtype=np.int64),
             loss_x=np.clip(rng.standard_normal((len(LOSS_ROWS), c, s, s)), -1, 1).astype(np.float32),
             loss_t=np.array([1, 3, 400, 999], dtype=np.int64),  # no t = 0: see the docstring
             loss_noise=rng.standard_normal((len(LOSS_ROWS), c, s, s)).astype(np.float32),
             sample_null=null)


# ---- one framework --------------------------------------------------------------------------------

def run(fw: str, case_dir: Path, mode: str = "pynative") -> None:
    """Text encoder, forward, loss and gradients, and a guided DDIM sample in framework ``fw``
    (MindSpore: in each execution mode of the comma-separated ``mode``, one process for all)."""
    if fw == "mindspore" and "," in mode:
        for one in mode.split(","):
            run(fw, case_dir, one)
        return
    from common.objectives import SamplerSettings, training_inputs
    from common.param_mapping import framework_name, from_framework
    from common.params import parameter_table
    from common.recipe import recipe_from_config
    from common.spec import DiRSpec

    data = np.load(case_dir / "case.npz")
    spec = DiRSpec.from_json(str(data["spec"]))
    state = {k[2:]: data[k] for k in data.files if k.startswith("w/")}
    recipe = recipe_from_config(DDPM_RECIPE)
    settings = SamplerSettings("ddim", DDIM_STEPS, cfg_scale=CFG, eta=0.0, clip_denoised=True)
    ids, loss_ids = data["ids"], data["ids"][LOSS_ROWS]
    sample_ids = np.ascontiguousarray(data["ids"][SAMPLE_ROWS])
    loss_inputs = training_inputs(recipe, data["loss_t"])
    out, timing = {}, {}
    start = time.process_time()  # CPU seconds: what the suite's one-thread workers pay

    if fw in ("torch", "paddle"):
        if fw == "torch":
            import torch

            from backends.torch import models, objectives
            torch.set_num_threads(1)
            tensor, no_grad = torch.from_numpy, torch.no_grad
            generate = lambda m, cond, rng, null: objectives.generate(m, spec, recipe, settings, cond, rng,  # noqa: E731
                                                                      torch.device("cpu"), null_cond=null)
        else:
            import paddle

            from backends.paddle import models, objectives
            tensor, no_grad = paddle.to_tensor, paddle.no_grad
            generate = lambda m, cond, rng, null: objectives.generate(m, spec, recipe, settings, cond, rng,  # noqa: E731
                                                                      null_cond=null)
        model = models.DiR(spec)
        model.load_canonical(state)
        model.eval()
        with no_grad():
            out["positions"] = models.first_eos_position(tensor(ids)).numpy()
            out["text"] = model.text_encoder(tensor(ids)).numpy()
            out["forward"] = model(tensor(data["x"]), tensor(data["t"]), tensor(ids)).numpy()
        timing["forward_s"] = time.process_time() - start
        start = time.process_time()
        out["ddim"], _ = generate(model, sample_ids, np.random.default_rng(SAMPLE_SEED), data["sample_null"])
        timing["ddim_s"] = time.process_time() - start
        start = time.process_time()
        model = models.DiR(spec)
        model.load_canonical(state)
        model.train()
        losses = objectives.build_objective(recipe, spec.learn_sigma).losses_from_inputs(
            model, tensor(data["loss_x"]), tensor(loss_ids), {k: tensor(v) for k, v in loss_inputs.items()},
            tensor(data["loss_noise"]))
        losses["loss"].mean().backward()
        out["loss"] = np.array([float(losses[k].mean().detach()) for k in ("loss", "mse", "vb")])
        grads = {name: p.grad.numpy() for name, p in model.named_parameters()}
        grads = from_framework(fw, grads, spec)  # canonical names and layout (Paddle's Linear is [in, out])
        timing["grad_s"] = time.process_time() - start
    else:
        import mindspore as ms
        from mindspore import Tensor

        from backends.mindspore import models, objectives
        from backends.mindspore import train as ms_train

        models.set_execution_mode(mode, "cpu")
        model = models.DiR(spec)
        model.load_canonical(state)
        model.set_train(False)
        out["positions"] = models.first_eos_position(Tensor(ids)).asnumpy()
        if mode == "pynative":  # Graph mode would compile the encoder on its own too; the forward covers it
            out["text"] = model.text_encoder(Tensor(ids)).asnumpy()
        out["forward"] = model(Tensor(data["x"]), Tensor(data["t"]), Tensor(ids)).asnumpy()
        timing["forward_s"] = time.process_time() - start
        start = time.process_time()
        out["ddim"], _ = objectives.generate(model, spec, recipe, settings, sample_ids,
                                             np.random.default_rng(SAMPLE_SEED), null_cond=data["sample_null"])
        timing["ddim_s"] = time.process_time() - start
        start = time.process_time()
        model = models.DiR(spec)
        model.load_canonical(state)
        model.set_train(True)
        weights = model.trainable_params()
        forward_backward = ms_train.ForwardBackward(model, objectives.build_objective(recipe, spec.learn_sigma),
                                                    weights, 1)
        loss, names, means, grad_values = forward_backward(
            Tensor(data["loss_x"]), Tensor(loss_ids), ms.mutable({k: Tensor(v) for k, v in loss_inputs.items()}),
            Tensor(data["loss_noise"]))
        terms = dict(zip(names, (float(v.asnumpy()) for v in means)))
        out["loss"] = np.array([float(loss.asnumpy()), terms["mse"], terms["vb"]])
        to_canonical = {framework_name("mindspore", info.name, info.kind): info.name for info in parameter_table(spec)}
        grads = {to_canonical[p.name]: g.asnumpy() for p, g in zip(weights, grad_values)}
        timing["grad_s"] = time.process_time() - start
    for name, grad in grads.items():
        out[f"grad/{name}"] = grad
    out["timing"] = np.array(json.dumps(timing))
    np.savez(case_dir / f"out_{fw}{'' if fw != 'mindspore' else '_' + mode}.npz", **out)


# ---- comparison ------------------------------------------------------------------------------------

def compare(case_dir: Path, name: str) -> dict:
    from tests.test_mindspore_parity import rel

    ref = np.load(case_dir / "out_torch.npz")
    got = np.load(case_dir / f"out_{name}.npz")
    grads = {k: rel(got[k], ref[k]) for k in ref.files if k.startswith("grad/")}
    worst = max(grads, key=grads.get)
    return {
        "positions_equal": bool(np.array_equal(got["positions"], ref["positions"])),
        "positions": got["positions"].tolist(),
        "text": rel(got["text"], ref["text"]) if "text" in got.files else None,
        "forward": rel(got["forward"], ref["forward"]),
        "loss": rel(got["loss"], ref["loss"]),
        "grads_max": grads[worst],
        "grads_worst": worst,
        "grads_names": sorted(k for k in got.files if k.startswith("grad/")) == sorted(grads),
        "ddim": rel(got["ddim"], ref["ddim"]),
        "timing": json.loads(str(got["timing"])),
    }


# ---- tests ----------------------------------------------------------------------------------------

if __name__ != "__main__":
    import importlib.util

    import pytest

    pytest.importorskip("torch")
    from tests.conftest import run_python

    BACKENDS = [pytest.param("paddle", marks=pytest.mark.paddle)] + [f"mindspore_{mode}" for mode in MODES]

    @pytest.fixture(scope="module")
    def case(tmp_path_factory):
        case_dir = tmp_path_factory.mktemp("text_parity")
        make_case(case_dir)
        run_python([str(Path(__file__).resolve()), "torch", str(case_dir)],
                   env_extra={"OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"]})
        return case_dir

    @pytest.fixture(scope="module")
    def reports(case):
        return {}

    @pytest.fixture
    def report(request, case, reports):
        """The figures of one backend (and mode), computed once per module."""
        name = request.param
        fw = name.partition("_")[0]
        if importlib.util.find_spec(fw) is None:  # not imported here: each framework runs in its own process
            pytest.skip(f"{fw} is not installed")
        if name not in reports:
            names = [f"mindspore_{mode}" for mode in MODES] if fw == "mindspore" else [name]
            run_python([str(Path(__file__).resolve()), fw, str(case), *([MINDSPORE_ORDER] if fw == "mindspore" else [])],
                       env_extra={"OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"]},
                       cwd=case)  # Graph-mode compile failures write rank_0/ into the working folder
            for one in names:
                reports[one] = compare(case, one)
                print(f"\n{one} vs PyTorch (text condition): {json.dumps(reports[one], indent=1)}")
        return reports[name]

    def test_the_reference_exercises_every_part(case):
        """PyTorch's side: pooling at the first end-of-text, the null embedding for the empty and the
        EOS-less caption, a gradient in every tensor (nothing left zero by the init), a finite sample."""
        from common.text import first_eos

        ref = np.load(case / "out_torch.npz")
        np.testing.assert_array_equal(ref["positions"], first_eos(IDS))
        text = ref["text"]
        assert np.abs(text[1] - text[2]).max() == 0
        assert np.abs(text[0] - text[1]).max() > 0
        assert not [k for k in ref.files if k.startswith("grad/") and not np.any(ref[k])]
        assert np.isfinite(ref["ddim"]).all() and np.abs(ref["ddim"]).max() < 10

    @pytest.mark.parametrize("report", BACKENDS, indirect=True)
    def test_text_encoder_and_forward(report):
        assert report["positions_equal"], report["positions"]
        assert report["text"] is None or report["text"] <= THRESHOLDS["text"]
        assert report["forward"] <= THRESHOLDS["forward"]

    @pytest.mark.parametrize("report", BACKENDS, indirect=True)
    def test_loss_and_every_gradient(report):
        assert report["grads_names"]
        assert report["loss"] <= THRESHOLDS["loss"]
        assert report["grads_max"] <= THRESHOLDS["grads"], report["grads_worst"]

    @pytest.mark.parametrize("report", BACKENDS, indirect=True)
    def test_ddim_cfg_sample_with_negative_prompt(report):
        assert report["ddim"] <= THRESHOLDS["ddim"]


if __name__ == "__main__":
    if sys.argv[1] in ("torch", "paddle", "mindspore"):
        run(sys.argv[1], Path(sys.argv[2]), *sys.argv[3:4])
    elif sys.argv[1] == "all":  # make, run every framework, print the figures: python tests/test_text_parity.py all DIR
        import subprocess

        case_dir = Path(sys.argv[2])
        case_dir.mkdir(parents=True, exist_ok=True)
        make_case(case_dir)
        import resource

        for args in (["torch"], ["paddle"], ["mindspore", MINDSPORE_ORDER]):
            begin, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run([sys.executable, __file__, args[0], str(case_dir), *args[1:]], check=True, cwd=case_dir)
            used = resource.getrusage(resource.RUSAGE_CHILDREN)
            print(args, f"{time.perf_counter() - begin:.1f} s wall, "
                        f"{used.ru_utime - cpu.ru_utime + used.ru_stime - cpu.ru_stime:.1f} s CPU")
            for name in ([f"mindspore_{mode}" for mode in MODES] if args[0] == "mindspore" else args[:1]):
                if name != "torch":
                    print(name, json.dumps(compare(case_dir, name), indent=1))
