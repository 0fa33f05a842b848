"""Routing statistics as torchmetrics ``Metric``s, so they synchronise across ranks the standard way.

Legend: ``E`` experts.

Each metric accumulates sums (``dist_reduce_fx="sum"``) from the detached
:class:`~lightning_moe.layers.RoutingStats` of one MoE layer's forwards; ``compute()`` reduces the
sums over every rank of the process group and divides, so it equals what one process that saw
all ranks' tokens would compute:

- :class:`RoutingEntropy`: mean token routing entropy (nats), token-weighted over the updates.
- :class:`ExpertLoad`: share of the kept assignments that went to each expert, ``(E,)``.
- :class:`DroppedFraction`: share of the router's assignments that capacity dropped.

:func:`load_summary` condenses a load vector into balance scalars (normalised load entropy,
largest and smallest share, coefficient of variation).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_moe._validate import check_positive_int
from lightning_moe.layers.stats import RoutingStats


class RoutingEntropy(Metric):
    """Mean over tokens of the entropy (nats) of each token's router score distribution.

    Each update contributes ``stats.entropy`` weighted by ``stats.num_tokens``, so ``compute()``
    is the mean over all tokens of all updates (and all ranks). It ranges from 0 (every token
    puts all its score on one expert: a decisive router) to ``log E`` (uniform scores: an
    indecisive router). ``nan`` before any token was seen.

    Args:
        kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``, ...).
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    entropy_sum: Tensor
    num_tokens: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("entropy_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("num_tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, stats: RoutingStats) -> None:
        """Add one forward's tokens.

        Args:
            stats: the layer's :class:`~lightning_moe.layers.RoutingStats`; a forward of 0 tokens
                is ignored.
        """
        if stats.num_tokens == 0:
            return
        entropy = stats.entropy.detach().to(device=self.entropy_sum.device, dtype=self.entropy_sum.dtype)
        self.entropy_sum += entropy * stats.num_tokens
        self.num_tokens += stats.num_tokens

    def compute(self) -> Tensor:
        """Token-weighted mean entropy in nats (a float32 scalar)."""
        return self.entropy_sum / self.num_tokens


class ExpertLoad(Metric):
    """Share of the kept assignments that went to each expert, ``(E,)``, summing to 1.

    Accumulates ``stats.tokens_per_expert_E`` (int64 counts, exact at any scale) in
    ``tokens_per_expert_E``; ``compute()`` divides the counts summed over updates and ranks by
    their total (all zeros when nothing was kept). Perfect balance is ``1/E`` everywhere.
    ``num_tokens`` sums ``stats.num_tokens`` the same way, so ``tokens_per_expert_E / num_tokens``
    (read inside :meth:`sync_context` for all ranks) is the fraction of the tokens each expert
    reached (for token-choice routing, where a token reaches an expert at most once).

    Args:
        num_experts: E, >= 1; every update must have ``E`` entries.
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    tokens_per_expert_E: Tensor
    num_tokens: Tensor

    def __init__(self, num_experts: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.add_state("tokens_per_expert_E", default=torch.zeros(num_experts, dtype=torch.long),
                       dist_reduce_fx="sum")
        self.add_state("num_tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, stats: RoutingStats) -> None:
        """Add one forward's kept assignments per expert and its tokens.

        Args:
            stats: the layer's :class:`~lightning_moe.layers.RoutingStats`; its
                ``tokens_per_expert_E`` must have ``num_experts`` entries.
        """
        counts_E = stats.tokens_per_expert_E.detach()
        if counts_E.shape != (self.num_experts,):
            raise ValueError(
                f"`stats.tokens_per_expert_E` must have shape ({self.num_experts},) (num_experts={self.num_experts}), "
                f"got {tuple(counts_E.shape)}."
            )
        self.tokens_per_expert_E += counts_E.to(device=self.tokens_per_expert_E.device, dtype=torch.long)
        self.num_tokens += stats.num_tokens

    def compute(self) -> Tensor:
        """Load fraction per expert, ``(E,)`` float32."""
        counts_E = self.tokens_per_expert_E.float()
        return counts_E / counts_E.sum().clamp_min(1.0)


class DroppedFraction(Metric):
    """Share of the router's assignments that capacity dropped: ``dropped / (kept + dropped)``.

    0 for dropless routing (and before any assignment was seen); 1 would mean every assignment
    was dropped.

    Args:
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    dropped: Tensor
    kept: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("dropped", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("kept", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, stats: RoutingStats) -> None:
        """Add one forward's kept and dropped assignments.

        Args:
            stats: the layer's :class:`~lightning_moe.layers.RoutingStats`.
        """
        device = self.dropped.device
        self.dropped += stats.num_dropped.detach().to(device=device, dtype=torch.long).sum()
        self.kept += stats.tokens_per_expert_E.detach().to(device=device, dtype=torch.long).sum()

    def compute(self) -> Tensor:
        """Dropped share in [0, 1] (a float32 scalar)."""
        total = (self.kept + self.dropped).clamp_min(1)
        return self.dropped.float() / total.float()


def load_summary(load_fraction_E: Tensor) -> dict[str, Tensor]:
    """Balance scalars of one layer's expert load.

    The input is normalised to sum to 1 first, so raw counts work as well as fractions.

    Args:
        load_fraction_E: ``(E,)`` non-negative load per expert (e.g. :meth:`ExpertLoad.compute`).

    Returns:
        Float32 scalars:

        - ``load_entropy``: entropy of the load shares divided by ``log E``: 1 for perfect
          balance, 0 when one expert takes everything (and for an all-zero load). 1 when E = 1.
        - ``max_share`` / ``min_share``: the largest and smallest share (both ``1/E`` balanced).
        - ``load_cv``: coefficient of variation ``std / mean`` of the load (population std):
          0 for perfect balance, ``sqrt(E - 1)`` when one expert takes everything (0 for an
          all-zero load).
    """
    if load_fraction_E.ndim != 1 or load_fraction_E.numel() == 0:
        raise ValueError(f"`load_fraction_E` must be a non-empty 1-D tensor (E,), got shape "
                         f"{tuple(load_fraction_E.shape)}.")
    load_E = load_fraction_E.detach().float()
    num_experts = load_E.numel()
    share_E = load_E / load_E.sum().clamp_min(torch.finfo(torch.float32).tiny)
    if num_experts == 1:
        load_entropy = torch.ones((), device=load_E.device)
    else:
        load_entropy = (-torch.special.xlogy(share_E, share_E).sum() / math.log(num_experts)).clamp(0.0, 1.0)
    mean = share_E.mean()
    std = share_E.std(correction=0) if num_experts > 1 else torch.zeros_like(mean)
    load_cv = torch.where(mean > 0, std / mean.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(mean))
    return {
        "load_entropy": load_entropy,
        "max_share": share_E.max(),
        "min_share": share_E.min(),
        "load_cv": load_cv,
    }
