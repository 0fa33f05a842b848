"""Tiny random-initialised Hugging Face MoE models of every supported family (no hub), shared by
the integration tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers
from torch import Tensor, nn

TOKENS = dict(vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=32)
SMALL = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2)


def mixtral() -> nn.Module:
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **TOKENS, **SMALL, intermediate_size=64, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2))


def qwen2_moe() -> nn.Module:
    # Layer 1 is a dense MLP (mlp_only_layers), so only layers 0 and 2 are MoE blocks.
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        **TOKENS, **SMALL, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=32,
        num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1]))


def qwen3_moe() -> nn.Module:
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **TOKENS, **SMALL, head_dim=8, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=True))


def olmoe() -> nn.Module:
    return transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
        **TOKENS, **SMALL, intermediate_size=16, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2))


def deepseek_v3(n_shared_experts: int = 1) -> nn.Module:
    # 8 experts in 4 groups of 2, 2 groups kept: the group limit changes choices. Layer 0 is dense.
    return transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        **TOKENS, hidden_size=32, num_attention_heads=4, num_key_value_heads=4, intermediate_size=64,
        moe_intermediate_size=16, num_hidden_layers=3, n_routed_experts=8, n_shared_experts=n_shared_experts,
        num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8))


# family -> (builder, MoE block names, experts, top-k)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], list[str], int, int]] = {
    "mixtral": (mixtral, ["model.layers.0.mlp", "model.layers.1.mlp"], 4, 2),
    "qwen2_moe": (qwen2_moe, ["model.layers.0.mlp", "model.layers.2.mlp"], 4, 2),
    "qwen3_moe": (qwen3_moe, ["model.layers.0.mlp", "model.layers.1.mlp"], 4, 2),
    "olmoe": (olmoe, ["model.layers.0.mlp", "model.layers.1.mlp"], 4, 2),
    "deepseek_v3": (deepseek_v3, ["model.layers.1.mlp", "model.layers.2.mlp"], 8, 2),
}
BATCH, SEQ = 2, 12


def build(family: str) -> nn.Module:
    torch.manual_seed(0)
    return FAMILIES[family][0]().eval()


def ids() -> Tensor:
    return torch.randint(0, 64, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
