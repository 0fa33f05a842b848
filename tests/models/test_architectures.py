"""Expert architectures: shared experts, fine-grained experts, leading dense layers, size counts."""

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from lightning_moe.layers import MoEConfig, MoELayer
from lightning_moe.models import MoETransformer
from lightning_moe.models.transformer import MOVED_TO_MOE
from lightning_moe.module import MoELanguageModel
from lightning_moe.routing import ExpertChoiceRouter, TopKRouter


def small(**kwargs) -> MoETransformer:
    args = dict(vocab_size=50, max_seq_len=16, d_model=32, n_layers=4, n_heads=4, d_ff=64, num_experts=4,
                expert_d_ff=48)
    args.update(kwargs)
    moe = MoEConfig(**{name: args.pop(name) for name in list(args) if name in MOVED_TO_MOE})
    return MoETransformer(**args, moe=moe)


@pytest.mark.parametrize("gated", [False, True], ids=["deepseek", "qwen2"])
def test_shared_experts_add_a_dense_swiglu_to_the_routed_output(gated: bool) -> None:
    torch.manual_seed(0)
    layer = MoELayer(24, 40, 6, shared_d_ff=56, shared_gate=gated)
    routed_only = MoELayer(24, 40, 6)
    routed_only.load_state_dict(layer.state_dict(), strict=False)
    x = torch.randn(3, 7, 24, requires_grad=True)
    shared = layer.shared_expert
    expected_shared = shared.out(nn.functional.silu(shared.gate(x)) * shared.up(x))
    if gated:
        expected_shared = torch.sigmoid(x @ layer.shared_expert_gate.weight.T) * expected_shared
    torch.testing.assert_close(layer(x), routed_only(x) + expected_shared)
    layer(x).square().sum().backward()
    for p in [*shared.parameters(), *([layer.shared_expert_gate.weight] if gated else [])]:
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_shared_gate_needs_shared_experts() -> None:
    with pytest.raises(ValueError, match="`shared_gate=True` needs shared experts"):
        MoELayer(8, 8, 2, shared_gate=True)
    with pytest.raises(ValueError, match="`shared_expert_gate=True` needs `num_shared_experts` >= 1"):
        small(shared_expert_gate=True)
    with pytest.raises(ValueError, match="`shared_d_ff` must be an integer >= 0"):
        MoELayer(8, 8, 2, shared_d_ff=-1)


@pytest.mark.parametrize("granularity", [2, 4, 8])
def test_granularity_splits_experts_and_keeps_parameter_counts(granularity: int) -> None:
    coarse = small(router=lambda d, e: TopKRouter(d, e, top_k=2))
    fine = small(router=lambda d, e: TopKRouter(d, e, top_k=2), granularity=granularity)
    layer = fine.moe_layers()[0]
    assert (layer.num_experts, layer.experts.d_ff, layer.router.top_k) == (4 * granularity, 48 // granularity,
                                                                           2 * granularity)
    coarse_counts, fine_counts = coarse.parameter_counts(), fine.parameter_counts()
    extra_router_rows = 4 * 32 * 4 * (granularity - 1)  # per layer: (E*g - E) rows of width D
    assert fine_counts["expert"] == coarse_counts["expert"]
    assert fine_counts["total"] - coarse_counts["total"] == extra_router_rows
    assert fine_counts["active"] - coarse_counts["active"] == extra_router_rows
    logits = fine(torch.randint(0, 50, (2, 16)))
    assert logits.shape == (2, 16, 50) and torch.isfinite(logits).all()
    assert int(layer.stats.tokens_per_expert_E.sum()) == 2 * 16 * 2 * granularity


def test_granularity_scales_expert_choice_capacity() -> None:
    model = small(router=lambda d, e: ExpertChoiceRouter(d, e, capacity_factor=1.5), granularity=2)
    router = model.moe_layers()[0].router
    assert router.capacity_factor == 3.0 and router.experts_per_token == 3.0


@pytest.mark.parametrize("kwargs, match", [
    ({"granularity": 5}, r"`granularity` \(5\) must divide `expert_d_ff` \(48\); valid values: \[1, 2, 3, 4, 6, 8"),
    ({"granularity": 0}, "`granularity` must be an integer >= 1"),
    ({"first_dense_layers": 5}, r"`first_dense_layers` must be an integer in \[0, 4\]"),
    ({"num_shared_experts": -1}, "`num_shared_experts` must be an integer >= 0"),
])
def test_bad_architecture_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        small(**kwargs)


@pytest.mark.parametrize("first, every, moe_layers", [
    (0, 1, [0, 1, 2, 3]), (1, 1, [1, 2, 3]), (1, 2, [2]), (2, 1, [2, 3]), (0, 2, [1, 3]), (4, 1, []), (1, 0, []),
])
def test_leading_dense_layers_then_every_nth(first: int, every: int, moe_layers: list[int]) -> None:
    model = small(first_dense_layers=first, moe_every=every)
    assert [i for i, block in enumerate(model.blocks) if isinstance(block.ffn, MoELayer)] == moe_layers


def test_flops_per_token_by_hand() -> None:
    V, S, D, L_, E, K, F, g, Fs = 50, 16, 32, 4, 4, 2, 48, 2, 24
    model = small(router=lambda d, e: TopKRouter(d, e, top_k=K), granularity=g, num_shared_experts=1,
                  shared_expert_gate=True, first_dense_layers=1)
    attention = 2 * (4 * D * D) + 2 * S * D  # qkv + output projection, then scores and values
    dense_ffn = 2 * 3 * D * 64
    moe = 2 * (D * E * g + K * g * 3 * D * (F // g) + 3 * D * Fs + D)  # router, routed, shared, shared gate
    expected = L_ * attention + dense_ffn + (L_ - 1) * moe + 2 * D * V
    assert model.flops_per_token() == expected
    assert model.flops_per_token(seq_len=8) == expected - L_ * 2 * 8 * D


def test_module_logs_sizes_once_to_tensorboard(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_moe.data import TextDataModule

    L.seed_everything(0)
    module = MoELanguageModel(
        max_seq_len=16, d_model=32, n_layers=2, n_heads=2, d_ff=64,
        moe=MoEConfig(num_experts=4, expert_d_ff=32, granularity=2, num_shared_experts=1),
    )
    logger = TensorBoardLogger(tmp_path, name="sizes")
    trainer = L.Trainer(max_steps=3, limit_val_batches=0, logger=logger, log_every_n_steps=1,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, TextDataModule(seq_len=16, batch_size=2))
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    expected = module.size_metrics()
    assert expected["model/params_active"] < expected["model/params_total"]
    for name, value in expected.items():
        events = acc.Scalars(name)
        assert [(e.step, e.value) for e in events] == [(0, pytest.approx(value, rel=1e-6))], name
