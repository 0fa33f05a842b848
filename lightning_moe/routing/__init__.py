"""Routers: ``forward(x_TD, token_ids_T=None) -> Routing``. A router is a scorer plus a selection rule.

Scorers (``scorer(d_model, num_experts)``, ``(x_TD, token_ids_T) -> logits_TE``): :class:`LinearScorer`,
:class:`AttentionScorer`, :class:`MLPScorer`, :class:`HybridScorer`, :class:`MLPHadamardScorer` score
the (centred) hidden states; :class:`SelfSupervisedScorer` scores features of an extractor trained by an
InfoNCE pretext loss that it brings as an auxiliary loss (a router may bring losses of its own:
``Routing.aux_losses``); :class:`TokenScorer` is a learned table per token id.
Selection rules, each taking any scorer: :class:`TopKRouter` (softmax or sigmoid, bias, jitter,
scaling), :class:`GroupLimitedTopKRouter`, :class:`ExpertChoiceRouter`, :class:`BalancedRouter`.
Parameter-free routers: :class:`HashRouter`, :class:`RandomRouter`.
Capacity limits with token dropping: :class:`ExpertCapacity` (``MoELayer(capacity=...)``).
"""

from lightning_moe.routing.balanced import BalancedRouter, greedy_balanced_assignment, sinkhorn_log
from lightning_moe.routing.capacity import ExpertCapacity, drop_over_capacity, expert_capacity
from lightning_moe.routing.expert_choice import ExpertChoiceRouter
from lightning_moe.routing.factory import RouterFactory, build_router
from lightning_moe.routing.hashing import HashRouter, RandomRouter
from lightning_moe.routing.routing import LossWeight, Router, Routing
from lightning_moe.routing.scorers import (
    AttentionScorer,
    HybridScorer,
    LinearScorer,
    MLPHadamardScorer,
    MLPScorer,
    Scorer,
    ScorerFactory,
    TokenScorer,
)
from lightning_moe.routing.self_supervised import SelfSupervisedScorer, info_nce_loss
from lightning_moe.routing.topk import GroupLimitedTopKRouter, TopKRouter

__all__ = [
    "AttentionScorer", "BalancedRouter", "ExpertCapacity", "ExpertChoiceRouter", "GroupLimitedTopKRouter",
    "HashRouter", "HybridScorer", "LinearScorer", "LossWeight", "MLPHadamardScorer", "MLPScorer", "RandomRouter",
    "Router", "RouterFactory", "Routing", "Scorer", "ScorerFactory", "SelfSupervisedScorer", "TokenScorer",
    "TopKRouter", "build_router", "drop_over_capacity", "expert_capacity", "greedy_balanced_assignment",
    "info_nce_loss", "sinkhorn_log",
]
