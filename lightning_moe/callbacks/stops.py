"""Why a run stopped before its end, each with the exit status the ``lightning-moe`` command returns.

Schedulers read the status: 128 + the signal number (143 for SIGTERM, 130 for SIGINT, 138 for
SIGUSR1) means "preempted, a resumable checkpoint was written: requeue me", as SLURM and Kubernetes
conventions expect of a process that was asked to stop; the other codes mean a failure that a retry
will not fix.

=====  ==============================================================================
code   meaning
=====  ==============================================================================
0      the run finished
1      an unexpected error (a traceback), or a collective that timed out
2      a usage error: a bad flag, value, data file or checkpoint, reported before training
3      :class:`NonFiniteError`: a loss or the router logits became NaN or infinite
74     :class:`CheckpointWriteError`: a checkpoint could not be written (``EX_IOERR``)
128+N  :class:`Preempted` by signal N after writing a resumable checkpoint
=====  ==============================================================================
"""

from __future__ import annotations

import signal


class TrainingStopped(Exception):  # noqa: N818 - a stop, not only an error (preemption is expected)
    """A run stopped on purpose before its end; ``exit_code`` is the status the command exits with."""

    exit_code = 1


class NonFiniteError(TrainingStopped):
    """The training loss, an auxiliary loss or a layer's router logits became NaN or infinite."""

    exit_code = 3


class CheckpointWriteError(TrainingStopped, OSError):
    """A checkpoint could not be written; the message names the path and the reason."""

    exit_code = 74


class Preempted(TrainingStopped):
    """A stop signal arrived; a resumable checkpoint was written (``checkpoint``, when one could be)."""

    def __init__(self, signum: int, step: int, checkpoint: str | None) -> None:
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
        name = signal.Signals(signum).name
        where = f"saved {checkpoint}" if checkpoint else "no checkpoint callback, nothing saved"
        super().__init__(f"Stopped by {name} after step {step}; {where}. Resume with `--ckpt_path last` "
                         f"(exit status {self.exit_code}: requeue).")

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return 128 + self.signum
