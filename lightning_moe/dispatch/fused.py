"""The ``triton`` backend: permute, grouped SwiGLU and unpermute as Triton kernels.

Legend: ``T`` tokens, ``D`` model width, ``E`` experts, ``A`` assignments.

Where the kernels cannot run (no Triton, CPU tensors without ``TRITON_INTERPRET=1``, experts
that are not :class:`~lightning_moe.experts.SwiGLUExperts`) it warns once, naming the reason, and
computes the same function with the ``grouped`` backend.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

from lightning_moe.dispatch.grouped import grouped_dispatch
from lightning_moe.experts.swiglu import SwiGLUExperts
from lightning_moe.kernels._triton import unavailable_reason
from lightning_moe.routing.routing import Routing


@functools.cache
def _warn_fallback(reason: str) -> None:
    # Cached so a training loop warns once per distinct reason, not once per step.
    warnings.warn(f"dispatcher='triton' falls back to 'grouped': {reason}.", RuntimeWarning, stacklevel=3)


def fallback_reason(x_TD: Tensor, experts: object) -> str | None:
    """Why ``triton_dispatch`` cannot run the kernels on these inputs, or ``None`` if it can."""
    if not isinstance(experts, SwiGLUExperts):
        return f"the Triton path runs SwiGLUExperts, not {type(experts).__name__}"
    if x_TD.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"the Triton kernels take float32, float16 or bfloat16 inputs, got {x_TD.dtype}"
    return unavailable_reason(x_TD)


@torch.compiler.assume_constant_result
def _tf32_allowed() -> bool:
    # float32 follows torch's own matmul setting (Lightning's `torch.set_float32_matmul_precision`):
    # "highest" keeps exact float32, "high"/"medium" allow TF32 tensor cores. A constant to Dynamo.
    return torch.get_float32_matmul_precision() != "highest"


def _precision(x_TD: Tensor) -> str:
    return "tf32" if x_TD.dtype == torch.float32 and _tf32_allowed() else "ieee"


def triton_dispatch(x_TD: Tensor, routing: Routing, experts: SwiGLUExperts) -> Tensor:
    """``y_t = sum_a weight_a * expert_{e_a}(x_t)`` with the Triton kernels; no host sync.

    Tokens are gathered into expert order (:func:`~lightning_moe.kernels.permute.permute`), the
    experts run as grouped GEMMs over the sorted rows, and outputs are combined per token with
    their gates (:func:`~lightning_moe.kernels.permute.unpermute`, a gather-reduce, no atomics).
    """
    reason = fallback_reason(x_TD, experts)
    if reason is not None:
        _warn_fallback(reason)
        return grouped_dispatch(x_TD, routing, experts)
    from lightning_moe.kernels.grouped_gemm import grouped_swiglu
    from lightning_moe.kernels.permute import make_plan, permute, unpermute

    plan = make_plan(routing.token_A, routing.expert_A, x_TD.shape[0], experts.num_experts)
    weight_A = routing.weight_A[plan.token_order_A].float()
    x_AD = permute(x_TD, plan)
    weights = (experts.w_gate_EDF, experts.w_up_EDF, experts.w_out_EFD)
    out_AD = grouped_swiglu(x_AD, *(w.to(x_TD.dtype) for w in weights), plan.offsets_E1, precision=_precision(x_TD))
    return unpermute(out_AD, weight_A, plan)
