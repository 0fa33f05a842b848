"""Causal self-attention for :class:`~lightning_moe.models.MoETransformer`: multi-head attention
(``mha``) and DeepSeek-V2/V3's multi-head latent attention (``mla``).

Legend: ``B`` batch, ``S`` sequence, ``D`` model width, ``H`` heads, ``Dh`` head width,
``R`` rotary head width (``qk_rope_head_dim``), ``N`` non-rotary query/key head width
(``qk_nope_head_dim``), ``Dv`` value head width, ``Cq``/``Ckv`` query and key-value latent widths
(``q_lora_rank``, ``kv_lora_rank``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe._validate import check_non_negative_int, check_positive_int

AttentionKind = Literal["mha", "mla"]
ATTENTION_KINDS = ("mha", "mla")


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in float32 (as DeepSeek's and Llama's)."""

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
    """Multi-head attention: one ``(D, 3D)`` query-key-value projection, RoPE on the whole head.

    Caches ``2 * D`` elements per token and layer (every head's key and value)."""

    def __init__(self, d_model: int, n_heads: int, rotary: Rotary) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.rotary = rotary
        self.kv_cache_per_token = 2 * d_model
        self.score_width = d_model  # width of the scores' and the values' products, for FLOP counts

    def forward(self, x_BSD: Tensor) -> Tensor:
        b, s, d = x_BSD.shape
        qkv = self.qkv(x_BSD).view(b, s, 3, self.n_heads, d // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, S, Dh)
        y = F.scaled_dot_product_attention(self.rotary(q), self.rotary(k), v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))  # (B, S, D)


@dataclass(kw_only=True)
class MLAConfig:
    """The sizes of multi-head latent attention (:class:`MultiHeadLatentAttention`).

    DeepSeek-V3 (D = 7168, 128 heads) uses ``q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64,
    qk_nope_head_dim=128, v_head_dim=128``; the defaults here suit the tiny models (D = 128, 4 heads).

    Args:
        q_lora_rank: width of the query latent ``Cq``, >= 1; ``None``: queries are one full-rank
            projection (DeepSeek-V2-Lite).
        kv_lora_rank: width of the key-value latent ``Ckv`` (what the KV cache holds per token), >= 1.
        qk_rope_head_dim: rotary part ``R`` of each query and key head, >= 0 and even; the rotary key
            is one head shared by all heads. 0 removes rotary positions.
        qk_nope_head_dim: non-rotary part ``N`` of each query and key head, >= 0; ``N + R`` >= 1.
        v_head_dim: value head width ``Dv``, >= 1.
    """

    q_lora_rank: int | None = 64
    kv_lora_rank: int = 32
    qk_rope_head_dim: int = 16
    qk_nope_head_dim: int = 32
    v_head_dim: int = 32

    def __post_init__(self) -> None:
        if self.q_lora_rank is not None:
            check_positive_int("q_lora_rank", self.q_lora_rank)
        check_positive_int("kv_lora_rank", self.kv_lora_rank)
        check_non_negative_int("qk_rope_head_dim", self.qk_rope_head_dim)
        check_non_negative_int("qk_nope_head_dim", self.qk_nope_head_dim)
        check_positive_int("v_head_dim", self.v_head_dim)
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"`qk_rope_head_dim` must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}.")
        if self.qk_rope_head_dim + self.qk_nope_head_dim < 1:
            raise ValueError("`qk_rope_head_dim + qk_nope_head_dim` (the query/key head width) must be >= 1.")

    def plain(self) -> dict[str, int | None]:
        return asdict(self)


class MultiHeadLatentAttention(nn.Module):
    """Multi-head latent attention (MLA), as in DeepSeek-V2 (section 2.1) and DeepSeek-V3.

    For a token's input ``h`` (after the block's RMSNorm), with ``H`` heads::

        c_q  = RMSNorm(W_DQ h)                          (Cq)     q_down, q_norm   (W_Q h without q_lora_rank)
        q    = W_UQ c_q  -> per head [q_nope (N); q_rope (R)]    q_up
        [c_kv; k_rope'] = W_DKV h                        (Ckv + R) kv_down
        c_kv = RMSNorm(c_kv)                                      kv_norm
        [k_nope (N); v (Dv)] per head = W_UKV c_kv                kv_up
        q_rope, k_rope = RoPE(q_rope), RoPE(k_rope')     k_rope: one head, shared by all
        o    = softmax(q·k / sqrt(N + R) + causal mask) v, with q = [q_nope; q_rope], k = [k_nope; k_rope]
        out  = W_O [o_1; ...; o_H]                                proj

    Attention runs through ``scaled_dot_product_attention`` (its default scale is ``1/sqrt(N + R)``).

    The KV cache: at inference only ``c_kv`` and the rotary key need keeping, ``Ckv + R`` elements per
    token and layer (``kv_up`` can be absorbed into the query and the output projection), against
    every head's key and value for multi-head attention, ``2 * H * Dh`` (``2 * D`` for
    :class:`CausalSelfAttention`, whose heads split ``D``); DeepSeek-V3's 512 + 64 = 576 against
    2 * 128 heads * 128 = 32,768 (57x less). :attr:`kv_cache_per_token` holds it, and
    :meth:`~lightning_moe.models.MoETransformer.kv_cache_per_token` sums it over the layers.

    Reduction to multi-head attention: with ``qk_rope_head_dim=0`` (no rotary split), ``q_lora_rank=None``
    and ``kv_lora_rank=D`` with ``W_DKV`` the identity, ``RMSNorm(c_kv)`` is the identity on inputs of
    unit RMS (which the block's pre-norm gives when its weight is 1), so MLA computes multi-head attention
    (without RoPE) with ``W_K``, ``W_V`` = the rows of ``W_UKV`` and ``W_Q = W_Q``: the test checks it.

    Parameter names follow the equations; the Hugging Face ``DeepseekV3Attention`` names are
    ``q_a_proj``/``q_a_layernorm``/``q_b_proj`` (or ``q_proj``), ``kv_a_proj_with_mqa``,
    ``kv_a_layernorm``, ``kv_b_proj`` and ``o_proj`` (:mod:`~lightning_moe.models.hf_deepseek_v3`).
    No biases (DeepSeek's ``attention_bias=False``).
    """

    def __init__(self, d_model: int, n_heads: int, config: MLAConfig, rotary: Rotary | None) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        self.n_heads = check_positive_int("n_heads", n_heads)
        self.config = config
        self.rope_dim, self.nope_dim, self.v_dim = config.qk_rope_head_dim, config.qk_nope_head_dim, config.v_head_dim
        qk_dim = self.rope_dim + self.nope_dim
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, n_heads * qk_dim, bias=False)
        else:
            self.q_down = nn.Linear(d_model, config.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(config.q_lora_rank)
            self.q_up = nn.Linear(config.q_lora_rank, n_heads * qk_dim, bias=False)
        self.kv_down = nn.Linear(d_model, config.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(config.kv_lora_rank)
        self.kv_up = nn.Linear(config.kv_lora_rank, n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.proj = nn.Linear(n_heads * self.v_dim, d_model, bias=False)
        if self.rope_dim and rotary is None:
            raise ValueError("MultiHeadLatentAttention with qk_rope_head_dim > 0 needs a Rotary of that width.")
        self.rotary = rotary if self.rope_dim else None
        self.kv_cache_per_token = config.kv_lora_rank + self.rope_dim
        self.score_width = n_heads * (qk_dim + self.v_dim) / 2  # mean width of the scores' and values' products

    def forward(self, x_BSD: Tensor) -> Tensor:
        b, s, _ = x_BSD.shape
        h = self.n_heads
        q = self.q_proj(x_BSD) if self.config.q_lora_rank is None else self.q_up(self.q_norm(self.q_down(x_BSD)))
        q_BHSQ = q.view(b, s, h, self.nope_dim + self.rope_dim).transpose(1, 2)
        c_kv, k_rope_BSR = self.kv_down(x_BSD).split([self.config.kv_lora_rank, self.rope_dim], dim=-1)
        kv_BHSK = self.kv_up(self.kv_norm(c_kv)).view(b, s, h, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v_BHSDv = kv_BHSK.split([self.nope_dim, self.v_dim], dim=-1)
        if self.rotary is not None:
            q_nope, q_rope = q_BHSQ.split([self.nope_dim, self.rope_dim], dim=-1)
            k_rope_B1SR = self.rotary(k_rope_BSR.unsqueeze(1)).expand(b, h, s, self.rope_dim)
            q_BHSQ = torch.cat((q_nope, self.rotary(q_rope)), dim=-1)
            k_BHSQ = torch.cat((k_nope, k_rope_B1SR), dim=-1)
        else:
            k_BHSQ = k_nope
        y = F.scaled_dot_product_attention(q_BHSQ, k_BHSQ, v_BHSDv, is_causal=True)  # (B, H, S, Dv)
        return self.proj(y.transpose(1, 2).reshape(b, s, h * self.v_dim))
