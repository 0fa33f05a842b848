"""``HFMoEFineTune``: fine-tune a Hugging Face MoE causal LM, optionally with our routers in place of its gates.

Legend: ``B`` batch, ``S`` sequence length, ``V`` vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_moe._validate import check_positive_float, check_positive_int
from lightning_moe.discovery import find_moe_layers
from lightning_moe.integrations.hf_routers import swap_routers
from lightning_moe.layers.config import MoEConfig
from lightning_moe.layers.record import total_aux_losses
from lightning_moe.module import (
    apply_resumed_schedule,
    configure_optimization,
    keep_plain_hparams,
    log_sizes_once,
    log_training_losses,
)

TRAIN_MODES = ("all", "routers", "lora")


class HFMoEFineTune(L.LightningModule):
    """A Hugging Face MoE causal LM trained on next-token loss, with our routers if asked.

    The model is ``model`` (a local directory or a hub name, loaded with
    ``AutoModelForCausalLM.from_pretrained``; the hub is reached only for a hub name) or, for
    experiments, ``config`` (``{"model_type": "mixtral", ...}``, built with random weights from
    ``AutoConfig.for_model``). With ``router`` set, :func:`~lightning_moe.integrations.hf_routers.swap_routers`
    replaces the gate of every MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3 in the
    ``transformers`` 5.x layout) with that router, and the loss adds its ``balancers``' losses;
    the model's own router aux loss is then off (``output_router_logits=False``; it read the
    gates that are gone). With ``router=None`` the model keeps its gates, and its own aux loss
    (``router_aux_loss_coef * aux_loss``) is added when its config has ``output_router_logits=True``.

    ``train`` chooses what learns: ``all`` every parameter; ``routers`` only the routers (ours, or
    the model's gates with ``router=None``), everything else frozen; ``lora`` LoRA adapters
    (``peft``) on ``lora_target_modules`` plus the routers. Our callbacks (``RoutingEntropyLogger``,
    ``BiasOffsetUpdater`` with ``expert_bias=True`` routers, ``DeadExpertDetector``) find the
    blocks themselves.

    Logs, when fitting starts, ``model/params_total`` and ``model/params_trainable`` (to every
    logger at step 0, and printed); per step ``train/loss`` (the optimised total),
    ``train/lm_loss`` and ``train/<balancer name>`` (summed over layers; ``train/hf_aux_loss``
    for the model's own); ``val/loss`` (cross-entropy only).

    Args:
        model: local path or hub name of a pre-trained causal LM; exactly one of ``model`` and
            ``config`` is given.
        config: keyword arguments of ``AutoConfig.for_model``, ``model_type`` included, for a
            randomly initialised model (seed first for reproducible weights).
        moe: the routers to swap in (:class:`~lightning_moe.layers.MoEConfig`'s routing part:
            ``router``, a factory called as ``router(d_model, num_experts)`` per MoE block;
            ``balancers``, ``None`` meaning ``[SwitchAuxLoss(0.01), ZLoss(0.001)]`` as for our
            models; ``capacity``, ``None`` dropless). The experts are the model's, so the other
            fields must keep their defaults. ``None`` keeps the model's own routers.
        init_from_gate: start each swapped router from the gate's weights (routers with a
            ``LinearScorer``; see ``swap_routers``).
        train: ``all``, ``routers`` or ``lora``.
        lora_target_modules: module names LoRA adapts (``train="lora"``); the defaults are the
            query and value projections of most families (DeepSeek-V3's attention has
            ``q_proj`` or ``q_a_proj``/``q_b_proj``, and ``kv_a_proj_with_mqa``, ``kv_b_proj``).
        lora_r: LoRA rank, >= 1.
        lora_alpha: LoRA scale numerator, > 0.
        lora_dropout: dropout on the LoRA input, in [0, 1).
        model_kwargs: extra keyword arguments of ``from_pretrained`` / ``from_config`` (e.g.
            ``{"dtype": "bfloat16", "experts_implementation": "eager"}``).
        optimizer: optimizer factory, called with the trainable parameters.
        lr_scheduler: LR scheduler factory, stepped every optimizer step; ``None`` keeps the LR.
    """

    def __init__(
        self,
        model: str | None = None,
        config: dict[str, Any] | None = None,
        moe: MoEConfig | None = None,
        init_from_gate: bool = False,
        train: Literal["all", "routers", "lora"] = "all",
        lora_target_modules: Sequence[str] = ("q_proj", "v_proj"),
        lora_r: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        model_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if isinstance(moe, dict):  # the plain part saved in a checkpoint's hyperparameters
            moe = MoEConfig(**moe)
        _check_args(model, config, moe, init_from_gate, train, lora_target_modules, lora_r, lora_alpha, lora_dropout)
        self.save_hyperparameters()
        keep_plain_hparams(self)  # as MoELanguageModel does
        self.train_setting = train
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        hf_model = _load_model(model, config, model_kwargs or {})
        self.swapped = moe is not None
        if self.swapped:
            swap_routers(hf_model, moe.router, moe.layer_balancers(), init_from_gate=init_from_gate,
                         capacity=moe.capacity)
        # The routers train as they were built: a part built frozen (a pre-trained extractor) stays frozen.
        router_params = [(p, p.requires_grad) for module in _router_modules(hf_model) for p in module.parameters()]
        if train == "lora":
            hf_model = _with_lora(hf_model, list(lora_target_modules), lora_r, lora_alpha, lora_dropout)
        if train == "routers":
            hf_model.requires_grad_(False)
        if train != "all":  # peft froze every base parameter for "lora"
            for param, trainable in router_params:
                param.requires_grad_(trainable)
        self.model = hf_model.train()  # from_pretrained returns the model in eval mode

    # -- steps ----------------------------------------------------------------------------------

    def forward(self, ids_BS: Tensor) -> Tensor:
        """``(B, S)`` token ids -> ``(B, S, V)`` logits."""
        return self._run(ids_BS).logits

    def _run(self, ids_BS: Tensor) -> Any:
        return self.model(input_ids=ids_BS, use_cache=False)

    def _losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        ids_BS1 = batch["input_ids"]
        out = self._run(ids_BS1[:, :-1])
        logits_BSV = out.logits
        lm_loss = F.cross_entropy(logits_BSV.flatten(0, 1).float(), ids_BS1[:, 1:].flatten())
        return lm_loss, self._aux_losses(out)

    def _aux_losses(self, out: Any) -> dict[str, Tensor]:
        """Our routers' aux losses summed over layers, or the model's own (``router=None``)."""
        aux = total_aux_losses(self.model)
        hf_aux = getattr(out, "aux_loss", None)
        if not self.swapped and isinstance(hf_aux, Tensor):
            aux["hf_aux_loss"] = float(getattr(self.model.config, "router_aux_loss_coef", 1.0)) * hf_aux
        return aux

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return log_training_losses(self, *self._losses(batch))

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        lm_loss, _ = self._losses(batch)
        self.log("val/loss", lm_loss, prog_bar=True, sync_dist=True)

    # -- set-up ---------------------------------------------------------------------------------

    def size_metrics(self) -> dict[str, int]:
        """Total and trainable parameters."""
        params = list(self.model.parameters())
        return {"model/params_total": sum(p.numel() for p in params),
                "model/params_trainable": sum(p.numel() for p in params if p.requires_grad)}

    def on_fit_start(self) -> None:
        vocab = getattr(self.trainer.datamodule, "vocab_size", None)
        embeddings = self.model.get_input_embeddings().num_embeddings
        if vocab is not None and vocab > embeddings:
            raise ValueError(f"The data's tokenizer has {vocab} tokens but the model embeds {embeddings}: give the "
                             "data module the model's tokenizer (`tokenizer`), or a model with a larger `vocab_size`.")
        log_sizes_once(self, self.size_metrics(), headline=f"train={self.train_setting!r}: ")

    def configure_optimizers(self) -> Any:
        return configure_optimization(self, [p for p in self.parameters() if p.requires_grad])

    def on_train_start(self) -> None:
        apply_resumed_schedule(self)


def _check_args(model: str | None, config: dict | None, moe: MoEConfig | None, init_from_gate: bool, train: str,
                lora_target_modules: Sequence[str], lora_r: int, lora_alpha: float, lora_dropout: float) -> None:
    """Every constructor check, each error naming its parameter, before anything is loaded."""
    if (model is None) == (config is None):
        raise ValueError("Give exactly one of `model` (a local path or hub name) and `config` "
                         f"(a dict with 'model_type'); got model={model!r}, config={config!r}.")
    if model is not None and not isinstance(model, str):
        raise ValueError(f"`model` must be a local path or hub name (str), got {type(model).__name__}.")
    if config is not None and not (isinstance(config, dict) and isinstance(config.get("model_type"), str)):
        raise ValueError(f"`config` must be a dict with a 'model_type' (e.g. 'mixtral'), got {config!r}.")
    if train not in TRAIN_MODES:
        raise ValueError(f"`train` must be one of {TRAIN_MODES}, got {train!r}.")
    if moe is None and init_from_gate:
        raise ValueError("`init_from_gate` acts on swapped routers: give `moe` (its `router`) too.")
    if moe is not None:
        defaults = MoEConfig()
        for name in ("num_experts", "expert_d_ff", "granularity", "num_shared_experts", "shared_expert_gate",
                     "expert_parallel_size", "dispatcher"):
            if getattr(moe, name) != getattr(defaults, name):
                raise ValueError(f"`moe.{name}` ({getattr(moe, name)!r}) is the Hugging Face model's own here; only "
                                 "`moe.router`, `moe.balancers` and `moe.capacity` apply to swapped routers.")
    targets = lora_target_modules
    if isinstance(targets, str) or not targets or not all(isinstance(m, str) for m in targets):
        raise ValueError(f"`lora_target_modules` must be a non-empty list of module names, got {targets!r}.")
    check_positive_int("lora_r", lora_r)
    check_positive_float("lora_alpha", lora_alpha)
    if not (isinstance(lora_dropout, (int, float)) and 0.0 <= lora_dropout < 1.0):
        raise ValueError(f"`lora_dropout` must be in [0, 1), got {lora_dropout!r}.")


def _load_model(model: str | None, config: dict[str, Any] | None, model_kwargs: dict[str, Any]) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    if model is not None:
        return AutoModelForCausalLM.from_pretrained(model, **model_kwargs)
    settings = dict(config)
    hf_config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    return AutoModelForCausalLM.from_config(hf_config, **model_kwargs)


def _router_modules(model: nn.Module) -> list[nn.Module]:
    """The gate of every MoE block (our ``RouterGate`` after a swap, else the model's own)."""
    return [view.module.gate for view in find_moe_layers(model)]


def _with_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("train='lora' needs `peft`: pip install peft") from err
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(f"`lora_target_modules` {missing} match no nn.Linear of {type(model).__name__}; "
                         f"its linear layers are named {sorted(names)}.")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)
