import math

import pytest
import torch

from lightning_moe.balancing import SwitchAuxLoss, ZLoss
from lightning_moe.layers import MoELayer, RoutingStats
from lightning_moe.routing import TopKRouter


def test_drop_in_shape_and_outputs() -> None:
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 4, balancers=[SwitchAuxLoss(0.01), ZLoss(0.001)])
    for shape in [(16,), (3, 16), (2, 5, 16)]:
        x = torch.randn(*shape)
        assert layer(x).shape == x.shape
    assert set(layer.aux_losses) == {"aux_loss", "z_loss"}
    assert all(v.requires_grad and v.ndim == 0 for v in layer.aux_losses.values())


def test_aux_losses_match_balancers_on_the_same_routing() -> None:
    torch.manual_seed(0)
    aux, z = SwitchAuxLoss(0.02), ZLoss(0.003)
    layer = MoELayer(16, 32, 4, balancers=[aux, z])
    x = torch.randn(10, 16)
    layer(x)
    routing = layer.router(x)
    torch.testing.assert_close(layer.aux_losses["aux_loss"], aux.loss(routing))
    torch.testing.assert_close(layer.aux_losses["z_loss"], z.loss(routing))
    # A coefficient changed at run time takes effect at the next forward.
    aux.coeff = 0.0
    layer(x)
    assert layer.aux_losses["aux_loss"].item() == 0.0


def test_stats() -> None:
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 5, router=TopKRouter(16, 5, top_k=2))
    x = torch.randn(3, 7, 16)
    layer(x)
    stats = layer.stats
    assert isinstance(stats, RoutingStats)
    scores = layer.router(x.view(-1, 16)).scores_TE.detach()
    assert stats.num_tokens == 21
    assert stats.tokens_per_expert_E.sum().item() == 42
    assert torch.equal(stats.tokens_per_expert_E, torch.bincount(scores.topk(2, -1).indices.view(-1), minlength=5))
    torch.testing.assert_close(stats.mean_score_E, scores.mean(0))
    entropy = -(scores * scores.log()).sum(-1).mean()
    torch.testing.assert_close(stats.entropy, entropy)
    assert 0 < stats.entropy.item() <= math.log(5)
    assert stats.num_dropped.item() == 0
    torch.testing.assert_close(stats.load_fraction_E.sum(), torch.tensor(1.0))
    assert not any(t.requires_grad for t in (stats.tokens_per_expert_E, stats.mean_score_E, stats.entropy))


def test_no_shared_state_between_layers() -> None:
    torch.manual_seed(0)
    a, b = MoELayer(8, 8, 4, balancers=[SwitchAuxLoss()]), MoELayer(8, 8, 4, balancers=[SwitchAuxLoss()])
    a(torch.randn(6, 8))
    assert b.stats is None and b.aux_losses == {}
    b(torch.randn(11, 8))
    assert a.stats.num_tokens == 6 and b.stats.num_tokens == 11


def test_hidden_size_mismatch() -> None:
    layer = MoELayer(16, 32, 4)
    with pytest.raises(ValueError, match="last dimension is d_model=16, got shape \\(3, 12\\)"):
        layer(torch.randn(3, 12))
    with pytest.raises(ValueError, match="router was built for d_model=8, num_experts=4; this layer has d_model=16"):
        MoELayer(16, 32, 4, router=TopKRouter(8, 4))


@pytest.mark.parametrize("kwargs, name", [({"d_model": 0}, "d_model"), ({"d_ff": -4}, "d_ff"),
                                          ({"num_experts": 0}, "num_experts")])
def test_non_positive_widths(kwargs: dict, name: str) -> None:
    args = {"d_model": 8, "d_ff": 8, "num_experts": 4, **kwargs}
    with pytest.raises(ValueError, match=f"`{name}` must be an integer >= 1"):
        MoELayer(**args)


def test_duplicate_balancer_names() -> None:
    with pytest.raises(ValueError, match="distinct names"):
        MoELayer(8, 8, 4, balancers=[ZLoss(), ZLoss(0.1)])


def test_bfloat16_autocast_forward_backward() -> None:
    torch.manual_seed(0)
    layer = MoELayer(16, 24, 4, balancers=[ZLoss()])
    x = torch.randn(12, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    (y.float().sum() + layer.aux_losses["z_loss"]).backward()
    assert x.grad is not None and layer.router.scorer.weight_ED.grad is not None


def test_groups_that_do_not_follow_the_expert_parallel_placement_warn() -> None:
    import warnings

    from lightning_moe.balancing import DeviceAuxLoss
    from lightning_moe.routing import GroupLimitedTopKRouter

    def build(groups: int, devices: int) -> None:
        MoELayer(8, 16, 12, router=GroupLimitedTopKRouter(8, 12, top_k=1, num_groups=groups, topk_groups=1,
                                                           renormalize=False),
                 balancers=[DeviceAuxLoss(devices)], expert_parallel_size=4)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build(groups=4, devices=4)  # one group per rank
        build(groups=12, devices=2)  # groups inside ranks; devices of two ranks each
    with pytest.warns(UserWarning, match=r"router's `num_groups` \(3\) does not follow"):
        build(groups=3, devices=4)
    with pytest.warns(UserWarning, match=r"DeviceAuxLoss's `num_devices` \(6\) does not follow"):
        build(groups=4, devices=6)
