"""``RoutingMonitor``: routing entropy, expert load balance, dropped tokens and collapse of every MoE layer.

``RoutingEntropyLogger`` is its former name, kept as an alias (also in YAML class paths).

Legend: ``E`` experts, ``L`` MoE layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_moe._validate import check_bool, check_non_negative_int, check_prefix
from lightning_moe.callbacks._utils import adopt_former_state, discover
from lightning_moe.callbacks.heatmap import load_heatmap
from lightning_moe.discovery import MoELayerView
from lightning_moe.metrics import DroppedFraction, ExpertLoad, RoutingEntropy, load_summary

# Names of the routing values, per layer and overall, in logging order.
ROUTING_VALUES = ("token_entropy", "load_entropy", "max_share", "min_share", "load_cv", "dropped_fraction")


class RoutingCollapseWarning(UserWarning):
    """Warned on rank 0 by :class:`RoutingMonitor`, once per layer, when a layer's routing collapses."""


@dataclass(frozen=True)
class _LayerRouting:
    """One layer's routing of a batch, all ranks together (tensors on the layer's device)."""

    index: int
    name: str
    counts_E: Tensor  # int64 kept assignments per expert
    num_tokens: Tensor  # int64 scalar: tokens routed
    share_E: Tensor  # share of the kept assignments per expert
    token_entropy: Tensor  # nats
    load_entropy: Tensor  # normalised, in [0, 1]


@dataclass(frozen=True)
class _Collapse:
    """A collapsed layer: its most-reached expert and why it counts as collapsed."""

    index: int
    name: str
    expert: int
    token_fraction: float
    share: float
    reasons: list[str]


class _LayerMetrics:
    """The three routing metrics of one layer, updated, computed and reset together."""

    def __init__(self, num_experts: int) -> None:
        self.entropy = RoutingEntropy()
        self.load = ExpertLoad(num_experts)
        self.dropped = DroppedFraction()

    def all(self) -> tuple[RoutingEntropy, ExpertLoad, DroppedFraction]:
        return self.entropy, self.load, self.dropped


class RoutingMonitor(Callback):
    """Log how every MoE layer routes (token entropy, load balance, dropped assignments) and flag collapse.

    Works on any LightningModule whose MoE layers :func:`~lightning_moe.discovery.find_moe_layers`
    finds (ours or Hugging Face MoE blocks). After every training batch (and every validation
    batch with ``log_validation=True``, under ``val_{prefix}``) each layer's
    :class:`~lightning_moe.layers.RoutingStats` of that batch goes through torchmetrics metrics
    (:mod:`lightning_moe.metrics`) whose ``compute()`` sums over all ranks, so every logged value
    describes the whole global batch. Values are logged per step with ``pl_module.log``
    (``on_step=True, on_epoch=False``); every logger receives them.

    Per layer ``i`` (index in discovery order), as ``{prefix}/layer{i}/<name>``, and overall as
    ``{prefix}/<name>``:

    - ``token_entropy``: mean over tokens of the entropy (nats) of each token's router scores.
      High (up to ``log E``) when routers are indecisive and spread each token's score over many
      experts; low (down to 0) when each token is confidently sent to few experts. It says
      nothing about balance across tokens.
    - ``load_entropy``: entropy of the layer's expert load shares divided by ``log E``, in
      [0, 1]: 1 is perfectly balanced, 0 means one expert took every assignment.
    - ``max_share`` / ``min_share``: the largest / smallest expert's share of the kept
      assignments; both ``1/E`` when balanced; ``min_share`` 0 flags an expert that got nothing.
    - ``load_cv``: coefficient of variation (population std / mean) of the per-expert load: 0 is
      balanced, ``sqrt(E - 1)`` is everything on one expert.
    - ``dropped_fraction``: share of the router's assignments dropped by expert capacity
      (0 for dropless routing).
    - ``{aux name}`` (e.g. ``aux_loss``, ``z_loss``): the layer's auxiliary losses of the batch
      (already scaled by their coefficients), averaged over ranks with ``sync_dist=True``.

    Overall values are the mean over layers, except ``max_share`` (the maximum over layers) and
    ``min_share`` (the minimum). ``per_layer=False`` logs only the overall values.

    Collapse alert (training batches only; ``collapse_alert=False`` turns it off). A layer is
    *collapsed* at a training batch (all ranks together, ``trainer.global_step`` at least
    ``collapse_warmup_steps``) when any of these holds:

    - one expert reaches at least ``collapse_token_fraction`` of the batch's tokens: its kept
      assignments divided by the tokens routed (a token reaches an expert at most once). Its
      *share* of the kept assignments cannot show this under top-k routing: an expert in every
      token's top-k holds only ``1/K`` of them. The test is skipped for layers where a perfectly
      balanced router already reaches that fraction with every expert (``K / E`` at least
      ``collapse_token_fraction``, K the kept assignments per token; e.g. ``K = E``);
    - its ``load_entropy`` is below ``collapse_load_entropy`` (0 disables);
    - its ``token_entropy`` is below ``collapse_token_entropy`` nats (0, the default, disables:
      a confident, healthy router has low token entropy too, so use it only with a threshold
      known to be abnormal for the run).

    Layers with one expert, or that kept no assignment, never count. The tests read one global
    batch: with only tens of tokens per batch, chance alone can push one expert past
    ``collapse_token_fraction``; raise it (or the warm-up) for such runs. Every training batch logs:

    - ``{prefix}/collapsed_layers``: the number of collapsed layers (0 when none).

    The first time a layer collapses, rank 0 warns (:class:`RoutingCollapseWarning`) naming the
    layer, the global step, the expert reaching the most tokens with its token fraction and its
    share, and the criteria met. Each layer is warned about once; the warned layers are saved in
    checkpoints, so a resumed run does not warn again.

    With a :class:`~lightning.pytorch.loggers.TensorBoardLogger` among the trainer's loggers,
    every ``image_every_n_steps`` optimizer steps (``trainer.global_step``; also at the first
    training batch) rank 0 additionally writes, from the counts summed over ranks:

    - ``{prefix}/layer{i}/expert_load``: a histogram with one bucket per expert (bucket ``e``
      covers ``(e - 0.5, e + 0.5]``, its count is the tokens expert ``e`` kept in that batch);
    - ``{prefix}/load_heatmap``: a chart (:func:`load_heatmap`) with one row per layer (labelled
      ``i`` as in ``{prefix}/layer{i}``) and one column per expert, coloured by load share relative
      to the uniform share ``1/E`` (``coolwarm``: blue = no tokens, neutral grey = fair share, red
      = twice the fair share or more; hatched blank cells pad layers with fewer experts), each
      cell's share printed in percent while the cells are large enough to read, a colour bar and
      the step in the title. It takes ~0.1-0.3 s to draw (matplotlib's Agg canvas).

    ``train_batches`` / ``val_batches`` count the batches logged and ``images_logged`` the image
    steps; they, and the step of the last images, are saved in checkpoints, so a resumed run does
    not repeat the images of the step it resumed at. ``collapsed_layers`` holds the indices of the
    layers collapsed at the last training batch and ``warned_layers`` those already warned about.

    Args:
        prefix: name prefix of everything logged, a non-empty string without leading or
            trailing ``/``.
        per_layer: also log every layer's values (``{prefix}/layer{i}/...``).
        log_validation: also log after every validation batch under ``val_{prefix}``.
        image_every_n_steps: optimizer steps between histograms and heatmaps, >= 0; 0 disables
            them.
        collapse_alert: log ``collapsed_layers`` and warn on collapse.
        collapse_token_fraction: fraction of the tokens one expert must reach for collapse, in
            (0, 1], or ``None`` to disable the test. The default 0.9 flags an expert in the
            top-k of 90% of the tokens.
        collapse_load_entropy: normalised load entropy under which a layer is collapsed, in
            [0, 1]; 0 disables the test.
        collapse_token_entropy: token entropy (nats) under which a layer is collapsed, a finite
            number >= 0; 0 (the default) disables the test.
        collapse_warmup_steps: no layer counts as collapsed before this ``trainer.global_step``,
            >= 0.
    """

    def __init__(
        self,
        prefix: str = "routing",
        per_layer: bool = True,
        log_validation: bool = False,
        image_every_n_steps: int = 100,
        collapse_alert: bool = True,
        collapse_token_fraction: float | None = 0.9,
        collapse_load_entropy: float = 0.5,
        collapse_token_entropy: float = 0.0,
        collapse_warmup_steps: int = 0,
    ) -> None:
        self.prefix = check_prefix("prefix", prefix)
        self.per_layer = check_bool("per_layer", per_layer)
        self.log_validation = check_bool("log_validation", log_validation)
        self.image_every_n_steps = check_non_negative_int("image_every_n_steps", image_every_n_steps)
        self.collapse_alert = check_bool("collapse_alert", collapse_alert)
        if collapse_token_fraction is not None and not _is_number_in(collapse_token_fraction, 0.0, 1.0, open_low=True):
            raise ValueError(
                f"`collapse_token_fraction` must be a number in (0, 1] or None, got {collapse_token_fraction!r}."
            )
        self.collapse_token_fraction = None if collapse_token_fraction is None else float(collapse_token_fraction)
        if not _is_number_in(collapse_load_entropy, 0.0, 1.0):
            raise ValueError(f"`collapse_load_entropy` must be a number in [0, 1], got {collapse_load_entropy!r}.")
        self.collapse_load_entropy = float(collapse_load_entropy)
        if not _is_number_in(collapse_token_entropy, 0.0, math.inf):
            raise ValueError(
                f"`collapse_token_entropy` must be a finite number >= 0, got {collapse_token_entropy!r}."
            )
        self.collapse_token_entropy = float(collapse_token_entropy)
        self.collapse_warmup_steps = check_non_negative_int("collapse_warmup_steps", collapse_warmup_steps)
        self._views: list[MoELayerView] = []
        self._metrics: list[_LayerMetrics] = []
        self.train_batches = 0
        self.val_batches = 0
        self.images_logged = 0
        self.last_image_step: int | None = None
        self.collapsed_layers: list[int] = []
        self.warned_layers: set[int] = set()

    @property
    @override
    def state_key(self) -> str:
        # Several instances with different prefixes keep separate checkpoint states.
        return self._generate_state_key(prefix=self.prefix)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._views = discover(pl_module, type(self).__name__)
        self._metrics = [_LayerMetrics(view.num_experts) for view in self._views]

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        every = self.image_every_n_steps
        tensorboards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        images = (
            every > 0 and bool(tensorboards) and step != self.last_image_step
            and (self.last_image_step is None or step % every == 0)
        )
        layers = self._log_routing(pl_module, self.prefix)
        self.train_batches += 1
        if self.collapse_alert:
            self._alert_collapse(pl_module, layers, step)
        if not images or not layers:
            return
        self.last_image_step = step
        self.images_logged += 1
        if trainer.is_global_zero:
            for logger in tensorboards:
                self._write_images(logger, layers, step)

    @override
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.log_validation or trainer.sanity_checking:
            return
        self._log_routing(pl_module, f"val_{self.prefix}")
        self.val_batches += 1

    def _log_routing(self, pl_module: L.LightningModule, prefix: str) -> list[_LayerRouting]:
        """Update, compute (across ranks), reset and log every layer; return what each layer did."""
        layers: list[_LayerRouting] = []
        values: dict[str, list[Tensor]] = {name: [] for name in ROUTING_VALUES}
        aux_values: dict[str, list[Tensor]] = {}
        for i, (view, metrics) in enumerate(zip(self._views, self._metrics, strict=True)):
            stats = view.stats
            if stats is None:
                continue
            device = stats.tokens_per_expert_E.device
            for metric in metrics.all():
                if metric.device != device:
                    metric.to(device)
                metric.update(stats)
            token_entropy = metrics.entropy.compute()
            dropped_fraction = metrics.dropped.compute()
            # One gather of the load metric's sums gives the counts and tokens of all ranks, from
            # which come the shares (ExpertLoad.compute()'s formula), the histograms and the
            # collapse alert's token fractions (counts / tokens: exact, unlike share * K, which
            # needs K and breaks once capacity drops assignments).
            with metrics.load.sync_context():
                counts_E = metrics.load.tokens_per_expert_E.clone()
                num_tokens = metrics.load.num_tokens.clone()
            share_E = counts_E.float() / counts_E.sum().clamp_min(1).float()
            for metric in metrics.all():
                metric.reset()
            layer = {"token_entropy": token_entropy, **load_summary(share_E), "dropped_fraction": dropped_fraction}
            aux = {name: value.detach() for name, value in view.aux_losses.items()}
            for name in ROUTING_VALUES:
                values[name].append(layer[name])
            for name, value in aux.items():
                aux_values.setdefault(name, []).append(value.float())
            if self.per_layer:
                for name in ROUTING_VALUES:
                    pl_module.log(f"{prefix}/layer{i}/{name}", layer[name], on_step=True, on_epoch=False)
                for name, value in aux.items():
                    pl_module.log(f"{prefix}/layer{i}/{name}", value, on_step=True, on_epoch=False, sync_dist=True)
            layers.append(_LayerRouting(index=i, name=view.name, counts_E=counts_E, num_tokens=num_tokens,
                                        share_E=share_E, token_entropy=token_entropy,
                                        load_entropy=layer["load_entropy"]))
        if not layers:
            return layers
        log_device = pl_module.device  # layers may sit on different devices (pipeline / model parallel)
        for name, per_layer in values.items():
            stacked = torch.stack([value.to(log_device) for value in per_layer])
            overall = stacked.max() if name == "max_share" else stacked.min() if name == "min_share" else stacked.mean()
            pl_module.log(f"{prefix}/{name}", overall, on_step=True, on_epoch=False)
        for name, per_layer in aux_values.items():
            overall = torch.stack([value.to(log_device) for value in per_layer]).mean()
            pl_module.log(f"{prefix}/{name}", overall, on_step=True, on_epoch=False, sync_dist=True)
        return layers

    def _alert_collapse(self, pl_module: L.LightningModule, layers: list[_LayerRouting], step: int) -> None:
        """Log ``{prefix}/collapsed_layers`` and warn about every layer collapsed for the first time."""
        collapses = self._find_collapses(layers, pl_module.device) if step >= self.collapse_warmup_steps else []
        self.collapsed_layers = [collapse.index for collapse in collapses]
        pl_module.log(f"{self.prefix}/collapsed_layers", float(len(collapses)), on_step=True, on_epoch=False)
        for collapse in collapses:
            if collapse.index not in self.warned_layers:
                # Every rank holds the same sums, so every rank records the layer; rank 0 warns.
                self.warned_layers.add(collapse.index)
                rank_zero_warn(self._collapse_message(collapse, step), category=RoutingCollapseWarning)

    def _find_collapses(self, layers: list[_LayerRouting], device: torch.device) -> list[_Collapse]:
        """The collapsed layers among ``layers``, read with one host transfer."""
        if not layers:
            return []
        rows = torch.stack([_collapse_row(layer).to(device) for layer in layers]).tolist()
        collapses = []
        for layer, (expert, fraction, share, per_token, load_entropy, token_entropy) in zip(layers, rows, strict=True):
            num_experts = layer.counts_E.numel()
            if num_experts < 2 or per_token <= 0:
                continue
            reasons = self._collapse_reasons(num_experts, fraction, per_token, load_entropy, token_entropy)
            if reasons:
                collapses.append(_Collapse(layer.index, layer.name, int(expert), fraction, share, reasons))
        return collapses

    def _collapse_reasons(self, num_experts: int, fraction: float, per_token: float, load_entropy: float,
                          token_entropy: float) -> list[str]:
        """The collapse criteria a layer meets, as text; ``per_token`` is its kept assignments per token."""
        reasons = []
        limit = self.collapse_token_fraction
        if limit is not None and per_token / num_experts < limit <= fraction:
            reasons.append(f"token fraction {fraction:.3f} >= collapse_token_fraction={limit}")
        if load_entropy < self.collapse_load_entropy:
            reasons.append(f"load entropy {load_entropy:.3f} < collapse_load_entropy={self.collapse_load_entropy}")
        if token_entropy < self.collapse_token_entropy:
            reasons.append(
                f"token entropy {token_entropy:.3f} nats < collapse_token_entropy={self.collapse_token_entropy}"
            )
        return reasons

    def _collapse_message(self, collapse: _Collapse, step: int) -> str:
        return (
            f"Routing collapse in MoE layer {collapse.index} ({collapse.name}) at global step {step}: expert "
            f"{collapse.expert} reaches {collapse.token_fraction:.1%} of the tokens and holds {collapse.share:.1%} "
            f"of the kept assignments ({'; '.join(collapse.reasons)}). `{self.prefix}/collapsed_layers` counts "
            "the collapsed layers at every training batch; this warning is given once per layer."
        )

    def _write_images(self, logger: TensorBoardLogger, layers: list[_LayerRouting], step: int) -> None:
        experiment = logger.experiment
        for layer in layers:
            i = layer.index
            counts = layer.counts_E.detach().cpu().double()
            total = float(counts.sum())
            if total <= 0:
                continue
            experts = torch.arange(counts.numel(), dtype=torch.float64)
            used = torch.nonzero(counts > 0).flatten()
            experiment.add_histogram_raw(
                f"{self.prefix}/layer{i}/expert_load",
                min=float(used.min()),
                max=float(used.max()),
                num=total,
                sum=float((experts * counts).sum()),
                sum_squares=float((experts.square() * counts).sum()),
                bucket_limits=(experts + 0.5).tolist(),
                bucket_counts=counts.tolist(),
                global_step=step,
            )
        image_HWC = load_heatmap([layer.share_E for layer in layers], [layer.index for layer in layers], step,
                                 title=f"{self.prefix}: expert load")
        experiment.add_image(f"{self.prefix}/load_heatmap", image_HWC, global_step=step, dataformats="HWC")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "train_batches": self.train_batches,
            "val_batches": self.val_batches,
            "images_logged": self.images_logged,
            "last_image_step": self.last_image_step,
            "collapse_warned_layers": sorted(self.warned_layers),
        }

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Checkpoints written before the rename keyed the state by the former class name.
        adopt_former_state(checkpoint, self.state_key, f"RoutingEntropyLogger{{'prefix': {self.prefix!r}}}")

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_batches = int(state_dict["train_batches"])
        self.val_batches = int(state_dict["val_batches"])
        self.images_logged = int(state_dict["images_logged"])
        last = state_dict["last_image_step"]
        self.last_image_step = None if last is None else int(last)
        # Checkpoints written before the collapse alert have no warned layers.
        self.warned_layers = {int(i) for i in state_dict.get("collapse_warned_layers", [])}


#: The former name (the callback logs load, drops and heatmaps as well as entropy); still valid in
#: YAML as ``class_path: lightning_moe.callbacks.RoutingEntropyLogger``.
RoutingEntropyLogger = RoutingMonitor


def _is_number_in(value: Any, low: float, high: float, open_low: bool = False) -> bool:
    """Whether ``value`` is a (non-bool) finite number in ``[low, high]`` (``(low, high]`` with ``open_low``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return (low < value if open_low else low <= value) and value <= high


def _collapse_row(layer: _LayerRouting) -> Tensor:
    """``(6,)`` float32: most-reached expert, its token fraction and share, kept per token, load and token entropy.

    float32, not float64, which some accelerators (MPS) lack.
    """
    counts_E = layer.counts_E.float()
    kept = counts_E.sum()
    tokens = layer.num_tokens.float().clamp_min(1.0)
    expert = counts_E.argmax()
    return torch.stack([
        expert.float(), counts_E[expert] / tokens, counts_E[expert] / kept.clamp_min(1.0), kept / tokens,
        layer.load_entropy.float(), layer.token_entropy.float(),
    ])
