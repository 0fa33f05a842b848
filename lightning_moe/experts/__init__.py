"""Experts: grouped SwiGLU weights (fine-grained by choosing F), the dense FFN, and MLP experts with
biases; the ``Experts`` protocol dispatchers run, and the fused form fast paths ask for."""

from lightning_moe.experts.mlp import MLPExperts
from lightning_moe.experts.protocol import Experts, FusedSwiGLU, swiglu_weights
from lightning_moe.experts.swiglu import SwiGLU, SwiGLUExperts, swiglu

__all__ = ["Experts", "FusedSwiGLU", "MLPExperts", "SwiGLU", "SwiGLUExperts", "swiglu", "swiglu_weights"]
