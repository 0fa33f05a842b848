"""Whole-model conversion between Hugging Face ``DeepseekV3ForCausalLM`` and ``MoETransformer(attention="mla")``:
same logits and loss, bit-exact round trips, the rotary permutation, and the settings that do not convert."""

from __future__ import annotations

import types
from functools import partial

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

from lightning_moe.layers import MoEConfig, MoELayer  # noqa: E402
from lightning_moe.models import MLAConfig, MoETransformer  # noqa: E402
from lightning_moe.models.hf_deepseek_v3 import from_deepseek_v3, to_deepseek_v3  # noqa: E402
from lightning_moe.routing import GroupLimitedTopKRouter, TopKRouter  # noqa: E402
from lightning_moe.routing.scorers import LinearScorer  # noqa: E402

V, S = 64, 12


def hf_config(**overrides) -> DeepseekV3Config:
    kwargs = dict(vocab_size=V, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
                  kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=4,
                  topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=64,
                  routed_scaling_factor=2.5, attn_implementation="eager")
    return DeepseekV3Config(**(kwargs | overrides))


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, norms around 1 and a random selection bias, so any mix-up shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not tensor.is_floating_point() or name.endswith(("inv_freq", "cos_SF", "sin_SF")):
                continue
            noise = torch.randn(tensor.shape, generator=gen)
            if "norm" in name:
                tensor.copy_(1 + 0.3 * noise)
            elif "bias" in name:
                tensor.copy_(0.1 * noise)
            else:
                tensor.copy_(0.2 * noise)
    return model.eval()


def random_hf(seed: int = 0, **overrides) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    return randomise(DeepseekV3ForCausalLM(hf_config(**overrides)), seed)


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(seed))


def assert_same_logits(hf_model, ours, atol: float = 1e-5) -> None:
    tokens = ids()
    with torch.no_grad():
        out = hf_model(tokens, labels=tokens)
        logits = ours(tokens)
    torch.testing.assert_close(logits, out.logits, atol=atol, rtol=1e-5)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    torch.testing.assert_close(loss, out.loss, atol=atol, rtol=1e-5)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


CONFIGS = [dict(first_k_dense_replace=1), dict(first_k_dense_replace=0, q_lora_rank=None)]


@pytest.mark.parametrize("dispatcher", ["loop", "grouped"])
@pytest.mark.parametrize("overrides", CONFIGS, ids=["dense-first-q-lora", "all-moe-q-proj"])
def test_hf_to_ours_same_logits_and_loss(overrides, dispatcher):
    hf_model = random_hf(**overrides)
    ours = from_deepseek_v3(hf_model, dispatcher=dispatcher)
    assert ours.attention == "mla" and not ours.training
    n_moe = 3 - overrides["first_k_dense_replace"]
    assert len(ours.moe_layers()) == n_moe
    assert all(layer.dispatcher.name == dispatcher for layer in ours.moe_layers())
    assert_same_logits(hf_model, ours)


@pytest.mark.parametrize("rope_interleave", [True, False])
@pytest.mark.parametrize("overrides", CONFIGS, ids=["dense-first-q-lora", "all-moe-q-proj"])
def test_round_trips_are_bit_exact(overrides, rope_interleave):
    hf_model = random_hf(rope_interleave=rope_interleave, **overrides)
    ours = from_deepseek_v3(hf_model)
    assert_same_logits(hf_model, ours)
    back = to_deepseek_v3(ours, config=hf_model.config)
    assert_same_state(hf_model, back)
    assert_same_logits(back, ours)
    again = from_deepseek_v3(back)
    assert_same_state(ours, again)
    if rope_interleave:
        return
    # Without a config: derived from ours (rope_interleave=True, so now permuted), the same function.
    derived = to_deepseek_v3(ours)
    assert derived.config.rope_interleave and derived.config.num_mtp_layers == 0
    assert derived.config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    derived.config._attn_implementation = "eager"
    assert_same_logits(derived, ours)
    assert_same_state(ours, from_deepseek_v3(derived))


def test_rope_permutation_matters():
    """Reading an interleaved checkpoint as rotate-half gives other logits: the permutation is needed."""
    hf_model = random_hf(rope_interleave=True)
    ours = from_deepseek_v3(hf_model)
    hf_model.config.rope_interleave = False
    with torch.no_grad():
        assert not torch.allclose(hf_model(ids()).logits, ours(ids()), atol=1e-3)


def test_moe_config_describes_the_layers():
    hf_model = random_hf()
    ours = from_deepseek_v3(hf_model)
    moe = ours.moe
    assert (moe.num_experts, moe.expert_d_ff, moe.num_shared_experts, moe.granularity) == (8, 16, 1, 1)
    router = moe.router(32, 8)
    assert isinstance(router, GroupLimitedTopKRouter) and router.expert_bias_E is not None
    assert (router.top_k, router.num_groups, router.topk_groups, router.group_score) == (2, 4, 2, "top2_sum")
    assert router.score_func == "sigmoid" and router.scaling_factor == 2.5 and not router.scorer.center_input
    fresh = MoETransformer(V, max_seq_len=64, d_model=32, n_layers=3, n_heads=4, d_ff=48, moe=moe,
                           first_dense_layers=1, attention="mla", mla=ours.mla, tie_embeddings=False)
    assert fresh.parameter_counts() == ours.parameter_counts()
    hf_total = sum(p.numel() for p in hf_model.parameters())
    assert ours.parameter_counts()["total"] == hf_total


def test_keeps_dtype_and_mode():
    hf_model = random_hf().to(torch.bfloat16).train()
    ours = from_deepseek_v3(hf_model)
    assert ours.training and ours.embed.weight.dtype == torch.bfloat16
    assert ours.moe_layers()[0].experts.w_gate_EDF.dtype == torch.bfloat16
    back = to_deepseek_v3(ours, config=hf_model.config)
    assert back.training
    assert_same_state(hf_model, back)


def ours_mla(**overrides) -> MoETransformer:
    router = partial(GroupLimitedTopKRouter, top_k=2, num_groups=4, topk_groups=2, group_score="top2_sum",
                     scorer=partial(LinearScorer, center_input=False), score_func="sigmoid", expert_bias=True,
                     scaling_factor=2.5)
    kwargs = dict(max_seq_len=32, d_model=32, n_layers=3, n_heads=4, d_ff=48, first_dense_layers=1,
                  attention="mla", rope_base=500.0, tie_embeddings=False,
                  mla=MLAConfig(q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
                  moe=MoEConfig(num_experts=8, expert_d_ff=16, num_shared_experts=1, router=router, balancers=[]))
    torch.manual_seed(0)
    return randomise(MoETransformer(V, **(kwargs | overrides)), seed=3)


@pytest.mark.parametrize("tie", [False, True])
def test_ours_to_hf_same_logits(tie):
    ours = ours_mla(tie_embeddings=tie)
    hf_model = to_deepseek_v3(ours)
    config = hf_model.config
    assert config.rope_parameters["rope_theta"] == 500.0 and config.tie_word_embeddings == tie
    assert (config.first_k_dense_replace, config.n_group, config.topk_group, config.n_shared_experts) == (1, 4, 2, 1)
    assert config.max_position_embeddings == 32 and config.intermediate_size == 48
    if tie:
        assert hf_model.lm_head.weight is hf_model.model.embed_tokens.weight
    hf_model.config._attn_implementation = "eager"
    assert_same_logits(hf_model, ours)
    assert_same_state(ours, from_deepseek_v3(hf_model))


def test_ours_plain_topk_router_converts():
    router = partial(TopKRouter, top_k=2, scorer=partial(LinearScorer, center_input=False), score_func="sigmoid")
    ours = ours_mla(moe=MoEConfig(num_experts=8, expert_d_ff=16, router=router, balancers=[]), first_dense_layers=0)
    hf_model = to_deepseek_v3(ours)
    assert (hf_model.config.n_group, hf_model.config.topk_group, hf_model.config.n_shared_experts) == (1, 1, 0)
    assert_same_logits(hf_model, ours)


def test_mtp_is_dropped_with_a_warning():
    ours = ours_mla(mtp_depth=1)
    with pytest.warns(UserWarning, match="multi-token prediction"):
        hf_model = to_deepseek_v3(ours)
    assert not any("mtp" in name for name in hf_model.state_dict())
    assert_same_logits(hf_model, ours)


def test_unsupported_hf_settings():
    with pytest.raises(ValueError, match="model_type"):
        from_deepseek_v3(types.SimpleNamespace(config=types.SimpleNamespace(model_type="llama")))
    hf_model = random_hf()
    hf_model.config.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                       "original_max_position_embeddings": 16}
    with pytest.raises(ValueError, match="rope_parameters.*yarn"):
        from_deepseek_v3(hf_model)
    with pytest.raises(ValueError, match="attention_bias"):
        from_deepseek_v3(random_hf(attention_bias=True))
    with pytest.raises(ValueError, match="rms_norm_eps"):
        from_deepseek_v3(random_hf(rms_norm_eps=1e-5))
    with pytest.warns(UserWarning, match="attention_dropout"):
        from_deepseek_v3(random_hf(attention_dropout=0.1))


def test_unsupported_ours():
    with pytest.raises(ValueError, match="attention='mha'"):
        to_deepseek_v3(MoETransformer(V, d_model=32, n_layers=2, n_heads=4, attention="mha"))
    with pytest.raises(ValueError, match="moe_every"):
        to_deepseek_v3(ours_mla(first_dense_layers=0, moe_every=2))
    softmax = partial(TopKRouter, top_k=2, scorer=partial(LinearScorer, center_input=False))
    with pytest.raises(ValueError, match="score_func"):
        to_deepseek_v3(ours_mla(moe=MoEConfig(num_experts=8, expert_d_ff=16, router=softmax, balancers=[])))
    with pytest.raises(ValueError, match="shared_expert_gate"):
        to_deepseek_v3(ours_mla(moe=MoEConfig(num_experts=8, expert_d_ff=16, router=softmax, balancers=[],
                                              num_shared_experts=1, shared_expert_gate=True)))
    with pytest.raises(ValueError, match="rope_theta"):
        to_deepseek_v3(ours_mla(), config=hf_config(max_position_embeddings=32))
    assert isinstance(ours_mla().blocks[1].ffn, MoELayer)
