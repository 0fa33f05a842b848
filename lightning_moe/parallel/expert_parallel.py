"""Expert parallelism: each layer's experts split over the ranks of an expert-parallel group, tokens
exchanged by a dropless, deduplicated all-to-all with uneven split sizes.

Legend: ``T`` tokens on this rank, ``D`` model width, ``E`` experts of the layer, ``P`` ranks of
the expert-parallel group, ``L = E / P`` experts held by each rank, ``A`` assignments routed on
this rank, ``N`` rows this rank sends (its distinct (token, other rank) pairs), ``R`` rows it
receives, ``B`` assignments it receives.

How one layer runs on one rank (:class:`ExpertParallelDispatcher`, installed by
:meth:`MoELayer.shard <lightning_moe.layers.MoELayer.shard>`; it wraps a local dispatcher):

1. The router (replicated, like every non-expert weight) routes this rank's tokens to all E
   experts; nothing about routing changes, so every router works unchanged.
2. permute: each assignment's destination is the rank holding its expert (``expert // L``). A
   token goes to each *other* rank holding any of its experts once, however many of its experts
   sit there: the rows sent are the distinct (token, destination) pairs, grouped by destination.
   Beside them travel, per assignment, its row within the destination's block and its local expert
   (one int64, not differentiable) and its gate (differentiable, so router gradients come back by
   the transposed exchange). One all-to-all of a ``(P, 2)`` count table (rows and assignments per
   rank pair) and one host read give the split sizes. Rows for this rank's own experts do not
   enter the all-to-all (split size 0): the rows ``compute`` gets are this rank's ``T`` tokens
   followed by the ``R`` received rows. Nothing is dropped.
3. compute: the local dispatcher (``loop``, ``grouped``, ``triton``, ...) runs on those rows as if
   they were tokens, with a routing of row, local expert and gate, so each row comes out gated and
   summed over its local experts.
4. combine: the first ``T`` output rows are this rank's own experts' share; the other ``R`` go back
   by the transposed all-to-all, one combined row per (token, rank), and are added to their tokens.

So the rows through the all-to-all (``D`` values each, four times a training step) are the minimum:
one per distinct (token, other rank) pair. Each assignment sent to another rank adds an int64 and
its gate forward, and the gate's gradient backward. The autograd engine runs the backward
all-to-alls in the same order on every rank (the graphs have the same shape), as the collective
requires.

Expert parameters are marked as DeepSpeed marks its own: ``allreduce = False`` and
``group_name = "ep_size_{P}"``, so DeepSpeed's engine and ZeRO reduce their gradients over the
expert-data-parallel group only; under DDP, :func:`reduce_expert_gradients` does the same.
Checkpoints: :class:`~lightning_moe.parallel.MoEDDPStrategy` (``torch.distributed.checkpoint``) and
:class:`~lightning_moe.parallel.MoEDeepSpeedStrategy` (DeepSpeed's per-expert files) have every rank
write its own experts and read back only the experts it holds, at any expert-parallel size; under
plain DDP, :func:`gather_expert_state_dict` gathers whole expert tensors into one file instead.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_moe.dispatch.base import Dispatcher, Plan, autocast_inputs
from lightning_moe.experts.protocol import Experts
from lightning_moe.layers.moe_layer import MoELayer
from lightning_moe.parallel.all_to_all import all_to_all, all_to_all_counts
from lightning_moe.parallel.groups import ExpertParallelGroups, expert_parallel_groups, group_name
from lightning_moe.routing.routing import Routing


@dataclass
class ExchangePlan(Plan):
    """What the exchange did, for ``compute`` and ``combine``: ``counts_E`` counts the assignments
    per local expert of the ``T + R`` rows ``compute`` gets, ``num_tokens`` is T.

    Attributes:
        routing: the routing of those rows (row index as token, local expert, gate), which the
            local dispatcher runs.
        token_N: ``(N,)`` this rank's token of each row it sent, in send order: where the
            combined rows that come back are added.
        sends: rows sent to each rank of the group (0 to this one).
        recvs: rows received from each rank of the group (0 from this one).
    """

    routing: Routing | None = None
    token_N: Tensor | None = None
    sends: list[int] | None = None
    recvs: list[int] | None = None


class ExpertParallelDispatcher(Dispatcher):
    """``y_t = sum_a weight_a * expert_{e_a}(x_t)`` with the experts split over ``groups.group``.

    The layer holds this rank's ``L = E / P`` experts (global experts ``rank*L .. rank*L+L-1``);
    routings use global expert indices. A token goes once to each other rank holding any of its
    experts, with their local ids and gates; ``local`` (any dispatcher) runs there on the rows
    received and on this rank's own tokens, gating and summing each row's experts, and one
    combined row per (token, rank) comes back (module docstring). The steps: ``permute``
    deduplicates and exchanges (``(T + R, D)`` rows: this rank's tokens, then the received ones),
    ``compute`` runs ``local`` on them, gates included, ``combine`` sends the rows back and adds
    them to their tokens.

    After each forward ``exchange`` holds, per rank of the group: ``sent_rows`` and
    ``received_rows`` (through the all-to-all, 0 for this rank), ``local_rows`` (this rank's
    distinct tokens for its own experts, kept here: nonzero at this rank only), and
    ``sent_assignments``, ``received_assignments``, ``local_assignments`` likewise.
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
            raise ValueError(f"The routing has {routing.num_experts} experts; expert parallelism over {size} ranks "
                             f"needs a multiple of {size}.")
        local, num_tokens, dtype = routing.num_experts // size, x_TD.shape[0], x_TD.dtype
        (x_TD,) = autocast_inputs(x_TD)  # rows cross in the dtype the experts run in
        dest_A = routing.expert_A // local  # the rank holding each assignment's expert
        present_PT = dest_A.new_zeros(size, num_tokens).index_put_((dest_A, routing.token_A), torch.ones_like(dest_A))
        row_A = (present_PT.cumsum(1) - 1)[dest_A, routing.token_A]  # row within its destination's block
        self.exchange = self._exchange_counts(present_PT, dest_A)
        token_N, x_RD = self._send_rows(x_TD, present_PT)
        rows = self._send_assignments(routing, dest_A, row_A * local + routing.expert_A % local, num_tokens)
        plan = ExchangePlan(counts_E=rows.tokens_per_expert(), num_tokens=num_tokens, dtype=dtype, routing=rows,
                            token_N=token_N, sends=self.exchange["sent_rows"], recvs=self.exchange["received_rows"])
        return torch.cat([x_TD, x_RD]), plan

    def _exchange_counts(self, present_PT: Tensor, dest_A: Tensor) -> dict[str, list[int]]:
        """Rows and assignments to and from each rank: one all-to-all of a ``(P, 2)`` table, one host read."""
        size, rank = self.groups.size, self.groups.rank
        assignments_P = dest_A.new_zeros(size).scatter_add_(0, dest_A, torch.ones_like(dest_A))
        send_P2 = torch.stack([present_PT.sum(1), assignments_P], 1)
        recv_P2 = all_to_all_counts(send_P2, self.groups.group)  # row j: what rank j sends here
        (sent_rows, sent_assignments), (received_rows, received_assignments) = \
            torch.stack([send_P2.T, recv_P2.T]).tolist()  # the one host sync: split sizes

        def remote(counts: list[int]) -> list[int]:
            return [0 if j == rank else count for j, count in enumerate(counts)]

        def own(counts: list[int]) -> list[int]:
            return [count if j == rank else 0 for j, count in enumerate(counts)]

        return {"sent_rows": remote(sent_rows), "received_rows": remote(received_rows), "local_rows": own(sent_rows),
                "sent_assignments": remote(sent_assignments), "received_assignments": remote(received_assignments),
                "local_assignments": own(sent_assignments)}

    def _send_rows(self, x_TD: Tensor, present_PT: Tensor) -> tuple[Tensor, Tensor]:
        """``(token_N, x_RD)``: the token of each row sent (one per distinct (token, other rank) pair,
        grouped by rank) and the rows received. Clears this rank's row of ``present_PT``."""
        exchange = self.exchange
        present_PT[self.groups.rank] = 0  # rows for this rank's own experts do not enter the all-to-all
        key_N = torch.argsort(present_PT.flatten(), descending=True, stable=True)[:sum(exchange["sent_rows"])]
        token_N = key_N % max(present_PT.shape[1], 1)  # key = rank * T + token, ascending
        x_ND = x_TD.index_select(0, token_N)
        return token_N, all_to_all(x_ND, exchange["received_rows"], exchange["sent_rows"], self.groups.group)

    def _send_assignments(self, routing: Routing, dest_A: Tensor, meta_A: Tensor, num_tokens: int) -> Routing:
        """The routing of the ``T + R`` rows this rank computes: its assignments to its own experts
        (row = token) and those received (``meta_A`` packs each one's row in its destination's
        block and its local expert; gates through the differentiable all-to-all)."""
        exchange, rank, local = self.exchange, self.groups.rank, routing.num_experts // self.groups.size
        order_A = torch.argsort(dest_A, stable=True)  # grouped by destination, this rank's own in the middle
        meta_A, weight_A = meta_A[order_A], routing.weight_A[order_A]
        start = sum(exchange["sent_assignments"][:rank])
        own = slice(start, start + exchange["local_assignments"][rank])

        def to_others(t_A: Tensor) -> Tensor:
            return all_to_all(torch.cat([t_A[:own.start], t_A[own.stop:]]), exchange["received_assignments"],
                              exchange["sent_assignments"], self.groups.group)

        meta_B, weight_B = to_others(meta_A), to_others(weight_A)
        # Received rows follow this rank's T tokens in source-rank blocks.
        block_starts = list(itertools.accumulate(exchange["received_rows"][:-1], initial=num_tokens))
        start_B = torch.repeat_interleave(meta_B.new_tensor(block_starts), meta_B.new_tensor(
            exchange["received_assignments"]), output_size=meta_B.numel())
        return _row_routing(torch.cat([routing.token_A[order_A][own], start_B + meta_B // local]),
                            torch.cat([meta_A[own] % local, meta_B % local]), torch.cat([weight_A[own], weight_B]),
                            num_tokens + sum(exchange["received_rows"]), local)

    def compute(self, x_RD: Tensor, plan: Plan, experts: Experts) -> Tensor:
        if experts.num_experts != plan.routing.num_experts:
            raise ValueError(f"The layer holds {experts.num_experts} experts but the exchange brought rows for "
                             f"{plan.routing.num_experts} local experts.")
        return self.local(x_RD, plan.routing, experts)

    def combine(self, out_RD: Tensor, plan: ExchangePlan) -> Tensor:
        num_tokens = plan.num_tokens
        back_ND = all_to_all(out_RD[num_tokens:], plan.sends, plan.recvs, self.groups.group)
        return out_RD[:num_tokens].to(plan.dtype).index_add(0, plan.token_N, back_ND.to(plan.dtype))


def _row_routing(row_A: Tensor, local_A: Tensor, weight_A: Tensor, num_rows: int, num_local: int) -> Routing:
    """The routing of the rows one rank computes: each assignment's row (as its token), local expert
    and gate. They were routed already, by their source rank's router; ``scores_TE`` holds each
    row's gates (detached) and ``logits_TE`` is zero (no router here): only the local dispatcher
    reads this routing, through its token, expert and weight fields."""
    gates_RL = weight_A.detach().new_zeros(num_rows, num_local).index_put_((row_A, local_A), weight_A.detach(),
                                                                            accumulate=True)
    logits_RL = gates_RL.new_zeros((), dtype=torch.float32).expand(num_rows, num_local)
    return Routing(scores_TE=gates_RL, logits_TE=logits_RL, token_A=row_A, expert_A=local_A, weight_A=weight_A)


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
    gradient reduction. Lazily built experts (the built-in ones at P > 1) get storage for those
    rows only, initialised from their global indices; experts built whole are sliced. Called
    once, before the optimizer is built; a second call with the same groups does nothing."""
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

    The layers' routed experts were built without storage (:class:`~lightning_moe.layers.MoELayer`
    with ``expert_parallel_size`` > 1); here each rank allocates and initialises only its
    ``E / P`` experts, on the device of the rest of the layer, so no rank ever holds the whole
    model's experts and the model is the one P = 1 builds for the same seed. Moving the model
    (``model.to(device)``) before this call allocates no experts either.

    Collective: every rank calls it, after ``torch.distributed`` (or DeepSpeed) is initialised
    and before the optimizer is built; ``MoELanguageModel.setup`` does. Plain DeepSpeed users
    call it after ``deepspeed.init_distributed()`` and before ``deepspeed.initialize(model=model,
    model_parameters=moe_param_groups(model), ...)``. Raises ``ValueError``
    if an ``expert_parallel_size`` does not divide the number of processes. Returns the names of
    the expert parameters (relative to ``model``), which DDP must not reduce.
    """
    for _, layer in expert_parallel_layers(model):
        shard_experts(layer, expert_parallel_groups(layer.expert_parallel_size))
    return list(sharded_expert_parameters(model))


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


def sharded_expert_parameters(model: nn.Module) -> dict[str, MoELayer]:
    """``{name: layer}`` for the expert parameters of ``model``'s sharded layers, named as in
    ``model.state_dict()``: this rank holds rows ``layer.expert_rows`` of the whole ``(E, ...)`` tensors
    (``MoEDDPStrategy`` writes and reads these as shards)."""
    shards = {}
    for name, layer in expert_parallel_layers(model):
        if layer.expert_parallel is None:
            continue
        prefix = f"{name}.experts." if name else "experts."
        for param_name, _ in expert_parameters(layer):
            shards[prefix + param_name] = layer
    return shards
