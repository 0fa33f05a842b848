"""``BiasOffsetUpdater``: auxiliary-loss-free load balancing (DeepSeek-V3) for any MoE model.

Legend: ``E`` experts, ``L`` MoE layers with a bias buffer.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_moe.balancing.losses import bias_update
from lightning_moe.callbacks._utils import discover, reduce_sum
from lightning_moe.callbacks.schedule import Schedule, as_schedule
from lightning_moe.discovery import MoELayerView, find_moe_layers


class BiasOffsetUpdater(Callback):
    """Nudge every router's per-expert bias toward balance once per optimizer step.

    Each MoE layer with a bias buffer (ours with ``TopKRouter(expert_bias=True)`` or
    ``GroupLimitedTopKRouter(expert_bias=True)``; DeepSeek-V3's ``e_score_correction_bias``)
    gets ``b_e += u * sign(mean load - load_e)`` (:func:`~lightning_moe.balancing.bias_update`).
    The bias changes which experts are chosen, never the gate weights, so no gradient is involved.

    - **Once per optimizer step, right under gradient accumulation**: the loads of every
      micro-batch since the last step are summed, and the update is applied in
      ``on_before_optimizer_step`` (after the last micro-batch's forward). With
      ``accumulate_grad_batches=4`` there is one update per 4 batches, from all 4 batches' loads.
    - **Identical on every rank**: the loads are summed over ranks through
      ``trainer.strategy.reduce`` before the update, so every rank applies the same change.
    - **Rate**: a float (constant) or a :class:`Schedule` of the optimizer step.

    Logs ``bias_offset/max_violation`` (mean over layers of ``max_e load_e / mean load - 1``
    over the loads of the update, DeepSeek's MaxVio; 0 is perfect balance) and
    ``bias_offset/max_abs`` (the largest absolute bias).

    One per model: two would both move the same biases. So its checkpoint state keeps Lightning's
    default ``state_key``, the class name, under which a Trainer refuses a second instance; and a
    resumed run may change ``rate``.

    Args:
        rate: update rate ``u`` (>= 0) or a :class:`Schedule` of it. DeepSeek-V3 uses 1e-3 for
            most of training and 0 at the end. The bias is added to normalised scores (softmax
            in [0, 1], sigmoid in (0, 1)), so useful rates are 1e-4 to 1e-2.
    """

    def __init__(self, rate: float | Schedule = 1e-3) -> None:
        self.rate = as_schedule(rate, "rate")
        self._views: list[MoELayerView] = []
        self._pending: Tensor | None = None  # (L, E) loads since the last update, this rank only
        self._counted_this_batch = False
        self.num_updates = 0
        self.last_max_violation: float | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        views = discover(pl_module, type(self).__name__)
        self._views = [v for v in views if v.expert_bias is not None]
        if not self._views:
            raise ValueError(
                f"BiasOffsetUpdater found {len(views)} MoE layers but none has a bias buffer: build the router "
                "with `expert_bias=True` (TopKRouter, GroupLimitedTopKRouter) or use a DeepSeek-V3 model."
            )
        sizes = {v.num_experts for v in self._views}
        if len(sizes) != 1:
            raise ValueError(f"BiasOffsetUpdater needs the same number of experts in every layer, got {sorted(sizes)}.")

    @property
    def views(self) -> list[MoELayerView]:
        """The layers whose biases this callback updates."""
        return list(self._views)

    def _count(self) -> None:
        loads = []
        for view in self._views:
            stats = view.stats
            bias = view.expert_bias
            if stats is None:
                loads.append(torch.zeros(view.num_experts, dtype=torch.float64, device=bias.device))
            else:
                loads.append(stats.tokens_per_expert_E.to(device=bias.device, dtype=torch.float64))
        loads_LE = torch.stack(loads)
        self._pending = loads_LE if self._pending is None else self._pending + loads_LE

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._counted_this_batch = False

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if not self._views:
            return
        if not self._counted_this_batch:
            self._count()  # the micro-batch whose backward completed the accumulation
            self._counted_this_batch = True
        if self._pending is None:
            return
        loads_LE = reduce_sum(trainer, self._pending)
        self._pending = None
        rate = self.rate(trainer.global_step)
        with torch.no_grad():
            for view, load_E in zip(self._views, loads_LE, strict=True):
                bias = view.expert_bias
                bias.copy_(bias_update(bias, load_E, rate))
        mean_L = loads_LE.mean(dim=1).clamp_min(1e-12)
        self.last_max_violation = float((loads_LE.amax(dim=1) / mean_L - 1.0).mean())
        self.num_updates += 1

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._counted_this_batch:
            self._count()  # an accumulation micro-batch: its loads join the next update
        if self.last_max_violation is not None:
            max_abs = max(float(v.expert_bias.abs().max()) for v in self._views)
            pl_module.log("bias_offset/max_violation", self.last_max_violation, on_step=True, on_epoch=False)
            pl_module.log("bias_offset/max_abs", max_abs, on_step=True, on_epoch=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        # The biases themselves are buffers of the model and live in its state_dict.
        return {
            "num_updates": self.num_updates,
            "pending": None if self._pending is None else self._pending.cpu(),
            "last_max_violation": self.last_max_violation,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = state_dict["num_updates"]
        self._pending = state_dict["pending"]
        self.last_max_violation = state_dict["last_max_violation"]

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None and self._views:
            self._pending = self._pending.to(self._views[0].expert_bias.device)


class BiasWithoutUpdaterWarning(UserWarning):
    """A router has an expert bias that nothing updates (no :class:`BiasOffsetUpdater` in the trainer)."""


def warn_bias_without_updater(trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
    """Warn (once, from rank zero) when ``pl_module`` has MoE layers whose expert bias is all zeros and the
    trainer has no :class:`BiasOffsetUpdater`: the bias would stay zero and balance nothing. Returns whether
    it warned. Call at fit start."""
    if any(isinstance(c, BiasOffsetUpdater) for c in trainer.callbacks):
        return False
    idle = [v.name for v in find_moe_layers(pl_module) if v.expert_bias is not None and not v.expert_bias.any()]
    if not idle:
        return False
    rank_zero_warn(
        f"{len(idle)} MoE layers ({idle[0]}{', ...' if len(idle) > 1 else ''}) have an expert bias "
        "(`expert_bias=True`) but no BiasOffsetUpdater is attached, so the bias stays 0 and balances nothing. Add "
        "`--trainer.callbacks+=lightning_moe.callbacks.BiasOffsetUpdater` (or "
        "`--trainer.callbacks+=cli_configs/callbacks/bias_offset_updater.yaml`), or drop `expert_bias`.",
        category=BiasWithoutUpdaterWarning,
    )
    return True
