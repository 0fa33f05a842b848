"""lightning_moe: Mixture-of-Experts training with PyTorch Lightning, configured in YAML.

The plain-PyTorch parts (routers, balancers, experts, dispatch, ``MoELayer``, the transformer)
import without Lightning; ``MoELanguageModel`` and ``TextDataModule`` load Lightning on first use.
"""

from typing import Any

from lightning_moe.balancing import Balancer, SwitchAuxLoss, ZLoss
from lightning_moe.experts import SwiGLU, SwiGLUExperts
from lightning_moe.layers import MoELayer, RoutingStats
from lightning_moe.models import MoETransformer
from lightning_moe.routing import Router, Routing, TopKRouter

__version__ = "0.1.0"

__all__ = [
    "Balancer", "MoELanguageModel", "MoELayer", "MoETransformer", "Router", "Routing", "RoutingStats",
    "SwiGLU", "SwiGLUExperts", "SwitchAuxLoss", "TextDataModule", "TopKRouter", "ZLoss",
]


def __getattr__(name: str) -> Any:
    if name == "MoELanguageModel":
        from lightning_moe.module import MoELanguageModel

        return MoELanguageModel
    if name == "TextDataModule":
        from lightning_moe.data import TextDataModule

        return TextDataModule
    raise AttributeError(f"module 'lightning_moe' has no attribute {name!r}")
