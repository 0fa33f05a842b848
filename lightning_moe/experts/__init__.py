"""Experts: grouped SwiGLU weights (fine-grained by choosing F), the dense FFN, and MLP experts with
biases; the ``Experts`` protocol dispatchers run, the fused form fast paths ask for, and the lazy,
per-expert seeded build expert parallelism uses."""

from lightning_moe.experts.mlp import MLPExperts
from lightning_moe.experts.protocol import (
    Experts,
    FusedSwiGLU,
    LazyExperts,
    SeededExperts,
    expert_generator,
    swiglu_weights,
)
from lightning_moe.experts.swiglu import SwiGLU, SwiGLUExperts, swiglu

__all__ = ["Experts", "expert_generator", "FusedSwiGLU", "LazyExperts", "MLPExperts", "SeededExperts", "SwiGLU",
           "SwiGLUExperts", "swiglu", "swiglu_weights"]
