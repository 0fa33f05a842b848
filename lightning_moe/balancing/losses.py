"""Balancing losses computed from a :class:`~lightning_moe.routing.Routing`.

Legend: ``T`` tokens, ``E`` experts, ``K`` experts per token, ``A`` kept assignments.

A balancer is a plain object (not a module): it holds a coefficient that a callback may change
at run time, and returns ``coeff * raw_loss`` from ``loss(routing)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_moe._validate import check_non_negative, check_positive_int, divisors
from lightning_moe.routing.routing import Routing


class Balancer:
    """Base class: ``loss(routing) -> Tensor`` (a scalar with grad), scaled by ``coeff``.

    ``name`` keys the loss in ``MoELayer.aux_losses`` and in the logged metrics.
    """

    name: str = "balancer"

    def __init__(self, coeff: float) -> None:
        self.coeff = check_non_negative("coeff", coeff)

    def loss(self, routing: Routing) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def check(self, num_experts: int) -> None:
        """Raise ``ValueError`` if this balancer cannot serve a layer of ``num_experts`` experts.

        ``MoELayer`` calls it when built, so a bad setting fails before training starts.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}(coeff={self.coeff})"


def check_balancers(balancers: Sequence[Balancer], num_experts: int) -> list[Balancer]:
    """``balancers`` as a list, after checking that their names are distinct (each is an aux-loss key)
    and that each can serve ``num_experts`` experts (:meth:`Balancer.check`)."""
    names = [b.name for b in balancers]
    if len(set(names)) != len(names):
        raise ValueError(f"`balancers` must have distinct names, got {names}.")
    for balancer in balancers:
        balancer.check(num_experts)
    return list(balancers)


class SwitchAuxLoss(Balancer):
    """Switch Transformer's f·P load-balancing loss, generalised to top-k.

    .. math::

        L = \\alpha \\cdot E \\sum_{e=1}^{E} f_e P_e, \\qquad
        f_e = \\frac{n_e}{A}, \\qquad P_e = \\frac{1}{T} \\sum_{t=1}^{T} s_{t,e}

    where ``n_e`` is the number of kept assignments to expert ``e``, ``A`` the number of kept
    assignments (``T * K`` for dropless top-k) and ``s_{t,e}`` the normalised router scores.
    Dividing by ``A`` (not by ``T``) makes ``sum(f) = 1`` for every K, so a perfectly balanced
    router (``f_e = P_e = 1/E``) gives exactly ``L = alpha`` for any E and any K. This equals
    Megatron-Core's ``switch_load_balancing_loss_func`` (``E * alpha / (T^2 K) * sum(n_e * sum_t s)``).
    Gradients flow through ``P`` only; ``f`` comes from a discrete choice.

    Args:
        coeff: the coefficient alpha, >= 0 (0.01 in Switch; 1e-2 to 1e-3 is usual).
    """

    name = "aux_loss"

    def __init__(self, coeff: float = 0.01) -> None:
        super().__init__(coeff)

    def loss(self, routing: Routing) -> Tensor:
        num_experts = routing.num_experts
        f_E = routing.tokens_per_expert().to(routing.scores_TE.dtype) / max(routing.expert_A.numel(), 1)
        p_E = routing.scores_TE.mean(dim=0)
        return self.coeff * num_experts * torch.dot(f_E, p_E)


class SequenceAuxLoss(Balancer):
    """Sequence-level f·P balance loss (DeepSeek-V3's complementary sequence-wise loss).

    The Switch loss computed within each sequence, then averaged over the ``N`` sequences:

    .. math::

        L = \\frac{\\alpha}{N} \\sum_{n=1}^{N} E \\sum_{e=1}^{E} f_{n,e} P_{n,e}, \\qquad
        f_{n,e} = \\frac{n_{n,e}}{A_n}, \\qquad P_{n,e} = \\frac{1}{S} \\sum_{t \\in n} s_{t,e}

    DeepSeek-V3 writes ``f_i = E / (K S) * count`` and ``L = alpha * sum_i f_i P_i``; with
    ``A_n = K S`` that is the same number. Megatron-Core's ``seq_aux_loss`` uses this scaling too.
    A router balanced within every sequence gives exactly ``L = alpha``; a batch can be balanced
    overall while each sequence is not, which this loss (unlike :class:`SwitchAuxLoss`) penalises.
    Sequences come from ``Routing.seq_len`` (set by ``MoELayer`` from a ``(B, S, D)`` input); with
    none, the batch is one sequence and the loss equals :class:`SwitchAuxLoss`.

    Args:
        coeff: the coefficient alpha, >= 0 (DeepSeek-V3 uses 1e-4, an "extremely small" value).
    """

    name = "seq_aux_loss"

    def __init__(self, coeff: float = 1e-4) -> None:
        super().__init__(coeff)

    def loss(self, routing: Routing) -> Tensor:
        num_tokens, num_experts = routing.scores_TE.shape
        seq_len = routing.seq_len or num_tokens
        if num_tokens % seq_len:
            raise ValueError(f"Routing.seq_len={seq_len} does not divide the {num_tokens} routed tokens.")
        num_seqs = num_tokens // seq_len
        seq_A = torch.div(routing.token_A, seq_len, rounding_mode="floor")
        counts_NE = torch.zeros(num_seqs, num_experts, device=seq_A.device, dtype=routing.scores_TE.dtype)
        counts_NE.index_put_((seq_A, routing.expert_A), torch.ones_like(seq_A, dtype=counts_NE.dtype), accumulate=True)
        f_NE = counts_NE / counts_NE.sum(dim=1, keepdim=True).clamp_min(1.0)
        p_NE = routing.scores_TE.view(num_seqs, seq_len, num_experts).mean(dim=1)
        return self.coeff * num_experts * (f_NE * p_NE).sum(dim=1).mean()


class _DeviceGroupLoss(Balancer):
    """A balancer over ``num_devices`` equal groups of consecutive experts (one group per device)."""

    def __init__(self, num_devices: int, coeff: float) -> None:
        super().__init__(coeff)
        self.num_devices = check_positive_int("num_devices", num_devices)

    def check(self, num_experts: int) -> None:
        if num_experts % self.num_devices:
            raise ValueError(
                f"`num_devices` ({self.num_devices}) must divide `num_experts` ({num_experts}) into equal groups; "
                f"valid values: {divisors(num_experts)}."
            )

    def group_load(self, routing: Routing) -> Tensor:  # pragma: no cover - abstract
        """``(G,)`` load per group, 1 for each group when balanced."""
        raise NotImplementedError

    def loss(self, routing: Routing) -> Tensor:
        """``coeff * sum_i load_i * P_i``, ``P_i`` the summed mean score of group ``i``'s experts."""
        self.check(routing.num_experts)
        p_G = routing.scores_TE.mean(dim=0).view(self.num_devices, -1).sum(dim=1)
        return self.coeff * torch.dot(self.group_load(routing), p_G)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_devices={self.num_devices}, coeff={self.coeff})"


class DeviceAuxLoss(_DeviceGroupLoss):
    """Device-level balance loss (DeepSeek-V2): balance the load of expert *groups*, not experts.

    The E experts form ``num_devices`` groups of ``E/G`` consecutive experts (the experts each
    device holds under expert parallelism). With ``f_e = E n_e / A`` (1 when balanced) and
    ``P_e`` the mean score of expert ``e``:

    .. math::

        L = \\alpha \\sum_{i=1}^{G} f'_i P'_i, \\qquad f'_i = \\frac{1}{|\\mathcal{E}_i|}
        \\sum_{e \\in \\mathcal{E}_i} f_e, \\qquad P'_i = \\sum_{e \\in \\mathcal{E}_i} P_e

    Balanced groups give exactly ``L = alpha`` (``f'_i = 1``, ``P'_i = 1/G``), however unevenly
    the experts inside a group share their group's load. ``num_devices = E`` is the Switch loss.

    Args:
        num_devices: number of expert groups G, >= 1, dividing the layer's experts.
        coeff: the coefficient alpha, >= 0 (DeepSeek-V2: 0.05).
    """

    name = "device_aux_loss"

    def __init__(self, num_devices: int, coeff: float = 0.05) -> None:
        super().__init__(num_devices, coeff)

    def group_load(self, routing: Routing) -> Tensor:
        dtype = routing.scores_TE.dtype
        f_E = routing.num_experts * routing.tokens_per_expert().to(dtype) / max(routing.expert_A.numel(), 1)
        return f_E.view(self.num_devices, -1).mean(dim=1)


class CommBalanceLoss(_DeviceGroupLoss):
    """Communication balance loss (DeepSeek-V2): balance the tokens each device *receives*.

    A token is sent to device ``i`` once if any of its kept assignments lands in group ``i``,
    however many of its experts live there. With ``h_i`` such (token, device) pairs:

    .. math::

        L = \\alpha \\sum_{i=1}^{G} f''_i P''_i, \\qquad f''_i = \\frac{G\\, h_i}{\\sum_j h_j},
        \\qquad P''_i = \\sum_{e \\in \\mathcal{E}_i} P_e

    DeepSeek-V2 divides by ``M T`` (M the devices a token may reach under device-limited
    routing); dividing by the realised ``sum_j h_j`` is the same when every token reaches M
    devices, and keeps ``L = alpha`` at balance for any routing rule.

    Args:
        num_devices: number of expert groups G, >= 1, dividing the layer's experts.
        coeff: the coefficient alpha, >= 0 (DeepSeek-V2: 0.02).
    """

    name = "comm_balance_loss"

    def __init__(self, num_devices: int, coeff: float = 0.02) -> None:
        super().__init__(num_devices, coeff)

    def group_load(self, routing: Routing) -> Tensor:
        num_tokens, num_experts = routing.scores_TE.shape
        device_A = torch.div(routing.expert_A, num_experts // self.num_devices, rounding_mode="floor")
        sent_TG = torch.zeros(num_tokens, self.num_devices, dtype=torch.bool, device=device_A.device)
        sent_TG[routing.token_A, device_A] = True
        hits_G = sent_TG.sum(dim=0).to(routing.scores_TE.dtype)
        return self.num_devices * hits_G / hits_G.sum().clamp_min(1.0)


class ZLoss(Balancer):
    """Router z-loss (ST-MoE): the mean squared log-partition of the router logits.

    .. math::

        L_z = \\beta \\cdot \\frac{1}{T} \\sum_{t=1}^{T} \\Big(\\log \\sum_{e=1}^{E} e^{x_{t,e}}\\Big)^2

    It keeps logits small, so the float32 softmax stays well conditioned.

    Args:
        coeff: the coefficient beta, >= 0 (1e-3 in ST-MoE).
    """

    name = "z_loss"

    def __init__(self, coeff: float = 0.001) -> None:
        super().__init__(coeff)

    def loss(self, routing: Routing) -> Tensor:
        return self.coeff * torch.logsumexp(routing.logits_TE.float(), dim=-1).square().mean()


def bias_update(bias_E: Tensor, tokens_per_expert_E: Tensor, rate: float) -> Tensor:
    """Auxiliary-loss-free balancing (DeepSeek-V3): ``b_e + u * sign(mean load - load_e)``.

    An expert that received more than the mean load gets its selection bias lowered by ``rate``
    (``u``), one that received less gets it raised, one exactly at the mean keeps it. Pure: returns
    a new tensor; ``BiasOffsetUpdater`` decides when to call it and with which (all-reduced) loads.

    Args:
        bias_E: ``(E,)`` current bias offsets.
        tokens_per_expert_E: ``(E,)`` assignments per expert since the last update.
        rate: the update rate ``u``, >= 0 (DeepSeek-V3: 1e-3).
    """
    check_non_negative("rate", rate)
    if tokens_per_expert_E.shape != bias_E.shape:
        raise ValueError(
            f"`tokens_per_expert_E` has shape {tuple(tokens_per_expert_E.shape)}; the bias has {tuple(bias_E.shape)}."
        )
    load_E = tokens_per_expert_E.to(device=bias_E.device, dtype=torch.float64)
    return bias_E + (rate * torch.sign(load_E.mean() - load_E)).to(bias_E.dtype)
