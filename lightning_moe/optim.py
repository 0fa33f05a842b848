"""Learning-rate schedules usable from YAML as ``model.lr_scheduler``."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosineLR(LambdaLR):
    """Linear warm-up from 0 to the base LR, then cosine decay to ``min_lr_ratio`` of it.

    Stepped once per optimizer step. With ``total_steps=None``, ``MoELanguageModel`` fills in
    the trainer's ``estimated_stepping_batches`` so YAML need not repeat ``max_steps``.

    Args:
        optimizer: the wrapped optimizer.
        warmup_steps: steps of linear warm-up, >= 0.
        total_steps: steps until the end of the decay, > warmup_steps, or None (see above).
        min_lr_ratio: final LR as a fraction of the base LR, in [0, 1].
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 100, total_steps: int | None = None,
                 min_lr_ratio: float = 0.1) -> None:
        if warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0, got {warmup_steps}.")
        if total_steps is not None and total_steps <= warmup_steps:
            raise ValueError(f"`total_steps` must be > warmup_steps={warmup_steps}, got {total_steps}.")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"`min_lr_ratio` must be in [0, 1], got {min_lr_ratio}.")
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.total_steps is None:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
