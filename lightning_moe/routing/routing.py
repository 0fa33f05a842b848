"""The routing contract: the one description of a routing decision, whatever the policy.

Legend: ``T`` tokens (batch x sequence flattened), ``D`` model width, ``E`` experts,
``K`` experts per token, ``A`` assignments (token, expert pairs kept after routing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_moe._validate import check_int_range, check_non_negative, check_positive_int


class LossWeight:
    """A named, schedulable loss weight: ``name`` and ``coeff``, like a balancer's, so
    :class:`~lightning_moe.callbacks.ZLossScheduler` (``balancer: <name>``) schedules it. Modules
    that bring a loss of their own (a router's pretext loss, multi-token prediction) offer theirs
    through ``scheduled_coefficients()``."""

    def __init__(self, name: str, coeff: float) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"A loss weight's `name` must be a non-empty string, got {name!r}.")
        self.name = name
        self.coeff = check_non_negative(name, coeff)

    def __repr__(self) -> str:
        return f"LossWeight({self.name!r}, coeff={self.coeff!r})"


@dataclass
class Routing:
    """A routing decision, read by dispatch, balancing losses, statistics and kernels.

    Attributes:
        scores_TE: normalised router scores, each row summing to 1 (the softmax over experts;
            sigmoid scores divided by their sum; ``1/K`` on the chosen experts for hash and
            random routing), with grad; balancing losses and statistics read these.
        logits_TE: raw float32 router logits, with grad; the z-loss reads these (zeros for
            parameter-free routers).
        token_A: ``(A,)`` int64 token index of each kept assignment.
        expert_A: ``(A,)`` int64 expert index of each kept assignment.
        weight_A: ``(A,)`` float32 gate weight of each kept assignment, with grad.
        num_dropped: assignments the selection rule wanted but capacity removed (0 if
            dropless); an int or a 0-d tensor.
        seq_len: tokens per sequence when the ``T`` tokens are whole sequences laid end to end
            (``MoELayer`` sets it from a ``(..., S, D)`` input); ``None`` treats all ``T`` tokens
            as one sequence. The sequence-level balancing loss reads it.
        aux_losses: the losses the router brings itself (``{name: weighted loss}``, tensors with
            grad; a :class:`~lightning_moe.routing.SelfSupervisedScorer`'s pretext loss), empty for
            most routers. The layer adds them to its balancers' losses (``layer.aux_losses``), so
            they are logged as ``train/<name>`` and summed into the training loss like those.

    Token-choice top-k gives ``A = T * K``; expert-choice gives ``A = E * C``.
    """

    scores_TE: Tensor
    logits_TE: Tensor
    token_A: Tensor
    expert_A: Tensor
    weight_A: Tensor
    num_dropped: Tensor | int = 0
    seq_len: int | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    _tokens_per_expert_E: Tensor | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return self.scores_TE.shape[0]

    @property
    def num_experts(self) -> int:
        return self.scores_TE.shape[1]

    def tokens_per_expert(self) -> Tensor:
        """``(E,)`` int64 count of kept assignments per expert.

        Dispatch, the balancing losses and the statistics all read it; it is counted once.
        """
        if self._tokens_per_expert_E is None:
            # A scatter-add rather than bincount, whose output length depends on the values: no
            # host sync on CUDA, no graph break under torch.compile.
            counts_E = self.expert_A.new_zeros(self.num_experts)
            self._tokens_per_expert_E = counts_E.scatter_add_(0, self.expert_A, torch.ones_like(self.expert_A))
        return self._tokens_per_expert_E


class Router(nn.Module):
    """Base class of every router: ``forward(x_TD, token_ids_T=None) -> Routing``.

    ``d_model``, ``num_experts`` and ``top_k`` (experts per token of the selection rule) are
    checked here, each error naming the parameter and its range. ``token_ids_T`` are the token
    ids of the routed hidden states when the model passes them down (``MoETransformer`` does);
    only id-hash routing reads them.
    A router that supports auxiliary-loss-free balancing owns an ``expert_bias_E`` buffer.

    A router may bring auxiliary losses of its own: it puts them in ``Routing.aux_losses`` (each
    ``coeff * loss`` under a name) and offers their weights through :meth:`scheduled_coefficients`, so
    they are logged, summed into the training loss, found by discovery and scheduled like the
    balancers' losses. A router with a ``scorer`` brings the scorer's (:meth:`own_losses`).
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.top_k = check_int_range("top_k", top_k, 1, num_experts)

    @property
    def experts_per_token(self) -> float:
        """Average experts a token reaches (``top_k`` for token choice); used for active-parameter counts."""
        return float(self.top_k)

    def scale_experts_per_token(self, factor: int) -> None:
        """Multiply the experts each token reaches by ``factor`` (fine-grained experts: each expert
        split into ``factor`` narrower ones keeps the active compute when tokens reach ``factor``
        times as many). Token-choice routers multiply ``top_k``; the result must stay <= E."""
        check_positive_int("factor", factor)
        self.top_k = check_int_range("top_k * granularity", self.top_k * factor, 1, self.num_experts)

    def scheduled_coefficients(self) -> list[LossWeight]:
        """The weights of the losses this router brings (its scorer's, if it has one); ``[]`` for most."""
        scorer = getattr(self, "scorer", None)
        offered = getattr(scorer, "scheduled_coefficients", None)
        return list(offered()) if callable(offered) else []

    def own_losses(self) -> dict[str, Tensor]:
        """The losses this router brings from its last forward (its scorer's ``aux_losses``): what
        :meth:`with_own_losses` puts into the routing."""
        return dict(getattr(getattr(self, "scorer", None), "aux_losses", None) or {})

    def with_own_losses(self, routing: Routing) -> Routing:
        """``routing`` with :meth:`own_losses` in its ``aux_losses``; selection rules call it on their result."""
        routing.aux_losses.update(self.own_losses())
        return routing

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None) -> Routing:  # pragma: no cover - abstract
        raise NotImplementedError
