"""MindSpore Graph mode vs PyTorch: the tests and thresholds of ``test_mindspore_parity.py``, compiled.

A file of its own so pytest-xdist runs it beside the PyNative half (``--dist loadfile``).
"""
import pytest

pytest.importorskip("mindspore")
pytest.importorskip("torch")

from tests.test_mindspore_parity import (  # noqa: E402,F401  (pytest collects the imported tests and fixtures)
    case, report, test_adamw_steps, test_ddim_cfg, test_flow_loss_and_gradients, test_flow_samples_with_cfg,
    test_forward, test_loss_and_gradients,
)


@pytest.fixture(scope="module")
def execution_mode():
    return "graph"
