"""Run under torchrun by test_dedup_exchange.py (world = P = expert-parallel size): one MoE layer with
expert parallelism against the same layer whole, in this process, on the same global batch, for many
routings. Writes ``rank{r}.pt``: a list of cases, each with outputs, gradients and what every
``all_to_all_single`` of the step sent.

Each case builds the layer identically on every rank (same seed), keeps a whole copy as the reference,
shards the other, routes this rank's slice of the global batch through it and backpropagates
``(y * w).sum() / P``. The reference runs every rank's slice in turn (expert choice and capacity select
within a batch) with the same objective, so its input gradient is each rank's, its router gradient the
sum of the ranks' and its expert gradient, row for row, what the rank holding the expert computes.

The collective is the real one; a thin wrapper around ``torch.distributed.all_to_all_single`` only
records each call's tensor shape, dtype and split sizes before calling it.
"""

import copy
import functools
import os
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
from ddp_launch import save_rank_results
from torch import Tensor

from lightning_moe.layers import MoELayer
from lightning_moe.layers.moe_layer import route
from lightning_moe.parallel import setup_expert_parallel
from lightning_moe.routing import ExpertCapacity, LinearScorer, TopKRouter
from lightning_moe.routing.expert_choice import ExpertChoiceRouter
from lightning_moe.routing.routing import Router, Routing
from lightning_moe.routing.topk import token_choice_routing

D, F, T = 6, 5, 9  # awkward sizes: T tokens per rank unless a case says otherwise
UNCENTRED = functools.partial(LinearScorer, center_input=False)  # no batch statistics: slices route alike


class TableRouter(Router):
    """Experts from a fixed ``(V, K)`` table indexed by token id; gates the learned softmax scores of
    those experts (not renormalised, so the scorer gets gradients at every K)."""

    def __init__(self, d_model: int, num_experts: int, table_VK: Tensor) -> None:
        super().__init__(d_model, num_experts, table_VK.shape[1])
        self.scorer = UNCENTRED(d_model, num_experts)
        self.register_buffer("table_VK", table_VK)

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None) -> Routing:
        logits_TE = self.scorer(x_TD)
        scores_TE = logits_TE.softmax(-1)
        experts_TK = self.table_VK[token_ids_T]
        return token_choice_routing(scores_TE, logits_TE, experts_TK, scores_TE.gather(1, experts_TK))


def all_remote_table(world: int, tokens: int, num_experts: int, top_k: int) -> Tensor:
    """Rank r's tokens all go to experts of rank r + 1 (mod P), K distinct ones each."""
    local = num_experts // world
    table = [[((r + 1) % world) * local + (t + j) % local for j in range(top_k)]
             for r in range(world) for t in range(tokens)]
    return torch.tensor(table)


def idle_rank_table(world: int, tokens: int, num_experts: int, top_k: int) -> Tensor:
    """Every token to K experts of ranks 0 .. P-2 (some its own rank's): rank P-1 receives nothing."""
    busy = (world - 1) * num_experts // world
    generator = torch.Generator().manual_seed(3)
    return torch.stack([torch.randperm(busy, generator=generator)[:top_k] for _ in range(world * tokens)])


class AllToAllRecorder:
    """Records each ``all_to_all_single`` of this process while active: the tensor it sends (shape,
    dtype) and its input split sizes, then makes the real call."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self._real = dist.all_to_all_single

    def __enter__(self) -> "AllToAllRecorder":
        def recording(output, input, output_split_sizes=None, input_split_sizes=None, group=None,  # noqa: A002, ANN001
                      async_op=False):  # noqa: ANN001
            self.calls.append({"shape": tuple(input.shape), "dtype": input.dtype,
                               "in_splits": None if input_split_sizes is None else list(input_split_sizes)})
            return self._real(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

        dist.all_to_all_single = recording
        return self

    def __exit__(self, *exc: object) -> None:
        dist.all_to_all_single = self._real


def case(name: str, num_experts: int, router, rank: int, world: int, *, dispatcher: str = "grouped",  # noqa: ANN001
         tokens: list[int] | None = None, capacity: ExpertCapacity | None = None, autocast: bool = False) -> dict:
    tokens = tokens or [T] * world
    dtype = torch.float32 if autocast else torch.float64
    torch.manual_seed(0)
    layer = MoELayer(D, F, num_experts, router=router(D, num_experts), dispatcher=dispatcher, capacity=capacity,
                     expert_parallel_size=world).to(dtype)
    reference = copy.deepcopy(layer)
    total = sum(tokens)
    x_full = torch.randn(total, D, generator=torch.Generator().manual_seed(1), dtype=dtype)
    w_full = torch.randn(total, D, generator=torch.Generator().manual_seed(2), dtype=dtype)
    ids_full = torch.arange(total)
    bounds = [sum(tokens[:r]) for r in range(world + 1)]
    mine = slice(bounds[rank], bounds[rank + 1])
    expert_names = set(setup_expert_parallel(layer))
    autocasting = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16) if autocast else nullcontext

    x = x_full[mine].clone().requires_grad_(True)
    with AllToAllRecorder() as forward, autocasting():
        y = layer(x, ids_full[mine])
    with AllToAllRecorder() as backward:
        (y * w_full[mine]).sum().div(world).backward()
    with torch.no_grad():  # the routing again, for the test to count the minimum rows from
        routing = route(layer.router, x, layer.capacity, layer.training, ids_full[mine])
    for n, p in layer.named_parameters():
        if n not in expert_names and p.grad is not None:
            dist.all_reduce(p.grad)  # every rank's share of the objective: the whole batch's router gradient

    xr = x_full.clone().requires_grad_(True)
    with autocasting():
        ref_y = torch.cat([reference(xr[bounds[r]:bounds[r + 1]], ids_full[bounds[r]:bounds[r + 1]])
                           for r in range(world)])
    (ref_y * w_full).sum().div(world).backward()

    rows = layer.expert_rows
    ref_params = dict(reference.named_parameters())
    grads, ref_grads = {}, {}
    for n, p in layer.named_parameters():
        grads[n] = p.grad
        ref_grads[n] = ref_params[n].grad[rows] if n in expert_names else ref_params[n].grad
    return {"name": name, "world": world, "rank": rank, "num_experts": num_experts, "dtype": dtype,
            "y": y.detach(), "ref_y": ref_y.detach()[mine], "dx": x.grad, "ref_dx": xr.grad[mine],
            "grads": grads, "ref_grads": ref_grads, "exchange": dict(layer.exchange),
            "token_A": routing.token_A, "expert_A": routing.expert_A, "num_dropped": int(routing.num_dropped),
            "forward_calls": forward.calls, "backward_calls": backward.calls}


def topk(k: int, **kwargs: object):  # noqa: ANN201
    return lambda d, e: TopKRouter(d, e, top_k=k, renormalize=False, scorer=UNCENTRED, **kwargs)


def table(make, k: int, tokens: int = T):  # noqa: ANN001, ANN201
    return lambda d, e: TableRouter(d, e, make(dist.get_world_size(), tokens, e, k))


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    local_k = min(4, 8 // world)  # as many experts per token as one rank of 8 experts holds (up to 4)
    results = [case(f"top{k}", 16 if k == 8 else 8, topk(k), rank, world) for k in (1, 2, 4, 8)]
    results += [
        case("top2-loop", 8, topk(2), rank, world, dispatcher="loop"),
        case("all-remote", 8, table(all_remote_table, local_k), rank, world),
        case("all-remote-top1", 8, table(all_remote_table, 1), rank, world, dispatcher="loop"),
        case("idle-rank", 8, table(idle_rank_table, 2), rank, world),
        case("expert-choice", 8, lambda d, e: ExpertChoiceRouter(d, e, capacity_factor=2.5, scorer=UNCENTRED),
             rank, world),
        case("capacity", 8, topk(2), rank, world, capacity=ExpertCapacity(capacity_factor=0.5)),
        case("empty-rank", 8, topk(2), rank, world, tokens=[0] + [T] * (world - 1)),
        case("autocast", 8, topk(2), rank, world, autocast=True),
    ]
    save_rank_results(results, sys.argv[1])


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
