"""Expert parallelism: all-to-all bytes per step against the theoretical minimum, and step time EP=P vs EP=1.

Legend: ``G`` tokens of the global batch, ``T = G / W`` tokens per rank (W processes), ``D`` model width,
``E`` experts per layer, ``K`` experts per token, ``P`` expert-parallel size, ``L = E / P`` experts per rank,
``A = T * K`` assignments routed on one rank.

Two models train side by side in the same W processes (default W = P = 2), built from the same seed and fed
the same global batch, each rank its slice of ``T`` tokens:

- ``EP=1``: plain data parallelism. Every rank holds all E experts of every layer; after backward all
  gradients (experts included) are averaged over the W ranks in one flat all-reduce, as DDP does.
- ``EP=P``: ``MoELayer(..., expert_parallel_size=P)`` sharded by ``lightning_moe.parallel.setup_expert_parallel``,
  so each rank keeps L experts and tokens reach them by all-to-all. Non-expert gradients are averaged over the
  world in one flat all-reduce, expert gradients by ``reduce_expert_gradients`` (over the expert-data-parallel
  group, which at W = P is the rank itself).

The model is ``--layers`` residual blocks ``x + MoELayer(RMSNorm(x))`` (``TopKRouter`` top-K, SwiGLU experts)
and a linear head, trained on random inputs and targets with an MSE loss and AdamW: MoE layers only, since
attention and embeddings would add the same work to both models and only dilute the ratio. A step is forward,
backward, the gradient reduction and ``optimizer.step()``; both ranks start each step together (barrier) and a
step's time is the slower rank's. Rounds alternate the order (EP=1 first, then EP=P first, ...); median and
min of each and the ratio EP=P / EP=1 are printed. Before timing, the two models' outputs are compared; after
it, their losses (the same weights, the same data, so they should agree to float rounding).

Bytes. After each forward, ``layer.exchange`` holds the rows this rank sent to and received from each rank of
its group through the all-to-all (0 for itself) and the rows it kept for its own experts (``local_rows``). One
row is D values: a token goes once to each *other* rank holding any of its chosen experts, with its local
expert ids and gates beside it, and that rank sends back one row, its local experts' gated outputs summed.
A training step moves rows between ranks four times: forward dispatch, forward combine (the combined rows going
back), and the same two transposed in backward. The bytes that cross between ranks are ``4 * rows to other
ranks * D * element size`` (summed over ranks and layers). Counted apart: per assignment sent, its int64 row
and local expert (8 B, forward) and its float32 gate (4 B forward, 4 B gradient backward); per layer forward,
one all-to-all of a (P, 2) int64 count table.

The theoretical minimum: a token needs its D values once on each *remote* rank that holds at least one of its
chosen experts, and one combined D-vector back from that rank; experts on the token's own rank cost nothing.
So the minimum is ``4 * (distinct (token, remote rank) pairs) * D * element size``, counted from the routing
each forward actually used (a forward hook on each router). The deduplicated exchange sends exactly that: the
ratio printed is 1.000 (a warning says otherwise). For comparison, one row per assignment (the exchange
before deduplication) costs, for E=8, K=2, P=2 and even routing, 1 / (1 - 3/14) = 1.27 times the minimum (a
token has both experts on the other rank with probability C(4,2)/C(8,2) = 3/14).

``--bytes-only`` (implied by several values of ``--top-k`` or ``--ep-size``) skips the timing: for each P it
runs W = P processes, one training step per K, and prints rows sent against the minimum and their ratio:

    python benchmarks/expert_parallel.py --top-k 2,4,8 --ep-size 2,4 --experts 16 --tokens 512

On one machine with W processes over gloo the all-to-alls buy nothing: they are copies through local
sockets that EP=1 does not make. What EP=P saves even here is the gradient all-reduce of the expert weights
(EP=1 averages all of them every step; EP=P, at W = P, none) and the optimizer update of the experts it no
longer holds. The all-to-all grows with tokens per step, those savings with expert parameters, so which side
wins on one machine depends on the shape; the output says which did. EP's purpose is memory per device (the
expert parameters, gradients and optimizer state per rank shrink P times, printed below) and scaling across
devices. With ``--device cuda`` each rank takes one GPU (NCCL); one GPU cannot hold two ranks' experts apart,
so with fewer GPUs than processes the script says so and exits.

    python benchmarks/expert_parallel.py                              # 2 processes, gloo, the defaults
    python benchmarks/expert_parallel.py --top-k 4 --experts 16       # more experts per token
    python benchmarks/expert_parallel.py --device cuda --json ep.json # 2 GPUs, NCCL
    torchrun --nproc-per-node 2 benchmarks/expert_parallel.py         # under an existing launcher

Memory per rank and sharded checkpoints (``--memory-and-checkpoint``): what expert parallelism is for. For each P of
``--ep-size`` (default 1,2,4, run largest first) it launches W = P processes (gloo, CPU) that build a
``MoELanguageModel`` (every block's FFN an MoE layer, ``moe.expert_parallel_size = P``, AdamW) and report per rank:

1. Construction: the routed-expert bytes the rank holds (exactly the whole model's / P), the dense (replicated)
   bytes, and the peak resident memory that building the model and ``setup_expert_parallel`` add. Bound:
   whole experts / P + dense + one expert's weights (its initial values are drawn, then copied into place) +
   ``--allowance-mb``. A tiny model built, sharded and stepped first pays the one-time costs (imports, process
   groups, thread pools), which do not grow with the model.
2. The first training step (forward, backward, dense gradients averaged in one flat all-reduce and the experts'
   by ``reduce_expert_gradients``, as under ``MoEDDPStrategy``; AdamW's step): its peak increase against
   4 x (experts / P + dense) (parameters, gradients, two moments; the parameters are resident before the step, so
   their share covers the optimizer's temporaries) + activations. Activations are measured on the same rank just
   before: the peak of a forward and backward from the same clean state, less the gradients it leaves (all of
   them exist at the end of the backward, so this is at least everything else live then, the buffers the
   ``grouped`` dispatcher keeps for the next step included). The batch is per rank (``--batch-size``
   sequences), so activations stay about level as P grows while the expert state falls as 1/P.
3. Checkpoints: a one-step Lightning fit under ``MoEDDPStrategy``, then ``trainer.save_checkpoint`` and
   ``trainer.strategy.load_checkpoint`` (what Lightning calls to resume), timed (slowest rank) with their peak
   memory; bytes written per rank (its ``__{r}_0.distcp``; rank 0 also ``meta.pt`` and ``.metadata``) and bytes
   read (the saved chunks DCP's reader loads, each whole, counted by a ``FileSystemReader`` through the
   strategy's ``storage_reader`` hook) against the bytes of the tensors the rank receives. Every smaller P also
   loads every larger P's checkpoint (resharding). The checkpoint was just written: the page cache serves reads.

Peak memory is ``VmHWM`` (/proc/self/status), its high-water mark reset by writing 5 to /proc/self/clear_refs
before each phase (``ru_maxrss``, the process's peak since it started, where that fails: the tables say so).
Freed large blocks go back to the system in these processes (``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB,
``malloc_trim`` before each phase), so resident memory follows what is live.

    python benchmarks/expert_parallel.py --memory-and-checkpoint                      # P = 1, 2, 4; ~100 MB of experts
    python benchmarks/expert_parallel.py --memory-and-checkpoint --experts 32 --d-ff 2048 --layers 4  # ~800 MB
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import functools
import json
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.checkpoint import FileSystemReader

from lightning_moe.dispatch import DISPATCHERS
from lightning_moe.dispatch.grouped import release_recycled_buffers
from lightning_moe.layers import MoEConfig, MoELayer
from lightning_moe.parallel import (
    is_expert_parameter,
    moe_param_groups,
    reduce_expert_gradients,
    setup_expert_parallel,
)
from lightning_moe.routing import TopKRouter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_layer import device_name  # noqa: E402  (a sibling script: one way to name the hardware)

A2A_PER_STEP = 4  # forward dispatch, forward combine, and their transposes in backward
ASSIGNMENT_BYTES = 8 + 4 + 4  # per assignment sent: int64 row and local expert, float32 gate, its gradient
MB = 2**20


class MoEStack(nn.Module):
    """``layers`` blocks ``x + MoELayer(RMSNorm(x))`` and a linear head, ``(T, D) -> (T, D)``."""

    def __init__(self, args: argparse.Namespace, ep_size: int) -> None:
        super().__init__()
        d = args.d_model
        self.norms = nn.ModuleList(nn.RMSNorm(d) for _ in range(args.layers))
        self.moes = nn.ModuleList(
            MoELayer(d, args.d_ff, args.experts, router=TopKRouter(d, args.experts, top_k=args.top_k),
                     dispatcher=args.dispatcher, expert_parallel_size=ep_size)
            for _ in range(args.layers))
        self.head = nn.Linear(d, d)

    def forward(self, x_TD: Tensor) -> Tensor:
        for norm, moe in zip(self.norms, self.moes, strict=True):
            x_TD = x_TD + moe(norm(x_TD))
        return self.head(x_TD)


# ------------------------------------------------------------------------------------------- one rank


def all_reduce_mean(grads: list[Tensor], world: int, group: object = None) -> None:
    """Average ``grads`` over ``group`` in one flat all-reduce, as one DDP bucket would."""
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat, group=group)
    flat.div_(world)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def reduce_data_parallel(model: nn.Module, world: int) -> None:
    all_reduce_mean([p.grad for p in model.parameters() if p.grad is not None], world)


def reduce_expert_parallel(model: nn.Module, world: int) -> None:
    all_reduce_mean([p.grad for p in model.parameters() if p.grad is not None and not is_expert_parameter(p)], world)
    reduce_expert_gradients(model)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x_TD: Tensor, target_TD: Tensor,
               world: int, expert_parallel: bool) -> Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss = F.mse_loss(model(x_TD), target_TD)
    loss.backward()
    (reduce_expert_parallel if expert_parallel else reduce_data_parallel)(model, world)
    optimizer.step()
    return loss.detach()


class RoutingRecorder:
    """Keeps the (token, expert) pairs of each layer's last routing, from a forward hook on its router."""

    def __init__(self, layers: list[MoELayer]) -> None:
        self.last: dict[int, tuple[Tensor, Tensor]] = {}
        for i, layer in enumerate(layers):
            layer.router.register_forward_hook(self._hook(i))

    def _hook(self, index: int):  # noqa: ANN202
        def hook(module: nn.Module, inputs: object, routing: object) -> None:
            self.last[index] = (routing.token_A.detach(), routing.expert_A.detach())
        return hook


def exchange_rows(layer: MoELayer, token_A: Tensor, expert_A: Tensor) -> dict[str, object]:
    """Rows of one layer's last forward on this rank: from ``layer.exchange``, and the minimum from routing."""
    groups = layer.expert_parallel
    local = layer.num_experts // groups.size
    rank_A = expert_A // local  # the rank of the group that holds each assignment's expert
    remote_A = rank_A != groups.rank
    pairs = torch.unique(token_A[remote_A] * groups.size + rank_A[remote_A])
    exchange = layer.exchange
    sent, received = list(exchange["sent_rows"]), list(exchange["received_rows"])
    return {"assignments": int(expert_A.numel()), "sent_rows": sent, "received_rows": received,
            "self_rows": sum(exchange["local_rows"]), "remote_rows": sum(sent),
            "remote_assignments": sum(exchange["sent_assignments"]),
            "routing_remote_assignments": int(remote_A.sum()), "min_remote_rows": int(pairs.numel())}


def make_batches(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> list[tuple[Tensor, Tensor]]:
    """Four global batches (G, D) of inputs and targets, the same on every rank; this rank's (T, D) slices."""
    generator = torch.Generator().manual_seed(1)
    t = args.tokens // world
    batches = []
    for _ in range(4):
        x_GD = torch.randn(args.tokens, args.d_model, generator=generator)
        target_GD = torch.randn(args.tokens, args.d_model, generator=generator)
        batches.append((x_GD[rank * t:(rank + 1) * t].to(device), target_GD[rank * t:(rank + 1) * t].to(device)))
    return batches


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parameter_bytes(model: MoEStack, experts_only: bool) -> int:
    """Bytes of this rank's parameters: the routed experts' only, or all."""
    params = [p for moe in model.moes for p in moe.experts.parameters()] if experts_only else model.parameters()
    return sum(p.numel() * p.element_size() for p in params)


def init_process(rank: int, args: argparse.Namespace, world: int, init_method: str | None) -> torch.device:
    """Join the process group (gloo on CPU, NCCL on GPUs); this rank's device."""
    device = torch.device("cuda", rank % torch.cuda.device_count()) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if init_method is None:  # under torchrun: env:// from RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
    if args.threads:
        torch.set_num_threads(args.threads)
    return device


def worker(rank: int, args: argparse.Namespace, world: int, init_method: str | None) -> None:
    device = init_process(rank, args, world, init_method)
    try:
        result = measure(args, rank, world, device)
        if rank == 0:
            report(args, world, device, result)
    finally:
        dist.destroy_process_group()


def measure(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> dict[str, object]:
    names = ("EP=1", f"EP={args.ep_size}")
    models = {}
    for name, ep_size in zip(names, (1, args.ep_size), strict=True):
        torch.manual_seed(0)  # the same weights: an EP layer is built whole, then sharded
        models[name] = MoEStack(args, ep_size).to(device)
    setup_expert_parallel(models[names[1]])
    memory = {name: {"expert": parameter_bytes(m, True), "total": parameter_bytes(m, False)}
              for name, m in models.items()}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1) for name, m in models.items()}
    ep_layers = list(models[names[1]].moes)
    recorder = RoutingRecorder(ep_layers)
    batches = make_batches(args, rank, world, device)

    with torch.no_grad():  # same weights, same input: the outputs must agree before anything is timed
        check = (models[names[0]](batches[0][0]) - models[names[1]](batches[0][0])).abs().max()
    dist.all_reduce(check, op=dist.ReduceOp.MAX)

    times: dict[str, list[float]] = {name: [] for name in names}
    losses: dict[str, float] = {}
    rows: list[list[dict[str, object]]] = []  # per timed step, per layer
    for round_ in range(args.warmup + args.steps):
        x_TD, target_TD = batches[round_ % len(batches)]
        for name in names if round_ % 2 == 0 else names[::-1]:
            synchronize(device)
            dist.barrier()
            start = time.perf_counter()
            loss = train_step(models[name], optimizers[name], x_TD, target_TD, world, name != names[0])
            synchronize(device)
            seconds = time.perf_counter() - start
            losses[name] = loss.item()
            if round_ >= args.warmup:
                times[name].append(seconds)
                if name == names[1]:  # counted after the clock stops, from what the step recorded
                    rows.append([exchange_rows(layer, *recorder.last[i]) for i, layer in enumerate(ep_layers)])

    gathered: list[dict[str, object]] = [None] * world  # type: ignore[list-item]
    local = {"rank": rank, "times": times, "rows": rows, "losses": losses}
    dist.all_gather_object(gathered, local)
    return {"names": names, "per_rank": gathered, "memory": memory, "check": check.item(),
            "grad_bytes": gradient_bytes(models, names)}


def gradient_bytes(models: dict[str, MoEStack], names: tuple[str, str]) -> dict[str, int]:
    """Payload of each rank's gradient all-reduces per step: EP=1 all; EP=P non-expert (world) + expert shard."""
    ep_total, ep_expert = parameter_bytes(models[names[1]], False), parameter_bytes(models[names[1]], True)
    return {"EP=1 world": parameter_bytes(models[names[0]], False), f"{names[1]} world": ep_total - ep_expert,
            f"{names[1]} expert-data group": ep_expert}

# --------------------------------------------------------------------------------------------- report


@dataclass
class LayerBytes:
    """One layer's exchange per step, summed over the ranks and averaged over the timed steps."""

    layer: int
    assignment_rows: float
    self_rows: float
    remote_rows: float
    min_remote_rows: float
    remote_assignments: float
    actual_mb: float
    minimum_mb: float
    ratio: float


def layer_bytes(per_rank: list[dict], layer: int, row_bytes: int) -> LayerBytes:
    steps = len(per_rank[0]["rows"])

    def total(key: str) -> float:
        return sum(r["rows"][s][layer][key] for r in per_rank for s in range(steps)) / steps

    remote, minimum = total("remote_rows"), total("min_remote_rows")
    return LayerBytes(layer, total("assignments"), total("self_rows"), remote, minimum, total("remote_assignments"),
                      A2A_PER_STEP * remote * row_bytes / MB, A2A_PER_STEP * minimum * row_bytes / MB,
                      remote / minimum if minimum else float("nan"))


def exchange_mismatches(per_rank: list[dict]) -> int:
    """(rank, step, layer) cases whose rows sent are not the minimum, or whose assignments sent are not the
    routing's assignments to other ranks."""
    return sum(layer["remote_rows"] != layer["min_remote_rows"]
               or layer["remote_assignments"] != layer["routing_remote_assignments"]
               for r in per_rank for step in r["rows"] for layer in step)


def step_seconds(per_rank: list[dict], name: str) -> list[float]:
    """Each step's time is the slower rank's."""
    return [max(step) for step in zip(*(r["times"][name] for r in per_rank), strict=True)]


def report(args: argparse.Namespace, world: int, device: torch.device, result: dict) -> None:
    names, per_rank = result["names"], result["per_rank"]
    ep_name = names[1]
    row_bytes = args.d_model * 4  # both models run in float32
    layers = [layer_bytes(per_rank, i, row_bytes) for i in range(args.layers)]
    times = {name: step_seconds(per_rank, name) for name in names}
    med = {name: statistics.median(ts) for name, ts in times.items()}
    low = {name: min(ts) for name, ts in times.items()}
    backend = "nccl" if device.type == "cuda" else "gloo"
    command = f"python benchmarks/expert_parallel.py {' '.join(args.argv)}".strip()

    print(f"\n### {datetime.date.today().isoformat()}, {device_name(device)}, torch {torch.__version__}, "
          f"{world} processes, {backend}, {torch.get_num_threads()} threads each, float32\n")
    print(f"`{command}`: G={args.tokens} tokens per step ({args.tokens // world} per rank), D={args.d_model}, "
          f"E={args.experts}, K={args.top_k}, F={args.d_ff}, {args.layers} MoE layers ({args.dispatcher}); "
          f"{args.steps} interleaved steps after {args.warmup} warm-up\n")
    print(f"check before timing: max |y_{ep_name} - y_EP=1| = {result['check']:.2e}; last loss "
          + ", ".join(f"{name} {per_rank[0]['losses'][name]:.6f}" for name in names) + "\n")

    print("| model | median ms/step | min ms/step | tokens/s (median) | expert params MB/rank | params MB/rank |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in names:
        memory = result["memory"][name]
        print(f"| {name} | {med[name] * 1e3:.1f} | {low[name] * 1e3:.1f} | {args.tokens / med[name]:.0f} "
              f"| {memory['expert'] / MB:.2f} | {memory['total'] / MB:.2f} |")
    print(f"\n{ep_name} / EP=1 step time: {med[ep_name] / med['EP=1']:.3f} (medians), "
          f"{low[ep_name] / low['EP=1']:.3f} (minimums).")
    expert_ratio = result["memory"]["EP=1"]["expert"] / result["memory"][ep_name]["expert"]
    print(f"Expert parameters per rank: {expert_ratio:.1f}x fewer under {ep_name}; with their gradients and "
          f"AdamW's two states (4x the parameters) {4 * result['memory']['EP=1']['expert'] / MB:.2f} MB against "
          f"{4 * result['memory'][ep_name]['expert'] / MB:.2f} MB.")
    grads = result["grad_bytes"]
    print(f"Gradient all-reduce payload per rank and step: EP=1 {grads['EP=1 world'] / MB:.2f} MB over "
          f"{world} ranks; {ep_name} {grads[f'{ep_name} world'] / MB:.2f} MB over {world} ranks plus "
          f"{grads[f'{ep_name} expert-data group'] / MB:.2f} MB over the expert-data-parallel group of "
          f"{world // args.ep_size} rank(s).\n")

    actual_mb, count_bytes = print_exchange(args, world, ep_name, per_rank, layers, row_bytes)
    print_notes(args, device, ep_name, per_rank, med, actual_mb / world, result["memory"]["EP=1"]["expert"] / MB)
    if args.json:
        write_json(args, world, device, command, names, med, low, times, layers, result, count_bytes)


def print_exchange(args: argparse.Namespace, world: int, ep_name: str, per_rank: list[dict], layers: list[LayerBytes],
                   row_bytes: int) -> tuple[float, int]:
    """The all-to-all table; returns the MB per step crossing between ranks and the count tables' bytes."""
    print(f"All-to-all rows and bytes per step under {ep_name}, summed over the {world} ranks, mean of "
          f"{len(per_rank[0]['rows'])} steps (one row = D={args.d_model} float32 = {row_bytes} B; bytes = "
          f"{A2A_PER_STEP} all-to-alls x rows to other ranks; rows kept: tokens for the rank's own experts):\n")
    print("| layer | assignments | rows kept | rows to other ranks | minimum rows | MB/step | "
          "minimum MB/step | actual / minimum |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for b in layers:
        print(f"| {b.layer} | {b.assignment_rows:.0f} | {b.self_rows:.0f} | {b.remote_rows:.0f} "
              f"| {b.min_remote_rows:.0f} | {b.actual_mb:.3f} | {b.minimum_mb:.3f} | {b.ratio:.3f} |")
    actual, minimum = sum(b.actual_mb for b in layers), sum(b.minimum_mb for b in layers)
    print(f"| all | {sum(b.assignment_rows for b in layers):.0f} | {sum(b.self_rows for b in layers):.0f} "
          f"| {sum(b.remote_rows for b in layers):.0f} | {sum(b.min_remote_rows for b in layers):.0f} "
          f"| {actual:.3f} | {minimum:.3f} | {actual / minimum if minimum else float('nan'):.3f} |")
    count_bytes = world * (args.ep_size - 1) * 2 * 8 * args.layers
    print(f"\nPlus the (P, 2) int64 count tables: {count_bytes} B per step in all (one all-to-all per layer "
          f"forward), and per assignment sent to another rank {ASSIGNMENT_BYTES} B (its int64 row and local expert, "
          f"its float32 gate and the gate's gradient): "
          f"{sum(b.remote_assignments for b in layers) * ASSIGNMENT_BYTES / MB:.3f} MB per step. "
          "Last step's rows per rank through the all-to-all, layer 0:")
    for r in per_rank:
        last = r["rows"][-1][0]
        print(f"- rank {r['rank']}: sent_rows {last['sent_rows']}, received_rows {last['received_rows']}")
    return actual, count_bytes


def print_notes(args: argparse.Namespace, device: torch.device, ep_name: str, per_rank: list[dict],
                med: dict[str, float], a2a_mb: float, expert_mb: float) -> None:
    mismatched = exchange_mismatches(per_rank)
    if mismatched:
        print(f"- WARNING: in {mismatched} (rank, step, layer) cases the rows sent to other ranks are not the "
              "minimum counted from the routing, or the assignments sent disagree with it.")
    print("- The exchange sends each token once to each other rank holding any of its experts and combines "
          "there, so the rows sent are the minimum; rows for experts on the token's own rank cross no link.")
    if device.type == "cpu":
        ratio = med[ep_name] / med["EP=1"]
        verdict = "outweigh" if ratio < 1 else "do not outweigh"
        print(f"- On one machine over gloo the all-to-alls buy nothing ({a2a_mb:.1f} MB per rank per step of local "
              f"copies that EP=1 does not make). What {ep_name} saves even here is the all-reduce of the expert "
              f"gradients ({expert_mb:.1f} MB per rank per step under EP=1) and the optimizer update of the experts "
              f"it no longer holds; at this shape the savings {verdict} the all-to-all ({ep_name}/EP=1 = "
              f"{ratio:.2f}, medians). The all-to-all grows with tokens per step, the savings with expert "
              "parameters. Expert parallelism is for memory per device (the expert columns above) and scaling "
              "across devices.")
    print(flush=True)


def write_json(args: argparse.Namespace, world: int, device: torch.device, command: str, names: tuple[str, str],
               med: dict, low: dict, times: dict, layers: list[LayerBytes], result: dict, count_bytes: int) -> None:
    payload = {
        "date": datetime.date.today().isoformat(), "machine": device_name(device), "torch": torch.__version__,
        "command": command, "processes": world, "backend": "nccl" if device.type == "cuda" else "gloo",
        "shape": {k: getattr(args, k) for k in ("tokens", "d_model", "d_ff", "experts", "top_k", "layers",
                                                  "ep_size", "dispatcher")},
        "steps": args.steps, "warmup": args.warmup,
        "step_ms": {n: {"median": med[n] * 1e3, "min": low[n] * 1e3, "all": [t * 1e3 for t in times[n]]}
                    for n in names},
        "ratio_median": med[names[1]] / med[names[0]], "ratio_min": low[names[1]] / low[names[0]],
        "memory_bytes_per_rank": result["memory"], "grad_allreduce_bytes_per_rank": result["grad_bytes"],
        "all_to_all_per_layer": [asdict(b) for b in layers], "count_table_bytes": count_bytes,
        "check_max_abs_diff": result["check"],
        "last_loss": result["per_rank"][0]["losses"],
    }
    with open(args.json, "w") as out:
        json.dump(payload, out, indent=2)
    print(f"wrote {args.json}")


# ----------------------------------------------------------------------------------------- byte sweep

SWEEP_KEYS = ("assignments", "self_rows", "remote_rows", "min_remote_rows", "remote_assignments",
              "routing_remote_assignments")


def check_byte_sweep(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """The byte sweep's own checks: W = P processes for each P (one P under an existing launcher)."""
    if args.processes is not None:
        parser.error("--processes is W = P in the byte sweep (--bytes-only, or several --top-k / --ep-size)")
    if "WORLD_SIZE" in os.environ and args.ep_sizes != [int(os.environ["WORLD_SIZE"])]:
        parser.error(f"under a launcher of {os.environ['WORLD_SIZE']} processes the byte sweep runs "
                     f"--ep-size {os.environ['WORLD_SIZE']} only, got {args.ep_sizes}")
    for ep_size in args.ep_sizes:
        if args.tokens % ep_size:
            parser.error(f"--tokens {args.tokens} must be a multiple of every --ep-size, not of {ep_size}")
    args.threads = args.threads or 1  # nothing is timed
    return args


def measure_bytes(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> list[dict[str, int]]:
    """For each K, one forward and backward of an EP=W model: this rank's rows (``exchange_rows``), summed
    over the layers."""
    x_TD, target_TD = make_batches(args, rank, world, device)[0]
    results = []
    for top_k in args.top_ks:
        torch.manual_seed(0)
        model = MoEStack(argparse.Namespace(**{**vars(args), "top_k": top_k}), world).to(device)
        setup_expert_parallel(model)
        recorder = RoutingRecorder(list(model.moes))
        F.mse_loss(model(x_TD), target_TD).backward()
        layers = [exchange_rows(layer, *recorder.last[i]) for i, layer in enumerate(model.moes)]
        results.append({"top_k": top_k, **{key: sum(layer[key] for layer in layers) for key in SWEEP_KEYS}})
    return results


def bytes_worker(rank: int, args: argparse.Namespace, world: int, init_method: str | None,
                 out_path: str | None) -> None:
    """One rank of the byte sweep at P = W; rank 0 writes the sums over ranks to ``out_path`` (or, under an
    existing launcher, prints the table)."""
    device = init_process(rank, args, world, init_method)
    try:
        gathered: list[list[dict[str, int]]] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(gathered, measure_bytes(args, rank, world, device))
        if rank == 0:
            rows = [{"ep_size": world, "top_k": per_k[0]["top_k"], **{key: sum(r[key] for r in per_k)
                                                                      for key in SWEEP_KEYS}}
                    for per_k in zip(*gathered, strict=True)]  # per K: the sums over ranks
            if out_path is None:
                print_byte_sweep(args, device, rows)
            else:
                with open(out_path, "w") as out:
                    json.dump(rows, out)
    finally:
        dist.destroy_process_group()


def run_byte_sweep(args: argparse.Namespace) -> None:
    """Launch W = P processes for each P of ``--ep-size`` (or join an existing launch) and print the table."""
    if args.device == "cuda" and torch.cuda.device_count() < max(args.ep_sizes):
        print(f"--device cuda: {torch.cuda.device_count()} GPU(s) here, {max(args.ep_sizes)} needed (one per rank).")
        return
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        bytes_worker(int(os.environ["RANK"]), args, int(os.environ["WORLD_SIZE"]), None, None)
        return
    rows = []
    for ep_size in args.ep_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(bytes_worker, args=(args, ep_size, f"file://{tmp}/store", f"{tmp}/bytes.json"),
                               nprocs=ep_size, start_method="spawn")
            with open(f"{tmp}/bytes.json") as results:
                rows += json.load(results)
    print_byte_sweep(args, torch.device(args.device), rows)


def print_byte_sweep(args: argparse.Namespace, device: torch.device, rows: list[dict[str, int]]) -> None:
    """Rows through the all-to-all against the minimum, per (P, K), summed over ranks and layers."""
    row_bytes = args.d_model * 4
    print(f"\n### {datetime.date.today().isoformat()}, {device_name(device)}, torch {torch.__version__}, "
          f"W = P processes, one training step, float32\n")
    print(f"G={args.tokens} tokens ({args.tokens}/P per rank), D={args.d_model}, E={args.experts}, F={args.d_ff}, "
          f"{args.layers} MoE layers ({args.dispatcher}), TopKRouter. Rows summed over ranks and layers; one row = "
          f"{row_bytes} B; MB = {A2A_PER_STEP} all-to-alls x rows to other ranks; one row per assignment is the "
          "exchange without deduplication.\n")
    print("| P | K | assignments | rows kept | rows to other ranks | minimum rows | sent / minimum | "
          "one row per assignment | MB/step | minimum MB/step | metadata MB/step |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = r["remote_rows"] / r["min_remote_rows"] if r["min_remote_rows"] else float("nan")
        print(f"| {r['ep_size']} | {r['top_k']} | {r['assignments']} | {r['self_rows']} | {r['remote_rows']} "
              f"| {r['min_remote_rows']} | {ratio:.3f} | {r['routing_remote_assignments']} "
              f"| {A2A_PER_STEP * r['remote_rows'] * row_bytes / MB:.3f} "
              f"| {A2A_PER_STEP * r['min_remote_rows'] * row_bytes / MB:.3f} "
              f"| {r['remote_assignments'] * ASSIGNMENT_BYTES / MB:.3f} |")
    wrong = [(r["ep_size"], r["top_k"]) for r in rows if r["remote_rows"] != r["min_remote_rows"]
             or r["remote_assignments"] != r["routing_remote_assignments"]]
    if wrong:
        print(f"\nWARNING: at (P, K) = {wrong} the exchange did not send the minimum rows, or disagrees with the "
              "routing about the assignments sent.")
    print(flush=True)


# ---------------------------------------------------------------------- memory and sharded checkpoints

MMAP_THRESHOLD = 128 * 1024  # blocks from this size up are mapped alone, so freeing them returns their pages


class PeakRSS:
    """This process's resident memory: the current size and the peak since :meth:`reset` (``VmHWM``, reset by
    writing 5 to /proc/self/clear_refs). Where the reset fails, :meth:`peak` is ``ru_maxrss``, the peak since
    the process started, and ``resettable`` turns False."""

    def __init__(self) -> None:
        self.resettable = True
        try:
            self.malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim  # glibc: give freed heap pages back
        except (OSError, AttributeError):
            self.malloc_trim = None

    @staticmethod
    def _status(field: str) -> int | None:
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024  # kB
        except OSError:
            pass
        return None

    def reset(self) -> int:
        """Return freed memory to the system, reset the peak; the resident bytes now."""
        if self.malloc_trim is not None:
            self.malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")
        except OSError:
            self.resettable = False
        current = self._status("VmRSS")
        return self.peak() if current is None else current

    def peak(self) -> int:
        """Peak resident bytes since :meth:`reset` (or since the process started, if not ``resettable``)."""
        hwm = self._status("VmHWM") if self.resettable else None
        if hwm is not None:
            return hwm
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


class CountingReader(FileSystemReader):
    """DCP's file reader, counting into ``counter["bytes"]`` the bytes of the saved chunks it reads: each read
    request loads its whole saved chunk (``torch.load`` of it), then narrows it to the rows asked for."""

    def __init__(self, path: Path, counter: dict[str, int]) -> None:
        super().__init__(path)
        self.counter = counter

    def read_data(self, plan, planner):  # noqa: ANN001, ANN201 - FileSystemReader's signature
        self.counter["bytes"] += sum(self.storage_data[item.storage_index].length for item in plan.items)
        return super().read_data(plan, planner)


def counting_strategy(counter: dict[str, int]) -> object:
    """``MoEDDPStrategy`` whose reader is a :class:`CountingReader` (its ``storage_reader`` hook); Lightning is
    imported here, by the memory mode only."""
    from lightning_moe.parallel.ddp_strategy import MoEDDPStrategy

    class ReadCountingStrategy(MoEDDPStrategy):
        def storage_reader(self, path: Path) -> FileSystemReader:
            return CountingReader(path, counter)

    return ReadCountingStrategy(process_group_backend="gloo")


def language_model(args: argparse.Namespace, ep_size: int) -> nn.Module:
    """The ``MoELanguageModel`` measured (seed 0): every block's FFN an MoE layer of E experts of width F."""
    from lightning_moe.module import MoELanguageModel

    torch.manual_seed(0)
    moe = MoEConfig(num_experts=args.experts, expert_d_ff=args.d_ff, router=functools.partial(
        TopKRouter, top_k=args.top_k), dispatcher=args.dispatcher, expert_parallel_size=ep_size)
    return MoELanguageModel(args.vocab, args.seq_len, d_model=args.d_model, n_layers=args.layers,
                            n_heads=args.heads, d_ff=args.d_ff, moe=moe, optimizer=torch.optim.AdamW)


def expert_and_dense_bytes(model: nn.Module) -> tuple[int, int, int, int]:
    """``(routed-expert bytes on this rank, the whole model's, dense bytes, one expert's bytes)``."""
    local = whole = one = 0
    layers = model.model.moe_layers()
    for layer in layers:
        for _, p in layer.expert_parameters():
            row = p[0].numel() * p.element_size()
            local, whole, one = local + p.numel() * p.element_size(), whole + layer.num_experts * row, one + row
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return local, whole, total - local, one // max(len(layers), 1)


def token_batch(args: argparse.Namespace, rank: int) -> Tensor:
    """This rank's ``(B, S + 1)`` token ids."""
    generator = torch.Generator().manual_seed(rank)
    return torch.randint(0, args.vocab, (args.batch_size, args.seq_len + 1), generator=generator)


def lm_loss(model: nn.Module, ids_BS1: Tensor) -> Tensor:
    logits_BSV = model(ids_BS1[:, :-1])
    loss = F.cross_entropy(logits_BSV.flatten(0, 1), ids_BS1[:, 1:].flatten())
    return loss + sum(model.model.aux_losses().values())


def lm_backward(model: nn.Module, ids_BS1: Tensor, world: int) -> None:
    """Backward and the gradient reduction of ``MoEDDPStrategy`` (nothing to average on one process)."""
    lm_loss(model, ids_BS1).backward()
    if world > 1:
        reduce_expert_parallel(model, world)


def clean_state(model: nn.Module) -> None:
    """No gradients and none of the buffers the grouped dispatcher keeps for the next step (the expert
    gradients' storage, activations and scratch): a first step's memory."""
    model.zero_grad(set_to_none=True)
    release_recycled_buffers()


def memory_phases(args: argparse.Namespace, rank: int, world: int, rss: PeakRSS) -> tuple[nn.Module, dict]:
    """Construction, activations and the first training step on this rank; the model (sharded, no gradients)
    and the bytes."""
    ids = token_batch(args, rank)
    tiny = language_model(argparse.Namespace(**{**vars(args), "d_model": 8 * args.heads, "d_ff": 8}), world)
    setup_expert_parallel(tiny)  # one-time costs first: imports, process groups, thread pools
    optimizer = torch.optim.AdamW(moe_param_groups(tiny), lr=1e-3)
    lm_backward(tiny, ids, world)
    optimizer.step()
    del tiny, optimizer
    release_recycled_buffers()

    start = rss.reset()
    model = language_model(args, world)
    setup_expert_parallel(model)
    construction = rss.peak() - start
    local, whole, dense, one = expert_and_dense_bytes(model)

    # Activations: a forward and backward from a clean state, less the gradients it leaves (at the end of the
    # backward all of them exist, so this is at least every other byte then live, kept buffers included).
    start = rss.reset()
    lm_backward(model, ids, world)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    activations = rss.peak() - start - grads
    clean_state(model)

    optimizer = torch.optim.AdamW(moe_param_groups(model), lr=1e-3)
    start = rss.reset()
    lm_backward(model, ids, world)
    optimizer.step()
    step = rss.peak() - start
    clean_state(model)
    del optimizer
    return model, {"rank": rank, "expert": local, "whole": whole, "dense": dense, "one_expert": one,
                   "construction": construction, "step": step, "activations": activations, "grads": grads,
                   "resettable": rss.resettable}


def tensor_bytes(value: object) -> int:
    """Bytes of every tensor in ``value`` (nested dicts and lists)."""
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def timed_load(trainer: object, path: Path, counter: dict[str, int], rss: PeakRSS) -> tuple[dict, dict]:
    """``trainer.strategy.load_checkpoint(path)`` (collective), and its seconds, peak and bytes read."""
    counter["bytes"] = 0
    dist.barrier()
    start, begin = rss.reset(), time.perf_counter()
    checkpoint = trainer.strategy.load_checkpoint(path)
    seconds, peak = time.perf_counter() - begin, rss.peak() - start
    return checkpoint, {"load_s": seconds, "load_peak": peak, "read": counter["bytes"],
                        "received": tensor_bytes([checkpoint["state_dict"], checkpoint.get("optimizer_states")])}


def same_state(checkpoint: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``checkpoint`` holds exactly ``model``'s weights and ``optimizer``'s tensor state."""
    state = model.state_dict()
    if checkpoint["state_dict"].keys() != state.keys():
        return False
    if not all(torch.equal(checkpoint["state_dict"][k], v) for k, v in state.items()):
        return False
    saved, live = checkpoint["optimizer_states"][0]["state"], optimizer.state_dict()["state"]
    return saved.keys() == live.keys() and all(
        torch.equal(saved[i][key], value) for i, entry in live.items() for key, value in entry.items()
        if isinstance(value, Tensor))


def checkpoint_phases(args: argparse.Namespace, model: nn.Module, rank: int, world: int, root: Path,
                      rss: PeakRSS) -> dict:
    """A one-step fit under ``MoEDDPStrategy``, its checkpoint saved and loaded back, and the checkpoints of
    the larger P (written before) loaded at this P."""
    import lightning as L
    from torch.utils.data import DataLoader

    counter = {"bytes": 0}
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=counting_strategy(counter), max_steps=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False)
    ids = token_batch(args, rank)
    trainer.fit(model, DataLoader([{"input_ids": row} for row in ids], batch_size=args.batch_size))

    path = root / f"ep{world}.ckpt"
    dist.barrier()
    start, begin = rss.reset(), time.perf_counter()
    trainer.save_checkpoint(path, weights_only=False)  # with the optimizer; ends at a barrier: every rank wrote
    save_s, save_peak = time.perf_counter() - begin, rss.peak() - start
    written = sum(f.stat().st_size for f in path.glob(f"__{rank}_*.distcp"))
    meta = sum((path / name).stat().st_size for name in ("meta.pt", ".metadata"))
    loaded, own = timed_load(trainer, path, counter, rss)
    result = {"written": written + (meta if rank == 0 else 0), "meta": meta, "save_s": save_s,
              "save_peak": save_peak, "round_trip": same_state(loaded, model, trainer.optimizers[0]), **own,
              "reshard": []}
    del loaded
    shapes = {name: value.shape for name, value in model.state_dict().items()}
    for saved in sorted(p for p in args.ep_sizes if p > world):
        loaded, read = timed_load(trainer, root / f"ep{saved}.ckpt", counter, rss)
        read["shapes_ok"] = {k: v.shape for k, v in loaded["state_dict"].items()} == shapes
        result["reshard"].append({"saved": saved, **read})
        del loaded
    return result


def memory_worker(rank: int, args: argparse.Namespace, world: int, init_method: str, root: str) -> None:
    """One rank of the memory mode at P = W; rank 0 writes every rank's results to ``root/ep{W}.json``."""
    import lightning  # noqa: F401 - first, so that the quieter log level below stays

    # Lightning's DDP reads its rank from these and, finding the process group initialised, joins it.
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "NODE_RANK": "0"})
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # the fit's banners, tips and sizes
    warnings.filterwarnings("ignore", message=r".*(does not have many workers|no `val_dataloader`|"
                                              r"smaller than the logging interval).*")
    init_process(rank, args, world, init_method)
    try:
        rss = PeakRSS()
        model, memory = memory_phases(args, rank, world, rss)
        memory.update(checkpoint_phases(args, model, rank, world, Path(root), rss))
        gathered: list[dict] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(gathered, memory)
        if rank == 0:
            with open(Path(root) / f"ep{world}.json", "w") as out:
                json.dump(gathered, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_memory_and_checkpoint(args: argparse.Namespace) -> None:
    """Launch W = P processes for each P, largest first (the smaller P then load its checkpoints), and report."""
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))  # read by each new process's malloc
    results: dict[int, list[dict]] = {}
    with tempfile.TemporaryDirectory(dir=args.checkpoint_dir) as root:
        for ep_size in sorted(args.ep_sizes, reverse=True):
            mp.start_processes(memory_worker, args=(args, ep_size, f"file://{root}/store{ep_size}", root),
                               nprocs=ep_size, start_method="spawn")
            with open(Path(root) / f"ep{ep_size}.json") as result:
                results[ep_size] = json.load(result)
    print_memory_and_checkpoint(args, dict(sorted(results.items())))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"date": datetime.date.today().isoformat(), "machine": device_name(torch.device("cpu")),
                       "torch": torch.__version__, "command": memory_command(args),
                       "per_rank": dict(sorted(results.items()))}, out,
                      indent=2)
        print(f"wrote {args.json}")


def memory_command(args: argparse.Namespace) -> str:
    return f"python benchmarks/expert_parallel.py {' '.join(args.argv)}".strip()


def mb(value: float) -> str:
    return f"{value / MB:.2f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "**FAIL**"


def print_memory_and_checkpoint(args: argparse.Namespace, results: dict[int, list[dict]]) -> None:
    first = next(iter(results.values()))[0]
    whole, dense, one = first["whole"], first["dense"], first["one_expert"]
    allowance = one + args.allowance_mb * MB
    print(f"\n### {datetime.date.today().isoformat()}, {device_name(torch.device('cpu'))}, torch {torch.__version__}, "
          f"W = P processes, gloo, {args.threads} thread(s) each, float32\n")
    print(f"`{memory_command(args)}`: MoELanguageModel, vocabulary {args.vocab}, {args.layers} blocks of "
          f"D={args.d_model} ({args.heads} heads), every FFN an MoE layer of E={args.experts} SwiGLU experts of "
          f"F={args.d_ff}, K={args.top_k} ({args.dispatcher}), AdamW; {args.batch_size} x {args.seq_len} tokens "
          f"per rank. Routed experts {mb(whole)} MB whole, dense {mb(dense)} MB. MB = 2^20 B.\n")
    if not all(r["resettable"] for rs in results.values() for r in rs):
        print("WARNING: /proc/self/clear_refs could not reset the peak: peaks below are ru_maxrss, the process's "
              "peak since it started, minus the resident size at the phase's start.\n")

    print(f"Construction (build + `setup_expert_parallel`), peak resident increase; bound = whole experts / P + "
          f"dense + allowance {mb(allowance)} MB (one expert's weights, {mb(one)} MB, drawn before being copied "
          f"into place, + {args.allowance_mb} MB). Then the first training step (forward, backward, gradient "
          "reduction, AdamW) from no gradients; bound = 4 x (experts / P + dense) + activations (this rank's peak "
          "of a forward and backward from the same state, less the gradients it leaves).\n")
    print("| P | rank | experts MB | experts x P = whole | dense MB | build peak MB | build bound MB | margin MB "
          "| build | activations MB | step peak MB | step bound MB | margin MB | step |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|")
    for p, ranks in results.items():
        for r in ranks:
            build_bound = r["whole"] // p + r["dense"] + allowance
            step_bound = 4 * (r["whole"] // p + r["dense"]) + r["activations"]
            exact = r["expert"] * p == r["whole"] == whole
            print(f"| {p} | {r['rank']} | {mb(r['expert'])} | {'exact' if exact else '**MISMATCH**'} "
                  f"| {mb(r['dense'])} | {mb(r['construction'])} | {mb(build_bound)} "
                  f"| {mb(build_bound - r['construction'])} | {verdict(r['construction'] <= build_bound)} "
                  f"| {mb(r['activations'])} | {mb(r['step'])} | {mb(step_bound)} | {mb(step_bound - r['step'])} "
                  f"| {verdict(r['step'] <= step_bound)} |")
    print_trend(results)
    print_checkpoints(results)


def print_trend(results: dict[int, list[dict]]) -> None:
    base = min(results)

    def trend(key: str) -> str:
        worst = {p: max(r[key] if key != "state" else r["step"] - r["activations"] for r in rs)
                 for p, rs in results.items()}
        return ", ".join(f"P={p} {mb(value)} MB" + (f" (1/{worst[base] / value:.2f})" if p != base else "")
                         for p, value in worst.items())

    print(f"\nPer rank (max over ranks), against P={base}: experts {trend('expert')}; build peak "
          f"{trend('construction')}; step peak {trend('step')}; step peak less activations {trend('state')}; "
          f"activations {trend('activations')}.\n")


def print_checkpoints(results: dict[int, list[dict]]) -> None:
    print("Checkpoints under `MoEDDPStrategy` after a one-step fit: `trainer.save_checkpoint` and "
          "`trainer.strategy.load_checkpoint` of the same directory. Written: the rank's `__{r}_0.distcp` (rank 0 "
          "also `meta.pt` and `.metadata`, "
          f"{next(iter(results.values()))[0]['meta'] / 1024:.1f} KB); read: the saved chunks DCP loads (each whole) "
          "against the bytes of the tensors the rank receives (its expert rows of weights and AdamW moments, every "
          "dense tensor; the excess over 1 is each saved tensor's serialisation header, ~1.5 KB); every rank also "
          "reads `meta.pt` and `.metadata`. Times: this rank's; a save or load ends when the slowest rank's does.\n")
    print("| P | rank | written MB | expert rows MB (3 x experts) | save s | save peak MB | load s | load peak MB "
          "| read MB | received MB | read / received | loaded == saved |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for p, ranks in results.items():
        for r in ranks:
            print(f"| {p} | {r['rank']} | {mb(r['written'])} | {mb(3 * r['expert'])} | {r['save_s']:.3f} "
                  f"| {mb(r['save_peak'])} | {r['load_s']:.3f} | {mb(r['load_peak'])} | {mb(r['read'])} "
                  f"| {mb(r['received'])} | {r['read'] / r['received']:.3f} "
                  f"| {'yes' if r['round_trip'] else '**NO**'} |")
    for p, ranks in results.items():
        print(f"\nP={p}: {mb(sum(r['written'] for r in ranks))} MB written in all, slowest save "
              f"{max(r['save_s'] for r in ranks):.3f} s, slowest load {max(r['load_s'] for r in ranks):.3f} s.",
              end="")
    print("\n")
    reshards = [(p, r, read) for p, ranks in results.items() for r in ranks for read in r["reshard"]]
    if not reshards:
        return
    print("Resharding: each larger P's checkpoint loaded at each smaller P (`trainer.strategy.load_checkpoint`).\n")
    print("| saved at P | loaded at P | rank | load s | load peak MB | read MB | received MB | read / received "
          "| shapes of this P |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for p, r, read in reshards:
        print(f"| {read['saved']} | {p} | {r['rank']} | {read['load_s']:.3f} | {mb(read['load_peak'])} "
              f"| {mb(read['read'])} | {mb(read['received'])} | {read['read'] / read['received']:.3f} "
              f"| {'yes' if read['shapes_ok'] else '**NO**'} |")
    print(flush=True)



# ----------------------------------------------------------------------------------------------- main


def int_list(text: str) -> list[int]:
    """``"2,4,8"`` -> ``[2, 4, 8]`` (an argparse type)."""
    try:
        values = [int(value) for value in text.split(",") if value.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return values


#: Defaults that differ between the modes: (timing and byte sweep, --memory-and-checkpoint).
MODE_DEFAULTS = {"d_ff": (512, 1024), "experts": (8, 16), "ep_size": ([2], [1, 2, 4])}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="G, tokens of the global batch (split over ranks)")
    parser.add_argument("--d-model", type=int, default=256, help="D")
    parser.add_argument("--d-ff", type=int, default=None,
                        help="F, the hidden width of each expert (default 512; 1024 with --memory-and-checkpoint)")
    parser.add_argument("--experts", type=int, default=None,
                        help="E, experts per layer (default 8; 16 with --memory-and-checkpoint)")
    parser.add_argument("--top-k", type=int_list, default=[2],
                        help="K, experts per token; several (2,4,8) run the byte sweep")
    parser.add_argument("--layers", type=int, default=2, help="MoE blocks")
    parser.add_argument("--ep-size", type=int_list, default=None,
                        help="P, the expert-parallel size of the sharded model (default 2); several (2,4) run the "
                             "byte sweep; with --memory-and-checkpoint the sizes measured (default 1,2,4)")
    parser.add_argument("--bytes-only", action="store_true",
                        help="no timing: all-to-all rows against the minimum for every K and P (W = P processes)")
    parser.add_argument("--memory-and-checkpoint", action="store_true",
                        help="no timing: memory per rank (construction, a training step) and MoEDDPStrategy's "
                             "sharded checkpoints (save, load, resharding) of a MoELanguageModel, W = P processes")
    parser.add_argument("--processes", type=int, default=None, help="W (default P); must be a multiple of P")
    parser.add_argument("--dispatcher", default="grouped", help=f"local experts' backend, one of {sorted(DISPATCHERS)}")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda where 2 GPUs exist, else cpu (--memory-and-checkpoint: cpu only)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads per process (default on CPU: cores / processes, at least 1)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
    memory = parser.add_argument_group("--memory-and-checkpoint", "the language model (also --d-model, --d-ff, "
                                       "--experts, --top-k, --layers, --dispatcher)")
    memory.add_argument("--vocab", type=int, default=256, help="vocabulary size")
    memory.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    memory.add_argument("--batch-size", type=int, default=4, help="sequences per rank")
    memory.add_argument("--heads", type=int, default=4, help="attention heads")
    memory.add_argument("--allowance-mb", type=float, default=4.0,
                        help="MB the construction bound allows beyond whole experts / P + dense + one expert")
    memory.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                        help="where checkpoints are written, in a temporary folder removed after (default: the "
                             "system's temporary directory)")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    mode = 1 if args.memory_and_checkpoint else 0
    for name, defaults in MODE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, defaults[mode])
    for flag in ("tokens", "d_model", "d_ff", "experts", "layers", "processes", "steps", "threads", "vocab", "seq_len",
                 "batch_size", "heads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    for top_k in args.top_k:
        if not 1 <= top_k <= args.experts:
            parser.error(f"--top-k {top_k} must be in [1, --experts {args.experts}]")
    if args.dispatcher not in DISPATCHERS:
        parser.error(f"--dispatcher {args.dispatcher!r} is not in {sorted(DISPATCHERS)}")
    if args.memory_and_checkpoint:
        return check_memory_mode(parser, args)
    if args.device is None:
        args.device = "cuda" if torch.cuda.device_count() >= 2 else "cpu"
    for ep_size in args.ep_size:
        if ep_size < 2:
            parser.error(f"--ep-size {ep_size} must be >= 2: EP=1 is the baseline this compares against")
        if args.experts % ep_size:
            parser.error(f"--ep-size {ep_size} must divide --experts {args.experts}")
    args.top_ks, args.ep_sizes = args.top_k, args.ep_size
    args.top_k, args.ep_size = args.top_k[0], args.ep_size[0]
    args.bytes_only = args.bytes_only or len(args.top_ks) > 1 or len(args.ep_sizes) > 1
    if args.bytes_only:
        return check_byte_sweep(parser, args)
    args.processes = args.processes or int(os.environ.get("WORLD_SIZE", args.ep_size))
    if args.processes % args.ep_size:
        parser.error(f"--processes {args.processes} must be a multiple of --ep-size {args.ep_size}")
    if args.tokens % args.processes:
        parser.error(f"--tokens {args.tokens} must be a multiple of the {args.processes} processes")
    if args.device == "cpu" and args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // args.processes)
    return args


def check_memory_mode(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """The memory mode's own checks: one K, W = P processes launched here for each P, CPU."""
    if args.bytes_only:
        parser.error("--bytes-only and --memory-and-checkpoint are separate modes: choose one")
    if args.processes is not None:
        parser.error("--processes is W = P with --memory-and-checkpoint")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        parser.error("--memory-and-checkpoint launches its own processes (W = P for each P): run it without torchrun")
    if args.device == "cuda":
        parser.error("--memory-and-checkpoint measures host memory (resident set) over gloo: --device cpu only")
    if len(args.top_k) > 1:
        parser.error(f"--memory-and-checkpoint takes one --top-k, got {args.top_k}")
    for ep_size in args.ep_size:
        if ep_size < 1 or args.experts % ep_size:
            parser.error(f"--ep-size {ep_size} must be >= 1 and divide --experts {args.experts}")
    if args.d_model % args.heads:
        parser.error(f"--heads {args.heads} must divide --d-model {args.d_model}")
    if args.allowance_mb < 0:
        parser.error(f"--allowance-mb must be >= 0, got {args.allowance_mb}")
    args.device, args.top_k, args.ep_sizes = "cpu", args.top_k[0], sorted(set(args.ep_size))
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // max(args.ep_sizes))  # the same at every P
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_and_checkpoint:
        run_memory_and_checkpoint(args)
        return
    if args.bytes_only:
        run_byte_sweep(args)
        return
    world = args.processes
    if args.device == "cuda" and torch.cuda.device_count() < world:
        print(f"--device cuda: {torch.cuda.device_count()} GPU(s) here, {world} needed. Expert parallelism puts "
              f"each rank's experts on its own device; {world} ranks sharing one GPU would hold the same memory as "
              f"one and add the all-to-all, which measures nothing useful (NCCL also refuses two ranks on one "
              f"device). Run on {world} GPUs, or with --device cpu.")
        return
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # already launched (torchrun): this is one rank
        worker(int(os.environ["RANK"]), args, int(os.environ["WORLD_SIZE"]), None)
        return
    with tempfile.TemporaryDirectory() as tmp:  # a file store: no port to pick or collide on
        mp.start_processes(worker, args=(args, world, f"file://{tmp}/store"), nprocs=world, start_method="spawn")


if __name__ == "__main__":
    main()
