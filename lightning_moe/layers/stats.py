"""Detached routing statistics that callbacks and metrics read after each forward.

Legend: ``T`` tokens, ``E`` experts, ``A`` kept assignments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_moe.routing.routing import Routing


@dataclass(frozen=True)
class RoutingStats:
    """What one MoE layer did in its last forward; every tensor is detached.

    Attributes:
        tokens_per_expert_E: int64 kept assignments per expert.
        mean_score_E: mean normalised router score per expert over the tokens.
        entropy: mean over tokens of the entropy (nats) of each token's score distribution.
        num_dropped: int64 assignments removed by capacity (0 when dropless).
        num_tokens: tokens routed (T).
        token_A: int64 token index of each kept assignment, or ``None`` where the layer did not
            record them; the routing's own tensor, detached (not a copy).
        expert_A: int64 expert index of each kept assignment (``None`` with ``token_A``).
    """

    tokens_per_expert_E: Tensor
    mean_score_E: Tensor
    entropy: Tensor
    num_dropped: Tensor
    num_tokens: int
    token_A: Tensor | None = None
    expert_A: Tensor | None = None

    @classmethod
    @torch.no_grad()
    def from_routing(cls, routing: Routing) -> RoutingStats:
        scores_TE = routing.scores_TE.detach().float()
        # xlogy gives 0 * log 0 = 0 for experts with zero probability.
        entropy_T = -torch.special.xlogy(scores_TE, scores_TE).sum(dim=-1)
        device = scores_TE.device
        return cls(
            tokens_per_expert_E=routing.tokens_per_expert().detach(),
            mean_score_E=scores_TE.mean(dim=0),
            entropy=entropy_T.mean(),
            # A Python int becomes a filled tensor (a kernel), not a host-to-device copy.
            num_dropped=(routing.num_dropped.detach().to(device=device, dtype=torch.long)
                         if isinstance(routing.num_dropped, Tensor)
                         else torch.full((), routing.num_dropped, device=device, dtype=torch.long)),
            num_tokens=routing.num_tokens,
            token_A=routing.token_A.detach(),
            expert_A=routing.expert_A.detach(),
        )

    @property
    def dropped_fraction(self) -> Tensor:
        """Share of the router's assignments that capacity dropped, in [0, 1]."""
        kept = self.tokens_per_expert_E.sum()
        return self.num_dropped.float() / (kept + self.num_dropped).clamp_min(1).float()

    @property
    def load_fraction_E(self) -> Tensor:
        """Share of kept assignments per expert (sums to 1)."""
        counts_E = self.tokens_per_expert_E.float()
        return counts_E / counts_E.sum().clamp_min(1.0)

    @torch.no_grad()
    def expert_mask_TE(self) -> Tensor | None:
        """``(T, E)`` bool: ``True`` where the token reached the expert (a kept assignment); ``None``
        without ``token_A``/``expert_A``. Each token's expert set: ``K`` experts under top-k, any number
        (zero included) under expert choice or capacity drops. Built on the tensors' device with no
        host-device synchronisation."""
        if self.token_A is None or self.expert_A is None:
            return None
        mask_TE = torch.zeros(self.num_tokens, self.tokens_per_expert_E.numel(), dtype=torch.bool,
                              device=self.expert_A.device)
        mask_TE[self.token_A, self.expert_A] = True
        return mask_TE
