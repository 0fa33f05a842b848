"""A decoder-only transformer whose FFNs are MoE layers, every layer or every n-th.

Legend: ``B`` batch, ``S`` sequence, ``D`` model width, ``H`` heads, ``Dh`` head width,
``V`` vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe._validate import check_int_range, check_positive_int
from lightning_moe.experts.swiglu import SwiGLU
from lightning_moe.layers.config import MoEConfig
from lightning_moe.layers.moe_layer import MoELayer
from lightning_moe.layers.record import total_aux_losses


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
    width ``d_ff``; ``moe_every=0`` gives the dense baseline. Input and output embeddings are tied.
    What the MoE layers are made of (experts, router, balancers, capacity, dispatcher, fine-grained
    and shared experts, expert parallelism) is one :class:`~lightning_moe.layers.MoEConfig`.

    Args:
        vocab_size: vocabulary size V, >= 1.
        max_seq_len: longest sequence the rotary tables cover, >= 1.
        d_model: model width D, >= 1 and divisible by ``n_heads`` (head width even, for RoPE).
        n_layers: transformer blocks, >= 1.
        n_heads: attention heads, >= 1.
        d_ff: hidden width of the dense FFNs, >= 1.
        moe: the MoE layers (:class:`~lightning_moe.layers.MoEConfig`; ``None``: its defaults).
        moe_every: 1 = every layer (after the leading dense ones) is MoE, n = every n-th, 0 = none.
        first_dense_layers: leading dense layers, in [0, n_layers].
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
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"`d_model` ({d_model}) must split into `n_heads` ({n_heads}) heads of even width.")
        self.moe = moe = MoEConfig() if moe is None else moe
        self.max_seq_len = max_seq_len
        self.n_layers, self.d_model, self.granularity = n_layers, d_model, moe.granularity
        self.embed = nn.Embedding(vocab_size, d_model)
        rotary = Rotary(d_model // n_heads, max_seq_len)

        def ffn(i: int) -> nn.Module:
            if not moe_every or i < first_dense_layers or (i - first_dense_layers) % moe_every != moe_every - 1:
                return SwiGLU(d_model, d_ff)
            return MoELayer.from_config(d_model, moe)

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
