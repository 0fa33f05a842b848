"""Models: the decoder-only ``MoETransformer`` (dense baseline with ``moe_every=0``)."""

from lightning_moe.models.transformer import MoETransformer, RMSNorm
from lightning_moe.routing.factory import RouterFactory

__all__ = ["MoETransformer", "RMSNorm", "RouterFactory"]
