"""``ZLossScheduler``: schedule the z-loss coefficient (or any balancer's) over training."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from lightning_moe.balancing.losses import Balancer
from lightning_moe.callbacks._utils import discover
from lightning_moe.callbacks.schedule import Schedule, ScheduleKind


class ZLossScheduler(Callback):
    """Set a balancer's coefficient from a :class:`Schedule` before every training batch.

    The coefficient at optimizer step ``s`` is ``schedule(s)`` (``trainer.global_step``), in every
    MoE layer whose balancers include one named ``balancer`` (``z_loss`` by default; ``aux_loss``,
    ``seq_aux_loss``, ``device_aux_loss`` and ``comm_balance_loss`` schedule the other losses the
    same way). The schedule is a pure function of the step, so a resumed run continues exactly;
    the coefficient last set is also kept in the checkpoint and restored before validation runs.
    Logs ``schedule/<balancer>_coeff``.

    Typical uses: a z-loss that warms up once logits start to grow (``kind="linear"``), or an
    auxiliary loss that decays (``kind="cosine"``) once the router has settled.

    Args:
        kind, value, start_value, final_value, warmup_steps, total_steps, step_size, gamma:
            the :class:`Schedule`.
        balancer: name of the balancer to schedule (``Balancer.name``).
    """

    def __init__(
        self,
        kind: ScheduleKind = "linear",
        value: float = 1e-3,
        start_value: float = 0.0,
        final_value: float = 0.0,
        warmup_steps: int = 1000,
        total_steps: int | None = None,
        step_size: int = 1000,
        gamma: float = 0.5,
        balancer: str = "z_loss",
    ) -> None:
        self.schedule = Schedule(kind, value, start_value, final_value, warmup_steps, total_steps, step_size, gamma)
        if not isinstance(balancer, str) or not balancer:
            raise ValueError(f"`balancer` must be a balancer name such as 'z_loss', got {balancer!r}.")
        self.balancer = balancer
        self._targets: list[Balancer] = []
        self.coeff: float | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(balancer=self.balancer)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        views = discover(pl_module, type(self).__name__)
        targets: dict[int, Balancer] = {}
        for view in views:
            for balancer in view.balancers:
                if balancer.name == self.balancer:
                    targets[id(balancer)] = balancer
        if not targets:
            present = sorted({b.name for view in views for b in view.balancers})
            raise ValueError(
                f"ZLossScheduler(balancer={self.balancer!r}) found no such balancer in the {len(views)} MoE layers; "
                f"the layers have {present or 'no balancers'}."
            )
        self._targets = list(targets.values())

    def _apply(self, coeff: float) -> None:
        self.coeff = coeff
        for balancer in self._targets:
            balancer.coeff = coeff

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(self.coeff if self.coeff is not None else self.schedule(trainer.global_step))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._apply(self.schedule(trainer.global_step))
        pl_module.log(f"schedule/{self.balancer}_coeff", self.coeff, on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"coeff": self.coeff, "balancer": self.balancer}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("balancer", self.balancer) != self.balancer:
            raise ValueError(
                f"This checkpoint's ZLossScheduler scheduled {state_dict['balancer']!r}; this one schedules "
                f"{self.balancer!r}."
            )
        self.coeff = state_dict.get("coeff")
