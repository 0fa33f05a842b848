"""Checkpoints that are never lost or silently stale: :class:`StepCheckpoint` and :class:`AtomicCheckpointIO`.

Lightning's own ``ModelCheckpoint`` writes through a temporary file in ``$TMPDIR`` and moves it into
place, which is a copy, not an atomic rename, when ``$TMPDIR`` is on another filesystem (a tmpfs
``/tmp``, checkpoints on NFS): a kill during the copy leaves a truncated checkpoint in place of the
good one. It also keeps one step checkpoint, and a failed write (a read-only directory) is logged and
skipped while the run goes on. Here a checkpoint is written beside its destination, flushed to disk
and renamed over it, so a reader sees the old file or the new one, never a part; a failed write stops
the run with the path and the reason.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_moe._validate import check_positive_int
from lightning_moe.callbacks.stops import CheckpointWriteError

#: Temporary files are ``.<name>.tmp-<pid>`` beside the destination; a kill can leave one, the next
#: run in that folder removes it.
TEMP_INFIX = ".tmp-"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened or synced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` by ``write(file)`` into ``.<name>.tmp-<pid>`` beside it, ``fsync``, rename it over
    ``path``, ``fsync`` the folder: a reader, or a kill at any moment, never sees half a file. Parent
    folders are created; on an error the temporary file is removed and the error raised."""
    temp = path.with_name(f".{path.name}{TEMP_INFIX}{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _reason(err: OSError) -> str:
    return err.strerror or str(err)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``.<name>.tmp-<pid>`` beside the destination, ``fsync``, rename over it.

    The rename is atomic on every POSIX filesystem because both names are in one directory. Any
    ``OSError`` (permissions, a full disk) raises :class:`~lightning_moe.callbacks.CheckpointWriteError`
    naming the path; the temporary file is removed. Remote paths (``s3://``...) go to Lightning's
    writer unchanged. :class:`StepCheckpoint` installs it in place of the default writer.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        try:
            atomic_write(path, lambda file: torch.save(checkpoint, file))
        except OSError as err:
            raise CheckpointWriteError(f"Could not write the checkpoint {path}: {_reason(err)}.") from err
        return None

    @override
    def remove_checkpoint(self, path: Any) -> None:
        try:
            super().remove_checkpoint(path)
        except OSError as err:
            raise CheckpointWriteError(f"Could not remove the old checkpoint {path}: {_reason(err)}.") from err


def remove_orphans(dirpath: str | Path) -> list[str]:
    """Delete the temporary files a killed writer left in ``dirpath``; return their paths."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(str(dirpath)), f".*{TEMP_INFIX}*")):
        with contextlib.suppress(OSError):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            removed.append(path)
    return removed


def incomplete_reason(path: str | Path) -> str | None:
    """Why the checkpoint file ``path`` cannot be a complete ``torch.save`` archive, or ``None`` if it
    may be (cheap: reads the zip directory at the end of the file, not the tensors). Directories (DeepSpeed
    checkpoints) are not judged."""
    if not _is_local_file_protocol(path) or str(path) in ("last", "best", "hpc") or str(path).startswith("registry"):
        return None  # remote files and Lightning's keywords are Lightning's to resolve
    path = Path(path)
    if path.is_dir():
        return None
    if not path.exists():
        return "there is no such file"
    size = path.stat().st_size
    if size == 0:
        return "it is empty (0 bytes): its write was cut short"
    if not zipfile.is_zipfile(path):
        return f"it is incomplete ({size:,} bytes without the archive directory that ends a complete one)"
    return None


def newest_complete_sibling(path: str | Path) -> Path | None:
    """The newest other complete ``*.ckpt`` file in ``path``'s folder (links followed), or ``None``."""
    path = Path(path)
    folder = path.parent
    candidates = []
    for other in folder.glob("*.ckpt"):
        target = other.resolve()
        if target == path.resolve() or not target.is_file() or incomplete_reason(target) is not None:
            continue
        candidates.append((target.stat().st_mtime, str(other)))
    return Path(max(candidates)[1]) if candidates else None


def verify_checkpoint(path: str | Path, step: int) -> None:
    """Read back the checkpoint file ``path`` (memory-mapped: the tensors are not read) and check that it
    holds ``step``; :class:`~lightning_moe.callbacks.CheckpointWriteError` otherwise."""
    try:
        saved = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:  # noqa: BLE001 - whatever the reader raises, the file is unusable
        raise CheckpointWriteError(f"The checkpoint just written to {path} does not load: {err}.") from err
    if saved.get("global_step") != step:
        raise CheckpointWriteError(
            f"The checkpoint just written to {path} holds step {saved.get('global_step')}, not {step}."
        )


class StepCheckpoint(ModelCheckpoint):
    """A resumable checkpoint every ``every_n_train_steps`` steps, the last ``keep`` of them kept, and
    ``last.ckpt`` a link to the newest.

    Unlike a bare ``ModelCheckpoint``:

    - writes are atomic (:class:`AtomicCheckpointIO`: beside the destination, ``fsync``, rename), so a
      kill at any moment leaves the previous checkpoint intact; the temporary file such a kill leaves is
      removed when the next run starts in the folder;
    - a failed write stops the run with :class:`~lightning_moe.callbacks.CheckpointWriteError` (exit
      status 74) naming the path and the reason, instead of a warning;
    - ``verify=True`` reads each file back after writing it (memory-mapped, cheap) and checks its step;
    - ``last.ckpt`` is replaced atomically (a new link renamed over the old one), only after the file it
      points at is complete, and the final step is saved when training ends;
    - :class:`~lightning_moe.callbacks.Preemption` and
      :class:`~lightning_moe.callbacks.NonFiniteGuard` use it (:meth:`save_now`).

    Files are ``epoch=E-step=S.ckpt`` (Lightning's default names) in the logger's
    ``<save_dir>/<name>/<version>/checkpoints`` unless ``dirpath`` is given. DeepSpeed writes its own
    checkpoint directories; those are not written atomically, but ``last.ckpt`` still moves to a new one
    only after it is complete.

    Args:
        every_n_train_steps: steps between checkpoints, >= 1.
        keep: step checkpoints kept (the newest), >= 1.
        dirpath: the folder; ``None`` is the run's ``checkpoints`` folder.
        verify: read each checkpoint file back after writing it.
        **kwargs: other ``ModelCheckpoint`` arguments (``filename``, ``save_weights_only``, ``verbose``).
    """

    def __init__(self, every_n_train_steps: int = 100, keep: int = 3, dirpath: str | None = None,
                 verify: bool = True, **kwargs: Any) -> None:
        check_positive_int("every_n_train_steps", every_n_train_steps)
        self.keep = check_positive_int("keep", keep)
        for name in ("monitor", "mode", "save_top_k", "save_last", "enable_version_counter"):
            if name in kwargs:
                raise ValueError(f"StepCheckpoint sets `{name}` itself (the newest `keep` steps, last.ckpt a link); "
                                 "use lightning.pytorch.callbacks.ModelCheckpoint for other policies.")
        super().__init__(dirpath=dirpath, monitor="step", mode="max", save_top_k=keep, save_last="link",
                         every_n_train_steps=every_n_train_steps, enable_version_counter=False, **kwargs)
        self.verify = verify
        self._pending_removals: list[str] = []
        self._align_log_step = False  # set at train start when resuming: see on_train_batch_start

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_train_steps=self._every_n_train_steps, keep=self.keep)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        with warnings.catch_warnings():
            if trainer.ckpt_path is not None:  # resuming continues the folder: of course it is not empty
                warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)
        strategy = trainer.strategy
        if type(getattr(strategy, "checkpoint_io", None)) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()
        if trainer.is_global_zero and stage == "fit" and self.dirpath is not None:
            for path in remove_orphans(self.dirpath):
                rank_zero_info(f"Removed {path}, a checkpoint write that a kill interrupted.")

    @override
    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if self.verify and trainer.is_global_zero and os.path.isfile(filepath):
            verify_checkpoint(filepath, trainer.global_step)

    @staticmethod
    @override
    def _link_checkpoint(trainer: L.Trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            temp = os.path.join(os.path.dirname(linkpath), f".{os.path.basename(linkpath)}{TEMP_INFIX}{os.getpid()}")
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(temp)
                os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), temp)
                if os.path.isdir(linkpath) and not os.path.islink(linkpath):
                    shutil.rmtree(linkpath)  # a DeepSpeed directory saved by an older version
                os.replace(temp, linkpath)
            except OSError as err:
                with contextlib.suppress(OSError):
                    os.remove(temp)
                raise CheckpointWriteError(f"Could not point {linkpath} at {filepath}: {_reason(err)}.") from err
        trainer.strategy.barrier()

    @override
    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        # Lightning removes the oldest file before it re-points last.ckpt; with keep=1 that file is the link's
        # target. Removals wait until the link points at the new file (_save_last_checkpoint).
        self._pending_removals.append(filepath)

    @override
    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        pending, self._pending_removals = self._pending_removals, []
        for filepath in pending:
            super()._remove_checkpoint(trainer, filepath)

    def save_now(self, trainer: L.Trainer) -> str | None:
        """Save the current step (a step checkpoint and ``last.ckpt``) unless it is saved already; return
        the ``last.ckpt`` path. Every rank must call it (DeepSpeed saves collectively)."""
        if self._last_global_step_saved != trainer.global_step:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        return self.last_model_path or None

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and not trainer.fast_dev_run:
            self.save_now(trainer)  # the final step too, so last.ckpt is the end of training

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._align_log_step = trainer.ckpt_path is not None

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # A resumed run's loggers count on from the step the checkpoint was saved at. Lightning restores that
        # count from its loop state with a +1 that is right for some save points and not others (a checkpoint
        # saved at train end after a validation of the last step resumes one step ahead: a gap in the
        # TensorBoard curve). With one optimizer the count is the optimizer steps taken, so set it to that.
        if not self._align_log_step:
            return
        self._align_log_step = False
        loop = trainer.fit_loop.epoch_loop
        if pl_module.automatic_optimization and len(trainer.optimizers) == 1:
            loop._batches_that_stepped = trainer.global_step

def find_last_checkpoint(links: list[Path]) -> Path | None:
    """Of the ``last.ckpt`` paths in ``links`` that exist, the one whose target was written last (links
    followed); ``None`` when there is none."""
    found = []
    for last in links:
        with contextlib.suppress(OSError):
            found.append((last.resolve(strict=True).stat().st_mtime, str(last)))
    return Path(max(found)[1]) if found else None
