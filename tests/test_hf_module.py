"""HFMoEFineTune on tiny random Hugging Face MoE models (no hub)."""

from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_moe.balancing.losses import SwitchAuxLoss
from lightning_moe.callbacks import BiasOffsetUpdater, DeadExpertDetector, RoutingEntropyLogger
from lightning_moe.discovery import find_moe_layers
from lightning_moe.routing import AttentionScorer, TopKRouter

transformers = pytest.importorskip("transformers", reason="install the `hf` extra: pip install -e '.[hf]'")

from lightning_moe.hf_module import HFMoEFineTune  # noqa: E402
from lightning_moe.integrations.hf_routers import RouterGate  # noqa: E402
from lightning_moe.layers import MoEConfig  # noqa: E402

QWEN2_MOE = dict(model_type="qwen2_moe", vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                 shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 num_experts=4, num_experts_per_tok=2, max_position_embeddings=32)
MIXTRAL = dict(model_type="mixtral", vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
               max_position_embeddings=32)
ROUTER = functools.partial(TopKRouter, top_k=2, expert_bias=True, scorer=functools.partial(AttentionScorer, d_key=8))
ADAMW = functools.partial(torch.optim.AdamW, lr=1e-2)


pytestmark = pytest.mark.usefixtures("one_thread")


def batches(num: int, fixed: bool = False) -> DataLoader:
    """``num`` batches of 4 dicts with ``input_ids`` (4, 13); all equal with ``fixed``."""
    ids = torch.randint(0, 64, (1 if fixed else num * 4, 13), generator=torch.Generator().manual_seed(0))
    rows = ids.expand(num * 4, -1) if fixed else ids
    return DataLoader([{"input_ids": row} for row in rows], batch_size=4)


def fit(module: L.LightningModule, steps: int, callbacks: list | None = None, logger=False, fixed: bool = False,  # noqa: ANN001
        ) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, logger=logger, callbacks=callbacks or [], log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1, limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(many workers|DeadExpertDetector|no `val_dataloader`).*")
        trainer.fit(module, batches(steps, fixed))
    return trainer


def snapshot(module: L.LightningModule) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def changed(before: dict[str, Tensor], module: L.LightningModule) -> set[str]:
    after = module.state_dict()
    assert after.keys() == before.keys()
    return {name for name, value in after.items() if not torch.equal(value, before[name])}


def test_train_routers_changes_only_the_routers_with_every_callback(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    module = HFMoEFineTune(
        config=QWEN2_MOE, train="routers", optimizer=ADAMW,
        moe=MoEConfig(router=ROUTER, balancers=[SwitchAuxLoss(0.01)]),
    )
    gates = [m for m in module.modules() if isinstance(m, RouterGate)]
    assert len(gates) == 2
    router_params = {n for n, p in module.named_parameters() if ".gate.router." in n}
    assert router_params and {n for n, p in module.named_parameters() if p.requires_grad} == router_params
    before = snapshot(module)

    logger = TensorBoardLogger(tmp_path, name="ft")
    callbacks = [RoutingEntropyLogger(image_every_n_steps=0), BiasOffsetUpdater(rate=1e-2),
                 DeadExpertDetector(window=2, threshold=1.0, action="warn")]
    fit(module, 3, callbacks, logger)

    diff = changed(before, module)
    buffers = ("expert_bias_E", "running_mean_D", "num_batches_tracked")  # bias offsets, centring
    assert diff == router_params | {n for n in before if n.endswith(buffers)}
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lm_loss", "train/aux_loss", "routing/layer0/token_entropy",
            "routing/layer1/token_entropy", "model/params_total", "model/params_trainable"} <= scalars
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert events.Scalars("model/params_trainable")[0].value == trainable
    assert events.Scalars("model/params_total")[0].value == sum(p.numel() for p in module.parameters())

    metrics = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False).validate(module, batches(1), verbose=False)[0]
    assert set(metrics) == {"val/loss"} and metrics["val/loss"] > 0


def test_train_lora_changes_only_adapters_and_routers() -> None:
    pytest.importorskip("peft")
    torch.manual_seed(0)
    module = HFMoEFineTune(config=MIXTRAL, train="lora", lora_r=4, optimizer=ADAMW, moe=MoEConfig(router=ROUTER))
    names = {n for n, _ in module.named_parameters()}
    lora = {n for n in names if "lora_" in n}
    routers = {n for n in names if ".gate.router." in n}
    assert lora and all(".q_proj." in n or ".v_proj." in n for n in lora)
    assert {n for n, p in module.named_parameters() if p.requires_grad} == lora | routers
    before = snapshot(module)

    fit(module, 3)
    diff = changed(before, module)
    assert routers <= diff and {n for n in lora if "lora_B" in n} <= diff
    centring = {n for n in before if n.endswith(("running_mean_D", "num_batches_tracked"))}  # the routers' buffers
    assert diff <= lora | routers | centring  # base weights, experts included, are bit-identical
    assert len(find_moe_layers(module)) == 2


def test_train_all_loss_falls_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    module = HFMoEFineTune(config={**MIXTRAL, "output_router_logits": True}, optimizer=ADAMW)  # the model's routers
    batch = next(iter(batches(1, fixed=True)))
    with torch.no_grad():
        first, aux = module._losses(batch)
    assert set(aux) == {"hf_aux_loss"} and aux["hf_aux_loss"] > 0
    fit(module, 20, fixed=True)
    with torch.no_grad():
        last, _ = module._losses(batch)
    assert float(last) < 0.5 * float(first)


def test_loads_a_local_directory(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**MIXTRAL)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    module = HFMoEFineTune(model=str(tmp_path), init_from_gate=True, train="routers", moe=MoEConfig(router=TopKRouter))
    assert module.model.training and len(find_moe_layers(module)) == 2
    assert module(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, 64)


def test_bad_arguments_raise_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"`train` must be one of \('all', 'routers', 'lora'\), got 'experts'"):
        HFMoEFineTune(config=MIXTRAL, train="experts")
    with pytest.raises(ValueError, match="exactly one of `model`"):
        HFMoEFineTune()
    with pytest.raises(ValueError, match="`config` must be a dict with a 'model_type'"):
        HFMoEFineTune(config={"vocab_size": 64})
    with pytest.raises(ValueError, match=r"`init_from_gate` acts on swapped routers: give `moe`"):
        HFMoEFineTune(config=MIXTRAL, init_from_gate=True)
    with pytest.raises(ValueError, match=r"`moe.num_experts` \(4\) is the Hugging Face model's own here"):
        HFMoEFineTune(config=MIXTRAL, moe=MoEConfig(num_experts=4, balancers=[SwitchAuxLoss()]))
    with pytest.raises(ValueError, match="`lora_r` must be an integer >= 1"):
        HFMoEFineTune(config=MIXTRAL, train="lora", lora_r=0)
    if "peft" in sys.modules or transformers.utils.is_peft_available():
        with pytest.raises(ValueError, match=r"`lora_target_modules` \['query'\] match no nn.Linear.*'q_proj'"):
            HFMoEFineTune(config=MIXTRAL, train="lora", lora_target_modules=["query"])
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match="train='lora' needs `peft`"):
        HFMoEFineTune(config=MIXTRAL, train="lora")
