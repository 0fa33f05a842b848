"""``ZLossScheduler``: schedule the z-loss coefficient (or any balancer's) over training."""

from __future__ import annotations

import inspect
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_moe.balancing.losses import Balancer
from lightning_moe.callbacks._utils import discover
from lightning_moe.callbacks.schedule import Schedule, as_schedule
from lightning_moe.discovery import find_moe_layers
from lightning_moe.routing import Router, Scorer


class ZLossScheduler(Callback):
    """Set a balancer's coefficient from a :class:`Schedule` before every training batch.

    The coefficient at optimizer step ``s`` is ``schedule(s)`` (``trainer.global_step``), in every
    MoE layer whose balancers include one named ``balancer`` (``z_loss`` by default; ``aux_loss``,
    ``seq_aux_loss``, ``device_aux_loss`` and ``comm_balance_loss`` schedule the other losses the
    same way), of every loss a layer's router brings under that name (found by discovery:
    ``MoELayerView.loss_weights``; ``ssl_loss``, the pretext loss of
    :class:`~lightning_moe.routing.SelfSupervisedScorer`), and of every loss weight of that name a
    module of the model offers through ``scheduled_coefficients()`` (``mtp_loss``: the
    multi-token-prediction weight λ of :class:`~lightning_moe.models.MoETransformer`). The schedule is a
    pure function of the step, so a resumed run continues exactly; the coefficient last set is also
    kept in the checkpoint and restored before validation runs.
    Logs ``schedule/<balancer>_coeff``. Checkpoint state is keyed by ``balancer``, so one
    scheduler per balancer can run side by side.

    Typical uses: a z-loss that warms up once logits start to grow
    (``Schedule("linear", value=1e-3, warmup_steps=200)``), or an auxiliary loss that decays
    (``kind="cosine"``) once the router has settled. In YAML the schedule nests::

        class_path: lightning_moe.callbacks.ZLossScheduler
        init_args:
          balancer: z_loss
          schedule:
            class_path: lightning_moe.callbacks.Schedule
            init_args: {kind: linear, value: 0.001, warmup_steps: 200}

    Args:
        schedule: the coefficient as a :class:`Schedule` of the optimizer step, or a float >= 0
            for a constant one. ``None`` (the default) is
            ``Schedule("linear", value=1e-3, warmup_steps=1000)``: a warm-up from 0 to 1e-3 over
            the first 1000 steps.
        balancer: name of the balancer to schedule (``Balancer.name``).
    """

    def __init__(self, schedule: float | Schedule | None = None, balancer: str = "z_loss", **flat: Any) -> None:
        if flat:  # the Schedule's arguments were once ZLossScheduler's own: say where they went
            raise _flat_arguments_error(flat)
        if schedule is None:
            schedule = Schedule("linear", value=1e-3, warmup_steps=1000)
        self.schedule = as_schedule(schedule, "schedule")
        if not isinstance(balancer, str) or not balancer:
            raise ValueError(f"`balancer` must be a balancer name such as 'z_loss', got {balancer!r}.")
        self.balancer = balancer
        self._targets: list[Balancer] = []
        self.coeff: float | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(balancer=self.balancer)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        views = find_moe_layers(pl_module)  # none is fine when the model offers the weight (a dense model's MTP)
        # The balancers, the loss weights the layers' routers bring (a SelfSupervisedScorer's ``ssl_loss``) and
        # those a model offers besides them (``scheduled_coefficients()``: MoETransformer's ``mtp_loss``); each has
        # a ``name`` and a ``coeff``.
        candidates = [b for view in views for b in (*view.balancers, *view.loss_weights)]
        candidates += [c for m in pl_module.modules()
                       if callable(getattr(m, "scheduled_coefficients", None)) and not isinstance(m, (Router, Scorer))
                       for c in m.scheduled_coefficients()]  # routers' and scorers' come through discovery
        targets: dict[int, Balancer] = {id(c): c for c in candidates if c.name == self.balancer}
        if not targets and not views:
            discover(pl_module, type(self).__name__)  # raises, naming what models and layers it supports
        if not targets:
            present = sorted({c.name for c in candidates})
            raise ValueError(
                f"ZLossScheduler(balancer={self.balancer!r}) found no such balancer in the {len(views)} MoE layers, "
                f"nor such a loss weight in the model; there are {present or 'no balancers'}."
            )
        self._targets = list(targets.values())

    def _apply(self, coeff: float) -> None:
        self.coeff = coeff
        for balancer in self._targets:
            balancer.coeff = coeff

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(self.coeff if self.coeff is not None else self.schedule(trainer.global_step))

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._apply(self.schedule(trainer.global_step))
        pl_module.log(f"schedule/{self.balancer}_coeff", self.coeff, on_step=True, on_epoch=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"coeff": self.coeff, "balancer": self.balancer}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("balancer", self.balancer) != self.balancer:
            raise ValueError(
                f"This checkpoint's ZLossScheduler scheduled {state_dict['balancer']!r}; this one schedules "
                f"{self.balancer!r}."
            )
        self.coeff = state_dict.get("coeff")


def _flat_arguments_error(flat: dict[str, Any]) -> TypeError:
    """The error for keyword arguments ``ZLossScheduler`` does not take, naming ``schedule`` for the Schedule's."""
    unknown = sorted(set(flat) - set(inspect.signature(Schedule).parameters))
    if unknown:
        return TypeError(f"ZLossScheduler got unexpected keyword arguments {unknown}.")
    call = ", ".join(f"{name}={value!r}" for name, value in flat.items())
    return TypeError(
        f"ZLossScheduler takes the schedule as one argument: pass `schedule=Schedule({call})` instead of "
        f"{', '.join(f'`{name}`' for name in flat)} (in YAML, nest them under `schedule:` with "
        "`class_path: lightning_moe.callbacks.Schedule` and `init_args:`)."
    )
