"""Grouped GEMM over rows sorted by expert, in Triton, forward and backward, with a PyTorch reference.

Rows ``offsets[e]:offsets[e + 1]`` of ``x`` belong to expert ``e`` and are multiplied by ``w[e]``,
as in MegaBlocks' grouped kernels and ScatterMoE. The caller has already gathered the rows; the
kernels read them contiguously. The tile schedule is computed on the device from ``offsets``, so a
forward or backward call never waits on the GPU (no ``.item()``, no ``.tolist()``).

Layers (scattermoe-style): ``@triton.jit`` kernels, launchers that check shapes, the
``lightning_moe::grouped_mm`` / ``lightning_moe::grouped_mm_wgrad`` custom ops (so ``torch.compile``
sees them), autograd registration, then the public :func:`grouped_mm` and :func:`grouped_swiglu`.

Legend: ``A`` rows, sorted by expert (all experts together), ``K`` input width, ``N`` output width,
``E`` experts, ``E1`` = E + 1 offsets, ``D`` model width, ``F`` expert hidden width, ``M`` rows of
one tile.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_moe.kernels._triton import interpreting, require_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the module still imports; the public functions raise via require_triton
    triton = tl = None

__all__ = ["grouped_mm", "grouped_mm_reference", "grouped_swiglu", "grouped_swiglu_reference"]

PRECISIONS = ("ieee", "tf32", "tf32x3")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _configs(shapes: list[tuple[int, int, int, int, int]]) -> list:
    """``triton.Config`` for each ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)``."""
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
    return [triton.Config(dict(zip(keys, s[:3], strict=True)), num_warps=s[3], num_stages=s[4]) for s in shapes]


# The interpreter runs one fixed small config: autotuning would run every config, in Python.
# On GPU, autotune (keyed on N and K; Triton adds the dtypes) over tiles that suit H100 and A100;
# configs that overflow shared memory (float32 tf32 at 128x256x64) are skipped by the autotuner.
_INTERPRETER_CONFIG = [(16, 32, 32, 4, 1)]
_MM_GPU_CONFIGS = [
    (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (64, 64, 32, 4, 5),
]
# For the weight gradient, BLOCK_K x BLOCK_N is the output tile and BLOCK_M the reduction chunk.
_WGRAD_GPU_CONFIGS = [
    (64, 128, 128, 8, 3), (64, 128, 64, 4, 4), (64, 64, 128, 4, 4),
    (32, 64, 64, 4, 4), (64, 64, 64, 4, 3),
]

if triton is not None:
    _interp = interpreting()

    # Shape contract: x (A, K), w (E, K, N), y (A, N), any strides (backward passes w's transposed
    # view); offsets (E1,) int64, expert e owns rows offsets[e]:offsets[e+1]. Grid:
    # (cdiv(A, BLOCK_M) + E, cdiv(N, BLOCK_N)). Axis 0 enumerates every expert's M-tiles back to
    # back; the "+ E" covers one partial tile per expert, and programs past the last tile exit.
    @triton.autotune(configs=_configs(_INTERPRETER_CONFIG if _interp else _MM_GPU_CONFIGS), key=["N", "K"])
    @triton.jit
    def _grouped_mm_kernel(
        x_ptr, w_ptr, y_ptr, offsets_ptr, E, N, K,
        stride_xa, stride_xk, stride_we, stride_wk, stride_wn, stride_ya, stride_yn,
        BLOCK_E: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        # Tile schedule from the offsets, recomputed by each program (E + 1 loads and a scan, cheap
        # next to the K loop) so that the host needs no counts and no extra launch.
        e_E = tl.arange(0, BLOCK_E)
        begin_E = tl.load(offsets_ptr + e_E, mask=e_E < E, other=0)
        end_E = tl.load(offsets_ptr + e_E + 1, mask=e_E < E, other=0)
        tiles_E = tl.cdiv(end_E - begin_E, BLOCK_M).to(tl.int32)
        tile_end_E = tl.cumsum(tiles_E, axis=0)
        # Padding lanes count only once pid_m is past every tile, which then gives expert >= E.
        expert = tl.sum((tile_end_E <= pid_m).to(tl.int32), axis=0)
        if expert >= E:
            return
        first_tile = tl.sum(tl.where(e_E == expert, tile_end_E - tiles_E, 0), axis=0)
        row_begin = tl.load(offsets_ptr + expert)
        row_end = tl.load(offsets_ptr + expert + 1)

        rows_M = row_begin + (pid_m - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: A * K may pass 2**31
        cols_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        k_K = tl.arange(0, BLOCK_K)
        row_mask_M = rows_M < row_end
        col_mask_N = cols_N < N
        x_ptrs = x_ptr + rows_M[:, None] * stride_xa + k_K[None, :] * stride_xk
        w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + k_K[:, None] * stride_wk + cols_N[None, :] * stride_wn
        acc_MN = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask_K = k0 + k_K < K
            x_MK = tl.load(x_ptrs, mask=row_mask_M[:, None] & k_mask_K[None, :], other=0.0)
            w_KN = tl.load(w_ptrs, mask=k_mask_K[:, None] & col_mask_N[None, :], other=0.0)
            if UPCAST:
                x_MK, w_KN = x_MK.to(tl.float32), w_KN.to(tl.float32)
            acc_MN = tl.dot(x_MK, w_KN, acc_MN, input_precision=PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        y_ptrs = y_ptr + rows_M[:, None] * stride_ya + cols_N[None, :] * stride_yn
        tl.store(y_ptrs, acc_MN.to(y_ptr.dtype.element_ty), mask=row_mask_M[:, None] & col_mask_N[None, :])

    # Shape contract: x (A, K), dy (A, N), dw (E, K, N), any strides; offsets as above. Grid:
    # (cdiv(K, BLOCK_K), cdiv(N, BLOCK_N), E), the expert slowest so that programs running together
    # share its rows in L2. Each program reduces over its expert's rows in BLOCK_M chunks; an expert
    # with no rows skips the loop and stores exact zeros.
    @triton.autotune(configs=_configs(_INTERPRETER_CONFIG if _interp else _WGRAD_GPU_CONFIGS), key=["N", "K"])
    @triton.jit
    def _grouped_wgrad_kernel(
        x_ptr, dy_ptr, dw_ptr, offsets_ptr, N, K,
        stride_xa, stride_xk, stride_dya, stride_dyn, stride_dwe, stride_dwk, stride_dwn,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_k = tl.program_id(0)
        pid_n = tl.program_id(1)
        expert = tl.program_id(2)
        row_begin = tl.load(offsets_ptr + expert)
        row_end = tl.load(offsets_ptr + expert + 1)
        k_K = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        cols_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_M = tl.arange(0, BLOCK_M)
        k_mask_K = k_K < K
        col_mask_N = cols_N < N
        acc_KN = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for m0 in range(row_begin, row_end, BLOCK_M):
            rows_M = m0 + m_M
            row_mask_M = rows_M < row_end
            # x's tile read transposed (K-major in registers): x^T @ dy without a transpose copy.
            xt_KM = tl.load(x_ptr + rows_M[None, :] * stride_xa + k_K[:, None] * stride_xk,
                            mask=k_mask_K[:, None] & row_mask_M[None, :], other=0.0)
            dy_MN = tl.load(dy_ptr + rows_M[:, None] * stride_dya + cols_N[None, :] * stride_dyn,
                            mask=row_mask_M[:, None] & col_mask_N[None, :], other=0.0)
            if UPCAST:
                xt_KM, dy_MN = xt_KM.to(tl.float32), dy_MN.to(tl.float32)
            acc_KN = tl.dot(xt_KM, dy_MN, acc_KN, input_precision=PRECISION)
        dw_ptrs = dw_ptr + expert.to(tl.int64) * stride_dwe + k_K[:, None] * stride_dwk + cols_N[None, :] * stride_dwn
        tl.store(dw_ptrs, acc_KN.to(dw_ptr.dtype.element_ty), mask=k_mask_K[:, None] & col_mask_N[None, :])


def _check_offsets(offsets_E1: Tensor, num_experts: int, device: torch.device) -> None:
    if offsets_E1.dtype != torch.int64:
        raise ValueError(f"offsets_E1 must be int64, got {offsets_E1.dtype}")
    if offsets_E1.shape != (num_experts + 1,):
        raise ValueError(f"offsets_E1 must have shape (E + 1,) = ({num_experts + 1},), got {tuple(offsets_E1.shape)}")
    if offsets_E1.device != device:
        raise ValueError(f"offsets_E1 is on {offsets_E1.device} but the rows are on {device}")


def _check_mm_args(x_AK: Tensor, w_EKN: Tensor, offsets_E1: Tensor) -> None:
    """Raise ``ValueError`` naming the first bad argument (shapes, dtypes, devices; not values)."""
    if x_AK.dim() != 2:
        raise ValueError(f"x_AK must be 2-D (A, K), got shape {tuple(x_AK.shape)}")
    if w_EKN.dim() != 3:
        raise ValueError(f"w_EKN must be 3-D (E, K, N), got shape {tuple(w_EKN.shape)}")
    if w_EKN.shape[0] == 0:
        raise ValueError("w_EKN must hold at least one expert, got E = 0")
    if w_EKN.shape[1] != x_AK.shape[1]:
        raise ValueError(f"w_EKN has K = {w_EKN.shape[1]} but x_AK has K = {x_AK.shape[1]}")
    if x_AK.dtype not in _DTYPES:
        raise ValueError(f"x_AK must be float32, float16 or bfloat16, got {x_AK.dtype}")
    if w_EKN.dtype != x_AK.dtype:
        raise ValueError(f"w_EKN has dtype {w_EKN.dtype} but x_AK has {x_AK.dtype}")
    if w_EKN.device != x_AK.device:
        raise ValueError(f"w_EKN is on {w_EKN.device} but x_AK is on {x_AK.device}")
    _check_offsets(offsets_E1, w_EKN.shape[0], x_AK.device)


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def _dot_precision(x: Tensor, precision: str) -> str | None:
    # Precision only means something for float32 operands; 16-bit ones take the backend's default.
    return precision if x.dtype == torch.float32 else None


def _upcast(x: Tensor) -> bool:
    # The interpreter's tl.dot multiplies bfloat16's raw uint16 bits (garbage), so there the operands
    # are widened to float32 first: exact, and the same float32 accumulation as on GPU.
    return interpreting() and x.dtype == torch.bfloat16


def _launch_grouped_mm(x_AK: Tensor, w_EKN: Tensor, offsets_E1: Tensor, precision: str) -> Tensor:
    """Check, allocate ``y_AN`` (x's dtype) and launch the forward kernel."""
    _check_mm_args(x_AK, w_EKN, offsets_E1)
    _check_precision(precision)
    require_triton(x_AK, w_EKN, offsets_E1)
    (A, K), (E, _, N) = x_AK.shape, w_EKN.shape
    y_AN = x_AK.new_empty(A, N)
    if y_AN.numel() == 0:
        return y_AN

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(A, meta["BLOCK_M"]) + E, triton.cdiv(N, meta["BLOCK_N"])

    _grouped_mm_kernel[grid](
        x_AK, w_EKN, y_AN, offsets_E1, E, N, K, *x_AK.stride(), *w_EKN.stride(), *y_AN.stride(),
        BLOCK_E=max(2, triton.next_power_of_2(E)),
        PRECISION=_dot_precision(x_AK, precision), UPCAST=_upcast(x_AK),
    )
    return y_AN


def _launch_grouped_wgrad(x_AK: Tensor, dy_AN: Tensor, offsets_E1: Tensor, precision: str) -> Tensor:
    """Check, allocate ``dw_EKN`` (x's dtype) and launch the weight-gradient kernel."""
    if x_AK.dim() != 2 or dy_AN.dim() != 2 or dy_AN.shape[0] != x_AK.shape[0]:
        raise ValueError(f"x_AK and dy_AN must be 2-D with equal rows, got {tuple(x_AK.shape)}, {tuple(dy_AN.shape)}")
    if dy_AN.dtype != x_AK.dtype or x_AK.dtype not in _DTYPES:
        raise ValueError(f"x_AK and dy_AN must share a float dtype, got {x_AK.dtype} and {dy_AN.dtype}")
    if offsets_E1.dim() != 1 or offsets_E1.shape[0] < 2:
        raise ValueError(f"offsets_E1 must be 1-D with E + 1 >= 2 entries, got shape {tuple(offsets_E1.shape)}")
    _check_offsets(offsets_E1, offsets_E1.shape[0] - 1, x_AK.device)
    _check_precision(precision)
    require_triton(x_AK, dy_AN, offsets_E1)
    K, N, E = x_AK.shape[1], dy_AN.shape[1], offsets_E1.shape[0] - 1
    dw_EKN = x_AK.new_empty(E, K, N)
    if dw_EKN.numel() == 0:
        return dw_EKN

    def grid(meta: dict) -> tuple[int, int, int]:
        return triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(N, meta["BLOCK_N"]), E

    _grouped_wgrad_kernel[grid](
        x_AK, dy_AN, dw_EKN, offsets_E1, N, K, *x_AK.stride(), *dy_AN.stride(), *dw_EKN.stride(),
        PRECISION=_dot_precision(x_AK, precision), UPCAST=_upcast(x_AK),
    )
    return dw_EKN


# No device_types: the same kernels run on CUDA, and on CPU tensors under TRITON_INTERPRET=1.
@torch.library.custom_op("lightning_moe::grouped_mm", mutates_args=())
def _grouped_mm_op(x_AK: Tensor, w_EKN: Tensor, offsets_E1: Tensor, precision: str) -> Tensor:
    return _launch_grouped_mm(x_AK, w_EKN, offsets_E1, precision)


@_grouped_mm_op.register_fake
def _grouped_mm_fake(x_AK: Tensor, w_EKN: Tensor, offsets_E1: Tensor, precision: str) -> Tensor:
    _check_mm_args(x_AK, w_EKN, offsets_E1)
    _check_precision(precision)
    return x_AK.new_empty(x_AK.shape[0], w_EKN.shape[2])


@torch.library.custom_op("lightning_moe::grouped_mm_wgrad", mutates_args=())
def _grouped_wgrad_op(x_AK: Tensor, dy_AN: Tensor, offsets_E1: Tensor, precision: str) -> Tensor:
    return _launch_grouped_wgrad(x_AK, dy_AN, offsets_E1, precision)


@_grouped_wgrad_op.register_fake
def _grouped_wgrad_fake(x_AK: Tensor, dy_AN: Tensor, offsets_E1: Tensor, precision: str) -> Tensor:
    return x_AK.new_empty(offsets_E1.shape[0] - 1, x_AK.shape[1], dy_AN.shape[1])


def _grouped_mm_setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    x_AK, w_EKN, offsets_E1, precision = inputs
    ctx.save_for_backward(x_AK, w_EKN, offsets_E1)
    ctx.precision = precision


def _grouped_mm_backward(ctx, dy_AN: Tensor) -> tuple:
    """``dx[rows_e] = dy[rows_e] @ w[e]^T`` (the forward kernel on w's transposed view, no copy);
    ``dw[e] = x[rows_e]^T @ dy[rows_e]``."""
    x_AK, w_EKN, offsets_E1 = ctx.saved_tensors
    dx_AK = dw_EKN = None
    if ctx.needs_input_grad[0]:
        dx_AK = _grouped_mm_op(dy_AN, w_EKN.transpose(1, 2), offsets_E1, ctx.precision)
    if ctx.needs_input_grad[1]:
        dw_EKN = _grouped_wgrad_op(x_AK, dy_AN, offsets_E1, ctx.precision)
    return dx_AK, dw_EKN, None, None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup_context)


def grouped_mm(x_AK: Tensor, w_EKN: Tensor, offsets_E1: Tensor, *, precision: str = "ieee") -> Tensor:
    """``y[rows_e] = x[rows_e] @ w[e]`` for rows ``offsets[e]:offsets[e + 1]``, in Triton, ``(A, N)``.

    Args:
        x_AK: rows sorted by expert, float32, float16 or bfloat16.
        w_EKN: one (K, N) weight per expert, x's dtype; any strides.
        offsets_E1: int64 (E + 1,), ``offsets[0] = 0``, ``offsets[E] = A``, nondecreasing; experts may
            own no rows. The values are not checked (that would wait on the GPU); rows outside
            ``offsets[0]:offsets[E]`` are left unwritten.
        precision: how ``tl.dot`` treats float32 inputs: ``"ieee"`` (exact float32, the default, so
            results match the reference to ~1e-6), ``"tf32"`` (much faster on GPU tensor cores,
            ~1e-3 relative) or ``"tf32x3"``. Ignored for 16-bit inputs. Accumulation is float32.

    Returns ``(A, N)`` in x's dtype; differentiable in x and w. Raises ``ValueError`` naming a bad
    argument, ``RuntimeError`` when Triton cannot run on these tensors.
    """
    return _grouped_mm_op(x_AK, w_EKN, offsets_E1, precision)


def grouped_mm_reference(x_AK: Tensor, w_EKN: Tensor, offsets_E1: Tensor) -> Tensor:
    """Plain PyTorch twin of :func:`grouped_mm`, ``(A, N)``: its test oracle and fallback.

    Reads the offsets on the host (a sync), so it also checks their values.
    """
    _check_mm_args(x_AK, w_EKN, offsets_E1)
    bounds = offsets_E1.tolist()
    counts = [end - begin for begin, end in zip(bounds[:-1], bounds[1:], strict=True)]
    if bounds[0] != 0 or bounds[-1] != x_AK.shape[0] or min(counts) < 0:
        raise ValueError(f"offsets_E1 must rise from 0 to A = {x_AK.shape[0]}, got {bounds}")
    # split/unbind give one view per expert whose backward is one cat/stack, not E full-size zeros.
    y_parts = [x_NK @ w_KN for x_NK, w_KN in zip(x_AK.split(counts), w_EKN.unbind(0), strict=True)]
    return torch.cat(y_parts)


def grouped_swiglu(
    x_AD: Tensor, w_gate_EDF: Tensor, w_up_EDF: Tensor, w_out_EFD: Tensor, offsets_E1: Tensor,
    *, precision: str = "ieee",
) -> Tensor:
    """Each expert's SwiGLU MLP on its rows, ``(A, D)``: ``(silu(x W_gate) * (x W_up)) W_out``.

    Same layout as ``SwiGLUExperts`` (``w_gate_EDF``, ``w_up_EDF`` (E, D, F), ``w_out_EFD``
    (E, F, D)); three :func:`grouped_mm` calls, the elementwise part in torch.
    """
    h_AF = F.silu(grouped_mm(x_AD, w_gate_EDF, offsets_E1, precision=precision)) * grouped_mm(
        x_AD, w_up_EDF, offsets_E1, precision=precision)
    return grouped_mm(h_AF, w_out_EFD, offsets_E1, precision=precision)


def grouped_swiglu_reference(
    x_AD: Tensor, w_gate_EDF: Tensor, w_up_EDF: Tensor, w_out_EFD: Tensor, offsets_E1: Tensor
) -> Tensor:
    """Plain PyTorch twin of :func:`grouped_swiglu`, ``(A, D)``."""
    h_AF = F.silu(grouped_mm_reference(x_AD, w_gate_EDF, offsets_E1)) * grouped_mm_reference(
        x_AD, w_up_EDF, offsets_E1)
    return grouped_mm_reference(h_AF, w_out_EFD, offsets_E1)
