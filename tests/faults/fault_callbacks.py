"""Callbacks the fault-tolerance tests add to a real ``lightning-moe fit`` process (imported through
``PYTHONPATH``): a per-step loss log the test reads while the run goes on."""

from __future__ import annotations

import json
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class StepLog(Callback):
    """Append ``{"step": global_step, "loss": training loss}`` per step to ``path`` (rank 0), flushed at
    once, then sleep ``sleep`` seconds so that a test can send a signal between two steps."""

    def __init__(self, path: str, sleep: float = 0.0) -> None:
        self.path = path
        self.sleep = sleep

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.is_global_zero:
            with open(self.path, "a") as file:
                file.write(json.dumps({"step": trainer.global_step, "loss": float(outputs["loss"])}) + "\n")
        time.sleep(self.sleep)
