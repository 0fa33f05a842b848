"""A decoder-only transformer whose FFNs are MoE layers, every layer or every n-th.

Legend: ``B`` batch, ``S`` sequence, ``D`` model width, ``H`` heads, ``Dh`` head width,
``V`` vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe._validate import check_int_range, check_non_negative_int, check_positive_int, divisors
from lightning_moe.balancing.losses import Balancer
from lightning_moe.dispatch.registry import get_dispatcher
from lightning_moe.experts.swiglu import SwiGLU
from lightning_moe.layers.moe_layer import MoELayer
from lightning_moe.layers.record import total_aux_losses
from lightning_moe.routing.capacity import ExpertCapacity
from lightning_moe.routing.factory import RouterFactory, build_router
from lightning_moe.routing.topk import TopKRouter


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Rotary(nn.Module):
    """Rotary position embeddings (RoPE), rotating pairs (i, i + Dh/2) of each head."""

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles_SF = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # F = Dh/2
        # Non-persistent: derived from the config, so checkpoints do not carry them.
        self.register_buffer("cos_SF", angles_SF.cos(), persistent=False)
        self.register_buffer("sin_SF", angles_SF.sin(), persistent=False)

    def forward(self, x_BHSDh: Tensor) -> Tensor:
        seq_len = x_BHSDh.shape[-2]
        cos, sin = self.cos_SF[:seq_len].to(x_BHSDh.dtype), self.sin_SF[:seq_len].to(x_BHSDh.dtype)
        x1, x2 = x_BHSDh.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, rotary: Rotary) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.rotary = rotary

    def forward(self, x_BSD: Tensor) -> Tensor:
        b, s, d = x_BSD.shape
        qkv = self.qkv(x_BSD).view(b, s, 3, self.n_heads, d // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, S, Dh)
        y = F.scaled_dot_product_attention(self.rotary(q), self.rotary(k), v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))  # (B, S, D)


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, rotary: Rotary, ffn: nn.Module) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, rotary)
        self.ffn_norm = RMSNorm(d_model)
        self.ffn = ffn

    def forward(self, x: Tensor, ids: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        if isinstance(self.ffn, MoELayer):
            return x + self.ffn(self.ffn_norm(x), ids)
        return x + self.ffn(self.ffn_norm(x))


class MoETransformer(nn.Module):
    """Pre-norm decoder-only transformer (RMSNorm, RoPE, SDPA attention) with MoE FFNs.

    Which layers are MoE: the first ``first_dense_layers`` layers are dense (DeepSeek's
    ``first_k_dense_replace``); after them, every ``moe_every``-th layer is an MoE layer, i.e.
    layer ``i`` (0-based) is MoE when ``moe_every > 0``, ``i >= first_dense_layers`` and
    ``(i - first_dense_layers) % moe_every == moe_every - 1``. Dense layers have a SwiGLU of
    width ``d_ff``; ``moe_every=0`` gives the dense baseline. Input and output embeddings are tied.

    Fine-grained experts (DeepSeekMoE): ``granularity = m`` splits each of the ``num_experts``
    experts of width ``expert_d_ff`` into ``m`` experts of width ``expert_d_ff / m`` and lets
    every token reach ``m`` times as many (the router's ``top_k``, or expert choice's capacity
    factor, is multiplied by ``m``), so total and active parameters stay the same while the
    number of expert combinations grows. Shared experts: ``num_shared_experts`` experts of the
    (fine-grained) expert width that every token passes through, optionally behind a sigmoid
    gate (``shared_expert_gate``, Qwen2-MoE) or not (DeepSeek).

    Args:
        vocab_size: vocabulary size V, >= 1.
        max_seq_len: longest sequence the rotary tables cover, >= 1.
        d_model: model width D, >= 1 and divisible by ``n_heads`` (head width even, for RoPE).
        n_layers: transformer blocks, >= 1.
        n_heads: attention heads, >= 1.
        d_ff: hidden width of the dense FFNs, >= 1.
        num_experts: experts per MoE layer before the fine-grained split, >= 1.
        expert_d_ff: hidden width of each expert before the split, >= 1, divisible by
            ``granularity``.
        moe_every: 1 = every layer (after the leading dense ones) is MoE, n = every n-th, 0 = none.
        router: router factory called as ``router(d_model, num_experts * granularity)`` for each
            MoE layer; its experts per token are then multiplied by ``granularity``.
        balancers: auxiliary losses added in every MoE layer.
        dispatcher: dispatch backend name (``"grouped"``, ``"triton"`` or ``"loop"``).
        capacity: expert capacity of every MoE layer (``None``: dropless).
        granularity: fine-grained split factor m, >= 1.
        num_shared_experts: shared experts per MoE layer, >= 0, each of width
            ``expert_d_ff / granularity``.
        shared_expert_gate: gate the shared experts' output with a per-token sigmoid.
        first_dense_layers: leading dense layers, in [0, n_layers].
        expert_parallel_size: ranks each MoE layer's experts are split over (P), >= 1, dividing
            ``num_experts * granularity``; see :class:`~lightning_moe.layers.MoELayer`. The model
            is built whole and sharded by :func:`~lightning_moe.parallel.setup_expert_parallel`.
    """

    def __init__(
        self,
        vocab_size: int,
        max_seq_len: int = 256,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        d_ff: int = 512,
        num_experts: int = 8,
        expert_d_ff: int = 256,
        moe_every: int = 1,
        router: RouterFactory = TopKRouter,
        balancers: Sequence[Balancer] = (),
        dispatcher: str = "grouped",
        capacity: ExpertCapacity | None = None,
        granularity: int = 1,
        num_shared_experts: int = 0,
        shared_expert_gate: bool = False,
        first_dense_layers: int = 0,
        expert_parallel_size: int = 1,
    ) -> None:
        super().__init__()
        for name, value in [("vocab_size", vocab_size), ("max_seq_len", max_seq_len), ("d_model", d_model),
                            ("n_layers", n_layers), ("n_heads", n_heads), ("d_ff", d_ff),
                            ("num_experts", num_experts), ("expert_d_ff", expert_d_ff),
                            ("granularity", granularity)]:
            check_positive_int(name, value)
        check_int_range("moe_every", moe_every, 0, n_layers)
        check_int_range("first_dense_layers", first_dense_layers, 0, n_layers)
        check_non_negative_int("num_shared_experts", num_shared_experts)
        if expert_d_ff % granularity:
            raise ValueError(
                f"`granularity` ({granularity}) must divide `expert_d_ff` ({expert_d_ff}); valid values: "
                f"{divisors(expert_d_ff)}."
            )
        if shared_expert_gate and not num_shared_experts:
            raise ValueError("`shared_expert_gate=True` needs `num_shared_experts` >= 1.")
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"`d_model` ({d_model}) must split into `n_heads` ({n_heads}) heads of even width.")
        get_dispatcher(dispatcher)  # fail on an unknown name even when there are no MoE layers
        self.max_seq_len = max_seq_len
        self.n_layers, self.d_model, self.granularity = n_layers, d_model, granularity
        self.embed = nn.Embedding(vocab_size, d_model)
        rotary = Rotary(d_model // n_heads, max_seq_len)

        fine_d_ff, fine_experts = expert_d_ff // granularity, num_experts * granularity

        def ffn(i: int) -> nn.Module:
            if not moe_every or i < first_dense_layers or (i - first_dense_layers) % moe_every != moe_every - 1:
                return SwiGLU(d_model, d_ff)
            layer_router = build_router(router, d_model, fine_experts, granularity)
            return MoELayer(d_model, fine_d_ff, fine_experts, layer_router, balancers, dispatcher, capacity,
                            shared_d_ff=num_shared_experts * fine_d_ff, shared_gate=shared_expert_gate,
                            expert_parallel_size=expert_parallel_size)

        self.blocks = nn.ModuleList(Block(d_model, n_heads, rotary, ffn(i)) for i in range(n_layers))
        self.norm = RMSNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight
        # Tied embeddings at nn.Embedding's N(0, 1) give logits of std sqrt(D) and a first loss far
        # above log(V); GPT-2's 0.02 starts near log(V).
        nn.init.normal_(self.embed.weight, std=0.02)

    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def forward(self, ids_BS: Tensor) -> Tensor:
        """Token ids ``(B, S)`` -> logits ``(B, S, V)``."""
        if ids_BS.shape[-1] > self.max_seq_len:
            raise ValueError(f"Sequence length {ids_BS.shape[-1]} exceeds `max_seq_len`={self.max_seq_len}.")
        x_BSD = self.embed(ids_BS)
        for block in self.blocks:
            x_BSD = block(x_BSD, ids_BS)
        return self.lm_head(self.norm(x_BSD))

    def aux_losses(self) -> dict[str, Tensor]:
        """Each balancer's loss summed over the MoE layers, from the last forward
        (:func:`~lightning_moe.layers.total_aux_losses`)."""
        return total_aux_losses(self)

    def parameter_counts(self) -> dict[str, int]:
        """``total`` parameters and ``active`` ones (used per token: on average
        ``router.experts_per_token`` of E routed experts per MoE layer; shared experts, routers,
        attention, norms and the tied embedding always), and ``expert`` (all routed experts).
        Counts the whole model also when expert parallelism has left each rank a shard."""
        total = sum(p.numel() for p in self.parameters())
        inactive = expert = 0
        for layer in self.moe_layers():
            expert_params = sum(p.numel() for p in layer.experts.parameters())
            shards = layer.num_experts // layer.experts.num_experts  # P under expert parallelism, else 1
            total += expert_params * (shards - 1)
            expert_params *= shards
            share = (layer.num_experts - layer.router.experts_per_token) / layer.num_experts
            inactive += round(expert_params * share)
            expert += expert_params
        return {"total": total, "active": total - inactive, "expert": expert}

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Forward FLOPs per token at sequence length ``seq_len`` (default ``max_seq_len``).

        Kaplan et al.'s count: 2 per weight of every matmul a token goes through (the active
        parameters without the norms' weights; the tied embedding counts once, as the output
        projection) plus ``2 * n_layers * seq_len * d_model`` for attention scores and values.
        A training step costs about three times this.
        """
        seq_len = self.max_seq_len if seq_len is None else check_positive_int("seq_len", seq_len)
        norm_params = sum(m.weight.numel() for m in self.modules() if isinstance(m, RMSNorm))
        matmul_params = self.parameter_counts()["active"] - norm_params
        return 2 * matmul_params + 2 * self.n_layers * seq_len * self.d_model

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
