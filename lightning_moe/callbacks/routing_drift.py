"""``RoutingDriftMonitor``: how far each MoE layer's routing of a fixed probe batch has moved since training began.

Fine-tuning an MoE on little data can shift its routing far from where pre-training left it (and
collapse experts). The monitor replays one fixed batch of token ids, the *probe*, through the
model every few steps and compares each layer's routing of it with the routing recorded when
training started.

Legend: ``B`` probe sequences, ``S`` probe sequence length, ``T`` probe tokens (``B * S``), ``E``
experts, ``L`` MoE layers, ``M`` measurements.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_moe._validate import check_bool, check_choice, check_non_negative_int, check_positive_int, check_prefix
from lightning_moe.callbacks._utils import discover
from lightning_moe.callbacks.heatmap import HEATMAP_DPI, HEATMAP_MARGINS_PX, heatmap_size_px
from lightning_moe.discovery import MoELayerView
from lightning_moe.layers.stats import RoutingStats

DriftAction = Literal["warn", "raise", "freeze"]
DRIFT_ACTIONS = ("warn", "raise", "freeze")
#: The drift values of a layer, in the order of the columns of ``drift_history``.
DRIFT_METRICS = ("changed_share", "load_kl", "entropy_change")
#: Load shares are mixed with this much of the uniform share before the KL divergence, so an expert
#: without load in one of the two distributions gives a large but finite divergence.
LOAD_SMOOTHING = 1e-3

ForwardFn = Callable[[L.LightningModule, Tensor], Any]


class RoutingDriftWarning(UserWarning):
    """Warned on rank 0 by :class:`RoutingDriftMonitor`, once per layer, when a layer's routing drifts too far."""


class RoutingDriftError(RuntimeError):
    """Raised by ``RoutingDriftMonitor(action="raise")``; the message names the layers and their drift."""


@dataclass(frozen=True)
class LayerDrift:
    """One MoE layer's drift at one measurement (see :class:`RoutingDriftMonitor` for the definitions)."""

    index: int
    name: str
    changed_share: float
    load_kl: float
    entropy_change: float


@dataclass(frozen=True)
class _Reference:
    """One layer's routing of the probe when training began."""

    mask_TE: Tensor | None  # bool: the experts each token reached; None when the layer records no assignments
    counts_E: Tensor  # int64 kept assignments per expert
    entropy: Tensor  # 0-d float32: mean token entropy (nats)

    @classmethod
    def of(cls, stats: RoutingStats) -> _Reference:
        return cls(stats.expert_mask_TE(), stats.tokens_per_expert_E.clone(), stats.entropy.float().clone())

    def to(self, device: torch.device) -> _Reference:
        mask_TE = None if self.mask_TE is None else self.mask_TE.to(device)
        return _Reference(mask_TE, self.counts_E.to(device), self.entropy.to(device))

    def state(self) -> dict[str, Tensor | None]:
        return {"mask_TE": None if self.mask_TE is None else self.mask_TE.cpu(), "counts_E": self.counts_E.cpu(),
                "entropy": self.entropy.cpu()}

    @classmethod
    def from_state(cls, state: dict[str, Tensor | None]) -> _Reference:
        return cls(state["mask_TE"], state["counts_E"], state["entropy"])


class RoutingDriftMonitor(Callback):
    """Measure how far each MoE layer's routing of a fixed probe batch drifts from where training began; warn,
    stop or freeze the routers that drift.

    Works on any LightningModule whose MoE layers :func:`~lightning_moe.discovery.find_moe_layers` finds
    (ours, Hugging Face MoE blocks with their own gates or with routers put in by ``swap_routers``).

    **The probe** is a fixed ``(B, S)`` batch of token ids: ``probe_ids`` when given, else the first
    ``probe_size`` sequences of the first batch of the datamodule's ``val_dataloader()`` (or of the
    ``val_dataloaders`` given to ``fit``) with the last position dropped (next-token batches hold
    ``S + 1`` tokens and the model reads the first ``S``, as both of our LightningModules do). A batch is
    a tensor, a mapping with ``input_ids``, or a sequence whose first item is the ids. Rank 0's probe
    is broadcast to every rank, so all ranks measure the same tokens (their weights are the same).
    The probe runs through ``forward_fn(pl_module, ids_BS)`` (default ``pl_module(ids_BS)``: both
    ``MoELanguageModel`` and ``HFMoEFineTune`` take token ids) under ``torch.no_grad()``, every
    module in eval mode (no dropout, no router jitter; the modes are restored after) and the
    trainer's precision context.

    **The reference**: when training starts (``on_train_start``, after any checkpoint is restored), each
    layer's routing of the probe: every token's set of experts (its kept assignments; under top-k
    routing ``K`` experts, under expert choice any number), the load (kept assignments per expert)
    and the mean token entropy (rank 0's, broadcast). It is saved in checkpoints with the probe, so a
    resumed run keeps measuring against the original reference.

    **Measurements**: at the start of every training batch whose ``trainer.global_step`` is a positive
    multiple of ``every_n_steps`` (once per step under gradient accumulation), before the batch's
    forward (which overwrites the layers' routing records, so callbacks that read them after the
    batch see the batch's routing, not the probe's), each layer ``i`` gets:

    - ``changed_share``: the share of probe tokens whose expert set differs from the reference's, in
      [0, 1];
    - ``load_kl``: ``KL(current load ‖ reference load)`` in nats, each load the share of kept
      assignments per expert mixed with ``LOAD_SMOOTHING`` (1e-3) of the uniform share ``1/E`` so that
      an expert empty in one of them gives a finite value; 0 when the loads are equal;
    - ``entropy_change``: current minus reference mean token entropy (nats), signed: negative when
      the routers grew more confident.

    The values are averaged over ranks (identical but for floating-point noise), so every rank takes
    the same decisions. Nothing trained means every value exactly 0. Router state that training moves
    besides parameters counts too: a scorer with ``center_input=True`` routes the eval-mode probe
    against its running mean of the hidden states, which follows the training batches (and is 0
    before the first one: a model trained from scratch shows that jump at its first measurement).

    **Logged** with ``pl_module.log`` at every training batch after the first measurement, the last
    measurement's values (so whatever ``log_every_n_steps`` reads one): per layer
    ``{prefix}/layer{i}/<value>`` (``per_layer=True``), and over the layers measured
    ``{prefix}/max_changed_share``, ``{prefix}/mean_changed_share``, ``{prefix}/max_load_kl``,
    ``{prefix}/mean_load_kl``, ``{prefix}/max_abs_entropy_change``, ``{prefix}/drifted_layers`` (layers
    over a threshold at the last measurement) and ``{prefix}/frozen_layers``. With a
    :class:`~lightning.pytorch.loggers.TensorBoardLogger`, rank 0 also writes every
    ``image_every_n_measurements`` measurements ``{prefix}/changed_share_heatmap``: one row per layer,
    one column per measurement so far (its step under it), coloured by ``changed_share`` from 0 to 1.

    **Thresholds**: a layer *drifts* when ``changed_share > changed_share_threshold``, ``load_kl >
    load_kl_threshold`` or ``|entropy_change| > entropy_change_threshold`` (``None`` disables a test).
    The first time a layer drifts:

    - ``warn``: rank 0 warns (:class:`RoutingDriftWarning`) naming the layer, the step, its values and
      the thresholds crossed;
    - ``raise``: every rank raises :class:`RoutingDriftError` with the same report, stopping training;
    - ``freeze``: warns, then freezes the layer's router (``view.router_parameters()``) for the rest of
      the run: their gradients are dropped in ``on_before_optimizer_step`` (``grad = None``, before
      gradient clipping; PyTorch's optimizers leave a parameter without a gradient alone, weight
      decay and momentum included). ``requires_grad`` is left on, on purpose: DDP's reducer waits
      for a gradient of every parameter it was built with (it fails at the next step otherwise),
      and when the routers are all that trains (``HFMoEFineTune(train="routers")``) a loss without
      any parameter requiring grad cannot be back-propagated. DeepSpeed keeps gradients of its own,
      so ``freeze`` is refused there; FSDP is refused for every action (the probe runs outside its
      wrapper, on sharded parameters). Buffers are not parameters and keep moving: an
      expert bias that ``BiasOffsetUpdater`` updates, a centring scorer's running mean. Measuring
      goes on after a freeze: the layer's drift can still change, as the layers before it train.

    Each layer triggers once (``warned_at``: layer index -> the step it first drifted; ``warned_layers``
    its keys); the warned and frozen layers are saved in checkpoints and a resumed run re-freezes its
    frozen layers. ``measurement_steps`` and ``drift_history`` (``(M, L, 3)``: ``DRIFT_METRICS`` per
    layer, NaN for a layer the probe did not reach) hold every measurement; :meth:`measure` measures
    now (e.g. after ``fit``).

    Args:
        every_n_steps: optimizer steps between measurements, >= 1.
        probe_ids: the probe, a ``(B, S)`` tensor (or nested list) of non-negative token ids; ``None``
            takes it from the validation data. A resumed run keeps the probe of its checkpoint.
        probe_size: sequences taken from the validation batch, >= 1 (ignored with ``probe_ids``).
        changed_share_threshold: share of probe tokens with a changed expert set above which a layer
            drifts, in [0, 1), or ``None``. The default 0.5: most tokens go elsewhere.
        load_kl_threshold: load KL divergence (nats) above which a layer drifts, a finite number >= 0,
            or ``None``. The default 0.1: of 8 balanced experts, three quarters of one's load moved
            to another gives 0.08, all of it 0.17.
        entropy_change_threshold: absolute change of the mean token entropy (nats) above which a layer
            drifts, a finite number >= 0, or ``None``.
        action: ``warn``, ``raise`` or ``freeze``.
        prefix: name prefix of everything logged, a non-empty string without leading or trailing ``/``.
        per_layer: also log every layer's values.
        image_every_n_measurements: measurements between heatmaps, >= 0; 0 disables them.
        forward_fn: runs the probe, ``forward_fn(pl_module, ids_BS)``; ``None`` calls ``pl_module(ids_BS)``.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        probe_ids: Tensor | list[list[int]] | None = None,
        probe_size: int = 8,
        changed_share_threshold: float | None = 0.5,
        load_kl_threshold: float | None = 0.1,
        entropy_change_threshold: float | None = 0.5,
        action: DriftAction = "warn",
        prefix: str = "drift",
        per_layer: bool = True,
        image_every_n_measurements: int = 1,
        forward_fn: ForwardFn | None = None,
    ) -> None:
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        self.given_probe_ids = None if probe_ids is None else _check_probe_ids(probe_ids)
        self.probe_size = check_positive_int("probe_size", probe_size)
        self.changed_share_threshold = _check_threshold("changed_share_threshold", changed_share_threshold, 1.0)
        self.load_kl_threshold = _check_threshold("load_kl_threshold", load_kl_threshold)
        self.entropy_change_threshold = _check_threshold("entropy_change_threshold", entropy_change_threshold)
        self.action = check_choice("action", action, DRIFT_ACTIONS)
        self.prefix = check_prefix("prefix", prefix)
        self.per_layer = check_bool("per_layer", per_layer)
        self.image_every_n_measurements = check_non_negative_int("image_every_n_measurements",
                                                                 image_every_n_measurements)
        if forward_fn is not None and not callable(forward_fn):
            raise ValueError(f"`forward_fn` must be a callable (pl_module, ids_BS) or None, got {forward_fn!r}.")
        self.forward_fn = forward_fn
        self._views: list[MoELayerView] = []
        self.layer_names: list[str] = []  # the layers' names, discovery order
        self.probe_ids: Tensor | None = None  # (B, S) int64 on the CPU, once resolved
        self._reference: list[_Reference | None] | None = None  # CPU, as recorded or loaded
        self._device_reference: list[_Reference | None] = []
        self.reference_step: int | None = None
        self.last_measured_step: int | None = None
        self.measurement_steps: list[int] = []
        self._history: list[Tensor] = []  # (L, 3) float32 per measurement, CPU
        self.warned_at: dict[int, int] = {}  # layer index -> global step of its first drift
        self.frozen_layers: set[int] = set()
        self.drifted_layers: list[int] = []  # over a threshold at the last measurement
        self.images_logged = 0
        self._logged: dict[str, Tensor] = {}  # name -> 0-d tensor on the module's device, logged every batch

    @property
    @override
    def state_key(self) -> str:
        # Several monitors with different prefixes keep separate checkpoint states.
        return self._generate_state_key(prefix=self.prefix)

    @property
    def drift_history(self) -> Tensor:
        """``(M, L, 3)`` float32: every measurement's ``DRIFT_METRICS`` per layer (NaN: not reached)."""
        if not self._history:
            return torch.zeros(0, len(self.layer_names), len(DRIFT_METRICS))
        return torch.stack(self._history)

    @property
    def warned_layers(self) -> set[int]:
        """The layers that drifted (and were acted on) so far."""
        return set(self.warned_at)

    def latest(self) -> list[LayerDrift]:
        """The last measurement, one :class:`LayerDrift` per layer measured (empty before the first)."""
        return [] if not self._history else self._layer_drifts(self._history[-1])

    # -- hooks ----------------------------------------------------------------------------------

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._discover(pl_module)

    def _discover(self, pl_module: L.LightningModule) -> None:
        self._views = discover(pl_module, type(self).__name__)
        self.layer_names = [view.name for view in self._views]

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(trainer.strategy, FSDPStrategy):
            raise ValueError("RoutingDriftMonitor runs its probe through the LightningModule itself, outside FSDP's "
                             "wrapper, which would see sharded parameters: it does not support FSDPStrategy.")
        if self.action == "freeze" and isinstance(trainer.strategy, DeepSpeedStrategy):
            raise ValueError(f"RoutingDriftMonitor(action='freeze') drops the frozen routers' gradients before a "
                             f"PyTorch optimizer steps; {type(trainer.strategy).__name__} keeps gradients of its own: "
                             "use action='warn' or 'raise' there.")
        if self._reference is None:
            self.probe_ids = self._resolve_probe(trainer)
            self._record_reference(trainer, pl_module)
            self.reference_step = self.last_measured_step = trainer.global_step
        elif len(self._reference) != len(self._views):
            raise ValueError(f"RoutingDriftMonitor's checkpoint holds a reference of {len(self._reference)} MoE "
                             f"layers, but the model has {len(self._views)}: resume the model it was recorded on.")
        device = pl_module.device
        self._device_reference = [None if ref is None else ref.to(device) for ref in self._reference]
        for index in sorted(self.frozen_layers):
            self._freeze(index)
        if self._history:
            self._set_logged(self._history[-1], device)

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step != self.last_measured_step:
            self.last_measured_step = step
            self._measure_and_act(trainer, pl_module, step)
        for name, value in self._logged.items():
            pl_module.log(name, value, on_step=True, on_epoch=False)

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        for index in self.frozen_layers:
            for param in self._views[index].router_parameters():
                param.grad = None  # the optimizer skips it (and gradient clipping, which runs after this hook)

    # -- measuring ------------------------------------------------------------------------------

    @torch.no_grad()
    def measure(self, pl_module: L.LightningModule) -> list[LayerDrift]:
        """Run the probe through ``pl_module`` now and compare with the reference (this process only: no
        reduction over ranks, no logging, no action, nothing added to the history). E.g. after ``fit``."""
        if self._reference is None or self.probe_ids is None:
            raise RuntimeError("RoutingDriftMonitor.measure() needs the reference, recorded when training starts "
                               "(or loaded from a checkpoint): fit with the monitor first.")
        if not self._views:
            self._discover(pl_module)  # a monitor restored from a checkpoint, not fitted yet
        device = pl_module.device
        self._forward_probe(pl_module, self.probe_ids.to(device), None)
        references = [None if ref is None else ref.to(device) for ref in self._reference]
        return self._layer_drifts(_drift_rows(self._views, references, device).cpu())

    def _measure_and_act(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        assert self.probe_ids is not None
        device = pl_module.device
        self._forward_probe(pl_module, self.probe_ids.to(device), trainer)
        drift_L3 = trainer.strategy.reduce(_drift_rows(self._views, self._device_reference, device),
                                           reduce_op="mean")
        drift_L3 = drift_L3.cpu()  # one host transfer per measurement
        self.measurement_steps.append(step)
        self._history.append(drift_L3)
        layers = self._layer_drifts(drift_L3)
        crossed = {layer.index: self._crossed(layer) for layer in layers}
        self.drifted_layers = [index for index, reasons in crossed.items() if reasons]
        self._set_logged(drift_L3, device)
        self._maybe_write_heatmap(trainer, step)
        new = [layer for layer in layers if crossed[layer.index] and layer.index not in self.warned_at]
        if not new:
            return
        self.warned_at.update((layer.index, step) for layer in new)
        messages = [self._message(layer, crossed[layer.index], step) for layer in new]
        if self.action == "raise":
            raise RoutingDriftError(" ".join(messages))
        for layer, message in zip(new, messages, strict=True):
            if self.action == "freeze":
                count = self._freeze(layer.index)
                message += (f" Froze its router ({count} parameter tensor{'s' if count > 1 else ''}) for the rest "
                            "of the run." if count else " Its router has no parameters: nothing to freeze.")
            rank_zero_warn(message, category=RoutingDriftWarning)

    def _record_reference(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.probe_ids is not None
        self._forward_probe(pl_module, self.probe_ids.to(pl_module.device), trainer)
        states = [None if view.stats is None else _Reference.of(view.stats).state() for view in self._views]
        if all(state is None for state in states):
            raise ValueError("RoutingDriftMonitor: no MoE layer routed the probe batch; check `forward_fn`.")
        # Rank 0's reference for every rank (equal but for floating-point noise on accelerators).
        states = trainer.strategy.broadcast(states, src=0)
        self._reference = [None if state is None else _Reference.from_state(state) for state in states]

    def _forward_probe(self, pl_module: L.LightningModule, ids_BS: Tensor, trainer: L.Trainer | None) -> None:
        """Run the probe in eval mode without gradients; every module's mode is restored after."""
        modes = [(module, module.training) for module in pl_module.modules()]
        pl_module.eval()
        try:
            context = trainer.precision_plugin.val_step_context() if trainer is not None else nullcontext()
            with torch.no_grad(), context:
                if self.forward_fn is None:
                    pl_module(ids_BS)
                else:
                    self.forward_fn(pl_module, ids_BS)
        finally:
            for module, training in modes:
                module.training = training

    def _resolve_probe(self, trainer: L.Trainer) -> Tensor:
        """``probe_ids``, or the validation data's first sequences; rank 0's, on every rank."""
        ids_BS = self.given_probe_ids
        if ids_BS is None:
            ids_BS = _ids_of(_first_validation_batch(trainer))[: self.probe_size, :-1]
            if ids_BS.shape[1] == 0:
                raise ValueError("RoutingDriftMonitor: the validation batch's sequences hold one token; the probe "
                                 "needs two or more (the last is dropped). Pass `probe_ids`.")
        return trainer.strategy.broadcast(ids_BS.detach().long().cpu(), src=0)

    def _crossed(self, layer: LayerDrift) -> list[str]:
        """The thresholds ``layer`` crossed, as text (NaN values cross none)."""
        reasons = []
        if self.changed_share_threshold is not None and layer.changed_share > self.changed_share_threshold:
            reasons.append(f"changed_share {layer.changed_share:.3f} > {self.changed_share_threshold:g}")
        if self.load_kl_threshold is not None and layer.load_kl > self.load_kl_threshold:
            reasons.append(f"load_kl {layer.load_kl:.4f} > {self.load_kl_threshold:g}")
        limit = self.entropy_change_threshold
        if limit is not None and abs(layer.entropy_change) > limit:
            reasons.append(f"|entropy_change| {abs(layer.entropy_change):.3f} > {limit:g}")
        return reasons

    def _message(self, layer: LayerDrift, reasons: list[str], step: int) -> str:
        return (
            f"Routing drift in MoE layer {layer.index} ({layer.name}) at global step {step}: "
            f"{layer.changed_share:.1%} of the probe's tokens changed experts, load KL {layer.load_kl:.4f} nats, "
            f"token entropy {layer.entropy_change:+.3f} nats since step {self.reference_step} ({'; '.join(reasons)}). "
            f"`{self.prefix}/layer{layer.index}/...` logs it; this is reported once per layer."
        )

    def _layer_drifts(self, drift_L3: Tensor) -> list[LayerDrift]:
        rows = drift_L3.tolist()
        return [LayerDrift(i, name, *row) for i, (name, row) in enumerate(zip(self.layer_names, rows, strict=True))
                if not all(math.isnan(v) for v in row)]

    # -- acting and logging ---------------------------------------------------------------------

    def _freeze(self, index: int) -> int:
        """Freeze layer ``index``'s router (:meth:`on_before_optimizer_step` drops its gradients from now on);
        return its number of parameter tensors."""
        params = self._views[index].router_parameters()
        for param in params:
            param.grad = None  # anything accumulated before the freeze
        self.frozen_layers.add(index)
        return len(params)

    def _set_logged(self, drift_L3: Tensor, device: torch.device) -> None:
        """What every batch logs until the next measurement, moved to ``device`` in one copy."""
        values: dict[str, float] = {}
        layers = self._layer_drifts(drift_L3)
        if self.per_layer:
            for layer in layers:
                for name in DRIFT_METRICS:
                    value = getattr(layer, name)
                    if not math.isnan(value):
                        values[f"{self.prefix}/layer{layer.index}/{name}"] = value
        for name, summary in (("changed_share", "max_changed_share"), ("load_kl", "max_load_kl")):
            column = [getattr(layer, name) for layer in layers if not math.isnan(getattr(layer, name))]
            if column:
                values[f"{self.prefix}/{summary}"] = max(column)
                values[f"{self.prefix}/mean_{name}"] = sum(column) / len(column)
        entropy = [abs(layer.entropy_change) for layer in layers if not math.isnan(layer.entropy_change)]
        if entropy:
            values[f"{self.prefix}/max_abs_entropy_change"] = max(entropy)
        values[f"{self.prefix}/drifted_layers"] = float(len(self.drifted_layers))
        values[f"{self.prefix}/frozen_layers"] = float(len(self.frozen_layers))
        stacked = torch.tensor(list(values.values()), dtype=torch.float32).to(device)
        self._logged = dict(zip(values, stacked.unbind(), strict=True))

    def _maybe_write_heatmap(self, trainer: L.Trainer, step: int) -> None:
        every = self.image_every_n_measurements
        tensorboards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if every == 0 or not tensorboards or (len(self._history) - 1) % every != 0:
            return
        self.images_logged += 1
        if not trainer.is_global_zero:
            return
        changed_LM = self.drift_history[:, :, 0].T.numpy()
        image_HW3 = drift_heatmap(changed_LM, self.measurement_steps, title=f"{self.prefix}: changed share")
        for logger in tensorboards:
            logger.experiment.add_image(f"{self.prefix}/changed_share_heatmap", image_HW3, global_step=step,
                                        dataformats="HWC")

    # -- checkpoints ----------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "layer_names": list(self.layer_names),
            "probe_ids": self.probe_ids,
            "reference": None if self._reference is None else [None if r is None else r.state()
                                                                for r in self._reference],
            "reference_step": self.reference_step,
            "last_measured_step": self.last_measured_step,
            "measurement_steps": list(self.measurement_steps),
            "drift_history": self.drift_history if self._history else None,
            "warned_at": dict(sorted(self.warned_at.items())),
            "frozen_layers": sorted(self.frozen_layers),
            "drifted_layers": list(self.drifted_layers),
            "images_logged": self.images_logged,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.layer_names = list(state_dict["layer_names"])
        self.probe_ids = state_dict["probe_ids"]
        reference = state_dict["reference"]
        self._reference = None if reference is None else [None if r is None else _Reference.from_state(r)
                                                          for r in reference]
        self.reference_step = state_dict["reference_step"]
        self.last_measured_step = state_dict["last_measured_step"]
        self.measurement_steps = [int(s) for s in state_dict["measurement_steps"]]
        history = state_dict["drift_history"]
        self._history = [] if history is None else list(history.unbind())
        self.warned_at = {int(i): int(step) for i, step in state_dict["warned_at"].items()}
        self.frozen_layers = {int(i) for i in state_dict["frozen_layers"]}
        self.drifted_layers = [int(i) for i in state_dict.get("drifted_layers", [])]
        self.images_logged = int(state_dict.get("images_logged", 0))


# -- helpers ------------------------------------------------------------------------------------


def _drift_rows(views: list[MoELayerView], references: list[_Reference | None], device: torch.device) -> Tensor:
    """``(L, 3)`` float32 on ``device``: each layer's drift from its last forward (the probe's); NaN rows for
    layers without a reference or a record."""
    nan_3 = torch.full((len(DRIFT_METRICS),), math.nan, device=device)
    rows = []
    for view, ref in zip(views, references, strict=True):
        stats = view.stats
        rows.append(nan_3 if ref is None or stats is None else _drift_row(ref, stats).to(device))
    return torch.stack(rows)


def _drift_row(ref: _Reference, stats: RoutingStats) -> Tensor:
    """``(3,)`` float32: changed share, load KL and entropy change of ``stats`` against ``ref``."""
    device = stats.tokens_per_expert_E.device
    mask_TE = stats.expert_mask_TE()
    if mask_TE is None or ref.mask_TE is None or mask_TE.shape != ref.mask_TE.shape:
        changed = torch.tensor(math.nan, device=device)
    else:
        changed = (mask_TE != ref.mask_TE.to(device)).any(dim=-1).float().mean()
    p_E = _smoothed_share(stats.tokens_per_expert_E)
    q_E = _smoothed_share(ref.counts_E.to(device))
    load_kl = (p_E * (p_E / q_E).log()).sum()
    entropy_change = stats.entropy.float() - ref.entropy.to(device)
    return torch.stack([changed.float(), load_kl.float(), entropy_change])


def _smoothed_share(counts_E: Tensor) -> Tensor:
    """Load shares mixed with ``LOAD_SMOOTHING`` of the uniform share: every entry > 0, the sum 1."""
    counts_E = counts_E.double()
    share_E = counts_E / counts_E.sum().clamp_min(1.0)
    return (1.0 - LOAD_SMOOTHING) * share_E + LOAD_SMOOTHING / counts_E.numel()


def _first_validation_batch(trainer: L.Trainer) -> Any:
    """The first batch of the datamodule's ``val_dataloader()``, else of the trainer's validation loaders."""
    datamodule = trainer.datamodule
    loader: Any = None
    if datamodule is not None and type(datamodule).val_dataloader is not L.LightningDataModule.val_dataloader:
        loader = datamodule.val_dataloader()
    elif trainer.val_dataloaders is not None:
        loader = trainer.val_dataloaders
    if isinstance(loader, Mapping):
        loader = next(iter(loader.values()), None)
    elif isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    if loader is None:
        raise ValueError("RoutingDriftMonitor needs a probe batch: pass `probe_ids`, or fit with a datamodule that "
                         "has a val_dataloader() (or with `val_dataloaders`).")
    try:
        return next(iter(loader))
    except StopIteration:
        raise ValueError("RoutingDriftMonitor: the validation dataloader is empty; pass `probe_ids`.") from None


def _ids_of(batch: Any) -> Tensor:
    """The ``(B, S + 1)`` token ids of a batch: a tensor, ``batch["input_ids"]`` or ``batch[0]``."""
    ids = batch
    if isinstance(batch, Mapping):
        ids = batch.get("input_ids")
    elif isinstance(batch, (list, tuple)) and batch:
        ids = batch[0]
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point():
        raise ValueError("RoutingDriftMonitor takes its probe from the first validation batch, which must be a (B, S) "
                         "tensor of token ids, a mapping with 'input_ids' or a sequence starting with the ids; got "
                         f"{type(batch).__name__}. Pass `probe_ids`.")
    return ids


def _check_probe_ids(probe_ids: Tensor | list[list[int]]) -> Tensor:
    ids = probe_ids if isinstance(probe_ids, Tensor) else torch.as_tensor(probe_ids)
    if ids.dim() != 2 or ids.numel() == 0 or ids.is_floating_point() or ids.dtype == torch.bool or ids.min() < 0:
        raise ValueError(f"`probe_ids` must be a non-empty (B, S) tensor (or nested list) of token ids >= 0, got "
                         f"shape {tuple(ids.shape)} and dtype {ids.dtype}.")
    return ids.detach().long().cpu()


def _check_threshold(name: str, value: float | None, upper: float = math.inf) -> float | None:
    """``None``, or a number in ``[0, upper)`` (``[0, inf)``: finite and >= 0)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < upper \
            or not math.isfinite(value):
        valid = "a finite number >= 0" if upper == math.inf else f"a number in [0, {upper:g})"
        raise ValueError(f"`{name}` must be {valid} or None, got {value!r}.")
    return float(value)


def drift_heatmap(changed_LM: np.ndarray, steps: list[int], *, title: str = "changed share") -> np.ndarray:
    """A layer x measurement heatmap of changed shares in [0, 1], ``(H, W, 3)`` uint8 RGB.

    Row ``l`` is layer ``l``, column ``m`` the measurement at ``steps[m]`` (labelled under it); NaN
    cells (a layer not measured) are blank. Drawn with matplotlib's Agg canvas (no pyplot) at the
    load heatmap's size rules (:func:`~lightning_moe.callbacks.heatmap.heatmap_size_px`).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator

    num_layers, num_columns = changed_LM.shape
    if len(steps) != num_columns:
        raise ValueError(f"`steps` must hold one step per column ({num_columns}), got {len(steps)}.")
    height, width = heatmap_size_px(max(num_layers, 1), max(num_columns, 1))
    left, right, top, bottom = HEATMAP_MARGINS_PX
    figure = Figure(figsize=(width / HEATMAP_DPI, height / HEATMAP_DPI), dpi=HEATMAP_DPI)
    ax = figure.add_axes((left / width, bottom / height, 1 - (left + right) / width, 1 - (top + bottom) / height))
    cax = figure.add_axes(((width - right + 12) / width, bottom / height, 14 / width, 1 - (top + bottom) / height))
    image = ax.imshow(np.ma.masked_invalid(changed_LM), cmap="magma", vmin=0.0, vmax=1.0, aspect="auto",
                      interpolation="nearest")
    ax.set_xlabel("global step", fontsize=9)
    ax.set_ylabel("layer", fontsize=9)
    # Every column labelled while they are few, else about 10 evenly spaced.
    stride = 1 if num_columns <= 12 else math.ceil(num_columns / 10)
    columns = np.arange(0, num_columns, stride)
    ax.set_xticks(columns, labels=[str(steps[c]) for c in columns])
    ax.yaxis.set_major_locator(FixedLocator(range(0, num_layers, max(1, math.ceil(num_layers / 16)))))
    ax.tick_params(labelsize=8, length=2)
    colorbar = figure.colorbar(image, cax=cax)
    colorbar.set_label("changed share", fontsize=9)
    colorbar.ax.tick_params(labelsize=8)
    ax.set_title(f"{title} up to step {steps[-1]}" if steps else title, fontsize=10)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])
