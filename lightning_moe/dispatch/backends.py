"""Dispatch backends: move tokens to their experts and combine the outputs with the gates.

Legend: ``T`` tokens, ``D`` model width, ``E`` experts, ``A`` assignments.

Every backend computes the same function ``y_t = sum_{a: token_a = t} weight_a * expert_{e_a}(x_t)``
and is tested against ``loop``, the readable reference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from lightning_moe.dispatch.fused import triton_dispatch
from lightning_moe.dispatch.grouped import grouped_dispatch
from lightning_moe.routing.routing import Routing


class Experts(Protocol):
    num_experts: int

    def expert_forward(self, expert: int, x_ND: Tensor) -> Tensor: ...

    def grouped_forward(self, x_AD: Tensor, counts: list[int]) -> Tensor: ...


Dispatcher = Callable[[Tensor, Routing, Experts], Tensor]


def loop_dispatch(x_TD: Tensor, routing: Routing, experts: Experts) -> Tensor:
    """The reference: for each expert, pick its assignments with a mask, run it, add back."""
    y_TD = torch.zeros_like(x_TD)
    for expert in range(experts.num_experts):
        mask_A = routing.expert_A == expert
        token_N = routing.token_A[mask_A]
        out_ND = experts.expert_forward(expert, x_TD[token_N])
        weighted_ND = out_ND * routing.weight_A[mask_A].unsqueeze(-1).to(out_ND.dtype)
        y_TD = y_TD.index_add(0, token_N, weighted_ND.to(y_TD.dtype))
    return y_TD


DISPATCHERS: dict[str, Dispatcher] = {"loop": loop_dispatch, "grouped": grouped_dispatch, "triton": triton_dispatch}


def get_dispatcher(name: str) -> Dispatcher:
    """The backend called ``name``; ``ValueError`` lists the valid names otherwise."""
    try:
        return DISPATCHERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown `dispatcher` {name!r}; valid names are {sorted(DISPATCHERS)}.") from None
