"""``DeadExpertDetector``: find experts that stopped receiving tokens, then warn, stop or revive.

Legend: ``E`` experts, ``L`` MoE layers.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_moe._validate import check_choice, check_non_negative, check_positive_int
from lightning_moe.callbacks._utils import adopt_former_state, discover, reduce_sum
from lightning_moe.discovery import MoELayerView

DeadAction = Literal["warn", "raise", "revive"]
DEAD_ACTIONS = ("warn", "raise", "revive")


class DeadExpertError(RuntimeError):
    """Raised by ``DeadExpertDetector(action="raise")``; the message lists the dead experts."""


class DeadExpertDetector(Callback):
    """Count tokens per expert over a window of training batches and act on dead experts.

    An expert is *dead* when its share of its layer's assignments over the last ``window``
    training batches (all ranks together) is below ``threshold / E``, i.e. under ``threshold``
    times the share it would get under perfect balance. At the end of each window the callback:

    - ``warn``: warns (rank 0) naming every dead expert by layer;
    - ``raise``: raises :class:`DeadExpertError` with the same report, stopping training;
    - ``revive``: re-initialises each dead expert from a live one of its layer (the most loaded
      first) plus Gaussian noise of ``noise`` times the source weights' std, copies the source's
      router row (with noise) and bias offset, and zeroes the optimizer state (e.g. Adam's
      moments) of the rows changed. The noise comes from a generator seeded with ``seed`` and
      the step, so every rank makes the same change.

    It logs ``dead_experts/count`` (dead experts in all layers, from the last complete window)
    and, per layer, ``dead_experts/layer{i}``. ``dead_experts`` holds the last report as
    ``{layer name: [expert indices]}`` and ``revived`` counts the experts revived. Its checkpoint
    state is keyed by ``window``, ``threshold`` and ``action``, so detectors that differ in one of
    them keep separate states (e.g. one that warns early and one that stops training).

    Args:
        window: training batches per window, >= 1.
        threshold: share under which an expert is dead, as a fraction of the uniform share
            ``1/E``, in (0, 1]. The default 0.1 flags an expert that got under a tenth of its
            fair share.
        action: ``warn``, ``raise`` or ``revive``.
        noise: relative noise of a revived expert, >= 0 (``revive`` only).
        seed: seed of the revival noise.
    """

    def __init__(
        self,
        window: int = 100,
        threshold: float = 0.1,
        action: DeadAction = "warn",
        noise: float = 0.01,
        seed: int = 0,
    ) -> None:
        self.window = check_positive_int("window", window)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
            raise ValueError(f"`threshold` must be a number in (0, 1], got {threshold!r}.")
        self.threshold = float(threshold)
        self.action = check_choice("action", action, DEAD_ACTIONS)
        self.noise = check_non_negative("noise", noise)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"`seed` must be an integer, got {seed!r}.")
        self.seed = seed
        self._views: list[MoELayerView] = []
        self._counts: Tensor | None = None  # (L, E) this rank's assignments in the current window
        self.batches_in_window = 0
        self.dead_experts: dict[str, list[int]] = {}
        self.dead_per_layer: list[int] | None = None
        self.revived = 0

    @property
    @override
    def state_key(self) -> str:
        # Detectors that differ in what they look for or do keep separate checkpoint states.
        return self._generate_state_key(window=self.window, threshold=self.threshold, action=self.action)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._views = discover(pl_module, type(self).__name__)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Counts stay on the strategy's device until the window ends: no host sync per batch.
        device = trainer.strategy.root_device
        counts = []
        for view in self._views:
            stats = view.stats
            if stats is None:
                counts.append(torch.zeros(view.num_experts, dtype=torch.float64, device=device))
            else:
                counts.append(stats.tokens_per_expert_E.detach().to(device=device, dtype=torch.float64))
        counts_LE = _pad_stack(counts)
        self._counts = counts_LE if self._counts is None else self._counts.to(device) + counts_LE
        self.batches_in_window += 1
        if self.batches_in_window >= self.window:
            self._end_window(trainer, pl_module)
        if self.dead_per_layer is not None:
            pl_module.log("dead_experts/count", float(sum(self.dead_per_layer)), on_step=True, on_epoch=False)
            for i, n in enumerate(self.dead_per_layer):
                pl_module.log(f"dead_experts/layer{i}", float(n), on_step=True, on_epoch=False)

    def _end_window(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self._counts is not None
        counts_LE = reduce_sum(trainer, self._counts).cpu()
        self._counts = None
        self.batches_in_window = 0
        report: dict[str, list[int]] = {}
        per_layer = []
        for view, counts_E in zip(self._views, counts_LE, strict=True):
            counts_E = counts_E[: view.num_experts]
            total = counts_E.sum()
            if total <= 0:  # the layer did not run in this window
                per_layer.append(0)
                continue
            share_E = counts_E / total
            dead = torch.nonzero(share_E < self.threshold / view.num_experts).flatten().tolist()
            per_layer.append(len(dead))
            if dead:
                report[view.name] = dead
        self.dead_experts = report
        self.dead_per_layer = per_layer
        if not report:
            return
        message = (
            f"DeadExpertDetector: {sum(per_layer)} dead experts (share under {self.threshold:g} of uniform over the "
            f"last {self.window} batches, step {trainer.global_step}): "
            + "; ".join(f"{name}: experts {dead}" for name, dead in report.items())
        )
        if self.action == "raise":
            raise DeadExpertError(message)
        if self.action == "warn":
            rank_zero_warn(message)
            return
        self._revive(trainer, counts_LE, report)
        rank_zero_info(message + " -> revived from live experts.")

    def _revive(self, trainer: L.Trainer, counts_LE: Tensor, report: dict[str, list[int]]) -> None:
        generator = torch.Generator().manual_seed(self.seed + trainer.global_step)
        for view, counts_E in zip(self._views, counts_LE, strict=True):
            dead = report.get(view.name)
            if not dead:
                continue
            counts_E = counts_E[: view.num_experts]
            live = [e for e in torch.argsort(counts_E, descending=True, stable=True).tolist() if e not in dead]
            if not live:
                continue
            sources = [live[i % len(live)] for i in range(len(dead))]
            _reset_optimizer_rows(trainer, view.revive(dead, sources, self.noise, generator))
            self.revived += len(dead)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "counts": None if self._counts is None else self._counts.cpu(),
            "batches_in_window": self.batches_in_window,
            "dead_experts": self.dead_experts,
            "dead_per_layer": self.dead_per_layer,
            "revived": self.revived,
        }

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Checkpoints written before the key named the arguments keyed the state by the class name.
        adopt_former_state(checkpoint, self.state_key, type(self).__qualname__)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._counts = state_dict["counts"]
        self.batches_in_window = state_dict["batches_in_window"]
        self.dead_experts = dict(state_dict["dead_experts"])
        self.dead_per_layer = state_dict["dead_per_layer"]
        self.revived = state_dict["revived"]


def _pad_stack(rows: list[Tensor]) -> Tensor:
    """Stack per-layer ``(E_l,)`` vectors into ``(L, max E)``, zero-padded."""
    width = max(r.numel() for r in rows)
    out = torch.zeros(len(rows), width, dtype=torch.float64, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
    return out


@torch.no_grad()
def _reset_optimizer_rows(trainer: L.Trainer, changed: list[tuple[Tensor, list[int] | None]]) -> None:
    """Zero the optimizer state (same-shaped tensors such as Adam's moments) of what was revived:
    the given rows of each tensor, or all of it where ``rows`` is ``None``."""
    rows_of = {id(t): rows for t, rows in changed}
    for optimizer in trainer.optimizers:
        for param, state in optimizer.state.items():
            if id(param) not in rows_of:
                continue
            rows = rows_of[id(param)]
            for value in state.values():
                if isinstance(value, Tensor) and value.shape == param.shape:
                    if rows is None:
                        value.zero_()
                    else:
                        value[rows] = 0
