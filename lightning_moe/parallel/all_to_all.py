"""A differentiable all-to-all with uneven split sizes (dropless expert parallelism).

Legend: ``N`` rows sent by this rank, ``R`` rows received, ``D`` row width (none for a vector of
indices or gates), ``P`` ranks of the group, ``C`` counts per rank pair.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, out_splits, in_splits, group):  # noqa: ANN001, ANN205
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out_RD = x_ND.new_empty((sum(out_splits), *x_ND.shape[1:]))
        dist.all_to_all_single(out_RD, x_ND.contiguous(), out_splits, in_splits, group=group)
        return out_RD

    @staticmethod
    def backward(ctx, grad_RD):  # noqa: ANN001, ANN205
        # The transpose of an all-to-all is the all-to-all with the split sizes swapped.
        grad_ND = grad_RD.new_empty((sum(ctx.in_splits), *grad_RD.shape[1:]))
        dist.all_to_all_single(grad_ND, grad_RD.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return grad_ND, None, None, None


def all_to_all(x_ND: Tensor, out_splits: list[int], in_splits: list[int], group: object = None) -> Tensor:
    """Send ``in_splits[j]`` consecutive rows of ``x_ND`` to rank ``j`` of ``group`` and receive
    ``out_splits[j]`` rows from it, concatenated in rank order; differentiable (integer tensors,
    such as indices, pass with no gradient). A split of 0 for this rank keeps rows out of the
    collective.

    Uses ``all_to_all_single`` with split sizes, which gloo (CPU), NCCL and the others support
    with uneven sizes (the list form ``all_to_all`` does not on gloo).
    """
    if len(in_splits) != len(out_splits):
        raise ValueError(f"`in_splits` ({len(in_splits)}) and `out_splits` ({len(out_splits)}) must have one entry "
                         "per rank of the group.")
    if sum(in_splits) != x_ND.shape[0]:
        raise ValueError(f"`in_splits` sum to {sum(in_splits)} but `x_ND` has {x_ND.shape[0]} rows.")
    return _AllToAll.apply(x_ND, list(out_splits), list(in_splits), group)


def all_to_all_counts(counts_PC: Tensor, group: object = None) -> Tensor:
    """Exchange a ``(P, C)`` integer table: row ``j`` goes to rank ``j``; the result's row ``j`` is
    what rank ``j`` sent here (not differentiable)."""
    out = torch.empty_like(counts_PC)
    dist.all_to_all_single(out, counts_PC.contiguous(), group=group)
    return out
