"""Router input centring: remove the direction that every token's hidden state shares.

Legend: ``T`` tokens, ``D`` model width.

Why: the hidden states entering an MoE layer share a common direction (at initialisation the
tokens' mean cosine is about 0.4 in the demo model: causal attention averages its context, and the
residual stream is dominated by what all tokens share). A linear scorer turns that shared part
into a token-independent offset per expert, as large as the per-token part, so one expert is in
almost every token's top-k from step 0. The offset then moves faster than a balancing loss or an
expert bias can follow (a running mean lagging 10 steps behind still collapses every layer of the
demo within 10 steps); subtracting the current batch's mean removes it exactly, and the demo's
layers stay balanced from the first step (``tests/routing/test_centering.py``,
``benchmarks/BENCHMARKS.md``, "Learned routing").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_moe._validate import check_positive_int


class InputCentering(nn.Module):
    """``x_TD - mean``: the batch mean over tokens in training, a running mean in evaluation.

    Like batch normalisation's centring without the scale: in training each batch is centred on
    its own (detached) mean over tokens, and ``running_mean_D`` (a persistent buffer, so saved and
    restored with the model) tracks it with momentum ``MOMENTUM``; evaluation and inference use
    ``running_mean_D`` only, so a token's routing there never depends on other tokens. Before the
    first training batch the running mean is zero (centring is the identity); a training batch of
    a single token is centred on the running mean (its own mean would erase it). The mean is
    detached: no gradient flows between the tokens of a batch. In training a token's routing sees
    the batch mean, to which each of the batch's T tokens contributes ``1/T`` (T = 2,048 in the
    demo); validation never does. Under data or expert parallelism the mean is over the tokens of
    every rank (one all-reduce), the same as one process routing the whole batch.

    Args:
        d_model: width D of the routed hidden states, >= 1.
    """

    #: Weight of the running mean's past: a horizon of ~10 batches keeps up with the fast drift of
    #: the first steps and averages out one batch's noise later.
    MOMENTUM = 0.9

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.register_buffer("running_mean_D", torch.zeros(d_model))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def forward(self, x_TD: Tensor) -> Tensor:
        if not self.training or x_TD.shape[0] < 2:  # one token's own mean would erase it
            return x_TD - self.running_mean_D.to(x_TD.dtype)
        mean_D = _global_mean(x_TD.detach())
        with torch.no_grad():
            # The first batch sets the running mean, later ones move it; branchless, so no host-device sync
            # (and no graph break under torch.compile) reads the counter.
            mean_D = mean_D.to(self.running_mean_D.dtype)
            moved_D = torch.lerp(self.running_mean_D, mean_D, 1.0 - self.MOMENTUM)
            self.running_mean_D.copy_(torch.where(self.num_batches_tracked == 0, mean_D, moved_D))
            self.num_batches_tracked += 1
        return x_TD - mean_D

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, momentum={self.MOMENTUM}"


def _global_mean(x_TD: Tensor) -> Tensor:
    """The mean over the tokens of every rank when a process group is up (one all-reduce of D + 1
    numbers), so routing under DDP or expert parallelism equals one process routing the whole batch."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return x_TD.mean(dim=0)
    sum_and_count = torch.cat([x_TD.sum(dim=0, dtype=torch.float64), x_TD.new_full((1,), x_TD.shape[0],
                                                                                   dtype=torch.float64)])
    dist.all_reduce(sum_and_count)
    return (sum_and_count[:-1] / sum_and_count[-1]).to(x_TD.dtype)
