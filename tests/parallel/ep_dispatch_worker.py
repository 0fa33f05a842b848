"""Run under torchrun by test_expert_parallel.py: one MoE layer with expert parallelism against the
same layer whole, in one process, on the same global batch. Writes ``rank{r}.pt``.

Each case builds the layer identically on every rank (same seed), keeps a whole copy as the
reference, shards the other, routes this rank's slice of the global batch through it and
backpropagates ``(y * w).sum()``; non-expert gradients are averaged as DDP would, expert gradients
by ``reduce_expert_gradients``. The reference runs each rank's slice separately (expert choice
selects within a batch) and averages the per-slice losses, which is the same objective.
"""

import copy
import functools
import os
import sys

import torch
import torch.distributed as dist
from ddp_launch import save_rank_results

from lightning_moe.layers import MoELayer
from lightning_moe.parallel import reduce_expert_gradients, setup_expert_parallel
from lightning_moe.routing import LinearScorer, TopKRouter
from lightning_moe.routing.expert_choice import ExpertChoiceRouter

D, F, T = 12, 10, 13  # awkward sizes: T tokens per rank


# Uncentred scorers: the reference routes the batch chunk by chunk, and centring would make each chunk's routing
# depend on the chunk's mean. (Centred routing under expert parallelism averages over every rank's tokens:
# tests/routing/test_centering.py.)
UNCENTRED = functools.partial(LinearScorer, center_input=False)


def case(name: str, num_experts: int, ep_size: int, router, dispatcher: str, rank: int, world: int,
         bias: list[float] | None = None) -> dict:
    torch.manual_seed(0)
    layer = MoELayer(D, F, num_experts, router=router(D, num_experts), dispatcher=dispatcher,
                     expert_parallel_size=ep_size)
    if bias is not None:
        layer.router.expert_bias_E.copy_(torch.tensor(bias))
    reference = copy.deepcopy(layer)
    x_full = torch.randn(world * T, D, generator=torch.Generator().manual_seed(1))
    w_full = torch.randn(world * T, D, generator=torch.Generator().manual_seed(2))
    names = setup_expert_parallel(layer)

    x = x_full[rank * T:(rank + 1) * T].clone().requires_grad_(True)
    y = layer(x)
    (y * w_full[rank * T:(rank + 1) * T]).sum().div(world).backward()  # the global objective's share
    for n, p in layer.named_parameters():
        if n not in names and p.grad is not None:
            dist.all_reduce(p.grad)  # DDP: sum of each rank's share = the global gradient
    reduce_expert_gradients(layer)
    for _, p in layer.named_parameters():  # reduce_expert_gradients divides by world, DDP-style
        if getattr(p, "allreduce", True) is False:
            p.grad.mul_(world)

    ys = [torch.empty_like(y) for _ in range(world)]
    dist.all_gather(ys, y.detach())
    xr = x_full.clone().requires_grad_(True)
    ref_y = torch.cat([reference(xr[r * T:(r + 1) * T]) for r in range(world)])
    (ref_y * w_full).sum().div(world).backward()

    local = num_experts // ep_size
    ep_rank = rank % ep_size
    out = {"name": name, "y": torch.cat(ys), "ref_y": ref_y.detach(), "dx": x.grad,
           "ref_dx": xr.grad[rank * T:(rank + 1) * T], "exchange": layer.exchange, "expert_names": names,
           "grads": {}, "ref_grads": {}}
    ref_params = dict(reference.named_parameters())
    for n, p in layer.named_parameters():
        ref = ref_params[n].grad
        if n.startswith("experts."):
            assert p.shape[0] == local, (n, p.shape)
            ref = ref[ep_rank * local:(ep_rank + 1) * local]
            assert p.allreduce is False and p.group_name == f"ep_size_{ep_size}"
        out["grads"][n], out["ref_grads"][n] = p.grad, ref
    return out


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    ep = 2
    results = [
        case("topk-grouped", 6, ep, lambda d, e: TopKRouter(d, e, top_k=2, scorer=UNCENTRED), "grouped", rank, world),
        case("topk-loop", 6, ep, lambda d, e: TopKRouter(d, e, top_k=2, scorer=UNCENTRED), "loop", rank, world),
        case("expert-choice", 4, ep, lambda d, e: ExpertChoiceRouter(d, e, capacity_factor=2.0, scorer=UNCENTRED),
             "grouped", rank, world),
        # Every token to experts 0 and 1, both on the first rank: the second receives nothing.
        case("one-sided", 4, ep, lambda d, e: TopKRouter(d, e, top_k=2, expert_bias=True, scorer=UNCENTRED),
             "grouped", rank, world, bias=[100.0, 100.0, 0.0, 0.0]),
    ]
    if world % 4 == 0:
        results.append(case("topk-ep4", 8, 4, lambda d, e: TopKRouter(d, e, top_k=3, scorer=UNCENTRED), "grouped",
                            rank, world))
    save_rank_results(results, sys.argv[1])


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
