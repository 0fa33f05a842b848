"""Layers: ``MoELayer``, a drop-in replacement for a dense FFN, and its ``RoutingStats``."""

from lightning_moe.layers.moe_layer import MoELayer
from lightning_moe.layers.stats import RoutingStats

__all__ = ["MoELayer", "RoutingStats"]
