"""Routers: ``forward(x_TD) -> Routing``. A router is a scorer plus a selection rule."""

from lightning_moe.routing.routing import Router, Routing
from lightning_moe.routing.topk import LinearScorer, TopKRouter

__all__ = ["LinearScorer", "Router", "Routing", "TopKRouter"]
