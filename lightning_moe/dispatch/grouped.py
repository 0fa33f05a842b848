"""The ``grouped`` backend: gather, SwiGLU experts and gated combine as one custom op, backward included.

Legend: ``T`` tokens, ``D`` model width, ``E`` experts, ``F`` expert hidden width, ``A`` assignments,
``N`` rows of one expert.

Composing the same computation from autograd ops (``split``, per-expert ``@``, ``cat``) records a
graph node per expert matmul and allocates every intermediate and gradient piece by piece; with
many small experts that overhead, not arithmetic, dominates. Here the forward and backward are
written out once: each expert's matmuls write straight into slices of preallocated buffers
(``torch.mm(..., out=)``) and the elementwise SwiGLU runs once over all rows between them.

No ``(A, D)`` tensor is ever made (with K experts per token that is K times the input): each
expert gathers its rows into one small reused buffer and adds its output straight into ``y_TD``.
Saved for backward: three ``(A, F)`` activations (gate and up pre-activations, gated ``h``).

Two things make many small experts fast on CPU:

- *Worker threads.* A matmul of a few dozen rows runs on one core however many threads torch has.
  When the experts are small (:data:`PARALLEL_MAX_ROWS`) they are split into
  ``torch.get_num_threads()`` contiguous chunks of about equal rows, one per worker thread; torch
  runs single-threaded meanwhile (so no thread starts a nested OpenMP team), and each worker
  scatter-adds into its own ``y``/``dx`` accumulator, summed at the end in a fixed order. Larger
  experts run one at a time on torch's own threads.
- *Recycled buffers.* A fresh large CPU tensor is page-faulted on first touch (glibc maps
  allocations this big afresh each time); at 256 experts faulting in the weight gradients cost as
  much as the matmuls that fill them. So each layer keeps the storage of its large buffers (the
  weight gradients, the saved activations and scratch, the returned accumulator) and writes into it again once
  nothing else holds it: autograd made the gradient ``w.grad`` and ``zero_grad(set_to_none=True)``
  dropped it, the backward freed the activations. While anything still holds one (``w.grad``
  kept between steps, a reference the user kept, the layer called twice in one step) a fresh
  tensor is made instead, so no value ever changes under anyone; the storage's use count decides.

The forward and backward are the custom ops ``lightning_moe::grouped_swiglu_fwd`` and
``lightning_moe::grouped_swiglu_bwd``: the per-expert row counts (a tensor) become host ints inside
them, so ``torch.compile(fullgraph=True)`` traces a layer through them without a graph break.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from lightning_moe.dispatch.base import Dispatcher, Plan, autocast_inputs
from lightning_moe.experts.protocol import Experts, swiglu_weights
from lightning_moe.routing.routing import Routing

PARALLEL_MAX_ROWS = 128
"""Experts run in parallel worker threads (CPU) when their mean rows per expert is at most this;
above it one expert's matmuls are large enough for torch's own threads."""

PARALLEL_MIN_FLOPS = 1 << 24
"""...and when one matmul phase (``2 * A * D * F`` FLOPs) is at least this (~0.3 ms of one core):
below it, handing work to threads costs more than it saves."""

RECYCLE_MIN_BYTES = 1 << 20
"""CPU buffers of at least this size are recycled (see the module docstring)."""

Slices = list[tuple[int, slice]]


def _expert_slices(counts: list[int]) -> Slices:
    """``(expert, rows)`` for every expert that received rows, in sorted-row order."""
    slices, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            slices.append((expert, slice(start, start + count)))
        start += count
    return slices


def _chunks(slices: Slices, device: torch.device, flops_per_row: int) -> list[Slices]:
    """The experts with rows, split into contiguous chunks of about equal rows: one per worker
    thread when they are small, on CPU and there is enough work (:data:`PARALLEL_MAX_ROWS`,
    :data:`PARALLEL_MIN_FLOPS`; ``flops_per_row`` is one matmul phase's, ``2 * D * F``), else one."""
    workers = min(torch.get_num_threads(), len(slices)) if device.type == "cpu" else 1
    rows = slices[-1][1].stop - slices[0][1].start if slices else 0
    if workers <= 1 or rows > PARALLEL_MAX_ROWS * len(slices) or rows * flops_per_row < PARALLEL_MIN_FLOPS:
        return [slices]
    chunks: list[Slices] = [[] for _ in range(workers)]
    start = slices[0][1].start
    for expert, rows_e in slices:  # by the middle row of each expert: contiguous, balanced by rows
        middle = (rows_e.start + rows_e.stop) / 2 - start
        chunks[min(int(middle * workers / rows), workers - 1)].append((expert, rows_e))
    return [chunk for chunk in chunks if chunk]


def _max_rows(chunk: Slices) -> int:
    return max(rows.stop - rows.start for _, rows in chunk)


# ---------------------------------------------------------------------------------------------
# Worker threads

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_worker_state = threading.local()


def _executor(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of at least ``workers`` threads (a new one if it is too small)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < workers:
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="lightning_moe-experts")
        return _pool


def _after_fork_in_child() -> None:
    # The parent's pool has no threads here, and a fork while another thread held a lock would
    # leave it held in the child forever: a new pool and new locks.
    global _pool, _pool_lock, _recycle_lock
    _pool, _pool_lock, _recycle_lock = None, threading.Lock(), threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _worker_task(work: Callable[[int, Slices], None], i: int, chunk: Slices, inference: bool) -> None:
    if not getattr(_worker_state, "ready", False):
        # Once per worker, while the caller waits with torch single-threaded: one thread each, a
        # worker's own OpenMP setting, so its matmuls start no nested team (extra OpenMP threads
        # make every team's waits slow, the main thread's included). torch sets up its per-thread
        # state here; in a forked child that also rebuilds the thread pool inherited from the
        # parent, which two threads doing at once can break ("Invalid thread pool!"): one at a time.
        with _pool_lock:
            torch.set_num_threads(1)
        _worker_state.ready = True
    # Grad mode and inference mode are per thread: the caller's are taken over.
    with torch.inference_mode() if inference else torch.no_grad():
        work(i, chunk)


def _run(chunks: list[Slices], work: Callable[[int, Slices], None]) -> None:
    """``work(i, chunks[i])`` for every chunk, without autograd: on worker threads when there are several."""
    inference = torch.is_inference_mode_enabled()
    if len(chunks) == 1:
        with torch.inference_mode() if inference else torch.no_grad():
            work(0, chunks[0])
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' matmuls single-threaded too (the MKL setting is global)
    try:
        pool = _executor(len(chunks))
        futures = [pool.submit(_worker_task, work, i, chunk, inference) for i, chunk in enumerate(chunks)]
        wait(futures)  # all of them, even when one failed: none may still be writing when this returns
        for future in futures:
            future.result()
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Recycled buffers

_recycled: WeakIdKeyDictionary = WeakIdKeyDictionary()  # owner tensor -> {role: kept tensor}
_recycle_lock = threading.Lock()
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _buffer(owner: Tensor, role: str, shape: tuple[int, ...], like: Tensor, *, zero: bool = False) -> Tensor:
    """A tensor of ``shape`` with ``like``'s dtype and device, uninitialised unless ``zero``: the
    storage ``owner`` kept for ``role`` if nothing else holds it now, else a fresh one."""
    shape = tuple(shape)
    fresh = torch.zeros if zero else torch.empty
    if like.device.type != "cpu" or _storage_use_count is None or torch.is_inference_mode_enabled() or \
            like.element_size() * torch.Size(shape).numel() < RECYCLE_MIN_BYTES:
        # (An inference tensor kept would refuse the writes of a later training step.)
        return fresh(shape, dtype=like.dtype, device=like.device)
    with _recycle_lock:
        kept_by_role = _recycled.get(owner)
        if kept_by_role is None:
            kept_by_role = _recycled[owner] = {}
        kept = kept_by_role.get(role)
        if kept is None or kept.shape != shape or kept.dtype != like.dtype:
            kept = kept_by_role[role] = torch.empty(shape, dtype=like.dtype, device=like.device)
        elif _storage_use_count(kept.untyped_storage()._cdata) > 2:  # `kept` and the temporary storage object
            return fresh(shape, dtype=like.dtype, device=like.device)
        buffer = kept.detach()  # a new tensor on the same storage: autograd makes a gradient w.grad without a copy
    return buffer.zero_() if zero else buffer


def release_recycled_buffers() -> None:
    """Drop the buffers every layer keeps for reuse on CPU (each is freed once nothing else holds
    it); the next step makes them afresh. Between steps a layer keeps about its expert weights'
    size (the gradients' storage), six ``(T*K, F)`` buffers (activations and scratch) and two
    ``(T, D)`` ones (output and input gradient)."""
    with _recycle_lock:
        _recycled.clear()


def _gradient(w: Tensor, role: str) -> Tensor:
    """An uninitialised buffer for ``w``'s gradient (recycled where ``w`` is contiguous, so the
    gradient has ``w``'s layout and autograd keeps it as it is)."""
    return _buffer(w, role, w.shape, w) if w.is_contiguous() else torch.empty_like(w)


def _accumulators(owner: Tensor, role: str, chunks: list[Slices], like: Tensor) -> list[Tensor]:
    """One zeroed contiguous ``like``-shaped accumulator per chunk of experts; the first (the one
    returned) recycled, the others fresh (one per thread would be a lot to keep on a many-core host)."""
    return [_buffer(owner, role, like.shape, like, zero=True)] + \
        [like.new_zeros(like.shape) for _ in chunks[1:]]


def _sum_into_first(parts: list[Tensor]) -> Tensor:
    for part in parts[1:]:
        parts[0].add_(part)
    return parts[0]


# ---------------------------------------------------------------------------------------------
# The custom ops

@torch.library.custom_op("lightning_moe::grouped_swiglu_fwd", mutates_args=())
def _grouped_swiglu_fwd(x_TD: Tensor, weight_A: Tensor, token_A: Tensor, counts_E: Tensor, w_gate_EDF: Tensor,
                        w_up_EDF: Tensor, w_out_EFD: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y_TD, g_AF, u_AF, hw_AF)``: the output and the activations the backward reads."""
    slices = _expert_slices(counts_E.tolist())
    chunks = _chunks(slices, x_TD.device, 2 * x_TD.shape[1] * w_gate_EDF.shape[2])
    shape_AF = (token_A.numel(), w_gate_EDF.shape[2])
    g_AF, u_AF, hw_AF = (_buffer(w_gate_EDF, role, shape_AF, x_TD) for role in ("g", "u", "hw"))
    y_parts = _accumulators(w_gate_EDF, "y", chunks, x_TD)

    def gate_and_up(_: int, chunk: Slices) -> None:
        buf_ND = x_TD.new_empty(_max_rows(chunk), x_TD.shape[1])  # one expert's rows, reused
        for expert, rows in chunk:
            x_nD = torch.index_select(x_TD, 0, token_A[rows], out=buf_ND[: rows.stop - rows.start])
            torch.mm(x_nD, w_gate_EDF[expert], out=g_AF[rows])
            torch.mm(x_nD, w_up_EDF[expert], out=u_AF[rows])

    def down(i: int, chunk: Slices) -> None:
        buf_ND = x_TD.new_empty(_max_rows(chunk), x_TD.shape[1])
        for expert, rows in chunk:
            out_nD = torch.mm(hw_AF[rows], w_out_EFD[expert], out=buf_ND[: rows.stop - rows.start])
            y_parts[i].index_add_(0, token_A[rows], out_nD)

    if slices:
        _run(chunks, gate_and_up)
        # The gate scales h (width F) rather than the expert output (width D): same product, less work.
        torch.ops.aten.silu.out(g_AF, out=hw_AF).mul_(u_AF).mul_(weight_A.unsqueeze(1).to(g_AF.dtype))
        _run(chunks, down)
    return _sum_into_first(y_parts), g_AF, u_AF, hw_AF


@_grouped_swiglu_fwd.register_fake
def _(x_TD, weight_A, token_A, counts_E, w_gate_EDF, w_up_EDF, w_out_EFD):  # noqa: ANN001, ANN202
    g_AF = x_TD.new_empty(token_A.shape[0], w_gate_EDF.shape[2])
    return x_TD.new_empty(x_TD.shape), g_AF, torch.empty_like(g_AF), torch.empty_like(g_AF)


@torch.library.custom_op("lightning_moe::grouped_swiglu_bwd", mutates_args=())
def _grouped_swiglu_bwd(dy_TD: Tensor, x_TD: Tensor, weight_A: Tensor, token_A: Tensor, counts_E: Tensor,
                        g_AF: Tensor, u_AF: Tensor, hw_AF: Tensor, w_gate_EDF: Tensor, w_up_EDF: Tensor,
                        w_out_EFD: Tensor, needs_dx: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx_TD, d_weight_A, d_w_gate_EDF, d_w_up_EDF, d_w_out_EFD)``; ``dx_TD`` is ``(0, D)`` unless
    ``needs_dx``."""
    counts = counts_E.tolist()
    slices = _expert_slices(counts)
    chunks = _chunks(slices, x_TD.device, 2 * x_TD.shape[1] * w_gate_EDF.shape[2])
    dy_TD = dy_TD.contiguous()
    d_w_gate, d_w_up, d_w_out = _gradient(w_gate_EDF, "d_w_gate"), _gradient(w_up_EDF, "d_w_up"), \
        _gradient(w_out_EFD, "d_w_out")
    idle = [expert for expert, count in enumerate(counts) if not count]
    for grad in (d_w_gate, d_w_up, d_w_out):
        grad[idle] = 0  # every other expert's slice is written below
    dhw_AF = _buffer(w_gate_EDF, "dhw", g_AF.shape, g_AF)  # d(h * weight) = dy W_out^T
    dx_parts = _accumulators(w_gate_EDF, "dx", chunks, x_TD) if needs_dx else []

    def down(_: int, chunk: Slices) -> None:
        buf_ND = dy_TD.new_empty(_max_rows(chunk), dy_TD.shape[1])
        for expert, rows in chunk:
            dy_nD = torch.index_select(dy_TD, 0, token_A[rows], out=buf_ND[: rows.stop - rows.start])
            torch.mm(dy_nD, w_out_EFD[expert].t(), out=dhw_AF[rows])
            torch.mm(hw_AF[rows].t(), dy_nD, out=d_w_out[expert])

    def gate_and_up(i: int, chunk: Slices) -> None:
        buf_ND = x_TD.new_empty(_max_rows(chunk), x_TD.shape[1])
        for expert, rows in chunk:
            x_nD = torch.index_select(x_TD, 0, token_A[rows], out=buf_ND[: rows.stop - rows.start])
            d_g_nF, d_u_nF = d_g_AF[rows], d_u_AF[rows]
            torch.mm(x_nD.t(), d_g_nF, out=d_w_gate[expert])
            torch.mm(x_nD.t(), d_u_nF, out=d_w_up[expert])
            if needs_dx:
                dx_nD = torch.mm(d_g_nF, w_gate_EDF[expert].t(), out=x_nD)  # x_nD is read: overwrite it last
                dx_parts[i].index_add_(0, token_A[rows], dx_nD.addmm_(d_u_nF, w_up_EDF[expert].t()))

    d_weight_A = g_AF.new_zeros(g_AF.shape[0])
    if slices:
        _run(chunks, down)
        # With dhw = dy W_out^T: dot(dy, weight * h W_out) = weight * dot(dhw, h), so the gate
        # gradient needs no (A, D) tensor; h = silu(g) * u.
        # Every (A, F) temporary is a recycled buffer, written in place (fresh ones page-fault).
        w_A1 = weight_A.unsqueeze(1).to(g_AF.dtype)
        tmp_AF = torch.ops.aten.silu.out(g_AF, out=_buffer(w_gate_EDF, "tmp", g_AF.shape, g_AF))
        d_u_AF = torch.mul(dhw_AF, tmp_AF, out=_buffer(w_gate_EDF, "d_u", g_AF.shape, g_AF))  # d u / weight
        torch.sum(torch.mul(d_u_AF, u_AF, out=tmp_AF), 1, out=d_weight_A)
        d_u_AF.mul_(w_A1)
        d_g_AF = torch.ops.aten.silu_backward.grad_input(dhw_AF.mul_(u_AF).mul_(w_A1), g_AF, grad_input=tmp_AF)
        _run(chunks, gate_and_up)
    dx_TD = _sum_into_first(dx_parts) if needs_dx else x_TD.new_empty(0, x_TD.shape[1])
    return dx_TD, d_weight_A.to(weight_A.dtype), d_w_gate, d_w_up, d_w_out


@_grouped_swiglu_bwd.register_fake
def _(dy_TD, x_TD, weight_A, token_A, counts_E, g_AF, u_AF, hw_AF, w_gate_EDF, w_up_EDF, w_out_EFD,  # noqa: ANN001, ANN202
      needs_dx):
    dx_TD = x_TD.new_empty(x_TD.shape) if needs_dx else x_TD.new_empty(0, x_TD.shape[1])
    return (dx_TD, torch.empty_like(weight_A), torch.empty_like(w_gate_EDF), torch.empty_like(w_up_EDF),
            torch.empty_like(w_out_EFD))


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:  # noqa: ANN001
    x_TD, weight_A, token_A, counts_E, w_gate_EDF, w_up_EDF, w_out_EFD = inputs
    _, g_AF, u_AF, hw_AF = output
    ctx.set_materialize_grads(False)  # the activations get no gradient: no (A, F) zeros for them
    ctx.save_for_backward(x_TD, weight_A, token_A, counts_E, g_AF, u_AF, hw_AF, w_gate_EDF, w_up_EDF, w_out_EFD)


def _backward(ctx, dy_TD: Tensor | None, *_activation_grads: None) -> tuple:  # noqa: ANN001
    if dy_TD is None:  # the output was not used
        return (None,) * 7
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
