"""The ``triton`` dispatcher against the ``loop`` reference: outputs and every gradient.

Without a GPU the kernels run under Triton's interpreter (set in ``tests/conftest.py``), so the
shapes stay small; the ``gpu`` test repeats the check at a realistic size on CUDA.
"""

import copy
import warnings

import pytest
import torch

from lightning_moe.dispatch import grouped_dispatch, triton_dispatch
from lightning_moe.dispatch.triton import _warn_fallback, fallback_reason
from lightning_moe.layers import MoELayer
from lightning_moe.routing import ExpertCapacity, TopKRouter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def fwd_bwd(layer: MoELayer, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(grad)
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    grads["x"] = x.grad.clone()
    return y.detach(), grads


def assert_layers_agree(tokens: int, d_model: int, d_ff: int, experts: int, top_k: int,
                        capacity: ExpertCapacity | None = None, atol: float = 1e-5) -> None:
    torch.manual_seed(tokens + 7 * experts + top_k)
    router = TopKRouter(d_model, experts, top_k=top_k, renormalize=top_k > 1)
    ref = MoELayer(d_model, d_ff, experts, router=router, dispatcher="loop", capacity=capacity).to(DEVICE)
    fast = copy.deepcopy(ref)
    fast.dispatcher = "triton"
    x = torch.randn(tokens, d_model, device=DEVICE)
    grad = torch.randn(tokens, d_model, device=DEVICE)
    y_ref, g_ref = fwd_bwd(ref, x, grad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the kernels must run, not fall back
        y_fast, g_fast = fwd_bwd(fast, x, grad)
    torch.testing.assert_close(y_fast, y_ref, atol=atol, rtol=1e-4)
    assert g_fast.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g_fast[name], g_ref[name], atol=atol, rtol=1e-4, msg=f"gradient of {name}")


@pytest.mark.parametrize(("tokens", "d_model", "d_ff", "experts", "top_k"),
                         [(37, 24, 40, 6, 2), (19, 33, 17, 8, 3), (5, 7, 3, 5, 1), (16, 16, 16, 1, 1)])
def test_triton_matches_loop(tokens: int, d_model: int, d_ff: int, experts: int, top_k: int) -> None:
    # Widths that are not multiples of the block sizes; with 8 experts and 19 tokens some get none.
    assert_layers_agree(tokens, d_model, d_ff, experts, top_k)


def test_triton_with_dropped_tokens() -> None:
    # Capacity drops: some tokens keep fewer than K assignments, some none (zeros out).
    assert_layers_agree(41, 20, 12, 4, 2, capacity=ExpertCapacity(capacity_factor=0.5, eval_capacity_factor=None))


def test_fallback_warns_and_equals_grouped() -> None:
    torch.manual_seed(0)
    layer = MoELayer(12, 8, 4, dispatcher="triton").double()
    x = torch.randn(9, 12, dtype=torch.float64)
    reason = fallback_reason(x, layer.experts)
    assert reason is not None and "float64" in reason
    routing = layer.router(x)
    _warn_fallback.cache_clear()  # it warns once per reason and process; an earlier test may have seen this one
    with pytest.warns(RuntimeWarning, match="falls back to 'grouped'.*float64"):
        y = triton_dispatch(x, routing, layer.experts)
    torch.testing.assert_close(y, grouped_dispatch(x, routing, layer.experts))


def test_triton_dispatch_compiles_without_graph_breaks() -> None:
    torch.manual_seed(1)
    layer = MoELayer(16, 8, 4, dispatcher="triton").to(DEVICE)
    x = torch.randn(10, 16, device=DEVICE, requires_grad=True)
    routing = layer.router(x)

    def run(x: torch.Tensor) -> torch.Tensor:
        return triton_dispatch(x, routing, layer.experts)

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, grouped_dispatch(x, routing, layer.experts), atol=1e-5, rtol=1e-4)
    y.sum().backward()
    assert x.grad is not None and layer.experts.w_gate_EDF.grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_matches_loop_at_scale() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    assert_layers_agree(4096, 512, 128, 64, 8, atol=1e-4)
    assert_layers_agree(1000, 256, 200, 32, 2, capacity=ExpertCapacity(capacity_factor=1.0), atol=1e-4)
