"""tools/convert_ckpt.py and common/formats.py: every format to every other, safely.

Torch runs in this process; Paddle and MindSpore each run once in their own interpreter
(they must not share a process with each other in the wrong order), and one more
interpreter has no framework at all.
"""
import importlib.util
import json
import os
import pickle
import subprocess
import sys
import textwrap
from collections import OrderedDict

import numpy as np
import pytest

from common.checkpoint import load_canonical, save_canonical
from common.formats import (
    Stored, UnsafeCheckpointError, bf16_bits_to_float32, float32_to_bf16_bits, load_pdparams, read_checkpoint,
    read_contents, read_ms_checkpoint, read_safetensors, save_pdparams, sidecar_path, write_ms_checkpoint,
)
from common.param_mapping import to_framework
from common.params import init_canonical, parameter_count
from common.spec import build_spec
from conftest import REPO_ROOT
from tools.convert_ckpt import main

SPEC = build_spec("DiR-Tiny/2", hidden_size=64, depth=2, head_size=32, input_size=8, in_channels=3, num_classes=5,
                  mix_lora_rank=8, decay_lora_rank=8, skip=True, pos_embed="learned", scan="bidirectional")
SUFFIXES = {"torch": "pth", "paddle": "pdparams", "mindspore": "ckpt", "safetensors": "safetensors"}
HAS = {name: importlib.util.find_spec(name) is not None for name in ("torch", "paddle", "mindspore")}
needs_torch = pytest.mark.skipif(not HAS["torch"], reason="PyTorch is not installed")
PARITY_RTOL = 1e-5  # fp32 relative error of the backend parity tests


def perturbed(seed):
    """Canonical weights with every tensor nudged, so zero-init layers matter."""
    rng = np.random.default_rng(seed)
    return {name: (value + 0.05 * rng.standard_normal(value.shape)).astype(np.float32)
            for name, value in init_canonical(SPEC, seed).items()}


def same_bits(a, b):
    return set(a) == set(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes() for k in a)


def convert(*args, expect=0):
    code = main([str(a) for a in args])
    assert code == expect, f"convert_ckpt {' '.join(map(str, args))} exited {code}, expected {expect}"


def run_framework(code, timeout=240):
    """A fresh interpreter (one framework per process); returns the JSON its last stdout line prints."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS=os.environ["OMP_NUM_THREADS"], GLOG_v="3")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print("framework check:", result)  # shown with pytest -s
    return result


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Model and EMA weights, a canonical file of the EMA, torch forward outputs, and
    conversions of the canonical file to every format in fp32 and bf16."""
    root = tmp_path_factory.mktemp("convert")
    model, ema = perturbed(1), perturbed(2)
    save_canonical(root / "ema.safetensors", ema, SPEC)
    files = {}
    for fmt, suffix in SUFFIXES.items():
        if fmt == "torch" and not HAS["torch"]:
            continue
        for dtype in ("fp32", "bf16"):
            files[fmt, dtype] = root / f"ema_{dtype}.{suffix}"
            if fmt != "safetensors" or dtype != "fp32":
                convert("--src", root / "ema.safetensors", "--dst", files[fmt, dtype], "--dtype", dtype)
    files["safetensors", "fp32"] = root / "ema.safetensors"
    rng = np.random.default_rng(0)
    inputs = {"x": rng.standard_normal((2, SPEC.in_channels, 8, 8)).astype(np.float32),
              "t": np.array([10, 700], dtype=np.int64), "y": np.array([1, 4], dtype=np.int64)}
    if HAS["torch"]:
        import torch

        from backends.torch.models import DiR

        net = DiR(SPEC)
        net.load_canonical(ema)
        with torch.no_grad():
            inputs["torch_out"] = net.eval()(*(torch.from_numpy(inputs[k]) for k in "xty")).numpy()
    np.savez(root / "inputs.npz", **inputs)
    np.savez(root / "model.npz", **model)
    return {"root": root, "model": model, "ema": ema, "files": files, "inputs": root / "inputs.npz"}


# ---- round trips --------------------------------------------------------------------------------

def test_round_trip_through_every_format_is_bit_exact(assets, tmp_path):
    src = assets["root"] / "ema.safetensors"
    formats = [f for f in SUFFIXES if f != "torch" or HAS["torch"]]
    for first in formats:
        a = tmp_path / f"a.{SUFFIXES[first]}"
        convert("--src", src, "--dst", a)
        for second in formats:
            b = tmp_path / f"{first}_b.{SUFFIXES[second]}"
            convert("--src", a, "--dst", b)
            back = tmp_path / f"{first}_{second}_back.safetensors"
            convert("--src", b, "--dst", back)
            state, spec = load_canonical(back)
            assert spec == SPEC
            assert same_bits(state, assets["ema"]), f"{first} -> {second} -> safetensors is not bit-exact"
    # the safetensors package reads what common/formats.py writes
    from safetensors.numpy import load_file
    assert same_bits(load_file(str(tmp_path / "a.safetensors")), assets["ema"])


def make_training_checkpoints(root, model, ema):
    """Training checkpoints laid out as each backend's train.py writes them."""
    step, config, spec = 42, {"lr": 1e-4, "dataset": "digits"}, SPEC.to_dict()
    paths = {}
    paddle_state = lambda s: OrderedDict(  # noqa: E731 - paddle.save's nested (name, array) pairs
        (k, (f"param_{i}", v)) for i, (k, v) in enumerate(to_framework("paddle", s, SPEC).items()))
    paths["paddle"] = root / "train.pdparams"
    with open(paths["paddle"], "wb") as f:
        pickle.dump({"model": paddle_state(model), "ema": paddle_state(ema),
                     "optimizer": {"accumulators": {"x.moment1": np.ones(3, np.float32)}, "lr": 1e-4},
                     "step": step, "rng": {"per_rank": [{"seed": np.int64(3)}]}, "config": config, "spec": spec},
                    f, protocol=2)
    paths["mindspore"] = root / "train.ckpt"
    ms = lambda s: to_framework("mindspore", s, SPEC)  # noqa: E731
    write_ms_checkpoint(paths["mindspore"], {**ms(model), **{f"ema.{k}": v for k, v in ms(ema).items()},
                                             "optimizer.moment1.x": np.zeros(3, np.float32), "step": step,
                                             "spec": json.dumps(spec), "config": json.dumps(config)})
    if HAS["torch"]:
        import torch

        t = lambda s: {k: torch.from_numpy(v) for k, v in s.items()}  # noqa: E731
        paths["torch"] = root / "train.pt"
        torch.save({"model": t(model), "ema": t(ema), "optimizer": {"state": {}, "param_groups": []}, "step": step,
                    "rng": {"per_rank": [{"torch": torch.get_rng_state()}]}, "config": config, "spec": spec},
                   paths["torch"])
    return paths


def test_weights_flag_picks_model_or_ema_of_every_training_checkpoint(assets, tmp_path):
    paths = make_training_checkpoints(tmp_path, assets["model"], assets["ema"])
    for fmt, path in paths.items():
        for weights, expected in (("ema", assets["ema"]), ("model", assets["model"])):
            out = tmp_path / f"{fmt}_{weights}.safetensors"
            convert("--src", path, "--dst", out, "--weights", weights)
            state, _ = load_canonical(out)
            assert same_bits(state, expected), (fmt, weights)
        contents = read_contents(path)
        assert contents.layout == "training" and contents.step == 42 and contents.spec == SPEC
        assert contents.config == {"lr": 1e-4, "dataset": "digits"}
    # the step and the training config travel, so the target's sampler finds the schedule and dataset
    convert("--src", paths["mindspore"], "--dst", tmp_path / "out.pdparams")
    carried = load_pdparams(tmp_path / "out.pdparams")
    assert carried["step"] == 42 and carried["config"]["dataset"] == "digits" and carried["optimizer"] is None
    # a bare state dict has one set of weights
    convert("--src", assets["root"] / "ema.safetensors", "--dst", tmp_path / "m.ckpt", "--weights", "model")


@needs_torch
def test_converted_pth_loads_in_torch_sampler_without_flags(assets):
    import torch

    from backends.torch.sample import load_model

    for weights in ("ema", "model"):
        net, spec, _ = load_model(str(assets["files"]["torch", "fp32"]), weights, "cpu")
        assert spec == SPEC
        assert same_bits(net.canonical_state(), assets["ema"])
    bf16 = {k: bf16_bits_to_float32(float32_to_bf16_bits(v)) for k, v in assets["ema"].items()}
    net, _, _ = load_model(str(assets["files"]["torch", "bf16"]), "ema", "cpu")
    assert same_bits(net.canonical_state(), bf16)
    net, _, _ = load_model(str(assets["files"]["safetensors", "bf16"]), "ema", "cpu")
    assert same_bits(net.canonical_state(), bf16)


# ---- dtypes -------------------------------------------------------------------------------------

def test_bf16_rounding_matches_torch_and_survives_every_format(assets, tmp_path):
    values = np.array([1.0, 1.00390625, 1.01171875, -3.1415927, 1e-40, 3.4e38, np.inf, -np.inf, np.nan],
                      dtype=np.float32)
    bits = float32_to_bf16_bits(values)
    if HAS["torch"]:
        import torch

        ref = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(bits[:-1], ref[:-1]) and np.isnan(bf16_bits_to_float32(bits)[-1])
    expected = {k: bf16_bits_to_float32(float32_to_bf16_bits(v)) for k, v in assets["ema"].items()}
    stored_as = {"torch": "bfloat16", "paddle": "bfloat16", "mindspore": "bfloat16", "safetensors": "bfloat16"}
    for (fmt, dtype), path in assets["files"].items():
        if dtype != "bf16":
            continue
        contents = read_contents(path)
        assert {v.dtype for s in contents.sets.values() for v in s.values()} == {stored_as[fmt]}
        state, _ = read_checkpoint(path)
        assert same_bits(state, expected), fmt
    raw = read_safetensors(assets["files"]["safetensors", "bf16"])[0]
    assert raw["pos_embed"].array.dtype == np.uint16
    assert load_pdparams(assets["files"]["paddle", "bf16"])["ema"]["pos_embed"].dtype == np.uint16
    assert read_ms_checkpoint(assets["files"]["mindspore", "bf16"])["pos_embed"].dtype == "bfloat16"
    # fp16 in every format, and back to fp32 from bf16 is exact
    for fmt, suffix in SUFFIXES.items():
        if fmt == "torch" and not HAS["torch"]:
            continue
        out = tmp_path / f"h.{suffix}"
        convert("--src", assets["root"] / "ema.safetensors", "--dst", out, "--dtype", "fp16")
        state, _ = read_checkpoint(out)
        assert same_bits(state, {k: v.astype(np.float16).astype(np.float32) for k, v in assets["ema"].items()})
        convert("--src", assets["files"][fmt, "bf16"], "--dst", tmp_path / f"w_{fmt}.safetensors")
        assert same_bits(load_canonical(tmp_path / f"w_{fmt}.safetensors")[0], expected)


# ---- the other frameworks read the converted files; same forward output ----------------------

PADDLE_CHECK = """
import json
import numpy as np
import paddle
from backends.paddle.models import DiR
from common.formats import read_checkpoint
from common.param_mapping import to_framework
files, inputs, root = json.loads({args!r})
out = {{}}
data = np.load(inputs)
state, spec = read_checkpoint(files["fp32"])
net = DiR(spec)
net.load_canonical(state)
net.eval()
x, t, y = (paddle.to_tensor(data[k]) for k in "xty")
a = net(x, t, y).numpy()
# what paddle-native code does: paddle.load, then set_state_dict of the 'ema' weights
native = paddle.load(files["fp32"], return_numpy=True)
net2 = DiR(spec)
net2.set_state_dict(native["ema"])
net2.eval()
b = net2(x, t, y).numpy()
ref = data["torch_out"] if "torch_out" in data.files else a
out["rel_err"] = float(np.linalg.norm(a - ref) / np.linalg.norm(ref))
out["native_rel_err"] = float(np.linalg.norm(b - ref) / np.linalg.norm(ref))
expected = to_framework("paddle", state, spec)
loaded = paddle.load(files["fp32"])
out["fp32_equal"] = all(np.array_equal(loaded["ema"][k].numpy(), v) for k, v in expected.items())
bf = paddle.load(files["bf16"])
out["bf16_dtype"] = str(bf["ema"]["pos_embed"].dtype)
bf_state, _ = read_checkpoint(files["bf16"])
bf_expected = to_framework("paddle", bf_state, spec)
out["bf16_equal"] = all(np.array_equal(bf["ema"][k].astype("float32").numpy(), v) for k, v in bf_expected.items())
# the Paddle sampler's own loader, no flags
from backends.paddle.sample import load_model
for dtype in ("fp32", "bf16"):
    sampled, sampled_spec, _ = load_model(files[dtype], "ema", "cpu")
    want = state if dtype == "fp32" else bf_state
    got = sampled.canonical_state()
    out["sample_" + dtype] = sampled_spec == spec and all(np.array_equal(got[k], v) for k, v in want.items())
# a training checkpoint written by backends/paddle/train.py, converted later in the test
try:
    from backends.paddle.train import TrainAdapter
    from common.recipe import recipe_from_config
    config = {{"device": "cpu", "seed": 0, "lr": 1.0, "adam_beta2": 0.999, "weight_decay": 0.0}}
    recipe = recipe_from_config({{"objective": "ddpm"}})
    backend = TrainAdapter()
    backend.setup(config)
    backend.build(spec, recipe, config)
    backend.model.load_canonical(state)
    backend.ema.load_canonical(state)
    backend.save_checkpoint(root + "/paddle_train.pdparams", 7, {{"config": config, "spec": spec.to_dict(),
                            "recipe": recipe.to_dict(), "rng": {{"kind": "per-step", "seed": 0, "world_size": 1}}}})
    out["train_ckpt"] = True
except ImportError:
    out["train_ckpt"] = False
print(json.dumps(out))
"""


@pytest.mark.skipif(not HAS["paddle"], reason="PaddlePaddle is not installed")
def test_paddle_reads_converted_files_and_matches_torch(assets, tmp_path):
    if not (REPO_ROOT / "backends" / "paddle" / "models.py").exists():
        pytest.skip("backends/paddle/models.py does not exist yet")
    files = {d: str(assets["files"]["paddle", d]) for d in ("fp32", "bf16")}
    # converted from the PyTorch file (not from the canonical one), as the issue asks
    if HAS["torch"]:
        files["fp32"] = str(tmp_path / "from_torch.pdparams")
        convert("--src", assets["files"]["torch", "fp32"], "--dst", files["fp32"])
    code = PADDLE_CHECK.format(args=json.dumps([files, str(assets["inputs"]), str(tmp_path)]))
    result = run_framework(code)
    assert result["fp32_equal"] and result["bf16_equal"] and result["bf16_dtype"] == "paddle.bfloat16"
    assert result["sample_fp32"], "backends/paddle/sample.py does not load a converted .pdparams"
    if HAS["torch"]:
        assert result["rel_err"] <= PARITY_RTOL and result["native_rel_err"] <= PARITY_RTOL, result
    if result["train_ckpt"]:  # a real Paddle training checkpoint converts (no Paddle needed to read it)
        convert("--src", tmp_path / "paddle_train.pdparams", "--dst", tmp_path / "pt.safetensors", "--weights", "model")
        assert same_bits(load_canonical(tmp_path / "pt.safetensors")[0], assets["ema"])
        assert read_contents(tmp_path / "paddle_train.pdparams").step == 7
    assert result["sample_bf16"], "backends/paddle/sample.py misreads a bf16 .pdparams"


MINDSPORE_CHECK = """
import json, os
import numpy as np
import mindspore as ms
from common.formats import checkpoint_file_descriptor, read_checkpoint
from common.param_mapping import to_framework
files, inputs, root = json.loads({args!r})
out = {{}}
state, spec = read_checkpoint(files["fp32"])
loaded = ms.load_checkpoint(files["fp32"])
expected = to_framework("mindspore", state, spec)
out["fp32_equal"] = all(np.array_equal(loaded[k].asnumpy(), v) and np.array_equal(loaded["ema." + k].asnumpy(), v)
                        for k, v in expected.items())
out["spec"] = loaded["spec"]
out["step"] = int(loaded["step"].asnumpy())
bf = ms.load_checkpoint(files["bf16"])
out["bf16_dtype"] = str(bf["pos_embed"].dtype)
bf_state, _ = read_checkpoint(files["bf16"])
bf_expected = to_framework("mindspore", bf_state, spec)
out["bf16_equal"] = all(np.array_equal(bf[k].astype(ms.float32).asnumpy(), v) for k, v in bf_expected.items())
split = ms.load_checkpoint(files["split"])
out["split_equal"] = all(np.array_equal(split[k].asnumpy(), v) for k, v in expected.items())
from mindspore.train import checkpoint_pb2
from google.protobuf import descriptor_pb2
theirs = descriptor_pb2.FileDescriptorProto()
checkpoint_pb2.DESCRIPTOR.CopyToProto(theirs)
mine = checkpoint_file_descriptor()
mine.name = theirs.name
out["descriptor_equal"] = mine == theirs
# a file mindspore.save_checkpoint writes, with append_dict strings and ints
params = [{{"name": k, "data": ms.Tensor(v)}} for k, v in expected.items()]
params += [{{"name": "ema." + k, "data": ms.Tensor(v)}} for k, v in expected.items()]
params.append({{"name": "optimizer.moment1.pos_embed", "data": ms.Tensor(np.zeros(3, np.float32))}})
ms.save_checkpoint(params, root + "/native.ckpt", append_dict={{"spec": spec.to_json(), "step": 9}})
# backends/mindspore/train.py: its reader takes the converted file; a checkpoint it writes converts later
try:
    from backends.mindspore.train import TrainAdapter
    from common.recipe import recipe_from_config
    from common.training import check_train_checkpoint
    adapter = TrainAdapter()
    converted = adapter.read_checkpoint(files["fp32"])
    out["train_reader_ok"] = (check_train_checkpoint(converted, files["fp32"]) == spec
                              and all(np.array_equal(converted["ema"][k], v) for k, v in expected.items()))
    config = {{"device": "cpu", "mindspore_mode": "pynative", "precision": "fp32", "seed": 0, "lr": 1e-4,
               "adam_beta2": 0.999, "weight_decay": 0.0, "grad_accum_steps": 1, "grad_clip": 0.0}}
    recipe = recipe_from_config({{"objective": "ddpm"}})
    adapter.setup(config)
    adapter.build(spec, recipe, config)
    adapter.model.load_canonical(np.load(inputs.replace("inputs.npz", "model.npz")))
    adapter.ema.load_canonical(state)
    adapter.save_checkpoint(root + "/ms_train.ckpt", 5, {{"config": {{"seed": 0, "lr": 1e-4}}, "spec": spec.to_dict(),
                            "recipe": recipe.to_dict(), "rng": {{"kind": "per-step", "seed": 0, "world_size": 1}}}})
    out["train_ckpt"] = True
except ImportError as err:
    out["train_ckpt"] = out["train_reader_ok"] = "missing: " + str(err)
# the MindSpore sampler's own loader, no flags
try:
    from backends.mindspore.sample import load_model
    for dtype, want in (("fp32", state), ("bf16", bf_state)):
        try:
            sampled, sampled_spec, _ = load_model(files[dtype], "ema")
            got = sampled.canonical_state()
            out["sample_" + dtype] = sampled_spec == spec and all(np.array_equal(got[k], v) for k, v in want.items())
        except Exception as err:  # noqa: BLE001 - reported, judged by the test
            out["sample_" + dtype] = f"{{type(err).__name__}}: {{err}}"
except ImportError as err:
    out["sample_fp32"] = out["sample_bf16"] = "missing: " + str(err)
out["parity"] = None
if os.path.exists("backends/mindspore/models.py"):
    from backends.mindspore.models import DiR
    data = np.load(inputs)
    native_net = DiR(spec)  # MindSpore's own loader takes the converted file as is
    out["not_loaded"] = ms.load_param_into_net(native_net, ms.load_checkpoint(files["fp32"]), strict_load=True)[0]
    out["native_equal"] = all(np.array_equal(native_net.canonical_state()[k], v) for k, v in state.items())
    net = DiR(spec)
    net.load_canonical(state)
    net.set_train(False)
    a = net(*(ms.Tensor(data[k]) for k in "xty")).asnumpy()
    if "torch_out" in data.files:
        ref = data["torch_out"]
        out["parity"] = float(np.linalg.norm(a - ref) / np.linalg.norm(ref))
print(json.dumps(out))
"""


@pytest.mark.skipif(not HAS["mindspore"], reason="MindSpore is not installed")
def test_mindspore_reads_converted_files_and_matches_torch(assets, tmp_path, monkeypatch):
    import common.formats as formats

    files = {d: str(assets["files"]["mindspore", d]) for d in ("fp32", "bf16")}
    if HAS["torch"]:
        files["fp32"] = str(tmp_path / "from_torch.ckpt")
        convert("--src", assets["files"]["torch", "fp32"], "--dst", files["fp32"])
    # big tensors are split along axis 0 as mindspore.save_checkpoint does (threshold lowered here)
    monkeypatch.setattr(formats, "MS_SLICE_BYTES", 4096)
    files["split"] = str(tmp_path / "split.ckpt")
    convert("--src", assets["root"] / "ema.safetensors", "--dst", files["split"])
    monkeypatch.undo()
    assert same_bits(read_checkpoint(files["split"])[0], assets["ema"])
    result = run_framework(MINDSPORE_CHECK.format(args=json.dumps([files, str(assets["inputs"]), str(tmp_path)])))
    assert result["descriptor_equal"], "common/formats.py's Checkpoint descriptor differs from MindSpore's"
    assert result["fp32_equal"] and result["split_equal"] and result["bf16_equal"], result
    assert result["bf16_dtype"] == "BFloat16" and json.loads(result["spec"]) == SPEC.to_dict() and result["step"] == 0
    if result["train_ckpt"] is True:  # backends/mindspore/train.py reads the converted file, and vice versa
        assert result["train_reader_ok"], result
        for weights in ("model", "ema"):
            convert("--src", tmp_path / "ms_train.ckpt", "--dst", tmp_path / f"ms_{weights}.safetensors",
                    "--weights", weights)
            assert same_bits(load_canonical(tmp_path / f"ms_{weights}.safetensors")[0], assets[weights])
        train = read_contents(tmp_path / "ms_train.ckpt")
        assert train.step == 5 and train.config == {"seed": 0, "lr": 1e-4} and "optimizer" in train.other
    if not str(result["sample_fp32"]).startswith("missing"):
        assert result["sample_fp32"] is True and result["sample_bf16"] is True, \
            f"backends/mindspore/sample.py does not load a converted .ckpt: {result}"
    native = read_contents(tmp_path / "native.ckpt")
    assert native.layout == "training" and native.step == 9 and native.spec == SPEC
    assert same_bits(read_checkpoint(tmp_path / "native.ckpt")[0], assets["ema"])
    if result["parity"] is None:
        pytest.skip("backends/mindspore/models.py does not exist yet: MindSpore forward parity not checked "
                    "(file-level checks above passed)")
    assert result["not_loaded"] == [] and result["native_equal"], result
    if HAS["torch"]:
        assert result["parity"] <= PARITY_RTOL, result


# ---- untrusted input ----------------------------------------------------------------------------

class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pdparams_is_refused_and_its_code_does_not_run(tmp_path, capsys):
    marker = tmp_path / "pwned"
    payloads = [(f"os_system_p{p}", pickle.dumps({"model": {"w": _RunsCode(marker)}}, protocol=p)) for p in (2, 4)]
    payloads.append(("eval", b"cbuiltins\neval\n(V__import__('os').system('touch " + str(marker).encode()
                     + b"')\ntR."))  # builtins.eval in a hand-written protocol-0 pickle
    payloads.append(("object_array", pickle.dumps({"w": np.array([print], dtype=object)}, protocol=4)))
    payloads.append(("ndarray_call", b"cnumpy\nndarray\n(I3\ntR."))  # numpy.ndarray called directly
    # BUILD on a whitelisted function, to rewrite its defaults for every later file
    payloads.append(("build_on_global", b"c_codecs\nencode\n(dV__defaults__\n(Vlatin1\ntsb."))
    for name, payload in payloads:
        path = tmp_path / f"{name}.pdparams"
        path.write_bytes(payload)
        assert main(["--src", str(path), "--dst", str(tmp_path / "out.safetensors"), "--spec", "DiR-Tiny/2"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("convert_ckpt: error:") and "refused" in err and "Traceback" not in err, err
        with pytest.raises(UnsafeCheckpointError):
            load_pdparams(path)
    assert not marker.exists(), "a crafted .pdparams ran code"
    assert not (tmp_path / "out.safetensors").exists()
    assert main(["inspect", str(tmp_path / "os_system_p4.pdparams")]) == 2
    assert "'posix.system'" in capsys.readouterr().err


@needs_torch
def test_crafted_pth_is_refused_by_weights_only(tmp_path, capsys):
    import torch

    marker = tmp_path / "pwned"
    torch.save({"model": {"w": _RunsCode(marker)}}, tmp_path / "evil.pth")
    assert main(["--src", str(tmp_path / "evil.pth"), "--dst", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "weights_only=True" in err and "Traceback" not in err
    assert not marker.exists()


def test_truncated_and_corrupt_files_give_clear_errors(assets, tmp_path, capsys):
    for (fmt, dtype), path in assets["files"].items():
        if dtype != "fp32":
            continue
        data = path.read_bytes()
        bad = {"truncated": data[: len(data) // 2], "empty": b"",
               "corrupt": data[:8] + bytes(255 - b for b in data[8:72]) + data[72:],
               "garbage": b"\x00\xff not a checkpoint \x13" * 7}
        for kind, content in bad.items():
            target = tmp_path / f"{kind}.{SUFFIXES[fmt]}"
            target.write_bytes(content)
            dst = tmp_path / f"out_{fmt}_{kind}.safetensors"
            code = main(["--src", str(target), "--dst", str(dst)])
            err = capsys.readouterr().err
            assert code == 2, (fmt, kind)
            assert err.startswith("convert_ckpt: error:") and str(target) in err, (fmt, kind, err)
            assert "error: unexpected " not in err, (fmt, kind, err)  # a handled error, not a bug
            assert not dst.exists()
    # the converted .ckpt carries a CRC (like save_checkpoint(crc_check=True)): a flipped weight byte is caught
    data = bytearray(assets["files"]["mindspore", "fp32"].read_bytes())
    data[len(data) // 2] ^= 0x10
    (tmp_path / "flipped.ckpt").write_bytes(bytes(data))
    assert main(["inspect", str(tmp_path / "flipped.ckpt")]) == 2
    assert "CRC check failed" in capsys.readouterr().err
    # the real command line: exit code 2, one clear line, no traceback
    proc = subprocess.run([sys.executable, "tools/convert_ckpt.py", "--src", str(tmp_path / "truncated.ckpt"),
                           "--dst", str(tmp_path / "x.pth")], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("convert_ckpt: error:") and "truncated" in proc.stderr, proc.stderr


def test_wrong_missing_and_unexpected_tensors_are_listed_and_nothing_is_written(assets, tmp_path, capsys):
    state = to_framework("paddle", assets["ema"], SPEC)
    state["blocks.0.att.key.weight"] = np.zeros((64, 63), np.float32)
    del state["final_layer.linear.bias"]
    state["blocks.9.extra"] = np.zeros(2, np.float32)
    src = tmp_path / "bad.pdparams"
    save_pdparams(src, {**state, "spec": SPEC.to_dict()})
    for suffix in SUFFIXES.values():
        dst = tmp_path / f"out.{suffix}"
        assert main(["--src", str(src), "--dst", str(dst)]) == 2
        err = capsys.readouterr().err
        assert "wrong shape: blocks.0.att.key.weight is [64, 63], expected [64, 64]" in err
        assert "missing: final_layer.linear.bias" in err and "unexpected: blocks.9.extra" in err
        assert not dst.exists() and not list(tmp_path.glob(".out.*"))  # no temp file left either


def test_spec_from_argument_or_sidecar_and_bare_output(assets, tmp_path, capsys):
    bare = tmp_path / "bare.pdparams"
    save_pdparams(bare, to_framework("paddle", assets["ema"], SPEC))
    assert main(["--src", str(bare), "--dst", str(tmp_path / "x.safetensors")]) == 2
    assert "--spec" in capsys.readouterr().err
    convert("--src", bare, "--dst", tmp_path / "x.safetensors", "--spec", SPEC.to_json())
    assert same_bits(load_canonical(tmp_path / "x.safetensors")[0], assets["ema"])
    # --bare writes the state dict and FILE.spec.json; reading picks the sidecar up
    for suffix in ("pdparams", "ckpt") + (("pth",) if HAS["torch"] else ()):
        out = tmp_path / f"bare_out.{suffix}"
        convert("--src", assets["root"] / "ema.safetensors", "--dst", out, "--bare")
        assert json.loads(sidecar_path(out).read_text()) == SPEC.to_dict()
        contents = read_contents(out)
        assert contents.layout == "bare" and contents.spec_origin.startswith("sidecar")
        assert same_bits(read_checkpoint(out)[0], assets["ema"])
    # a --spec that contradicts the file is an error, not a silent override
    assert main(["--src", str(assets["root"] / "ema.safetensors"), "--dst", str(tmp_path / "y.ckpt"),
                 "--spec", "DiR-S/2"]) == 2
    assert "differs" in capsys.readouterr().err


def test_formats_without_their_framework(assets, tmp_path):
    """.safetensors, .pdparams and .ckpt convert with no framework importable; .pth says it needs torch."""
    code = f"""
    import sys
    for name in ("torch", "paddle", "mindspore", "safetensors"):
        sys.modules[name] = None  # any import of them fails: numpy (+ protobuf for .ckpt) is enough
    from tools.convert_ckpt import main
    src = {str(assets["root"] / "ema.safetensors")!r}
    root = {str(tmp_path)!r}
    assert main(["--src", src, "--dst", root + "/a.pdparams"]) == 0
    assert main(["--src", root + "/a.pdparams", "--dst", root + "/a.ckpt", "--dtype", "bf16"]) == 0
    assert main(["--src", root + "/a.ckpt", "--dst", root + "/a.safetensors"]) == 0
    assert main(["--src", src, "--dst", root + "/a.pth"]) == 2
    for name in [m for m in sys.modules if m == "google" or m.startswith("google.")]:
        sys.modules[name] = None  # and without protobuf, .ckpt says what it needs
    import common.formats
    common.formats._CKPT_CLASS = None
    assert main(["--src", root + "/a.ckpt", "--dst", root + "/b.safetensors"]) == 2
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert proc.returncode == 0, proc.stderr
    assert "needs PyTorch (pip install torch)" in proc.stderr
    assert "read and written with the 'protobuf' package (pip install protobuf)" in proc.stderr, proc.stderr
    expected = {k: bf16_bits_to_float32(float32_to_bf16_bits(v)) for k, v in assets["ema"].items()}
    assert same_bits(load_canonical(tmp_path / "a.safetensors")[0], expected)
    assert not (tmp_path / "a.pth").exists()


# ---- inspect ------------------------------------------------------------------------------------

def test_inspect_lists_names_shapes_dtypes_count_and_spec(assets, tmp_path, capsys):
    count = parameter_count(SPEC)
    names = {"torch": "blocks.0.att.ln_x.weight", "paddle": "blocks.0.att.ln_x.weight",
             "mindspore": "blocks.0.att.ln_x.gamma", "safetensors": "blocks.0.att.ln_x.weight"}
    shapes = {"paddle": "[64, 256]"}  # ffn.key.weight: Paddle keeps Linear weights [in, out]
    for (fmt, dtype), path in assets["files"].items():
        assert main(["inspect", str(path)]) == 0
        out = capsys.readouterr().out
        assert f"format:  {fmt}" in out and f"{count:,} parameters" in out and names[fmt] in out
        assert '"skip": true' in out and '"pos_embed": "learned"' in out
        assert "ok: matches the DiR parameter table" in out
        assert ("bfloat16" if dtype == "bf16" else "float32") in out
        key = "blocks.0.ffn.key.weight"
        line = next(line for line in out.splitlines() if line.strip().startswith(key + " "))
        assert shapes.get(fmt, "[256, 64]") in line, line
    paths = make_training_checkpoints(tmp_path, assets["model"], assets["ema"])
    for fmt, path in paths.items():
        assert main(["inspect", str(path), "--weights", "all", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["layout"] == "training" and report["step"] == 42 and set(report["sets"]) == {"model", "ema"}
        assert report["sets"]["ema"]["parameters"] == count and report["spec"] == SPEC.to_dict()
        assert any("optimizer" in key for key in report["other"]), report["other"]
    # a mismatching file still inspects, with the problems listed
    state = to_framework("mindspore", assets["ema"], SPEC)
    state["pos_embed"] = np.zeros((1, 2, 3), np.float32)
    write_ms_checkpoint(tmp_path / "bad.ckpt", {**{k: Stored.from_numpy(v) for k, v in state.items()},
                                                "spec": SPEC.to_json()})
    assert main(["inspect", str(tmp_path / "bad.ckpt")]) == 0
    assert "wrong shape: pos_embed is [1, 2, 3], expected [1, 16, 64]" in capsys.readouterr().out
