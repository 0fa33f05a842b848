"""``GeneratedTextWriter``: print the texts that ``predict`` generates and save them, as text and JSON Lines."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

from lightning_moe.callbacks.checkpoint import atomic_write


def _format(number: int, prompt: str, text: str) -> str:
    return f"--- prompt {number} ---\n{prompt}\n--- continuation {number} ---\n{text}\n"


class GeneratedTextWriter(BasePredictionWriter):
    """Print each prompt and its generated continuation, and write them all to ``path`` at the end.

    For models whose ``predict_step`` returns ``{"prompt": str, "text": str}`` per batch (and optionally the
    prompt's ``"index"`` in the data, else the sampler's), as
    :meth:`MoELanguageModel.predict_step <lightning_moe.module.MoELanguageModel.predict_step>` does. The
    text file holds, per prompt in the order of the data, ``--- prompt i ---``, the prompt,
    ``--- continuation i ---`` and the generated text; ``<path stem>.jsonl`` beside it holds one
    ``{"prompt": ..., "text": ...}`` a line. Both are written at the end of ``predict`` (atomically: beside
    the destination, then renamed over it), by global rank 0 alone, after gathering every rank's
    predictions; then it prints ``Predictions written to <path>``.

    Args:
        path: the text file; ``None``: ``predictions.txt`` in ``trainer.log_dir`` (the logger's version
            folder, or ``trainer.default_root_dir`` without a logger). Parent folders are created. It
            must not end in ``.jsonl``, the name of its twin.
        stdout: print each prompt and continuation as it is generated (on one process; with several,
            rank 0 prints them all at the end).
    """

    def __init__(self, path: str | None = None, stdout: bool = True) -> None:
        super().__init__(write_interval="batch")
        if path is not None and Path(path).suffix == ".jsonl":
            raise ValueError(f"`path` must not end in .jsonl (its JSON Lines twin is <stem>.jsonl), got {path!r}.")
        self.path = path
        self.stdout = stdout
        self.written: Path | None = None  # where the last predict wrote its text
        self._out: Path | None = None
        self._rows: list[tuple[int, int, str, str]] = []  # (dataloader, index in the data, prompt, text)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "predict":
            # trainer.log_dir broadcasts rank 0's folder: every rank calls it here.
            self._out = Path(self.path) if self.path is not None else Path(trainer.log_dir) / "predictions.txt"

    @override
    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows = []

    @override
    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        if not (isinstance(prediction, dict) and isinstance(prediction.get("prompt"), str)
                and isinstance(prediction.get("text"), str)):
            raise TypeError(f"GeneratedTextWriter writes predictions of the form {{'prompt': str, 'text': str}} (one "
                            f"prompt per batch); predict_step returned {type(prediction).__name__}.")
        index = prediction.get("index", batch_indices[0] if batch_indices else batch_idx)
        self._rows.append((dataloader_idx, index, prediction["prompt"], prediction["text"]))
        if self.stdout and trainer.world_size == 1:
            print(_format(index + 1, prediction["prompt"], prediction["text"]), flush=True)

    @override
    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = self._gather(trainer)
        if not trainer.is_global_zero:
            return
        if self.stdout and trainer.world_size > 1:
            for _, index, prompt, text in rows:
                print(_format(index + 1, prompt, text), flush=True)
        assert self._out is not None, "setup('predict') resolves the path"
        document = "\n".join(_format(index + 1, prompt, text) for _, index, prompt, text in rows)
        lines = "".join(json.dumps({"prompt": p, "text": t}, ensure_ascii=False) + "\n" for _, _, p, t in rows)
        atomic_write(self._out, lambda file: file.write(document.encode("utf-8")))
        atomic_write(self._out.with_suffix(".jsonl"), lambda file: file.write(lines.encode("utf-8")))
        self.written = self._out
        print(f"Predictions written to {self._out}", flush=True)

    def _gather(self, trainer: L.Trainer) -> list[tuple[int, int, str, str]]:
        """Every rank's rows, in the order of the data, each once (the data module pads the prompts with copies
        so that every rank runs as many; a copy keeps its prompt's index)."""
        rows = self._rows
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
            rows = [row for rank_rows in gathered for row in rank_rows]
        unique = {(loader, index): (loader, index, prompt, text) for loader, index, prompt, text in rows}
        return [unique[key] for key in sorted(unique)]
