"""Permute / unpermute kernels against their plain PyTorch references, the grouped dispatcher's
index_select / index_add, and ``loop_dispatch`` end to end; outputs and every gradient.

Legend: ``T`` tokens, ``D`` model width, ``E`` experts, ``K`` experts per token, ``A`` assignments.
Shapes are small: without a GPU the kernels run under Triton's interpreter (see conftest.py).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from lightning_moe.dispatch import loop_dispatch
from lightning_moe.experts import SwiGLUExperts
from lightning_moe.kernels.permute import (
    DispatchPlan,
    make_plan,
    permute,
    permute_reference,
    unpermute,
    unpermute_reference,
)
from lightning_moe.routing.routing import Routing

# The module itself (a package __init__ re-exporting the function `permute` would shadow it as an attribute).
permute_module = importlib.import_module("lightning_moe.kernels.permute")

T, E, K = 12, 5, 2
KINDS = ["token_major", "shuffled", "empty_experts", "dropped", "expert_choice", "none"]


def _assignments(kind: str, num_tokens: int = T, num_experts: int = E, top_k: int = K, seed: int = 0):
    """``(token_A, expert_A)`` of one routing pattern."""
    gen = torch.Generator(torch.get_default_device()).manual_seed(seed)
    if kind == "expert_choice":  # each expert picks 4 tokens: a token gets 0..E assignments
        token_A = torch.cat([torch.randperm(num_tokens, generator=gen)[:4] for _ in range(num_experts)])
        return token_A, torch.arange(num_experts).repeat_interleave(4)
    token_A = torch.arange(num_tokens).repeat_interleave(top_k)
    pool = 2 if kind == "empty_experts" else num_experts  # experts 2.. get nothing
    expert_A = torch.stack([torch.randperm(pool, generator=gen)[:top_k] for _ in range(num_tokens)]).flatten()
    if kind in ("shuffled", "dropped"):
        order_A = torch.randperm(token_A.shape[0], generator=gen)
        token_A, expert_A = token_A[order_A], expert_A[order_A]
    if kind == "dropped":  # capacity drops: token 0 loses all its assignments, others some
        keep_A = (torch.rand(token_A.shape[0], generator=gen) < 0.7) & (token_A != 0)
        token_A, expert_A = token_A[keep_A], expert_A[keep_A]
    if kind == "none":
        token_A, expert_A = token_A[:0], expert_A[:0]
    return token_A, expert_A


def _grouped_layout(token_A, expert_A):
    """The grouped dispatcher's expert order: tokens of the expert-sorted rows, and the sort."""
    order_A = torch.argsort(expert_A, stable=True)
    return token_A[order_A], order_A


@pytest.mark.parametrize("kind", KINDS)
def test_make_plan_matches_brute_force(kind):
    token_A, expert_A = _assignments(kind)
    plan = make_plan(token_A, expert_A, T, E)
    tokens, experts = token_A.tolist(), expert_A.tolist()
    by_expert = sorted(range(len(tokens)), key=lambda a: (experts[a], a))  # stable sort by expert
    by_token = sorted(range(len(tokens)), key=lambda a: (tokens[a], a))
    counts = [experts.count(e) for e in range(E)]
    per_token = [tokens.count(t) for t in range(T)]
    assert plan.counts_E.tolist() == counts
    assert plan.offsets_E1.tolist() == [sum(counts[:e]) for e in range(E + 1)]
    assert plan.src_token_A.tolist() == [tokens[a] for a in by_expert]
    assert plan.token_order_A.tolist() == by_token
    assert plan.row_A.tolist() == [by_expert.index(a) for a in by_token]
    assert plan.token_ptr_T1.tolist() == [sum(per_token[:t]) for t in range(T + 1)]
    assert all(p.dtype == torch.int64 for p in vars(plan).values())


def _case_params():
    cases = [(d, dtype) for d in (1, 5, 33, 130) for dtype in (torch.float32, torch.bfloat16)]
    return [*cases, (33, torch.float16)]


def _assert_close(actual, expected, dtype):
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize(("D", "dtype"), _case_params(), ids=str)
def test_forward_matches_reference_and_grouped_dispatch(D, dtype):
    token_A, expert_A = _assignments("dropped", seed=D)
    plan = make_plan(token_A, expert_A, T, E)
    gen = torch.Generator(torch.get_default_device()).manual_seed(1)
    x_TD = torch.randn(T, D, generator=gen).to(dtype)
    out_AD = torch.randn(token_A.shape[0], D, generator=gen).to(dtype)
    weight_A = torch.rand(token_A.shape[0], generator=gen)

    x_AD = permute(x_TD, plan)
    assert torch.equal(x_AD, permute_reference(x_TD, plan))  # a gather is exact in any dtype
    sorted_token_A, order_A = _grouped_layout(token_A, expert_A)
    assert torch.equal(x_AD, x_TD.index_select(0, sorted_token_A))

    y_TD = unpermute(out_AD, weight_A[plan.token_order_A], plan)
    assert y_TD.dtype == dtype and y_TD.shape == (T, D)
    _assert_close(y_TD, unpermute_reference(out_AD, weight_A[plan.token_order_A], plan), dtype)
    weighted_AD = out_AD.float() * weight_A[order_A].unsqueeze(-1)
    grouped_TD = torch.zeros(T, D).index_add(0, sorted_token_A, weighted_AD).to(dtype)
    _assert_close(y_TD, grouped_TD, dtype)
    assert torch.equal(y_TD[0], torch.zeros(D, dtype=dtype))  # token 0 was dropped: exact zeros


@pytest.mark.parametrize(("D", "dtype"), _case_params(), ids=str)
def test_gradients_match_reference(D, dtype):
    token_A, expert_A = _assignments("expert_choice" if D % 2 else "shuffled", seed=D)
    plan = make_plan(token_A, expert_A, T, E)
    gen = torch.Generator(torch.get_default_device()).manual_seed(2)
    x_TD = torch.randn(T, D, generator=gen).to(dtype).requires_grad_()
    out_AD = torch.randn(token_A.shape[0], D, generator=gen).to(dtype).requires_grad_()
    weight_A = torch.rand(token_A.shape[0], generator=gen).requires_grad_()
    grad_x_AD = torch.randn(token_A.shape[0], D, generator=gen).to(dtype)
    grad_y_TD = torch.randn(T, D, generator=gen).to(dtype)

    def grads(permute_fn, unpermute_fn):
        x_AD = permute_fn(x_TD, plan)
        y_TD = unpermute_fn(out_AD, weight_A[plan.token_order_A], plan)
        return torch.autograd.grad((x_AD, y_TD), (x_TD, out_AD, weight_A), (grad_x_AD, grad_y_TD))

    actual = grads(permute, unpermute)
    expected = grads(permute_reference, unpermute_reference)
    for name, a, e in zip(("x", "out", "weight"), actual, expected, strict=True):
        assert a.dtype == e.dtype, name
        _assert_close(a.float(), e.float(), dtype if name != "weight" else torch.float32)


def test_no_assignments():
    plan = make_plan(*_assignments("none"), T, E)
    x_TD = torch.randn(T, 7, requires_grad=True)
    weight_A = torch.zeros(0, requires_grad=True)
    x_AD = permute(x_TD, plan)
    y_TD = unpermute(x_AD * 2, weight_A, plan)
    assert x_AD.shape == (0, 7) and torch.equal(y_TD, torch.zeros(T, 7))
    grad_x, grad_w = torch.autograd.grad(y_TD, (x_TD, weight_A), torch.randn(T, 7))
    assert torch.equal(grad_x, torch.zeros(T, 7)) and grad_w.shape == (0,)


def test_int32_plan_indices_give_the_same_result():
    plan = make_plan(*_assignments("dropped"), T, E)
    plan32 = DispatchPlan(**{name: t.int() for name, t in vars(plan).items()})
    x_TD, weight_A = torch.randn(T, 3), torch.rand(plan.row_A.shape[0])
    assert torch.equal(permute(x_TD, plan32), permute(x_TD, plan))
    x_AD = permute(x_TD, plan)
    assert torch.equal(unpermute(x_AD, weight_A, plan32), unpermute(x_AD, weight_A, plan))


def test_end_to_end_matches_loop_dispatch():
    D, F = 6, 10
    token_A, expert_A = _assignments("dropped", num_experts=4, seed=3)
    gen = torch.Generator(torch.get_default_device()).manual_seed(3)
    torch.manual_seed(3)
    experts = SwiGLUExperts(D, F, 4)
    x_TD = torch.randn(T, D, generator=gen, requires_grad=True)
    weight_A = torch.rand(token_A.shape[0], generator=gen, requires_grad=True)
    routing = Routing(torch.full((T, 4), 0.25), torch.zeros(T, 4), token_A, expert_A, weight_A)
    grad_y_TD = torch.randn(T, D, generator=gen)
    params = (x_TD, weight_A, *experts.parameters())

    plan = make_plan(token_A, expert_A, T, 4)
    out_AD = experts.grouped_forward(permute(x_TD, plan), plan.counts_E.tolist())
    y_TD = unpermute(out_AD, weight_A[plan.token_order_A], plan)
    y_ref_TD = loop_dispatch(x_TD, routing, experts)
    torch.testing.assert_close(y_TD, y_ref_TD, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(y_TD, params, grad_y_TD)
    grads_ref = torch.autograd.grad(y_ref_TD, params, grad_y_TD)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


def test_torch_compile_fullgraph_and_opcheck():
    D = 9
    token_A, expert_A = _assignments("shuffled", seed=4)
    gen = torch.Generator(torch.get_default_device()).manual_seed(4)
    x_TD = torch.randn(T, D, generator=gen, requires_grad=True)
    weight_A = torch.rand(token_A.shape[0], generator=gen, requires_grad=True)

    def moe(x_TD, token_A, expert_A, weight_A, permute_fn, unpermute_fn):
        plan = make_plan(token_A, expert_A, T, E)
        return unpermute_fn(permute_fn(x_TD, plan).sin(), weight_A[plan.token_order_A], plan)

    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    y_TD = compiled(x_TD, token_A, expert_A, weight_A, permute, unpermute)
    y_ref_TD = moe(x_TD, token_A, expert_A, weight_A, permute_reference, unpermute_reference)
    torch.testing.assert_close(y_TD, y_ref_TD, atol=1e-6, rtol=1e-6)
    grads = torch.autograd.grad(y_TD.square().sum(), (x_TD, weight_A))
    grads_ref = torch.autograd.grad(y_ref_TD.square().sum(), (x_TD, weight_A))
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)

    plan = make_plan(token_A, expert_A, T, E)
    A = token_A.shape[0]
    index = (plan.src_token_A, plan.row_A, plan.token_ptr_T1)
    out_AD = torch.randn(A, D, generator=gen, requires_grad=True)
    w_A = torch.rand(A, generator=gen, requires_grad=True)
    torch.library.opcheck(permute_module._permute_fwd, (x_TD, *index))
    torch.library.opcheck(permute_module._permute_bwd, (torch.randn(A, D), plan.row_A, plan.token_ptr_T1))
    torch.library.opcheck(permute_module._unpermute_fwd, (out_AD, w_A, *index))
    torch.library.opcheck(permute_module._unpermute_bwd,
                          (torch.randn(T, D), out_AD.detach(), w_A.detach(), plan.src_token_A, plan.row_A))


def _bad_calls():
    plan = make_plan(*_assignments("token_major"), T, E)
    A = T * K
    x_TD, out_AD, w_A = torch.randn(T, 4), torch.randn(A, 4), torch.rand(A)
    short = DispatchPlan(**{**vars(plan), "row_A": plan.row_A[:-1]})
    no_ptr = DispatchPlan(**{**vars(plan), "token_ptr_T1": plan.token_ptr_T1[:0]})
    return [
        ("x_TD", lambda: permute(torch.randn(T), plan)),
        ("x_TD", lambda: permute(x_TD.long(), plan)),
        ("row_A", lambda: permute(x_TD, short)),
        ("token_ptr_T1", lambda: unpermute(out_AD, w_A, no_ptr)),
        ("src_token_A", lambda: permute(x_TD, DispatchPlan(**{**vars(plan), "src_token_A": w_A}))),
        ("out_AD", lambda: unpermute(out_AD[1:], w_A, plan)),
        ("weight_A", lambda: unpermute(out_AD, w_A[1:], plan)),
        ("weight_A", lambda: unpermute(out_AD, w_A.half(), plan)),
        ("expert_A", lambda: make_plan(plan.src_token_A, plan.src_token_A[1:], T, E)),
        ("num_experts", lambda: make_plan(plan.src_token_A, plan.src_token_A, T, 0)),
        ("num_tokens", lambda: make_plan(plan.src_token_A, plan.src_token_A, -1, E)),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_shapes_raise_value_error_naming_the_argument(index):
    name, call = _bad_calls()[index]
    with pytest.raises(ValueError, match=f"`{name}`"):
        call()


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_large_matches_reference(dtype):
    num_tokens, D, top_k, num_experts = 4096, 512, 8, 64
    token_A, expert_A = _assignments("shuffled", num_tokens, num_experts, top_k, seed=5)
    token_A, expert_A = token_A.cuda(), expert_A.cuda()
    plan = make_plan(token_A, expert_A, num_tokens, num_experts)
    x_TD = torch.randn(num_tokens, D, device="cuda", dtype=dtype, requires_grad=True)
    out_AD = torch.randn(token_A.shape[0], D, device="cuda", dtype=dtype, requires_grad=True)
    weight_A = torch.rand(token_A.shape[0], device="cuda", requires_grad=True)
    grad_x_AD, grad_y_TD = torch.randn_like(out_AD), torch.randn_like(x_TD)

    def run(permute_fn, unpermute_fn):
        x_AD = permute_fn(x_TD, plan)
        y_TD = unpermute_fn(out_AD, weight_A[plan.token_order_A], plan)
        grads = torch.autograd.grad((x_AD, y_TD), (x_TD, out_AD, weight_A), (grad_x_AD, grad_y_TD))
        return x_AD, y_TD, *grads

    actual, expected = run(permute, unpermute), run(permute_reference, unpermute_reference)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, e in zip(actual, expected, strict=True):
        # bfloat16 sums of 8 terms of size ~10 differ by an ulp (0.0625) with the summation order.
        scale = max(1.0, e.float().abs().max().item()) if dtype == torch.bfloat16 else 1.0
        torch.testing.assert_close(a.float(), e.float(), atol=tol * scale, rtol=tol)
    assert torch.equal(run(permute, unpermute)[1], actual[1])  # gather-reduce: bitwise deterministic


@pytest.mark.gpu
@gpu
def test_cuda_plan_and_ops_do_not_sync():
    token_A, expert_A = _assignments("dropped", 256, 16, 4, seed=6)
    token_A, expert_A = token_A.cuda(), expert_A.cuda()
    x_TD = torch.randn(256, 64, device="cuda")
    weight_A = torch.rand(token_A.shape[0], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        plan = make_plan(token_A, expert_A, 256, 16)
        unpermute(permute(x_TD, plan), weight_A[plan.token_order_A], plan)
    finally:
        torch.cuda.set_sync_debug_mode("default")
