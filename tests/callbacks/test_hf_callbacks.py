"""The callbacks on Hugging Face MoE models inside a plain LightningModule (random init, no hub)."""

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from lightning_moe.balancing import bias_update
from lightning_moe.callbacks import BiasOffsetUpdater, DeadExpertDetector, RoutingEntropyLogger
from lightning_moe.discovery import find_moe_layers

transformers = pytest.importorskip("transformers", reason="install the `hf` extra: pip install -e '.[hf]'")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


class HFCausalLM(L.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, ids: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def mixtral() -> torch.nn.Module:
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
    )
    return transformers.MixtralForCausalLM(config)


def deepseek_v3() -> torch.nn.Module:
    config = transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=32,
    )
    return transformers.DeepseekV3ForCausalLM(config)


def fit(module: L.LightningModule, callbacks: list, steps: int, logger=False) -> L.Trainer:  # noqa: ANN001
    trainer = L.Trainer(max_steps=steps, logger=logger, callbacks=callbacks, log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1)
    ids = torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(0))
    trainer.fit(module, DataLoader(ids, batch_size=8))
    return trainer


def test_entropy_logger_on_mixtral_writes_scalars_histograms_and_heatmap(tmp_path: Path) -> None:
    torch.manual_seed(0)
    logger = TensorBoardLogger(tmp_path, name="hf")
    fit(HFCausalLM(mixtral()), [RoutingEntropyLogger(image_every_n_steps=2)], steps=4, logger=logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0}).Reload()
    tags = events.Tags()
    for i in range(2):
        assert f"routing/layer{i}/token_entropy" in tags["scalars"]
        assert f"routing/layer{i}/expert_load" in tags["histograms"]
    assert {"routing/token_entropy", "routing/load_entropy", "routing/load_cv"} <= set(tags["scalars"])
    assert "routing/load_heatmap" in tags["images"]
    entropy = [e.value for e in events.Scalars("routing/token_entropy")]
    assert len(entropy) == 4 and all(0 < v <= torch.log(torch.tensor(4.0)).item() + 1e-6 for v in entropy)
    histogram = events.Histograms("routing/layer0/expert_load")[-1].histogram_value
    assert sum(histogram.bucket) == pytest.approx(8 * 16 * 2)  # tokens x top-k of one step


def test_dead_expert_revival_on_mixtral() -> None:
    torch.manual_seed(0)
    module = HFCausalLM(mixtral())
    # threshold=1: every expert under its fair share counts as dead, so the window surely has some.
    detector = DeadExpertDetector(window=2, threshold=1.0, action="revive", noise=0.0)
    fit(module, [detector], steps=2)
    assert detector.revived >= 1
    views = {v.name: v for v in find_moe_layers(module)}
    assert set(detector.dead_experts) <= set(views)
    for name, dead in detector.dead_experts.items():
        view = views[name]
        gate = view.router_rows()[0]
        for expert in dead:
            source = next(e for e in range(4) if e not in dead and torch.equal(gate[expert], gate[e]))
            for tensor in view.expert_tensors():
                assert torch.equal(tensor[expert], tensor[source])


def test_bias_offsets_of_deepseek_v3_are_updated_from_the_loads() -> None:
    torch.manual_seed(0)
    module = HFCausalLM(deepseek_v3())
    views = find_moe_layers(module)
    assert len(views) == 2 and all(v.expert_bias is not None for v in views)

    loads: list[list[torch.Tensor]] = []

    class Recorder(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            loads.append([v.stats.tokens_per_expert_E.clone() for v in views])

    fit(module, [BiasOffsetUpdater(rate=0.01), Recorder()], steps=3)
    for i, view in enumerate(views):
        expected = torch.zeros(8)
        for step in loads:
            expected = bias_update(expected, step[i], 0.01)
        torch.testing.assert_close(view.expert_bias.float(), expected)
        assert view.expert_bias is view.module.gate.e_score_correction_bias
