"""Experts: grouped SwiGLU weights (fine-grained by choosing F) and the dense FFN."""

from lightning_moe.experts.swiglu import SwiGLU, SwiGLUExperts, swiglu

__all__ = ["SwiGLU", "SwiGLUExperts", "swiglu"]
