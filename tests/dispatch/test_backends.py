"""The ``grouped`` backend against the ``loop`` reference: outputs and every gradient."""

import copy

import pytest
import torch

from lightning_moe.dispatch import DISPATCHERS, get_dispatcher
from lightning_moe.layers import MoEConfig, MoELayer
from lightning_moe.routing import Routing, TopKRouter

# (tokens, d_model, d_ff, experts): widths that are not powers of two, tiny and single-expert cases.
SHAPES = [(37, 24, 40, 6), (64, 33, 17, 8), (5, 7, 3, 5), (128, 48, 96, 16), (9, 10, 11, 1)]


def run_backward(layer: MoELayer, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(grad)
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    grads["x"] = x.grad.clone()
    return y.detach(), grads


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_grouped_matches_loop(shape: tuple[int, int, int, int], top_k: int) -> None:
    tokens, d_model, d_ff, experts = shape
    top_k = min(top_k, experts)
    torch.manual_seed(tokens * 31 + top_k)
    router = TopKRouter(d_model, experts, top_k=top_k, renormalize=top_k > 1)  # Switch-style at k=1
    ref = MoELayer(d_model, d_ff, experts, router=router, dispatcher="loop")
    fast = copy.deepcopy(ref)
    fast.dispatcher = "grouped"
    x = torch.randn(2, tokens, d_model, dtype=torch.float64)
    grad = torch.randn(2, tokens, d_model, dtype=torch.float64)
    ref.double(), fast.double()

    y_ref, g_ref = run_backward(ref, x, grad)
    y_fast, g_fast = run_backward(fast, x, grad)
    torch.testing.assert_close(y_fast, y_ref)
    assert g_ref.keys() == g_fast.keys() and len(g_ref) == 5  # x, router, 3 expert weights
    for name in g_ref:
        torch.testing.assert_close(g_fast[name], g_ref[name], msg=f"gradient of {name}")
        # One expert with renormalised gates has gate 1 whatever the router: no router gradient.
        if not (name.startswith("router") and experts == 1):
            assert g_ref[name].abs().sum() > 0, name


def test_experts_without_tokens() -> None:
    # Route every token to experts 1 and 3 of 5: the others get none, and zero gradients.
    torch.manual_seed(0)
    layer = MoELayer(12, 20, 5)
    x = torch.randn(9, 12, requires_grad=True)
    scores = torch.full((9, 5), 0.2, requires_grad=True)
    routing = Routing(
        scores_TE=scores,
        logits_TE=scores.log(),
        token_A=torch.arange(9).repeat_interleave(2),
        expert_A=torch.tensor([1, 3] * 9),
        weight_A=torch.rand(18, requires_grad=True),
    )
    outs, grads = [], []
    for name in ("loop", "grouped"):
        layer.zero_grad()
        x.grad = None
        y = get_dispatcher(name)(x, routing, layer.experts)
        y.pow(2).sum().backward()
        outs.append(y.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in layer.experts.parameters()])
    torch.testing.assert_close(outs[1], outs[0])
    for g_grouped, g_loop in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(g_grouped, g_loop)
    w_gate_grad = grads[1][1]
    assert w_gate_grad[[0, 2, 4]].abs().sum() == 0 and w_gate_grad[[1, 3]].abs().sum() > 0


def test_combine_is_the_gated_sum() -> None:
    # Check the function itself, not only agreement: y_t = sum_a w_a * expert_{e_a}(x_t).
    torch.manual_seed(1)
    layer = MoELayer(8, 6, 4, router=TopKRouter(8, 4, top_k=2))
    x = torch.randn(5, 8)
    y = layer(x)
    r = layer.router(x)
    expected = torch.zeros_like(x)
    for t, e, w in zip(r.token_A.tolist(), r.expert_A.tolist(), r.weight_A.tolist(), strict=True):
        expected[t] += w * layer.experts.expert_forward(e, x[t : t + 1])[0]
    torch.testing.assert_close(y, expected)


def test_unknown_dispatcher() -> None:
    valid = r"\['auto', 'grouped', 'loop', 'triton', 'triton-grouped_mm', 'triton-kernels'\]"
    with pytest.raises(ValueError, match=r"Unknown `dispatcher` 'cuda'; valid names are " + valid):
        get_dispatcher("cuda")
    with pytest.raises(ValueError, match="Unknown `dispatcher`"):
        MoELayer(8, 8, 2, dispatcher="fast")
    assert set(DISPATCHERS) == {"auto", "loop", "grouped", "triton", "triton-grouped_mm", "triton-kernels"}


@pytest.mark.parametrize("name", ["loop", "grouped", "triton", "auto"])
@pytest.mark.parametrize("kind", ["swiglu", "mlp"])
def test_the_named_steps_compute_the_layer(name: str, kind: str) -> None:
    """permute -> compute -> combine, run one by one, equal the dispatcher called whole and the loop
    reference, outputs and gradients, for SwiGLU experts (fused form) and MLP experts (protocol only)."""
    from lightning_moe.experts import MLPExperts, SwiGLUExperts

    torch.manual_seed(3)
    experts = MLPExperts if kind == "mlp" else SwiGLUExperts
    layer = MoELayer(10, 7, 5, router=TopKRouter(10, 5, top_k=2), experts=experts).double()
    x = torch.randn(13, 10, dtype=torch.float64)
    routing = layer.router(x)
    dispatcher = get_dispatcher(name)
    results = []
    for run in ("steps", "whole", "reference"):
        layer.zero_grad()
        xg = x.clone().requires_grad_(True)
        if run == "steps":
            x_AD, plan = dispatcher.permute(xg, routing)
            assert x_AD.shape == (13 * 2, 10) and plan.counts_E.sum() == 26
            y = dispatcher.combine(dispatcher.compute(x_AD, plan, layer.experts), plan)
        else:
            y = (dispatcher if run == "whole" else get_dispatcher("loop"))(xg, routing, layer.experts)
        y.pow(2).sum().backward(retain_graph=True)
        results.append([y.detach(), xg.grad.clone()] + [p.grad.clone() for p in layer.experts.parameters()])
    for got in results[:2]:
        for a, b in zip(got, results[2], strict=True):
            torch.testing.assert_close(a, b)


def test_register_dispatcher_makes_a_new_backend_a_choice_everywhere() -> None:
    from lightning_moe.dispatch import Dispatcher, Plan, register_dispatcher
    from lightning_moe.layers import MoEConfig
    from lightning_moe.models import MoETransformer

    calls = []

    class CountingDispatcher(Dispatcher):
        """The base class's plain steps, counting how often compute runs."""

        name = "counting"

        def compute(self, x_AD: torch.Tensor, plan: Plan, experts) -> torch.Tensor:  # noqa: ANN001
            calls.append(x_AD.shape[0])
            return super().compute(x_AD, plan, experts)

    register_dispatcher("counting", CountingDispatcher)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_dispatcher("counting", CountingDispatcher)
        torch.manual_seed(0)
        layer = MoELayer(8, 6, 4, router=TopKRouter(8, 4, top_k=2), dispatcher="counting")
        reference = copy.deepcopy(layer)
        reference.dispatcher = "loop"
        x = torch.randn(5, 8)
        torch.testing.assert_close(layer(x), reference(x))
        assert calls == [10] and layer.dispatcher.name == "counting"
        model = MoETransformer(32, max_seq_len=8, d_model=8, n_layers=2, n_heads=2, d_ff=16,
                               moe=MoEConfig(num_experts=4, expert_d_ff=8, dispatcher="counting"))
        model(torch.randint(0, 32, (2, 8)))
        assert len(calls) == 3  # one per MoE layer
        valid = r"\['auto', 'counting', 'grouped', 'loop', 'triton', 'triton-grouped_mm', 'triton-kernels'\]"
        with pytest.raises(ValueError, match=r"valid names are " + valid):
            MoEConfig(dispatcher="nope")
    finally:
        DISPATCHERS.pop("counting")


def test_assigning_a_dispatcher_replaces_the_backend() -> None:
    layer = MoELayer(8, 6, 4)
    assert layer.dispatcher.name == "auto"
    layer.dispatcher = "loop"
    assert layer.dispatcher.name == "loop" and "dispatcher='loop'" in repr(layer)
    with pytest.raises(ValueError, match="Unknown `dispatcher`"):
        layer.dispatcher = "fast"


def test_auto_is_grouped_on_cpu_silently() -> None:
    # The default: on CPU it is the grouped backend, bit for bit, and never tries the kernels
    # (not even under Triton's interpreter, which the test session turns on), so it never warns.
    import warnings

    torch.manual_seed(0)
    layer = MoELayer(16, 24, 6, router=TopKRouter(16, 6, top_k=2))
    grouped = copy.deepcopy(layer)
    grouped.dispatcher = "grouped"
    assert layer.dispatcher.name == "auto" and MoEConfig().dispatcher == "auto"
    x = torch.randn(2, 10, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y_auto, g_auto = run_backward(layer, x, torch.ones_like(x))
        dispatcher = layer.dispatcher
        x_AD, plan = dispatcher.permute(x.reshape(-1, 16), layer.router(x.reshape(-1, 16)))
        dispatcher.combine(dispatcher.compute(x_AD, plan, layer.experts), plan)
    y_grouped, g_grouped = run_backward(grouped, x, torch.ones_like(x))
    assert torch.equal(y_auto, y_grouped)
    assert all(torch.equal(g_auto[name], g_grouped[name]) for name in g_auto)
