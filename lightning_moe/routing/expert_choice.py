"""Expert-choice routing (Zhou et al., 2022): each expert takes its top-C tokens.

Legend: ``T`` tokens, ``D`` model width, ``E`` experts, ``C`` tokens per expert (capacity),
``A`` assignments (``A = E * C`` here).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_moe._validate import check_positive_float, check_positive_int
from lightning_moe.routing.routing import Router, Routing
from lightning_moe.routing.scorers import LinearScorer, ScorerFactory, build_scorer


class ExpertChoiceRouter(Router):
    """Every expert picks the ``C = ceil(capacity_factor * T / E)`` tokens it scores highest.

    Scores are a softmax over experts per token; expert e takes the C tokens with the largest
    ``scores_TE[:, e]`` and weights each by that score. Loads are balanced by construction (every
    expert gets exactly C tokens, C capped at T), and a token may reach zero, one or several
    experts; one reached by none passes through the residual stream only. ``capacity_factor`` is
    the average number of experts per token.

    Expert choice looks at every token of the batch at once, so in a causal language model a
    token's routing depends on later tokens (Zhou et al. discuss this); use it for research on
    routing, or with token-choice at generation time.

    Args:
        d_model: width of the hidden states routed, >= 1.
        num_experts: number of experts E, >= 1.
        capacity_factor: average experts per token, > 0 (C = ceil(capacity_factor * T / E)).
        scorer: scorer factory, called as ``scorer(d_model, num_experts)``.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        capacity_factor: float = 2.0,
        scorer: ScorerFactory = LinearScorer,
    ) -> None:
        check_positive_float("capacity_factor", capacity_factor)
        super().__init__(d_model, num_experts, max(1, min(num_experts, round(capacity_factor))))
        self.capacity_factor = float(capacity_factor)
        self.scorer = build_scorer(scorer, d_model, num_experts)

    @property
    def experts_per_token(self) -> float:
        return min(self.capacity_factor, float(self.num_experts))

    def scale_experts_per_token(self, factor: int) -> None:
        """Expert choice reaches ``capacity_factor`` experts per token on average: scale that."""
        check_positive_int("factor", factor)
        self.capacity_factor *= factor
        self.top_k = max(1, min(self.num_experts, round(self.capacity_factor)))

    def capacity(self, num_tokens: int) -> int:
        """Tokens each expert takes from a batch of ``num_tokens``."""
        return min(num_tokens, max(1, math.ceil(self.capacity_factor * num_tokens / self.num_experts)))

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None) -> Routing:
        logits_TE = self.scorer(x_TD, token_ids_T)
        scores_TE = logits_TE.softmax(dim=-1)
        capacity = self.capacity(x_TD.shape[0])
        gates_EC, tokens_EC = scores_TE.T.topk(capacity, dim=-1)
        expert_A = torch.arange(self.num_experts, device=x_TD.device).repeat_interleave(capacity)
        return self.with_own_losses(Routing(scores_TE=scores_TE, logits_TE=logits_TE, token_A=tokens_EC.reshape(-1),
                                            expert_A=expert_A, weight_A=gates_EC.reshape(-1)))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, capacity_factor={self.capacity_factor}"
