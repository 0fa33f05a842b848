"""The MoE layer: a drop-in replacement for a dense FFN, ``(..., D) -> (..., D)``.

Legend: ``T`` tokens (leading dimensions flattened), ``D`` model width, ``E`` experts,
``F`` expert hidden width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from lightning_moe._validate import check_non_negative_int, check_positive_int, divisors
from lightning_moe.balancing.losses import Balancer, check_balancers
from lightning_moe.dispatch.backends import get_dispatcher
from lightning_moe.experts.swiglu import SwiGLU, SwiGLUExperts
from lightning_moe.layers.stats import RoutingStats
from lightning_moe.parallel.expert_parallel import expert_parallel_dispatch, slice_expert_state_dict
from lightning_moe.parallel.groups import ExpertParallelGroups
from lightning_moe.routing.capacity import ExpertCapacity
from lightning_moe.routing.routing import Router, Routing
from lightning_moe.routing.topk import TopKRouter

ExpertsFactory = Callable[[int, int, int], nn.Module]
"""Builds the routed experts from ``(d_model, d_ff, num_experts)``."""


def route(router: Router, x: Tensor, capacity: ExpertCapacity | None, training: bool,
          token_ids: Tensor | None = None) -> Routing:
    """Route ``x`` of shape ``(..., D)`` (flattened to ``(T, D)``): the router's decision, with
    ``seq_len`` set from a ``(B, S, D)`` input (sequence-level balancers) and the capacity limit
    applied. ``MoELayer`` and ``RouterGate`` (routers swapped into Hugging Face blocks) share it."""
    routing = router(x.reshape(-1, router.d_model), None if token_ids is None else token_ids.reshape(-1))
    if x.dim() >= 3:
        routing.seq_len = x.shape[-2]
    return routing if capacity is None else capacity(routing, training)


class MoELayer(nn.Module):
    """Router -> dispatch -> experts -> gated combine, plus optional shared experts.

    With ``shared_d_ff > 0`` every token also passes through a dense SwiGLU of that width (the
    shared experts, merged into one MLP as DeepSeek-V3 and Qwen2-MoE do: ``n`` shared experts of
    width F are one SwiGLU of width ``n * F``), added to the routed output. With
    ``shared_gate=True`` its output is scaled per token by ``sigmoid(x w_g)`` (Qwen2-MoE's
    ``shared_expert_gate``, one ``(1, D)`` weight); without it (DeepSeek) it is added as is.

    After each forward the layer holds ``aux_losses`` (``{balancer.name: loss}``, tensors with
    grad, to be added to the training loss) and ``stats`` (a detached :class:`RoutingStats`).
    Both are overwritten by the next forward; nothing is stored anywhere else.

    Args:
        d_model: model width D, >= 1.
        d_ff: hidden width F of each expert, >= 1.
        num_experts: number of experts E, >= 1.
        router: the router; its ``d_model`` and ``num_experts`` must match. Defaults to
            ``TopKRouter(d_model, num_experts, top_k=2)``.
        balancers: auxiliary losses computed from each routing decision (none by default).
        dispatcher: dispatch backend name, one of ``lightning_moe.dispatch.DISPATCHERS``.
        capacity: expert capacity limits (:class:`~lightning_moe.routing.ExpertCapacity`);
            ``None`` (the default) is dropless. Tokens whose every assignment is dropped come out
            as zeros, i.e. unchanged through the block's residual connection.
        shared_d_ff: hidden width of the shared experts (all of them together), >= 0; 0 = none.
        shared_gate: scale the shared experts' output by a learned sigmoid gate per token
            (needs ``shared_d_ff > 0``).
        experts: experts factory called as ``experts(d_model, d_ff, num_experts)``; SwiGLU
            (:class:`~lightning_moe.experts.SwiGLUExperts`) by default. Any module with the
            dispatchers' ``Experts`` protocol (``expert_forward``, ``grouped_forward``) works;
            ``grouped`` and ``triton`` have their fused paths for SwiGLU experts only.
        expert_parallel_size: ranks the experts are split over (P), >= 1, dividing
            ``num_experts``. With P > 1 the layer is built whole (the same weights as with P = 1
            for the same seed) and keeps only its ``E / P`` experts once
            :func:`~lightning_moe.parallel.setup_expert_parallel` runs on every rank
            (``MoELanguageModel.setup`` calls it); tokens then reach their experts by all-to-all,
            dropless, and ``dispatcher`` runs the local experts. Until then it computes locally.

    Under expert parallelism ``exchange`` holds, after each forward, the rows sent to and received
    from each rank of the group (``sent_rows``, ``received_rows``).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        router: Router | None = None,
        balancers: Sequence[Balancer] = (),
        dispatcher: str = "grouped",
        capacity: ExpertCapacity | None = None,
        shared_d_ff: int = 0,
        shared_gate: bool = False,
        experts: ExpertsFactory = SwiGLUExperts,
        expert_parallel_size: int = 1,
    ) -> None:
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.router = router if router is not None else TopKRouter(d_model, num_experts, top_k=min(2, num_experts))
        if self.router.d_model != d_model or self.router.num_experts != num_experts:
            raise ValueError(
                f"The router was built for d_model={self.router.d_model}, num_experts={self.router.num_experts}; "
                f"this layer has d_model={d_model}, num_experts={num_experts}."
            )
        self.experts = experts(d_model, d_ff, num_experts)
        if getattr(self.experts, "num_experts", None) != num_experts:
            raise ValueError(f"`experts` must build a module with num_experts={num_experts}, got {self.experts!r}.")
        self.shared_d_ff = check_non_negative_int("shared_d_ff", shared_d_ff)
        if shared_gate and not shared_d_ff:
            raise ValueError("`shared_gate=True` needs shared experts: set `shared_d_ff` > 0.")
        self.shared_expert = SwiGLU(d_model, shared_d_ff) if shared_d_ff else None
        self.shared_expert_gate = nn.Linear(d_model, 1, bias=False) if shared_gate else None
        self.balancers = check_balancers(balancers, num_experts)
        self.capacity = capacity
        self.dispatcher = dispatcher
        self._dispatch = get_dispatcher(dispatcher)
        self.expert_parallel_size = check_positive_int("expert_parallel_size", expert_parallel_size)
        if num_experts % expert_parallel_size:
            raise ValueError(
                f"`expert_parallel_size`={expert_parallel_size} must divide `num_experts`={num_experts}; valid values "
                f"are {divisors(num_experts)}."
            )
        self._expert_parallel: ExpertParallelGroups | None = None
        self.exchange: dict[str, list[int]] = {}
        self.register_load_state_dict_pre_hook(slice_expert_state_dict)
        self.aux_losses: dict[str, Tensor] = {}
        self.stats: RoutingStats | None = None

    @property
    def expert_parallel(self) -> ExpertParallelGroups | None:
        """The expert-parallel groups this layer's experts are sharded over, or ``None`` while it
        holds all E experts."""
        return self._expert_parallel

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Tensor:
        """``x`` of shape ``(..., D)`` -> same shape. ``token_ids`` (shape ``x.shape[:-1]``), when
        given, reach the router (id-hash routing reads them; the other routers ignore them)."""
        if x.shape[-1] != self.d_model:
            raise ValueError(
                f"MoELayer expects inputs whose last dimension is d_model={self.d_model}, got shape {tuple(x.shape)}."
            )
        x_TD = x.reshape(-1, self.d_model)
        routing = route(self.router, x, self.capacity, self.training, token_ids)
        if self._expert_parallel is None:
            y_TD = self._dispatch(x_TD, routing, self.experts)
        else:
            y_TD = expert_parallel_dispatch(x_TD, routing, self.experts, self._expert_parallel, self._dispatch,
                                            self.exchange)
        if self.shared_expert is not None:
            shared_TD = self.shared_expert(x_TD)
            if self.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD
        self.aux_losses = {b.name: b.loss(routing) for b in self.balancers}
        self.stats = RoutingStats.from_routing(routing)
        return y_TD.view(x.shape)

    def extra_repr(self) -> str:
        return (f"dispatcher={self.dispatcher!r}, balancers={self.balancers}, capacity={self.capacity}, "
                f"shared_d_ff={self.shared_d_ff}, shared_gate={self.shared_expert_gate is not None}"
                + (f", expert_parallel_size={self.expert_parallel_size}" if self.expert_parallel_size > 1 else ""))
