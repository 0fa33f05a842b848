"""Balanced global assignment: every expert gets an equal share of the batch in training.

Legend: ``T`` tokens, ``D`` model width, ``E`` experts, ``K`` experts per token,
``P`` tokens still waiting for an expert, ``A`` assignments (``A = T * K`` here).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from lightning_moe._validate import check_positive_int
from lightning_moe.routing.routing import Router
from lightning_moe.routing.scorers import LinearScorer, ScorerFactory, build_scorer
from lightning_moe.routing.topk import token_choice_routing


@torch.no_grad()
def sinkhorn_log(logits_TE: Tensor, num_iters: int) -> Tensor:
    """Sinkhorn-normalise ``exp(logits)`` towards rows summing to 1 and columns to ``T / E``.

    Works in log space (no overflow whatever the logits); returns the log of the normalised
    matrix. This is the balancing step of Megatron-Core's ``sinkhorn`` routing and of
    Clark et al.'s S-BASE, with a fixed iteration count instead of a tolerance.
    """
    num_tokens, num_experts = logits_TE.shape
    log_col_mass = math.log(num_tokens / num_experts)
    log_p_TE = logits_TE.float()
    for _ in range(num_iters):
        log_p_TE = log_p_TE - torch.logsumexp(log_p_TE, dim=0, keepdim=True) + log_col_mass
        log_p_TE = log_p_TE - torch.logsumexp(log_p_TE, dim=1, keepdim=True)
    return log_p_TE


def _place_stuck_token(token: int, choice_TE: Tensor, allowed_TE: Tensor, expert_T: Tensor, room_E: Tensor) -> None:
    """Place a token whose only experts with room are ones it already holds.

    Swap: a token placed in this pass on an expert f the stuck token lacks moves to an expert e
    with room that it lacks, and the stuck token takes f (the swap that loses the least score).
    Without such a swap, the token overflows into its best expert it does not hold.
    """
    neg_inf = float("-inf")
    has_room_E = room_E > 0
    placed = expert_T >= 0
    f_T = expert_T.clamp_min(0)
    # candidate movers: placed, on an expert the stuck token lacks; targets: experts with room the mover lacks.
    mover_ok_T = placed & allowed_TE[token, f_T] & (torch.arange(expert_T.numel(), device=expert_T.device) != token)
    gain_TE = choice_TE - choice_TE.gather(1, f_T.unsqueeze(1)) + choice_TE[token, f_T].unsqueeze(1)
    gain_TE = gain_TE.masked_fill(~(allowed_TE & has_room_E & mover_ok_T.unsqueeze(1)), neg_inf)
    best = int(gain_TE.argmax())
    mover, target = divmod(best, choice_TE.shape[1])
    if gain_TE[mover, target] > neg_inf:
        expert_T[token] = expert_T[mover]
        expert_T[mover] = target
        room_E[target] -= 1
        return
    fallback = int(choice_TE[token].masked_fill(~allowed_TE[token], neg_inf).argmax())
    expert_T[token] = fallback
    room_E[fallback] -= 1


@torch.no_grad()
def greedy_balanced_assignment(choice_TE: Tensor, top_k: int) -> Tensor:
    """``(T, K)`` distinct experts per token with every expert's load equal, up to rounding.

    Each of K passes gives every token one more expert, an expert holding at most
    ``ceil((k + 1) T / E)`` tokens after pass k: waiting tokens propose to their best expert that still has
    room (and that they do not hold yet); each expert accepts its highest-scoring proposals up to
    its room; the rest propose again. Every round either places all waiting tokens or fills an
    expert, so a pass takes at most E rounds of vector operations. This greedy auction
    approximates BASE layers' linear assignment (Lewis et al., 2021). When a token's only
    experts with room are ones it already holds (K > 1), it swaps with a token placed earlier in
    the pass; only when no swap exists does it overflow (then the next pass gives the room back).
    """
    num_tokens, num_experts = choice_TE.shape
    device = choice_TE.device
    load_E = torch.zeros(num_experts, dtype=torch.long, device=device)
    experts_TK = torch.empty(num_tokens, top_k, dtype=torch.long, device=device)
    allowed_TE = torch.ones(num_tokens, num_experts, dtype=torch.bool, device=device)
    neg_inf = float("-inf")
    for k in range(top_k):
        # Room is cumulative: after pass k an expert holds at most ceil((k + 1) T / E) tokens, so an
        # overflow in one pass is taken back in the next.
        room_E = (math.ceil((k + 1) * num_tokens / num_experts) - load_E).clamp_min(0)
        expert_T = torch.full((num_tokens,), -1, dtype=torch.long, device=device)
        pending_P = torch.arange(num_tokens, device=device)
        while pending_P.numel():
            pref_PE = choice_TE[pending_P].masked_fill(~(allowed_TE[pending_P] & (room_E > 0)), neg_inf)
            best_score_P, best_P = pref_PE.max(dim=-1)
            stuck_P = best_score_P == neg_inf
            if bool(stuck_P.any()):
                for token in pending_P[stuck_P].tolist():
                    _place_stuck_token(token, choice_TE, allowed_TE, expert_T, room_E)
                pending_P, best_P, best_score_P = pending_P[~stuck_P], best_P[~stuck_P], best_score_P[~stuck_P]
            # Proposals grouped by expert, best score first inside each group.
            order = best_score_P.argsort(descending=True, stable=True)
            order = order[best_P[order].argsort(stable=True)]
            sorted_experts = best_P[order]
            counts_E = torch.bincount(sorted_experts, minlength=num_experts)
            starts_E = counts_E.cumsum(0) - counts_E
            rank = torch.arange(order.numel(), device=device) - starts_E[sorted_experts]
            accepted = rank < room_E[sorted_experts]
            winners = order[accepted]
            expert_T[pending_P[winners]] = best_P[winners]
            room_E -= torch.bincount(best_P[winners], minlength=num_experts)
            pending_P = pending_P[order[~accepted]]
        experts_TK[:, k] = expert_T
        load_E += torch.bincount(expert_T, minlength=num_experts)
        allowed_TE[torch.arange(num_tokens, device=device), expert_T] = False
    return experts_TK


class BalancedRouter(Router):
    """Balanced global assignment in training, plain top-k at evaluation.

    ``method="greedy"``: a greedy auction over the whole batch (BASE-layer style) in which no
    expert receives more than ``ceil(K T / E)`` assignments, so loads are equal up to rounding.
    ``method="sinkhorn"``: tokens take their top-k of the Sinkhorn-normalised scores
    (Megatron-Core's ``sinkhorn`` load balancing, S-BASE): loads are close to equal, not exactly.
    In both, gate weights are the softmax scores of the chosen experts (renormalised over them when
    ``renormalize=True``), so the router learns through them. At evaluation (``model.eval()``)
    the router picks each token's plain top-k, the usual practice (BASE layers, Megatron), unless
    ``balance_in_eval=True``.

    Args:
        d_model: width of the hidden states routed, >= 1.
        num_experts: number of experts E, >= 1.
        top_k: experts per token K, in [1, num_experts].
        method: ``greedy`` or ``sinkhorn``.
        sinkhorn_iters: Sinkhorn iterations, >= 1.
        renormalize: renormalise the gates over a token's K experts.
        balance_in_eval: keep the balanced assignment at evaluation too.
        scorer: scorer factory, called as ``scorer(d_model, num_experts)``.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 1,
        method: Literal["greedy", "sinkhorn"] = "greedy",
        sinkhorn_iters: int = 10,
        renormalize: bool = False,
        balance_in_eval: bool = False,
        scorer: ScorerFactory = LinearScorer,
    ) -> None:
        super().__init__(d_model, num_experts, top_k)
        if method not in ("greedy", "sinkhorn"):
            raise ValueError(f"`method` must be 'greedy' or 'sinkhorn', got {method!r}.")
        self.method = method
        self.sinkhorn_iters = check_positive_int("sinkhorn_iters", sinkhorn_iters)
        self.renormalize = renormalize
        self.balance_in_eval = balance_in_eval
        self.scorer = build_scorer(scorer, d_model, num_experts)

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None):
        logits_TE = self.scorer(x_TD, token_ids_T)
        scores_TE = logits_TE.softmax(dim=-1)
        if self.training or self.balance_in_eval:
            if self.method == "greedy":
                experts_TK = greedy_balanced_assignment(logits_TE.detach(), self.top_k)
            else:
                experts_TK = sinkhorn_log(logits_TE.detach(), self.sinkhorn_iters).topk(self.top_k, dim=-1).indices
        else:
            experts_TK = scores_TE.detach().topk(self.top_k, dim=-1).indices
        gates_TK = scores_TE.gather(1, experts_TK)
        if self.renormalize:
            gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True)
        return self.with_own_losses(token_choice_routing(scores_TE, logits_TE, experts_TK, gates_TK))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"method={self.method!r}, renormalize={self.renormalize}, balance_in_eval={self.balance_in_eval}")
