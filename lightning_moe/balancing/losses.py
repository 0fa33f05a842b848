"""Balancing losses computed from a :class:`~lightning_moe.routing.Routing`.

Legend: ``T`` tokens, ``E`` experts, ``K`` experts per token, ``A`` kept assignments.

A balancer is a plain object (not a module): it holds a coefficient that a callback may change
at run time, and returns ``coeff * raw_loss`` from ``loss(routing)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_moe._validate import check_non_negative
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

    def __repr__(self) -> str:
        return f"{type(self).__name__}(coeff={self.coeff})"


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
