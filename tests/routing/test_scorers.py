"""Scorers: shapes, float32 logits, gradients to every parameter, documented parameter counts, bad values."""

import functools
from functools import partial

import pytest
import torch

from lightning_moe.routing import (
    AttentionScorer,
    HybridScorer,
    LinearScorer,
    MLPHadamardScorer,
    MLPScorer,
    TokenScorer,
    TopKRouter,
)

SCORERS = [LinearScorer, AttentionScorer, MLPScorer, HybridScorer, MLPHadamardScorer,
           functools.partial(HybridScorer, learn_mix=False), functools.partial(MLPScorer, activation="tanh")]


def _name(factory) -> str:
    return getattr(factory, "__name__", None) or f"{factory.func.__name__}{factory.keywords}"


@pytest.mark.parametrize("factory", SCORERS, ids=_name)
@pytest.mark.parametrize("tokens, d_model, experts", [(1, 8, 1), (37, 24, 6), (5, 768, 8)])
def test_shapes_dtype_and_gradients(factory, tokens: int, d_model: int, experts: int) -> None:
    torch.manual_seed(0)
    scorer = factory(d_model, experts)
    x = torch.randn(tokens, d_model)
    logits = scorer(x)
    assert logits.shape == (tokens, experts) and logits.dtype == torch.float32
    (logits * torch.randn_like(logits)).sum().backward()
    for name, p in scorer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert scorer(x.double()).dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert scorer(x.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("factory", SCORERS, ids=_name)
def test_gradients_reach_the_scorer_through_a_router(factory) -> None:
    torch.manual_seed(0)
    router = TopKRouter(16, 4, top_k=2, scorer=factory)
    r = router(torch.randn(12, 16))
    (r.weight_A * torch.randn_like(r.weight_A)).sum().backward()
    for name, p in router.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_as_documented() -> None:
    d, e, h, q = 768, 8, 128, 64
    assert count(LinearScorer(d, e)) == e * d == 6_144
    assert count(AttentionScorer(d, e, d_key=q)) == d * q + e * q == 49_664  # router study, Table I
    assert count(MLPScorer(d, e, d_hidden=h)) == d * h + h + h * e + e == 99_464
    assert count(MLPHadamardScorer(d, e, d_hidden=h)) == 2 * d * h + h + h * e + e == 197_768
    assert count(HybridScorer(d, e, d_key=q)) == 6_144 + 49_664 + 2 == 55_810  # router study, Table I
    assert count(HybridScorer(d, e, d_key=q, learn_mix=False)) == 55_808


def test_attention_scorer_is_a_cosine_over_temperature() -> None:
    torch.manual_seed(0)
    scorer = AttentionScorer(16, 5, d_key=8, temperature=0.25, center_input=False)
    x = torch.randn(9, 16)
    logits = scorer(x)
    assert logits.abs().max() <= 4.0 + 1e-5  # |cos| <= 1, over 0.25
    q = x @ scorer.query_QD.T
    expected = torch.nn.functional.cosine_similarity(q.unsqueeze(1), scorer.keys_EQ.unsqueeze(0), dim=-1) / 0.25
    torch.testing.assert_close(logits, expected)


def test_hybrid_mixes_its_parts_convexly() -> None:
    torch.manual_seed(0)
    scorer = HybridScorer(16, 5, linear_weight=0.3, learn_mix=False, center_input=False)
    x = torch.randn(9, 16)
    torch.testing.assert_close(scorer.mix_weights(), torch.tensor([0.3, 0.7]))
    torch.testing.assert_close(scorer(x), 0.3 * scorer.linear(x) + 0.7 * scorer.attention(x))


def test_mlp_hadamard_formula() -> None:
    torch.manual_seed(0)
    s = MLPHadamardScorer(16, 5, d_hidden=7, activation="relu", center_input=False)
    x = torch.randn(9, 16)
    hidden = torch.relu(s.fc1(x)) * (x @ s.proj_HD.T)
    torch.testing.assert_close(s(x), s.fc2(hidden))


@pytest.mark.parametrize("build, match", [
    (lambda: AttentionScorer(8, 4, temperature=0.0), "temperature"),
    (lambda: AttentionScorer(8, 4, temperature=-1.0), "temperature"),
    (lambda: AttentionScorer(8, 4, d_key=0), "d_key"),
    (lambda: MLPScorer(8, 4, d_hidden=0), "d_hidden"),
    (lambda: MLPScorer(8, 4, activation="swish"), "activation"),
    (lambda: HybridScorer(8, 4, linear_weight=1.0), "linear_weight"),
    (lambda: HybridScorer(8, 4, temperature=float("inf")), "temperature"),
    (lambda: LinearScorer(0, 4), "d_model"),
    (lambda: LinearScorer(8, 0), "num_experts"),
])
def test_bad_values_name_the_parameter(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def test_token_scorer_is_a_learned_table_per_token_id() -> None:
    torch.manual_seed(0)
    scorer = TokenScorer(16, 5, vocab_size=11)
    assert count(scorer) == 5 * 11 and scorer.expert_rows()[0] is scorer.weight_EV
    x = torch.randn(7, 16)
    ids = torch.tensor([3, 0, 10, 3, 7, 7, 1])
    logits = scorer(x, ids)
    torch.testing.assert_close(logits, scorer.weight_EV.T[ids])
    torch.testing.assert_close(scorer(torch.randn(7, 16), ids), logits)  # the hidden states are not read
    assert scorer(x.double(), ids).dtype == torch.float64
    router = TopKRouter(16, 5, top_k=2, scorer=partial(TokenScorer, vocab_size=11))
    r = router(x, ids)
    assert torch.equal(r.expert_A.view(7, 2)[0].sort().values, r.expert_A.view(7, 2)[3].sort().values)
    (r.weight_A * torch.randn_like(r.weight_A)).sum().backward()
    grad = router.scorer.weight_EV.grad
    assert grad[:, [0, 1, 3, 7, 10]].abs().sum() > 0 and grad[:, [2, 4, 5, 6, 8, 9]].abs().sum() == 0


def test_token_scorer_errors_name_the_problem() -> None:
    scorer = TokenScorer(8, 4, vocab_size=10)
    with pytest.raises(ValueError, match="routes by token id but the router received none"):
        scorer(torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"Token ids must be in \[0, vocab_size=10\); got ids in \[0, 12\]"):
        scorer(torch.randn(3, 8), torch.tensor([0, 12, 3]))
    with pytest.raises(ValueError, match=r"`token_ids_T` must have shape \(3,\)"):
        scorer(torch.randn(3, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="`vocab_size`"):
        TokenScorer(8, 4, vocab_size=0)
    with pytest.raises(ValueError, match="`init_std`"):
        TokenScorer(8, 4, init_std=0.0)
