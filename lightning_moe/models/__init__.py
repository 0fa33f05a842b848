"""Models: the decoder-only ``MoETransformer`` (dense baseline with ``moe_every=0``)."""

from lightning_moe.models.transformer import MoETransformer, RMSNorm, RouterFactory

__all__ = ["MoETransformer", "RMSNorm", "RouterFactory"]
