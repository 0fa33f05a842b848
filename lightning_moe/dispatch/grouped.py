"""The ``grouped`` backend: gather, SwiGLU experts and gated combine as one custom op, backward included.

Legend: ``T`` tokens, ``D`` model width, ``E`` experts, ``F`` expert hidden width, ``A`` assignments,
``N`` rows of one expert.

Composing the same computation from autograd ops (``split``, per-expert ``@``, ``cat``) records a
graph node per expert matmul and allocates every intermediate and gradient piece by piece; with
many small experts that overhead, not arithmetic, dominates. Here the forward and backward are
written out once: each expert's matmuls write straight into slices of preallocated buffers
(``torch.mm(..., out=)``) and each expert's whole chain (gather, gate and up, SwiGLU, down,
scatter-add; in the backward the same in reverse) runs while its rows are in cache.

No ``(A, D)`` tensor is ever made (with K experts per token that is K times the input): each
expert gathers its rows into one small reused buffer and adds its output straight into ``y_TD``.
Fresh large CPU tensors cost page faults on first touch, which made those ``(A, D)`` passes dearer
than the matmuls at fine granularity. Saved for backward: three ``(A, F)`` activations (gate and up
pre-activations, gated ``h``); ``silu(gate)`` is recomputed per expert.

On CPU, small experts run in parallel: a matmul of a few dozen rows uses one core however many
threads torch has, so with many experts of few rows each the experts are split into
``torch.get_num_threads()`` contiguous chunks of about equal rows, one per worker thread (each with
its own gather buffer and its own ``y``/``dx`` accumulator, summed at the end in a fixed order, so
the result does not depend on timing). Large experts run one at a time on torch's own threads.

The forward and backward are the custom ops ``lightning_moe::grouped_swiglu_fwd`` and
``lightning_moe::grouped_swiglu_bwd``: the per-expert row counts (a tensor) become host ints inside
them, so ``torch.compile(fullgraph=True)`` traces a layer through them without a graph break.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_moe.dispatch.base import Dispatcher, Plan, autocast_inputs
from lightning_moe.experts.protocol import Experts, swiglu_weights
from lightning_moe.routing.routing import Routing

PARALLEL_MAX_ROWS = 256
"""Experts run in parallel worker threads (CPU) when their mean rows per expert is at most this;
above it one expert's matmuls are large enough for torch's own threads."""

Slices = list[tuple[int, slice]]


def _expert_slices(counts: list[int]) -> Slices:
    """``(expert, rows)`` for every expert that received rows, in sorted-row order."""
    slices, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            slices.append((expert, slice(start, start + count)))
        start += count
    return slices


def _chunks(slices: Slices, device: torch.device) -> list[Slices]:
    """The experts with rows, split into contiguous chunks of about equal rows: one per worker
    thread when they are small and on CPU (see :data:`PARALLEL_MAX_ROWS`), else one chunk."""
    workers = min(torch.get_num_threads(), len(slices)) if device.type == "cpu" else 1
    rows = slices[-1][1].stop - slices[0][1].start if slices else 0
    if workers <= 1 or rows > PARALLEL_MAX_ROWS * len(slices):
        return [slices]
    chunks: list[Slices] = [[] for _ in range(workers)]
    start = slices[0][1].start
    for expert, rows_e in slices:  # by the middle row of each expert: contiguous, balanced by rows
        middle = (rows_e.start + rows_e.stop) / 2 - start
        chunks[min(int(middle * workers / rows), workers - 1)].append((expert, rows_e))
    return [chunk for chunk in chunks if chunk]


_pool: tuple[int, ThreadPoolExecutor] | None = None
_pool_lock = threading.Lock()


def _executor(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of at least ``workers`` threads (a new one after ``fork`` or if too small)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid() or _pool[1]._max_workers < workers:
            _pool = (os.getpid(), ThreadPoolExecutor(workers, thread_name_prefix="lightning_moe-experts",
                                                     initializer=_init_worker))
        return _pool[1]


def _init_worker() -> None:
    # torch sets up its per-thread parallel state on a thread's first op; in a forked child that
    # also rebuilds the thread pool inherited from the parent, which two threads doing at once can
    # break ("Invalid thread pool!"), so the workers take turns.
    with _pool_lock:
        torch.get_num_threads()


def _run(chunks: list[Slices], work: Callable[[int, Slices], None]) -> None:
    """``work(i, chunks[i])`` for every chunk, without autograd: on worker threads when there are several."""
    if len(chunks) == 1:
        with torch.no_grad():
            work(0, chunks[0])
        return
    futures = [_executor(len(chunks)).submit(_no_grad, work, i, chunk) for i, chunk in enumerate(chunks)]
    for future in futures:
        future.result()


def _no_grad(work: Callable[[int, Slices], None], i: int, chunk: Slices) -> None:
    with torch.no_grad():  # grad mode is per thread: a worker's is on
        work(i, chunk)


def _sum_into_first(parts: list[Tensor]) -> Tensor:
    for part in parts[1:]:
        parts[0].add_(part)
    return parts[0]


def _max_rows(chunk: Slices) -> int:
    return max(rows.stop - rows.start for _, rows in chunk)


@torch.library.custom_op("lightning_moe::grouped_swiglu_fwd", mutates_args=())
def _grouped_swiglu_fwd(x_TD: Tensor, weight_A: Tensor, token_A: Tensor, counts_E: Tensor, w_gate_EDF: Tensor,
                        w_up_EDF: Tensor, w_out_EFD: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y_TD, g_AF, u_AF, hw_AF)``: the output and the activations the backward reads."""
    slices = _expert_slices(counts_E.tolist())
    chunks = _chunks(slices, x_TD.device)
    g_AF = x_TD.new_empty(token_A.numel(), w_gate_EDF.shape[2])
    u_AF, hw_AF = torch.empty_like(g_AF), torch.empty_like(g_AF)
    w_A1 = weight_A.unsqueeze(1).to(g_AF.dtype)
    y_parts = [torch.zeros_like(x_TD) for _ in chunks]

    def work(i: int, chunk: Slices) -> None:
        buf_ND = x_TD.new_empty(_max_rows(chunk), x_TD.shape[1])  # one expert's rows, reused
        for expert, rows in chunk:
            tokens_N, buf_nD = token_A[rows], buf_ND[: rows.stop - rows.start]
            x_nD = torch.index_select(x_TD, 0, tokens_N, out=buf_nD)
            g_nF = torch.mm(x_nD, w_gate_EDF[expert], out=g_AF[rows])
            u_nF = torch.mm(x_nD, w_up_EDF[expert], out=u_AF[rows])
            # The gate scales h (width F) rather than the expert output (width D): same product, less work.
            hw_nF = torch.mul(F.silu(g_nF), u_nF, out=hw_AF[rows]).mul_(w_A1[rows])
            y_parts[i].index_add_(0, tokens_N, torch.mm(hw_nF, w_out_EFD[expert], out=buf_nD))

    if slices:
        _run(chunks, work)
    return _sum_into_first(y_parts), g_AF, u_AF, hw_AF


@_grouped_swiglu_fwd.register_fake
def _(x_TD, weight_A, token_A, counts_E, w_gate_EDF, w_up_EDF, w_out_EFD):  # noqa: ANN001, ANN202
    g_AF = x_TD.new_empty(token_A.shape[0], w_gate_EDF.shape[2])
    return torch.empty_like(x_TD), g_AF, torch.empty_like(g_AF), torch.empty_like(g_AF)


@torch.library.custom_op("lightning_moe::grouped_swiglu_bwd", mutates_args=())
def _grouped_swiglu_bwd(dy_TD: Tensor, x_TD: Tensor, weight_A: Tensor, token_A: Tensor, counts_E: Tensor,
                        g_AF: Tensor, u_AF: Tensor, hw_AF: Tensor, w_gate_EDF: Tensor, w_up_EDF: Tensor,
                        w_out_EFD: Tensor, needs_dx: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx_TD, d_weight_A, d_w_gate_EDF, d_w_up_EDF, d_w_out_EFD)``; ``dx_TD`` is ``(0, D)`` unless
    ``needs_dx``."""
    counts = counts_E.tolist()
    slices = _expert_slices(counts)
    chunks = _chunks(slices, x_TD.device)
    dy_TD = dy_TD.contiguous()
    w_A1 = weight_A.unsqueeze(1).to(g_AF.dtype)
    d_w_gate, d_w_up, d_w_out = (torch.empty_like(w) for w in (w_gate_EDF, w_up_EDF, w_out_EFD))
    idle = [expert for expert, count in enumerate(counts) if not count]
    for grad in (d_w_gate, d_w_up, d_w_out):
        grad[idle] = 0  # every other expert's slice is written below
    d_weight_A = g_AF.new_empty(g_AF.shape[0])
    dx_parts = [torch.zeros_like(x_TD) for _ in chunks] if needs_dx else []

    def work(i: int, chunk: Slices) -> None:
        buf_ND = dy_TD.new_empty(_max_rows(chunk), dy_TD.shape[1])
        for expert, rows in chunk:
            tokens_N, buf_nD = token_A[rows], buf_ND[: rows.stop - rows.start]
            g_nF, u_nF, w_n1 = g_AF[rows], u_AF[rows], w_A1[rows]
            dy_nD = torch.index_select(dy_TD, 0, tokens_N, out=buf_nD)
            dhw_nF = dy_nD @ w_out_EFD[expert].t()  # d(h * weight) = dy W_out^T
            torch.mm(hw_AF[rows].t(), dy_nD, out=d_w_out[expert])
            # With dhw = dy W_out^T: dot(dy, weight * h W_out) = weight * dot(dhw, h), so the gate
            # gradient needs no (A, D) tensor; h = silu(g) * u.
            d_u_nF = dhw_nF * F.silu(g_nF)  # d u / weight
            torch.sum(d_u_nF * u_nF, 1, out=d_weight_A[rows])
            d_u_nF.mul_(w_n1)
            d_g_nF = torch.ops.aten.silu_backward(dhw_nF.mul_(u_nF).mul_(w_n1), g_nF)
            x_nD = torch.index_select(x_TD, 0, tokens_N, out=buf_nD)
            torch.mm(x_nD.t(), d_g_nF, out=d_w_gate[expert])
            torch.mm(x_nD.t(), d_u_nF, out=d_w_up[expert])
            if needs_dx:
                dx_nD = torch.mm(d_g_nF, w_gate_EDF[expert].t(), out=buf_nD)
                dx_parts[i].index_add_(0, tokens_N, dx_nD.addmm_(d_u_nF, w_up_EDF[expert].t()))

    if slices:
        _run(chunks, work)
    dx_TD = _sum_into_first(dx_parts) if needs_dx else x_TD.new_empty(0, x_TD.shape[1])
    return dx_TD, d_weight_A.to(weight_A.dtype), d_w_gate, d_w_up, d_w_out


@_grouped_swiglu_bwd.register_fake
def _(dy_TD, x_TD, weight_A, token_A, counts_E, g_AF, u_AF, hw_AF, w_gate_EDF, w_up_EDF, w_out_EFD,  # noqa: ANN001, ANN202
      needs_dx):
    dx_TD = torch.empty_like(x_TD) if needs_dx else x_TD.new_empty(0, x_TD.shape[1])
    return (dx_TD, torch.empty_like(weight_A), torch.empty_like(w_gate_EDF), torch.empty_like(w_up_EDF),
            torch.empty_like(w_out_EFD))


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:  # noqa: ANN001
    x_TD, weight_A, token_A, counts_E, w_gate_EDF, w_up_EDF, w_out_EFD = inputs
    _, g_AF, u_AF, hw_AF = output
    ctx.save_for_backward(x_TD, weight_A, token_A, counts_E, g_AF, u_AF, hw_AF, w_gate_EDF, w_up_EDF, w_out_EFD)


def _backward(ctx, dy_TD: Tensor, *_activation_grads: Tensor) -> tuple:  # noqa: ANN001
    x_TD, weight_A, token_A, counts_E, g_AF, u_AF, hw_AF, w_gate_EDF, w_up_EDF, w_out_EFD = ctx.saved_tensors
    needs_dx = ctx.needs_input_grad[0]
    dx_TD, d_weight_A, d_w_gate, d_w_up, d_w_out = _grouped_swiglu_bwd(
        dy_TD, x_TD, weight_A, token_A, counts_E, g_AF, u_AF, hw_AF, w_gate_EDF, w_up_EDF, w_out_EFD, needs_dx)
    return (dx_TD if needs_dx else None, d_weight_A if ctx.needs_input_grad[1] else None, None, None,
            d_w_gate, d_w_up, d_w_out)


_grouped_swiglu_fwd.register_autograd(_backward, setup_context=_setup_context)


def grouped_swiglu(x_TD: Tensor, weight_A: Tensor, token_A: Tensor, counts_E: Tensor, w_gate_EDF: Tensor,
                   w_up_EDF: Tensor, w_out_EFD: Tensor) -> Tensor:
    """``y_TD = sum_a weight_a * swiglu_{e_a}(x_{t_a})`` over assignments sorted by expert; ``(T, D)``.

    Args:
        x_TD: the tokens.
        weight_A: the gates, in expert-sorted order (cast to x's dtype).
        token_A: int64 source token of each sorted row.
        counts_E: int64 ``(E,)`` rows per expert (read on the host inside the op).
        w_gate_EDF, w_up_EDF, w_out_EFD: the grouped weights (gradients flow to them, to ``x_TD``
            and to ``weight_A``).

    Under autocast the tokens and weights are cast to the autocast dtype first (the output is in it).
    """
    x_TD, w_gate_EDF, w_up_EDF, w_out_EFD = autocast_inputs(x_TD, w_gate_EDF, w_up_EDF, w_out_EFD)
    return _grouped_swiglu_fwd(x_TD, weight_A.to(x_TD.dtype), token_A, counts_E, w_gate_EDF, w_up_EDF, w_out_EFD)[0]


class GroupedDispatcher(Dispatcher):
    """Sort assignments by expert, then per-expert matmuls on contiguous slices.

    Experts that offer their fused SwiGLU form run as :func:`grouped_swiglu` (a custom op with a
    hand-written backward); called whole, permute, compute and combine are that one op and no
    ``(A, D)`` tensor is made. Other experts run through their ``grouped_forward`` between one
    gather and one scatter-add. The one host read is the per-expert counts, inside the op.
    """

    name = "grouped"

    def compute(self, x_AD: Tensor, plan: Plan, experts: Experts) -> Tensor:
        weights = swiglu_weights(experts)
        if weights is None:
            return experts.grouped_forward(x_AD, plan.counts())
        rows_A = torch.arange(x_AD.shape[0], device=x_AD.device)
        return grouped_swiglu(x_AD, x_AD.new_ones(x_AD.shape[0]), rows_A, plan.counts_E, *weights)

    def __call__(self, x_TD: Tensor, routing: Routing, experts: Experts) -> Tensor:
        weights = swiglu_weights(experts)
        if weights is None:
            return super().__call__(x_TD, routing, experts)
        order_A = torch.argsort(routing.expert_A, stable=True)
        return grouped_swiglu(x_TD, routing.weight_A[order_A], routing.token_A[order_A],
                              routing.tokens_per_expert(), *weights)


grouped_dispatch = GroupedDispatcher()
"""A shared ``grouped`` dispatcher: ``grouped_dispatch(x_TD, routing, experts) -> y_TD``."""
