"""Conversion between Hugging Face 5.x MoE blocks and MoELayer: parity, round trips, whole models, errors.

Tiny random-initialised models of every family (no hub), float32 on CPU. The expected weight
layout is written out here (``_grads``), independently of the module's own mapping.

Legend: ``T`` tokens, ``D`` model width, ``E`` experts, ``F`` expert hidden width, ``K`` experts per token.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

transformers = pytest.importorskip("transformers", reason="install the `hf` extra: pip install -e '.[hf]'")

from hf_models import BATCH, FAMILIES, SEQ, SMALL, TOKENS, build, deepseek_v3, ids  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # noqa: E402

from lightning_moe.balancing.losses import SwitchAuxLoss  # noqa: E402
from lightning_moe.discovery import LightningMoEView, find_moe_layers  # noqa: E402
from lightning_moe.integrations.hf import HF_FAMILIES, HFFamily, HFMoEView, supported_families  # noqa: E402
from lightning_moe.integrations.hf_convert import (  # noqa: E402
    hf_family,
    moe_layer_from_hf,
    moe_layer_to_hf,
    to_hugging_face,
    to_lightning_moe,
)
from lightning_moe.layers import MoELayer  # noqa: E402
from lightning_moe.routing import ExpertChoiceRouter, GroupLimitedTopKRouter, MLPScorer, TopKRouter  # noqa: E402
from lightning_moe.routing.capacity import ExpertCapacity  # noqa: E402
from lightning_moe.routing.routing import Routing  # noqa: E402
from lightning_moe.routing.topk import token_choice_routing  # noqa: E402


def randomise(model: nn.Module, family: str) -> None:
    """Weights large enough that the MoE blocks matter and routing is far from uniform; for
    DeepSeek-V3 a non-zero correction bias (the scaling factor is the config's 2.5)."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name in FAMILIES[family][1]:
            block = model.get_submodule(name)
            for p in block.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            if family == "deepseek_v3":
                block.gate.e_score_correction_bias.copy_(torch.randn(8, generator=gen) * 0.3)


def block_of(family: str) -> tuple[nn.Module, nn.Module]:
    model = build(family)
    randomise(model, family)
    return model, model.get_submodule(FAMILIES[family][1][0])


def hf_topk(block: nn.Module, x: Tensor) -> Tensor:
    """``(T, K)`` experts the HF gate chooses, read from its output."""
    seen: list[Tensor] = []
    handle = block.gate.register_forward_hook(lambda m, a, out: seen.append(out[2]))
    block(x)
    handle.remove()
    return seen[0]


def _grads(family: str, block: nn.Module, layer: MoELayer) -> list[tuple[str, Tensor, Tensor]]:
    """``(name, HF grad in our layout, our grad)`` for every converted weight."""
    up_EFD, down_EDF = block.experts.gate_up_proj.grad, block.experts.down_proj.grad
    F = down_EDF.shape[-1]
    pairs = [("router", block.gate.weight.grad, layer.router.scorer.weight_ED.grad),
             ("gate", up_EFD[:, :F].transpose(1, 2), layer.experts.w_gate_EDF.grad),
             ("up", up_EFD[:, F:].transpose(1, 2), layer.experts.w_up_EDF.grad),
             ("down", down_EDF.transpose(1, 2), layer.experts.w_out_EFD.grad)]
    shared = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
    if shared is not None and layer.shared_expert is not None:
        pairs += [(f"shared.{o}", getattr(shared, t).weight.grad, getattr(layer.shared_expert, o).weight.grad)
                  for o, t in (("gate", "gate_proj"), ("up", "up_proj"), ("out", "down_proj"))]
    if family == "qwen2_moe":
        pairs.append(("shared_gate", block.shared_expert_gate.weight.grad, layer.shared_expert_gate.weight.grad))
    return pairs


def assert_close(name: str, actual: Tensor, expected: Tensor, rtol: float = 1e-5) -> None:
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"{name}: max error {err:.3g} at scale {scale:.3g}"


# -- block level --------------------------------------------------------------------------------


def assert_block_parity(family: str, block: nn.Module, layer: MoELayer) -> None:
    """Same experts chosen, same output, same input and weight gradients as the HF block."""
    D = block.gate.weight.shape[1]
    x_hf = torch.randn(BATCH, SEQ, D, generator=torch.Generator().manual_seed(3), requires_grad=True)
    x_ours = x_hf.detach().clone().requires_grad_(True)
    probe = torch.randn(BATCH, SEQ, D, generator=torch.Generator().manual_seed(4))

    chosen_TK = hf_topk(block, x_hf.detach())
    ours_TK = layer.router(x_hf.detach().reshape(-1, D)).expert_A.view(chosen_TK.shape)
    assert torch.equal(chosen_TK.sort(dim=-1).values, ours_TK.sort(dim=-1).values)

    y_hf, y_ours = block(x_hf), layer(x_ours)
    assert_close("output", y_ours, y_hf)
    (y_hf * probe).sum().backward()
    (y_ours * probe).sum().backward()
    assert_close("input grad", x_ours.grad, x_hf.grad)
    for name, expected, actual in _grads(family, block, layer):
        assert_close(f"{name} grad", actual, expected)


@pytest.mark.parametrize("dispatcher", ["loop", "grouped"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_block_parity_forward_backward_and_choices(family: str, dispatcher: str) -> None:
    _, block = block_of(family)
    layer = moe_layer_from_hf(block, dispatcher=dispatcher)
    assert hf_family(block) == family
    assert_block_parity(family, block, layer)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_deepseek_with_no_shared_experts_converts_without_one() -> None:
    """``n_shared_experts=0``: transformers builds a zero-width shared MLP (output exactly 0); our layer has none."""
    torch.manual_seed(0)
    model = deepseek_v3(n_shared_experts=0).eval()
    randomise(model, "deepseek_v3")
    block = model.get_submodule(FAMILIES["deepseek_v3"][1][0])
    assert block.shared_experts.gate_proj.weight.shape[0] == 0
    layer = moe_layer_from_hf(block, dispatcher="loop")
    assert layer.shared_expert is None and layer.shared_d_ff == 0
    assert_block_parity("deepseek_v3", block, layer)

    fresh = type(block)(model.config).eval()
    moe_layer_to_hf(layer, fresh)
    expected, actual = block.state_dict(), fresh.state_dict()
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    tokens = ids()
    with torch.no_grad():
        before = model(tokens).logits
        to_lightning_moe(model)
        assert_close("logits", model(tokens).logits, before)
        to_hugging_face(model)
        assert torch.equal(model(tokens).logits, before)


def test_a_new_family_is_one_table_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A block class the table did not know, described by one entry: discovery, conversion and messages follow."""
    model, block = block_of("qwen3_moe")
    block.__class__ = type("MyMoeBlock", (type(block),), {})  # matched by its own name before its base's
    monkeypatch.setitem(HF_FAMILIES, "my_moe", HFFamily("my_moe", "My-MoE", ("MyMoeBlock",), "unused", HFMoEView))
    assert hf_family(block) == "my_moe" and supported_families().endswith("DeepSeek-V3 and My-MoE")
    view = find_moe_layers(model)[0]
    assert view.module is block and type(view) is HFMoEView and view.family == "my_moe"
    layer = moe_layer_from_hf(block)
    assert layer.router.renormalize is True  # read from the gate's norm_topk_prob
    assert_block_parity("qwen3_moe", block, layer)


def _softmax_topk(logits_TE: Tensor, top_k: int) -> Routing:
    """The routing HF's load-balancing loss assumes: softmax scores, top-k of them."""
    scores_TE = logits_TE.float().softmax(dim=-1)
    gates_TK, experts_TK = scores_TE.topk(top_k, dim=-1)
    return token_choice_routing(scores_TE, logits_TE, experts_TK, gates_TK)


def test_switch_aux_coefficient_corresponds_to_router_aux_loss_coef() -> None:
    """The relation stated in hf_convert's docstring, on a 4-layer Mixtral's own router logits."""
    L, E, K, c = 4, 4, 2, 0.02
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **TOKENS, **SMALL, intermediate_size=64, num_hidden_layers=L, num_local_experts=E, num_experts_per_tok=K,
        output_router_logits=True, router_aux_loss_coef=c)).eval()
    with torch.no_grad():  # sharper gates: the layers' loads differ
        for block in (model.get_submodule(f"model.layers.{i}.mlp") for i in range(L)):
            block.gate.weight.mul_(30)
        tokens = ids()
        out = model(tokens, labels=tokens)
        lm_only = model(tokens, labels=tokens, output_router_logits=False).loss
    hf = c * out.aux_loss
    assert_close("what the model adds", out.loss - lm_only, hf, rtol=1e-4)
    logits = out.router_logits
    routings = [_softmax_topk(logits_TE, K) for logits_TE in logits]

    for logits_TE, routing in zip(logits, routings, strict=True):  # one block: exact
        assert_close("one layer", SwitchAuxLoss(K * c).loss(routing), c * load_balancing_loss_func((logits_TE,), E, K))
    assert_close("pooled", SwitchAuxLoss(K * c).loss(_softmax_topk(torch.cat(logits), K)), hf)

    per_layer = sum(SwitchAuxLoss(K * c / L).loss(r) for r in routings)
    f_LE = torch.stack([r.tokens_per_expert().float() / r.expert_A.numel() for r in routings])
    p_LE = torch.stack([r.scores_TE.mean(dim=0) for r in routings])
    covariance = ((f_LE * p_LE).mean(dim=0) - f_LE.mean(dim=0) * p_LE.mean(dim=0)).sum()
    assert not torch.allclose(per_layer, hf, rtol=1e-2)
    assert_close("per layer", per_layer, hf + K * c * E * covariance)

    # Every layer routing alike: the per-layer losses sum to HF's, and push each layer's logits the same way.
    theirs = [logits[0].detach().clone().requires_grad_(True) for _ in range(L)]
    ours = [logits[0].detach().clone().requires_grad_(True) for _ in range(L)]
    hf_same = c * load_balancing_loss_func(tuple(theirs), E, K)
    ours_same = sum(SwitchAuxLoss(K * c / L).loss(_softmax_topk(x, K)) for x in ours)
    assert_close("same routing", ours_same, hf_same)
    hf_same.backward()
    ours_same.backward()
    for mine, reference in zip(ours, theirs, strict=True):
        assert_close("logit grad", mine.grad, reference.grad)


def test_deepseek_bias_scaling_and_group_limit_all_matter() -> None:
    _, block = block_of("deepseek_v3")
    gate = block.gate
    assert gate.routed_scaling_factor != 1.0 and gate.e_score_correction_bias.abs().min() > 0
    x_TD = torch.randn(BATCH * SEQ, 32, generator=torch.Generator().manual_seed(3))
    choice_TE = torch.sigmoid(x_TD @ gate.weight.T) + gate.e_score_correction_bias
    unbiased = torch.sigmoid(x_TD @ gate.weight.T).topk(2, dim=-1).indices.sort(-1).values
    unlimited = choice_TE.topk(2, dim=-1).indices.sort(-1).values
    chosen = hf_topk(block, x_TD.unsqueeze(0)).sort(-1).values
    assert (chosen != unlimited).any(dim=-1).any(), "the group limit never binds"
    assert (chosen != unbiased).any(dim=-1).any(), "the bias never changes a choice"
    router = moe_layer_from_hf(block).router
    assert isinstance(router, GroupLimitedTopKRouter)
    assert (router.num_groups, router.topk_groups, router.group_score) == (4, 2, "top2_sum")
    assert router.scaling_factor == gate.routed_scaling_factor and router.score_func == "sigmoid"
    assert torch.equal(router.expert_bias_E, gate.e_score_correction_bias)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_to_a_fresh_block_from_config(family: str) -> None:
    model, block = block_of(family)
    layer = moe_layer_from_hf(block)
    fresh = type(block)(model.config).eval()
    assert moe_layer_to_hf(layer, fresh) is fresh
    expected, actual = block.state_dict(), fresh.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    x = torch.randn(BATCH, SEQ, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(fresh(x), block(x))


def test_tensors_follow_the_block_dtype_and_requires_grad() -> None:
    _, block = block_of("qwen2_moe")
    block.to(torch.bfloat16)
    block.experts.down_proj.requires_grad_(False)
    layer = moe_layer_from_hf(block)
    assert {p.dtype for p in layer.parameters()} == {torch.bfloat16}
    assert not layer.experts.w_out_EFD.requires_grad and layer.experts.w_gate_EDF.requires_grad
    assert layer.experts.w_gate_EDF.is_contiguous()


# -- whole models -------------------------------------------------------------------------------


@pytest.mark.parametrize("dispatcher", ["loop", "grouped"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_whole_model_conversion_keeps_logits_and_loss(family: str, dispatcher: str) -> None:
    model = build(family)
    randomise(model, family)
    tokens = ids()
    with torch.no_grad():
        before = model(tokens, labels=tokens)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    names = to_lightning_moe(model, dispatcher=dispatcher, balancers=[SwitchAuxLoss(0.01)])
    assert names == FAMILIES[family][1]
    assert all(isinstance(model.get_submodule(n), MoELayer) for n in names)
    out = model(tokens, labels=tokens)
    assert_close("logits", out.logits, before.logits)
    assert_close("loss", out.loss, before.loss)
    views = find_moe_layers(model)
    assert [v.name for v in views] == names and all(isinstance(v, LightningMoEView) for v in views)
    aux = sum(v.aux_losses["aux_loss"] for v in views)
    (out.loss + aux).backward()
    assert all(v.module.router.scorer.weight_ED.grad is not None for v in views)

    assert to_hugging_face(model) == names
    assert all(hf_family(model.get_submodule(n)) == family for n in names)
    restored = model.state_dict()
    assert restored.keys() == state.keys() and all(torch.equal(restored[k], state[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, before.logits)


def test_bf16_model_round_trip_keeps_every_dtype() -> None:
    model = build("deepseek_v3").to(torch.bfloat16)
    for name in FAMILIES["deepseek_v3"][1]:  # as from_pretrained loads it: the bias kept in float32
        gate = model.get_submodule(name).gate
        gate.e_score_correction_bias = gate.e_score_correction_bias.float().normal_()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    to_lightning_moe(model)
    layer = model.get_submodule(FAMILIES["deepseek_v3"][1][0])
    assert layer.experts.w_gate_EDF.dtype == torch.bfloat16 and layer.router.expert_bias_E.dtype == torch.float32
    assert torch.isfinite(model(ids()).logits).all()
    to_hugging_face(model)
    restored = model.state_dict()
    assert all(restored[k].dtype == v.dtype and torch.equal(restored[k], v) for k, v in state.items())


def test_output_router_logits_is_switched_off_with_a_warning() -> None:
    model = build("mixtral")
    model.config.output_router_logits = True
    with pytest.warns(UserWarning, match="output_router_logits"):
        to_lightning_moe(model)
    assert model.config.output_router_logits is False
    assert torch.isfinite(model(ids(), labels=ids()).loss)


def test_the_family_table_names_each_model_type_and_its_block_class() -> None:
    model_types = {build(f).config.model_type for f in FAMILIES}
    assert set(HF_FAMILIES) == set(FAMILIES) == model_types
    for name, family in HF_FAMILIES.items():
        block = build(name).get_submodule(FAMILIES[name][1][0])
        assert family.name == name and family.block_class() is type(block)


# -- errors -------------------------------------------------------------------------------------


def test_unsupported_module_is_named_with_the_supported_classes() -> None:
    with pytest.raises(ValueError, match="Linear is not a supported Hugging Face MoE block.*MixtralSparseMoeBlock"):
        moe_layer_from_hf(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="moe_layer_from_hf"):
        to_lightning_moe(block_of("olmoe")[1])
    _, block = block_of("qwen3_moe")
    block.gate = nn.Module()
    block.gate.router = TopKRouter(32, 4, 2)  # what swap_routers puts there
    with pytest.raises(ValueError, match="holding our TopKRouter"):
        moe_layer_from_hf(block)
    with pytest.raises(ValueError, match="model_type"):
        to_hugging_face(nn.Sequential(MoELayer(8, 16, 4)))


def test_the_4x_per_expert_layout_asks_for_transformers_5() -> None:
    legacy = type("MixtralSparseMoeBlock", (nn.Module,), {})()
    legacy.gate = nn.Linear(8, 2, bias=False)
    legacy.experts = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
    with pytest.raises(ValueError, match=r"transformers 4\.x.*transformers>=5 \(installed: 5\."):
        moe_layer_from_hf(legacy)


def test_non_silu_experts_are_refused() -> None:
    config = build("olmoe").config
    config.hidden_act = "gelu"
    block = type(block_of("olmoe")[1])(config)
    with pytest.raises(ValueError, match="activation.*only silu"):
        moe_layer_from_hf(block)


def test_mixtral_jitter_maps_to_router_jitter_with_a_warning() -> None:
    model, block = block_of("mixtral")
    block.jitter_noise = 0.1
    with pytest.warns(UserWarning, match="jitter"):
        layer = moe_layer_from_hf(block)
    assert layer.router.jitter == 0.1
    with pytest.raises(ValueError, match="`jitter` is 0.1 but the mixtral block needs 0.0"):
        moe_layer_to_hf(layer, type(block)(model.config))


@pytest.mark.parametrize(("field", "value", "tensor"), [
    ("num_local_experts", 8, "router.scorer.weight_ED"),
    ("intermediate_size", 32, "experts.w_gate_EDF"),
])
def test_shape_mismatch_names_the_tensor_and_both_shapes(field: str, value: int, tensor: str) -> None:
    model, block = block_of("mixtral")
    layer = moe_layer_from_hf(block)
    config = model.config
    setattr(config, field, value)
    other = type(block)(config)
    with pytest.raises(ValueError, match=rf"Shape mismatch: our `{tensor}` has shape \(.*\) but .* has \("):
        moe_layer_to_hf(layer, other)


def _layer_with_router(family: str, router: nn.Module, **layer_kwargs) -> tuple[MoELayer, nn.Module]:
    _, block = block_of(family)
    layer = moe_layer_from_hf(block)
    D, F, E = layer.d_model, layer.experts.d_ff, layer.num_experts
    shared = dict(shared_d_ff=layer.shared_d_ff, shared_gate=layer.shared_expert_gate is not None)
    return MoELayer(D, F, E, router=router, **(shared | layer_kwargs)), block


@pytest.mark.parametrize(("family", "router", "match"), [
    ("mixtral", lambda: TopKRouter(32, 4, 2, score_func="sigmoid"), "`score_func` is 'sigmoid'.*needs 'softmax'"),
    ("mixtral", lambda: TopKRouter(32, 4, 2, renormalize=False), "`renormalize` is False"),
    ("olmoe", lambda: TopKRouter(32, 4, 1, renormalize=False), "`top_k` is 1 but the olmoe block needs 2"),
    ("qwen3_moe", lambda: TopKRouter(32, 4, 2, scaling_factor=2.0), "`scaling_factor`"),
    ("qwen3_moe", lambda: TopKRouter(32, 4, 2, scorer=MLPScorer), "scorer is a MLPScorer"),
    ("mixtral", lambda: ExpertChoiceRouter(32, 4), "router is a ExpertChoiceRouter"),
    ("deepseek_v3", lambda: GroupLimitedTopKRouter(32, 8, 2, num_groups=4, topk_groups=1, group_score="top2_sum",
                                                   score_func="sigmoid", scaling_factor=2.5, expert_bias=True),
     "`topk_groups` is 1 but the deepseek_v3 block needs 2"),
    ("deepseek_v3", lambda: GroupLimitedTopKRouter(32, 8, 2, num_groups=4, topk_groups=2, group_score="max",
                                                   score_func="sigmoid", scaling_factor=2.5, expert_bias=True),
     "`group_score` is 'max'"),
])
def test_unrepresentable_router_names_the_setting(family: str, router, match: str) -> None:
    layer, block = _layer_with_router(family, router())
    with pytest.raises(ValueError, match=match):
        moe_layer_to_hf(layer, block)


def test_softmax_bias_capacity_and_shared_expert_mismatches() -> None:
    router = TopKRouter(32, 4, 2, renormalize=True, expert_bias=True)
    router.expert_bias_E.fill_(0.5)
    layer, block = _layer_with_router("mixtral", router)
    with pytest.raises(ValueError, match="non-zero `expert_bias_E`"):
        moe_layer_to_hf(layer, block)
    layer, block = _layer_with_router("mixtral", TopKRouter(32, 4, 2), capacity=ExpertCapacity(1.0))
    with pytest.raises(ValueError, match="capacity"):
        moe_layer_to_hf(layer, block)
    layer, block = _layer_with_router("qwen2_moe", TopKRouter(32, 4, 2, renormalize=False), shared_d_ff=0,
                                      shared_gate=False)
    with pytest.raises(ValueError, match="shared_d_ff=0 but the qwen2_moe block has shared expert"):
        moe_layer_to_hf(layer, block)
    layer, block = _layer_with_router("deepseek_v3", GroupLimitedTopKRouter(
        32, 8, 2, num_groups=4, topk_groups=2, group_score="top2_sum", score_func="sigmoid", scaling_factor=2.5),
        shared_gate=True)
    with pytest.raises(ValueError, match="has `shared_expert_gate` but the deepseek_v3 block has none"):
        moe_layer_to_hf(layer, block)
