"""Token-choice top-k routing with a linear scorer.

Legend: ``T`` tokens, ``D`` model width, ``E`` experts, ``K`` experts per token,
``A`` assignments (``A = T * K`` here).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe._validate import check_int_range, check_positive_int
from lightning_moe.routing.routing import Router, Routing


class LinearScorer(nn.Module):
    """One projection from the hidden state to E logits, computed in float32.

    Logits are computed with autocast disabled in float32 (float64 stays float64), whatever the
    model's dtype: small logit differences decide the top-k, and low-precision softmaxes are a
    known source of MoE instability. Parameters: ``E * D`` (no bias).
    """

    def __init__(self, d_model: int, num_experts: int) -> None:
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.weight_ED = nn.Parameter(torch.empty(num_experts, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same scale as nn.Linear's default, so initial logits are O(1) whatever D.
        bound = 1.0 / math.sqrt(self.d_model)
        nn.init.uniform_(self.weight_ED, -bound, bound)

    def forward(self, x_TD: Tensor) -> Tensor:
        dtype = torch.promote_types(x_TD.dtype, torch.float32)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return F.linear(x_TD.to(dtype), self.weight_ED.to(dtype))  # (T, E), float32 or wider


class TopKRouter(Router):
    """Token-choice top-k with softmax scores over all experts (Switch, Mixtral, Qwen-MoE).

    Each token keeps its ``top_k`` highest-scoring experts. With ``renormalize=True`` the kept
    scores are divided by their sum, so a token's gates sum to 1 (Mixtral); with ``False`` the
    gates are the softmax probabilities themselves (Switch, Qwen2-MoE's default), which sum to
    less than 1. With ``top_k=1`` renormalising makes every gate 1 and cuts the router off from
    the language-model gradient (a warning says so): Switch routing uses ``renormalize=False``.

    Args:
        d_model: width of the hidden states routed, >= 1.
        num_experts: number of experts E, >= 1.
        top_k: experts per token K, in [1, num_experts].
        renormalize: renormalise the gate weights over the top-k.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, renormalize: bool = True) -> None:
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.top_k = check_int_range("top_k", top_k, 1, num_experts)
        self.renormalize = renormalize
        if top_k == 1 and renormalize and num_experts > 1:
            warnings.warn(
                "TopKRouter(top_k=1, renormalize=True) gives every token a gate of exactly 1, so the router "
                "learns from the balancing losses only. Use renormalize=False for Switch-style top-1 routing.",
                stacklevel=2,
            )
        self.scorer = LinearScorer(d_model, num_experts)

    def forward(self, x_TD: Tensor) -> Routing:
        logits_TE = self.scorer(x_TD)
        scores_TE = logits_TE.softmax(dim=-1)
        gates_TK, experts_TK = scores_TE.topk(self.top_k, dim=-1)
        if self.renormalize:
            gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True)
        num_tokens = x_TD.shape[0]
        token_A = torch.arange(num_tokens, device=x_TD.device).repeat_interleave(self.top_k)
        return Routing(
            scores_TE=scores_TE,
            logits_TE=logits_TE,
            token_A=token_A,
            expert_A=experts_TK.reshape(-1),
            weight_A=gates_TK.reshape(-1),
        )

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"renormalize={self.renormalize}")
