"""Fused top-k gating kernel against its plain PyTorch reference and ``TopKRouter``: outputs and gradients.

Legend: ``T`` tokens, ``D`` model width, ``E`` experts, ``K`` experts per token.
Shapes are small: without a GPU the kernels run under Triton's interpreter (see conftest.py), where
each of the K top-k rounds costs a few milliseconds.
"""

from __future__ import annotations

import copy
import importlib
import itertools

import pytest
import torch

from lightning_moe.kernels.gating import fused_topk_gating, topk_gating_reference
from lightning_moe.routing import TopKRouter

gating = importlib.import_module("lightning_moe.kernels.gating")  # the private ops, for opcheck

# (score_func, renormalize, with_bias, scaling_factor): all 16 configurations.
CONFIGS = list(itertools.product(("softmax", "sigmoid"), (True, False), (False, True), (1.0, 2.5)))
SHAPES = [(T, E, K) for T in (1, 7, 33) for E in (3, 8, 60) for K in sorted({1, 2, E})]


def _inputs(T, E, with_bias, seed=0, scale=2.0):
    """``(logits_TE, bias_E or None)``; the bias is large enough to change some choices."""
    gen = torch.Generator(torch.get_default_device()).manual_seed(seed)
    logits_TE = torch.randn(T, E, generator=gen) * scale
    return logits_TE, (torch.randn(E, generator=gen) * 0.1 if with_bias else None)


def _assert_same(actual, expected, atol=1e-6):
    scores_TE, gates_TK, experts_TK = actual
    assert scores_TE.dtype == gates_TK.dtype == torch.float32 and experts_TK.dtype == torch.int64
    torch.testing.assert_close(scores_TE, expected[0], atol=atol, rtol=1e-5)
    torch.testing.assert_close(gates_TK, expected[1], atol=atol, rtol=1e-5)
    assert torch.equal(experts_TK, expected[2])


def _forward_cases():
    # Every shape under two configurations, every configuration under at least three shapes: the full
    # product (16 x 27) would take minutes in the interpreter.
    return [(shape, CONFIGS[(i + j * 5) % len(CONFIGS)]) for i, shape in enumerate(SHAPES) for j in range(2)]


@pytest.mark.parametrize(("shape", "config"), _forward_cases(), ids=str)
def test_forward_matches_reference(shape, config):
    (T, E, K), (score_func, renormalize, with_bias, scaling) = shape, config
    logits_TE, bias_E = _inputs(T, E, with_bias, seed=T * E + K)
    args = (K, score_func, bias_E, renormalize, scaling)
    _assert_same(fused_topk_gating(logits_TE, *args), topk_gating_reference(logits_TE, *args))


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_no_tokens(score_func):
    logits_TE = torch.randn(0, 8, requires_grad=True)
    scores_TE, gates_TK, experts_TK = fused_topk_gating(logits_TE, 2, score_func, torch.zeros(8))
    assert scores_TE.shape == (0, 8) and gates_TK.shape == (0, 2) and experts_TK.shape == (0, 2)
    (grad_TE,) = torch.autograd.grad((scores_TE.sum() + gates_TK.sum()), logits_TE)
    assert grad_TE.shape == (0, 8)


def _grads(gating_fn, logits_TE, args, grad_scores_TE, grad_gates_TK):
    """``d logits`` for upstream grads on the outputs given (None: that output unused)."""
    logits_TE = logits_TE.clone().requires_grad_()
    scores_TE, gates_TK, _ = gating_fn(logits_TE, *args)
    pairs = [(out, g) for out, g in ((scores_TE, grad_scores_TE), (gates_TK, grad_gates_TK)) if g is not None]
    outputs, grads = zip(*pairs, strict=True)
    return torch.autograd.grad(outputs, logits_TE, grads)[0]


@pytest.mark.parametrize("used", ["both", "scores", "gates"])
@pytest.mark.parametrize(("score_func", "renormalize"), list(itertools.product(("softmax", "sigmoid"), (True, False))))
def test_gradients_match_reference(score_func, renormalize, used):
    for T, E, K in ((7, 8, 2), (5, 3, 3), (9, 60, 1), (4, 20, 5)):
        logits_TE, bias_E = _inputs(T, E, with_bias=True, seed=E + K)
        gen = torch.Generator(torch.get_default_device()).manual_seed(K)
        grad_scores_TE = torch.randn(T, E, generator=gen) if used != "gates" else None
        grad_gates_TK = torch.randn(T, K, generator=gen) if used != "scores" else None
        args = (K, score_func, bias_E, renormalize, 2.5)
        actual = _grads(fused_topk_gating, logits_TE, args, grad_scores_TE, grad_gates_TK)
        expected = _grads(topk_gating_reference, logits_TE, args, grad_scores_TE, grad_gates_TK)
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_backward_op_treats_missing_gradients_as_zeros(score_func):
    logits_TE, _ = _inputs(7, 8, with_bias=False)
    experts_TK = logits_TE.topk(3, dim=-1).indices
    grad_scores_TE, grad_gates_TK = torch.randn(7, 8), torch.randn(7, 3)
    config = (score_func, True, 2.5)
    for given, zeros in (((None, grad_gates_TK), (torch.zeros(7, 8), grad_gates_TK)),
                         ((grad_scores_TE, None), (grad_scores_TE, torch.zeros(7, 3)))):
        actual = gating._topk_gating_bwd(*given, logits_TE, experts_TK, *config)
        torch.testing.assert_close(actual, gating._topk_gating_bwd(*zeros, logits_TE, experts_TK, *config))
    assert torch.equal(gating._topk_gating_bwd(None, None, logits_TE, experts_TK, *config), torch.zeros(7, 8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_are_computed_in_float32(dtype):
    logits_TE = _inputs(9, 12, with_bias=False)[0].to(dtype)
    args = (3, "softmax", None, True, 1.0)
    _assert_same(fused_topk_gating(logits_TE, *args), topk_gating_reference(logits_TE, *args))
    grad_gates_TK = torch.randn(9, 3)
    actual = _grads(fused_topk_gating, logits_TE, args, None, grad_gates_TK)
    expected = _grads(topk_gating_reference, logits_TE, args, None, grad_gates_TK)
    assert actual.dtype == dtype
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_extreme_logits_stay_finite_and_match(score_func):
    logits_TE = _inputs(6, 10, with_bias=False, scale=5.0)[0]
    logits_TE[0] = -60.0 + 0.5 * torch.arange(10.0)  # sigmoids ~1e-26: kept sum under the 1e-20 clamp
    logits_TE[1] = -60.0 + 7.0 * torch.arange(10.0)  # softmax ~one-hot, smallest entries ~1e-28
    args = (3, score_func, None, True, 2.5)
    _assert_same(fused_topk_gating(logits_TE, *args), topk_gating_reference(logits_TE, *args))
    grad_scores_TE, grad_gates_TK = torch.randn(6, 10), torch.randn(6, 3)
    for upstream in ((None, grad_gates_TK), (grad_scores_TE, grad_gates_TK)):
        actual = _grads(fused_topk_gating, logits_TE, args, *upstream)
        assert torch.isfinite(actual).all()
        torch.testing.assert_close(actual, _grads(topk_gating_reference, logits_TE, args, *upstream))


def test_ties_go_to_the_lowest_index():
    scores_TE, gates_TK, experts_TK = fused_topk_gating(torch.zeros(5, 6), 4, "sigmoid", scaling_factor=2.0)
    assert torch.equal(experts_TK, torch.arange(4).expand(5, 4))
    torch.testing.assert_close(gates_TK, torch.full((5, 4), 0.5))
    torch.testing.assert_close(scores_TE, torch.full((5, 6), 1 / 6))


@pytest.mark.parametrize(("score_func", "renormalize", "expert_bias", "scaling"),
                         [("softmax", True, False, 1.0), ("softmax", False, True, 1.0),
                          ("sigmoid", True, True, 2.5), ("sigmoid", False, False, 2.5)])
def test_matches_topk_router(score_func, renormalize, expert_bias, scaling):
    T, D, E, K = 20, 16, 12, 3
    torch.manual_seed(0)
    router = TopKRouter(D, E, K, renormalize, score_func=score_func, scaling_factor=scaling, expert_bias=expert_bias)
    if expert_bias:
        router.expert_bias_E.copy_(torch.randn(E) * 0.05)
    x_TD = torch.randn(T, D)
    routing = router(x_TD)
    logits_TE = router.scorer(x_TD)
    scores_TE, gates_TK, experts_TK = fused_topk_gating(logits_TE, K, score_func, router.expert_bias_E, renormalize,
                                                        scaling)
    expected = (routing.scores_TE, routing.weight_A.view(T, K), routing.expert_A.view(T, K))
    _assert_same((scores_TE, gates_TK, experts_TK), expected)
    # The same gradients reach the router's weights through either path.
    grad_scores_TE, grad_gates_TK = torch.randn(T, E), torch.randn(T, K)
    params = list(router.parameters())
    actual = torch.autograd.grad((scores_TE, gates_TK), params, (grad_scores_TE, grad_gates_TK))
    expected = torch.autograd.grad((routing.scores_TE, routing.weight_A.view(T, K)), params,
                                   (grad_scores_TE, grad_gates_TK))
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-5)


def test_opcheck():
    logits_TE, bias_E = _inputs(7, 8, with_bias=True)
    experts_TK = logits_TE.topk(3, dim=-1).indices
    torch.library.opcheck(gating._topk_gating_fwd, (logits_TE.requires_grad_(), bias_E, 3, "sigmoid", True, 2.5))
    torch.library.opcheck(gating._topk_gating_fwd, (logits_TE, None, 2, "softmax", False, 1.0))
    for grads in ((torch.randn(7, 8), torch.randn(7, 3)), (None, torch.randn(7, 3))):
        torch.library.opcheck(gating._topk_gating_bwd, (*grads, logits_TE.detach(), experts_TK, "softmax", True, 2.5))


def test_torch_compile_fullgraph():
    def loss(gating_fn, logits_TE, bias_E):
        scores_TE, gates_TK, experts_TK = gating_fn(logits_TE, 3, "sigmoid", bias_E, True, 2.5)
        return scores_TE.square().sum() + (gates_TK * experts_TK).sum(), gates_TK.sin().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    logits_TE, bias_E = _inputs(7, 8, with_bias=True)
    logits_TE.requires_grad_()
    for which in range(2):  # both outputs used, then the gates alone
        actual = compiled(fused_topk_gating, logits_TE, bias_E)[which]
        expected = loss(topk_gating_reference, logits_TE, bias_E)[which]
        torch.testing.assert_close(actual, expected)
        torch.testing.assert_close(torch.autograd.grad(actual, logits_TE)[0],
                                   torch.autograd.grad(expected, logits_TE)[0], atol=1e-6, rtol=1e-5)


def _bad_calls():
    logits_TE = torch.randn(4, 6)
    return [
        ("logits_TE", (torch.randn(6), 2), {}),
        ("logits_TE", (torch.randn(4, 0), 1), {}),
        ("logits_TE", (logits_TE.long(), 2), {}),
        ("top_k", (logits_TE, 0), {}),
        ("top_k", (logits_TE, 7), {}),
        ("top_k", (logits_TE, 2.0), {}),
        ("score_func", (logits_TE, 2), {"score_func": "relu"}),
        ("bias_E", (logits_TE, 2), {"bias_E": torch.zeros(5)}),
        ("bias_E", (logits_TE, 2), {"bias_E": torch.zeros(1, 6)}),
        ("scaling_factor", (logits_TE, 2), {"scaling_factor": 0.0}),
        ("scaling_factor", (logits_TE, 2), {"scaling_factor": float("nan")}),
    ]


@pytest.mark.parametrize("gating_fn", [fused_topk_gating, topk_gating_reference], ids=lambda f: f.__name__)
@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_arguments_raise_value_error_naming_the_parameter(gating_fn, index):
    name, args, kwargs = _bad_calls()[index]
    with pytest.raises(ValueError, match=f"`{name}`"):
        gating_fn(*args, **kwargs)


def test_kernel_only_limits_raise_value_error():
    with pytest.raises(ValueError, match="`logits_TE`.*4096"):
        fused_topk_gating(torch.randn(2, 4097), 2)
    with pytest.raises(ValueError, match="`logits_TE`"):
        fused_topk_gating(torch.randn(2, 5, dtype=torch.float64), 2)
    logits_TE, experts_TK = torch.randn(3, 5), torch.zeros(3, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="`grad_gates_TK`"):
        gating._topk_gating_bwd(None, torch.randn(3, 3), logits_TE, experts_TK, "softmax", True, 1.0)
    with pytest.raises(ValueError, match="`experts_TK`"):
        gating._topk_gating_bwd(None, torch.randn(3, 2), logits_TE, experts_TK.int(), "softmax", True, 1.0)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(("T", "E", "K", "score_func", "with_bias"), [
    (4096, 64, 8, "softmax", False),  # Mixtral-like
    (4096, 256, 8, "sigmoid", True),  # DeepSeek-V3-like
    (1024, 512, 16, "softmax", True),
])
def test_cuda_realistic_shapes_match_reference(T, E, K, score_func, with_bias):
    logits_TE, bias_E = _inputs(T, E, with_bias, seed=E)
    logits_TE, bias_E = logits_TE.cuda(), None if bias_E is None else bias_E.cuda()
    args = (K, score_func, bias_E, True, 2.5)
    actual, expected = fused_topk_gating(logits_TE, *args), topk_gating_reference(logits_TE, *args)
    # GPU and torch exps may differ by an ulp and swap near-tied experts: such rows must be ties.
    same_T = (actual[2] == expected[2]).all(dim=1)
    assert same_T.float().mean() > 0.995
    choice_TE = expected[0] if score_func == "softmax" else logits_TE.sigmoid()
    choice_TE = choice_TE + (0 if bias_E is None else bias_E)
    torch.testing.assert_close(choice_TE.gather(1, actual[2]), choice_TE.gather(1, expected[2]), atol=1e-6, rtol=0)
    torch.testing.assert_close(actual[0], expected[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(actual[1][same_T], expected[1][same_T], atol=1e-6, rtol=1e-5)
    grad_scores_TE, grad_gates_TK = torch.randn_like(logits_TE), torch.randn(T, K, device="cuda")
    grads = [_grads(fn, logits_TE, args, grad_scores_TE, grad_gates_TK)
             for fn in (fused_topk_gating, topk_gating_reference)]
    torch.testing.assert_close(grads[0][same_T], grads[1][same_T], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_topk_router_uses_the_kernel_and_agrees_with_torch(score_func):
    # gating_kernel="triton" runs the fused kernel (the interpreter here, CUDA on a GPU); "torch" never does.
    torch.manual_seed(3)
    fused = TopKRouter(24, 10, top_k=3, score_func=score_func, expert_bias=True, scaling_factor=2.0,
                       gating_kernel="triton")
    fused.expert_bias_E.normal_(0, 0.1)
    plain = copy.deepcopy(fused)
    plain.gating_kernel = "torch"
    x = torch.randn(13, 24)
    ours, ref = fused(x), plain(x)
    assert torch.equal(ours.expert_A, ref.expert_A) and torch.equal(ours.token_A, ref.token_A)
    torch.testing.assert_close(ours.weight_A, ref.weight_A, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.scores_TE, ref.scores_TE, atol=1e-6, rtol=1e-5)
    (ours.weight_A.sum() + ours.scores_TE.pow(2).sum()).backward()
    (ref.weight_A.sum() + ref.scores_TE.pow(2).sum()).backward()
    for (name, p), q in zip(fused.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_topk_router_gating_kernel_choice():
    from lightning_moe.routing import GroupLimitedTopKRouter

    with pytest.raises(ValueError, match="gating_kernel"):
        TopKRouter(8, 4, gating_kernel="cuda")
    logits = torch.randn(3, 8, device="cpu")
    assert not TopKRouter(8, 8, gating_kernel="auto")._use_kernel(logits)  # CPU tensors: torch in "auto"
    grouped = GroupLimitedTopKRouter(8, 8, num_groups=2, topk_groups=1)
    grouped.gating_kernel = "triton"
    assert not grouped._use_kernel(logits)  # a restricted selection stays in torch
