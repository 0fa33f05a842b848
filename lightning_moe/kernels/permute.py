"""Move tokens into expert order and back without a ``T x E`` dispatch mask.

Legend: ``T`` tokens, ``D`` model width, ``E`` experts, ``A`` kept assignments (token, expert
pairs), ``B`` blocks of ``D`` columns.

Two layouts of the ``A`` assignments are used. The *expert-sorted* layout (rows of ``x_AD`` and
``out_AD``) is what the grouped expert matmuls read: rows ``offsets_E1[e]:offsets_E1[e + 1]`` belong
to expert ``e``. The *token-sorted* order (a CSR over tokens) is what the combine reads: token
``t`` owns assignments ``token_ptr_T1[t]:token_ptr_T1[t + 1]``, and ``row_A`` maps each to its
expert-sorted row. Both reductions (permute's backward, unpermute's forward) then gather over a
token's own rows and never scatter, so they need no atomics and are deterministic.

Layers, as in scattermoe: ``@triton.jit`` kernels, launchers that check shapes, custom ops
(``lightning_moe::permute_fwd`` and friends) with fake and autograd registrations, and the public
``permute`` / ``unpermute`` with their plain PyTorch ``*_reference`` twins (test oracle and the
fallback a caller uses where Triton cannot run).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_moe._validate import check_positive_int
from lightning_moe.kernels._triton import require_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the module still imports; the ops raise through require_triton
    triton = None

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK_ROWS = 16  # rows (assignments or tokens) per program


@dataclass
class DispatchPlan:
    """Where every assignment goes, in both layouts; built once per routing by ``make_plan``.

    Attributes:
        counts_E: ``(E,)`` int64 assignments per expert.
        offsets_E1: ``(E+1,)`` int64 cumulative counts; expert-sorted rows ``offsets[e]:offsets[e+1]``
            belong to expert ``e``.
        src_token_A: ``(A,)`` int64 token of each expert-sorted row.
        row_A: ``(A,)`` int64 expert-sorted row of each assignment in token-sorted order.
        token_ptr_T1: ``(T+1,)`` int64 CSR; token ``t`` owns token-sorted assignments
            ``token_ptr[t]:token_ptr[t+1]``.
        token_order_A: ``(A,)`` int64 indices into the routing's assignments in token-sorted order
            (stable); ``routing.weight_A[token_order_A]`` is the weight ``unpermute`` takes.
    """

    counts_E: Tensor
    offsets_E1: Tensor
    src_token_A: Tensor
    row_A: Tensor
    token_ptr_T1: Tensor
    token_order_A: Tensor

    @property
    def num_tokens(self) -> int:
        return self.token_ptr_T1.shape[0] - 1


def _csr(sorted_A: Tensor, num_bins: int) -> Tensor:
    """``(num_bins+1,)`` start of each bin in the sorted ids; ``searchsorted`` needs no host sync
    (``bincount`` reads the max id back to the host on CUDA)."""
    bins = torch.arange(num_bins + 1, device=sorted_A.device, dtype=sorted_A.dtype)
    return torch.searchsorted(sorted_A, bins)


def make_plan(token_A: Tensor, expert_A: Tensor, num_tokens: int, num_experts: int) -> DispatchPlan:
    """The ``DispatchPlan`` of assignments ``(token_A[a], expert_A[a])``, in plain torch, with no host sync.

    ``token_A`` may be in any order and a token may have any number of assignments (0 included).
    Ids must lie in ``[0, num_tokens)`` and ``[0, num_experts)``; they are not checked, since that
    would read them back to the host.
    """
    if token_A.dim() != 1 or expert_A.shape != token_A.shape:
        raise ValueError(f"`token_A` and `expert_A` must be 1-D of one length, got {tuple(token_A.shape)} "
                         f"and {tuple(expert_A.shape)}.")
    if isinstance(num_tokens, int) and num_tokens < 0:  # a SymInt under torch.compile is left alone
        raise ValueError(f"`num_tokens` must be an integer >= 0, got {num_tokens!r}.")
    check_positive_int("num_experts", num_experts)
    token_A, expert_A = token_A.long(), expert_A.long()
    expert_order_A = torch.argsort(expert_A, stable=True)
    token_order_A = torch.argsort(token_A, stable=True)
    offsets_E1 = _csr(expert_A[expert_order_A], num_experts)
    # rank_A[a]: expert-sorted row of assignment a (the inverse of expert_order_A).
    rank_A = torch.empty_like(expert_order_A).scatter_(
        0, expert_order_A, torch.arange(expert_A.shape[0], device=expert_A.device))
    return DispatchPlan(
        counts_E=offsets_E1.diff(),
        offsets_E1=offsets_E1,
        src_token_A=token_A[expert_order_A],
        row_A=rank_A[token_order_A],
        token_ptr_T1=_csr(token_A[token_order_A], num_tokens),
        token_order_A=token_order_A,
    )


# --- Kernels ------------------------------------------------------------------------------------
# All 2-D tensors are contiguous, row stride D. Row indices are int64 so that ``row * D`` cannot
# overflow; program-id-derived rows are cast to int64 before the multiply for the same reason.

if triton is not None:

    @triton.jit
    def _gather_rows_kernel(x_ptr, src_ptr, out_ptr, A, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        # x (T, D), src (A,) int64 in [0, T), out (A, D): out[i] = x[src[i]].
        # Grid (cdiv(A, BLOCK_R), cdiv(D, BLOCK_D)).
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        row_mask = rows < A
        mask = row_mask[:, None] & (cols < D)[None, :]
        src = tl.load(src_ptr + rows, mask=row_mask, other=0)
        vals = tl.load(x_ptr + src[:, None] * D + cols[None, :], mask=mask)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], vals, mask=mask)

    @triton.jit
    def _gather_reduce_kernel(src_ptr, row_ptr, weight_ptr, token_ptr_ptr, out_ptr, T, D,
                              HAS_WEIGHT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        # src (A, D) expert-sorted, row (A,) int64 and weight (A,) float32 in token-sorted order,
        # token_ptr (T+1,) int64, out (T, D):
        #   out[t] = sum_{j in token_ptr[t]:token_ptr[t+1]} weight[j] * src[row[j]]
        # summed in float32 in increasing j (deterministic); tokens without assignments get 0.
        # Grid (cdiv(T, BLOCK_T), cdiv(D, BLOCK_D)); weight is not read unless HAS_WEIGHT.
        tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        token_mask = tokens < T
        col_mask = cols < D
        start = tl.load(token_ptr_ptr + tokens, mask=token_mask, other=0)
        count = tl.load(token_ptr_ptr + tokens + 1, mask=token_mask, other=0) - start
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        # The block's tokens walk their assignments side by side, up to the longest list.
        for k in range(0, tl.max(count, axis=0)):
            live = k < count
            row = tl.load(row_ptr + start + k, mask=live, other=0)
            vals = tl.load(src_ptr + row[:, None] * D + cols[None, :], mask=live[:, None] & col_mask[None, :],
                           other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                vals = vals * tl.load(weight_ptr + start + k, mask=live, other=0.0)[:, None]
            acc += vals
        out_mask = token_mask[:, None] & col_mask[None, :]
        tl.store(out_ptr + tokens.to(tl.int64)[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=out_mask)

    @triton.jit
    def _unpermute_bwd_kernel(grad_y_ptr, out_ptr, weight_ptr, src_token_ptr, row_ptr, grad_out_ptr, partial_ptr,
                              A, D, B, BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr):
        # grad_y (T, D), out (A, D) expert-sorted, weight (A,) float32 / row (A,) int64 token-sorted,
        # src_token (A,) int64 expert-sorted, grad_out (A, D), partial (A, B) float32. With
        # t(j) = src_token[row[j]]:
        #   grad_out[row[j]] = weight[j] * grad_y[t(j)]      (each row written once: no atomics)
        #   partial[j, b]    = dot(grad_y[t(j)], out[row[j]]) over column block b, in float32;
        # the launcher sums partial over b, so no program shares an output element.
        # Grid (cdiv(A, BLOCK_A), B).
        j = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        j_mask = j < A
        mask = j_mask[:, None] & (cols < D)[None, :]
        row = tl.load(row_ptr + j, mask=j_mask, other=0)
        token = tl.load(src_token_ptr + row, mask=j_mask, other=0)
        weight = tl.load(weight_ptr + j, mask=j_mask, other=0.0)
        grad_y = tl.load(grad_y_ptr + token[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        out = tl.load(out_ptr + row[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(grad_out_ptr + row[:, None] * D + cols[None, :],
                 (grad_y * weight[:, None]).to(grad_out_ptr.dtype.element_ty), mask=mask)
        tl.store(partial_ptr + j.to(tl.int64) * B + tl.program_id(1), tl.sum(grad_y * out, axis=1), mask=j_mask)


# --- Launchers: check shapes (ValueError naming the argument), allocate, launch ------------------


def _check_rows(name: str, t: Tensor, rows: int | None = None, cols: int | None = None) -> None:
    if t.dim() != 2 or (rows is not None and t.shape[0] != rows) or (cols is not None and t.shape[1] != cols):
        want = f"({'*' if rows is None else rows}, {'*' if cols is None else cols})"
        raise ValueError(f"`{name}` must be 2-D of shape {want}, got {tuple(t.shape)}.")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"`{name}` must be float32, float16 or bfloat16, got {t.dtype}.")


def _check_index(name: str, t: Tensor, length: int | None = None) -> None:
    if t.dim() != 1 or (length is not None and t.shape[0] != length):
        raise ValueError(f"`{name}` must be 1-D of length {'*' if length is None else length}, got {tuple(t.shape)}.")
    if t.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"`{name}` must be int64 or int32, got {t.dtype}.")


def _check_weight(weight_A: Tensor, num_rows: int) -> None:
    if weight_A.dim() != 1 or weight_A.shape[0] != num_rows or weight_A.dtype != torch.float32:
        raise ValueError(f"`weight_A` must be float32 of shape ({num_rows},), got {weight_A.dtype} "
                         f"{tuple(weight_A.shape)}.")


def _check_plan(src_token_A: Tensor, row_A: Tensor, token_ptr_T1: Tensor) -> None:
    _check_index("src_token_A", src_token_A)
    _check_index("row_A", row_A, src_token_A.shape[0])
    _check_index("token_ptr_T1", token_ptr_T1)
    if token_ptr_T1.shape[0] < 1:
        raise ValueError("`token_ptr_T1` must have T+1 >= 1 entries, got 0.")


def _block_d(D: int) -> int:
    return min(128, triton.next_power_of_2(max(D, 1)))


def _launch_ready(*tensors: Tensor) -> list[Tensor]:
    """Check Triton can run, then the contiguous, int64-indexed tensors the kernels assume."""
    require_triton(*tensors)
    return [t.long().contiguous() if not t.is_floating_point() else t.contiguous() for t in tensors]


def _gather_reduce(src_AD: Tensor, row_A: Tensor, weight_A: Tensor | None, token_ptr_T1: Tensor) -> Tensor:
    """``(T, D)`` sums, per token, of its (weighted) rows of ``src_AD``; shared by two ops."""
    T, D = token_ptr_T1.shape[0] - 1, src_AD.shape[1]
    src_AD, row_A, token_ptr_T1 = _launch_ready(src_AD, row_A, token_ptr_T1)
    out_TD = torch.empty(T, D, dtype=src_AD.dtype, device=src_AD.device)
    if T and D:
        block_d = _block_d(D)
        grid = (triton.cdiv(T, _BLOCK_ROWS), triton.cdiv(D, block_d))
        weight = row_A if weight_A is None else weight_A.contiguous()  # unread placeholder without weights
        _gather_reduce_kernel[grid](src_AD, row_A, weight, token_ptr_T1, out_TD, T, D, HAS_WEIGHT=weight_A is not None,
                                    BLOCK_T=_BLOCK_ROWS, BLOCK_D=block_d)
    return out_TD


# --- Custom ops: opaque to torch.compile, with fake (shape) and autograd registrations -----------


@torch.library.custom_op("lightning_moe::permute_fwd", mutates_args=())
def _permute_fwd(x_TD: Tensor, src_token_A: Tensor, row_A: Tensor, token_ptr_T1: Tensor) -> Tensor:
    _check_rows("x_TD", x_TD)
    _check_plan(src_token_A, row_A, token_ptr_T1)
    A, D = src_token_A.shape[0], x_TD.shape[1]
    x_TD, src_token_A = _launch_ready(x_TD, src_token_A)
    x_AD = torch.empty(A, D, dtype=x_TD.dtype, device=x_TD.device)
    if A and D:
        block_d = _block_d(D)
        grid = (triton.cdiv(A, _BLOCK_ROWS), triton.cdiv(D, block_d))
        _gather_rows_kernel[grid](x_TD, src_token_A, x_AD, A, D, BLOCK_R=_BLOCK_ROWS, BLOCK_D=block_d)
    return x_AD


@_permute_fwd.register_fake
def _(x_TD: Tensor, src_token_A: Tensor, row_A: Tensor, token_ptr_T1: Tensor) -> Tensor:
    _check_rows("x_TD", x_TD)
    _check_plan(src_token_A, row_A, token_ptr_T1)
    return x_TD.new_empty(src_token_A.shape[0], x_TD.shape[1])


@torch.library.custom_op("lightning_moe::permute_bwd", mutates_args=())
def _permute_bwd(grad_x_AD: Tensor, row_A: Tensor, token_ptr_T1: Tensor) -> Tensor:
    _check_rows("grad_x_AD", grad_x_AD, rows=row_A.shape[0])
    return _gather_reduce(grad_x_AD, row_A, None, token_ptr_T1)


@_permute_bwd.register_fake
def _(grad_x_AD: Tensor, row_A: Tensor, token_ptr_T1: Tensor) -> Tensor:
    return grad_x_AD.new_empty(token_ptr_T1.shape[0] - 1, grad_x_AD.shape[1])


def _permute_setup(ctx, inputs, output) -> None:
    _, _, row_A, token_ptr_T1 = inputs
    ctx.save_for_backward(row_A, token_ptr_T1)


def _permute_backward(ctx, grad_x_AD: Tensor):
    row_A, token_ptr_T1 = ctx.saved_tensors
    return _permute_bwd(grad_x_AD, row_A, token_ptr_T1), None, None, None


_permute_fwd.register_autograd(_permute_backward, setup_context=_permute_setup)


@torch.library.custom_op("lightning_moe::unpermute_fwd", mutates_args=())
def _unpermute_fwd(out_AD: Tensor, weight_A: Tensor, src_token_A: Tensor, row_A: Tensor,
                   token_ptr_T1: Tensor) -> Tensor:
    _check_plan(src_token_A, row_A, token_ptr_T1)
    _check_rows("out_AD", out_AD, rows=row_A.shape[0])
    _check_weight(weight_A, row_A.shape[0])
    return _gather_reduce(out_AD, row_A, weight_A, token_ptr_T1)


@_unpermute_fwd.register_fake
def _(out_AD: Tensor, weight_A: Tensor, src_token_A: Tensor, row_A: Tensor, token_ptr_T1: Tensor) -> Tensor:
    _check_plan(src_token_A, row_A, token_ptr_T1)
    _check_rows("out_AD", out_AD, rows=row_A.shape[0])
    _check_weight(weight_A, row_A.shape[0])
    return out_AD.new_empty(token_ptr_T1.shape[0] - 1, out_AD.shape[1])


@torch.library.custom_op("lightning_moe::unpermute_bwd", mutates_args=())
def _unpermute_bwd(grad_y_TD: Tensor, out_AD: Tensor, weight_A: Tensor, src_token_A: Tensor,
                   row_A: Tensor) -> tuple[Tensor, Tensor]:
    _check_rows("grad_y_TD", grad_y_TD, cols=out_AD.shape[1])
    grad_y_TD, out_AD, weight_A, src_token_A, row_A = _launch_ready(grad_y_TD, out_AD, weight_A, src_token_A, row_A)
    (A, D), block_d = out_AD.shape, _block_d(out_AD.shape[1])
    B = triton.cdiv(D, block_d)
    grad_out_AD = torch.empty_like(out_AD)
    partial_AB = torch.empty(A, B, dtype=torch.float32, device=out_AD.device)
    if A and D:
        grid = (triton.cdiv(A, _BLOCK_ROWS), B)
        _unpermute_bwd_kernel[grid](grad_y_TD, out_AD, weight_A, src_token_A, row_A, grad_out_AD, partial_AB, A, D, B,
                                    BLOCK_A=_BLOCK_ROWS, BLOCK_D=block_d)
    elif A:  # D == 0: empty rows, zero dots
        partial_AB.zero_()
    return grad_out_AD, partial_AB.sum(1)


@_unpermute_bwd.register_fake
def _(grad_y_TD, out_AD, weight_A, src_token_A, row_A) -> tuple[Tensor, Tensor]:
    return torch.empty_like(out_AD), torch.empty_like(weight_A)


def _unpermute_setup(ctx, inputs, output) -> None:
    out_AD, weight_A, src_token_A, row_A, _ = inputs
    ctx.save_for_backward(out_AD, weight_A, src_token_A, row_A)


def _unpermute_backward(ctx, grad_y_TD: Tensor):
    grad_out_AD, grad_weight_A = _unpermute_bwd(grad_y_TD, *ctx.saved_tensors)
    return grad_out_AD, grad_weight_A, None, None, None


_unpermute_fwd.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


# --- Public functions and their plain PyTorch twins ---------------------------------------------


def permute(x_TD: Tensor, plan: DispatchPlan) -> Tensor:
    """``(A, D)`` rows of ``x_TD`` (``(T, D)``) in expert-sorted order: ``x_AD[i] = x_TD[src_token_A[i]]``.

    Backward sums each token's rows of the gradient (a gather over the CSR: no atomics).
    Raises ``RuntimeError`` where Triton cannot run on ``x_TD`` (see ``permute_reference``).
    """
    return _permute_fwd(x_TD, plan.src_token_A, plan.row_A, plan.token_ptr_T1)


def unpermute(out_AD: Tensor, weight_A: Tensor, plan: DispatchPlan) -> Tensor:
    """``(T, D)`` combine of expert outputs ``out_AD`` (``(A, D)``, expert-sorted) with gates ``weight_A``.

    ``y_TD[t] = sum_{j in token_ptr[t]:token_ptr[t+1]} weight_A[j] * out_AD[row_A[j]]``, summed in
    float32 and returned in ``out_AD``'s dtype; tokens without assignments get zeros. ``weight_A``
    is ``(A,)`` float32 in token-sorted order: ``routing.weight_A[plan.token_order_A]``.
    Raises ``RuntimeError`` where Triton cannot run on ``out_AD`` (see ``unpermute_reference``).
    """
    return _unpermute_fwd(out_AD, weight_A, plan.src_token_A, plan.row_A, plan.token_ptr_T1)


def permute_reference(x_TD: Tensor, plan: DispatchPlan) -> Tensor:
    """``permute`` in plain torch: one ``index_select``."""
    return x_TD.index_select(0, plan.src_token_A)


def unpermute_reference(out_AD: Tensor, weight_A: Tensor, plan: DispatchPlan) -> Tensor:
    """``unpermute`` in plain torch: a float32 ``index_add`` over the token-sorted assignments."""
    token_A = plan.src_token_A[plan.row_A]  # token of each token-sorted assignment
    weighted_AD = out_AD[plan.row_A].float() * weight_A.unsqueeze(-1)
    y_TD = torch.zeros(plan.num_tokens, out_AD.shape[1], dtype=torch.float32, device=out_AD.device)
    return y_TD.index_add(0, token_A, weighted_AD).to(out_AD.dtype)
