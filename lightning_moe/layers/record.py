"""One routing record: every module that routes tokens keeps, after each forward, its balancers'
losses and detached statistics, the same way; models and LightningModules sum the losses with
:func:`total_aux_losses`, callbacks read both through discovery.

Legend: ``T`` tokens, ``E`` experts.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_moe.balancing.losses import Balancer
from lightning_moe.layers.stats import RoutingStats
from lightning_moe.routing.routing import Routing


class RoutingRecorder:
    """Mixin for modules that route: ``aux_losses`` (``{name: loss}``, tensors with grad, to add to the
    training loss: the balancers' and those the router brought) and ``stats`` (a detached
    :class:`RoutingStats`) of the last forward.
    Both are overwritten by the next forward; nothing is stored anywhere else.

    Subclasses call :meth:`record` once per forward and have ``balancers`` (a list of
    :class:`~lightning_moe.balancing.Balancer`) and ``router`` attributes.
    """

    aux_losses: dict[str, Tensor]
    stats: RoutingStats | None
    balancers: list[Balancer]
    view_family: str = "lightning_moe"
    """The ``family`` discovery's view reports for this module."""

    def record(self, routing: Routing) -> None:
        """Store ``self.balancers``' losses on ``routing`` (the assignments that reached experts,
        capacity applied), the losses the router brought (``routing.aux_losses``) and its detached stats."""
        losses = {b.name: b.loss(routing) for b in self.balancers}
        for name, value in routing.aux_losses.items():
            if name in losses:
                raise ValueError(f"The router brings a loss named {name!r}, and so does a balancer of this layer "
                                 f"({[b.name for b in self.balancers]}): rename one (each name is one aux loss).")
            losses[name] = value
        self.aux_losses = losses
        self.stats = RoutingStats.from_routing(routing)

    def clear_record(self) -> None:
        """Start with no record: no losses, no stats (each recorder's ``__init__`` calls this)."""
        self.aux_losses = {}
        self.stats = None


def total_aux_losses(model: nn.Module) -> dict[str, Tensor]:
    """Each auxiliary loss summed by name over every :class:`RoutingRecorder` in ``model``, from the
    last forward; what both LightningModules add to the language-model loss."""
    totals: dict[str, Tensor] = {}
    for module in model.modules():
        if isinstance(module, RoutingRecorder):
            for name, value in module.aux_losses.items():
                totals[name] = totals[name] + value if name in totals else value
    return totals
