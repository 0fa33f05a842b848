"""Fused top-k gating: scores, selection bias, top-k, renormalisation and scaling in one Triton pass.

Legend: ``T`` tokens, ``E`` experts, ``K`` experts per token.

``TopKRouter``'s gating (``lightning_moe.routing.topk``), from router logits to
``(scores_TE, gates_TK, experts_TK)``. Each program holds whole rows of ``E`` logits in registers,
so the ``(T, E)`` intermediates (affinity, biased choice) never reach memory; the backward
recomputes the affinity from the logits rather than saving it.

Layers, as in scattermoe: ``@triton.jit`` kernels, launchers that check shapes, the custom ops
``lightning_moe::topk_gating_fwd`` / ``topk_gating_bwd`` with fake and autograd registrations, and
the public ``fused_topk_gating`` with its plain PyTorch twin ``topk_gating_reference`` (test
oracle, and the fallback a caller uses where Triton cannot run).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_moe._validate import check_int_range, check_positive_float
from lightning_moe.kernels._triton import require_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the module still imports; the ops raise through require_triton
    triton = tl = None

__all__ = ["fused_topk_gating", "topk_gating_reference"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SCORE_FUNCS = ("softmax", "sigmoid")
_MAX_EXPERTS = 4096  # a whole row lives in registers; wider rows would spill
_TILE = 2048  # BLOCK_T * BLOCK_E elements per program: 16 float32 per thread at 4 warps
_MAX_ROWS = 16  # rows per program, so that T = 4096 still spreads over a few hundred programs
_EPS = 1e-20  # TopKRouter's clamp on the sum of the kept gates


# --- Kernels ------------------------------------------------------------------------------------
# All tensors are contiguous. Rows are cast to int64 before ``row * E`` so that it cannot overflow.

if triton is not None:

    @triton.jit
    def _affinity(logits, row_mask, valid, SIGMOID: tl.constexpr):
        # (affinity, scores) of a (BLOCK_T, BLOCK_E) float32 tile; padding lanes get 0 in both and
        # padding rows divide by 1, so that no lane computes inf - inf or 0 / 0.
        if SIGMOID:
            z = tl.exp(-tl.abs(logits))  # sigmoid without overflow for large |logits|
            affinity = tl.where(valid, tl.where(logits >= 0, 1.0 / (1.0 + z), z / (1.0 + z)), 0.0)
            total = tl.where(row_mask, tl.sum(affinity, axis=1), 1.0)
            return affinity, affinity / total[:, None]
        x = tl.where(valid, logits, float("-inf"))
        peak = tl.where(row_mask, tl.max(x, axis=1), 0.0)
        num = tl.exp(x - peak[:, None])
        affinity = num / tl.where(row_mask, tl.sum(num, axis=1), 1.0)[:, None]
        return affinity, affinity

    @triton.jit
    def _topk_gating_fwd_kernel(logits_ptr, bias_ptr, scores_ptr, gates_ptr, experts_ptr, T, E, K, scaling_factor,
                                SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr,
                                BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
        # logits (T, E) float32/16/bf16, bias (E,) float32 (read only if HAS_BIAS); out scores (T, E)
        # float32, gates (T, K) float32, experts (T, K) int64. BLOCK_E >= E, BLOCK_K >= K.
        # Grid (cdiv(T, BLOCK_T),): each program owns BLOCK_T whole rows.
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        kcols = tl.arange(0, BLOCK_K)
        row_mask = rows < T
        valid = row_mask[:, None] & (cols < E)[None, :]
        offsets = rows.to(tl.int64)[:, None] * E + cols[None, :]
        logits = tl.load(logits_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
        affinity, scores = _affinity(logits, row_mask, valid, SIGMOID)
        tl.store(scores_ptr + offsets, scores, mask=valid)
        choice = affinity
        if HAS_BIAS:  # steers the choice only: gates are read from the unbiased affinity
            choice += tl.load(bias_ptr + cols, mask=cols < E, other=0.0)[None, :]
        # K rounds of (max, lowest index holding it, mark it taken). A `free` mask rather than
        # overwriting with -inf keeps taken lanes out even when the choice itself is -inf.
        free = valid
        gates = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
        experts = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
        for k in range(K):
            best = tl.max(tl.where(free, choice, float("-inf")), axis=1)
            pick = tl.min(tl.where(free & (choice == best[:, None]), cols[None, :], BLOCK_E), axis=1)
            hit = cols[None, :] == pick[:, None]
            slot = kcols[None, :] == k
            gates = tl.where(slot, tl.sum(tl.where(hit, affinity, 0.0), axis=1)[:, None], gates)
            experts = tl.where(slot, pick[:, None], experts)
            free = free & ~hit
        if RENORMALIZE:  # padding slots hold 0, so the sum is over the K kept gates
            gates = gates / tl.maximum(tl.sum(gates, axis=1), 1e-20)[:, None]
        gates = gates * scaling_factor
        out = rows.to(tl.int64)[:, None] * K + kcols[None, :]
        out_mask = row_mask[:, None] & (kcols < K)[None, :]
        tl.store(gates_ptr + out, gates, mask=out_mask)
        tl.store(experts_ptr + out, experts.to(tl.int64), mask=out_mask)

    @triton.jit
    def _topk_gating_bwd_kernel(grad_scores_ptr, grad_gates_ptr, logits_ptr, experts_ptr, grad_logits_ptr,
                                T, E, K, scaling_factor, SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr,
                                HAS_GRAD_SCORES: tl.constexpr, HAS_GRAD_GATES: tl.constexpr,
                                BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
        # grad_scores gs (T, E) / grad_gates gg (T, K) float (read only if HAS_*), logits (T, E),
        # experts (T, K) int64, distinct per row; out grad_logits (T, E) in logits' dtype. With
        # affinity a, kept sum S = sum_k a[e_k], c = scaling_factor, eps = 1e-20:
        #   da[e_k] = c * gg_k                                              (no renormalisation)
        #   da[e_k] = c / max(S, eps) * (gg_k - [S >= eps] * sum_j gg_j a[e_j] / max(S, eps))
        #   da     += gs                       (softmax: scores = a)
        #   da     += (gs - sum(gs * s)) / sum(a)   (sigmoid: scores s = a / sum(a))
        #   dlogits = a * (da - sum(da * a))   (softmax)  or  da * a * (1 - a)  (sigmoid)
        # Grid (cdiv(T, BLOCK_T),): each program owns BLOCK_T whole rows.
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        row_mask = rows < T
        valid = row_mask[:, None] & (cols < E)[None, :]
        offsets = rows.to(tl.int64)[:, None] * E + cols[None, :]
        logits = tl.load(logits_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
        affinity, scores = _affinity(logits, row_mask, valid, SIGMOID)
        grad_a = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
        if HAS_GRAD_GATES:
            # Scatter gg into expert columns; experts are distinct, so each column gets at most one.
            gg = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
            kept = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
            for k in range(K):
                expert = tl.load(experts_ptr + rows.to(tl.int64) * K + k, mask=row_mask, other=-1)
                hit = cols[None, :] == expert[:, None]
                grad_k = tl.load(grad_gates_ptr + rows.to(tl.int64) * K + k, mask=row_mask, other=0.0)
                gg = tl.where(hit, grad_k.to(tl.float32)[:, None], gg)
                kept = kept | hit
            if RENORMALIZE:
                raw = tl.sum(tl.where(kept, affinity, 0.0), axis=1)
                total = tl.maximum(raw, 1e-20)
                dot = tl.where(raw >= 1e-20, tl.sum(gg * affinity, axis=1) / total, 0.0)  # clamp_min's grad
                grad_a = tl.where(kept, (gg - dot[:, None]) * (scaling_factor / total)[:, None], 0.0)
            else:
                grad_a = gg * scaling_factor
        if HAS_GRAD_SCORES:
            gs = tl.load(grad_scores_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
            if SIGMOID:
                total = tl.where(row_mask, tl.sum(affinity, axis=1), 1.0)
                gs = (gs - tl.sum(gs * scores, axis=1)[:, None]) / total[:, None]
            grad_a += gs
        if SIGMOID:
            grad = grad_a * affinity * (1.0 - affinity)
        else:
            grad = affinity * (grad_a - tl.sum(grad_a * affinity, axis=1)[:, None])
        tl.store(grad_logits_ptr + offsets, grad.to(grad_logits_ptr.dtype.element_ty), mask=valid)


# --- Argument checks and launch geometry ---------------------------------------------------------


def _check_args(logits_TE: Tensor, top_k: int, score_func: str, bias_E: Tensor | None, scaling_factor: float) -> None:
    """The checks both public functions share; each ``ValueError`` names the parameter."""
    if logits_TE.dim() != 2 or logits_TE.shape[1] < 1 or not logits_TE.is_floating_point():
        raise ValueError(f"`logits_TE` must be a floating tensor of shape (T, E) with E >= 1, got "
                         f"{logits_TE.dtype} {tuple(logits_TE.shape)}.")
    num_experts = logits_TE.shape[1]
    check_int_range("top_k", top_k, 1, num_experts)
    if score_func not in _SCORE_FUNCS:
        raise ValueError(f"`score_func` must be 'softmax' or 'sigmoid', got {score_func!r}.")
    if bias_E is not None and (bias_E.dim() != 1 or bias_E.shape[0] != num_experts or not bias_E.is_floating_point()):
        raise ValueError(f"`bias_E` must be None or a floating tensor of shape ({num_experts},), got "
                         f"{bias_E.dtype} {tuple(bias_E.shape)}.")
    check_positive_float("scaling_factor", scaling_factor)


def _check_logits(logits_TE: Tensor) -> None:
    """What the kernels add to ``_check_args``: a dtype they load and a row that fits in registers."""
    if logits_TE.dim() != 2 or not 1 <= logits_TE.shape[1] <= _MAX_EXPERTS or logits_TE.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"`logits_TE` must be float32, float16 or bfloat16 of shape (T, E) with E in "
                         f"[1, {_MAX_EXPERTS}], got {logits_TE.dtype} {tuple(logits_TE.shape)}.")


def _check_backward_args(grad_scores_TE: Tensor | None, grad_gates_TK: Tensor | None, logits_TE: Tensor,
                         experts_TK: Tensor) -> None:
    _check_logits(logits_TE)
    if experts_TK.dim() != 2 or experts_TK.shape[0] != logits_TE.shape[0] or experts_TK.dtype != torch.int64:
        raise ValueError(f"`experts_TK` must be int64 of shape ({logits_TE.shape[0]}, K), got "
                         f"{experts_TK.dtype} {tuple(experts_TK.shape)}.")
    for name, grad, shape in (("grad_scores_TE", grad_scores_TE, logits_TE.shape),
                              ("grad_gates_TK", grad_gates_TK, experts_TK.shape)):
        if grad is not None and (grad.shape != shape or not grad.is_floating_point()):
            raise ValueError(f"`{name}` must be None or a floating tensor of shape {tuple(shape)}, got "
                             f"{grad.dtype} {tuple(grad.shape)}.")


def _blocks(num_experts: int, top_k: int) -> tuple[int, int, int]:
    """``(BLOCK_T, BLOCK_E, BLOCK_K)``: whole rows per program, about ``_TILE`` elements in all."""
    block_e = triton.next_power_of_2(num_experts)
    return max(1, min(_MAX_ROWS, _TILE // block_e)), block_e, triton.next_power_of_2(top_k)


# --- Custom ops: opaque to torch.compile, with fake (shape) and autograd registrations -----------


@torch.library.custom_op("lightning_moe::topk_gating_fwd", mutates_args=())
def _topk_gating_fwd(logits_TE: Tensor, bias_E: Tensor | None, top_k: int, score_func: str, renormalize: bool,
                     scaling_factor: float) -> tuple[Tensor, Tensor, Tensor]:
    _check_logits(logits_TE)
    check_int_range("top_k", top_k, 1, logits_TE.shape[1])  # K > E would pick padding lanes
    require_triton(logits_TE, *([] if bias_E is None else [bias_E]))
    (T, E), K = logits_TE.shape, top_k
    logits_TE = logits_TE.contiguous()
    scores_TE = torch.empty(T, E, dtype=torch.float32, device=logits_TE.device)
    gates_TK = torch.empty(T, K, dtype=torch.float32, device=logits_TE.device)
    experts_TK = torch.empty(T, K, dtype=torch.int64, device=logits_TE.device)
    if T:
        block_t, block_e, block_k = _blocks(E, K)
        bias = logits_TE if bias_E is None else bias_E.float().contiguous()  # unread placeholder without bias
        _topk_gating_fwd_kernel[(triton.cdiv(T, block_t),)](
            logits_TE, bias, scores_TE, gates_TK, experts_TK, T, E, K, scaling_factor,
            SIGMOID=score_func == "sigmoid", HAS_BIAS=bias_E is not None, RENORMALIZE=renormalize,
            BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=block_k)
    return scores_TE, gates_TK, experts_TK


@_topk_gating_fwd.register_fake
def _(logits_TE, bias_E, top_k, score_func, renormalize, scaling_factor) -> tuple[Tensor, Tensor, Tensor]:
    _check_logits(logits_TE)
    check_int_range("top_k", top_k, 1, logits_TE.shape[1])
    T, E = logits_TE.shape
    return (logits_TE.new_empty(T, E, dtype=torch.float32), logits_TE.new_empty(T, top_k, dtype=torch.float32),
            logits_TE.new_empty(T, top_k, dtype=torch.int64))


@torch.library.custom_op("lightning_moe::topk_gating_bwd", mutates_args=())
def _topk_gating_bwd(grad_scores_TE: Tensor | None, grad_gates_TK: Tensor | None, logits_TE: Tensor,
                     experts_TK: Tensor, score_func: str, renormalize: bool, scaling_factor: float) -> Tensor:
    _check_backward_args(grad_scores_TE, grad_gates_TK, logits_TE, experts_TK)
    given = [g.contiguous() for g in (grad_scores_TE, grad_gates_TK) if g is not None]
    require_triton(logits_TE, experts_TK, *given)
    (T, E), K = logits_TE.shape, experts_TK.shape[1]
    logits_TE, experts_TK = logits_TE.contiguous(), experts_TK.contiguous()
    if not given:  # no gradient reached either output
        return torch.zeros_like(logits_TE)
    grad_logits_TE = torch.empty_like(logits_TE)
    if T:
        block_t, block_e, _ = _blocks(E, K)
        placeholder = given[0]  # stands in, unread, for the gradient that is None
        _topk_gating_bwd_kernel[(triton.cdiv(T, block_t),)](
            placeholder if grad_scores_TE is None else grad_scores_TE.contiguous(),
            placeholder if grad_gates_TK is None else grad_gates_TK.contiguous(),
            logits_TE, experts_TK, grad_logits_TE, T, E, K, scaling_factor,
            SIGMOID=score_func == "sigmoid", RENORMALIZE=renormalize,
            HAS_GRAD_SCORES=grad_scores_TE is not None, HAS_GRAD_GATES=grad_gates_TK is not None,
            BLOCK_T=block_t, BLOCK_E=block_e)
    return grad_logits_TE


@_topk_gating_bwd.register_fake
def _(grad_scores_TE, grad_gates_TK, logits_TE, experts_TK, score_func, renormalize, scaling_factor) -> Tensor:
    _check_backward_args(grad_scores_TE, grad_gates_TK, logits_TE, experts_TK)
    return torch.empty_like(logits_TE, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    logits_TE, _, _, score_func, renormalize, scaling_factor = inputs
    ctx.save_for_backward(logits_TE, output[2])  # the affinity is recomputed from the logits
    ctx.config = (score_func, renormalize, scaling_factor)
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: its read is skipped


def _backward(ctx, grad_scores_TE: Tensor | None, grad_gates_TK: Tensor | None, _grad_experts_TK):
    logits_TE, experts_TK = ctx.saved_tensors
    grad_logits_TE = _topk_gating_bwd(grad_scores_TE, grad_gates_TK, logits_TE, experts_TK, *ctx.config)
    return grad_logits_TE, None, None, None, None, None  # nothing flows to the bias or the selection


_topk_gating_fwd.register_autograd(_backward, setup_context=_setup_context)


# --- Public functions ----------------------------------------------------------------------------


def fused_topk_gating(logits_TE: Tensor, top_k: int, score_func: str = "softmax", bias_E: Tensor | None = None,
                      renormalize: bool = True, scaling_factor: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """``topk_gating_reference`` in one Triton kernel per direction; the same arguments and results.

    ``logits_TE`` must be float32, float16 or bfloat16 with E <= 4096 (computed in float32).
    Gradients reach ``logits_TE`` from ``scores_TE`` and ``gates_TK``, through a Triton backward
    that recomputes the affinity. Raises ``RuntimeError`` where Triton cannot run on ``logits_TE``
    (CPU tensors need ``TRITON_INTERPRET=1``): use ``topk_gating_reference`` there.
    """
    _check_args(logits_TE, top_k, score_func, bias_E, scaling_factor)
    return _topk_gating_fwd(logits_TE, bias_E, top_k, score_func, bool(renormalize), float(scaling_factor))


def topk_gating_reference(logits_TE: Tensor, top_k: int, score_func: str = "softmax", bias_E: Tensor | None = None,
                          renormalize: bool = True, scaling_factor: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """``TopKRouter``'s gating in plain torch: ``(scores_TE, gates_TK, experts_TK)`` from ``(T, E)`` logits.

    ``a = softmax(logits)`` over E, or ``sigmoid(logits)``; ``scores = a`` (softmax) or
    ``a / sum_E a`` (sigmoid). ``experts_TK`` (int64) are the ``top_k`` largest of
    ``a.detach() + bias_E`` per row, in descending order: the bias steers the choice only.
    ``gates_TK = a[experts]``, divided by ``max(sum_K, 1e-20)`` if ``renormalize``, times
    ``scaling_factor``. Computed in float32 (float64 logits stay float64, as in ``TopKRouter``).
    """
    _check_args(logits_TE, top_k, score_func, bias_E, scaling_factor)
    logits_TE = logits_TE.to(torch.promote_types(logits_TE.dtype, torch.float32))
    if score_func == "softmax":
        affinity_TE = scores_TE = logits_TE.softmax(dim=-1)
    else:
        affinity_TE = logits_TE.sigmoid()
        scores_TE = affinity_TE / affinity_TE.sum(dim=-1, keepdim=True)
    choice_TE = affinity_TE.detach()
    if bias_E is not None:
        choice_TE = choice_TE + bias_E.to(choice_TE.dtype)
    experts_TK = choice_TE.topk(top_k, dim=-1).indices
    gates_TK = affinity_TE.gather(1, experts_TK)
    if renormalize:
        gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True).clamp_min(_EPS)
    if scaling_factor != 1.0:
        gates_TK = gates_TK * scaling_factor
    return scores_TE, gates_TK, experts_TK
