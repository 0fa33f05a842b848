"""``NonFiniteGuard``: stop (or skip the step) when a loss or a layer's router logits become NaN or infinite."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_moe._validate import check_non_negative_int
from lightning_moe.callbacks.stops import NonFiniteError
from lightning_moe.discovery import MoELayerView, find_moe_layers

ADVICE = ("Lower the learning rate (`model.optimizer.init_args.lr`), add or raise a ZLoss on the router logits, "
          "clip gradients (`--trainer.gradient_clip_val 1.0`), or skip such steps with NonFiniteGuard(action=skip).")


def _first_tensor(output: Any) -> Tensor | None:
    logits = getattr(output, "logits_TE", output)  # our routers return a Routing; Hugging Face gates logits
    if isinstance(logits, (tuple, list)):
        logits = next((x for x in logits if isinstance(x, Tensor)), None)
    return logits if isinstance(logits, Tensor) else None


def _count_bad(tensor: Tensor) -> int:
    return int((~torch.isfinite(tensor.detach())).sum().item())


class NonFiniteGuard(Callback):
    """Watch every training step for a non-finite loss or router logits; never checkpoint a non-finite model.

    Each step it reads one flag (one host synchronisation): the training loss (which includes every
    auxiliary loss) or any MoE layer's router logits is NaN or infinite. The logits are checked by a
    forward hook on each router that :func:`~lightning_moe.discovery.find_moe_layers` finds (our layers
    and Hugging Face MoE blocks), which also catches logits that overflow under a sigmoid router while
    the loss stays finite. When the flag is up, before the backward pass and the optimizer step:

    - ``action="stop"`` raises :class:`~lightning_moe.callbacks.NonFiniteError` (exit status 3) with a
      message naming the quantity: which layer's router logits went non-finite (and how many of them),
      which auxiliary losses of which layer, the language-model loss; the weights are those of the
      previous step, and no checkpoint is written;
    - ``action="skip"`` drops the step (the gradients are discarded, so the optimizer leaves every weight
      and its state as they were, and the buffers the forward changed, such as running means, are put
      back from a copy taken before it), warns, logs ``train/skipped_steps``, and stops as above once more than
      ``max_skipped`` steps were skipped. Skipping needs a PyTorch optimizer (not DeepSpeed's engine).

    Independently, a checkpoint whose model weights hold a NaN or infinity is refused (the same error):
    a good ``last.ckpt`` is never replaced by a broken one. Under several processes the ranks agree on
    the flag, so they stop or skip together.

    Args:
        action: ``"stop"`` or ``"skip"``.
        max_skipped: with ``"skip"``, the most steps skipped in a run before it stops, >= 0.
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop", max_skipped: int = 10) -> None:
        if action not in ("stop", "skip"):
            raise ValueError(f"`action` must be 'stop' or 'skip', got {action!r}.")
        self.action = action
        self.max_skipped = check_non_negative_int("max_skipped", max_skipped)
        self.skipped = 0
        self._views: list[MoELayerView] = []
        self._hooks: list[RemovableHandle] = []
        self._logits: dict[str, Tensor] = {}
        self._skip_this_step = False
        self._buffers: dict[str, Tensor] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(action=self.action)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.action == "skip" and "deepspeed" in type(trainer.strategy).__name__.lower():
            raise ValueError("NonFiniteGuard(action='skip') discards the step's gradients before a PyTorch optimizer "
                             "steps; DeepSpeed's engine steps itself: use action='stop' under DeepSpeed.")
        self._remove_hooks()
        self._views = find_moe_layers(pl_module)
        for view in self._views:
            router = getattr(view, "router", None)
            if isinstance(router, torch.nn.Module):
                self._hooks.append(router.register_forward_hook(self._keeper(view.name)))

    def _keeper(self, name: str) -> Any:
        def keep(module: torch.nn.Module, args: Any, output: Any) -> None:
            logits = _first_tensor(output)
            if logits is not None and module.training:
                self._logits[name] = logits.detach()
        return keep

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._logits = {}

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")  # teardown is not called after an exception

    def _bad_flag(self, loss: Tensor) -> Tensor:
        bad = ~torch.isfinite(loss.detach()).all()
        for logits in self._logits.values():
            bad = bad | ~torch.isfinite(logits).all()
        return bad

    def describe(self, loss: Tensor, step: int) -> str:
        """What went non-finite at ``step``, layer by layer, in forward order."""
        parts = [f"Non-finite values in training step {step}: the training loss is {float(loss.detach()):g}."]
        for name, logits in self._logits.items():
            bad = _count_bad(logits)
            if bad:
                parts.append(f"Layer {name}: {bad:,} of {logits.numel():,} router logits are NaN or infinite "
                             f"(the router overflowed).")
        for view in self._views:
            losses = [f"{key}={float(value.detach()):g}" for key, value in view.aux_losses.items()
                      if not torch.isfinite(value.detach()).all()]
            if losses:
                parts.append(f"Layer {view.name}: auxiliary losses {', '.join(losses)}.")
        if len(parts) == 1:
            parts.append("Every router's logits and auxiliary losses are finite: the language-model loss is not.")
        return " ".join(parts)

    @override
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        bad = trainer.strategy.reduce_boolean_decision(bool(self._bad_flag(loss).item()), all=False)
        message = self.describe(loss, trainer.global_step + 1) if bad else ""
        self._logits = {}  # this step's logits are read; hold no tensor until the next forward
        if not bad:
            return
        if self.action == "stop" or self.skipped >= self.max_skipped:
            extra = (f" {self.skipped} steps were skipped before it (max_skipped={self.max_skipped})."
                     if self.skipped else "")
            raise NonFiniteError(f"{message}{extra} Stopped before the optimizer step; no checkpoint of it was "
                                 f"written. {ADVICE}")
        if not self._skip_this_step:  # once per optimizer step, whichever micro-batch of it went wrong
            self.skipped += 1
            self._skip_this_step = True
            rank_zero_warn(f"{message} Skipping this step ({self.skipped} of at most {self.max_skipped}).")

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.action == "skip" and not self._buffers:
            # What a forward changes besides the weights (running means, counters), at the first batch of an
            # accumulation window: a skipped step puts it back.
            self._buffers = {name: b.detach().clone() for name, b in pl_module.named_buffers() if b is not None}

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self._skip_this_step:  # any micro-batch of the accumulation window was non-finite
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None  # torch optimizers leave parameters without a gradient untouched
            buffers = dict(pl_module.named_buffers())
            with torch.no_grad():
                for name, saved in self._buffers.items():
                    buffers[name].copy_(saved)
        self._skip_this_step = False
        self._buffers = {}

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.action == "skip":
            pl_module.log("train/skipped_steps", float(self.skipped))

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        broken = [name for name, value in (checkpoint.get("state_dict") or {}).items()
                  if isinstance(value, Tensor) and value.is_floating_point() and not torch.isfinite(value).all()]
        if broken:
            shown = ", ".join(broken[:5]) + (f" and {len(broken) - 5} more" if len(broken) > 5 else "")
            raise NonFiniteError(f"Refusing to checkpoint step {trainer.global_step}: the weights {shown} hold NaN "
                                 f"or infinite values; the previous checkpoint is kept. {ADVICE}")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
