"""Whole-model conversion both ways between Hugging Face ``DeepseekV3ForCausalLM`` and
:class:`~lightning_moe.models.MoETransformer` (``attention="mla"``).

Legend: ``D`` model width, ``H`` heads, ``N``/``R`` non-rotary and rotary query/key head widths
(``qk_nope_head_dim``, ``qk_rope_head_dim``), ``Dv`` value head width, ``Cq``/``Ckv`` query and
key-value latent widths (``q_lora_rank``, ``kv_lora_rank``), ``L`` decoder layers, ``K`` MTP depths.

:func:`from_deepseek_v3` and :func:`to_deepseek_v3` give models computing the same logits (and the
same loss). The MoE blocks go through :func:`~lightning_moe.integrations.hf_convert.moe_layer_from_hf`
and :func:`~lightning_moe.integrations.hf_convert.moe_layer_to_hf` (their docstrings give the router
and expert layout); everything else is the table below. Conversion both ways is bit-exact: a round
trip returns every state-dict tensor unchanged.

Weight names, HF -> ours (``i`` a layer; every tensor copied as is, except the rows marked ``perm``)::

    model.embed_tokens.weight                               -> embed.weight
    model.layers.{i}.input_layernorm.weight                 -> blocks.{i}.attn_norm.weight
    model.layers.{i}.self_attn.q_proj.weight         (perm) -> blocks.{i}.attn.q_proj.weight  (no q_lora_rank)
    model.layers.{i}.self_attn.q_a_proj.weight              -> blocks.{i}.attn.q_down.weight
    model.layers.{i}.self_attn.q_a_layernorm.weight         -> blocks.{i}.attn.q_norm.weight
    model.layers.{i}.self_attn.q_b_proj.weight       (perm) -> blocks.{i}.attn.q_up.weight
    model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight (perm) -> blocks.{i}.attn.kv_down.weight
    model.layers.{i}.self_attn.kv_a_layernorm.weight        -> blocks.{i}.attn.kv_norm.weight
    model.layers.{i}.self_attn.kv_b_proj.weight             -> blocks.{i}.attn.kv_up.weight
    model.layers.{i}.self_attn.o_proj.weight                -> blocks.{i}.attn.proj.weight
    model.layers.{i}.post_attention_layernorm.weight        -> blocks.{i}.ffn_norm.weight
    model.layers.{i}.mlp.gate_proj.weight                   -> blocks.{i}.ffn.gate.weight  (dense: i < first_k)
    model.layers.{i}.mlp.up_proj.weight                     -> blocks.{i}.ffn.up.weight
    model.layers.{i}.mlp.down_proj.weight                   -> blocks.{i}.ffn.out.weight
    model.layers.{i}.mlp.*                                  -> blocks.{i}.ffn.*  (DeepseekV3MoE -> MoELayer:
                                                               moe_layer_from_hf / moe_layer_to_hf)
    model.norm.weight                                       -> norm.weight
    lm_head.weight                                          -> lm_head.weight  (tied to embed.weight when
                                                               tie_word_embeddings)

Configuration, HF -> ours: ``vocab_size`` -> ``vocab_size``, ``max_position_embeddings`` ->
``max_seq_len``, ``hidden_size`` -> ``d_model``, ``num_hidden_layers`` -> ``n_layers``,
``num_attention_heads`` -> ``n_heads``, ``intermediate_size`` -> ``d_ff``, ``first_k_dense_replace``
-> ``first_dense_layers`` (then ``moe_every=1``; 0 when every layer is dense), ``q_lora_rank``,
``kv_lora_rank``, ``qk_rope_head_dim``, ``qk_nope_head_dim``, ``v_head_dim`` -> :class:`MLAConfig`,
``rope_parameters["rope_theta"]`` -> ``rope_base``, ``tie_word_embeddings`` -> ``tie_embeddings``,
and ``n_routed_experts``, ``moe_intermediate_size``, ``n_shared_experts``, ``num_experts_per_tok``,
``n_group``, ``topk_group``, ``norm_topk_prob``, ``routed_scaling_factor`` -> the model's
:class:`~lightning_moe.layers.MoEConfig` (a sigmoid :class:`GroupLimitedTopKRouter` with
``group_score="top2_sum"``, ``expert_bias=True`` holding ``e_score_correction_bias`` and
``LinearScorer(center_input=False)``).

The rotary permutation (``perm``). Our :class:`~lightning_moe.models.attention.Rotary` rotates the
pairs ``(j, j + R/2)`` of a head ("rotate-half"). With ``config.rope_interleave=True`` (DeepSeek's
checkpoints and the default) Hugging Face rotates the pairs ``(2j, 2j + 1)`` and returns the result
in rotate-half layout, which is our RoPE applied to the rotary dimensions reordered by
``perm = [0, 2, 4, ..., R-2, 1, 3, ..., R-1]``. HF -> ours therefore reorders by ``perm`` the output
rows that produce the rotary query (the last ``R`` rows of each head's ``N + R`` rows of ``q_b_proj``
or ``q_proj``) and the rotary key (the last ``R`` rows of ``kv_a_proj_with_mqa``); ours -> HF applies
the inverse permutation. Queries and keys are permuted alike, so their dot products (the attention)
are unchanged. With ``rope_interleave=False`` HF rotates halves as we do and nothing is permuted.

Not supported (``ValueError`` naming the setting): ``rms_norm_eps`` other than 1e-6 (our RMSNorm's),
``rope_parameters`` of any ``rope_type`` but ``"default"`` (YaRN and the other scalings change the
frequencies and the attention scale), ``attention_bias=True``, a ``hidden_act`` other than ``silu``,
``num_key_value_heads != num_attention_heads``; ours -> HF: ``attention="mha"``, MoE layers other than
"all layers after the leading dense ones" (``moe_every`` in {0, 1}), dense FFNs of different widths,
shared experts whose width is not a multiple of the routed experts' or with a ``shared_expert_gate``,
and routers the block cannot represent (softmax scores, jitter, capacity, a centring or non-linear
scorer: :func:`~lightning_moe.integrations.hf_convert.moe_layer_to_hf` names them). A model whose
MoE blocks were already swapped for :class:`MoELayer` (``to_lightning_moe``) converts after
``to_hugging_face``. ``attention_dropout`` > 0 is dropped with a warning (we have none: evaluation
outputs are identical); the ``padding_idx`` of HF's embedding (which only keeps that row's gradient
at zero) has no counterpart.

Multi-token prediction: ``transformers``' DeepSeek-V3 has no MTP modules (it ignores the checkpoint's
``model.layers.61.*``), so :func:`from_deepseek_v3` builds ``mtp_depth=0`` and :func:`to_deepseek_v3`
drops ours with a warning.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from lightning_moe.balancing.losses import Balancer
from lightning_moe.experts.swiglu import SwiGLU
from lightning_moe.integrations.hf import HF_FAMILIES, family_of
from lightning_moe.integrations.hf_convert import (
    _assign,
    _empty_block,
    _no_meta_left,
    moe_layer_from_hf,
    moe_layer_to_hf,
)
from lightning_moe.layers.config import MoEConfig
from lightning_moe.layers.moe_layer import MoELayer
from lightning_moe.models.attention import MLAConfig, MultiHeadLatentAttention, RMSNorm, Rotary
from lightning_moe.models.transformer import MoETransformer
from lightning_moe.routing.scorers import LinearScorer
from lightning_moe.routing.topk import GroupLimitedTopKRouter, TopKRouter

__all__ = ["from_deepseek_v3", "to_deepseek_v3"]

RMS_NORM_EPS = 1e-6
"""Our RMSNorm's epsilon, the only ``rms_norm_eps`` that converts."""

_FAMILY = HF_FAMILIES["deepseek_v3"]


# -- configuration checks --------------------------------------------------------------------------


def _check_config(config: Any) -> None:
    """Raise ``ValueError`` naming the first setting of a DeepSeek-V3 config that we cannot represent."""
    model_type = getattr(config, "model_type", None)
    if model_type != "deepseek_v3":
        raise ValueError(f"Expected a DeepSeek-V3 model (config.model_type='deepseek_v3'), got "
                         f"model_type={model_type!r}.")
    if config.rms_norm_eps != RMS_NORM_EPS:
        raise ValueError(f"`rms_norm_eps`={config.rms_norm_eps!r} is not representable: our RMSNorm's epsilon is "
                         f"fixed at {RMS_NORM_EPS}.")
    rope = dict(config.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"`rope_parameters` has rope_type={rope['rope_type']!r} ({rope}); only the default RoPE "
                         "(no YaRN or other scaling) converts: our Rotary has no frequency scaling and SDPA's "
                         "default attention scale.")
    if config.attention_bias:
        raise ValueError("`attention_bias`=True is not representable: our latent attention has no biases.")
    if config.hidden_act != "silu":
        raise ValueError(f"`hidden_act`={config.hidden_act!r} is not representable: our FFNs and experts are SwiGLU "
                         "(silu).")
    kv_heads = config.num_key_value_heads
    if kv_heads is not None and kv_heads != config.num_attention_heads:
        raise ValueError(f"`num_key_value_heads`={kv_heads} differs from `num_attention_heads`="
                         f"{config.num_attention_heads}; latent attention converts only with one key-value head per "
                         "query head.")


def _rope_theta(config: Any) -> float:
    return float(dict(config.rope_parameters or {}).get("rope_theta", 10000.0))


# -- the weight table ------------------------------------------------------------------------------


def _rope_perm(rope_dim: int) -> Tensor:
    """``[0, 2, ..., R-2, 1, 3, ..., R-1]``: HF's interleaved rotary dimensions in our rotate-half order."""
    return torch.cat([torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)])


def _rows(prefix: int, rope_dim: int, repeats: int, interleave: bool) -> Tensor | None:
    """Row indices (HF -> ours: ``ours = hf[rows]``) for ``repeats`` blocks of ``prefix`` rows kept in place
    followed by ``R`` rotary rows in interleaved order; ``None`` when nothing moves."""
    if not interleave or rope_dim < 4:  # R = 2 has one pair: the two orders agree
        return None
    width = prefix + rope_dim
    block = torch.cat([torch.arange(prefix), prefix + _rope_perm(rope_dim)])
    return torch.cat([r * width + block for r in range(repeats)])


def _weight_table(n_layers: int, dense: Sequence[int], n_heads: int, mla: MLAConfig, interleave: bool,
                  tied: bool) -> list[tuple[str, str, Tensor | None]]:
    """``(our name, HF name, rows)`` for every tensor outside the MoE blocks; ``rows`` reorders the
    output rows HF -> ours (``ours = hf[rows]``), ``None``: copied as is."""
    r, n = mla.qk_rope_head_dim, mla.qk_nope_head_dim
    q_rows = _rows(n, r, n_heads, interleave)
    kv_rows = _rows(mla.kv_lora_rank, r, 1, interleave)
    table: list[tuple[str, str, Tensor | None]] = [("embed.weight", "model.embed_tokens.weight", None)]
    for i in range(n_layers):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        attn = [("attn_norm.weight", "input_layernorm.weight", None)]
        if mla.q_lora_rank is None:
            attn.append(("attn.q_proj.weight", "self_attn.q_proj.weight", q_rows))
        else:
            attn += [("attn.q_down.weight", "self_attn.q_a_proj.weight", None),
                     ("attn.q_norm.weight", "self_attn.q_a_layernorm.weight", None),
                     ("attn.q_up.weight", "self_attn.q_b_proj.weight", q_rows)]
        attn += [("attn.kv_down.weight", "self_attn.kv_a_proj_with_mqa.weight", kv_rows),
                 ("attn.kv_norm.weight", "self_attn.kv_a_layernorm.weight", None),
                 ("attn.kv_up.weight", "self_attn.kv_b_proj.weight", None),
                 ("attn.proj.weight", "self_attn.o_proj.weight", None),
                 ("ffn_norm.weight", "post_attention_layernorm.weight", None)]
        if i in dense:
            attn += [("ffn.gate.weight", "mlp.gate_proj.weight", None), ("ffn.up.weight", "mlp.up_proj.weight", None),
                     ("ffn.out.weight", "mlp.down_proj.weight", None)]
        table += [(ours + o, hf + h, rows) for o, h, rows in attn]
    table.append(("norm.weight", "model.norm.weight", None))
    if not tied:
        table.append(("lm_head.weight", "lm_head.weight", None))
    return table


def _tensor(module: nn.Module, name: str) -> Tensor:
    owner_name, _, attr = name.rpartition(".")
    return getattr(module.get_submodule(owner_name), attr)


def _copy_table(table: list[tuple[str, str, Tensor | None]], source: nn.Module, target: nn.Module,
                hf_to_ours: bool) -> None:
    """Copy every table entry from ``source`` into new parameters of ``target`` (reordering rows)."""
    for ours, hf, rows in table:
        src_name, dst_name = (hf, ours) if hf_to_ours else (ours, hf)
        src = _tensor(source, src_name)
        if rows is not None:
            index = rows if hf_to_ours else torch.argsort(rows)
            value = src.detach()[index.to(src.device)]
        else:
            value = src.detach().clone(memory_format=torch.contiguous_format)
        dst = _tensor(target, dst_name)
        if dst.shape != value.shape:
            raise ValueError(f"Shape mismatch: `{src_name}` has shape {tuple(value.shape)} but `{dst_name}` needs "
                             f"{tuple(dst.shape)}.")
        _assign(target, dst_name, value, src.requires_grad)


# -- HF -> ours ------------------------------------------------------------------------------------


def _moe_config(config: Any, block: nn.Module | None, dispatcher: str, balancers: Sequence[Balancer]) -> MoEConfig:
    """The :class:`MoEConfig` describing the converted MoE layers (read from the first block when there is one)."""
    if block is not None:
        settings = _FAMILY.routing_settings(block)
        shared = _FAMILY.shared_mlp(block)
        num_experts, expert_d_ff = block.gate.weight.shape[0], block.experts.gate_up_proj.shape[1] // 2
        shared_d_ff = 0 if shared is None else shared.gate_proj.weight.shape[0]
    else:
        settings = dict(top_k=int(config.num_experts_per_tok), renormalize=bool(config.norm_topk_prob),
                        score_func="sigmoid", scaling_factor=float(config.routed_scaling_factor), jitter=0.0,
                        num_groups=int(config.n_group or 1), topk_groups=int(config.topk_group or 1))
        num_experts, expert_d_ff = config.n_routed_experts, config.moe_intermediate_size
        shared_d_ff = expert_d_ff * config.n_shared_experts
    router = partial(GroupLimitedTopKRouter, group_score="top2_sum", expert_bias=True,
                     scorer=partial(LinearScorer, center_input=False), **settings)
    return MoEConfig(num_experts=num_experts, expert_d_ff=expert_d_ff, router=router, balancers=list(balancers),
                     dispatcher=dispatcher, num_shared_experts=shared_d_ff // expert_d_ff if expert_d_ff else 0)


def from_deepseek_v3(hf_model: nn.Module, dispatcher: str = "auto",
                     balancers: Sequence[Balancer] = ()) -> MoETransformer:
    """The :class:`MoETransformer` (``attention="mla"``) computing the same logits as a Hugging Face
    ``DeepseekV3ForCausalLM``.

    Every MoE block becomes :func:`~lightning_moe.integrations.hf_convert.moe_layer_from_hf`'s
    :class:`MoELayer` (``dispatcher``, ``balancers``: the same instances in every layer); every other
    weight is copied by the module docstring's table, the rotary rows reordered when
    ``config.rope_interleave``. The model is built on the meta device and filled with copies of the
    HF tensors, which keep their device, dtype and ``requires_grad`` (so no second randomly initialised
    copy is allocated); it is in the HF model's train/eval mode. ``model.moe`` describes the converted
    layers. The HF model is left unchanged.

    Raises:
        ValueError: not a DeepSeek-V3 causal LM, or a setting the module docstring lists as not supported.
    """
    config = getattr(hf_model, "config", None)
    _check_config(config)
    if not isinstance(getattr(hf_model, "lm_head", None), nn.Linear) or not hasattr(hf_model, "model"):
        raise ValueError(f"Expected a DeepseekV3ForCausalLM (with `model` and `lm_head`), got "
                         f"{type(hf_model).__name__}.")
    if getattr(config, "attention_dropout", 0.0):
        warnings.warn(f"`attention_dropout`={config.attention_dropout} is dropped: our attention has no dropout "
                      "(evaluation outputs are identical, training ones differ).", stacklevel=2)
    layers = hf_model.model.layers
    n_layers = config.num_hidden_layers
    if len(layers) < n_layers:
        raise ValueError(f"The model has {len(layers)} decoder layers but `num_hidden_layers`={n_layers}.")
    first_dense = min(int(config.first_k_dense_replace or 0), n_layers)
    for i in range(first_dense, n_layers):
        mlp = layers[i].mlp
        if isinstance(mlp, MoELayer):
            raise ValueError(f"model.layers.{i}.mlp is already our MoELayer (to_lightning_moe); call "
                             "to_hugging_face(hf_model) first.")
        if family_of(mlp) is not _FAMILY:
            raise ValueError(f"model.layers.{i}.mlp is a {type(mlp).__name__}, not a DeepseekV3MoE block.")
    moe_blocks = {i: layers[i].mlp for i in range(first_dense, n_layers)}
    first_block = moe_blocks[first_dense] if moe_blocks else None
    moe = _moe_config(config, first_block, dispatcher, balancers)
    mla = MLAConfig(q_lora_rank=config.q_lora_rank, kv_lora_rank=config.kv_lora_rank,
                    qk_rope_head_dim=config.qk_rope_head_dim, qk_nope_head_dim=config.qk_nope_head_dim,
                    v_head_dim=config.v_head_dim)
    tied = bool(config.tie_word_embeddings)
    rope_base = _rope_theta(config)
    with torch.device("meta"):
        model = MoETransformer(config.vocab_size, max_seq_len=config.max_position_embeddings,
                               d_model=config.hidden_size, n_layers=n_layers, n_heads=config.num_attention_heads,
                               d_ff=config.intermediate_size, moe=moe, moe_every=1 if moe_blocks else 0,
                               first_dense_layers=first_dense, attention="mla", mla=mla, rope_base=rope_base,
                               tie_embeddings=tied)
    for i, block in moe_blocks.items():
        model.blocks[i].ffn = moe_layer_from_hf(block, dispatcher, moe.layer_balancers())
    table = _weight_table(n_layers, range(first_dense), config.num_attention_heads, mla,
                          bool(config.rope_interleave), tied)
    _copy_table(table, hf_model, model, hf_to_ours=True)
    if tied:
        model.lm_head.weight = model.embed.weight
    device = hf_model.model.embed_tokens.weight.device
    rotary = Rotary(mla.qk_rope_head_dim, config.max_position_embeddings, rope_base).to(device) \
        if mla.qk_rope_head_dim else None
    for block in model.blocks:
        block.attn.rotary = rotary
    _no_meta_left(model, "from_deepseek_v3", "the weight table")
    return model.train(hf_model.training)


# -- ours -> HF ------------------------------------------------------------------------------------


def _layout(model: MoETransformer) -> tuple[int, list[MoELayer], int | None]:
    """``(first_k_dense_replace, MoE layers, dense d_ff)``; ``ValueError`` for what HF cannot hold."""
    if not isinstance(model, MoETransformer):
        raise ValueError(f"`model` must be a MoETransformer, got {type(model).__name__}.")
    if model.attention != "mla":
        raise ValueError(f"The model has attention={model.attention!r}; DeepSeek-V3 needs attention='mla'.")
    ffns = [block.ffn for block in model.blocks]
    first_dense = next((i for i, ffn in enumerate(ffns) if isinstance(ffn, MoELayer)), len(ffns))
    moe_layers = ffns[first_dense:]
    odd = [first_dense + i for i, ffn in enumerate(moe_layers) if not isinstance(ffn, MoELayer)]
    if odd:
        raise ValueError(f"Layers {odd} are dense after MoE layer {first_dense}; DeepSeek-V3 has "
                         "`first_k_dense_replace` dense layers and then only MoE layers (moe_every=1, or 0).")
    dense = ffns[:first_dense]
    for i, ffn in enumerate(dense):
        if type(ffn) is not SwiGLU:
            raise ValueError(f"blocks.{i}.ffn is a {type(ffn).__name__}; DeepSeek-V3's dense layers are SwiGLU.")
    widths = sorted({ffn.d_ff for ffn in dense})
    if len(widths) > 1:
        raise ValueError(f"The dense layers have widths {widths}; DeepSeek-V3 has one `intermediate_size`.")
    for i, block in enumerate(model.blocks):
        if not isinstance(block.attn, MultiHeadLatentAttention):
            raise ValueError(f"blocks.{i}.attn is a {type(block.attn).__name__}, not MultiHeadLatentAttention.")
    for name, norm in model.named_modules():
        if isinstance(norm, RMSNorm) and norm.eps != RMS_NORM_EPS:
            raise ValueError(f"{name} has eps={norm.eps}; DeepSeek-V3's `rms_norm_eps` is written as {RMS_NORM_EPS}.")
    return first_dense, moe_layers, widths[0] if widths else None


def _config_fields(model: MoETransformer, first_dense: int, moe_layers: list[MoELayer],
                   dense_d_ff: int | None) -> dict[str, Any]:
    """The DeepSeek-V3 configuration fields describing ``model``."""
    mla = model.mla
    attn = model.blocks[0].attn
    fields: dict[str, Any] = dict(
        vocab_size=model.embed.num_embeddings, hidden_size=model.d_model, num_hidden_layers=model.n_layers,
        num_attention_heads=attn.n_heads, num_key_value_heads=attn.n_heads, q_lora_rank=mla.q_lora_rank,
        kv_lora_rank=mla.kv_lora_rank, qk_rope_head_dim=mla.qk_rope_head_dim, qk_nope_head_dim=mla.qk_nope_head_dim,
        v_head_dim=mla.v_head_dim, first_k_dense_replace=first_dense, max_position_embeddings=model.max_seq_len,
        tie_word_embeddings=model.tie_embeddings, rope_theta=float(model.rope_base))
    if moe_layers:
        layer = moe_layers[0]
        router = layer.router
        expert_d_ff = layer.experts.w_gate_EDF.shape[-1]
        if layer.shared_d_ff % expert_d_ff:
            raise ValueError(f"The shared experts' width `shared_d_ff`={layer.shared_d_ff} is not a multiple of the "
                             f"routed experts' width {expert_d_ff}; DeepSeek-V3 has n_shared_experts * "
                             "moe_intermediate_size.")
        if type(router) not in (TopKRouter, GroupLimitedTopKRouter):
            raise ValueError(f"The router is a {type(router).__name__}; DeepSeek-V3 blocks represent only "
                             "GroupLimitedTopKRouter and TopKRouter (sigmoid scores).")
        grouped = isinstance(router, GroupLimitedTopKRouter)
        fields.update(moe_intermediate_size=expert_d_ff, n_routed_experts=layer.num_experts,
                      n_shared_experts=layer.shared_d_ff // expert_d_ff, num_experts_per_tok=router.top_k,
                      n_group=router.num_groups if grouped else 1, topk_group=router.topk_groups if grouped else 1,
                      norm_topk_prob=bool(router.renormalize), routed_scaling_factor=float(router.scaling_factor))
    else:  # no MoE layer: the block fields are unused; describe model.moe
        moe = model.moe
        fields.update(moe_intermediate_size=moe.routed_d_ff, n_routed_experts=moe.routed_experts,
                      n_shared_experts=moe.num_shared_experts, num_experts_per_tok=1, n_group=1, topk_group=1)
    d_ff = dense_d_ff or model.d_ff
    fields["intermediate_size"] = d_ff  # unused without dense layers
    return fields


_STRUCTURAL = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
               "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "first_k_dense_replace", "tie_word_embeddings")


def _check_given_config(config: Any, fields: dict[str, Any], has_dense: bool, has_moe: bool) -> None:
    _check_config(config)
    names = list(_STRUCTURAL) + (["intermediate_size"] if has_dense else []) + (
        ["moe_intermediate_size", "n_routed_experts", "n_shared_experts"] if has_moe else [])
    for name in names:
        if getattr(config, name) != fields[name]:
            raise ValueError(f"config.{name}={getattr(config, name)!r} but the model has {fields[name]!r}.")
    if fields["qk_rope_head_dim"] and not math.isclose(_rope_theta(config), fields["rope_theta"], rel_tol=1e-6):
        raise ValueError(f"config.rope_parameters['rope_theta']={_rope_theta(config)!r} but the model's RoPE base is "
                         f"{fields['rope_theta']!r}.")


def to_deepseek_v3(model: MoETransformer, config: Any = None) -> nn.Module:
    """A new Hugging Face ``DeepseekV3ForCausalLM`` computing the same logits as ``model``.

    ``model`` must have ``attention="mla"``, ``first_dense_layers`` dense SwiGLU layers followed only
    by MoE layers (``moe_every`` 1, or 0 for a dense model), and MoE layers each block can represent:
    every layer goes through :func:`~lightning_moe.integrations.hf_convert.moe_layer_to_hf`, which
    checks the router (a sigmoid :class:`GroupLimitedTopKRouter` with ``group_score="top2_sum"``, or
    one without group restriction, a :class:`LinearScorer` with ``center_input=False``, no jitter),
    no capacity, no ``shared_expert_gate`` and every shape, before copying. A router without
    ``expert_bias`` gets an all-zero ``e_score_correction_bias``.

    ``config``: a ``DeepseekV3Config`` to build the model from (its structural sizes, rope base and
    tying must be the model's; ``rope_interleave`` and ``max_position_embeddings`` are free), or
    ``None`` to derive one: every size from the model, ``rms_norm_eps=1e-6``, default RoPE with the
    model's base (``model.rope_base``), ``rope_interleave=True``
    (DeepSeek's layout, rotary rows permuted: module docstring), ``num_mtp_layers=0``, the model's dtype.

    The HF model is built on the meta device and filled with copies of our tensors (their device, dtype
    and ``requires_grad``); MoE blocks are built one at a time on their layer's device. It is in
    ``model``'s train/eval mode. ``model`` is left unchanged.

    Multi-token prediction modules (``model.mtp_depth > 0``) are dropped with a warning: ``transformers``'
    DeepSeek-V3 has no place for them. DeepSeek's official checkpoint stores depth ``k`` (1..K) as one
    more decoder layer after the ``L`` main ones, ``model.layers.{L+k-1}``: ``enorm``, ``hnorm``,
    ``eh_proj`` and ``shared_head.norm`` (our ``mtp.{k-1}.enorm``, ``hnorm``, ``proj`` and ``norm``), plus
    that layer's own block weights (``input_layernorm``, ``self_attn.*``, ``post_attention_layernorm``,
    ``mlp.*``: our ``mtp.{k-1}.block``, named as in the table), its ``embed_tokens`` and
    ``shared_head.head`` being copies of the main model's embedding and output head.

    Raises:
        ValueError: naming the setting HF cannot represent.
    """
    first_dense, moe_layers, dense_d_ff = _layout(model)
    fields = _config_fields(model, first_dense, moe_layers, dense_d_ff)
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    if config is None:
        kwargs = {k: v for k, v in fields.items() if k != "rope_theta"}
        config = DeepseekV3Config(**kwargs, rms_norm_eps=RMS_NORM_EPS, hidden_act="silu", attention_bias=False,
                                  rope_parameters={"rope_type": "default", "rope_theta": fields["rope_theta"]},
                                  rope_interleave=True, num_mtp_layers=0, dtype=model.embed.weight.dtype)
    else:
        _check_given_config(config, fields, bool(first_dense), bool(moe_layers))
    if model.mtp_depth > 0 or "mtp" in model._modules:
        warnings.warn(f"The model's {model.mtp_depth} multi-token prediction module(s) are dropped: transformers' "
                      "DeepSeek-V3 has no place for them (DeepSeek's checkpoint stores them as "
                      "model.layers.{num_hidden_layers + k - 1}.*).", stacklevel=2)
    with warnings.catch_warnings():  # n_shared_experts=0 builds zero-width shared experts, which torch warns about
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        with torch.device("meta"):
            hf_model = DeepseekV3ForCausalLM(config)
        layers = hf_model.model.layers
        for i, layer in enumerate(moe_layers, start=first_dense):
            block = _empty_block(_FAMILY, config, layer)
            layers[i].mlp = moe_layer_to_hf(layer, block).train(layer.training)
    table = _weight_table(model.n_layers, range(first_dense), model.blocks[0].attn.n_heads, model.mla,
                          bool(config.rope_interleave), bool(config.tie_word_embeddings))
    _copy_table(table, model, hf_model, hf_to_ours=False)
    if config.tie_word_embeddings:
        hf_model.lm_head.weight = hf_model.model.embed_tokens.weight
    device = model.embed.weight.device
    rotary_emb = hf_model.model.rotary_emb
    hf_model.model.rotary_emb = type(rotary_emb)(config).to(device)
    _no_meta_left(hf_model, "to_deepseek_v3", "the weight table")
    return hf_model.train(model.training)
