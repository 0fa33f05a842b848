import math

import pytest
import torch

from lightning_moe.balancing import SwitchAuxLoss, ZLoss
from lightning_moe.routing import Routing


def make_routing(logits_TE: torch.Tensor, experts_TK: torch.Tensor) -> Routing:
    t, k = experts_TK.shape
    scores_TE = logits_TE.softmax(-1)
    return Routing(
        scores_TE=scores_TE,
        logits_TE=logits_TE,
        token_A=torch.arange(t).repeat_interleave(k),
        expert_A=experts_TK.reshape(-1),
        weight_A=scores_TE.gather(1, experts_TK).reshape(-1),
    )


def test_aux_loss_hand_computed_top1() -> None:
    # T=4, E=2, K=1. Scores: rows (0.75, 0.25) x3 and (0.25, 0.75); experts 0, 0, 0, 1.
    logits = torch.log(torch.tensor([[0.75, 0.25], [0.75, 0.25], [0.75, 0.25], [0.25, 0.75]]))
    r = make_routing(logits, torch.tensor([[0], [0], [0], [1]]))
    # f = (3/4, 1/4), P = (0.625, 0.375): L = 0.1 * 2 * (0.75*0.625 + 0.25*0.375) = 0.1125
    torch.testing.assert_close(SwitchAuxLoss(0.1).loss(r), torch.tensor(0.1125))


def test_aux_loss_hand_computed_top2() -> None:
    # T=2, E=3, K=2. Scores (0.5, 0.3, 0.2) and (0.2, 0.5, 0.3); experts {0,1} and {1,2}.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3]]))
    r = make_routing(logits, torch.tensor([[0, 1], [1, 2]]))
    # n = (1, 2, 1), A = 4 -> f = (0.25, 0.5, 0.25); P = (0.35, 0.4, 0.25)
    # L = 1.0 * 3 * (0.0875 + 0.2 + 0.0625) = 1.05
    torch.testing.assert_close(SwitchAuxLoss(1.0).loss(r), torch.tensor(1.05))


@pytest.mark.parametrize("num_experts, top_k", [(2, 1), (4, 2), (8, 2), (16, 4), (64, 8), (6, 6)])
def test_aux_loss_balanced_router_gives_the_coefficient(num_experts: int, top_k: int) -> None:
    # Uniform scores and a perfectly even assignment: token t takes experts t*K .. t*K+K-1 (mod E).
    t = num_experts * 3
    logits = torch.zeros(t, num_experts)
    experts_TK = (torch.arange(t * top_k) % num_experts).view(t, top_k)
    r = make_routing(logits, experts_TK)
    assert torch.equal(r.tokens_per_expert(), torch.full((num_experts,), t * top_k // num_experts))
    torch.testing.assert_close(SwitchAuxLoss(0.01).loss(r), torch.tensor(0.01))


def test_aux_loss_collapsed_router_is_larger() -> None:
    e = 8
    logits = torch.zeros(16, e)
    logits[:, 0] = 10.0
    r = make_routing(logits, torch.zeros(16, 1, dtype=torch.long))
    # f = (1, 0, ...), P_0 ~ 1: L ~ coeff * E.
    assert SwitchAuxLoss(0.01).loss(r).item() == pytest.approx(0.01 * e * r.scores_TE[:, 0].mean().item())
    assert SwitchAuxLoss(0.01).loss(r).item() > 0.07


def test_aux_loss_gradient_flows_through_scores_only() -> None:
    logits = torch.randn(10, 4, requires_grad=True)
    r = make_routing(logits, logits.detach().topk(2, dim=-1).indices)
    SwitchAuxLoss(0.5).loss(r).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_z_loss_formula() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    r = make_routing(logits, torch.tensor([[2], [0]]))
    lse0 = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    lse1 = math.log(3.0)
    expected = 0.001 * (lse0**2 + lse1**2) / 2
    torch.testing.assert_close(ZLoss(0.001).loss(r), torch.tensor(expected))


def test_balancer_coefficient_checked() -> None:
    with pytest.raises(ValueError, match="`coeff` must be a number >= 0"):
        SwitchAuxLoss(-0.1)
    with pytest.raises(ValueError, match="`coeff`"):
        ZLoss(-1)
