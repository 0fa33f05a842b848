"""A DataLoader that resumes mid-epoch, and the per-epoch shuffle it relies on."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class EpochShuffleSampler(Sampler[int]):
    """A random permutation that depends only on ``(seed, epoch)``.

    Lightning calls ``set_epoch`` at the start of every epoch, so an interrupted run and an
    uninterrupted one see the same order, unlike a sampler that draws from the global RNG.
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A DataLoader with ``state_dict``/``load_state_dict``, which Lightning saves in checkpoints.

    The state is the sampler's epoch and the number of batches yielded in that epoch. Lightning
    does not prefetch from a loader with a length, so at checkpoint time that number equals the
    batches trained on. After a restore, the pass over the same epoch skips them and training
    continues where it stopped; a checkpoint taken at the end of an epoch skips nothing in the
    next one. Skipping reads the skipped batches (cheap for in-memory token blocks).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch: int | None = None
        self._yielded = 0
        self._resume: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        # A generator: this body runs at the first batch, after Lightning's set_epoch.
        epoch = getattr(self.sampler, "epoch", None)
        resume, self._resume = self._resume, None
        skip = 0
        if resume is not None and resume.get("epoch") == epoch and resume["batches_yielded"] < len(self):
            skip = resume["batches_yielded"]
        self._epoch, self._yielded = epoch, skip
        for batch in itertools.islice(super().__iter__(), skip, None):
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "batches_yielded": self._yielded}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = {"epoch": state_dict.get("epoch"), "batches_yielded": int(state_dict.get("batches_yielded", 0))}
