"""Our routers inside Hugging Face MoE models: replace each block's ``gate``, keep everything else.

Legend: ``T`` tokens, ``D`` model width, ``E`` routed experts, ``K`` slots per token (the
router's ``top_k``, or for padded routings the most experts any token reached), ``A`` kept
assignments.

In ``transformers`` 5.x every supported block (see :data:`~lightning_moe.integrations.hf.HF_FAMILIES`)
does ``_, weights_TK, indices_TK = self.gate(hidden)`` and then ``self.experts(hidden_TD,
indices_TK, weights_TK)``. :func:`swap_routers` puts a :class:`RouterGate` in place of ``gate``: it
runs one of our routers and returns the same triple, so the fused experts, the shared experts and
the rest of the block are untouched (the same parameter objects). Discovery then gives each
block a :class:`~lightning_moe.integrations.hf.SwappedRouterView`, so our callbacks read the new
router (statistics, aux losses, bias, router rows).

Routings that are not exactly ``K`` experts per token in token-major order (expert choice,
capacity drops) become a padded ``(T, K)`` layout whose empty slots have weight 0. Their index is
``E`` where the experts run ``transformers``' eager loop, which skips index ``E``; the
``grouped_mm`` (the 5.x default) and ``batched_mm`` experts implementations mask index ``E``
only under expert parallelism (``batched_mm`` indexes out of range; ``grouped_mm``'s kernel, by
its own comments, leaves those rows uninitialised), so for them an empty slot holds expert 0 with weight 0: the same
output, at the cost of computing that row.

The models' own router aux loss (``output_router_logits=True``) is computed from logits recorded
on the original router classes, which are gone: ``transformers`` would fail on the empty record.
:func:`swap_routers` therefore sets ``config.output_router_logits = False`` (with a warning where
it was on); use our balancers instead (``RouterGate.aux_losses``), and do not pass
``output_router_logits=True`` to a swapped model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_moe.balancing.losses import Balancer, check_balancers
from lightning_moe.integrations.hf import (
    HF_FAMILIES,
    HFMoEView,
    disable_router_aux_loss,
    family_of,
    find_hf_blocks,
    fused_expert_tensors,
    transformers_version,
)
from lightning_moe.layers.moe_layer import route
from lightning_moe.layers.record import RoutingRecorder
from lightning_moe.layers.view import forget_view
from lightning_moe.routing.capacity import ExpertCapacity
from lightning_moe.routing.factory import RouterFactory
from lightning_moe.routing.routing import Router, Routing
from lightning_moe.routing.scorers import LinearScorer
from lightning_moe.routing.topk import TopKRouter

__all__ = ["RouterFactory", "RouterGate", "routing_to_topk", "swap_routers"]


def routing_to_topk(routing: Routing, pad_index: int, top_k: int | None = None) -> tuple[Tensor, Tensor]:
    """``(weights_TK, indices_TK)``: a :class:`Routing` in the Hugging Face experts' layout.

    With ``top_k`` the routing is known to hold exactly ``top_k`` assignments per token in
    token-major order (``token_choice_routing``'s layout) and is only reshaped. Otherwise the
    assignments are grouped by token (in their order within the routing) into ``K`` slots, ``K``
    the most any token has (at least 1; one host synchronisation); empty slots get
    ``pad_index`` and weight 0. Weights keep their gradient.
    """
    num_tokens = routing.num_tokens
    if top_k is not None:
        return routing.weight_A.view(num_tokens, top_k), routing.expert_A.view(num_tokens, top_k)
    num_assign = routing.expert_A.numel()
    device = routing.expert_A.device
    order_A = torch.argsort(routing.token_A, stable=True)
    token_A = routing.token_A[order_A]
    counts_T = torch.bincount(token_A, minlength=num_tokens)
    slots = max(int(counts_T.max()), 1) if num_assign else 1
    start_T = counts_T.cumsum(0) - counts_T
    slot_A = torch.arange(num_assign, device=device) - start_T[token_A]
    indices_TK = torch.full((num_tokens, slots), pad_index, dtype=routing.expert_A.dtype, device=device)
    indices_TK = indices_TK.index_put((token_A, slot_A), routing.expert_A[order_A])
    weights_TK = routing.weight_A.new_zeros(num_tokens, slots).index_put((token_A, slot_A), routing.weight_A[order_A])
    return weights_TK, indices_TK


class RouterGate(RoutingRecorder, nn.Module):
    """A Hugging Face 5.x MoE gate that runs one of our routers.

    ``forward(hidden)`` (``(..., D)``, flattened to ``(T, D)``) returns ``(logits_TE, weights_TK,
    indices_TK)`` as the Hugging Face routers do: float32 logits, gate weights in the hidden
    dtype, int64 expert indices (padded as the module docstring says). After each forward it
    holds ``routing`` (the last :class:`Routing`, with grad), ``aux_losses``
    (``{balancer.name: loss}``, with grad: add them to the training loss) and ``stats`` (a
    detached :class:`RoutingStats`), overwritten by the next forward. A 3-D input (DeepSeek-V3's
    block passes ``(B, S, D)``) sets ``Routing.seq_len`` for sequence-level balancers; the other
    families flatten the tokens before their gate, so those balancers see the batch as one sequence.

    Args:
        router: the router; its ``d_model`` and ``num_experts`` are the block's.
        balancers: auxiliary losses computed from each routing (distinct names).
        capacity: expert capacity with dropping; ``None`` is dropless. Dropped slots are padded.
        experts_config: the block's experts' config, read at each forward for its
            ``_experts_implementation`` (which padding index is safe); ``None`` means the eager loop.
    """

    def __init__(self, router: Router, balancers: Sequence[Balancer] = (), capacity: ExpertCapacity | None = None,
                 experts_config: object | None = None) -> None:
        super().__init__()
        if not isinstance(router, Router):
            raise ValueError(f"`router` must be a lightning_moe Router, got {type(router).__name__}.")
        self.router = router
        self.balancers = check_balancers(balancers, router.num_experts)
        self.capacity = capacity
        self.experts_config = experts_config
        self.routing: Routing | None = None
        self.clear_record()

    @property
    def pad_index(self) -> int:
        """Index of empty slots: ``E`` for the eager experts loop, else expert 0 (with weight 0)."""
        implementation = getattr(self.experts_config, "_experts_implementation", None)
        return self.router.num_experts if implementation in (None, "eager") else 0

    def _token_major_k(self, routing: Routing) -> int | None:
        """``K`` when the routing is exactly ``K`` per token in token-major order, else ``None``."""
        top_k, num_tokens = self.router.top_k, routing.num_tokens
        if routing.expert_A.numel() != num_tokens * top_k:
            return None
        if isinstance(self.router, TopKRouter) and self.capacity is None:
            return top_k  # token_choice_routing's layout, without checking it (no host sync)
        expected_A = torch.arange(num_tokens, device=routing.token_A.device).repeat_interleave(top_k)
        return top_k if torch.equal(routing.token_A, expected_A) else None

    def forward(self, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        routing = route(self.router, hidden, self.capacity, self.training)
        weights_TK, indices_TK = routing_to_topk(routing, self.pad_index, self._token_major_k(routing))
        self.routing = routing
        self.record(routing)
        return routing.logits_TE, weights_TK.to(hidden.dtype), indices_TK

    def extra_repr(self) -> str:
        return f"balancers={self.balancers}, capacity={self.capacity}"


def swap_routers(
    model: nn.Module,
    router_factory: RouterFactory,
    balancers: Sequence[Balancer] = (),
    *,
    init_from_gate: bool = False,
    capacity: ExpertCapacity | None = None,
) -> list[str]:
    """Replace the ``gate`` of every supported Hugging Face MoE block in ``model`` by a :class:`RouterGate`.

    Each block gets its own router, ``router_factory(D, E)``, its parameters on the old gate's
    device and dtype (an ``expert_bias_E`` buffer stays float32, so small bias updates are not
    rounded away). The experts and the rest of the model are untouched. A block already swapped
    is swapped again. Views that discovery cached for these blocks are dropped (their gate hooks
    removed), so the next :func:`~lightning_moe.discovery.find_moe_layers` returns views of the
    new routers.

    Args:
        model: any module holding ``transformers`` 5.x MoE blocks of the families in
            :data:`~lightning_moe.integrations.hf.HF_FAMILIES`, e.g. a ``*ForCausalLM``.
        router_factory: called as ``router_factory(d_model, num_experts)`` once per block; must
            build a :class:`Router` of that size.
        balancers: auxiliary losses of every new gate (shared objects, as in ``MoELayer``).
        init_from_gate: copy the old gate's ``(E, D)`` weight into the router's
            ``scorer.weight_ED`` (the router's scorer must be a :class:`LinearScorer`) and the
            family's expert bias (DeepSeek-V3's ``e_score_correction_bias``) into its
            ``expert_bias_E`` when it has one;
            with the family's selection rule the model then routes exactly as before.
        capacity: expert capacity of every new gate; ``None`` is dropless.

    Returns:
        The qualified names of the blocks swapped, in module order.
    """
    blocks = find_hf_blocks(model)
    if not blocks:
        supported = ", ".join(f"{f.name} ({', '.join(f.block_classes)})" for f in HF_FAMILIES.values())
        raise ValueError(f"swap_routers found no supported Hugging Face MoE block in {type(model).__name__}; "
                         f"supported families (block class): {supported}.")
    # Every gate is built (and every error raised) before the first block changes.
    gates = [_new_gate(name, block, router_factory, balancers, init_from_gate, capacity) for name, block in blocks]
    for (_, block), gate in zip(blocks, gates, strict=True):
        _forget_view(block)
        block.gate = gate
    disable_router_aux_loss(model, "swap_routers")
    return [name for name, _ in blocks]


def _new_gate(name: str, block: nn.Module, router_factory: RouterFactory, balancers: Sequence[Balancer],
              init_from_gate: bool, capacity: ExpertCapacity | None) -> RouterGate:
    old_gate = block.gate
    d_model, num_experts = _gate_size(name, block)
    router = router_factory(d_model, num_experts)
    if not isinstance(router, Router) or (router.d_model, router.num_experts) != (d_model, num_experts):
        raise ValueError(f"`router_factory` must build a Router for d_model={d_model}, num_experts={num_experts} "
                         f"(block {name!r}), got {router!r}.")
    if init_from_gate:
        _init_from_gate(name, router, old_gate, family_of(block).expert_bias)
    _place_like(router, old_gate)
    gate = RouterGate(router, balancers, capacity, getattr(block.experts, "config", None))
    return gate.train(old_gate.training)  # capacity and jitter depend on the mode


def _gate_size(name: str, block: nn.Module) -> tuple[int, int]:
    """``(D, E)`` of a block in the 5.x fused layout; ``ValueError`` for any other layout."""
    gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
    if isinstance(experts, nn.ModuleList) or isinstance(gate, nn.Linear):
        raise ValueError(
            f"swap_routers needs the transformers>=5 fused MoE layout; {type(block).__name__} {name!r} has the 4.x "
            f"per-expert layout (nn.ModuleList experts, nn.Linear gate). Installed transformers: "
            f"{transformers_version()}; upgrade with `pip install 'transformers>=5'`."
        )
    if isinstance(gate, RouterGate):
        d_model, num_experts = gate.router.d_model, gate.router.num_experts
    else:
        weight = getattr(gate, "weight", None)
        if not (isinstance(weight, Tensor) and weight.dim() == 2):
            raise ValueError(f"{type(block).__name__} {name!r}: its `gate` has no (E, D) `weight`; swap_routers "
                             "supports the transformers>=5 routers only.")
        num_experts, d_model = weight.shape
    if not isinstance(experts, nn.Module) or not fused_expert_tensors(experts, num_experts):
        raise ValueError(f"{type(block).__name__} {name!r}: no fused `experts` whose parameters' dim 0 has the "
                         f"{num_experts} experts; swap_routers supports the transformers>=5 layout only.")
    return d_model, num_experts


@torch.no_grad()
def _init_from_gate(name: str, router: Router, gate: nn.Module, bias_name: str | None) -> None:
    """Copy the old gate's ``(E, D)`` weight (and its bias offset ``bias_name``, the family's
    ``expert_bias``) into ``router``."""
    scorer = getattr(router, "scorer", None)
    if not isinstance(scorer, LinearScorer):
        raise ValueError(f"`init_from_gate=True` needs routers whose scorer is a LinearScorer (it takes the gate's "
                         f"(E, D) weight), got {type(scorer).__name__} in {type(router).__name__}.")
    if isinstance(gate, RouterGate):
        old_scorer = getattr(gate.router, "scorer", None)
        if not isinstance(old_scorer, LinearScorer):
            raise ValueError(f"`init_from_gate=True`: block {name!r} is already swapped to a router without a "
                             f"LinearScorer ({type(old_scorer).__name__}); there is no (E, D) weight to copy.")
        weight_ED, bias_E = old_scorer.weight_ED, getattr(gate.router, "expert_bias_E", None)
    else:
        weight_ED, bias_E = gate.weight, None if bias_name is None else getattr(gate, bias_name, None)
    scorer.weight_ED.copy_(weight_ED.to(scorer.weight_ED.dtype))
    own_bias = getattr(router, "expert_bias_E", None)
    if isinstance(bias_E, Tensor) and own_bias is not None:
        own_bias.copy_(bias_E.to(own_bias.dtype))


def _place_like(router: Router, gate: nn.Module) -> None:
    """Move ``router`` to the old gate's device and parameter dtype; the bias buffer stays float32."""
    reference = next(iter(gate.parameters()), None)
    if reference is None:
        return
    router.to(device=reference.device, dtype=reference.dtype)
    bias = getattr(router, "expert_bias_E", None)
    if bias is not None:
        router.expert_bias_E = bias.float()


def _forget_view(block: nn.Module) -> None:
    """Drop discovery's cached view of ``block`` and its hook on the old gate."""
    stale = forget_view(block)
    if isinstance(stale, HFMoEView):
        stale.remove_hook()
