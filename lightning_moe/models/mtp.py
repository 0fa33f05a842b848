"""Multi-token prediction (MTP), as DeepSeek-V3 trains it (section 2.2 of its report).

Legend: ``B`` batch, ``S`` sequence (the main model's input), ``N = S + 1`` tokens of a training
sequence (input and last target), ``D`` model width, ``V`` vocabulary.

Depth ``k`` (1..K) predicts the token ``k + 1`` places ahead. For position ``i``, with ``h^0`` the
main model's last hidden state (before its final norm) and ``t`` the tokens::

    h'^k_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]       enorm, hnorm, proj  (2D -> D)
    h^k    = TRM_k(h'^k)                                           block: one transformer block
    P^k_{i+k+1} = softmax(OutHead(RMSNorm(h^k_i)))                 norm, then the shared output head

over ``i = 0 .. S - k - 1`` (the positions whose target ``t_{i+k+1}`` is in the sequence), with the
main model's embedding and output head shared. The loss is ``λ · (1/K) Σ_k CE_k``, ``CE_k`` the mean
cross-entropy of depth ``k``'s predictions. The embedding comes first in the concatenation, as in
DeepSeek's released inference code and checkpoint (``enorm``, ``hnorm``, ``eh_proj``,
``shared_head.norm``); the report's equation writes the two halves the other way round.

MTP modules only train: the model's ``forward`` and ``generate`` never run them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe.models.attention import RMSNorm
from lightning_moe.routing.routing import LossWeight  # noqa: F401 - its home before routers had losses


class MTPModule(nn.Module):
    """One MTP depth: combine the previous depth's hidden state with the next token's embedding,
    run one transformer block, normalise for the shared output head."""

    def __init__(self, d_model: int, block: nn.Module) -> None:
        super().__init__()
        self.enorm = RMSNorm(d_model)
        self.hnorm = RMSNorm(d_model)
        self.proj = nn.Linear(2 * d_model, d_model, bias=False)
        self.block = block
        self.norm = RMSNorm(d_model)

    def forward(self, h_BSD: Tensor, emb_BSD: Tensor, ids_BS: Tensor) -> Tensor:
        """``h^{k-1}`` and ``Emb(t_{i+k})`` at the same positions (``ids_BS``: the tokens ``t_{i+k}``,
        for token-id routers) -> ``h^k``."""
        return self.block(self.proj(torch.cat((self.enorm(emb_BSD), self.hnorm(h_BSD)), dim=-1)), ids_BS)


def mtp_cross_entropies(logits: list[Tensor], ids_BN: Tensor) -> list[Tensor]:
    """``CE_k`` (mean over tokens) for each depth ``k``: ``logits[k-1]``, ``(B, N - k - 1, V)``, against
    ``ids_BN[:, k + 1:]`` (depth ``k`` predicts ``t_{i+k+1}`` for ``i = 0 .. N - k - 2``)."""
    losses = []
    for k, logits_BMV in enumerate(logits, start=1):
        target_BM = ids_BN[:, k + 1:]
        losses.append(F.cross_entropy(logits_BMV.flatten(0, 1).float(), target_BM.flatten()))
    return losses
