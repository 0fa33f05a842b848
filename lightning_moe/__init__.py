"""lightning_moe: Mixture-of-Experts training with PyTorch Lightning, configured in YAML.

The plain-PyTorch parts (routers, balancers, experts, dispatch, ``MoELayer``, the transformer)
import without Lightning; ``MoELanguageModel`` and ``TextDataModule`` load Lightning on first use.
"""

from typing import Any

from lightning_moe.balancing import (
    Balancer,
    CommBalanceLoss,
    DeviceAuxLoss,
    SequenceAuxLoss,
    SwitchAuxLoss,
    ZLoss,
    bias_update,
)
from lightning_moe.discovery import MoELayerView, find_moe_layers
from lightning_moe.experts import SwiGLU, SwiGLUExperts
from lightning_moe.layers import MoEConfig, MoELayer, RoutingStats
from lightning_moe.models import MoETransformer
from lightning_moe.routing import ExpertCapacity, Router, Routing, TopKRouter

__version__ = "0.1.0"

__all__ = [
    "Balancer", "CommBalanceLoss", "DeviceAuxLoss", "ExpertCapacity", "MoEConfig", "MoELanguageModel", "MoELayer",
    "MoELayerView", "MoETransformer", "Router", "Routing", "RoutingStats", "SequenceAuxLoss", "SwiGLU", "SwiGLUExperts",
    "SwitchAuxLoss", "TextDataModule", "TopKRouter", "ZLoss", "bias_update", "find_moe_layers",
]


def __getattr__(name: str) -> Any:
    if name == "MoELanguageModel":
        from lightning_moe.module import MoELanguageModel

        return MoELanguageModel
    if name == "TextDataModule":
        from lightning_moe.data import TextDataModule

        return TextDataModule
    raise AttributeError(f"module 'lightning_moe' has no attribute {name!r}")
