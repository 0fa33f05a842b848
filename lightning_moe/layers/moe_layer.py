"""The MoE layer: a drop-in replacement for a dense FFN, ``(..., D) -> (..., D)``.

Legend: ``T`` tokens (leading dimensions flattened), ``D`` model width, ``E`` experts,
``F`` expert hidden width.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn

from lightning_moe._validate import check_non_negative_int, check_positive_int, divisors
from lightning_moe.balancing.losses import Balancer, check_balancers
from lightning_moe.dispatch.base import Dispatcher
from lightning_moe.dispatch.registry import get_dispatcher
from lightning_moe.experts.protocol import LazyExperts
from lightning_moe.experts.swiglu import SwiGLU, SwiGLUExperts
from lightning_moe.layers.config import MoEConfig
from lightning_moe.layers.record import RoutingRecorder
from lightning_moe.routing.capacity import ExpertCapacity
from lightning_moe.routing.factory import build_router
from lightning_moe.routing.routing import Router, Routing
from lightning_moe.routing.topk import TopKRouter

ExpertsFactory = Callable[[int, int, int], nn.Module]
"""Builds the routed experts from ``(d_model, d_ff, num_experts)``."""


def build_experts(experts: ExpertsFactory, d_model: int, d_ff: int, num_experts: int, lazy: bool) -> nn.Module:
    """``experts(d_model, d_ff, num_experts)``; with ``lazy``, built on the meta device (no storage)
    when the module can be given storage later (:class:`~lightning_moe.experts.protocol.LazyExperts`),
    else built whole, drawing from torch's global RNG exactly what a plain build draws."""
    if not lazy:
        return experts(d_model, d_ff, num_experts)
    rng = torch.random.get_rng_state()
    with torch.device("meta"):
        module = experts(d_model, d_ff, num_experts)
    if isinstance(module, LazyExperts):
        return module
    torch.random.set_rng_state(rng)  # as if the meta build had not run
    return experts(d_model, d_ff, num_experts)


def route(router: Router, x: Tensor, capacity: ExpertCapacity | None, training: bool,
          token_ids: Tensor | None = None) -> Routing:
    """Route ``x`` of shape ``(..., D)`` (flattened to ``(T, D)``): the router's decision, with
    ``seq_len`` set from a ``(B, S, D)`` input (sequence-level balancers) and the capacity limit
    applied. ``MoELayer`` and ``RouterGate`` (routers swapped into Hugging Face blocks) share it."""
    routing = router(x.reshape(-1, router.d_model), None if token_ids is None else token_ids.reshape(-1))
    if x.dim() >= 3:
        routing.seq_len = x.shape[-2]
    return routing if capacity is None else capacity(routing, training)


def warn_misplaced_groups(router: Router, balancers: Sequence[Balancer], expert_parallel_size: int) -> None:
    """Warn when device-limited routing (a router's ``num_groups``) or a device-level balancer
    (``DeviceAuxLoss``/``CommBalanceLoss``'s ``num_devices``) groups the experts in a way that does
    not follow the expert-parallel placement: rank ``r`` holds experts ``r*E/P .. (r+1)*E/P - 1``, so a
    group matches devices when it is one rank's experts (G = P), part of them (P divides G), or
    several ranks' (G divides P). Otherwise "M groups per token" bounds no rank count and the
    balancer balances groups that are not devices."""
    if expert_parallel_size == 1:
        return
    grouped = [("the router's `num_groups`", getattr(router, "num_groups", None))]
    grouped += [(f"{type(b).__name__}'s `num_devices`", getattr(b, "num_devices", None)) for b in balancers]
    for what, groups in grouped:
        if groups is not None and groups % expert_parallel_size and expert_parallel_size % groups:
            warnings.warn(f"{what} ({groups}) does not follow the expert-parallel placement "
                          f"(expert_parallel_size={expert_parallel_size}: each rank holds E/{expert_parallel_size} "
                          f"consecutive experts); use {expert_parallel_size} or a multiple or divisor of it so that "
                          "its groups are ranks.", UserWarning, stacklevel=3)


class MoELayer(RoutingRecorder, nn.Module):
    """Router -> dispatch -> experts -> gated combine, plus optional shared experts.

    With ``shared_d_ff > 0`` every token also passes through a dense SwiGLU of that width (the
    shared experts, merged into one MLP as DeepSeek-V3 and Qwen2-MoE do: ``n`` shared experts of
    width F are one SwiGLU of width ``n * F``), added to the routed output. With
    ``shared_gate=True`` its output is scaled per token by ``sigmoid(x w_g)`` (Qwen2-MoE's
    ``shared_expert_gate``, one ``(1, D)`` weight); without it (DeepSeek) it is added as is.

    After each forward the layer holds ``aux_losses`` (``{balancer.name: loss}``, tensors with
    grad, to be added to the training loss) and ``stats`` (a detached :class:`RoutingStats`), as
    every :class:`~lightning_moe.layers.RoutingRecorder` does. Both are overwritten by the next
    forward; nothing is stored anywhere else.

    Args:
        d_model: model width D, >= 1.
        d_ff: hidden width F of each expert, >= 1.
        num_experts: number of experts E, >= 1.
        router: the router; its ``d_model`` and ``num_experts`` must match. Defaults to
            ``TopKRouter(d_model, num_experts, top_k=2)``.
        balancers: auxiliary losses computed from each routing decision (none by default).
        dispatcher: a registered dispatch backend's name (``lightning_moe.dispatch.DISPATCHERS``:
            ``auto``, the default (``grouped`` on CPU, ``triton`` on a GPU), ``grouped``, ``triton``,
            ``triton-kernels``, ``triton-grouped_mm``, ``loop`` and any added by ``register_dispatcher``), or a
            :class:`~lightning_moe.dispatch.Dispatcher`. ``layer.dispatcher`` is the object; assigning
            a name or an object replaces the backend (under expert parallelism, the local one).
        capacity: expert capacity limits (:class:`~lightning_moe.routing.ExpertCapacity`);
            ``None`` (the default) is dropless. Tokens whose every assignment is dropped come out
            as zeros, i.e. unchanged through the block's residual connection.
        shared_d_ff: hidden width of the shared experts (all of them together), >= 0; 0 = none.
        shared_gate: scale the shared experts' output by a learned sigmoid gate per token
            (needs ``shared_d_ff > 0``).
        experts: experts factory called as ``experts(d_model, d_ff, num_experts)``; SwiGLU
            (:class:`~lightning_moe.experts.SwiGLUExperts`) by default. Any module with the
            :class:`~lightning_moe.experts.Experts` protocol (``expert_forward``,
            ``grouped_forward``) works; ``grouped`` and ``triton`` have fused paths for experts that
            offer ``swiglu_weights()`` (:class:`~lightning_moe.experts.FusedSwiGLU`).
        expert_parallel_size: ranks the experts are split over (P), >= 1, dividing
            ``num_experts``. With P > 1 the routed experts are built lazily, without storage (on
            the meta device), when they offer it (:class:`~lightning_moe.experts.protocol.LazyExperts`:
            the built-in experts do); everything else is built as usual, drawing the same random
            numbers as with P = 1. :func:`~lightning_moe.parallel.setup_expert_parallel`, run on
            every rank (``MoELanguageModel.setup`` calls it), calls :meth:`shard` with an
            expert-parallel dispatcher: only then does each rank allocate its ``E / P`` experts,
            initialised from their global indices, so the model is the same as with P = 1 for
            the same seed and no rank ever holds all E. Tokens then reach their experts by
            all-to-all, dropless, and ``dispatcher`` runs the local experts. Experts from a factory
            without that capability are built whole and sliced by :meth:`shard`. Used before
            sharding (one process), the layer computes locally: see :meth:`materialize` for when
            lazy experts get all E rows.

    Under expert parallelism ``exchange`` holds, after each forward, per rank of the group: the rows
    sent to and received from it through the all-to-all (``sent_rows``, ``received_rows``; one row
    per distinct (token, rank) pair, none for this rank's own experts), the rows kept here
    (``local_rows``) and the assignments alike (``sent_assignments``, ``received_assignments``,
    ``local_assignments``).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        *,
        router: Router | None = None,
        balancers: Sequence[Balancer] = (),
        dispatcher: str | Dispatcher = "auto",
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
        check_positive_int("expert_parallel_size", expert_parallel_size)
        if num_experts % expert_parallel_size:
            raise ValueError(
                f"`expert_parallel_size`={expert_parallel_size} must divide `num_experts`={num_experts}; valid values "
                f"are {divisors(num_experts)}."
            )
        self.expert_parallel_size = expert_parallel_size
        self.experts = build_experts(experts, d_model, d_ff, num_experts, lazy=expert_parallel_size > 1)
        self._maybe_lazy = self.experts_lazy  # cleared once they have storage: forward checks only this flag
        if getattr(self.experts, "num_experts", None) != num_experts:
            raise ValueError(f"`experts` must build a module with num_experts={num_experts}, got {self.experts!r}.")
        self.shared_d_ff = check_non_negative_int("shared_d_ff", shared_d_ff)
        if shared_gate and not shared_d_ff:
            raise ValueError("`shared_gate=True` needs shared experts: set `shared_d_ff` > 0.")
        self.shared_expert = SwiGLU(d_model, shared_d_ff) if shared_d_ff else None
        self.shared_expert_gate = nn.Linear(d_model, 1, bias=False) if shared_gate else None
        self.balancers = check_balancers(balancers, num_experts)
        warn_misplaced_groups(self.router, self.balancers, expert_parallel_size)
        self.capacity = capacity
        self._dispatcher = get_dispatcher(dispatcher)
        self.register_load_state_dict_pre_hook(MoELayer._keep_own_expert_rows)
        self.register_state_dict_pre_hook(MoELayer._materialize_before_saving)
        self.clear_record()

    @classmethod
    def from_config(cls, d_model: int, moe: MoEConfig, experts: ExpertsFactory = SwiGLUExperts) -> MoELayer:
        """The layer ``moe`` describes at width ``d_model``: ``moe.routed_experts`` experts of width
        ``moe.routed_d_ff`` (fine-grained split applied), its router built by the factory, the
        shared balancers, and the shared experts merged into one SwiGLU."""
        router = build_router(moe.router, d_model, moe.routed_experts, moe.granularity)
        return cls(d_model, moe.routed_d_ff, moe.routed_experts, router=router, balancers=moe.layer_balancers(),
                   dispatcher=moe.dispatcher, capacity=moe.capacity,
                   shared_d_ff=moe.num_shared_experts * moe.routed_d_ff, shared_gate=moe.shared_expert_gate,
                   experts=experts, expert_parallel_size=moe.expert_parallel_size)

    @property
    def dispatcher(self) -> Dispatcher:
        """The dispatcher that runs this layer's experts (under expert parallelism the wrapper,
        whose ``local`` is the backend)."""
        return self._dispatcher

    @dispatcher.setter
    def dispatcher(self, dispatcher: str | Dispatcher) -> None:
        self._dispatcher = self._dispatcher.with_local(get_dispatcher(dispatcher))

    @property
    def expert_rows(self) -> slice:
        """The global experts this layer holds (``dispatcher.expert_rows``): all E until :meth:`shard`."""
        return self._dispatcher.expert_rows(self.num_experts)

    @property
    def expert_parallel(self) -> Any:
        """The expert-parallel groups this layer's experts are sharded over (the dispatcher's
        ``groups``), or ``None`` while it holds all E experts."""
        return self._dispatcher.groups

    @property
    def exchange(self) -> dict[str, list[int]]:
        """Rows sent to and received from each rank in the last forward, under expert parallelism."""
        return getattr(self._dispatcher, "exchange", {})

    def expert_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of the routed-expert weights (first dimension indexes the experts
        this rank holds), names relative to ``experts``."""
        local = self.experts.num_experts
        for name, param in self.experts.named_parameters():
            if param.dim() >= 1 and param.shape[0] == local:
                yield name, param

    def shard(self, dispatcher: Dispatcher) -> None:
        """Keep only the experts ``dispatcher`` computes on this rank
        (``dispatcher.expert_rows(num_experts)``, a slice of the whole expert tensors) and dispatch
        through it from now on; it must bring every assignment to the rank holding its expert
        (:class:`~lightning_moe.parallel.ExpertParallelDispatcher` does). Lazily built experts get
        storage for those rows only, on the device of the layer's other tensors, initialised from
        their global indices; experts with storage are sliced. Call once, before the optimizer is
        built. Afterwards :meth:`load_state_dict` also takes whole expert tensors (E rows) and
        keeps this rank's rows, so checkpoints of any expert-parallel size load."""
        rows = dispatcher.expert_rows(self.num_experts)
        if self.expert_rows != slice(0, self.num_experts):
            raise RuntimeError(f"This layer already holds only experts {self.expert_rows.start}.."
                               f"{self.expert_rows.stop - 1} of {self.num_experts}; shard it once.")
        if self.experts_lazy:
            self.experts.materialize(rows, self._device())
            self._maybe_lazy = self.experts_lazy  # still lazy on the meta device
        else:
            for name, param in list(self.expert_parameters()):
                owner_name, _, attr = name.rpartition(".")
                owner = self.experts.get_submodule(owner_name) if owner_name else self.experts
                setattr(owner, attr, nn.Parameter(param.detach()[rows].clone(), requires_grad=param.requires_grad))
            self.experts.num_experts = rows.stop - rows.start
            if isinstance(self.experts, LazyExperts):
                self.experts.first_expert = rows.start  # so that a later reset_parameters() knows its experts
        self._dispatcher = dispatcher

    @property
    def experts_lazy(self) -> bool:
        """Whether the routed experts were built lazily and have no storage yet (meta tensors)."""
        return isinstance(self.experts, LazyExperts) and any(p.is_meta for p in self.experts.parameters())

    def _device(self) -> torch.device | None:
        """The device of the layer's tensors other than the routed experts (``None``: it has none)."""
        for name, tensor in chain(self.named_parameters(), self.named_buffers()):
            if not name.startswith("experts."):
                return tensor.device
        return None

    def materialize(self) -> None:
        """Give lazily built experts storage for all E experts, before sharding.

        The rule for a layer with ``expert_parallel_size`` > 1 used before :meth:`shard` (in one
        process): whatever reads or writes the experts' values gives them all E rows, initialised
        as with P = 1, on the device of the layer's other tensors: :meth:`forward`, ``state_dict``
        and ``load_state_dict`` call this. The parameters stay the same objects, so an optimizer
        built before holds them. Moving or casting the layer (``.to``, ``.half()``) allocates
        nothing: lazy experts keep the new dtype and get storage later, wherever the rest of the
        layer is then. Does nothing when the experts have storage, or when the whole layer is on
        the meta device (nothing to give storage on; ``to_empty`` the model first). Once a rank
        has all E rows, :meth:`shard` slices them as it slices experts that were never lazy.
        """
        if not self.experts_lazy:
            self._maybe_lazy = False
            return
        device = self._device()
        if device is None or device.type != "meta":
            self.experts.materialize(slice(0, self.num_experts), device)
            self._maybe_lazy = False

    def _materialize_before_saving(self, prefix: str, keep_vars: bool) -> None:
        # State-dict pre-hook: a state_dict holds values, never meta placeholders.
        self.materialize()

    def _keep_own_expert_rows(self, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
        # Load-state-dict pre-hook: lazy experts get storage first (loading into meta tensors would
        # silently do nothing); whole expert tensors (E rows) for a sharded layer -> this rank's rows.
        self.materialize()
        local = self.experts.num_experts
        if local == self.num_experts:
            return
        for param_name, _ in self.expert_parameters():
            key = f"{prefix}experts.{param_name}"
            value = state_dict.get(key)
            if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == self.num_experts:
                state_dict[key] = value[self.expert_rows]

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Tensor:
        """``x`` of shape ``(..., D)`` -> same shape. ``token_ids`` (shape ``x.shape[:-1]``), when
        given, reach the router (id-hash routing reads them; the other routers ignore them)."""
        if x.shape[-1] != self.d_model:
            raise ValueError(
                f"MoELayer expects inputs whose last dimension is d_model={self.d_model}, got shape {tuple(x.shape)}."
            )
        if self._maybe_lazy:  # lazy experts used before sharding: all E of them
            self.materialize()
        x_TD = x.reshape(-1, self.d_model)
        routing = route(self.router, x, self.capacity, self.training, token_ids)
        y_TD = self._dispatcher(x_TD, routing, self.experts)
        if self.shared_expert is not None:
            shared_TD = self.shared_expert(x_TD)
            if self.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD
        self.record(routing)
        return y_TD.view(x.shape)

    def extra_repr(self) -> str:
        return (f"dispatcher={self.dispatcher.name!r}, balancers={self.balancers}, capacity={self.capacity}, "
                f"shared_d_ff={self.shared_d_ff}, shared_gate={self.shared_expert_gate is not None}"
                + (f", expert_parallel_size={self.expert_parallel_size}" if self.expert_parallel_size > 1 else ""))
