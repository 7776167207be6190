"""How each framework names and lays out the canonical parameters.

The whole mapping, on purpose small:

| framework  | name                                            | layout                              |
|------------|-------------------------------------------------|-------------------------------------|
| torch      | canonical                                       | canonical                           |
| paddle     | canonical                                       | Linear weights transposed [in, out] |
| mindspore  | embedding ``.weight`` -> ``.embedding_table``;  | canonical                           |
|            | norm ``.weight``/``.bias`` -> ``.gamma``/``.beta`` |                                  |

Everything here is numpy, so converters need no framework installed.
"""
from __future__ import annotations

import numpy as np

from common.params import EMBEDDING, LINEAR_WEIGHT, NORM_BIAS, NORM_WEIGHT, parameter_table
from common.spec import DiRSpec

FRAMEWORKS = ("torch", "paddle", "mindspore")

_MINDSPORE_LEAF = {EMBEDDING: "embedding_table", NORM_WEIGHT: "gamma", NORM_BIAS: "beta"}


def framework_name(framework: str, name: str, kind: str) -> str:
    if framework == "mindspore" and kind in _MINDSPORE_LEAF:
        return name.rsplit(".", 1)[0] + "." + _MINDSPORE_LEAF[kind]
    return name


def _transposed(framework: str, kind: str) -> bool:
    return framework == "paddle" and kind == LINEAR_WEIGHT


def _check_framework(framework: str) -> None:
    if framework not in FRAMEWORKS:
        raise ValueError(f"unknown framework '{framework}'; allowed: {', '.join(FRAMEWORKS)}")


def to_framework(framework: str, state: dict[str, np.ndarray], spec: DiRSpec) -> dict[str, np.ndarray]:
    """Canonical numpy state -> the names and layouts ``framework``'s model uses."""
    _check_framework(framework)
    out = {}
    for info in parameter_table(spec):
        value = state[info.name]
        out[framework_name(framework, info.name, info.kind)] = (
            np.ascontiguousarray(value.T) if _transposed(framework, info.kind) else value
        )
    return out


def from_framework(framework: str, state: dict[str, np.ndarray], spec: DiRSpec,
                   source: str = "state") -> dict[str, np.ndarray]:
    """A framework's numpy state (names as its model has them) -> canonical.

    Raises ValueError listing every missing, unexpected or wrongly shaped tensor.
    """
    _check_framework(framework)
    out, problems, expected = {}, [], set()
    for info in parameter_table(spec):
        fw_name = framework_name(framework, info.name, info.kind)
        expected.add(fw_name)
        fw_shape = tuple(reversed(info.shape)) if _transposed(framework, info.kind) else info.shape
        if fw_name not in state:
            problems.append(f"missing: {fw_name} (expected shape {list(fw_shape)})")
            continue
        value = np.asarray(state[fw_name])
        if tuple(value.shape) != tuple(fw_shape):
            problems.append(f"wrong shape: {fw_name} is {list(value.shape)}, expected {list(fw_shape)}")
            continue
        out[info.name] = np.ascontiguousarray(value.T) if _transposed(framework, info.kind) else value
    problems += [f"unexpected: {name} (shape {list(np.shape(state[name]))})" for name in state if name not in expected]
    if problems:
        raise ValueError(f"{source} does not match the DiR parameter table ({framework} layout):\n  "
                         + "\n  ".join(problems))
    return out
