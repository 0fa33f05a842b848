"""``Preemption``: on SIGTERM, SIGINT or a scheduler's warning signal, finish the step, save, exit to be requeued."""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_moe.callbacks.stops import Preempted

#: The signals handled by default: what SLURM and Kubernetes send before killing (SIGTERM), Ctrl+C
#: (SIGINT) and the usual early-warning signal (``sbatch --signal=USR1@90``).
DEFAULT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


def _signal_number(name: str | int) -> int:
    if isinstance(name, int):
        return int(signal.Signals(name))
    key = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
    try:
        return int(signal.Signals[key])
    except KeyError:
        valid = ", ".join(sorted(s.name for s in signal.Signals if s.name.startswith("SIG") and "_" not in s.name))
        raise ValueError(f"`signals`: unknown signal {name!r}; valid names: {valid}.") from None


class Preemption(Callback):
    """Stop cleanly when the job is asked to: finish the current step, write a resumable checkpoint,
    and end the run with exit status ``128 + signal`` (143 for SIGTERM), which tells a scheduler to
    requeue it.

    The handler only records the signal; at the end of each training step the ranks agree (one
    all-reduce of a single number) on whether any of them received one, so a signal delivered to one
    process stops all of them at the same step. Then every rank calls the run's
    :class:`~lightning_moe.callbacks.StepCheckpoint` (``save_now``: a step checkpoint and
    ``last.ckpt``) and raises :class:`~lightning_moe.callbacks.Preempted`. Resume with
    ``--ckpt_path last``: the run continues bit for bit. A second signal of the same kind, while the
    first is being handled, stops at once without saving (the signal's default action). Under gradient
    accumulation the stop waits for the end of the accumulation window, so no gradient is lost.

    A signal that arrives during validation takes effect at the next training step. Processes that
    Lightning itself started for the other ranks (``trainer.devices > 1`` on one machine) exit 0 after
    saving, so that its watcher does not kill the main process, which reports the status; under
    ``torchrun`` or SLURM every rank exits with it.

    Args:
        signals: signal names (``SIGTERM``, ``SIGINT``, ``SIGUSR1``, ``USR2``...) or numbers to handle.
    """

    def __init__(self, signals: list[str | int] | tuple[str | int, ...] = DEFAULT_SIGNALS) -> None:
        self.signals = [_signal_number(s) for s in signals]
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._announced = False
        self._last_step = 0

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        # Only record it: no logging or collectives inside a signal handler.
        if self.received == signum:  # a second one: the signal's default action, now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in self.signals:
            self._previous.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, self._handler)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous = {}

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning registered its own SIGTERM handler (which stops with status 0 and saves nothing).
        self.received = None
        self._announced = False
        self._last_step = trainer.global_step
        self._install()

    def _agreed_signal(self, trainer: L.Trainer) -> int:
        if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return self.received or 0
        received = torch.tensor([self.received or 0], dtype=torch.long, device=trainer.strategy.root_device)
        dist.all_reduce(received, op=dist.ReduceOp.MAX)  # one host sync per step, on several processes only
        return int(received.item())

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.received and not self._announced:
            self._announced = True
            print(f"Received {signal.Signals(self.received).name}: saving a checkpoint after this step, then stopping.",
                  file=sys.stderr, flush=True)
        stepped, self._last_step = trainer.global_step != self._last_step, trainer.global_step
        if not stepped:
            return  # inside a gradient-accumulation window: a checkpoint here would lose the gradients so far
        signum = self._agreed_signal(trainer)
        if not signum:
            return
        path = None
        for callback in trainer.checkpoint_callbacks:
            save_now = getattr(callback, "save_now", None)
            if save_now is not None:
                path = save_now(trainer)
        raise Preempted(signum, trainer.global_step, path)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()  # before Lightning's teardown puts back the handlers it found

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
