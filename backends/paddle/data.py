"""Paddle loaders around the numpy sources and the step sampler of ``common/data.py``.

The step sampler is also the distributed batch sampler: each rank takes its own
contiguous share of every global batch, so no ``paddle.io.DistributedBatchSampler``
is needed and batches depend only on (seed, step) on any number of processes.
"""
from __future__ import annotations

import numpy as np
from paddle.io import BatchSampler, DataLoader, Dataset

from common.data import StepSampler


class SourceDataset(Dataset):
    """A map-style dataset keyed by ``(index, flip)``; items are (x, label, skipped), the label a
    class id or a caption's token ids ([text_max_tokens] int64)."""

    def __init__(self, source):
        super().__init__()
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key):
        x, label, skipped = self.source[key]
        return np.ascontiguousarray(x, dtype=np.float32), np.asarray(label, dtype=np.int64), np.int64(skipped)


class _MicroBatches(BatchSampler):
    """The step sampler's micro-batches from ``start_step`` on, as a Paddle batch sampler."""

    def __init__(self, step_sampler: StepSampler, start_step: int):
        self.step_sampler, self.start_step = step_sampler, start_step

    def __iter__(self):
        return self.step_sampler.iter_from(self.start_step)

    def __len__(self) -> int:  # endless; Paddle only asks for a length in some code paths
        return 2**62


def build_loader(source, step_sampler: StepSampler, start_step: int, num_workers: int = 0) -> DataLoader:
    """Endless loader of (x [B, C, H, W] float32, y [B] (or caption ids [B, L]) int64, skipped [B] int64)
    micro-batches.

    Batches depend only on the step, so a resumed run reads what the uninterrupted one did.
    """
    return DataLoader(
        SourceDataset(source),
        batch_sampler=_MicroBatches(step_sampler, start_step),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        return_list=True,
    )
