"""The shared loop's non-finite guard through the Paddle adapter: a poisoned step is dropped
(weights and AdamW moments untouched) and non-finite weights are found before a checkpoint."""
import numpy as np
import pytest

paddle = pytest.importorskip("paddle")

from backends.paddle.train import TrainAdapter, numpy_state, optimizer_state, train  # noqa: E402
from common.config import TRAIN_SCHEMA, parse_cli  # noqa: E402
from common.trainer import run_training  # noqa: E402
from tests.test_paddle_train import TINY  # noqa: E402

pytestmark = pytest.mark.paddle


def tiny_config(run_dir, *extra):
    config, _ = parse_cli([*TINY, "--run_dir", str(run_dir), "--sample_every", "-1", *extra], TRAIN_SCHEMA, "test")
    return config


class PoisonedAdapter(TrainAdapter):
    """Makes the gradients of the chosen (0-based) steps NaN, as a bad batch would."""

    def __init__(self, poison_steps):
        self.poison_steps, self.calls = set(poison_steps), 0

    def train_step(self, micro_batches, draws):
        values = super().train_step(micro_batches, draws)
        if self.calls in self.poison_steps:
            for param in self.model.parameters():
                param.grad.set_value(np.full(param.grad.shape, np.nan, dtype=np.float32))  # fill_ refuses NaN
            values["loss"], values["grad_norm"] = float("nan"), float("nan")
        self.calls += 1
        return values


def test_a_skipped_step_changes_nothing(tmp_path):
    reference = TrainAdapter()
    run_training(tiny_config(tmp_path / "two", "--max_steps", "2"), reference)
    poisoned = PoisonedAdapter({2})
    run_training(tiny_config(tmp_path / "three", "--max_steps", "3", "--on_nonfinite", "skip"), poisoned)
    assert poisoned.nonfinite_tensors() == []
    for name, value in numpy_state(reference.model).items():
        np.testing.assert_array_equal(numpy_state(poisoned.model)[name], value, err_msg=name)
    moments = optimizer_state(poisoned.optimizer, poisoned.model)["accumulators"]
    for name, value in optimizer_state(reference.optimizer, reference.model)["accumulators"].items():
        np.testing.assert_array_equal(moments[name], value, err_msg=name)


def test_nonfinite_weights_are_named_and_stop_the_run(tmp_path):
    result = train(tiny_config(tmp_path / "run", "--max_steps", "1"))
    backend = TrainAdapter()
    backend.model, backend.ema = result["model"], result["ema"]
    assert backend.nonfinite_tensors() == []
    weight = backend.ema.final_layer.linear.weight
    weight.set_value(np.full(weight.shape, np.inf, dtype=np.float32))
    assert backend.nonfinite_tensors() == ["ema.final_layer.linear.weight"]
    with pytest.raises(Exception, match=r"non-finite .*update was not applied"):
        run_training(tiny_config(tmp_path / "nan", "--max_steps", "3"), PoisonedAdapter({1}))
