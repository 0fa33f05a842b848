"""``MoELanguageModel``: the LightningModule that trains an ``MoETransformer`` on next-token loss."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_moe._validate import check_non_negative, check_positive_int
from lightning_moe._warnings import filter_known_warnings
from lightning_moe.callbacks.bias_offset_updater import warn_bias_without_updater
from lightning_moe.data.tokenizer import ByteTokenizer
from lightning_moe.layers.config import MoEConfig
from lightning_moe.models.attention import AttentionKind, MLAConfig
from lightning_moe.models.mtp import mtp_cross_entropies
from lightning_moe.models.transformer import MoETransformer, moved_to_moe_error
from lightning_moe.optim import WarmupCosineLR
from lightning_moe.parallel import (
    check_expert_parallel_size,
    expert_parallel_layers,
    gather_expert_optimizer_state,
    gather_expert_state_dict,
    moe_param_groups,
    reduce_expert_gradients,
    setup_expert_parallel,
    slice_expert_optimizer_state,
)

filter_known_warnings()


def is_plain(value: Any) -> bool:
    """Whether ``value`` is plain config (str, numbers, bools, None, and lists/dicts of them), which
    checkpoints can carry as hyperparameters and ``torch.load(weights_only=True)`` reads back."""
    if isinstance(value, (str, int, float, bool, type(None))):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    return False


def keep_plain_hparams(module: L.LightningModule) -> None:
    """Keep only plain config in ``module.hparams``, after ``save_hyperparameters``.

    Under LightningCLI the hyperparameters are the plain config (class paths and init args), which
    ``load_from_checkpoint`` rebuilds. Python objects (a router class, balancer instances, lambdas)
    are dropped so that checkpoints load with ``torch.load(weights_only=True)``; pass them again to
    ``load_from_checkpoint``. A :class:`~lightning_moe.layers.MoEConfig` keeps its plain fields, as a
    dict its owner turns back into a ``MoEConfig``.
    """
    for name, value in list(module.hparams.items()):
        if isinstance(value, (MoEConfig, MLAConfig)):
            module.hparams[name] = value.plain()
    module.remove_ignored_hparams([name for name, value in module.hparams.items() if not is_plain(value)])


def log_training_losses(module: L.LightningModule, lm_loss: Tensor, aux: dict[str, Tensor],
                        extra: Tensor | None = None) -> Tensor:
    """Log ``train/loss`` (``lm_loss`` plus every aux loss plus ``extra``, a weighted loss the caller
    logs itself: the optimised total), ``train/lm_loss`` and ``train/<name>`` of each aux loss; return
    the total."""
    loss = lm_loss + sum(aux.values()) + (0.0 if extra is None else extra)
    module.log("train/loss", loss, prog_bar=True)
    module.log("train/lm_loss", lm_loss)
    for name, value in aux.items():
        module.log(f"train/{name}", value)
    return loss


def log_sizes_once(module: L.LightningModule, metrics: dict[str, int], headline: str = "") -> None:
    """Print ``metrics`` and log them to every logger at step 0, from rank zero (call at fit start)."""
    rank_zero_info(headline + "  ".join(f"{name.removeprefix('model/')}={value:,}" for name, value in metrics.items()))
    if module.trainer.is_global_zero:
        for logger in module.loggers:
            logger.log_metrics(metrics, step=0)


#: The settings of our schedules that a resume takes from the command (restoring the scheduler would
#: otherwise bring back the saved ones).
_SCHEDULE_SETTINGS = ("warmup_steps", "total_steps", "min_lr_ratio")


def configure_optimization(module: L.LightningModule, params: Any) -> Any:
    """``module.optimizer(params)`` and, if ``module.lr_scheduler``, its scheduler stepped every optimizer
    step (a :class:`~lightning_moe.optim.WarmupCosineLR` without ``total_steps`` ends at the trainer's
    last step). Remembers the configured learning rates for :func:`apply_resumed_schedule`."""
    optimizer = module.optimizer(params)
    module._configured_groups = [{k: v for k, v in group.items() if k not in ("params", "initial_lr")}
                                 for group in optimizer.param_groups]
    module._configured_schedule = {}
    if module.lr_scheduler is None:
        return optimizer
    scheduler = module.lr_scheduler(optimizer)
    module._configured_schedule = {k: getattr(scheduler, k) for k in _SCHEDULE_SETTINGS if hasattr(scheduler, k)}
    if _auto_total_steps(module, scheduler):
        scheduler.total_steps = int(module.trainer.estimated_stepping_batches)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _auto_total_steps(module: L.LightningModule, scheduler: Any) -> bool:
    """Whether ``scheduler`` is a ``WarmupCosineLR`` configured without ``total_steps`` (it ends at the trainer's
    last step)."""
    return isinstance(scheduler, WarmupCosineLR) and module._configured_schedule.get("total_steps", 0) is None


def apply_resumed_schedule(module: L.LightningModule) -> None:
    """After resuming, follow this command's learning rate and ``max_steps`` rather than the checkpoint's.

    Restoring a checkpoint restores the optimizer's hyperparameters and the scheduler's state as they
    were saved; a resumed run that was given another ``model.optimizer.init_args.lr`` (or weight decay,
    betas...) or ``trainer.max_steps`` would silently keep the old ones. Here the scheduler's base rates
    become the configured ones (the current rate scaled alike), the other optimizer settings and a
    :class:`~lightning_moe.optim.WarmupCosineLR`'s ``warmup_steps``/``total_steps``/``min_lr_ratio`` are
    the configured ones, and an automatic cosine schedule ends at the new last step; one line says what
    changed. Other schedulers keep their saved state. Nothing changes when the command matches the
    checkpoint, so such a resume stays bit-exact.
    """
    trainer = module.trainer
    configured_groups = getattr(module, "_configured_groups", None)
    if trainer.ckpt_path is None or not configured_groups or not trainer.optimizers:
        return
    optimizer = trainer.optimizers[0]
    scheduler = trainer.lr_scheduler_configs[0].scheduler if trainer.lr_scheduler_configs else None
    notes = []
    for i, (group, configured) in enumerate(zip(optimizer.param_groups, configured_groups, strict=False)):
        lr, saved = configured["lr"], group.get("initial_lr", group["lr"])
        if not math.isclose(saved, lr, rel_tol=1e-9, abs_tol=0.0):
            if scheduler is not None and hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs[i] = lr
                group["initial_lr"] = lr
            group["lr"] = group["lr"] * lr / saved if saved else lr
            notes.append(f"learning rate {saved:g} -> {lr:g} (group {i})")
        for key, value in configured.items():  # weight_decay, betas, eps...: restored with the state
            if key != "lr" and key in group and group[key] != value and not isinstance(value, Tensor):
                notes.append(f"{key} {group[key]} -> {value} (group {i})")
                group[key] = value
    if isinstance(scheduler, WarmupCosineLR):
        auto = _auto_total_steps(module, scheduler)
        for key, value in module._configured_schedule.items():
            if key == "total_steps" and auto:
                continue
            if getattr(scheduler, key) != value:
                notes.append(f"{key} {getattr(scheduler, key)} -> {value}")
                setattr(scheduler, key, value)
        total = int(trainer.estimated_stepping_batches)
        if auto and scheduler.total_steps != total:
            notes.append(f"cosine schedule ends at step {total} (was {scheduler.total_steps})")
            scheduler.total_steps = total
        if notes:
            factor = scheduler._factor(scheduler.last_epoch)
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=False):
                group["lr"] = base * factor
    if notes:
        rank_zero_info(f"Resumed from {trainer.ckpt_path} with this command's schedule: " + "; ".join(notes) + ".")


class MoELanguageModel(L.LightningModule):
    """A decoder-only MoE language model; loss = next-token cross-entropy + every aux loss.

    What the MoE layers are made of is one :class:`~lightning_moe.layers.MoEConfig` (``moe``), so
    YAML or the command line chooses the router, balancers, dispatcher and experts
    (``--model.moe.router.top_k 1``, ``--model.moe.dispatcher loop``). The router is a factory:
    the model calls ``router(d_model, num_experts)`` for each MoE layer, so widths are never
    repeated in YAML.

    Logs once, when fitting starts, the model's size to every logger at step 0:
    ``model/params_total``, ``model/params_active`` (per token), ``model/params_expert`` (all
    routed experts) and ``model/flops_per_token`` (forward, at ``max_seq_len``; see
    :meth:`~lightning_moe.models.MoETransformer.flops_per_token`), and prints them. Logs
    ``train/lm_loss``, ``train/loss`` (the optimised total), ``train/<balancer name>``
    (summed over layers), ``val/loss`` (cross-entropy only, comparable with the dense
    baseline) and ``val/<balancer name>``.

    Args:
        vocab_size: vocabulary size (linked to the data module's by the CLI).
        max_seq_len: longest sequence (linked to the data module's ``seq_len`` by the CLI).
        d_model, n_layers, n_heads, d_ff, moe_every, first_dense_layers, attention, mla, rope_base,
            tie_embeddings: see :class:`~lightning_moe.models.MoETransformer`; ``moe_every=0`` is the
            dense baseline, ``attention: mla`` DeepSeek-V2/V3's multi-head latent attention sized by
            ``mla`` (:class:`~lightning_moe.models.MLAConfig`).
        mtp_depth: DeepSeek-V3's multi-token prediction modules K, >= 0 (0: none). The loss adds
            ``mtp_weight * mean_k CE_k``; logs ``train/mtp_loss`` (the unweighted mean) and
            ``train/mtp_loss_<k>`` per depth, and ``val/``/``test/`` alike (``val/loss`` stays the main
            model's cross-entropy). Schedule λ with ``ZLossScheduler(balancer="mtp_loss")``.
        mtp_weight: λ, >= 0.
        moe: the MoE layers: experts, router, balancers (``None``: ``[SwitchAuxLoss(0.01),
            ZLoss(0.001)]``), capacity, dispatcher, fine-grained and shared experts, expert
            parallelism (:class:`~lightning_moe.layers.MoEConfig`). With
            ``moe.expert_parallel_size`` P > 1 the routed experts are built without storage and
            :meth:`setup` allocates each rank's ``E / P`` experts only
            (:func:`~lightning_moe.parallel.setup_expert_parallel`), after checking that P divides
            the number of processes; every expert starts from its global index, so the model is
            the one P = 1 builds for the same seed and no rank holds all experts. Tokens reach
            their experts by a dropless all-to-all; under DDP the expert gradients are averaged over the ranks
            holding the same experts, under DeepSpeed its engine does it (use
            :class:`~lightning_moe.parallel.MoEDeepSpeedStrategy`). Checkpoints load at any
            expert-parallel size: under ``moe_ddp``
            (:class:`~lightning_moe.parallel.MoEDDPStrategy`) each rank writes and reads its own
            expert rows (a sharded directory; :func:`~lightning_moe.parallel.load_full_state_dict`
            joins it offline); under plain ``ddp`` the whole expert tensors are gathered into one
            file, which needs the whole model to fit on a rank.
        optimizer: optimizer factory, called with the parameters.
        lr_scheduler: LR scheduler factory, called with the optimizer and stepped every
            optimizer step; ``None`` keeps the LR constant.
        upcycle_from: a checkpoint (``.ckpt``) of a *dense* ``MoELanguageModel`` (``moe_every=0``)
            with the same widths: when fitting starts from scratch, its weights are loaded and
            every MoE layer's experts are upcycled from the dense FFN of the same block
            (:func:`~lightning_moe.upcycling.upcycle_state_dict`): copies of it with
            ``granularity=1`` (``moe.expert_d_ff`` = the dense ``d_ff``), fine-grained slices of
            it with ``granularity=m`` (``moe.expert_d_ff`` = the dense ``d_ff``, split into m).
            Resuming with ``ckpt_path`` restores the MoE checkpoint instead.
        upcycle_noise: relative noise added to every upcycled expert weight, >= 0 (0 keeps the
            dense model's function exactly for copies with renormalised top-k gates).
        upcycle_seed: seed of that noise.
        generate_max_new_tokens: tokens ``predict`` generates after each prompt, >= 1.
        generate_temperature: sampling temperature of ``predict``, >= 0; 0 is greedy (the most likely
            token each step: the same text every run).
        generate_top_k: ``predict`` samples among the ``generate_top_k`` most likely tokens, >= 1;
            ``None`` samples from the whole vocabulary. (Not the router's ``top_k``.)

    ``predict`` (:meth:`predict_step`) continues the data module's prompts with
    :meth:`~lightning_moe.models.MoETransformer.generate` and returns ``{"prompt", "text"}`` per prompt;
    :class:`~lightning_moe.callbacks.GeneratedTextWriter` prints and saves them.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        max_seq_len: int = 128,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        d_ff: int = 512,
        moe: MoEConfig = MoEConfig(),  # noqa: B008 - copied below; a default instance lists its fields in --help
        moe_every: int = 1,
        first_dense_layers: int = 0,
        attention: AttentionKind = "mha",
        mla: MLAConfig = MLAConfig(),  # noqa: B008 - read only with attention="mla"; a default lists its fields
        rope_base: float = 10000.0,
        tie_embeddings: bool = True,
        mtp_depth: int = 0,
        mtp_weight: float = 0.3,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        upcycle_from: str | None = None,
        upcycle_noise: float = 0.0,
        upcycle_seed: int = 0,
        generate_max_new_tokens: int = 200,
        generate_temperature: float = 0.8,
        generate_top_k: int | None = 50,
        **flat: Any,
    ) -> None:
        if flat:
            raise moved_to_moe_error(type(self).__name__, flat)
        super().__init__()
        if isinstance(moe, dict):  # the plain part saved in a checkpoint's hyperparameters
            moe = MoEConfig(**moe)
        if isinstance(mla, dict):
            mla = MLAConfig(**mla)
        moe = MoEConfig() if moe is None else replace(moe)  # a copy: balancers=None resolves per model, and
        # the shared default instance is never changed
        self.save_hyperparameters(ignore=["flat"])
        keep_plain_hparams(self)
        self.model = MoETransformer(vocab_size, max_seq_len=max_seq_len, d_model=d_model, n_layers=n_layers,
                                    n_heads=n_heads, d_ff=d_ff, moe=moe, moe_every=moe_every,
                                    first_dense_layers=first_dense_layers, attention=attention, mla=mla,
                                    rope_base=rope_base, tie_embeddings=tie_embeddings, mtp_depth=mtp_depth,
                                    mtp_weight=mtp_weight)
        self.expert_parallel_size = moe.expert_parallel_size
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.upcycle_from = upcycle_from
        self.upcycle_noise = check_non_negative("upcycle_noise", upcycle_noise)
        self.upcycle_seed = upcycle_seed
        self._upcycled = False
        self.generate_max_new_tokens = check_positive_int("generate_max_new_tokens", generate_max_new_tokens)
        self.generate_temperature = check_non_negative("generate_temperature", generate_temperature)
        if generate_top_k is not None:
            check_positive_int("generate_top_k", generate_top_k)
        self.generate_top_k = generate_top_k

    def forward(self, ids_BS: Tensor) -> Tensor:
        return self.model(ids_BS)

    def size_metrics(self) -> dict[str, int]:
        """Total, active and routed-expert parameters and forward FLOPs per token."""
        counts = self.model.parameter_counts()
        metrics = {"model/params_total": counts["total"], "model/params_active": counts["active"],
                   "model/params_expert": counts["expert"], "model/flops_per_token": self.model.flops_per_token(),
                   "model/kv_cache_per_token": self.model.kv_cache_per_token()}
        if counts["mtp"]:
            metrics["model/params_mtp"] = counts["mtp"]
        return metrics

    def upcycle(self, dense_checkpoint: str) -> None:
        """Load a dense ``MoELanguageModel`` checkpoint's weights and upcycle its FFNs into this
        model's experts (``split`` when ``granularity > 1``, else ``copy``). Under expert
        parallelism, once sharded (:meth:`setup` calls this after sharding), each rank writes its
        own experts only, with the noise P = 1 gives them
        (:func:`~lightning_moe.upcycling.upcycle_state_dict`)."""
        from lightning_moe.upcycling import upcycle_state_dict

        if not Path(dense_checkpoint).is_file():
            raise FileNotFoundError(f"`upcycle_from`: no dense checkpoint at {dense_checkpoint!r}.")
        state = torch.load(dense_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        method = "split" if self.model.granularity > 1 else "copy"
        upcycle_state_dict(self.model, state, method, self.upcycle_noise, self.upcycle_seed, prefix="model.")
        self._upcycled = True
        rank_zero_info(f"Upcycled from {dense_checkpoint} ({method}, noise {self.upcycle_noise}).")

    def setup(self, stage: str) -> None:
        """Expert parallelism: check the process count, create the groups and shard the experts,
        on every rank, before the strategy wraps the model (DDP then leaves the expert parameters
        to :meth:`on_before_optimizer_step`); each rank allocates its own experts only. Upcycling
        (``upcycle_from``) runs next, when fitting starts from scratch: each rank fills its own
        experts from the dense checkpoint."""
        if self.expert_parallel_size > 1:
            check_expert_parallel_size(self.expert_parallel_size, self.trainer.world_size)
            self._ddp_params_and_buffers_to_ignore = setup_expert_parallel(self)
        # After Lightning chose a `ckpt_path`: resuming an upcycled run continues it.
        if stage == "fit" and self.upcycle_from is not None and self.trainer.ckpt_path is None and not self._upcycled:
            self.upcycle(self.upcycle_from)
        if stage == "fit" and self.trainer.world_size == 1:
            # Lightning's model summary counts the real FLOPs of one sequence's forward (in eval mode, so no
            # running statistics move; the RNG is restored in on_fit_start). Only on one process: the summary
            # runs on rank 0 alone, and a forward with collectives (expert parallelism) would wait for the others.
            self.example_input_array = torch.zeros(1, self.model.max_seq_len, dtype=torch.long)
            self._rng_before_summary = (torch.random.get_rng_state(),
                                        torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # DeepSpeed reduces the expert gradients itself; DDP was told to leave them alone.
        if self._torch_expert_parallel():
            reduce_expert_gradients(self)

    def _torch_expert_parallel(self) -> bool:
        """Sharded over torch groups (DDP): Lightning checkpoints the optimizer, not DeepSpeed."""
        return any(layer.expert_parallel is not None and layer.expert_parallel.backend == "torch"
                   for _, layer in expert_parallel_layers(self))

    def _strategy_writes_expert_shards(self) -> bool:
        """Whether the strategy writes each rank's expert rows itself (``writes_expert_shards``:
        :class:`~lightning_moe.parallel.MoEDDPStrategy`), so nothing is gathered."""
        trainer = self._trainer
        return trainer is not None and getattr(trainer.strategy, "writes_expert_shards", False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._strategy_writes_expert_shards():
            return  # each rank writes its own expert rows, weights and optimizer state
        # Whole expert tensors (gathered from the expert-parallel group): loadable at any size.
        gather_expert_state_dict(self, checkpoint["state_dict"])
        if self._torch_expert_parallel():
            if not getattr(self, "_warned_gathered_checkpoint", False):
                self._warned_gathered_checkpoint = True
                rank_zero_warn("This checkpoint gathers every expert onto each rank (plain `ddp`): it needs the "
                               "whole model to fit on one rank. `--trainer.strategy moe_ddp` (MoEDDPStrategy) writes "
                               "sharded checkpoints instead, each rank its own experts.")
            for state in checkpoint.get("optimizer_states", []):
                gather_expert_optimizer_state(self, state)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Whole expert tensors (a gathered checkpoint) are resliced to this rank's rows by each MoELayer's load
        # hook, the optimizer state here (a sharded checkpoint arrives with this rank's rows: nothing to slice);
        # either way the saved parameter groups take this model's expert-parallel group names.
        for state in checkpoint.get("optimizer_states", []):
            slice_expert_optimizer_state(self, state)

    def on_fit_start(self) -> None:
        rng = self.__dict__.pop("_rng_before_summary", None)
        if rng is not None:  # the summary's forward (a random router draws in eval too) leaves no trace
            cpu, cuda = rng
            torch.random.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
            self.example_input_array = None
        log_sizes_once(self, self.size_metrics())
        warn_bias_without_updater(self.trainer, self)

    def on_train_start(self) -> None:
        apply_resumed_schedule(self)

    def _losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], list[Tensor]]:
        """The main cross-entropy, the aux losses and each MTP depth's cross-entropy (``[]`` without MTP)."""
        ids_BS1 = batch["input_ids"]
        if self.model.mtp_depth:
            logits_BSV, mtp_logits = self.model.forward_with_mtp(ids_BS1)
        else:
            logits_BSV, mtp_logits = self.model(ids_BS1[:, :-1]), []
        lm_loss = F.cross_entropy(logits_BSV.flatten(0, 1).float(), ids_BS1[:, 1:].flatten())
        return lm_loss, self.model.aux_losses(), mtp_cross_entropies(mtp_logits, ids_BS1)

    def _mtp_term(self, mtp_losses: list[Tensor], prefix: str) -> Tensor | None:
        """Log ``<prefix>/mtp_loss`` (mean over depths) and ``<prefix>/mtp_loss_<k>``; return λ times the mean."""
        if not mtp_losses:
            return None
        mean = torch.stack(mtp_losses).mean()
        sync = prefix != "train"
        self.log(f"{prefix}/mtp_loss", mean, sync_dist=sync)
        for k, value in enumerate(mtp_losses, start=1):
            self.log(f"{prefix}/mtp_loss_{k}", value, sync_dist=sync)
        return self.model.mtp_weight.coeff * mean

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        lm_loss, aux, mtp_losses = self._losses(batch)
        return log_training_losses(self, lm_loss, aux, self._mtp_term(mtp_losses, "train"))

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: dict[str, Tensor], prefix: str) -> None:
        lm_loss, aux, mtp_losses = self._losses(batch)
        self.log(f"{prefix}/loss", lm_loss, prog_bar=True, sync_dist=True)
        for name, value in aux.items():
            self.log(f"{prefix}/{name}", value, sync_dist=True)
        self._mtp_term(mtp_losses, prefix)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """``{"prompt": str, "text": str, "index": int}`` (``index``: the prompt's place in the data):
        ``generate_max_new_tokens`` tokens generated after one prompt
        (``batch["input_ids"]``, ``(1, n)``, cut to the last ``max_seq_len`` tokens as it grows), decoded with
        the data module's tokenizer; ``text`` is the continuation alone."""
        ids_1S = batch["input_ids"]
        if ids_1S.ndim != 2 or ids_1S.shape[0] != 1:
            raise ValueError(f"predict_step continues one prompt per batch, input_ids of shape (1, n); got "
                             f"{tuple(ids_1S.shape)}. Use TextDataModule's predict_dataloader (batch size 1).")
        out_1T = self.model.generate(ids_1S, self.generate_max_new_tokens, temperature=self.generate_temperature,
                                     top_k=self.generate_top_k)
        text = self._predict_tokenizer().decode(out_1T[0, ids_1S.shape[1]:].tolist())
        return {"prompt": batch["prompt"], "text": text, "index": int(batch.get("index", batch_idx))}

    def _predict_tokenizer(self) -> Any:
        """The data module's tokenizer, else bytes; its vocabulary must be the model's."""
        try:
            datamodule = getattr(self.trainer, "datamodule", None)
        except RuntimeError:  # not attached to a Trainer
            datamodule = None
        tokenizer = getattr(datamodule, "tokenizer", None) or ByteTokenizer()
        vocab_size = self.model.lm_head.out_features
        if tokenizer.vocab_size != vocab_size:
            raise ValueError(f"The tokenizer decoding predictions ({type(tokenizer).__name__}) has a vocabulary of "
                             f"{tokenizer.vocab_size}, the model {vocab_size}: predict with the data module (and "
                             "`data.tokenizer`) the model was trained with.")
        return tokenizer

    def configure_optimizers(self) -> Any:
        # Routed experts in their own group(s): DeepSpeed's ZeRO needs that under expert parallelism, and
        # the same groups at every expert-parallel size let optimizer state reshard with the weights.
        return configure_optimization(self, moe_param_groups(self))
