"""Expert capacity: the assignments kept follow the drop policy; dropped tokens pass through."""

import pytest
import torch

from lightning_moe.layers import MoELayer
from lightning_moe.models.transformer import Block, CausalSelfAttention, Rotary
from lightning_moe.routing import ExpertCapacity, Routing, TopKRouter, drop_over_capacity, expert_capacity


def random_routing(t: int, e: int, k: int, seed: int) -> Routing:
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(t, e, generator=g).softmax(-1)
    experts = torch.rand(t, e, generator=g).argsort(dim=-1)[:, :k]
    return Routing(scores_TE=scores, logits_TE=scores.log(), token_A=torch.arange(t).repeat_interleave(k),
                   expert_A=experts.reshape(-1), weight_A=scores.gather(1, experts).reshape(-1))


def reference_keep(r: Routing, capacity: int, policy: str) -> set[tuple[int, int]]:
    """Kept (token, expert) pairs, chosen expert by expert in plain Python."""
    kept = set()
    for e in range(r.num_experts):
        idx = [a for a in range(r.expert_A.numel()) if r.expert_A[a] == e]
        if policy == "position":
            idx.sort(key=lambda a: (int(r.token_A[a]), a))
        else:
            idx.sort(key=lambda a: (-float(r.weight_A[a]), a))
        kept |= {(int(r.token_A[a]), e) for a in idx[:capacity]}
    return kept


def test_expert_capacity_formula() -> None:
    assert expert_capacity(64, 8, 1.0) == 8
    assert expert_capacity(64, 8, 1.25) == 10
    assert expert_capacity(10, 4, 1.0) == 3  # ceil(2.5)
    assert expert_capacity(4, 8, 0.1, min_capacity=2) == 2


def test_position_policy_keeps_the_earliest_tokens() -> None:
    r = random_routing(6, 2, 1, 0)
    r.expert_A = torch.zeros(6, dtype=torch.long)
    out = drop_over_capacity(r, 2, "position")
    assert out.token_A.tolist() == [0, 1] and out.num_dropped == 4
    assert torch.equal(out.tokens_per_expert(), torch.tensor([2, 0]))


def test_score_policy_keeps_the_highest_gates() -> None:
    r = random_routing(6, 2, 1, 0)
    r.expert_A = torch.zeros(6, dtype=torch.long)
    r.weight_A = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2, 0.7])
    out = drop_over_capacity(r, 3, "score")
    assert sorted(out.token_A.tolist()) == [1, 3, 5] and out.num_dropped == 3


@pytest.mark.parametrize("policy", ["position", "score"])
@pytest.mark.parametrize("t, e, k, capacity", [(37, 5, 2, 9), (64, 8, 1, 3), (13, 3, 3, 7), (50, 7, 2, 1)])
def test_kept_assignments_match_a_plain_reference(policy: str, t: int, e: int, k: int, capacity: int) -> None:
    r = random_routing(t, e, k, seed=t + e + k)
    out = drop_over_capacity(r, capacity, policy)
    got = {(int(a), int(b)) for a, b in zip(out.token_A, out.expert_A, strict=True)}
    assert got == reference_keep(r, capacity, policy)
    assert out.tokens_per_expert().max() <= capacity
    assert int(out.num_dropped) == t * k - len(got)
    # Kept gate weights are the original ones, not renormalised.
    original = {(int(a), int(b)): float(w) for a, b, w in zip(r.token_A, r.expert_A, r.weight_A, strict=True)}
    kept = zip(out.token_A, out.expert_A, out.weight_A, strict=True)
    assert all(original[(int(a), int(b))] == float(w) for a, b, w in kept)


def test_train_and_eval_factors_and_dropless_eval() -> None:
    cap = ExpertCapacity(capacity_factor=1.0, eval_capacity_factor=None)
    assert cap.capacity(64, 8, training=True) == 8
    assert cap.capacity(64, 8, training=False) is None
    cap = ExpertCapacity(capacity_factor=0.5, eval_capacity_factor=2.0)
    assert (cap.capacity(64, 8, True), cap.capacity(64, 8, False)) == (4, 16)


@pytest.mark.parametrize("kwargs, match", [
    ({"capacity_factor": 0}, "`capacity_factor` must be a finite number > 0"),
    ({"eval_capacity_factor": -1.0}, "`eval_capacity_factor` must be a finite number > 0"),
    ({"drop_policy": "random"}, r"`drop_policy` must be one of \('position', 'score'\)"),
    ({"min_capacity": 0}, "`min_capacity` must be an integer >= 1"),
])
def test_bad_capacity_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ExpertCapacity(**kwargs)


def capacity_layer(capacity: ExpertCapacity | None) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(16, 24, 4, router=TopKRouter(16, 4, top_k=2), capacity=capacity)


def test_dropped_tokens_leave_the_layer_as_zeros_and_stats_count_them() -> None:
    layer = capacity_layer(ExpertCapacity(capacity_factor=0.25, drop_policy="position"))
    x = torch.randn(2, 20, 16)
    y = layer(x)
    stats = layer.stats
    assert stats.num_dropped > 0
    assert stats.dropped_fraction.item() == pytest.approx(stats.num_dropped.item() / 80)
    # Recompute which tokens kept no assignment at all.
    routing = layer.router(x.reshape(-1, 16))
    kept = drop_over_capacity(routing, expert_capacity(80, 4, 0.25), "position")
    dropped_T = torch.ones(40, dtype=torch.bool)
    dropped_T[kept.token_A] = False
    assert dropped_T.any()
    assert torch.equal(y.reshape(-1, 16)[dropped_T], torch.zeros(int(dropped_T.sum()), 16))
    assert (y.reshape(-1, 16)[~dropped_T].abs().sum(-1) > 0).all()


def test_dropped_tokens_pass_through_the_residual_unchanged() -> None:
    layer = capacity_layer(ExpertCapacity(capacity_factor=0.25))
    block = Block(16, CausalSelfAttention(16, 2, Rotary(8, 32)), layer)
    seen = {}
    block.ffn_norm.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach().clone()))
    out = block(torch.randn(2, 20, 16))
    y = layer(block.ffn_norm(seen["x"]))  # same input again: the same routing
    zero_T = (y.reshape(-1, 16) == 0).all(-1)
    assert zero_T.any()
    assert torch.equal(out.reshape(-1, 16)[zero_T], seen["x"].reshape(-1, 16)[zero_T])


def test_dropless_drops_nothing_and_eval_uses_its_own_factor() -> None:
    x = torch.randn(4, 16, 16)
    dropless = capacity_layer(None)
    dropless(x)
    assert dropless.stats.num_dropped == 0 and dropless.stats.dropped_fraction == 0
    layer = capacity_layer(ExpertCapacity(capacity_factor=0.25, eval_capacity_factor=None))
    layer.train()
    layer(x)
    assert layer.stats.num_dropped > 0
    layer.eval()
    y = layer(x)
    assert layer.stats.num_dropped == 0
    torch.testing.assert_close(y, dropless.eval()(x))
