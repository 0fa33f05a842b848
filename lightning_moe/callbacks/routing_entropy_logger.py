"""``RoutingEntropyLogger``: routing entropy, expert load balance and dropped tokens of every MoE layer.

Legend: ``E`` experts, ``L`` MoE layers.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from lightning_moe._validate import check_non_negative_int
from lightning_moe.callbacks._utils import discover
from lightning_moe.discovery import MoELayerView
from lightning_moe.metrics import DroppedFraction, ExpertLoad, RoutingEntropy, load_summary

# Names of the routing values, per layer and overall, in logging order.
ROUTING_VALUES = ("token_entropy", "load_entropy", "max_share", "min_share", "load_cv", "dropped_fraction")
HEATMAP_COLORMAP = "coolwarm"
HEATMAP_MIN_CELL_PX = 8
HEATMAP_MAX_CELL_PX = 32
HEATMAP_TARGET_PX = 256


class _LayerMetrics:
    """The three routing metrics of one layer, updated, computed and reset together."""

    def __init__(self, num_experts: int) -> None:
        self.entropy = RoutingEntropy()
        self.load = ExpertLoad(num_experts)
        self.dropped = DroppedFraction()

    def all(self) -> tuple[RoutingEntropy, ExpertLoad, DroppedFraction]:
        return self.entropy, self.load, self.dropped


class RoutingEntropyLogger(Callback):
    """Log how every MoE layer routes: token entropy, load balance and dropped assignments.

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

    With a :class:`~lightning.pytorch.loggers.TensorBoardLogger` among the trainer's loggers,
    every ``image_every_n_steps`` optimizer steps (``trainer.global_step``; also at the first
    training batch) rank 0 additionally writes, from the counts summed over ranks:

    - ``{prefix}/layer{i}/expert_load``: a histogram with one bucket per expert (bucket ``e``
      covers ``(e - 0.5, e + 0.5]``, its count is the tokens expert ``e`` kept in that batch);
    - ``{prefix}/load_heatmap``: an image with one row per layer and one column per expert,
      coloured by load share relative to the uniform share ``1/E`` (``coolwarm``: blue = no
      tokens, neutral = fair share, red = twice the fair share or more; black pads layers with
      fewer experts).

    ``train_batches`` / ``val_batches`` count the batches logged and ``images_logged`` the image
    steps; they, and the step of the last images, are saved in checkpoints, so a resumed run does
    not repeat the images of the step it resumed at.

    Args:
        prefix: name prefix of everything logged, a non-empty string without leading or
            trailing ``/``.
        per_layer: also log every layer's values (``{prefix}/layer{i}/...``).
        log_validation: also log after every validation batch under ``val_{prefix}``.
        image_every_n_steps: optimizer steps between histograms and heatmaps, >= 0; 0 disables
            them.
    """

    def __init__(
        self,
        prefix: str = "routing",
        per_layer: bool = True,
        log_validation: bool = False,
        image_every_n_steps: int = 100,
    ) -> None:
        if not isinstance(prefix, str) or not prefix or prefix.strip("/") != prefix:
            raise ValueError(f"`prefix` must be a non-empty string without leading or trailing '/', got {prefix!r}.")
        self.prefix = prefix
        if not isinstance(per_layer, bool):
            raise ValueError(f"`per_layer` must be a bool, got {per_layer!r}.")
        self.per_layer = per_layer
        if not isinstance(log_validation, bool):
            raise ValueError(f"`log_validation` must be a bool, got {log_validation!r}.")
        self.log_validation = log_validation
        self.image_every_n_steps = check_non_negative_int("image_every_n_steps", image_every_n_steps)
        self._views: list[MoELayerView] = []
        self._metrics: list[_LayerMetrics] = []
        self.train_batches = 0
        self.val_batches = 0
        self.images_logged = 0
        self.last_image_step: int | None = None

    @property
    def state_key(self) -> str:
        # Several instances with different prefixes keep separate checkpoint states.
        return f"{type(self).__qualname__}{{'prefix': {self.prefix!r}}}"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._views = discover(pl_module, type(self).__name__)
        self._metrics = [_LayerMetrics(view.num_experts) for view in self._views]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        every = self.image_every_n_steps
        tensorboards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        images = (
            every > 0 and bool(tensorboards) and step != self.last_image_step
            and (self.last_image_step is None or step % every == 0)
        )
        layers = self._log_routing(pl_module, self.prefix, keep_counts=images)
        self.train_batches += 1
        if not images or not layers:
            return
        self.last_image_step = step
        self.images_logged += 1
        if trainer.is_global_zero:
            for logger in tensorboards:
                self._write_images(logger, layers, step)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.log_validation or trainer.sanity_checking:
            return
        self._log_routing(pl_module, f"val_{self.prefix}", keep_counts=False)
        self.val_batches += 1

    def _log_routing(self, pl_module: L.LightningModule, prefix: str,
                     keep_counts: bool) -> list[tuple[int, Tensor, Tensor | None]]:
        """Update, compute (across ranks), reset and log every layer; return ``(i, share_E, counts_E)``."""
        layers: list[tuple[int, Tensor, Tensor | None]] = []
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
            share_E = metrics.load.compute()
            dropped_fraction = metrics.dropped.compute()
            counts_E = None
            if keep_counts:
                with metrics.load.sync_context():
                    counts_E = metrics.load.tokens_per_expert_E.clone()
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
            layers.append((i, share_E, counts_E))
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

    def _write_images(self, logger: TensorBoardLogger, layers: list[tuple[int, Tensor, Tensor | None]],
                      step: int) -> None:
        experiment = logger.experiment
        for i, _, counts_E in layers:
            assert counts_E is not None
            counts = counts_E.detach().cpu().double()
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
        image_HWC = load_heatmap([share_E for _, share_E, _ in layers])
        experiment.add_image(f"{self.prefix}/load_heatmap", image_HWC, global_step=step, dataformats="HWC")

    def state_dict(self) -> dict[str, Any]:
        return {
            "train_batches": self.train_batches,
            "val_batches": self.val_batches,
            "images_logged": self.images_logged,
            "last_image_step": self.last_image_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_batches = int(state_dict["train_batches"])
        self.val_batches = int(state_dict["val_batches"])
        self.images_logged = int(state_dict["images_logged"])
        last = state_dict["last_image_step"]
        self.last_image_step = None if last is None else int(last)


def load_heatmap(shares: list[Tensor]) -> np.ndarray:
    """A layer x expert RGB image of load shares, ``(H, W, 3)`` uint8.

    Cell ``(l, e)`` is coloured by ``share * E_l / 2`` clipped to [0, 1] with the ``coolwarm``
    colormap: blue = no load, neutral = the uniform share ``1/E_l``, red = twice it or more.
    Layers with fewer experts than the widest are padded with black. Each cell is upscaled
    (nearest) to a square block of 8 to 32 pixels.

    Args:
        shares: one ``(E_l,)`` load-share vector per layer.
    """
    import matplotlib  # colormaps only: no pyplot figure is made

    if not shares:
        raise ValueError("`shares` must hold at least one layer's load shares.")
    num_layers = len(shares)
    width = max(int(s.numel()) for s in shares)
    relative_LE = np.full((num_layers, width), np.nan)
    for row, share_E in enumerate(shares):
        share = share_E.detach().cpu().double().numpy()
        relative_LE[row, : share.size] = np.clip(share * share.size / 2.0, 0.0, 1.0)
    colormap = matplotlib.colormaps[HEATMAP_COLORMAP].with_extremes(bad="black")
    rgba_LE4 = colormap(np.ma.masked_invalid(relative_LE), bytes=True)
    cell = max(HEATMAP_MIN_CELL_PX, min(HEATMAP_MAX_CELL_PX, HEATMAP_TARGET_PX // max(num_layers, width)))
    rgb = np.ascontiguousarray(rgba_LE4[..., :3])
    return np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)
