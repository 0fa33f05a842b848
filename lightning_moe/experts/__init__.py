"""Experts: grouped SwiGLU weights (fine-grained by choosing F), the dense FFN, and MLP experts with biases."""

from lightning_moe.experts.mlp import MLPExperts
from lightning_moe.experts.swiglu import SwiGLU, SwiGLUExperts, swiglu

__all__ = ["MLPExperts", "SwiGLU", "SwiGLUExperts", "swiglu"]
