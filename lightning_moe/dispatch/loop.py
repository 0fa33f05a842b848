"""The ``loop`` backend: the readable reference every other backend is tested against.

Legend: ``T`` tokens, ``D`` model width, ``A`` assignments, ``N`` rows of one expert.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_moe.dispatch.base import Dispatcher, Plan
from lightning_moe.experts.protocol import Experts
from lightning_moe.routing.routing import Routing


class LoopDispatcher(Dispatcher):
    """For each expert: pick its assignments with a mask, run it, add the gated rows back."""

    name = "loop"

    def compute(self, x_AD: Tensor, plan: Plan, experts: Experts) -> Tensor:
        rows = x_AD.split(plan.counts())
        return torch.cat([experts.expert_forward(e, x_ND) for e, x_ND in enumerate(rows)])

    def __call__(self, x_TD: Tensor, routing: Routing, experts: Experts) -> Tensor:
        y_TD = torch.zeros_like(x_TD)
        for expert in range(experts.num_experts):
            mask_A = routing.expert_A == expert
            token_N = routing.token_A[mask_A]
            out_ND = experts.expert_forward(expert, x_TD[token_N])
            weighted_ND = out_ND * routing.weight_A[mask_A].unsqueeze(-1).to(out_ND.dtype)
            y_TD = y_TD.index_add(0, token_N, weighted_ND.to(y_TD.dtype))
        return y_TD


loop_dispatch = LoopDispatcher()
"""A shared ``loop`` dispatcher: ``loop_dispatch(x_TD, routing, experts) -> y_TD``."""
