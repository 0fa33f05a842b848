"""Preemption, resumption and the non-finite guard in a plain Lightning script.

    python examples/fault_tolerance.py [RUN_DIR]      # default: runs/fault_tolerance

Trains a small MoE language model three times on the same byte tokens of CPython's pydoc topics:

1. 12 steps, never interrupted;
2. the same run, sent a real SIGTERM (by itself, at step 5, as a cluster scheduler would): ``Preemption``
   finishes the step, ``StepCheckpoint`` saves it atomically, and the run stops with ``Preempted``, whose
   ``exit_code`` 143 is what the ``lightning-moe`` command exits with (schedulers read it as "requeue");
3. resumed from ``last.ckpt`` to step 12: it ends on exactly the weights of run 1.

``NonFiniteGuard`` watches every step for a NaN loss or router logits; here nothing goes wrong, and the
script prints how many steps it had to skip (none).
"""

import os
import signal
import sys
from pathlib import Path
from pydoc_data.topics import topics

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_moe.callbacks import NonFiniteGuard, Preempted, Preemption, StepCheckpoint
from lightning_moe.data import EpochShuffleSampler, ResumableDataLoader
from lightning_moe.module import MoELanguageModel

STEPS, SEQ_LEN = 12, 32


def data() -> ResumableDataLoader:
    """Blocks of bytes in an order fixed by (seed, epoch), resumable mid-epoch."""
    tokens = torch.frombuffer(bytearray("\n".join(topics.values()).encode()), dtype=torch.uint8).long()
    blocks = [{"input_ids": tokens[i : i + SEQ_LEN + 1]} for i in range(0, 8192 * (SEQ_LEN + 1), SEQ_LEN + 1)]
    return ResumableDataLoader(blocks, batch_size=8, sampler=EpochShuffleSampler(len(blocks), seed=0))


class SigtermAt(Callback):
    """Send this process a real SIGTERM after step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def train(run_dir: Path, *extra: Callback, ckpt_path: str | None = None) -> MoELanguageModel:
    L.seed_everything(0, verbose=False)
    model = MoELanguageModel(d_model=64, n_layers=2, max_seq_len=SEQ_LEN)
    trainer = L.Trainer(
        max_steps=STEPS, default_root_dir=run_dir, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
        callbacks=[*extra, StepCheckpoint(every_n_train_steps=100, dirpath=str(run_dir / "checkpoints")),
                   Preemption(), NonFiniteGuard()],
    )
    trainer.fit(model, data(), ckpt_path=ckpt_path)
    guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))
    print(f"  reached step {trainer.global_step}; non-finite steps skipped: {guard.skipped}")
    return model


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/fault_tolerance")
    torch.set_num_threads(1)
    print("1. uninterrupted")
    whole = train(root / "whole")

    print("2. SIGTERM at step 5")
    try:
        train(root / "cut", SigtermAt(5))
        raise SystemExit("the run was not preempted")
    except Preempted as stop:
        print(f"  {stop}\n  the command would exit with status {stop.exit_code}")

    print("3. resumed from last.ckpt")
    resumed = train(root / "cut", ckpt_path=str(root / "cut" / "checkpoints" / "last.ckpt"))
    pairs = zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True)
    same = all(torch.equal(a, b) for a, b in pairs)
    print(f"resumed weights equal the uninterrupted run's: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
