"""SelfSupervisedScorer and routers that bring their own losses: the documented parameter count, gradients, the
InfoNCE formula, pre-training on real hidden states, freezing, every selection rule, logging and scheduling."""

import functools
import math
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_moe.balancing import SwitchAuxLoss, ZLoss
from lightning_moe.callbacks import Schedule, ZLossScheduler
from lightning_moe.data import TextDataModule
from lightning_moe.discovery import find_moe_layers
from lightning_moe.layers import MoEConfig, MoELayer
from lightning_moe.models import MoETransformer
from lightning_moe.module import MoELanguageModel
from lightning_moe.routing import (
    BalancedRouter,
    ExpertChoiceRouter,
    GroupLimitedTopKRouter,
    SelfSupervisedScorer,
    TopKRouter,
    info_nce_loss,
)

SELECTION_RULES = {
    "topk_softmax": partial(TopKRouter, top_k=2),
    "topk_sigmoid": partial(TopKRouter, top_k=2, score_func="sigmoid", expert_bias=True),
    "group_limited": partial(GroupLimitedTopKRouter, top_k=2, num_groups=2, topk_groups=1),
    "expert_choice": partial(ExpertChoiceRouter, capacity_factor=2.0),
    "balanced": partial(BalancedRouter, top_k=2),
}


@pytest.mark.parametrize("d_model, experts, width, depth", [(128, 32, 64, 2), (768, 8, 64, 2), (16, 4, 8, 1),
                                                             (24, 6, 10, 3)])
def test_parameter_count_is_as_documented(d_model: int, experts: int, width: int, depth: int) -> None:
    scorer = SelfSupervisedScorer(d_model, experts, d_feature=width, depth=depth)
    expected = d_model * width + width + (depth - 1) * (width * width + width) + experts * width
    assert sum(p.numel() for p in scorer.parameters()) == expected
    if (d_model, experts, width, depth) == (128, 32, 64, 2):
        assert expected == 14_464  # the docstring's figures
    if (d_model, experts, width, depth) == (768, 8, 64, 2):
        assert expected == 53_888


def test_info_nce_equals_its_formula_on_a_hand_computed_case() -> None:
    anchor = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # lengths do not matter: cosine similarity
    positive = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    tau = 0.5
    # sim = [[1, 1/sqrt2], [0, 1/sqrt2]]; row i classifies anchor i among both positives, its own the target.
    s = 1 / math.sqrt(2)
    row0 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(s / tau)))
    row1 = -math.log(math.exp(s / tau) / (math.exp(0 / tau) + math.exp(s / tau)))
    assert info_nce_loss(anchor, positive, tau).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    # No information (every positive alike): log N.
    same = torch.ones(5, 3)
    assert info_nce_loss(torch.randn(5, 3), same, 0.1).item() == pytest.approx(math.log(5), rel=1e-6)
    with pytest.raises(ValueError, match="anchor_NH"):
        info_nce_loss(torch.randn(4, 3), torch.randn(5, 3), 0.1)


def test_pretext_loss_is_info_nce_of_two_dropout_views_of_random_anchors() -> None:
    torch.manual_seed(0)
    scorer = SelfSupervisedScorer(16, 4, d_feature=8, num_anchors=6, view_dropout=0.3)
    x = torch.randn(20, 16)
    torch.manual_seed(7)
    loss = scorer.pretext_loss(x, torch.Generator().manual_seed(3))
    torch.manual_seed(7)  # replay the same draws by hand
    pick = torch.randperm(20, generator=torch.Generator().manual_seed(3))[:6]
    v1 = scorer.features(F.dropout(x[pick], 0.3, training=True))
    v2 = scorer.features(F.dropout(x[pick], 0.3, training=True))
    sim = F.normalize(v1, dim=-1) @ F.normalize(v2, dim=-1).T / 0.1
    by_hand = -(sim.diag() - sim.logsumexp(dim=1)).mean()
    torch.testing.assert_close(loss, by_hand)
    assert not torch.equal(v1, v2)  # two masks, two views


def test_gradients_reach_every_parameter_and_the_pretext_only_reaches_the_extractor() -> None:
    torch.manual_seed(0)
    layer = MoELayer(16, 8, 4, router=TopKRouter(16, 4, 2, scorer=partial(SelfSupervisedScorer, d_feature=8)))
    x = torch.randn(2, 12, 16, requires_grad=True)
    y = layer(x)
    assert set(layer.aux_losses) == {"ssl_loss"}
    (y.square().mean() + sum(layer.aux_losses.values())).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    # The pretext loss alone: the extractor's gradient, not the head's, not the hidden states' (detach_input).
    scorer = layer.router.scorer
    layer.zero_grad()
    x.grad = None
    layer(x)
    layer.aux_losses["ssl_loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in scorer.extractor_parameters())
    assert scorer.head_EH.grad is None and x.grad is None
    # Without detach_input the pretext also reaches the hidden states.
    scorer.detach_input = False
    layer.zero_grad()
    layer(x)
    layer.aux_losses["ssl_loss"].backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("rule", list(SELECTION_RULES))
def test_every_selection_rule_brings_the_scorers_loss(rule: str) -> None:
    torch.manual_seed(0)
    router = SELECTION_RULES[rule](16, 4, scorer=partial(SelfSupervisedScorer, d_feature=8, coeff=0.5))
    routing = router(torch.randn(24, 16))
    assert set(routing.aux_losses) == {"ssl_loss"} and routing.aux_losses["ssl_loss"].requires_grad
    torch.testing.assert_close(routing.aux_losses["ssl_loss"], 0.5 * router.scorer.last_pretext_loss)
    assert [w.name for w in router.scheduled_coefficients()] == ["ssl_loss"]
    router.eval()  # evaluation and no-grad compute no pretext loss
    assert router(torch.randn(24, 16)).aux_losses == {}
    router.train()
    with torch.no_grad():
        assert router(torch.randn(24, 16)).aux_losses == {}
    router.scorer.loss_weight.coeff = 0.0  # weighted by 0: a constant 0, not computed
    last = router.scorer.last_pretext_loss
    zero = router(torch.randn(24, 16)).aux_losses["ssl_loss"]
    assert zero.item() == 0.0 and not zero.requires_grad and router.scorer.last_pretext_loss is last


def test_a_router_loss_named_like_a_balancer_is_refused() -> None:
    router = TopKRouter(16, 4, 2, scorer=partial(SelfSupervisedScorer, loss_name="aux_loss"))
    layer = MoELayer(16, 8, 4, router=router, balancers=[SwitchAuxLoss(0.01)])
    with pytest.raises(ValueError, match="'aux_loss'.*rename one"):
        layer(torch.randn(8, 16))


def test_pretrained_alone_on_real_hidden_states_the_loss_falls_then_the_extractor_is_frozen() -> None:
    torch.manual_seed(0)
    data = TextDataModule(seq_len=64, batch_size=16, corpus="pydoc")
    data.setup("fit")
    ids = next(iter(data.train_dataloader()))["input_ids"][:, :-1]
    model = MoETransformer(vocab_size=256, max_seq_len=64, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                           moe=MoEConfig(num_experts=4, expert_d_ff=16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _, batch in zip(range(40), data.train_dataloader(), strict=False):  # a model that has learned something
        ids_BN = batch["input_ids"]
        loss = F.cross_entropy(model(ids_BN[:, :-1]).flatten(0, 1), ids_BN[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 4.0  # below the 5.5 of uniform bytes
    model.train()
    inputs = model.router_inputs(ids)  # 1,024 real-text tokens per layer
    assert model.training and [h.shape for h in inputs] == [(1024, 32)] * 2
    h_TD = inputs[0]
    scorer = SelfSupervisedScorer(32, 4, d_feature=16, num_anchors=128, view_dropout=0.2)
    head = scorer.head_EH.detach().clone()
    losses = scorer.pretrain(h_TD, steps=80, lr=3e-3, progress=False)
    assert len(losses) == 80 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)
    assert torch.equal(scorer.head_EH, head)  # the routing head is not pre-trained
    torch.testing.assert_close(scorer.centering.running_mean_D, h_TD.mean(dim=0))

    assert scorer.frozen and all(not p.requires_grad for p in scorer.extractor_parameters())
    router = TopKRouter(32, 4, 2, scorer=lambda d, e: scorer)
    assert router(h_TD[:64]).aux_losses == {}  # frozen: no pretext loss
    # The frozen state travels with the weights.
    fresh = SelfSupervisedScorer(32, 4, d_feature=16)
    assert not fresh.frozen
    fresh.load_state_dict(scorer.state_dict())
    assert fresh.frozen and all(not p.requires_grad for p in fresh.extractor_parameters())
    torch.testing.assert_close(fresh(h_TD[:8]), scorer(h_TD[:8]))
    fresh.freeze_extractor(False)
    assert all(p.requires_grad for p in fresh.extractor_parameters())
    # Loading a not-frozen extractor never unfreezes what the caller froze.
    fresh.requires_grad_(False)
    fresh.load_state_dict(SelfSupervisedScorer(32, 4, d_feature=16).state_dict())
    assert not any(p.requires_grad for p in fresh.parameters())


def test_a_training_forward_without_grad_warns_once_that_it_brought_no_loss() -> None:
    router = TopKRouter(16, 4, 2, scorer=SelfSupervisedScorer)
    with torch.no_grad(), pytest.warns(UserWarning, match="use_reentrant=False") as caught:
        router(torch.randn(8, 16))
        router(torch.randn(8, 16))
    assert len([w for w in caught if "gradients disabled" in str(w.message)]) == 1


def test_built_frozen() -> None:
    scorer = SelfSupervisedScorer(16, 4, freeze_extractor=True)
    assert scorer.frozen and bool(scorer.extractor_frozen)
    assert all(not p.requires_grad for p in scorer.extractor_parameters()) and scorer.head_EH.requires_grad


@pytest.mark.parametrize("kwargs, match", [
    ({"d_feature": 0}, "d_feature"), ({"depth": 0}, "depth"), ({"activation": "tanhh"}, "activation"),
    ({"temperature": 0.0}, "temperature"), ({"coeff": -1.0}, "coeff"), ({"view_dropout": 0.0}, "view_dropout"),
    ({"view_dropout": 1.0}, "view_dropout"), ({"num_anchors": 1}, "num_anchors"), ({"loss_name": ""}, "name"),
    ({"loss_name": "lm_loss"}, "loss_name"), ({"loss_name": "mtp_loss_1"}, "loss_name"),
])
def test_bad_arguments_name_themselves(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SelfSupervisedScorer(16, 4, **kwargs)


def test_pretrain_bad_arguments() -> None:
    scorer = SelfSupervisedScorer(16, 4)
    with pytest.raises(ValueError, match="d_model=16"):
        scorer.pretrain(torch.randn(10, 8), steps=1)
    with pytest.raises(ValueError, match="steps"):
        scorer.pretrain(torch.randn(10, 16), steps=0)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        scorer.pretrain(torch.randn(1, 16), steps=1)


class Losses(L.Callback):
    def __init__(self) -> None:
        self.seen: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.seen.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
                         | {"coeff": pl_module.model.moe_layers()[0].router.scorer.coeff})


def test_the_loss_is_logged_summed_into_the_training_loss_and_scheduled_through_discovery() -> None:
    torch.manual_seed(0)
    scorer = partial(SelfSupervisedScorer, d_feature=16)
    model = MoELanguageModel(max_seq_len=32, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                             optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
                             moe=MoEConfig(num_experts=4, expert_d_ff=16, router=partial(TopKRouter, scorer=scorer),
                                           balancers=[SwitchAuxLoss(0.01), ZLoss(0.001)]))
    views = find_moe_layers(model)
    assert [[w.name for w in v.loss_weights] for v in views] == [["ssl_loss"], ["ssl_loss"]]
    losses = Losses()
    schedule = Schedule("linear", value=0.1, start_value=0.0, warmup_steps=4)
    trainer = L.Trainer(max_steps=4, limit_val_batches=0, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
                        callbacks=[ZLossScheduler(schedule, balancer="ssl_loss"), losses], accelerator="cpu")
    trainer.fit(model, TextDataModule(seq_len=32, batch_size=4, corpus="pydoc"))
    assert [s["coeff"] for s in losses.seen] == pytest.approx([0.0, 0.025, 0.05, 0.075])
    for step in losses.seen:
        total = step["train/lm_loss"] + step["train/aux_loss"] + step["train/z_loss"] + step["train/ssl_loss"]
        assert step["train/loss"] == pytest.approx(total, rel=1e-5)
    assert losses.seen[0]["train/ssl_loss"] == 0.0 and losses.seen[-1]["train/ssl_loss"] > 0


def test_swapped_into_a_hugging_face_block_the_loss_reaches_the_total() -> None:
    pytest.importorskip("transformers", reason="install the `hf` extra: pip install -e '.[hf]'")
    from lightning_moe.hf_module import HFMoEFineTune

    config = dict(model_type="qwen2_moe", vocab_size=256, hidden_size=32, intermediate_size=64,
                  moe_intermediate_size=16, shared_expert_intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                  max_position_embeddings=32)
    router = functools.partial(TopKRouter, top_k=2, scorer=partial(SelfSupervisedScorer, d_feature=8))
    module = HFMoEFineTune(config=config, train="routers", moe=MoEConfig(router=router, balancers=[SwitchAuxLoss()]))
    module.train()
    lm_loss, aux = module._losses({"input_ids": torch.randint(0, 256, (2, 17))})
    assert set(aux) == {"aux_loss", "ssl_loss"} and aux["ssl_loss"].requires_grad
    views = find_moe_layers(module)
    assert len(views) == 2 and all([w.name for w in v.loss_weights] == ["ssl_loss"] for v in views)

    # train="routers" makes the routers trainable, but a frozen pre-trained extractor stays frozen.
    frozen = functools.partial(TopKRouter, top_k=2, scorer=partial(SelfSupervisedScorer, d_feature=8,
                                                                   freeze_extractor=True))
    module = HFMoEFineTune(config=config, train="routers", moe=MoEConfig(router=frozen))
    scorers = [m for m in module.modules() if isinstance(m, SelfSupervisedScorer)]
    assert len(scorers) == 2 and all(s.frozen and s.head_EH.requires_grad for s in scorers)
    assert not any(p.requires_grad for s in scorers for p in s.extractor_parameters())
