"""Conditions as numpy: what the null condition is, and how training drops conditions.

The model embeds a condition (``spec.condition``: class labels [N] int64, or captions
as token ids [N, L] int64, ``common/text.py``) and everything around it carries the condition opaque: the
objective passes it to the model untouched, guidance pairs it with
:func:`null_condition`, and the trainer replaces dropped ones (classifier-free
guidance training, drawn by ``common.objectives.step_draws``) with
:func:`drop_conditions` before they reach the backend.
"""
from __future__ import annotations

import numpy as np

from common.spec import DiRSpec


def null_condition(spec: DiRSpec, n: int) -> np.ndarray:
    """The unconditional input for ``n`` images: the null label (id ``num_classes``), or for
    captions the empty caption ``[EOS, PAD, ...]`` ([n, text_max_tokens] ids), which the text
    encoder maps to its learned null embedding."""
    if not spec.has_null_class:
        raise ValueError("this model has no null condition (trained with class_dropout_prob = 0); "
                         "classifier-free guidance is not available")
    if spec.condition == "text":
        from common.text import null_caption_ids

        return null_caption_ids(n, spec.text_max_tokens)
    return np.full(n, spec.num_classes, dtype=np.int64)


def drop_conditions(spec: DiRSpec, cond: np.ndarray, drop: np.ndarray) -> np.ndarray:
    """``cond`` with the entries where ``drop`` is True replaced by the null condition."""
    drop = np.asarray(drop, dtype=bool)
    if not drop.any():
        return np.asarray(cond)
    cond = np.asarray(cond)
    null = null_condition(spec, len(cond))
    if cond.ndim == 2 and null.shape[1] != cond.shape[1]:  # captions padded to another length
        from common.text import null_caption_ids

        null = null_caption_ids(len(cond), cond.shape[1])
    return np.where(drop.reshape(-1, *([1] * (cond.ndim - 1))), null, cond)
