"""Sequence-level, device-level and communication balance losses, and the bias update."""

import pytest
import torch

from lightning_moe.balancing import CommBalanceLoss, DeviceAuxLoss, SequenceAuxLoss, SwitchAuxLoss, bias_update
from lightning_moe.layers import MoELayer
from lightning_moe.routing import Routing


def make_routing(scores_TE: torch.Tensor, experts_TK: torch.Tensor, seq_len: int | None = None) -> Routing:
    t, k = experts_TK.shape
    return Routing(
        scores_TE=scores_TE, logits_TE=scores_TE.log(), token_A=torch.arange(t).repeat_interleave(k),
        expert_A=experts_TK.reshape(-1), weight_A=scores_TE.gather(1, experts_TK).reshape(-1), seq_len=seq_len,
    )


def test_sequence_aux_loss_hand_computed() -> None:
    # Two sequences of 2 tokens, E=2, K=1. Seq 0: scores (.75,.25) twice, experts 0, 0.
    # Seq 1: scores (.75,.25), (.25,.75), experts 0, 1.
    scores = torch.tensor([[0.75, 0.25], [0.75, 0.25], [0.75, 0.25], [0.25, 0.75]])
    r = make_routing(scores, torch.tensor([[0], [0], [0], [1]]), seq_len=2)
    # seq 0: f=(1,0), P=(.75,.25) -> 2*.75 = 1.5; seq 1: f=(.5,.5), P=(.5,.5) -> 2*.5 = 1.0; mean 1.25
    torch.testing.assert_close(SequenceAuxLoss(0.1).loss(r), torch.tensor(0.125))
    # The whole batch as one sequence is the Switch loss: 0.1 * 2 * (.75*.625 + .25*.375) = 0.1125
    r.seq_len = None
    torch.testing.assert_close(SequenceAuxLoss(0.1).loss(r), torch.tensor(0.1125))
    torch.testing.assert_close(SequenceAuxLoss(0.1).loss(r), SwitchAuxLoss(0.1).loss(r))


def test_sequence_aux_loss_sees_imbalance_the_batch_loss_hides() -> None:
    # Sequence 0 uses only expert 0, sequence 1 only expert 1: balanced over the batch.
    scores = torch.tensor([[0.9, 0.1]] * 4 + [[0.1, 0.9]] * 4)
    r = make_routing(scores, torch.tensor([[0]] * 4 + [[1]] * 4), seq_len=4)
    assert SwitchAuxLoss(1.0).loss(r).item() == pytest.approx(1.0)
    assert SequenceAuxLoss(1.0).loss(r).item() == pytest.approx(1.8)


def _three_token_case() -> Routing:
    # E=4 in G=2 groups {0,1}, {2,3}; T=2, K=2. Token 0 -> {0,1} (group 0 only); token 1 -> {0,2}.
    scores = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.3, 0.3, 0.2, 0.2]])
    return make_routing(scores, torch.tensor([[0, 1], [0, 2]]))


def test_device_aux_loss_hand_computed() -> None:
    # n=(2,1,1,0), A=4 -> f=E*n/A=(2,1,1,0); f'=(1.5, 0.5). P=(.35,.3,.2,.15) -> P'=(.65,.35).
    # L = 0.1 * (1.5*.65 + .5*.35) = 0.115
    torch.testing.assert_close(DeviceAuxLoss(2, coeff=0.1).loss(_three_token_case()), torch.tensor(0.115))


def test_comm_balance_loss_hand_computed() -> None:
    # Devices reached: token 0 -> {0}, token 1 -> {0, 1}: h=(2,1), f''=G*h/3=(4/3, 2/3).
    # L = 0.1 * (4/3*.65 + 2/3*.35) = 0.11
    torch.testing.assert_close(CommBalanceLoss(2, coeff=0.1).loss(_three_token_case()), torch.tensor(0.11))


@pytest.mark.parametrize("num_experts, top_k, num_devices", [(8, 2, 4), (8, 1, 8), (16, 4, 2), (6, 3, 3)])
@pytest.mark.parametrize("loss_cls", [DeviceAuxLoss, CommBalanceLoss])
def test_device_losses_balanced_value_is_the_coefficient(num_experts, top_k, num_devices, loss_cls) -> None:  # noqa: ANN001
    t = num_experts * 4
    experts_TK = (torch.arange(t * top_k) % num_experts).view(t, top_k)
    r = make_routing(torch.full((t, num_experts), 1.0 / num_experts), experts_TK)
    torch.testing.assert_close(loss_cls(num_devices, coeff=0.05).loss(r), torch.tensor(0.05))


def test_sequence_loss_balanced_value_is_the_coefficient() -> None:
    e, s = 4, 8
    experts_TK = (torch.arange(3 * s) % e).view(-1, 1)
    r = make_routing(torch.full((3 * s, e), 0.25), experts_TK, seq_len=s)
    torch.testing.assert_close(SequenceAuxLoss(0.01).loss(r), torch.tensor(0.01))


def test_losses_have_gradients_through_scores() -> None:
    logits = torch.randn(12, 4, requires_grad=True)
    scores = logits.softmax(-1)
    r = make_routing(scores, scores.detach().topk(2, dim=-1).indices, seq_len=6)
    total = SequenceAuxLoss(1.0).loss(r) + DeviceAuxLoss(2, 1.0).loss(r) + CommBalanceLoss(2, 1.0).loss(r)
    total.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_moe_layer_passes_sequences_to_the_sequence_loss() -> None:
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 4, balancers=[SequenceAuxLoss(1.0), SwitchAuxLoss(1.0)])
    layer(torch.randn(3, 5, 16))
    seq = layer.aux_losses["seq_aux_loss"]
    assert seq.item() != pytest.approx(layer.aux_losses["aux_loss"].item())


def test_device_losses_check_the_expert_count_when_the_layer_is_built() -> None:
    with pytest.raises(ValueError, match=r"`num_devices` \(3\) must divide `num_experts` \(8\).*\[1, 2, 4, 8\]"):
        MoELayer(16, 32, 8, balancers=[DeviceAuxLoss(3)])
    with pytest.raises(ValueError, match="`num_devices` must be an integer >= 1"):
        CommBalanceLoss(0)


def test_bias_update_moves_against_the_load() -> None:
    bias = torch.tensor([0.0, 0.5, -0.5, 0.0])
    load = torch.tensor([10, 2, 4, 4])  # mean 5
    torch.testing.assert_close(bias_update(bias, load, 0.1), torch.tensor([-0.1, 0.6, -0.4, 0.1]))
    assert torch.equal(bias, torch.tensor([0.0, 0.5, -0.5, 0.0]))  # pure: the input is unchanged
    torch.testing.assert_close(bias_update(bias, torch.tensor([3, 3, 3, 3]), 0.1), bias)  # balanced: no change
    with pytest.raises(ValueError, match="`rate` must be a number >= 0"):
        bias_update(bias, load, -1.0)
    with pytest.raises(ValueError, match="shape"):
        bias_update(bias, torch.ones(3), 0.1)
