"""Layers: ``MoELayer``, a drop-in replacement for a dense FFN, built from a ``MoEConfig``; the routing
record every routing module keeps (``RoutingRecorder``, ``RoutingStats``, ``total_aux_losses``); the
view callbacks read."""

from lightning_moe.layers.config import MoEConfig, default_balancers
from lightning_moe.layers.moe_layer import MoELayer
from lightning_moe.layers.record import RoutingRecorder, total_aux_losses
from lightning_moe.layers.stats import RoutingStats
from lightning_moe.layers.view import MoELayerView

__all__ = ["MoEConfig", "MoELayer", "MoELayerView", "RoutingRecorder", "RoutingStats", "default_balancers",
           "total_aux_losses"]
