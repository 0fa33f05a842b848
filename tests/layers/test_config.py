"""One MoE configuration: its checks, its defaults, and every reader building the same layer from it."""

import pytest
import torch

from lightning_moe.balancing import SwitchAuxLoss, ZLoss
from lightning_moe.layers import MoEConfig, MoELayer
from lightning_moe.models import MoETransformer
from lightning_moe.routing import ExpertCapacity, TopKRouter


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_experts": 0}, r"`num_experts` must be .*got 0"),
    ({"expert_d_ff": 30, "granularity": 4}, r"`granularity` \(4\) must divide `expert_d_ff` \(30\); valid values: "
                                            r"\[1, 2, 3, 5, 6, 10, 15, 30\]"),
    ({"shared_expert_gate": True}, r"`shared_expert_gate=True` needs `num_shared_experts` >= 1"),
    ({"num_shared_experts": -1}, r"`num_shared_experts`"),
    ({"expert_parallel_size": 3}, r"`expert_parallel_size`=3 must divide .* = 8; valid values are \[1, 2, 4, 8\]"),
    ({"dispatcher": "fast"}, r"Unknown `dispatcher` 'fast'"),
])
def test_bad_values_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MoEConfig(**kwargs)


def test_one_set_of_defaults() -> None:
    """``balancers=None`` means the same two losses for the model and the LightningModule; the
    model's and the module's widths agree."""
    from lightning_moe.module import MoELanguageModel

    config = MoEConfig()
    assert [(type(b), b.coeff) for b in config.layer_balancers()] == [(SwitchAuxLoss, 0.01), (ZLoss, 0.001)]
    model = MoETransformer(64)
    module = MoELanguageModel(vocab_size=64)
    for ours in (model, module.model):
        layer = ours.moe_layers()[0]
        assert [type(b) for b in layer.balancers] == [SwitchAuxLoss, ZLoss]
        assert (layer.num_experts, layer.experts.d_ff, ours.max_seq_len) == (8, 256, 128)
    # Two models from the same default configuration do not share balancer objects.
    assert MoETransformer(64).moe_layers()[0].balancers[0] is not model.moe_layers()[0].balancers[0]


def test_every_reader_builds_the_layer_the_config_describes() -> None:
    moe = MoEConfig(num_experts=4, expert_d_ff=32, granularity=2, num_shared_experts=1, shared_expert_gate=True,
                    router=lambda d, e: TopKRouter(d, e, top_k=1, renormalize=False), balancers=[ZLoss(0.5)],
                    capacity=ExpertCapacity(2.0), dispatcher="loop")
    layer = MoELayer.from_config(16, moe)
    assert (layer.num_experts, layer.experts.d_ff, layer.shared_d_ff, layer.router.top_k) == (8, 16, 16, 2)
    assert layer.shared_expert_gate is not None and layer.dispatcher.name == "loop"
    assert layer.capacity is moe.capacity and layer.balancers == moe.balancers
    model = MoETransformer(32, max_seq_len=8, d_model=16, n_layers=2, n_heads=2, d_ff=32, moe=moe)
    torch.testing.assert_close(sum(p.numel() for p in model.moe_layers()[0].parameters()),
                               sum(p.numel() for p in layer.parameters()))


def test_old_flat_arguments_say_where_they_went() -> None:
    from lightning_moe.module import MoELanguageModel

    with pytest.raises(TypeError, match=r"`num_experts`, `router` moved into the MoE configuration: pass "
                                        r"`moe=MoEConfig\(num_experts=4, router=None\)`"):
        MoELanguageModel(num_experts=4, router=None)
    with pytest.raises(TypeError, match=r"MoETransformer\(\): `granularity` moved .* Unknown arguments: \['colour'\]"):
        MoETransformer(64, granularity=2, colour=1)


def test_deepspeed_layer_reads_the_same_config() -> None:
    pytest.importorskip("deepspeed")
    from lightning_moe.parallel import DeepSpeedMoELayer

    moe = MoEConfig(num_experts=4, expert_d_ff=32, granularity=2, capacity=ExpertCapacity(1.5, None, "score", 2))
    layer = DeepSpeedMoELayer.from_config(16, moe)
    assert (layer.num_experts, layer.d_ff, layer.router.top_k) == (8, 16, 4)
    assert (layer.capacity_factor, layer.eval_capacity_factor, layer.drop_policy, layer.min_capacity) == \
        (1.5, None, "score", 2)
    assert [type(b) for b in layer.balancers] == [SwitchAuxLoss, ZLoss]
    with pytest.raises(ValueError, match="no shared experts"):
        DeepSpeedMoELayer.from_config(16, MoEConfig(num_shared_experts=1))
    with pytest.raises(ValueError, match=r"`drop_policy='probs'` is DeepSpeed's name; here it is 'score'"):
        DeepSpeedMoELayer(16, 32, 4, drop_policy="probs")
