"""Triton grouped GEMM against its PyTorch reference: outputs and every gradient.

Legend: ``A`` rows sorted by expert, ``K`` input width, ``N`` output width, ``E`` experts, ``E1`` = E + 1
offsets, ``D`` model width, ``F`` expert hidden width. On CPU the kernels run under the Triton
interpreter (``conftest.py``), so shapes stay small; widths are not multiples of the blocks.
"""

import pytest
import torch

from lightning_moe.experts.swiglu import SwiGLUExperts
from lightning_moe.kernels.grouped_gemm import (
    grouped_mm,
    grouped_mm_reference,
    grouped_swiglu,
    grouped_swiglu_reference,
)

K, N = 20, 33  # not multiples of any block size


def _offsets(counts: list[int], device: str | None = None) -> torch.Tensor:
    return torch.tensor([0, *counts], dtype=torch.int64, device=device).cumsum(0)


def _inputs(counts: list[int], k: int = K, n: int = N, dtype=torch.float32, device: str | None = None):
    x_AK = torch.randn(sum(counts), k, dtype=dtype, device=device, requires_grad=True)
    w_EKN = (torch.randn(len(counts), k, n, device=device) / k**0.5).to(dtype).requires_grad_()
    return x_AK, w_EKN, _offsets(counts, device)


def _grads(y: torch.Tensor, inputs: tuple, dy: torch.Tensor) -> tuple:
    return torch.autograd.grad(y, inputs, dy)


def _assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Norm-wise relative error, for 16-bit results whose elementwise rounding varies."""
    error = (actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)
    assert error < tol, f"relative error {error:.3g} >= {tol}"


@pytest.mark.parametrize(
    "counts",
    [
        [0, 5, 0, 17, 9, 0],  # first, middle and last experts empty
        [37],  # one expert
        [0, 0, 0],  # A = 0
        [1, 15, 16, 17, 33],  # around the interpreter's BLOCK_M = 16
    ],
    ids=["empty-experts", "one-expert", "no-rows", "partial-tiles"],
)
def test_forward_matches_reference(counts):
    torch.manual_seed(0)
    x_AK, w_EKN, offsets_E1 = _inputs(counts)
    y_AN = grouped_mm(x_AK, w_EKN, offsets_E1)
    assert y_AN.shape == (sum(counts), N) and y_AN.dtype == x_AK.dtype
    torch.testing.assert_close(y_AN, grouped_mm_reference(x_AK, w_EKN, offsets_E1), rtol=1e-5, atol=1e-5)


def test_backward_matches_reference_and_empty_experts_get_zero_dw():
    torch.manual_seed(1)
    counts = [0, 5, 0, 17, 9, 0]
    x_AK, w_EKN, offsets_E1 = _inputs(counts)
    dy_AN = torch.randn(sum(counts), N)
    dx_AK, dw_EKN = _grads(grouped_mm(x_AK, w_EKN, offsets_E1), (x_AK, w_EKN), dy_AN)
    ref_dx_AK, ref_dw_EKN = _grads(grouped_mm_reference(x_AK, w_EKN, offsets_E1), (x_AK, w_EKN), dy_AN)
    torch.testing.assert_close(dx_AK, ref_dx_AK, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw_EKN, ref_dw_EKN, rtol=1e-5, atol=1e-5)
    assert torch.equal(dw_EKN[[0, 2, 5]], torch.zeros(3, K, N))


def test_no_rows_backward_gives_zero_dw():
    x_AK, w_EKN, offsets_E1 = _inputs([0, 0])
    (dw_EKN,) = _grads(grouped_mm(x_AK, w_EKN, offsets_E1).sum(), (w_EKN,), torch.tensor(1.0))
    assert torch.equal(dw_EKN, torch.zeros_like(w_EKN))


def test_strided_inputs_need_no_copy():
    """A weight stored (E, N, K) used through its transposed view, rows with a column stride, and a
    stride-0 upstream gradient (what ``y.sum()`` sends back)."""
    torch.manual_seed(2)
    counts = [4, 0, 13]
    w_ENK = torch.randn(3, N, K, requires_grad=True)
    x_KA = torch.randn(K, sum(counts), requires_grad=True)
    offsets_E1 = _offsets(counts)
    args = (x_KA.t(), w_ENK.transpose(1, 2), offsets_E1)
    dy_AN = torch.randn(N).expand(sum(counts), N)
    y_AN = grouped_mm(*args)
    torch.testing.assert_close(y_AN, grouped_mm_reference(*args), rtol=1e-5, atol=1e-5)
    for grad, ref in zip(_grads(y_AN, (x_KA, w_ENK), dy_AN),
                         _grads(grouped_mm_reference(*args), (x_KA, w_ENK), dy_AN), strict=True):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_and_backward(dtype):
    """16-bit in and out, float32 accumulation: compare with the float32 reference on the same values."""
    torch.manual_seed(3)
    counts = [6, 0, 19]
    x_AK, w_EKN, offsets_E1 = _inputs(counts, dtype=dtype)
    x32_AK, w32_EKN = (t.detach().float().requires_grad_() for t in (x_AK, w_EKN))
    dy_AN = torch.randn(sum(counts), N, dtype=dtype)
    y_AN = grouped_mm(x_AK, w_EKN, offsets_E1)
    ref_AN = grouped_mm_reference(x32_AK, w32_EKN, offsets_E1)
    assert y_AN.dtype == dtype
    _assert_rel_close(y_AN, ref_AN, 1e-2)
    grads = _grads(y_AN, (x_AK, w_EKN), dy_AN)
    for grad, ref in zip(grads, _grads(ref_AN, (x32_AK, w32_EKN), dy_AN.float()), strict=True):
        assert grad.dtype == dtype
        _assert_rel_close(grad, ref, 1e-2)


def _swiglu_case(counts: list[int], d_model: int = 20, d_ff: int = 24):
    experts = SwiGLUExperts(d_model, d_ff, num_experts=len(counts))
    x_AD = torch.randn(sum(counts), d_model, requires_grad=True)
    weights = (experts.w_gate_EDF, experts.w_up_EDF, experts.w_out_EFD)
    return experts, x_AD, weights, _offsets(counts)


def test_grouped_swiglu_matches_reference_and_swiglu_experts():
    torch.manual_seed(4)
    counts = [3, 0, 10, 6]
    experts, x_AD, weights, offsets_E1 = _swiglu_case(counts)
    inputs = (x_AD, *weights)
    dy_AD = torch.randn(sum(counts), x_AD.shape[1])
    outputs = [
        grouped_swiglu(x_AD, *weights, offsets_E1),
        grouped_swiglu_reference(x_AD, *weights, offsets_E1),
        experts.grouped_forward(x_AD, counts),
    ]
    grads = [_grads(y_AD, inputs, dy_AD) for y_AD in outputs]
    for y_AD, grads_y in zip(outputs[1:], grads[1:], strict=True):
        torch.testing.assert_close(outputs[0], y_AD, rtol=1e-5, atol=1e-5)
        for grad, other in zip(grads[0], grads_y, strict=True):  # x, w_gate, w_up, w_out
            torch.testing.assert_close(grad, other, rtol=1e-5, atol=1e-5)


def test_compiles_without_graph_breaks():
    torch.manual_seed(5)
    torch._dynamo.reset()
    counts = [5, 0, 8]
    _, x_AD, weights, offsets_E1 = _swiglu_case(counts, d_model=16, d_ff=16)

    def loss(x_AD, *weights):
        return grouped_swiglu(x_AD, *weights, offsets_E1).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    inputs = (x_AD, *weights)
    for grad, ref in zip(torch.autograd.grad(compiled(*inputs), inputs),
                         torch.autograd.grad(loss(*inputs), inputs), strict=True):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5)


def test_opcheck():
    """Schema, fake tensor and autograd registration of the custom op, as torch.library checks them."""
    torch.manual_seed(6)
    x_AK, w_EKN, offsets_E1 = _inputs([3, 0, 6], k=16, n=16)
    torch.library.opcheck(torch.ops.lightning_moe.grouped_mm, (x_AK, w_EKN, offsets_E1, "ieee"))
    dy_AN = torch.randn(9, 16)
    torch.library.opcheck(torch.ops.lightning_moe.grouped_mm_wgrad, (x_AK.detach(), dy_AN, offsets_E1, "ieee"))


@pytest.mark.parametrize(
    ("change", "name"),
    [
        (lambda x, w, o: (x, w[0], o), "w_EKN"),  # w not 3-D
        (lambda x, w, o: (x[None], w, o), "x_AK"),  # x not 2-D
        (lambda x, w, o: (x[:, :-1], w, o), "K"),  # K mismatch
        (lambda x, w, o: (x, w.double(), o), "w_EKN"),  # dtype mismatch
        (lambda x, w, o: (x, w, o[:-1]), "offsets_E1"),  # wrong length
        (lambda x, w, o: (x, w, o.int()), "offsets_E1"),  # wrong dtype
    ],
    ids=["w-not-3d", "x-not-2d", "k-mismatch", "w-dtype", "offsets-length", "offsets-dtype"],
)
def test_bad_inputs_raise_value_error_naming_the_argument(change, name):
    x_AK, w_EKN, offsets_E1 = _inputs([2, 3])
    args = change(x_AK.detach(), w_EKN.detach(), offsets_E1)
    for fn in (grouped_mm, grouped_mm_reference):
        with pytest.raises(ValueError, match=name):
            fn(*args)


def test_bad_precision_and_bad_offset_values_raise():
    x_AK, w_EKN, offsets_E1 = _inputs([2, 3])
    with pytest.raises(ValueError, match="precision"):
        grouped_mm(x_AK, w_EKN, offsets_E1, precision="fp64")
    with pytest.raises(ValueError, match="offsets_E1"):  # only the reference reads the values
        grouped_mm_reference(x_AK, w_EKN, torch.tensor([0, 4, 3]))


# --- GPU: realistic sizes, float32 tight and bfloat16 loose, forward and backward ------------------

def _uneven_counts(num_rows: int, num_experts: int) -> list[int]:
    probs_E = torch.rand(num_experts) ** 3  # skewed: a few heavy experts, some nearly idle
    probs_E[num_experts // 2] = 0.0  # and one empty expert
    expert_ids = torch.multinomial(probs_E, num_rows, replacement=True)
    return torch.bincount(expert_ids, minlength=num_experts).tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_experts", [8, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_reference(num_experts, dtype):
    torch.manual_seed(7)
    counts = _uneven_counts(4096, num_experts)
    x_AK, w_EKN, offsets_E1 = _inputs(counts, k=512, n=1024, dtype=dtype, device="cuda")
    x32_AK, w32_EKN = (t.detach().float().requires_grad_() for t in (x_AK, w_EKN))
    dy_AN = torch.randn(4096, 1024, dtype=dtype, device="cuda")
    y_AN = grouped_mm(x_AK, w_EKN, offsets_E1)
    ref_AN = grouped_mm_reference(x32_AK, w32_EKN, offsets_E1)
    grads = _grads(y_AN, (x_AK, w_EKN), dy_AN)
    ref_grads = _grads(ref_AN, (x32_AK, w32_EKN), dy_AN.float())
    for actual, expected in zip((y_AN, *grads), (ref_AN, *ref_grads), strict=True):
        assert actual.dtype == dtype
        if dtype == torch.float32:
            scale = expected.abs().max().item()
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * scale)
        else:
            _assert_rel_close(actual, expected, 1e-2)
    assert torch.equal(grads[1][num_experts // 2], torch.zeros_like(grads[1][0]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_forward_and_backward_do_not_sync():
    torch.manual_seed(8)
    x_AK, w_EKN, offsets_E1 = _inputs(_uneven_counts(1024, 8), k=256, n=256, device="cuda")
    grouped_mm(x_AK, w_EKN, offsets_E1).sum().backward()  # autotuning syncs: warm up first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        grouped_mm(x_AK, w_EKN, offsets_E1).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
