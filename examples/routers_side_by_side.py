"""Every router on the same batch, in plain PyTorch: who gets how many tokens, and does the gradient flow.

    python examples/routers_side_by_side.py

A router is a scorer times a selection rule; any selection rule takes any scorer. Parameter-free
routers (hash, random) have nothing to train; the balanced rules (expert choice, greedy) give every
expert the same share by construction.
"""

import functools

import torch

from lightning_moe import MoELayer, SwitchAuxLoss
from lightning_moe.routing import (
    AttentionScorer,
    BalancedRouter,
    ExpertChoiceRouter,
    GroupLimitedTopKRouter,
    HashRouter,
    MLPHadamardScorer,
    RandomRouter,
    TopKRouter,
)

D, E = 64, 8
routers = {
    "top-2 softmax (Mixtral)": functools.partial(TopKRouter, top_k=2),
    "top-2 sigmoid + bias": functools.partial(TopKRouter, top_k=2, score_func="sigmoid", expert_bias=True),
    "group-limited top-2": functools.partial(GroupLimitedTopKRouter, top_k=2, num_groups=4, topk_groups=1),
    "expert choice, MLP-Hadamard scorer": functools.partial(ExpertChoiceRouter, capacity_factor=2.0,
                                                            scorer=MLPHadamardScorer),
    "balanced (greedy), attention scorer": functools.partial(BalancedRouter, top_k=2, scorer=AttentionScorer),
    "hash (by token id)": functools.partial(HashRouter, vocab_size=1000),
    "random": RandomRouter,
}

torch.manual_seed(0)
x = torch.randn(4, 64, D) + 0.5 * torch.randn(D)  # a shared offset skews naive routers
ids = torch.randint(0, 1000, (4, 64))
print(f"{'router':38s} {'tokens per expert':34s} {'aux':>5s}  router grads")
for name, build in routers.items():
    layer = MoELayer(D, 128, E, router=build(D, E), balancers=[SwitchAuxLoss(coeff=1.0)])
    y = layer(x, ids)
    (y.pow(2).mean() + layer.aux_losses["aux_loss"]).backward()
    trained = [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in layer.router.parameters()]
    grads = "none (no parameters)" if not trained else f"{sum(trained)}/{len(trained)} parameters"
    loads = layer.stats.tokens_per_expert_E.tolist()
    print(f"{name:38s} {str(loads):34s} {layer.aux_losses['aux_loss'].item():5.2f}  {grads}")

# Auxiliary-loss-free balancing: the bias moves selection, never the gates.
router = TopKRouter(D, E, top_k=2, score_func="sigmoid", expert_bias=True)
router.expert_bias_E[3] = 1.0
routing = router(x.reshape(-1, D))
print("\nwith expert_bias_E[3] = 1, expert 3 serves", int(routing.tokens_per_expert()[3]), "of", routing.num_tokens,
      "tokens; its gates still come from the unbiased sigmoid scores")
