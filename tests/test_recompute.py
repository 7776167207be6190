"""`recompute: true` (gradient checkpointing per block) changes memory, never gradients: the
same loss and every gradient as without it, in all three backends (MindSpore in both modes),
on a skip model so the long skips cross checkpointed blocks."""
import sys
from pathlib import Path

import numpy as np
import pytest

from common.params import init_canonical
from common.spec import build_spec

SPEC = dict(hidden_size=64, depth=3, head_size=32, input_size=8, in_channels=3, num_classes=5, skip=True,
            mix_lora_rank=8, decay_lora_rank=8, token_shift="q_shift", scan_order="alternate")


def case(seed=0):
    """A spec, canonical weights with every tensor nudged off init, and inputs."""
    spec = build_spec("DiR-Tiny/2", **SPEC)
    rng = np.random.default_rng(seed)
    state = {name: value + 0.05 * rng.standard_normal(value.shape).astype(np.float32)
             for name, value in init_canonical(spec, seed).items()}
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    return spec, state, x, np.array([3, 700], np.int64), np.array([1, 4], np.int64)


def assert_same(plain: dict, checkpointed: dict, tol: float):
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        scale = max(float(np.abs(plain[name]).max()), 1e-12)
        assert float(np.abs(plain[name] - checkpointed[name]).max()) / scale <= tol, name
    assert any(float(np.abs(g).max()) > 0 for g in plain.values())


def test_config_key_defaults_off_and_is_typed():
    from common.config import TRAIN_SCHEMA, ConfigError, parse_cli

    assert parse_cli([], TRAIN_SCHEMA, "train")[0]["recompute"] is False
    assert parse_cli(["--recompute", "true"], TRAIN_SCHEMA, "train")[0]["recompute"] is True
    with pytest.raises(ConfigError, match="recompute"):
        parse_cli(["--recompute", "sometimes"], TRAIN_SCHEMA, "train")


def torch_gradients(recompute: bool) -> dict:
    import torch

    from backends.torch.models import DiR

    spec, state, x, t, y = case()
    model = DiR(spec).train()
    model.load_canonical(state)
    model.set_recompute(recompute)
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    loss = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).square().mean()
    loss.backward()
    assert len(calls) == (2 if recompute else 1)  # the checkpointed block really runs again
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
    return {"loss": np.array(float(loss.detach())), **grads}


def test_torch_gradients_equal_without_recompute():
    pytest.importorskip("torch")
    assert_same(torch_gradients(False), torch_gradients(True), 1e-6)


def paddle_gradients(recompute: bool) -> dict:
    import paddle

    from backends.paddle.models import DiR

    spec, state, x, t, y = case()
    model = DiR(spec)
    model.train()
    model.load_canonical(state)
    model.set_recompute(recompute)
    loss = model(paddle.to_tensor(x), paddle.to_tensor(t), paddle.to_tensor(y)).square().mean()
    loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": np.array(float(loss.detach())), **grads}


def test_paddle_gradients_equal_without_recompute():
    pytest.importorskip("paddle")
    assert_same(paddle_gradients(False), paddle_gradients(True), 1e-6)


def mindspore_gradients(mode: str, out: str) -> None:
    """Run in a child (the execution mode is per process): writes {recompute}/{name} arrays."""
    import mindspore as ms
    from mindspore import Tensor, nn

    from backends.mindspore.models import DiR, set_execution_mode

    set_execution_mode(mode, "cpu")
    spec, state, x, t, y = case()

    class Loss(nn.Cell):
        def __init__(self, model):
            super().__init__(auto_prefix=False)
            self.model = model
            self.grad_fn = ms.value_and_grad(self.loss_fn, None, model.trainable_params())

        def loss_fn(self, x, t, y):
            return (self.model(x, t, y) ** 2).mean()

        def construct(self, x, t, y):
            return self.grad_fn(x, t, y)

    arrays = {}
    for recompute in (False, True):
        model = DiR(spec)
        model.load_canonical(state)
        model.set_train(True)
        model.set_recompute(recompute)
        loss, grads = Loss(model)(Tensor(x), Tensor(t), Tensor(y))
        arrays[f"{recompute}/loss"] = loss.asnumpy()
        for param, grad in zip(model.trainable_params(), grads):
            arrays[f"{recompute}/{param.name}"] = grad.asnumpy()
    np.savez(out, **arrays)


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_mindspore_gradients_equal_without_recompute(mode, tmp_path):
    pytest.importorskip("mindspore")
    from tests.conftest import run_python

    out = tmp_path / "grads.npz"
    run_python(["-m", "tests.test_recompute", mode, str(out)], cwd=tmp_path)
    data = np.load(out)
    split = {flag: {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(f"{flag}/")}
             for flag in ("False", "True")}
    # MindSpore's recomputed model takes mixing.py's plain forms (DiR.set_recompute says why),
    # which differ from the fused ones by float rounding: 1.8e-6 of the largest time_decay gradient
    assert_same(split["False"], split["True"], 1e-5)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    mindspore_gradients(sys.argv[1], sys.argv[2])
