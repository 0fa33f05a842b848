"""The ``grouped`` backend: gather, SwiGLU experts and gated combine as one autograd function.

Legend: ``T`` tokens, ``D`` model width, ``E`` experts, ``F`` expert hidden width, ``A`` assignments.

Composing the same computation from autograd ops (``split``, per-expert ``@``, ``cat``) records a
graph node per expert matmul and allocates every intermediate and gradient piece by piece; with
many small experts that overhead, not arithmetic, dominates. Here the forward and backward are
written out once: each expert's matmuls write straight into slices of preallocated buffers
(``torch.mm(..., out=)``) and the elementwise SwiGLU runs once over all rows.

No ``(A, D)`` tensor is ever made (with K experts per token that is K times the input): each
expert gathers its rows into one small reused buffer, which stays in cache, and adds its output
straight into ``y_TD``. Fresh large CPU tensors cost page faults on first touch, which made those
``(A, D)`` passes dearer than the matmuls at fine granularity. Saved for backward: four
``(A, F)`` activations (gate and up pre-activations, ``silu(gate)``, gated ``h``), as a dense
SwiGLU of width K*F saves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_moe.dispatch.base import Dispatcher, Plan
from lightning_moe.experts.protocol import Experts, swiglu_weights
from lightning_moe.routing.routing import Routing


class GroupedSwiGLU(torch.autograd.Function):
    """``y_TD = sum_a weight_a * swiglu_{e_a}(x_{t_a})`` over assignments sorted by expert.

    Inputs: ``x_TD``; ``weight_A`` gates in expert-sorted order; ``token_A`` int64 source token of
    each sorted row; ``counts`` (a list of E ints, rows per expert); the three grouped weights.
    """

    @staticmethod
    def forward(ctx, x_TD, weight_A, token_A, counts, w_gate_EDF, w_up_EDF, w_out_EFD):  # noqa: ANN001, ANN205
        slices = _expert_slices(counts)
        g_AF = x_TD.new_empty(token_A.numel(), w_gate_EDF.shape[2])
        u_AF = torch.empty_like(g_AF)
        x_ND = x_TD.new_empty(max(counts, default=0), x_TD.shape[1])  # one expert's rows, reused
        for expert, rows in slices:
            x_nD = torch.index_select(x_TD, 0, token_A[rows], out=x_ND[: rows.stop - rows.start])
            torch.mm(x_nD, w_gate_EDF[expert], out=g_AF[rows])
            torch.mm(x_nD, w_up_EDF[expert], out=u_AF[rows])
        # The gate scales h (width F) rather than the expert output (width D): same product, less work.
        silu_AF = F.silu(g_AF)
        hw_AF = silu_AF * u_AF
        hw_AF.mul_(weight_A.unsqueeze(1).to(g_AF.dtype))
        y_TD = torch.zeros_like(x_TD)
        for expert, rows in slices:
            out_nD = torch.mm(hw_AF[rows], w_out_EFD[expert], out=x_ND[: rows.stop - rows.start])
            y_TD.index_add_(0, token_A[rows], out_nD)
        ctx.save_for_backward(x_TD, weight_A, token_A, g_AF, u_AF, silu_AF, hw_AF, w_gate_EDF, w_up_EDF, w_out_EFD)
        ctx.slices, ctx.max_rows = slices, x_ND.shape[0]
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):  # noqa: ANN001, ANN205
        x_TD, weight_A, token_A, g_AF, u_AF, silu_AF, hw_AF, w_gate_EDF, w_up_EDF, w_out_EFD = ctx.saved_tensors
        slices = ctx.slices
        dy_TD = dy_TD.contiguous()
        w_A1 = weight_A.unsqueeze(1).to(g_AF.dtype)
        d_w_gate, d_w_up, d_w_out = (torch.empty_like(w) for w in (w_gate_EDF, w_up_EDF, w_out_EFD))
        idle = sorted(set(range(w_gate_EDF.shape[0])) - {expert for expert, _ in slices})
        for grad in (d_w_gate, d_w_up, d_w_out):
            grad[idle] = 0  # every other expert's slice is written below
        buf_ND = dy_TD.new_empty(ctx.max_rows, dy_TD.shape[1])
        dhw_AF = torch.empty_like(g_AF)  # d(h * weight) = dy W_out^T
        for expert, rows in slices:
            dy_nD = torch.index_select(dy_TD, 0, token_A[rows], out=buf_ND[: rows.stop - rows.start])
            torch.mm(dy_nD, w_out_EFD[expert].t(), out=dhw_AF[rows])
            torch.mm(hw_AF[rows].t(), dy_nD, out=d_w_out[expert])
        # With dhw = dy W_out^T: dot(dy, weight * h W_out) = weight * dot(dhw, h), so the gate
        # gradient needs no (A, D) tensor; h = silu(g) * u.
        d_silu_AF = dhw_AF * silu_AF  # d u / weight
        d_weight_A = (d_silu_AF * u_AF).sum(1).to(weight_A.dtype) if ctx.needs_input_grad[1] else None
        d_u_AF = d_silu_AF.mul_(w_A1)
        d_g_AF = torch.ops.aten.silu_backward(dhw_AF.mul_(u_AF).mul_(w_A1), g_AF)
        dx_TD = torch.zeros_like(x_TD) if ctx.needs_input_grad[0] else None
        dx_ND = torch.empty_like(buf_ND)
        for expert, rows in slices:
            n = rows.stop - rows.start
            x_nD = torch.index_select(x_TD, 0, token_A[rows], out=buf_ND[:n])
            d_g_nF, d_u_nF = d_g_AF[rows], d_u_AF[rows]
            torch.mm(x_nD.t(), d_g_nF, out=d_w_gate[expert])
            torch.mm(x_nD.t(), d_u_nF, out=d_w_up[expert])
            if dx_TD is not None:
                dx_nD = torch.mm(d_g_nF, w_gate_EDF[expert].t(), out=dx_ND[:n])
                dx_nD.addmm_(d_u_nF, w_up_EDF[expert].t())
                dx_TD.index_add_(0, token_A[rows], dx_nD)
        return dx_TD, d_weight_A, None, None, d_w_gate, d_w_up, d_w_out


def _expert_slices(counts: list[int]) -> list[tuple[int, slice]]:
    """``(expert, rows)`` for every expert that received rows, in sorted-row order."""
    slices, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            slices.append((expert, slice(start, start + count)))
        start += count
    return slices


class GroupedDispatcher(Dispatcher):
    """Sort assignments by expert, then per-expert matmuls on contiguous slices.

    Experts that offer their fused SwiGLU form run as :class:`GroupedSwiGLU` (hand-written
    backward); called whole, permute, compute and combine are that one function and no ``(A, D)``
    tensor is made. Other experts run through their ``grouped_forward`` between one gather and one
    scatter-add. The one host sync is reading the per-expert counts, which the slices need.
    """

    name = "grouped"

    def compute(self, x_AD: Tensor, plan: Plan, experts: Experts) -> Tensor:
        weights = swiglu_weights(experts)
        if weights is None:
            return experts.grouped_forward(x_AD, plan.counts())
        rows_A = torch.arange(x_AD.shape[0], device=x_AD.device)
        return GroupedSwiGLU.apply(x_AD, x_AD.new_ones(x_AD.shape[0]), rows_A, plan.counts(), *weights)

    def __call__(self, x_TD: Tensor, routing: Routing, experts: Experts) -> Tensor:
        weights = swiglu_weights(experts)
        if weights is None:
            return super().__call__(x_TD, routing, experts)
        order_A = torch.argsort(routing.expert_A, stable=True)
        counts = routing.tokens_per_expert().tolist()
        weight_A = routing.weight_A[order_A].to(x_TD.dtype)
        return GroupedSwiGLU.apply(x_TD, weight_A, routing.token_A[order_A], counts, *weights)


grouped_dispatch = GroupedDispatcher()
"""A shared ``grouped`` dispatcher: ``grouped_dispatch(x_TD, routing, experts) -> y_TD``."""
