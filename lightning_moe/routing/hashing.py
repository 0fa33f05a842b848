"""Parameter-free routers: hash routing (deterministic) and random routing (the baseline).

Legend: ``T`` tokens, ``D`` model width, ``E`` experts, ``K`` experts per token, ``V`` vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_moe._validate import check_positive_int, check_token_ids
from lightning_moe.routing.routing import Router, Routing
from lightning_moe.routing.topk import token_choice_routing


def _hard_routing(experts_TK: Tensor, num_experts: int, dtype: torch.dtype) -> Routing:
    """Equal gates ``1/K`` on the chosen experts; scores are those gates spread over E, logits zero."""
    num_tokens, top_k = experts_TK.shape
    gates_TK = torch.full((num_tokens, top_k), 1.0 / top_k, dtype=dtype, device=experts_TK.device)
    scores_TE = torch.zeros(num_tokens, num_experts, dtype=dtype, device=experts_TK.device)
    scores_TE.scatter_(1, experts_TK, gates_TK)
    logits_TE = torch.zeros_like(scores_TE)
    return token_choice_routing(scores_TE, logits_TE, experts_TK, gates_TK)


class HashRouter(Router):
    """Deterministic, parameter-free routing: by token id, or by a locality-sensitive hash.

    When the model passes token ids down (``MoETransformer`` does), a token id always goes to the
    same experts, as in Roller et al.'s hash layers. With ``vocab_size`` set, ids map through a
    table that gives every expert the same number of ids (a seeded permutation of the vocabulary,
    ``expert = perm[id] mod E``); :meth:`balance_by_frequency` re-balances it on token counts so
    that every expert receives about the same number of *tokens* (Roller et al.'s balanced hash).
    Without ``vocab_size``, ids are hashed multiplicatively (Knuth) modulo E.

    Without token ids (a bare ``MoELayer`` on hidden states), experts come from a locality-
    sensitive hash of the hidden state: the arg-top-k of its projections on E fixed random
    directions, orthonormal when E <= D (similar states share experts; isotropic states spread
    evenly).

    The tables and directions are buffers drawn from a CPU generator seeded with ``seed``, so
    routing is identical across runs and processes. Gates are ``1/K``; ``scores_TE`` carries the
    same values spread over the experts and ``logits_TE`` is zero (there are none): balancing
    losses have nothing to train here.

    Args:
        d_model: width of the hidden states routed, >= 1.
        num_experts: number of experts E, >= 1.
        top_k: experts per token K, in [1, num_experts]; by id, a token reaches experts
            ``(h, h + 1, ..., h + K - 1) mod E`` for its hash h.
        vocab_size: vocabulary size V for the balanced id table, or ``None``.
        seed: seed of the id table and the hash directions.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 1,
        vocab_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(d_model, num_experts, top_k)
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        directions_DE = torch.randn(d_model, num_experts, generator=generator, dtype=torch.float64)
        if num_experts <= d_model:  # orthonormal: every expert equally likely for isotropic states
            directions_DE = torch.linalg.qr(directions_DE).Q
        else:
            directions_DE = directions_DE / directions_DE.norm(dim=0, keepdim=True)
        self.register_buffer("directions_DE", directions_DE.float())
        if vocab_size is not None:
            check_positive_int("vocab_size", vocab_size)
            perm_V = torch.randperm(vocab_size, generator=generator)
            self.register_buffer("expert_of_id_V", perm_V % num_experts)
        else:
            self.expert_of_id_V = None
        self.vocab_size = vocab_size

    @torch.no_grad()
    def balance_by_frequency(self, counts_V: Tensor) -> None:
        """Re-assign ids so that every expert receives about the same number of tokens.

        Greedy bin packing (most frequent id first, to the least-loaded expert), with id order
        as the tie-break so the table is deterministic. ``counts_V`` holds each id's count in
        the training data; needs ``vocab_size``.
        """
        if self.expert_of_id_V is None:
            raise ValueError("balance_by_frequency needs a HashRouter built with `vocab_size`.")
        if counts_V.shape != self.expert_of_id_V.shape:
            raise ValueError(f"`counts_V` must have shape ({self.vocab_size},), got {tuple(counts_V.shape)}.")
        order = torch.argsort(counts_V.cpu().double(), descending=True, stable=True)
        load = [0.0] * self.num_experts
        table = torch.empty_like(self.expert_of_id_V, device="cpu")
        for token_id, count in zip(order.tolist(), counts_V.cpu().double()[order].tolist(), strict=True):
            expert = min(range(self.num_experts), key=load.__getitem__)
            table[token_id] = expert
            load[expert] += count
        self.expert_of_id_V.copy_(table)

    def hash_ids(self, token_ids_T: Tensor) -> Tensor:
        """``(T,)`` base expert of each token id."""
        ids = token_ids_T.reshape(-1).long()
        if self.expert_of_id_V is None:
            return (ids * 2654435761) % (2**32) % self.num_experts
        check_token_ids(ids, self.vocab_size)
        return self.expert_of_id_V[ids]

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None) -> Routing:
        dtype = torch.promote_types(x_TD.dtype, torch.float32)
        if token_ids_T is not None:
            if token_ids_T.numel() != x_TD.shape[0]:
                raise ValueError(f"Got {token_ids_T.numel()} token ids for {x_TD.shape[0]} hidden states.")
            base_T1 = self.hash_ids(token_ids_T).unsqueeze(1)
            offsets_1K = torch.arange(self.top_k, device=x_TD.device).unsqueeze(0)
            experts_TK = (base_T1 + offsets_1K) % self.num_experts
        else:
            projections_TE = x_TD.detach().to(dtype) @ self.directions_DE.to(dtype)
            experts_TK = projections_TE.topk(self.top_k, dim=-1).indices
        return _hard_routing(experts_TK, self.num_experts, dtype)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"vocab_size={self.vocab_size}, seed={self.seed}")


class RandomRouter(Router):
    """A fresh uniformly random set of K distinct experts per token at every call (training and eval).

    The baseline the literature calls harmful: no parameters, no learning, balanced only in
    expectation. Gates are ``1/K``; ``logits_TE`` is zero.

    Args:
        d_model: width of the hidden states routed, >= 1.
        num_experts: number of experts E, >= 1.
        top_k: experts per token K, in [1, num_experts].
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int = 1) -> None:
        super().__init__(d_model, num_experts, top_k)

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None) -> Routing:
        dtype = torch.promote_types(x_TD.dtype, torch.float32)
        noise_TE = torch.rand(x_TD.shape[0], self.num_experts, device=x_TD.device)
        return _hard_routing(noise_TE.topk(self.top_k, dim=-1).indices, self.num_experts, dtype)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}"
