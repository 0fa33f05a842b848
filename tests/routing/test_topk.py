import pytest
import torch

from lightning_moe.routing import LinearScorer, Routing, TopKRouter


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.filterwarnings("ignore:TopKRouter\\(top_k=1, renormalize=True\\)")
def test_topk_routing_contract(top_k: int, renormalize: bool) -> None:
    torch.manual_seed(0)
    router = TopKRouter(d_model=24, num_experts=6, top_k=top_k, renormalize=renormalize)
    x = torch.randn(37, 24)
    r = router(x)
    assert isinstance(r, Routing)
    assert r.scores_TE.shape == r.logits_TE.shape == (37, 6)
    assert r.token_A.shape == r.expert_A.shape == r.weight_A.shape == (37 * top_k,)
    torch.testing.assert_close(r.scores_TE, r.logits_TE.softmax(-1))
    # Each token's experts are its top-k by score, distinct, with gates in order.
    gates_TK = r.weight_A.view(37, top_k)
    experts_TK = r.expert_A.view(37, top_k)
    assert torch.equal(r.token_A.view(37, top_k), torch.arange(37).unsqueeze(1).expand(37, top_k))
    expected_TK = r.scores_TE.topk(top_k, dim=-1).indices
    assert torch.equal(experts_TK, expected_TK)
    kept_TK = r.scores_TE.gather(1, experts_TK)
    if renormalize:
        torch.testing.assert_close(gates_TK.sum(-1), torch.ones(37))
        torch.testing.assert_close(gates_TK, kept_TK / kept_TK.sum(-1, keepdim=True))
    else:
        torch.testing.assert_close(gates_TK, kept_TK)
    assert r.num_tokens == 37 and r.num_experts == 6


def test_top1_renormalized_warns() -> None:
    with pytest.warns(UserWarning, match="gate of exactly 1"):
        TopKRouter(8, 4, top_k=1, renormalize=True)


def test_logits_are_float32_under_autocast() -> None:
    router = TopKRouter(16, 4, top_k=2)
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = router(x.bfloat16())
    assert r.logits_TE.dtype == torch.float32
    assert r.scores_TE.dtype == r.weight_A.dtype == torch.float32
    # The bf16 input is upcast exactly, then centred; the product is a float32 matmul.
    x32 = x.bfloat16().float()
    torch.testing.assert_close(r.logits_TE, (x32 - x32.mean(0)) @ router.scorer.weight_ED.T)


def test_gradients_reach_router_weights() -> None:
    router = TopKRouter(16, 4, top_k=2)
    r = router(torch.randn(10, 16))
    (r.weight_A.sum() + r.scores_TE.pow(2).sum()).backward()
    assert router.scorer.weight_ED.grad is not None and router.scorer.weight_ED.grad.abs().sum() > 0


def test_scorer_parameter_count() -> None:
    assert sum(p.numel() for p in LinearScorer(24, 6).parameters()) == 24 * 6


@pytest.mark.parametrize("top_k", [0, -1, 7])
def test_bad_top_k(top_k: int) -> None:
    with pytest.raises(ValueError, match=r"`top_k` must be an integer in \[1, 6\]"):
        TopKRouter(24, 6, top_k=top_k)


@pytest.mark.parametrize("kwargs, name", [({"d_model": 0, "num_experts": 4}, "d_model"),
                                          ({"d_model": 8, "num_experts": -2}, "num_experts")])
def test_bad_router_widths(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"`{name}` must be an integer >= 1"):
        TopKRouter(**kwargs)
