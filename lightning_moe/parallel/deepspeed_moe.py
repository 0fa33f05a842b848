"""DeepSpeed-MoE's own layer (capacity buffers, all-to-all over DeepSpeed's expert-parallel groups)
driven by one of our routers.

Legend: ``S`` tokens routed on this rank (DeepSpeed's name for ``T``), ``D`` model width, ``E``
experts, ``K`` experts per token, ``C`` capacity (buffer slots per expert), ``A`` assignments
(``A = S * K`` before capacity drops).

How a forward runs (:meth:`DeepSpeedMoELayer.forward`):

1. Our router routes the tokens (any token-choice router: softmax or sigmoid scores, expert bias,
   renormalisation, scaling, group limits), exactly as in :class:`~lightning_moe.layers.MoELayer`.
2. :func:`deepspeed_routes` applies DeepSpeed's capacity rule and places each kept assignment in
   its expert's buffer in DeepSpeed's order (``cumsum`` over tokens), giving the sparse routes
   DeepSpeed's dispatch reads: expert index, buffer slot and gate weight per (route, token).
3. DeepSpeed's ``MOELayer`` runs unchanged: it asks its gate (a :class:`ReplayGate` here, in place
   of DeepSpeed's ``TopKGate``) for the routes, fills the ``(E, C, D)`` buffers, exchanges them by
   all-to-all over its expert-parallel group, runs its local experts, and combines with the gates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_moe._validate import check_non_negative_int, check_positive_float, check_positive_int, divisors
from lightning_moe.balancing.losses import Balancer, check_balancers
from lightning_moe.experts.swiglu import SwiGLU
from lightning_moe.layers.config import MoEConfig
from lightning_moe.layers.moe_layer import route
from lightning_moe.layers.record import RoutingRecorder
from lightning_moe.routing.capacity import rank_within_expert
from lightning_moe.routing.expert_choice import ExpertChoiceRouter
from lightning_moe.routing.factory import build_router
from lightning_moe.routing.routing import Router, Routing
from lightning_moe.routing.topk import TopKRouter

DeepSpeedDropPolicy = Literal["position", "score", "first_choice"]
DEEPSPEED_DROP_POLICIES = ("position", "score", "first_choice")
"""``ExpertCapacity``'s vocabulary (``position``, ``score``) plus DeepSpeed's top-2 rule; DeepSpeed
itself calls ``score`` ``"probs"``."""


def check_drop_policy(drop_policy: str) -> str:
    """``drop_policy`` if valid; ``ValueError`` naming the valid ones (and ``score`` for DeepSpeed's ``probs``)."""
    if drop_policy == "probs":
        raise ValueError("`drop_policy='probs'` is DeepSpeed's name; here it is 'score' (highest router scores kept), "
                         "as in ExpertCapacity.")
    if drop_policy not in DEEPSPEED_DROP_POLICIES:
        raise ValueError(f"`drop_policy` must be one of {DEEPSPEED_DROP_POLICIES}, got {drop_policy!r}.")
    return drop_policy


@dataclass
class SparseRoutes:
    """One routing decision in the form DeepSpeed's ``MOELayer`` dispatches (its ``sparse_routes``).

    Attributes:
        capacity: buffer slots per expert, C.
        expert_KS: ``(K, S)`` int32 expert of route k of token s; -1 where capacity dropped it.
        location_KS: ``(K, S)`` int32 slot of the route inside its expert's buffer (0 where dropped).
        gate_KS: ``(K, S)`` float32 gate weight of the route (0 where dropped), with grad.
        exp_counts_E: ``(E,)`` int64 routes per expert *before* capacity (DeepSpeed's ``exp_counts``).
    """

    capacity: int
    expert_KS: Tensor
    location_KS: Tensor
    gate_KS: Tensor
    exp_counts_E: Tensor

    def dense(self) -> tuple[Tensor, Tensor]:
        """``(combine_SEC, dispatch_SEC)``: the dense form DeepSpeed's gates returned before its
        sparse dispatch (float32 gate weights with grad, and the bool mask of filled slots)."""
        num_routes, num_tokens = self.expert_KS.shape
        num_slots = self.exp_counts_E.numel() * self.capacity
        kept_KS = self.expert_KS >= 0
        # Dropped routes write to one scratch column, cut off below.
        slot_SK = torch.where(kept_KS, self.expert_KS.long() * self.capacity + self.location_KS.long(), num_slots).T
        combine_SX = self.gate_KS.new_zeros(num_tokens, num_slots + 1).scatter_add(1, slot_SK, self.gate_KS.T)
        dispatch_SX = torch.zeros_like(combine_SX, dtype=torch.bool).scatter_(1, slot_SK, True)
        shape_SEC = (num_tokens, self.exp_counts_E.numel(), self.capacity)
        return combine_SX[:, :num_slots].view(shape_SEC), dispatch_SX[:, :num_slots].reshape(shape_SEC)


def deepspeed_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float,
                       min_capacity: int) -> int:
    """DeepSpeed's capacity, ``max(min_capacity, ceil(S / E * capacity_factor * K))``.

    Computed in float32 in the same order as DeepSpeed's ``_capacity``, so that rounding agrees.
    """
    capacity = torch.ceil((num_tokens / num_experts) * torch.tensor(capacity_factor * top_k))
    return max(int(capacity), min_capacity)


def _dropless_capacity(exp_counts_E: Tensor, ep_group: Any) -> int:
    """DeepSpeed's ``drop_tokens=False`` capacity: the largest expert count over the expert-parallel
    group, padded to a multiple of the tensor-parallel size where DeepSpeed pads it."""
    from deepspeed import comm as dist
    from deepspeed.utils import groups
    from deepspeed.utils.bwc import bwc_tensor_model_parallel_world_size

    capacity = exp_counts_E.max()
    if ep_group is not None and dist.get_world_size(group=ep_group) > 1:
        dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=ep_group)
    if groups._get_expert_model_parallel_world_size() == 1:
        tp = bwc_tensor_model_parallel_world_size(groups.mpu)
        capacity = torch.ceil(capacity / tp).mul(tp).to(capacity.dtype)
    return int(capacity)


def _token_major_order(routing: Routing, top_k: int, source: str) -> Tensor:
    """``(A,)`` permutation that lays the assignments out token-major, ``K`` per token.

    Raises ``ValueError`` unless every token has exactly ``top_k`` assignments (token choice)."""
    num_tokens = routing.num_tokens
    expected_A = torch.arange(num_tokens, device=routing.token_A.device).repeat_interleave(top_k)
    order_A = torch.argsort(routing.token_A, stable=True)
    if routing.token_A.numel() != num_tokens * top_k or not torch.equal(routing.token_A[order_A], expected_A):
        raise ValueError(
            f"DeepSpeed's dispatch needs token-choice routing with exactly top_k={top_k} assignments per token; "
            f"{source} gave {routing.token_A.numel()} assignments for {num_tokens} tokens, not one per (token, k)."
        )
    return order_A


def deepspeed_routes(
    routing: Routing,
    top_k: int,
    capacity: int | None,
    drop_policy: DeepSpeedDropPolicy = "position",
    ep_group: Any = None,
    source: str = "the router",
) -> tuple[SparseRoutes, Routing]:
    """Apply DeepSpeed's capacity rule to a token-choice ``routing``; return its sparse routes and
    the routing that is left (dropped assignments removed, counted in ``num_dropped``).

    Each expert's buffer is filled in the order DeepSpeed's gates fill it (a ``cumsum`` over
    tokens); an assignment whose slot would be ``>= capacity`` is dropped. ``drop_policy`` says
    which assignments an expert keeps when it has too many:

    - ``position``: the earliest tokens (DeepSpeed's ``topkgating(drop_policy="position")``).
    - ``score``: the highest router scores (``routing.scores_TE``: the softmax for softmax
      routers), ties to the earlier token; kept ones are then placed in token order
      (``topkgating``'s default, which it calls ``"probs"``, and which DeepSpeed's ``TopKGate`` uses for ``k > 2``).
    - ``first_choice``: every token's first choice before any token's second choice, and so on
      (``top2gating``, DeepSpeed's ``TopKGate`` for ``k = 2``; GShard's rule).

    Unlike DeepSpeed, gate weights are ``routing.weight_A`` as the router made them: a token that
    loses one of its routes to capacity keeps its other gates unchanged, not renormalised over
    the kept ones (:mod:`lightning_moe.routing.capacity` does the same).

    Args:
        routing: token-choice routing of ``S`` tokens, ``top_k`` assignments each.
        top_k: experts per token K.
        capacity: slots per expert (:func:`deepspeed_capacity`), or ``None`` for DeepSpeed's
            ``drop_tokens=False``: the largest expert count, all-reduced (max) over ``ep_group``.
        drop_policy: ``position``, ``score`` or ``first_choice``.
        ep_group: DeepSpeed's expert-parallel process group (``None`` without expert parallelism).
        source: names the router in the error raised for routing that is not token choice.
    """
    check_drop_policy(drop_policy)
    num_tokens, num_experts = routing.scores_TE.shape
    order_A = _token_major_order(routing, top_k, source)
    token_A, expert_A, weight_A = routing.token_A[order_A], routing.expert_A[order_A], routing.weight_A[order_A]
    exp_counts_E = torch.bincount(expert_A, minlength=num_experts)
    if capacity is None:
        capacity = _dropless_capacity(exp_counts_E, ep_group)

    if drop_policy == "position":
        priority_A = token_A
    elif drop_policy == "first_choice":
        choice_A = torch.arange(expert_A.numel(), device=expert_A.device) % top_k
        priority_A = choice_A * num_tokens + token_A
    else:
        priority_A = -routing.scores_TE.detach()[token_A, expert_A]
    rank_A = rank_within_expert(expert_A, priority_A, num_experts)
    keep_A = rank_A < capacity
    if drop_policy == "score":  # kept assignments fill the buffer in token order, dropped ones after
        rank_A = rank_within_expert(expert_A, token_A + num_tokens * (~keep_A), num_experts)

    def to_KS(values_A: Tensor) -> Tensor:
        return values_A.view(num_tokens, top_k).T.contiguous()

    routes = SparseRoutes(
        capacity=capacity,
        expert_KS=to_KS(torch.where(keep_A, expert_A, -1)).int(),
        location_KS=to_KS(torch.where(keep_A, rank_A, 0)).int(),
        gate_KS=to_KS(weight_A.float().masked_fill(~keep_A, 0.0)),
        exp_counts_E=exp_counts_E,
    )
    kept = replace(routing, token_A=token_A[keep_A], expert_A=expert_A[keep_A], weight_A=weight_A[keep_A],
                   num_dropped=routing.num_dropped + (~keep_A).sum())
    return routes, kept


class ReplayGate(nn.Module):
    """Stands in for DeepSpeed's ``TopKGate`` inside its ``MOELayer``: hands over the routing
    decision that :class:`DeepSpeedMoELayer` has just made with our router.

    ``forward(input_SD, used_token=None, sparse_routes=False, use_tutel=False)`` follows
    ``TopKGate``'s signature: ``sparse_routes=True`` (DeepSpeed's own dispatch, or Tutel) returns
    ``(l_aux, C, E, expert_KS, location_KS, gate_KS, exp_counts)``; ``False`` the dense
    ``(l_aux, combine_SEC, dispatch_SEC, exp_counts)`` of DeepSpeed's older einsum dispatch.
    ``used_token`` is ignored, as DeepSpeed's top-2 and top-k gates ignore it. The gate holds no
    parameters: the router lives on the layer, outside DeepSpeed's module, so that DeepSpeed's
    checkpoints never take a router buffer such as ``expert_bias_E`` for an expert weight (they
    treat every key containing "expert" inside the MoE module as one).
    """

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.ep_group: Any = None
        self._pending: tuple[SparseRoutes, Tensor] | None = None

    def _set_ep_group(self, ep_group: Any) -> None:
        """Called by DeepSpeed (``MoE.set_deepspeed_parallelism``) once its groups exist."""
        self.ep_group = ep_group

    def load(self, routes: SparseRoutes, l_aux: Tensor) -> None:
        """Queue the decision for the next forward, which consumes it."""
        self._pending = (routes, l_aux)

    def forward(self, input_SD: Tensor, used_token: Tensor | None = None, sparse_routes: bool = False,
                use_tutel: bool = False) -> tuple:
        if self._pending is None:
            raise RuntimeError("ReplayGate has no routing to hand over: call DeepSpeedMoELayer, which routes the "
                               "tokens with its router first, not its inner DeepSpeed `moe` module.")
        (routes, l_aux), self._pending = self._pending, None
        if routes.expert_KS.shape[1] != input_SD.shape[0]:
            raise RuntimeError(f"The routing covers {routes.expert_KS.shape[1]} tokens; DeepSpeed dispatches "
                               f"{input_SD.shape[0]}.")
        if sparse_routes:
            return (l_aux, routes.capacity, self.num_experts, routes.expert_KS, routes.location_KS, routes.gate_KS,
                    routes.exp_counts_E)
        combine_SEC, dispatch_SEC = routes.dense()
        return l_aux, combine_SEC, dispatch_SEC, routes.exp_counts_E

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}"


def _import_deepspeed_moe() -> type[nn.Module]:
    try:
        from deepspeed.moe.layer import MoE
    except ImportError as err:
        raise ImportError("DeepSpeedMoELayer runs DeepSpeed's MoE layer: install the `deepspeed` extra "
                          "(pip install -e '.[deepspeed]'), or use MoELayer, which needs no DeepSpeed.") from err
    return MoE


class DeepSpeedMoELayer(RoutingRecorder, nn.Module):
    """DeepSpeed-MoE's layer (``deepspeed.moe.layer.MoE``) with one of our routers as its gate.

    Discovery gives it the same view as :class:`~lightning_moe.layers.MoELayer` (family
    ``"deepspeed_moe"``); DeepSpeed keeps each expert as its own module, so that view has no
    grouped expert tensors and cannot revive dead experts.

    For projects already on DeepSpeed-MoE: its dispatch, expert-parallel all-to-all, expert
    gradient reduction and per-expert checkpoints stay DeepSpeed's, while routing, balancing losses
    and statistics come from this library. Otherwise prefer :class:`~lightning_moe.layers.MoELayer`:
    dropless by default, grouped expert kernels, expert parallelism without DeepSpeed, and faster
    (DeepSpeed's dispatch pads every expert to C slots and runs its experts one at a time).

    ``forward(x, token_ids=None)`` maps ``(..., D)`` to the same shape; afterwards ``aux_losses``
    holds ``{balancer.name: loss}`` computed on the routing left after capacity drops (tensors with
    grad, to add to the training loss) and ``stats`` a :class:`RoutingStats` of it. DeepSpeed's own
    ``moe.deepspeed_moe.l_aux`` is their sum (zero without balancers): add one or the other, not
    both.

    Differences from ``MoELayer``:

    - Capacity applies in training unless ``drop_tokens=False`` (DeepSpeed's rule, see :func:`deepspeed_capacity` and
      :func:`deepspeed_routes`); dropped assignments add nothing, so a token whose every route is
      dropped comes out as zeros (unchanged through the block's residual). Gates of kept routes are
      not renormalised (DeepSpeed's gates renormalise them).
    - The experts are DeepSpeed's: ``E / P`` local deep copies of ``expert`` per rank, each its own
      module (per-expert ``nn.Linear`` weights for the default SwiGLU) under
      ``moe.deepspeed_moe.experts.deepspeed_experts``, parameters marked ``allreduce = False`` with
      group name ``ep_size_{P}``. DeepSpeed starts every copy identical; the default SwiGLU copies
      are re-initialised one by one so that they start different, a given ``expert`` is copied as
      DeepSpeed copies it. Under expert parallelism each rank initialises its own local experts.

    Expert parallelism (``expert_parallel_size`` P > 1) needs DeepSpeed's process groups: start with
    ``deepspeed.init_distributed`` (or a DeepSpeed strategy) and let ``deepspeed.initialize`` build
    the engine, which calls ``moe.set_deepspeed_parallelism()`` (without an engine, call it
    yourself before the first forward). Local expert ``i`` on expert-parallel rank ``r`` is global
    expert ``r * E / P + i``. With ZeRO (stages 1 and 2: DeepSpeed refuses its MoE layer under
    stage 3), the optimizer's parameter groups must keep expert and non-expert parameters apart:
    pass them through ``deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer``
    (DeepSpeed refuses to start otherwise). Expert gradients are then summed over the expert-data-parallel group and
    divided by the whole data-parallel size, so they average over the global batch as dense ones do.

    Args:
        d_model: model width D, >= 1.
        d_ff: hidden width F of the default SwiGLU expert, >= 1 (unused when ``expert`` is given).
        num_experts: number of experts E, >= 1.
        router: a token-choice router (``A = S * K``: :class:`~lightning_moe.routing.TopKRouter`,
            ``GroupLimitedTopKRouter``, ``BalancedRouter``, ``HashRouter``, ``RandomRouter``); its
            ``d_model`` and ``num_experts`` must match. Expert choice is refused. Defaults to
            ``TopKRouter(d_model, num_experts, top_k=min(2, num_experts))``.
        balancers: auxiliary losses computed from each routing decision (none by default).
        capacity_factor: training capacity factor, > 0: ``C = max(min_capacity, ceil(S / E * K *
            capacity_factor))`` slots per expert.
        eval_capacity_factor: evaluation capacity factor, > 0, or ``None`` for no drops in
            evaluation (capacity = the largest expert count, as with ``drop_tokens=False``).
        min_capacity: smallest capacity, >= 0 (DeepSpeed's default 4).
        drop_tokens: ``False`` never drops (capacity = the largest expert count over the
            expert-parallel group, DeepSpeed's ``drop_tokens=False``).
        drop_policy: which assignments an over-full expert keeps: ``position`` (earliest tokens),
            ``score`` (highest scores; DeepSpeed's ``probs``) or ``first_choice`` (first choices
            first, DeepSpeed's top-2 rule); see :func:`deepspeed_routes`.
        expert_parallel_size: DeepSpeed's ``ep_size`` P, >= 1, dividing ``num_experts``.
        expert: the expert module, ``(..., D) -> (..., D)``, deep-copied per local expert;
            ``SwiGLU(d_model, d_ff)`` by default.
    """

    view_family = "deepspeed_moe"

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        *,
        router: Router | None = None,
        balancers: Sequence[Balancer] = (),
        capacity_factor: float = 1.0,
        eval_capacity_factor: float | None = None,
        min_capacity: int = 4,
        drop_tokens: bool = True,
        drop_policy: DeepSpeedDropPolicy = "position",
        expert_parallel_size: int = 1,
        expert: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.d_ff = check_positive_int("d_ff", d_ff)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.router = router if router is not None else TopKRouter(d_model, num_experts, top_k=min(2, num_experts))
        self._check_router(self.router)
        self.balancers = check_balancers(balancers, num_experts)
        self.capacity_factor = check_positive_float("capacity_factor", capacity_factor)
        self.eval_capacity_factor = (
            None if eval_capacity_factor is None else check_positive_float("eval_capacity_factor", eval_capacity_factor)
        )
        self.min_capacity = check_non_negative_int("min_capacity", min_capacity)
        if not isinstance(drop_tokens, bool):
            raise ValueError(f"`drop_tokens` must be True or False, got {drop_tokens!r}.")
        self.drop_tokens = drop_tokens
        self.drop_policy = check_drop_policy(drop_policy)
        self.expert_parallel_size = check_positive_int("expert_parallel_size", expert_parallel_size)
        if num_experts % expert_parallel_size:
            raise ValueError(
                f"`expert_parallel_size`={expert_parallel_size} must divide `num_experts`={num_experts}; valid values "
                f"are {divisors(num_experts)}."
            )
        if expert is not None and not isinstance(expert, nn.Module):
            raise ValueError(f"`expert` must be an nn.Module mapping (..., d_model) to (..., d_model), got {expert!r}.")

        moe_cls = _import_deepspeed_moe()
        # k and the capacity arguments only configure DeepSpeed's TopKGate, replaced just below.
        self.moe = moe_cls(hidden_size=d_model, expert=expert if expert is not None else SwiGLU(d_model, d_ff),
                           num_experts=num_experts, ep_size=expert_parallel_size, k=self.router.top_k,
                           capacity_factor=capacity_factor, min_capacity=min_capacity, drop_tokens=drop_tokens,
                           use_rts=False)
        self.moe.deepspeed_moe.gate = ReplayGate(num_experts)
        if expert is None:
            for local_expert in self.experts:
                for module in local_expert.modules():
                    if module is not local_expert and hasattr(module, "reset_parameters"):
                        module.reset_parameters()
        self.clear_record()

    @classmethod
    def from_config(cls, d_model: int, moe: MoEConfig, expert: nn.Module | None = None) -> DeepSpeedMoELayer:
        """The layer ``moe`` describes (:class:`~lightning_moe.layers.MoEConfig`): its experts (the
        fine-grained split applied), router, balancers and expert-parallel size. ``moe.capacity``
        becomes DeepSpeed's capacity (same formula: factor, evaluation factor, minimum, drop policy);
        ``None`` is dropless (``drop_tokens=False``). Shared experts and ``dispatcher`` have no
        counterpart in DeepSpeed's layer: ``ValueError`` if they are set."""
        if moe.num_shared_experts:
            raise ValueError("DeepSpeedMoELayer has no shared experts: set `moe.num_shared_experts` to 0.")
        if moe.dispatcher not in ("auto", "grouped"):
            raise ValueError(f"DeepSpeedMoELayer dispatches with DeepSpeed's own code; `moe.dispatcher` "
                             f"({moe.dispatcher!r}) applies to MoELayer only: leave it at 'auto'.")
        router = build_router(moe.router, d_model, moe.routed_experts, moe.granularity)
        capacity = moe.capacity
        limits = dict(drop_tokens=False) if capacity is None else dict(
            capacity_factor=capacity.capacity_factor, eval_capacity_factor=capacity.eval_capacity_factor,
            min_capacity=capacity.min_capacity, drop_policy=capacity.drop_policy)
        return cls(d_model, moe.routed_d_ff, moe.routed_experts, router=router, balancers=moe.layer_balancers(),
                   expert_parallel_size=moe.expert_parallel_size, expert=expert, **limits)

    def _check_router(self, router: Router) -> None:
        if isinstance(router, ExpertChoiceRouter):
            raise ValueError(
                f"`router` must be a token-choice router (each token picks top_k experts, A = T * K); "
                f"{type(router).__name__} lets experts choose tokens, which DeepSpeed's dispatch cannot express. "
                "Use MoELayer for expert-choice routing."
            )
        if router.d_model != self.d_model or router.num_experts != self.num_experts:
            raise ValueError(
                f"`router` was built for d_model={router.d_model}, num_experts={router.num_experts}; this layer has "
                f"d_model={self.d_model}, num_experts={self.num_experts}."
            )

    @property
    def gate(self) -> ReplayGate:
        """The gate inside DeepSpeed's ``MOELayer``."""
        return self.moe.deepspeed_moe.gate

    @property
    def experts(self) -> nn.ModuleList:
        """This rank's ``E / P`` local experts (DeepSpeed's ``deepspeed_experts``)."""
        return self.moe.deepspeed_moe.experts.deepspeed_experts

    def capacity_for(self, num_tokens: int) -> int | None:
        """Slots per expert for ``num_tokens`` tokens in the current mode, ``None`` when dropless."""
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if not self.drop_tokens or factor is None:
            return None
        return deepspeed_capacity(num_tokens, self.num_experts, self.router.top_k, factor, self.min_capacity)

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Tensor:
        """``x`` of shape ``(..., D)`` -> same shape. ``token_ids`` (shape ``x.shape[:-1]``) reach the
        router, as in ``MoELayer``."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"DeepSpeedMoELayer expects inputs whose last dimension is d_model={self.d_model}, got "
                             f"shape {tuple(x.shape)}.")
        routing = route(self.router, x, None, self.training, token_ids)
        routes, kept = deepspeed_routes(routing, self.router.top_k, self.capacity_for(routing.num_tokens),
                                        self.drop_policy, self.gate.ep_group, source=type(self.router).__name__)
        self.record(kept)
        l_aux = sum(self.aux_losses.values(), x.new_zeros((), dtype=torch.float32))
        self.gate.load(routes, l_aux)
        y, _, _ = self.moe(x)
        return y

    def extra_repr(self) -> str:
        return (f"balancers={self.balancers}, capacity_factor={self.capacity_factor}, "
                f"eval_capacity_factor={self.eval_capacity_factor}, min_capacity={self.min_capacity}, "
                f"drop_tokens={self.drop_tokens}, drop_policy={self.drop_policy!r}, "
                f"expert_parallel_size={self.expert_parallel_size}")
