"""swap_routers: our routers in place of the gates of Hugging Face MoE blocks (tiny random models, no hub)."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_moe.balancing.losses import SwitchAuxLoss, ZLoss
from lightning_moe.callbacks import RoutingEntropyLogger
from lightning_moe.discovery import find_moe_layers
from lightning_moe.routing import (
    AttentionScorer,
    ExpertCapacity,
    ExpertChoiceRouter,
    GroupLimitedTopKRouter,
    Routing,
    TopKRouter,
)

transformers = pytest.importorskip("transformers", reason="install the `hf` extra: pip install -e '.[hf]'")

from hf_models import BATCH, FAMILIES, SEQ, TOKENS, build, ids  # noqa: E402

from lightning_moe.integrations.hf import SwappedRouterView  # noqa: E402
from lightning_moe.integrations.hf_routers import RouterGate, swap_routers  # noqa: E402

VOCAB = TOKENS["vocab_size"]


pytestmark = pytest.mark.usefixtures("one_thread")


def blocks_of(model: nn.Module, family: str) -> list[nn.Module]:
    return [model.get_submodule(name) for name in FAMILIES[family][1]]


def not_gates(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter outside the blocks' gates (the shared experts' sigmoid gate included)."""
    return {n: p for n, p in model.named_parameters() if ".gate." not in n}


def matching_router(model: nn.Module, family: str):  # noqa: ANN201
    """Our router with the family's own selection rule (its weights copied by init_from_gate)."""
    config = model.config
    top_k = FAMILIES[family][3]
    if family == "deepseek_v3":
        return functools.partial(
            GroupLimitedTopKRouter, top_k=top_k, num_groups=config.n_group, topk_groups=config.topk_group,
            group_score="top2_sum", renormalize=config.norm_topk_prob, score_func="sigmoid",
            scaling_factor=config.routed_scaling_factor, expert_bias=True)
    renormalize = True if family == "mixtral" else config.norm_topk_prob
    return functools.partial(TopKRouter, top_k=top_k, renormalize=renormalize)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_swapped_model_runs_and_only_the_router_is_new(family: str) -> None:
    model = build(family)
    _, names, num_experts, top_k = FAMILIES[family]
    old_views = find_moe_layers(model)  # cached views with hooks on the old gates
    old_gates = [b.gate for b in blocks_of(model, family)]
    others = not_gates(model)
    values = {n: p.detach().clone() for n, p in others.items()}

    factory = functools.partial(TopKRouter, top_k=top_k, scorer=functools.partial(AttentionScorer, d_key=8))
    assert swap_routers(model, factory, [SwitchAuxLoss(0.01), ZLoss(0.001)]) == names
    out = model(input_ids=ids(), labels=ids())
    assert out.logits.shape == (BATCH, SEQ, VOCAB) and out.logits.isfinite().all()
    out.loss.backward()

    assert not_gates(model).keys() == others.keys()
    assert all(p is others[n] and torch.equal(p, values[n]) for n, p in not_gates(model).items())
    assert all(len(g._forward_hooks) == 0 for g in old_gates)  # the stale views' hooks are gone
    views = find_moe_layers(model)
    assert [v.name for v in views] == names
    for view, old_view, block in zip(views, old_views, blocks_of(model, family), strict=True):
        gate = block.gate
        assert isinstance(gate, RouterGate) and isinstance(view, SwappedRouterView) and view is not old_view
        assert view.family == family and view.num_experts == num_experts
        scorer = gate.router.scorer
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in scorer.parameters())
        stats = view.stats
        assert stats.num_tokens == BATCH * SEQ and int(stats.tokens_per_expert_E.sum()) == BATCH * SEQ * top_k
        assert set(view.aux_losses) == {"aux_loss", "z_loss"} and view.aux_losses is gate.aux_losses
        assert view.balancers is gate.balancers and view.expert_bias is None
        assert view.router_rows() == [scorer.keys_EQ]
        assert [t is e for t, e in zip(view.expert_tensors(), [block.experts.gate_up_proj, block.experts.down_proj],
                                        strict=True)] == [True, True]
    assert find_moe_layers(model) == views  # cached


@pytest.mark.parametrize("family", list(FAMILIES))
def test_init_from_gate_with_the_family_rule_reproduces_the_model(family: str) -> None:
    model = build(family)
    if family == "deepseek_v3":  # a bias offset that init_from_gate must carry over
        for block in blocks_of(model, family):
            block.gate.e_score_correction_bias.copy_(torch.linspace(-0.02, 0.02, FAMILIES[family][2]))
    with torch.no_grad():
        before = model(input_ids=ids()).logits
    swap_routers(model, matching_router(model, family), init_from_gate=True)
    with torch.no_grad():
        after = model(input_ids=ids()).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    if family == "deepseek_v3":
        bias = find_moe_layers(model)[0].expert_bias
        assert bias is blocks_of(model, family)[0].gate.router.expert_bias_E and bias.dtype == torch.float32
        assert torch.equal(bias, torch.linspace(-0.02, 0.02, 8))


def reference_experts(experts: nn.Module, x_TD: Tensor, routing: Routing) -> Tensor:
    """``sum_a weight_a * expert_{e_a}(x_{t_a})``, one assignment at a time (SwiGLU experts, as in 5.x)."""
    y_TD = torch.zeros_like(x_TD)
    for token, expert, weight in zip(routing.token_A.tolist(), routing.expert_A.tolist(), routing.weight_A,
                                     strict=True):
        gate, up = F.linear(x_TD[token], experts.gate_up_proj[expert]).chunk(2, dim=-1)
        y_TD[token] = y_TD[token] + weight * F.linear(experts.act_fn(gate) * up, experts.down_proj[expert])
    return y_TD


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
@pytest.mark.parametrize("kind", ["expert_choice", "capacity_drops"])
def test_padded_routings_match_a_reference(kind: str, implementation: str) -> None:
    model = build("mixtral").train()
    model.set_experts_implementation(implementation)
    if kind == "expert_choice":
        swap_routers(model, functools.partial(ExpertChoiceRouter, capacity_factor=1.5))
    else:
        swap_routers(model, TopKRouter, capacity=ExpertCapacity(capacity_factor=0.5, min_capacity=1))
    block = blocks_of(model, "mixtral")[0]
    x_TD = torch.randn(20, 32, generator=torch.Generator().manual_seed(3), requires_grad=True)

    _, weights_TK, indices_TK = block.gate(x_TD)
    routing = block.gate.routing
    pad = indices_TK.numel() - routing.expert_A.numel()
    assert pad > 0 and (weights_TK == 0).sum() >= pad  # some slots are padding
    assert ((indices_TK == 4).sum() == pad) == (implementation == "eager")  # index E only for the eager loop
    if kind == "capacity_drops":
        assert int(block.gate.stats.num_dropped) == pad
    y_TD = block.experts(x_TD, indices_TK, weights_TK)
    expected_TD = reference_experts(block.experts, x_TD, routing)
    torch.testing.assert_close(y_TD, expected_TD, rtol=1e-5, atol=1e-6)

    probe_TD = torch.randn(20, 32, generator=torch.Generator().manual_seed(4))
    wrt = [block.gate.router.scorer.weight_ED, x_TD, block.experts.gate_up_proj]
    grads = torch.autograd.grad((y_TD * probe_TD).sum(), wrt, retain_graph=True)
    expected = torch.autograd.grad((expected_TD * probe_TD).sum(), wrt)
    for grad, ref in zip(grads, expected, strict=True):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6)

    logits = model(input_ids=ids()).logits
    assert logits.shape == (BATCH, SEQ, VOCAB) and logits.isfinite().all()


class SwappedLM(L.LightningModule):
    """A plain LightningModule around a swapped HF model: LM loss plus our routers' aux losses."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, ids_BS: Tensor, batch_idx: int) -> Tensor:
        loss = self.model(input_ids=ids_BS, labels=ids_BS).loss
        aux = sum(sum(v.aux_losses.values()) for v in find_moe_layers(self.model))
        self.log("train/loss", loss + aux)
        return loss + aux

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lightning_training_logs_every_swapped_layer(family: str, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = build(family).train()
    names = swap_routers(model, functools.partial(TopKRouter, top_k=2), [SwitchAuxLoss(0.01)])
    logger = L.pytorch.loggers.TensorBoardLogger(tmp_path, name="swap")
    trainer = L.Trainer(max_steps=4, logger=logger, callbacks=[RoutingEntropyLogger(image_every_n_steps=0)],
                        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    data = torch.randint(0, VOCAB, (16, SEQ), generator=torch.Generator().manual_seed(0))
    trainer.fit(SwappedLM(model), DataLoader(data, batch_size=4))

    scalars = set(EventAccumulator(logger.log_dir, size_guidance={"scalars": 0}).Reload().Tags()["scalars"])
    for i in range(len(names)):
        assert {f"routing/layer{i}/token_entropy", f"routing/layer{i}/load_cv", f"routing/layer{i}/aux_loss"} <= scalars
    assert f"routing/layer{len(names)}/token_entropy" not in scalars


def test_swapped_model_deep_copies_and_keeps_dtype() -> None:
    model = build("deepseek_v3").to(torch.bfloat16)
    swap_routers(model, functools.partial(TopKRouter, expert_bias=True))
    router = blocks_of(model, "deepseek_v3")[0].gate.router
    assert router.scorer.weight_ED.dtype == torch.bfloat16 and router.expert_bias_E.dtype == torch.float32
    twin = copy.deepcopy(model)
    with torch.no_grad():
        logits = twin(input_ids=ids()).logits
    assert logits.dtype == torch.bfloat16 and logits.isfinite().all()
    twin_views = find_moe_layers(twin)
    assert all(v.module is twin.get_submodule(v.name) and v.stats is not None for v in twin_views)
    assert all(v.stats is None for v in find_moe_layers(model))
    # A second swap replaces our gate again; init_from_gate reads the router's linear weight and bias.
    twin_router = blocks_of(twin, "deepseek_v3")[0].gate.router
    twin_router.expert_bias_E.fill_(0.5)
    swap_routers(twin, functools.partial(TopKRouter, expert_bias=True), init_from_gate=True)
    new = blocks_of(twin, "deepseek_v3")[0].gate.router
    assert new is not twin_router and torch.equal(new.scorer.weight_ED, twin_router.scorer.weight_ED)
    assert torch.equal(new.expert_bias_E, twin_router.expert_bias_E)


def test_revive_on_a_swapped_block_copies_experts_router_rows_and_bias() -> None:
    model = build("qwen3_moe")
    swap_routers(model, functools.partial(TopKRouter, expert_bias=True, scorer=AttentionScorer))
    view = find_moe_layers(model)[0]
    router = view.module.gate.router
    router.expert_bias_E.copy_(torch.arange(4.0))
    tensors = [*view.expert_tensors(), router.scorer.keys_EQ]
    changed = view.revive([1], [3], noise=0.0)
    assert {id(t) for t, rows in changed if rows == [1]} == {id(t) for t in (*tensors, router.expert_bias_E)}
    assert all(torch.equal(t[1], t[3]) for t in (*tensors, router.expert_bias_E))


def test_turns_off_the_models_own_router_aux_loss() -> None:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(**TOKENS, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                        intermediate_size=32, num_hidden_layers=1, num_local_experts=4,
                                        output_router_logits=True)
    model = transformers.MixtralForCausalLM(config)
    with pytest.warns(UserWarning, match="output_router_logits"):
        swap_routers(model, TopKRouter)
    assert model.config.output_router_logits is False
    assert model(input_ids=ids(), labels=ids()).loss.isfinite()


class MixtralSparseMoeBlock(nn.Module):  # the 4.x layout, matched by class name
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(8, 4, bias=False)
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"no supported Hugging Face MoE block in Sequential.*mixtral"):
        swap_routers(nn.Sequential(nn.Linear(4, 4)), TopKRouter)
    with pytest.raises(ValueError, match=rf"transformers>=5.*4\.x.*Installed transformers: {transformers.__version__}"):
        swap_routers(nn.Sequential(MixtralSparseMoeBlock()), TopKRouter)
    model = build("olmoe")
    with pytest.raises(ValueError, match=r"`router_factory` must build a Router for d_model=32, num_experts=4"):
        swap_routers(model, lambda d_model, num_experts: TopKRouter(d_model, num_experts + 1))
    with pytest.raises(ValueError, match="`init_from_gate=True` needs routers whose scorer is a LinearScorer"):
        swap_routers(model, functools.partial(TopKRouter, scorer=AttentionScorer), init_from_gate=True)
    with pytest.raises(ValueError, match="`balancers` must have distinct names"):
        swap_routers(model, TopKRouter, [SwitchAuxLoss(), SwitchAuxLoss()])
