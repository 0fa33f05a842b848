"""Triton kernels under the MoE hot path, each with a plain PyTorch twin (its oracle and fallback).

- :mod:`~lightning_moe.kernels.gating`: fused top-k gating (scores, bias, top-k, renormalisation).
- :mod:`~lightning_moe.kernels.permute`: tokens into expert order and back, with no ``T x E`` mask.
- :mod:`~lightning_moe.kernels.grouped_gemm`: grouped GEMM over rows sorted by expert, and the
  grouped SwiGLU built on it.

Each kernel is a ``torch.library.custom_op`` (``lightning_moe::*``) with registered autograd and
fake implementations, so ``torch.compile`` traces through it. The kernels run on CUDA tensors, or
on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests check them without a GPU). The
``triton`` dispatcher (:func:`lightning_moe.dispatch.triton_dispatch`) composes them. This package
imports Triton only when a kernel module is imported.
"""

from lightning_moe.kernels._triton import interpreting, require_triton, unavailable_reason

__all__ = ["interpreting", "require_triton", "unavailable_reason"]
