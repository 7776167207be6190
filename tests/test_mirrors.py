"""The three backends mirror each other: same files, same public classes and functions, same signatures.

Read from the source (``ast``), so no framework is imported. A name or a signature that
exists in one backend and not in its twin fails here, unless it is listed in
``FRAMEWORK_ONLY`` with the reason the framework needs it; that list is the whole
catalogue of deliberate differences, in the spirit of diffusers' ``check_copies``.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "backends"
BACKENDS = ("torch", "paddle", "mindspore")

# (backend, file, public name) that only that backend defines, and why. A name may be "Class.method".
FRAMEWORK_ONLY = {
    ("paddle", "train.py", "frozen_copy"): "Paddle layers cannot be deep-copied with their gradients off; the EMA is rebuilt",
    ("paddle", "train.py", "numpy_state"): "Paddle's checkpoints hold numpy arrays (read back by a restricted unpickler)",
    ("paddle", "train.py", "optimizer_state"): "Paddle keys AdamW's moments by unique layer names; stored by canonical name",
    ("paddle", "train.py", "load_optimizer_state"): "the inverse of optimizer_state",
    ("paddle", "train.py", "read_checkpoint"): "the .pdparams reader the sampler and resume share",
    ("paddle", "sample.py", "to_static"): "paddle_to_static: the network through paddle.jit.to_static",
    ("mindspore", "models.py", "set_execution_mode"): "MindSpore's PyNative / Graph mode is global context",
    ("mindspore", "models.py", "LayerNorm"): "nn.LayerNorm adds gamma/beta and mint's is Ascend-only: written out",
    ("mindspore", "models.py", "DiR.named_parameters"): "Cells have parameters_and_names; the dict torch's loader uses",
    ("mindspore", "models.py", "DiR.set_wkv_branch"): "Graph mode cannot branch on data: the WKV6 path is chosen per mode",
    ("mindspore", "data.py", "SourceDataset.collate"): "a plain iterator stands in for a DataLoader (no collate_fn)",
    ("mindspore", "train.py", "ForwardBackward"): "value_and_grad lives in a Cell so Graph mode compiles it",
    ("mindspore", "train.py", "ReduceGradients"): "cross-rank mean and global norm as a compiled Cell, before the update",
    ("mindspore", "train.py", "ApplyGradients"): "clipping and AdamW in one compiled Cell",
    ("mindspore", "train.py", "EMAUpdate"): "the EMA update as one compiled Cell",
    ("mindspore", "train.py", "AdamW"): "torch/paddle AdamW are fused kernels; MindSpore's experimental one is ~10 ops a "
                                       "tensor on CPU, so its fused ops.Adam is wrapped as PyTorch's AdamW",
    ("mindspore", "train.py", "AdamW.__init__"): "see AdamW",
    ("mindspore", "train.py", "AdamW.__call__"): "see AdamW",
    ("mindspore", "train.py", "build_ema"): "a renamed (ema.) copy of the Cell's parameters",
    ("mindspore", "train.py", "set_learning_rate"): "in-place assign: a compiled step holds the lr tensor",
    ("mindspore", "train.py", "read_checkpoint"): "the .ckpt reader the sampler and resume share",
    ("torch", "models.py", "DiR.set_wkv_kernel"): "wkv_kernel: fla, flash-linear-attention's Triton kernel, is PyTorch on CUDA only",
    ("torch", "wkv.py", "wkv6_fla"): "flash-linear-attention's chunk_rwkv6 (Triton, CUDA) exists for PyTorch only",
    ("torch", "wkv.py", "fla_installed"): "see wkv6_fla",
    ("torch", "train.py", "unwrap"): "DistributedDataParallel wraps the module",
    ("paddle", "train.py", "unwrap"): "paddle.DataParallel wraps the layer",
    ("torch", "train.py", "TrainAdapter.distribute"): "DDP wraps the model after a resume loaded it",
    ("paddle", "train.py", "TrainAdapter.distribute"): "paddle.DataParallel wraps the model after a resume loaded it",
    ("torch", "train.py", "is_collective_failure"): "gloo / NCCL errors of torch.distributed become a one-line stop; "
                                                   "Paddle's and MindSpore's launchers stop the other workers themselves",
    ("torch", "train.py", "TrainAdapter.collectives"): "see is_collective_failure",
    ("mindspore", "wkv.py", "default_branch"): "Graph mode cannot branch on data: the WKV6 path is chosen per mode",
    ("mindspore", "vae.py", "VAEError"): "raised where mindone's Ascend-only VAE cannot run",
}

# Parameters that exist in only some frameworks: MindSpore places tensors by global context, so its
# functions take no ``device``; the signatures are compared without it.
PLACEMENT_PARAMETERS = {"device"}

# (file, name) whose signatures differ by framework idiom, and why.
SIGNATURE_DIFFERS = {
    ("objectives.py", "generate"): "MindSpore refuses bf16 in setup, so its generate takes no precision",
    ("models.py", "TimestepEmbedder.timestep_embedding"): "MindSpore precomputes the frequencies in float64 on the host",
    ("wkv.py", "wkv6"): "MindSpore takes the WKV6 branch (Graph mode cannot branch on data)",
    ("train.py", "train_step"): "MindSpore's step is compiled Cells (ForwardBackward, ReduceGradients), not a module",
    ("train.py", "update_ema"): "MindSpore updates the EMA through its compiled EMAUpdate Cell",
    ("sample.py", "pick_device"): "MindSpore sets the execution mode together with the device target",
}


def public_api(path: Path) -> dict[str, str]:
    """name -> signature text for top-level functions and classes (with their public methods)."""
    tree = ast.parse(path.read_text())
    api = {}

    def signature(node) -> str:
        args = node.args
        names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs if a.arg not in PLACEMENT_PARAMETERS]
        if args.vararg:
            names.append("*" + args.vararg.arg)
        if args.kwarg:
            names.append("**" + args.kwarg.arg)
        return "(" + ", ".join(names) + ")"

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            api[node.name] = signature(node)
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            api[node.name] = "class"
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and (not item.name.startswith("_") or item.name == "__init__"):
                    name = item.name
                    if name in ("forward", "construct"):  # each framework's name for the call
                        name = "__call__"
                    api[f"{node.name}.{name}"] = signature(item)
    return api


def mirrored_files() -> list[str]:
    return sorted({p.relative_to(ROOT / fw).as_posix() for fw in BACKENDS for p in (ROOT / fw).glob("*.py")})


def test_every_backend_has_every_file():
    missing = [f"backends/{fw}/{rel}" for rel in mirrored_files() for fw in BACKENDS if not (ROOT / fw / rel).is_file()]
    assert missing == []


@pytest.mark.parametrize("rel", mirrored_files())
def test_public_names_and_signatures_match(rel):
    apis = {fw: public_api(ROOT / fw / rel) for fw in BACKENDS if (ROOT / fw / rel).is_file()}
    problems = []
    names = set().union(*apis.values())
    for name in sorted(names):
        owners = [fw for fw in BACKENDS if name in apis[fw]]
        scopes = {name, name.split(".")[0]}  # a class's allowance covers its methods
        allowed = {fw for fw in BACKENDS for scope in scopes if (fw, rel, scope) in FRAMEWORK_ONLY}
        if allowed and set(owners) <= allowed:
            continue
        if len(owners) != len(apis):
            problems.append(f"{name}: defined in {owners} only")
            continue
        signatures = {fw: apis[fw][name] for fw in owners}
        if len(set(signatures.values())) > 1 and (rel, name) not in SIGNATURE_DIFFERS:
            problems.append(f"{name}: signatures differ {signatures}")
    assert problems == [], f"backends/*/{rel} drift:\n  " + "\n  ".join(problems)


def test_allow_lists_have_no_stale_entries():
    stale = [(fw, rel, name) for fw, rel, name in FRAMEWORK_ONLY
             if not (ROOT / fw / rel).is_file() or name not in public_api(ROOT / fw / rel)]
    for rel, name in SIGNATURE_DIFFERS:
        signatures = {public_api(ROOT / fw / rel).get(name) for fw in BACKENDS}
        if len(signatures) < 2 or None in signatures:
            stale.append((rel, name))
    assert stale == []
