"""Models: the decoder-only ``MoETransformer`` (dense baseline with ``moe_every=0``), its attention
choices (multi-head, multi-head latent) and multi-token prediction."""

from lightning_moe.models.attention import MLAConfig, MultiHeadLatentAttention
from lightning_moe.models.hf_deepseek_v3 import from_deepseek_v3, to_deepseek_v3
from lightning_moe.models.mtp import mtp_cross_entropies
from lightning_moe.models.transformer import MoETransformer, RMSNorm
from lightning_moe.routing.factory import RouterFactory
from lightning_moe.routing.routing import LossWeight

__all__ = ["LossWeight", "MLAConfig", "MoETransformer", "MultiHeadLatentAttention", "RMSNorm", "RouterFactory",
           "from_deepseek_v3", "mtp_cross_entropies", "to_deepseek_v3"]
