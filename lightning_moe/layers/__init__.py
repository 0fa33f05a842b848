"""Layers: ``MoELayer``, a drop-in replacement for a dense FFN; the routing record every routing module
keeps (``RoutingRecorder``, ``RoutingStats``, ``total_aux_losses``); the view callbacks read."""

from lightning_moe.layers.moe_layer import MoELayer
from lightning_moe.layers.record import RoutingRecorder, total_aux_losses
from lightning_moe.layers.stats import RoutingStats
from lightning_moe.layers.view import MoELayerView

__all__ = ["MoELayer", "MoELayerView", "RoutingRecorder", "RoutingStats", "total_aux_losses"]
