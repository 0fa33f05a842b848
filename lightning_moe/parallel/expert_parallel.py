"""Expert parallelism: each layer's experts split over the ranks of an expert-parallel group, tokens
exchanged by a dropless all-to-all with uneven split sizes.

Legend: ``T`` tokens on this rank, ``D`` model width, ``E`` experts of the layer, ``P`` ranks of
the expert-parallel group, ``L = E / P`` experts held by each rank, ``A`` assignments routed on
this rank, ``R`` assignment rows received from the group.

How one layer runs on one rank (:class:`ExpertParallelDispatcher`, installed by
:meth:`MoELayer.shard <lightning_moe.layers.MoELayer.shard>`; its three steps wrap a local
dispatcher's):

1. The router (replicated, like every non-expert weight) routes this rank's tokens to all E
   experts; nothing about routing changes, so every router works unchanged.
2. permute: the local dispatcher sorts the assignments by expert, so the rows for rank ``j``
   (experts ``jL .. jL+L-1``) are consecutive; an all-to-all of the ``(P, L)`` count table tells
   each rank how many rows it gets from whom, then the rows move by a second, variable-size
   all-to-all and are put in local-expert order. Nothing is dropped.
3. compute: the local experts run on the received rows with the layer's own backend (``loop``,
   ``grouped`` or ``triton``), ungated.
4. combine: the outputs travel back by the transposed all-to-all and the local dispatcher
   combines them with the gates on the rank the tokens came from, so gate gradients stay local.

Expert parameters are marked as DeepSpeed marks its own: ``allreduce = False`` and
``group_name = "ep_size_{P}"``, so DeepSpeed's engine and ZeRO reduce their gradients over the
expert-data-parallel group only; under DDP, :func:`reduce_expert_gradients` does the same.
Checkpoints always hold the whole (unsharded) expert tensors, see :func:`gather_expert_state_dict`,
so they load at any expert-parallel size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_moe.dispatch.base import Dispatcher, Plan
from lightning_moe.experts.protocol import Experts
from lightning_moe.layers.moe_layer import MoELayer
from lightning_moe.parallel.all_to_all import all_to_all, all_to_all_counts
from lightning_moe.parallel.groups import ExpertParallelGroups, expert_parallel_groups, group_name
from lightning_moe.routing.routing import Routing


@dataclass
class ExchangePlan(Plan):
    """What the exchange did: the local dispatcher's plan of this rank's assignments, the rows sent
    to and received from each rank, and the local-expert order of the received rows."""

    local_plan: Plan | None = None
    sends: list[int] | None = None
    recvs: list[int] | None = None
    order_R: Tensor | None = None


class ExpertParallelDispatcher(Dispatcher):
    """``y_t = sum_a weight_a * expert_{e_a}(x_t)`` with the experts split over ``groups.group``.

    The layer holds this rank's ``L = E / P`` experts (global experts ``rank*L .. rank*L+L-1``);
    routings use global expert indices. ``local`` (any dispatcher) sorts and combines this rank's
    assignments and runs the local experts. After each forward ``exchange`` holds ``sent_rows``
    and ``received_rows`` (per rank of the group, this rank included).
    """

    def __init__(self, local: Dispatcher, groups: ExpertParallelGroups) -> None:
        self.local = local
        self.groups = groups
        self.exchange: dict[str, list[int]] = {}

    @property
    def name(self) -> str:
        return f"expert_parallel({self.local.name})"

    def expert_rows(self, num_experts: int) -> slice:
        return self.groups.rows(num_experts)

    def with_local(self, local: Dispatcher) -> Dispatcher:
        return ExpertParallelDispatcher(local, self.groups)

    def gather_experts(self, shard: Tensor) -> Tensor:
        """The whole ``(E, ...)`` tensor of which every rank holds its rows ``shard``; collective."""
        return gather_experts(shard, self.groups)

    def permute(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, ExchangePlan]:
        size = self.groups.size
        if routing.num_experts % size:
            raise ValueError(f"The routing has {routing.num_experts} experts, which {size} ranks cannot split.")
        local = routing.num_experts // size
        x_AD, local_plan = self.local.permute(x_TD, routing)  # rows sorted by global expert
        send_PL = local_plan.counts_E.view(size, local)
        recv_PL = all_to_all_counts(send_PL, self.groups.group)  # row j: rows rank j sends to each local expert
        sends, recvs = send_PL.sum(1).tolist(), recv_PL.sum(1).tolist()  # the one host sync: split sizes
        self.exchange = {"sent_rows": sends, "received_rows": recvs}
        x_RD = all_to_all(x_AD, recvs, sends, self.groups.group)
        # Received rows come grouped by source rank, each group sorted by local expert.
        local_R = torch.repeat_interleave(torch.arange(local, device=x_TD.device).repeat(size),
                                          recv_PL.flatten().to(x_TD.device))
        order_R = torch.argsort(local_R, stable=True)
        plan = ExchangePlan(counts_E=recv_PL.sum(0), num_tokens=x_RD.shape[0], dtype=x_TD.dtype,
                            local_plan=local_plan, sends=sends, recvs=recvs, order_R=order_R)
        return x_RD.index_select(0, order_R), plan

    def compute(self, x_AD: Tensor, plan: Plan, experts: Experts) -> Tensor:
        if experts.num_experts != plan.counts_E.numel():
            raise ValueError(f"The layer holds {experts.num_experts} experts but the exchange brought rows for "
                             f"{plan.counts_E.numel()} local experts.")
        return self.local.compute(x_AD, plan, experts)

    def combine(self, out_AD: Tensor, plan: ExchangePlan) -> Tensor:
        out_RD = torch.empty_like(out_AD).index_copy(0, plan.order_R, out_AD)  # back to arrival order
        back_AD = all_to_all(out_RD, plan.sends, plan.recvs, self.groups.group)
        return self.local.combine(back_AD, plan.local_plan)


@torch.no_grad()
def gather_experts(shard: Tensor, groups: ExpertParallelGroups) -> Tensor:
    """The whole ``(E, ...)`` tensor of which every rank of ``groups.group`` holds its rows ``shard``.
    Collective over the expert-parallel group."""
    pieces = [torch.empty_like(shard) for _ in range(groups.size)]
    dist.all_gather(pieces, shard.detach().contiguous(), group=groups.group)
    return torch.cat(pieces)


def expert_parameters(layer: MoELayer) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the layer's routed-expert weights (first dimension indexes experts),
    names relative to ``layer.experts``."""
    return layer.expert_parameters()


def shard_experts(layer: MoELayer, groups: ExpertParallelGroups) -> None:
    """Keep only this rank's ``E / P`` experts of ``layer`` (:meth:`MoELayer.shard` with an
    :class:`ExpertParallelDispatcher` around its dispatcher) and mark them for expert-data-parallel
    gradient reduction. Called once, before the optimizer is built; a second call with the same
    groups does nothing."""
    current = layer.expert_parallel
    if current is not None:
        if current.size != groups.size or current.rank != groups.rank:
            raise RuntimeError(f"This layer is already sharded for expert_parallel_size={current.size}, rank "
                               f"{current.rank}.")
        return
    layer.shard(ExpertParallelDispatcher(layer.dispatcher, groups))
    mark_expert_parameters(layer)
    if groups.backend == "deepspeed":
        from lightning_moe.parallel.ds_marker import DeepSpeedExpertMarker

        layer.deepspeed_marker = DeepSpeedExpertMarker(layer.num_experts, groups.size)


def mark_expert_parameters(layer: MoELayer) -> None:
    """Give the layer's expert parameters DeepSpeed's MoE markings: ``allreduce = False`` (reduce
    over the expert-data-parallel group, not the world) and ``group_name`` (which group)."""
    groups = layer.expert_parallel
    for _, param in expert_parameters(layer):
        param.allreduce = False
        param.group_name = groups.name


def expert_parallel_layers(model: nn.Module) -> Iterator[tuple[str, MoELayer]]:
    """``(name, layer)`` for every :class:`~lightning_moe.layers.MoELayer` of ``model`` with
    ``expert_parallel_size > 1``."""
    for name, module in model.named_modules():
        if isinstance(module, MoELayer) and module.expert_parallel_size > 1:
            yield name, module


def setup_expert_parallel(model: nn.Module) -> list[str]:
    """Create the expert-parallel groups and shard every expert-parallel layer of ``model``.

    Collective: every rank calls it, after ``torch.distributed`` (or DeepSpeed) is initialised
    and before the optimizer is built; ``MoELanguageModel.setup`` does. Plain DeepSpeed users
    call it after ``deepspeed.init_distributed()`` and before ``deepspeed.initialize(model=model,
    model_parameters=moe_param_groups(model), ...)``. Raises ``ValueError``
    if an ``expert_parallel_size`` does not divide the number of processes. Returns the names of
    the expert parameters (relative to ``model``), which DDP must not reduce.
    """
    names = []
    for name, layer in expert_parallel_layers(model):
        shard_experts(layer, expert_parallel_groups(layer.expert_parallel_size))
        prefix = f"{name}.experts." if name else "experts."
        names += [prefix + param_name for param_name, _ in expert_parameters(layer)]
    return names


def is_expert_parameter(param: Tensor) -> bool:
    """Whether ``param`` carries the expert-parallel marking (DeepSpeed's ``is_moe_param``)."""
    return getattr(param, "allreduce", True) is False


@torch.no_grad()
def reduce_expert_gradients(model: nn.Module) -> None:
    """Average the expert gradients of ``model`` as DDP averages the others, for strategies that
    do not know about expert parallelism (DDP): sum over the expert-data-parallel group, divide
    by the world size. Each rank's expert gradient already sums the contributions of every
    token its experts processed, from all ranks of its expert-parallel group, so the result
    equals the gradient of the mean loss over the whole global batch. DeepSpeed reduces these
    itself (it reads the markings); do not call this under DeepSpeed."""
    for _, layer in expert_parallel_layers(model):
        groups = layer.expert_parallel
        if groups is None:
            continue
        grads = [p.grad for _, p in expert_parameters(layer) if p.grad is not None]
        if not grads:
            continue
        if groups.world_size == groups.size:  # no other rank holds these experts: nothing to sum
            for g in grads:
                g.div_(groups.world_size)
            continue
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat, group=groups.data_group)
        flat.div_(groups.world_size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def moe_param_groups(model: nn.Module, **group_options: Any) -> list[dict[str, Any]]:
    """Optimizer parameter groups of ``model`` with the routed experts of its MoE layers apart.

    The experts of expert-parallel layers form one group per expert-parallel size P, marked
    ``moe=True`` and ``name="ep_size_{P}"`` as DeepSpeed's ZeRO requires
    (``split_params_into_different_moe_groups_for_optimizer``); plain torch optimizers ignore the
    extra keys. The experts of other MoE layers form a group named ``"experts"``. The groups,
    and the order of parameters in them, are the same before and after sharding and at every
    P, so optimizer state saved at one expert-parallel size loads at another
    (:func:`gather_expert_optimizer_state`). ``group_options`` (``lr``, ``weight_decay``, ...)
    go into every group."""
    experts: dict[int, list[nn.Parameter]] = {}
    for module in model.modules():
        if isinstance(module, MoELayer):
            params = [p for _, p in expert_parameters(module) if p.requires_grad]
            experts.setdefault(module.expert_parallel_size, []).extend(params)
    taken = {id(p) for params in experts.values() for p in params}
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    groups = [{"params": dense, **group_options}] if dense else []
    for size, params in experts.items():
        marks = {"moe": True, "name": group_name(size)} if size > 1 else {"name": "experts"}
        groups.append({"params": params, **marks, **group_options})
    return groups


def _expert_slots(model: nn.Module) -> dict[int, MoELayer]:
    """``{optimizer state index: layer}`` for the expert parameters of the expert-parallel layers, for
    an optimizer built from :func:`moe_param_groups`."""
    layer_of = {}
    for _, layer in expert_parallel_layers(model):
        for _, param in expert_parameters(layer):
            layer_of[id(param)] = layer
    slots, index = {}, 0
    for group in moe_param_groups(model):
        for param in group["params"]:
            if id(param) in layer_of:
                slots[index] = layer_of[id(param)]
            index += 1
    return slots


def _sharded_expert_state(model: nn.Module, optimizer_state: dict[str, Any]) -> Iterator[
        tuple[dict[str, Any], str, Tensor, MoELayer, ExpertParallelGroups]]:
    """``(entry, key, value, layer, groups)`` for every tensor of per-element optimizer state (``entry``
    is one parameter's state dict) of the sharded expert parameters of ``model``."""
    for index, layer in _expert_slots(model).items():
        groups = layer.expert_parallel
        if groups is None or index not in optimizer_state["state"]:
            continue
        entry = optimizer_state["state"][index]
        for key, value in list(entry.items()):
            if isinstance(value, Tensor) and value.dim() >= 1:
                yield entry, key, value, layer, groups


@torch.no_grad()
def gather_expert_optimizer_state(model: nn.Module, optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """In a torch optimizer's ``state_dict()`` (built from :func:`moe_param_groups`), replace each
    sharded expert parameter's per-element state (Adam's moments, momentum buffers) by the whole
    tensor gathered over its expert-parallel group. Collective. Changes and returns it."""
    for entry, key, value, layer, groups in _sharded_expert_state(model, optimizer_state):
        if value.shape[0] == layer.num_experts // groups.size:
            entry[key] = gather_experts(value, groups)
    return optimizer_state


def slice_expert_optimizer_state(model: nn.Module, optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """Load-time half: keep this rank's rows of whole expert state tensors, and give the saved
    parameter groups this model's expert-parallel group names. Changes and returns it."""
    for entry, key, value, layer, groups in _sharded_expert_state(model, optimizer_state):
        if value.shape[0] == layer.num_experts != layer.num_experts // groups.size:
            entry[key] = value[groups.rows(layer.num_experts)]
    current = moe_param_groups(model)
    if len(current) == len(optimizer_state["param_groups"]):
        for saved, group in zip(optimizer_state["param_groups"], current, strict=True):
            for key in ("moe", "name"):
                saved.pop(key, None)
                if key in group:
                    saved[key] = group[key]
    return optimizer_state


@torch.no_grad()
def gather_expert_state_dict(model: nn.Module, state_dict: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Replace the expert shards in ``state_dict`` (of ``model``, keys under ``prefix``) by the whole
    tensors, gathered over each layer's expert-parallel group, so the checkpoint loads at any
    expert-parallel size. Collective: every rank calls it (``MoELanguageModel.on_save_checkpoint``
    does). Changes and returns ``state_dict``."""
    for name, layer in expert_parallel_layers(model):
        groups = layer.expert_parallel
        if groups is None:
            continue
        for param_name, param in expert_parameters(layer):
            key = f"{prefix}{name}.experts.{param_name}"
            if key not in state_dict:
                continue
            state_dict[key] = gather_experts(param, groups).to(state_dict[key].device)
    return state_dict
