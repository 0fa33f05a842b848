"""The dispatcher contract: ``y_t = sum_{a: token_a = t} weight_a * expert_{e_a}(x_t)`` in three named steps.

Legend: ``T`` tokens, ``D`` model width, ``E`` experts, ``A`` assignments (kept (token, expert)
pairs), rows of ``x_AD`` sorted by expert.

1. ``permute(x_TD, routing) -> (x_AD, plan)``: one row per assignment, grouped by expert;
   ``plan`` remembers where each row came from (``plan.counts_E`` rows per expert).
2. ``compute(x_AD, plan, experts) -> out_AD``: every expert on its own rows, ungated.
3. ``combine(out_AD, plan) -> y_TD``: each row scaled by its gate and added to its token.

``dispatcher(x_TD, routing, experts)`` runs the three; a backend may fuse them when called whole
(``grouped`` does, so no ``(A, D)`` tensor is made) as long as the steps alone compute the same.
Wrapping dispatchers reuse another dispatcher: expert parallelism
(:class:`~lightning_moe.parallel.ExpertParallelDispatcher`) sends each token once to every rank
holding one of its experts (permute), runs its local dispatcher whole there, gates included
(compute), and adds the combined rows that come back to their tokens (combine).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_moe.experts.protocol import Experts
from lightning_moe.routing.routing import Routing


@dataclass
class Plan:
    """What ``permute`` did, for ``compute`` and ``combine``; backends extend it with their own fields.

    Attributes:
        counts_E: ``(E,)`` int64 rows per expert, on the device.
        num_tokens: T, the rows ``combine`` returns.
        token_A: source token of each row (expert order), when the backend keeps it.
        weight_A: gate of each row, in the order the backend's ``combine`` reads.
        dtype: dtype of the combined output.
    """

    counts_E: Tensor
    num_tokens: int
    token_A: Tensor | None = None
    weight_A: Tensor | None = None
    dtype: torch.dtype = torch.float32
    _host_counts: list[int] | None = field(default=None, repr=False)

    def counts(self) -> list[int]:
        """``counts_E`` as host ints (a device sync the first time, cached after)."""
        if self._host_counts is None:
            self._host_counts = self.counts_E.tolist()
        return self._host_counts


def autocast_inputs(*tensors: Tensor) -> tuple[Tensor, ...]:
    """``tensors`` cast to the autocast dtype where autocast is on for their device (as ``F.linear``
    would be): the expert GEMMs are custom ops, which autocast does not reach. The casts are
    differentiable, so float32 weights still get float32 gradients."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    # As autocast does: floating tensors other than float64 are cast.
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors)


class Dispatcher:
    """Base class of dispatch backends; the steps here are plain PyTorch (sort, gather, scatter-add).

    Attributes:
        name: the registry name (``"grouped"``) or a description of a wrapper.
        groups: the process groups the experts are sharded over (expert parallelism), else ``None``.
    """

    name: str = "base"
    groups = None

    def permute(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Plan]:
        """Rows of ``x_TD`` for every assignment, sorted by expert (stable), and the plan."""
        order_A = torch.argsort(routing.expert_A, stable=True)
        token_A = routing.token_A[order_A]
        plan = Plan(counts_E=routing.tokens_per_expert(), num_tokens=x_TD.shape[0], token_A=token_A,
                    weight_A=routing.weight_A[order_A], dtype=x_TD.dtype)
        return x_TD.index_select(0, token_A), plan

    def compute(self, x_AD: Tensor, plan: Plan, experts: Experts) -> Tensor:
        """Every expert on its rows of ``x_AD`` (``plan.counts_E`` per expert), ungated."""
        return experts.grouped_forward(x_AD, plan.counts())

    def combine(self, out_AD: Tensor, plan: Plan) -> Tensor:
        """``y_t = sum`` of the gated rows of token ``t``; ``(T, D)``."""
        weighted_AD = out_AD * plan.weight_A.unsqueeze(-1).to(out_AD.dtype)
        y_TD = out_AD.new_zeros(plan.num_tokens, out_AD.shape[1], dtype=plan.dtype)
        return y_TD.index_add(0, plan.token_A, weighted_AD.to(plan.dtype))

    def __call__(self, x_TD: Tensor, routing: Routing, experts: Experts) -> Tensor:
        x_AD, plan = self.permute(x_TD, routing)
        return self.combine(self.compute(x_AD, plan, experts), plan)

    def expert_rows(self, num_experts: int) -> slice:
        """The global experts this rank computes: all of them unless the dispatcher shards them."""
        return slice(0, num_experts)

    def with_local(self, local: Dispatcher) -> Dispatcher:
        """This dispatcher with ``local`` as the backend that runs this rank's experts (a plain
        backend is its own local one, so this returns ``local``)."""
        return local

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
