"""MindSpore-side loader around the numpy sources and the step sampler of ``common/data.py``.

Mirrors ``backends/torch/data.py``. Batches stay numpy until the train step turns them
into ``Tensor`` s: the sources are numpy already and the micro-batches depend only on
the step, so a plain iterator (with an optional thread pool reading ahead) is all the
loader needs; ``mindspore.dataset`` would add process start-up and its own shuffling.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np

from common.data import StepSampler


class SourceDataset:
    """A map-style dataset keyed by ``(index, flip)``; items are (x, label, skipped), the label a
    class id or a caption's token ids ([text_max_tokens] int64)."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key):
        return self.source[key]

    def collate(self, keys) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        items = [self[key] for key in keys]
        x = np.stack([item[0] for item in items]).astype(np.float32)
        y = np.asarray([item[1] for item in items], dtype=np.int64)
        skipped = np.asarray([item[2] for item in items], dtype=np.int64)
        return x, y, skipped


def build_loader(source, step_sampler: StepSampler, start_step: int, num_workers: int = 0) -> Iterator:
    """Endless iterator of (x [B, C, H, W] float32, y [B] (or caption ids [B, L]) int64, skipped [B] int64)
    numpy micro-batches.

    Batches depend only on the step, so a resumed run reads what the uninterrupted one did.
    ``num_workers`` > 0 reads that many micro-batches ahead in threads.
    """
    dataset = SourceDataset(source)
    keys = step_sampler.iter_from(start_step)
    if num_workers <= 0:
        return (dataset.collate(batch) for batch in keys)
    return _prefetched(dataset, keys, num_workers)


def _prefetched(dataset: SourceDataset, keys: Iterator, num_workers: int) -> Iterator:
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        pending = [pool.submit(dataset.collate, next(keys)) for _ in range(num_workers)]
        while True:
            yield pending.pop(0).result()
            pending.append(pool.submit(dataset.collate, next(keys)))
