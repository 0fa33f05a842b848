"""Expert capacity: at most ``C`` assignments per expert, the rest dropped.

Legend: ``T`` tokens, ``E`` experts, ``A`` assignments, ``C`` capacity (assignments per expert).

A dropped assignment contributes nothing to its token's output, so a token whose every
assignment is dropped leaves the MoE layer as zeros and passes through the block's residual
connection unchanged (Switch Transformer, GShard). Gate weights of the kept assignments are not
renormalised. Dropless routing (``capacity=None`` on ``MoELayer``) is the default.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal

import torch
from torch import Tensor

from lightning_moe._validate import check_positive_float, check_positive_int
from lightning_moe.routing.routing import Routing

DropPolicy = Literal["position", "score"]
DROP_POLICIES = ("position", "score")


def expert_capacity(num_assignments: int, num_experts: int, capacity_factor: float, min_capacity: int = 1) -> int:
    """``C = max(min_capacity, ceil(capacity_factor * A / E))`` (Megatron-Core's and GShard's rule).

    With ``capacity_factor = 1`` and perfectly balanced routing nothing is dropped.
    """
    return max(min_capacity, math.ceil(capacity_factor * num_assignments / num_experts))


def rank_within_expert(expert_A: Tensor, priority_A: Tensor, num_experts: int) -> Tensor:
    """``(A,)`` int64: each assignment's rank among its expert's assignments, 0 = highest priority.

    ``priority_A`` orders assignments: a smaller value is kept first.
    """
    order_A = torch.argsort(priority_A, stable=True)
    order_A = order_A[torch.argsort(expert_A[order_A], stable=True)]  # by expert, then by priority
    counts_E = torch.bincount(expert_A, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_sorted_A = torch.arange(expert_A.numel(), device=expert_A.device) - starts_E[expert_A[order_A]]
    return torch.empty_like(rank_sorted_A).scatter_(0, order_A, rank_sorted_A)


def drop_over_capacity(routing: Routing, capacity: int, policy: DropPolicy = "position") -> Routing:
    """Keep at most ``capacity`` assignments per expert; return the reduced :class:`Routing`.

    Policies:
        ``position``: an expert keeps the assignments of the earliest tokens (token index order,
            Megatron-Core's ``position``; in a batch of sequences, earlier sequences first).
        ``score``: an expert keeps the assignments with the largest gate weights (Megatron-Core's
            ``probs``); ties go to the earlier assignment.

    ``num_dropped`` of the result adds the assignments removed here to any dropped before.
    """
    check_positive_int("capacity", capacity)
    if policy not in DROP_POLICIES:
        raise ValueError(f"`drop_policy` must be one of {DROP_POLICIES}, got {policy!r}.")
    expert_A = routing.expert_A
    if expert_A.numel() == 0:
        return routing
    if policy == "position":
        priority_A = routing.token_A
    else:
        priority_A = -routing.weight_A.detach().float()
    keep_A = rank_within_expert(expert_A, priority_A, routing.num_experts) < capacity
    num_dropped = int(expert_A.numel() - int(keep_A.sum()))
    if num_dropped == 0:
        return routing
    return replace(
        routing,
        token_A=routing.token_A[keep_A],
        expert_A=expert_A[keep_A],
        weight_A=routing.weight_A[keep_A],
        num_dropped=routing.num_dropped + num_dropped,
    )


class ExpertCapacity:
    """Capacity limits for ``MoELayer``, separately for training and evaluation.

    Each expert keeps at most ``C = max(min_capacity, ceil(factor * A / E))`` assignments per
    forward, ``A`` being the assignments the router made (``T * K`` for token choice). Dropped
    tokens pass through the residual unchanged. Give ``MoELayer(capacity=None)`` for dropless
    routing (the default); here ``eval_capacity_factor=None`` means dropless in evaluation only.

    Args:
        capacity_factor: training factor, > 0 (Switch: 1.0 to 1.25).
        eval_capacity_factor: evaluation factor, > 0, or ``None`` for dropless evaluation
            (Switch: 2.0).
        drop_policy: ``position`` (earliest tokens kept) or ``score`` (highest gates kept).
        min_capacity: smallest capacity, >= 1.
    """

    def __init__(
        self,
        capacity_factor: float = 1.25,
        eval_capacity_factor: float | None = 2.0,
        drop_policy: DropPolicy = "position",
        min_capacity: int = 1,
    ) -> None:
        self.capacity_factor = check_positive_float("capacity_factor", capacity_factor)
        self.eval_capacity_factor = (
            None if eval_capacity_factor is None else check_positive_float("eval_capacity_factor", eval_capacity_factor)
        )
        if drop_policy not in DROP_POLICIES:
            raise ValueError(f"`drop_policy` must be one of {DROP_POLICIES}, got {drop_policy!r}.")
        self.drop_policy = drop_policy
        self.min_capacity = check_positive_int("min_capacity", min_capacity)

    def capacity(self, num_assignments: int, num_experts: int, training: bool) -> int | None:
        """Assignments each expert may keep, or ``None`` when this mode is dropless."""
        factor = self.capacity_factor if training else self.eval_capacity_factor
        if factor is None:
            return None
        return expert_capacity(num_assignments, num_experts, factor, self.min_capacity)

    def __call__(self, routing: Routing, training: bool) -> Routing:
        capacity = self.capacity(routing.expert_A.numel(), routing.num_experts, training)
        if capacity is None:
            return routing
        return drop_over_capacity(routing, capacity, self.drop_policy)

    def __repr__(self) -> str:
        return (f"ExpertCapacity(capacity_factor={self.capacity_factor}, "
                f"eval_capacity_factor={self.eval_capacity_factor}, drop_policy={self.drop_policy!r}, "
                f"min_capacity={self.min_capacity})")
