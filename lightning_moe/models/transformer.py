"""A decoder-only transformer whose FFNs are MoE layers, every layer or every n-th.

Legend: ``B`` batch, ``S`` sequence, ``D`` model width, ``H`` heads, ``Dh`` head width,
``V`` vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_moe._validate import (
    check_int_range,
    check_non_negative,
    check_non_negative_int,
    check_positive_float,
    check_positive_int,
)
from lightning_moe.experts.swiglu import SwiGLU
from lightning_moe.layers.config import MoEConfig
from lightning_moe.layers.moe_layer import MoELayer
from lightning_moe.layers.record import RoutingRecorder, total_aux_losses
from lightning_moe.models.attention import (
    ATTENTION_KINDS,
    AttentionKind,
    CausalSelfAttention,
    MLAConfig,
    MultiHeadLatentAttention,
    RMSNorm,
    Rotary,
)
from lightning_moe.models.mtp import MTPModule
from lightning_moe.routing.routing import LossWeight

__all__ = ["Block", "CausalSelfAttention", "MLAConfig", "MoETransformer", "MultiHeadLatentAttention", "RMSNorm",
           "Rotary"]


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``."""

    def __init__(self, d_model: int, attn: nn.Module, ffn: nn.Module) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(d_model)
        self.attn = attn
        self.ffn_norm = RMSNorm(d_model)
        self.ffn = ffn

    def forward(self, x: Tensor, ids: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        if isinstance(self.ffn, MoELayer):
            return x + self.ffn(self.ffn_norm(x), ids)
        return x + self.ffn(self.ffn_norm(x))


MOVED_TO_MOE = ("num_experts", "expert_d_ff", "router", "balancers", "capacity", "dispatcher", "granularity",
                "num_shared_experts", "shared_expert_gate", "expert_parallel_size")
"""Arguments that were the model's own and now live in its :class:`~lightning_moe.layers.MoEConfig`."""


def moved_to_moe_error(owner: str, flat: dict[str, Any]) -> TypeError:
    """The error for old flat MoE arguments: which ones moved, and the call that works now."""
    moved = [name for name in flat if name in MOVED_TO_MOE]
    unknown = sorted(set(flat) - set(moved))
    if not moved:
        return TypeError(f"{owner}() got unexpected keyword arguments {unknown}.")
    call = ", ".join(f"{name}={flat[name]!r}" for name in moved)
    return TypeError(f"{owner}(): {', '.join(f'`{name}`' for name in moved)} moved into the MoE configuration: pass "
                     f"`moe=MoEConfig({call})` (YAML: `model.moe.<name>`, command line: `--model.moe.<name>`)."
                     + (f" Unknown arguments: {unknown}." if unknown else ""))


class MoETransformer(nn.Module):
    """Pre-norm decoder-only transformer (RMSNorm, RoPE, SDPA attention) with MoE FFNs.

    Which layers are MoE: the first ``first_dense_layers`` layers are dense (DeepSeek's
    ``first_k_dense_replace``); after them, every ``moe_every``-th layer is an MoE layer, i.e.
    layer ``i`` (0-based) is MoE when ``moe_every > 0``, ``i >= first_dense_layers`` and
    ``(i - first_dense_layers) % moe_every == moe_every - 1``. Dense layers have a SwiGLU of
    width ``d_ff``; ``moe_every=0`` gives the dense baseline. What the MoE layers are made of
    (experts, router, balancers, capacity, dispatcher, fine-grained and shared experts, expert
    parallelism) is one :class:`~lightning_moe.layers.MoEConfig`.

    Attention is multi-head (``attention="mha"``: RoPE on the whole head) or DeepSeek-V2/V3's
    multi-head latent attention (``"mla"``, sized by ``mla``: low-rank query and key-value latents with
    RMSNorms, a decoupled rotary part; :class:`~lightning_moe.models.attention.MultiHeadLatentAttention`),
    which caches far fewer elements per token (:meth:`kv_cache_per_token`).

    Multi-token prediction (``mtp_depth`` = K > 0, DeepSeek-V3): K sequential modules
    (:mod:`~lightning_moe.models.mtp`), each one block of the kind the last layer has (an MoE block
    when the last layer is an MoE layer, as in DeepSeek-V3), predict the tokens 2..K+1 places ahead during
    training; :meth:`forward_with_mtp` returns their logits and ``mtp_weight`` (λ, a
    :class:`~lightning_moe.models.mtp.LossWeight` named ``mtp_loss`` that
    :class:`~lightning_moe.callbacks.ZLossScheduler` can schedule) weighs their mean cross-entropy in
    the loss. :meth:`forward`, :meth:`generate`, :meth:`parameter_counts`' ``total``/``active`` and
    :meth:`flops_per_token` are the inference model, without them; ``mtp_depth=0`` is exactly the
    model without MTP (same parameters, same random initialisation, same outputs).

    Args:
        vocab_size: vocabulary size V, >= 1.
        max_seq_len: longest sequence the rotary tables cover, >= 1.
        d_model: model width D, >= 1 and divisible by ``n_heads`` (head width even, for RoPE, with ``mha``).
        n_layers: transformer blocks, >= 1.
        n_heads: attention heads, >= 1.
        d_ff: hidden width of the dense FFNs, >= 1.
        moe: the MoE layers (:class:`~lightning_moe.layers.MoEConfig`; ``None``: its defaults).
        moe_every: 1 = every layer (after the leading dense ones) is MoE, n = every n-th, 0 = none.
        first_dense_layers: leading dense layers, in [0, n_layers].
        attention: ``"mha"`` or ``"mla"``.
        mla: the latent attention's sizes (``None``: :class:`~lightning_moe.models.MLAConfig`'s defaults);
            read only with ``attention="mla"``.
        rope_base: RoPE's base (``rope_theta``), > 0.
        tie_embeddings: the output head shares the input embedding's weight (DeepSeek-V3 does not).
        mtp_depth: multi-token prediction modules K, >= 0.
        mtp_weight: λ, the weight of the MTP loss, >= 0 (DeepSeek-V3: 0.3, then 0.1 late in training).
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        max_seq_len: int = 128,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        d_ff: int = 512,
        moe: MoEConfig | None = None,
        moe_every: int = 1,
        first_dense_layers: int = 0,
        attention: AttentionKind = "mha",
        mla: MLAConfig | None = None,
        rope_base: float = 10000.0,
        tie_embeddings: bool = True,
        mtp_depth: int = 0,
        mtp_weight: float = 0.3,
        **flat: Any,
    ) -> None:
        if flat:
            raise moved_to_moe_error(type(self).__name__, flat)
        super().__init__()
        for name, value in [("vocab_size", vocab_size), ("max_seq_len", max_seq_len), ("d_model", d_model),
                            ("n_layers", n_layers), ("n_heads", n_heads), ("d_ff", d_ff)]:
            check_positive_int(name, value)
        check_int_range("moe_every", moe_every, 0, n_layers)
        check_int_range("first_dense_layers", first_dense_layers, 0, n_layers)
        check_non_negative_int("mtp_depth", mtp_depth)
        check_positive_float("rope_base", rope_base)
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"`attention` must be one of {ATTENTION_KINDS}, got {attention!r}.")
        if attention == "mha" and (d_model % n_heads or (d_model // n_heads) % 2):
            raise ValueError(f"`d_model` ({d_model}) must split into `n_heads` ({n_heads}) heads of even width.")
        self.moe = moe = MoEConfig() if moe is None else moe
        self.attention = attention
        self.mla = (MLAConfig() if mla is None else mla) if attention == "mla" else None
        self.max_seq_len, self.rope_base, self.d_ff = max_seq_len, float(rope_base), d_ff
        self.n_layers, self.d_model, self.granularity = n_layers, d_model, moe.granularity
        self.embed = nn.Embedding(vocab_size, d_model)
        if attention == "mha":
            rotary: Rotary | None = Rotary(d_model // n_heads, max_seq_len, rope_base)
        else:
            rotary = Rotary(self.mla.qk_rope_head_dim, max_seq_len, rope_base) if self.mla.qk_rope_head_dim else None

        def is_moe(i: int) -> bool:
            return bool(moe_every) and i >= first_dense_layers and (i - first_dense_layers) % moe_every == moe_every - 1

        def block(i: int) -> Block:
            ffn = MoELayer.from_config(d_model, moe) if is_moe(i) else SwiGLU(d_model, d_ff)
            attn = (CausalSelfAttention(d_model, n_heads, rotary) if attention == "mha"
                    else MultiHeadLatentAttention(d_model, n_heads, self.mla, rotary))
            return Block(d_model, attn, ffn)

        self.blocks = nn.ModuleList(block(i) for i in range(n_layers))
        self.norm = RMSNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.tie_embeddings = bool(tie_embeddings)
        if self.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # Tied embeddings at nn.Embedding's N(0, 1) give logits of std sqrt(D) and a first loss far
        # above log(V); GPT-2's 0.02 starts near log(V).
        nn.init.normal_(self.embed.weight, std=0.02)
        self.mtp_depth = mtp_depth
        self.mtp_weight = LossWeight("mtp_loss", check_non_negative("mtp_weight", mtp_weight))
        if mtp_depth:  # built last, so the main model's initial values do not depend on the depth
            self.mtp = nn.ModuleList(MTPModule(d_model, block(n_layers - 1)) for _ in range(mtp_depth))

    def moe_layers(self, include_mtp: bool = True) -> list[MoELayer]:
        """Every MoE layer, the MTP modules' included (after the main model's) unless ``include_mtp=False``
        (the layers :meth:`forward` runs)."""
        modules = self.modules() if include_mtp else (m for block in self.blocks for m in block.modules())
        return [m for m in modules if isinstance(m, MoELayer)]

    @torch.no_grad()
    def router_inputs(self, ids_BS: Tensor) -> list[Tensor]:
        """The hidden states entering each MoE layer of :meth:`forward` on token ids ``ids_BS``, ``(B*S, D)``
        per layer (detached), in evaluation mode: what a router sees, e.g. to pre-train a
        :class:`~lightning_moe.routing.SelfSupervisedScorer` (``scorer.pretrain(inputs[i])``). The training
        mode is restored afterwards."""
        captured: list[Tensor] = []
        hooks = [layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().flatten(0, -2)))
                 for layer in self.moe_layers(include_mtp=False)]
        was_training = self.training
        try:
            self.eval()
            self(ids_BS)
        finally:
            self.train(was_training)
            for hook in hooks:
                hook.remove()
        return captured

    def mtp_modules(self) -> list[MTPModule]:
        """The MTP modules, depth 1 first (``[]`` without)."""
        return list(self.mtp) if "mtp" in self._modules else []

    def hidden_states(self, ids_BS: Tensor) -> Tensor:
        """Token ids ``(B, S)`` -> the last block's output ``(B, S, D)``, before the final norm."""
        if ids_BS.shape[-1] > self.max_seq_len:
            raise ValueError(f"Sequence length {ids_BS.shape[-1]} exceeds `max_seq_len`={self.max_seq_len}.")
        x_BSD = self.embed(ids_BS)
        for block in self.blocks:
            x_BSD = block(x_BSD, ids_BS)
        return x_BSD

    def forward(self, ids_BS: Tensor) -> Tensor:
        """Token ids ``(B, S)`` -> logits ``(B, S, V)`` (the MTP modules do not run; their routing
        records are cleared, so :meth:`aux_losses` is this forward's)."""
        for module in self.mtp_modules():
            for recorder in module.modules():
                if isinstance(recorder, RoutingRecorder):
                    recorder.clear_record()
        return self.lm_head(self.norm(self.hidden_states(ids_BS)))

    def forward_with_mtp(self, ids_BN: Tensor) -> tuple[Tensor, list[Tensor]]:
        """A training sequence of ``N = S + 1`` tokens -> the logits ``(B, S, V)`` of its first ``S``
        tokens and, for each MTP depth ``k`` = 1..K, the logits ``(B, S - k, V)`` predicting
        ``ids_BN[:, k + 1:]`` (:func:`~lightning_moe.models.mtp.mtp_cross_entropies` scores them)."""
        seq_len = ids_BN.shape[-1] - 1
        modules = self.mtp_modules()
        if seq_len - len(modules) < 1:
            raise ValueError(f"A sequence of {ids_BN.shape[-1]} tokens is too short for mtp_depth={len(modules)}.")
        h_BSD = self.hidden_states(ids_BN[:, :seq_len])
        logits = self.lm_head(self.norm(h_BSD))
        mtp_logits = []
        for k, module in enumerate(modules, start=1):
            ids_BM = ids_BN[:, k:seq_len]  # t_{i+k} for i = 0 .. S - k - 1
            h_BSD = module(h_BSD[:, : seq_len - k], self.embed(ids_BM), ids_BM)
            mtp_logits.append(self.lm_head(module.norm(h_BSD)))
        return logits, mtp_logits

    def drop_mtp(self) -> None:
        """Delete the MTP modules (for export or serving: inference never runs them)."""
        if "mtp" in self._modules:
            del self.mtp
        self.mtp_depth = 0

    def scheduled_coefficients(self) -> list[LossWeight]:
        """Loss weights besides the balancers' that a coefficient scheduler may set (``mtp_loss``)."""
        return [self.mtp_weight] if self.mtp_depth else []

    def kv_cache_per_token(self) -> int:
        """Elements a KV cache keeps per token, over all layers: ``2 * D`` per layer for multi-head
        attention, ``kv_lora_rank + qk_rope_head_dim`` for latent attention."""
        return sum(block.attn.kv_cache_per_token for block in self.blocks)

    def aux_losses(self) -> dict[str, Tensor]:
        """Each balancer's loss summed over the MoE layers, from the last forward
        (:func:`~lightning_moe.layers.total_aux_losses`)."""
        return total_aux_losses(self)

    def parameter_counts(self) -> dict[str, int]:
        """``total`` parameters and ``active`` ones (used per token: on average
        ``router.experts_per_token`` of E routed experts per MoE layer; shared experts, routers,
        attention, norms and the embedding(s) always), ``expert`` (all routed experts), all three of
        the inference model (without MTP modules), and ``mtp`` (the MTP modules' parameters, used in
        training only; 0 without). Counts the whole model also when expert parallelism has left each
        rank a shard."""

        def count(modules: list[nn.Module]) -> tuple[int, int, int]:
            total = sum(p.numel() for m in modules for p in m.parameters())
            inactive = expert = 0
            for layer in (x for m in modules for x in m.modules() if isinstance(x, MoELayer)):
                expert_params = sum(p.numel() for p in layer.experts.parameters())
                shards = layer.num_experts // layer.experts.num_experts  # P under expert parallelism, else 1
                total += expert_params * (shards - 1)
                expert_params *= shards
                share = (layer.num_experts - layer.router.experts_per_token) / layer.num_experts
                inactive += round(expert_params * share)
                expert += expert_params
            return total, inactive, expert

        mtp = self.mtp_modules()
        total, inactive, expert = count([self])
        mtp_total, mtp_inactive, mtp_expert = count(mtp)
        total, inactive, expert = total - mtp_total, inactive - mtp_inactive, expert - mtp_expert
        return {"total": total, "active": total - inactive, "expert": expert, "mtp": mtp_total}

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Forward FLOPs per token at sequence length ``seq_len`` (default ``max_seq_len``), of the
        inference model (no MTP).

        Kaplan et al.'s count: 2 per weight of every matmul a token goes through (the active
        parameters without the norms' weights and without an untied input embedding, a lookup; a
        tied embedding counts once, as the output projection) plus ``2 * n_layers * seq_len * d_attn``
        for attention scores and values, ``d_attn`` = D for multi-head attention and
        ``H * (N + R + Dv) / 2`` for latent attention (its query-key and value widths averaged).
        A training step costs about three times this.
        """
        seq_len = self.max_seq_len if seq_len is None else check_positive_int("seq_len", seq_len)
        main = [m for name, m in self.named_modules() if not name.startswith("mtp")]
        norm_params = sum(m.weight.numel() for m in main if isinstance(m, RMSNorm))
        lookup = 0 if self.tie_embeddings else self.embed.weight.numel()
        matmul_params = self.parameter_counts()["active"] - norm_params - lookup
        d_attn = sum(block.attn.score_width for block in self.blocks)
        return round(2 * matmul_params + 2 * seq_len * d_attn)

    @torch.no_grad()
    def generate(
        self, ids_BS: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None
    ) -> Tensor:
        """Sample ``max_new_tokens`` tokens after ``ids_BS`` (no KV cache; for demos)."""
        for _ in range(max_new_tokens):
            logits_BV = self(ids_BS[:, -self.max_seq_len:])[:, -1].float()
            if temperature <= 0:
                next_B1 = logits_BV.argmax(-1, keepdim=True)
            else:
                logits_BV = logits_BV / temperature
                if top_k is not None:
                    kth = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
                    logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
                next_B1 = torch.multinomial(logits_BV.softmax(-1), 1)
            ids_BS = torch.cat([ids_BS, next_B1], dim=1)
        return ids_BS
