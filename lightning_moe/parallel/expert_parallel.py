"""Expert parallelism: each layer's experts split over the ranks of an expert-parallel group, tokens
exchanged by a dropless all-to-all with uneven split sizes.

Legend: ``T`` tokens on this rank, ``D`` model width, ``E`` experts of the layer, ``P`` ranks of
the expert-parallel group, ``L = E / P`` experts held by each rank, ``A`` assignments routed on
this rank, ``R`` assignment rows received from the group.

How one layer runs on one rank (:func:`expert_parallel_dispatch`):

1. The router (replicated, like every non-expert weight) routes this rank's tokens to all E
   experts; nothing about routing changes, so every router works unchanged.
2. Assignments are sorted by expert, so the rows for rank ``j`` (experts ``jL .. jL+L-1``) are
   consecutive; an all-to-all of the ``(P, L)`` count table tells each rank how many rows it gets
   from whom, then the rows move by a second, variable-size all-to-all. Nothing is dropped.
3. The local experts run on the received rows with the layer's own backend (``loop``,
   ``grouped`` or ``triton``), ungated.
4. The outputs travel back by the transposed all-to-all and are combined with the gates on the
   rank the tokens came from, so gate gradients stay local.

Expert parameters are marked as DeepSpeed marks its own: ``allreduce = False`` and
``group_name = "ep_size_{P}"``, so DeepSpeed's engine and ZeRO reduce their gradients over the
expert-data-parallel group only; under DDP, :func:`reduce_expert_gradients` does the same.
Checkpoints always hold the whole (unsharded) expert tensors, see :func:`gather_expert_state_dict`,
so they load at any expert-parallel size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_moe.parallel.all_to_all import all_to_all, all_to_all_counts
from lightning_moe.parallel.groups import ExpertParallelGroups, expert_parallel_groups, group_name
from lightning_moe.routing.routing import Routing

if TYPE_CHECKING:
    from lightning_moe.dispatch.backends import Dispatcher, Experts
    from lightning_moe.layers.moe_layer import MoELayer


def expert_parallel_dispatch(x_TD: Tensor, routing: Routing, experts: Experts, groups: ExpertParallelGroups,
                             local_dispatch: Dispatcher, exchange: dict[str, Any] | None = None) -> Tensor:
    """``y_t = sum_a weight_a * expert_{e_a}(x_t)`` with the experts split over ``groups.group``.

    ``experts`` holds this rank's ``L = E / P`` experts (global experts ``rank*L .. rank*L+L-1``);
    ``routing`` uses global expert indices. ``local_dispatch`` runs the local experts. When
    ``exchange`` is a dict it receives ``sent_rows`` and ``received_rows`` (per rank of the group,
    this rank included), for statistics and the benchmark.
    """
    size, local = groups.size, experts.num_experts
    num_experts = routing.num_experts
    if num_experts != size * local:
        raise ValueError(f"The routing has {num_experts} experts but {size} ranks hold {local} each.")
    order_A = torch.argsort(routing.expert_A, stable=True)
    token_A = routing.token_A[order_A]
    send_PL = routing.tokens_per_expert().view(size, local)
    recv_PL = all_to_all_counts(send_PL, groups.group)  # row j: rows rank j sends to each local expert
    sends, recvs = send_PL.sum(1).tolist(), recv_PL.sum(1).tolist()  # the one host sync: split sizes
    if exchange is not None:
        exchange.update(sent_rows=sends, received_rows=recvs)
    x_RD = all_to_all(x_TD.index_select(0, token_A), recvs, sends, groups.group)
    # Received rows come grouped by source rank, each group sorted by local expert.
    local_R = torch.repeat_interleave(torch.arange(local, device=x_TD.device).repeat(size),
                                      recv_PL.flatten().to(x_TD.device))
    rows_R = torch.arange(x_RD.shape[0], device=x_TD.device)
    local_routing = Routing(
        scores_TE=x_RD.new_zeros(1, local).expand(x_RD.shape[0], local),  # unread by dispatch
        logits_TE=x_RD.new_zeros(1, local).expand(x_RD.shape[0], local),
        token_A=rows_R, expert_A=local_R, weight_A=torch.ones(x_RD.shape[0], device=x_TD.device),
    )
    local_routing._tokens_per_expert_E = recv_PL.sum(0)
    out_RD = local_dispatch(x_RD, local_routing, experts)
    back_AD = all_to_all(out_RD, sends, recvs, groups.group)
    weighted_AD = back_AD * routing.weight_A[order_A].unsqueeze(1).to(back_AD.dtype)
    return torch.zeros_like(x_TD).index_add(0, token_A, weighted_AD)


@torch.no_grad()
def gather_experts(shard: Tensor, groups: ExpertParallelGroups) -> Tensor:
    """The whole ``(E, ...)`` tensor of which every rank of ``groups.group`` holds its rows ``shard``.
    Collective over the expert-parallel group."""
    pieces = [torch.empty_like(shard) for _ in range(groups.size)]
    dist.all_gather(pieces, shard.detach().contiguous(), group=groups.group)
    return torch.cat(pieces)


def expert_parameters(layer: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the layer's routed-expert weights (first dimension indexes experts),
    names relative to ``layer.experts``."""
    local = layer.experts.num_experts
    for name, param in layer.experts.named_parameters():
        if param.dim() >= 1 and param.shape[0] == local:
            yield name, param


def shard_experts(layer: MoELayer, groups: ExpertParallelGroups) -> None:
    """Keep only this rank's ``E / P`` experts of ``layer`` (a slice of its whole expert tensors)
    and mark them for expert-data-parallel gradient reduction. Called once, before the optimizer
    is built; a second call with the same groups does nothing."""
    current = layer.expert_parallel
    if current is not None:
        if current.size != groups.size or current.rank != groups.rank:
            raise RuntimeError(f"This layer is already sharded for expert_parallel_size={current.size}, rank "
                               f"{current.rank}.")
        return
    rows = groups.rows(layer.num_experts)
    for name, param in list(expert_parameters(layer)):
        owner_name, _, attr = name.rpartition(".")
        owner = layer.experts.get_submodule(owner_name) if owner_name else layer.experts
        shard = nn.Parameter(param.detach()[rows].clone(), requires_grad=param.requires_grad)
        setattr(owner, attr, shard)
    layer.experts.num_experts = rows.stop - rows.start
    layer._expert_parallel = groups
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
    from lightning_moe.layers.moe_layer import MoELayer

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
    from lightning_moe.layers.moe_layer import MoELayer

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


@torch.no_grad()
def gather_expert_optimizer_state(model: nn.Module, optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """In a torch optimizer's ``state_dict()`` (built from :func:`moe_param_groups`), replace each
    sharded expert parameter's per-element state (Adam's moments, momentum buffers) by the whole
    tensor gathered over its expert-parallel group. Collective. Changes and returns it."""
    for index, layer in _expert_slots(model).items():
        groups = layer.expert_parallel
        if groups is None or index not in optimizer_state["state"]:
            continue
        local = layer.num_experts // groups.size
        for key, value in optimizer_state["state"][index].items():
            if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == local:
                optimizer_state["state"][index][key] = gather_experts(value, groups)
    return optimizer_state


def slice_expert_optimizer_state(model: nn.Module, optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """Load-time half: keep this rank's rows of whole expert state tensors, and give the saved
    parameter groups this model's expert-parallel group names. Changes and returns it."""
    for index, layer in _expert_slots(model).items():
        groups = layer.expert_parallel
        if groups is None or index not in optimizer_state["state"]:
            continue
        local = layer.num_experts // groups.size
        for key, value in optimizer_state["state"][index].items():
            if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == layer.num_experts != local:
                optimizer_state["state"][index][key] = value[groups.rows(layer.num_experts)]
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


def slice_expert_state_dict(layer: MoELayer, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Load-time half of resharding: where ``state_dict`` holds whole expert tensors (E rows) for a
    sharded layer, keep this rank's rows. Registered as the layer's load-state-dict pre-hook."""
    groups = layer.expert_parallel
    if groups is None:
        return
    local = layer.num_experts // groups.size
    for param_name, _ in expert_parameters(layer):
        key = f"{prefix}experts.{param_name}"
        value = state_dict.get(key)
        if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == layer.num_experts != local:
            state_dict[key] = value[groups.rows(layer.num_experts)]
