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
its group (self included). One row is one (token, expert) assignment of D values. A training step moves rows
between ranks four times: forward dispatch, forward combine (the expert outputs going back), and the same two
transposed in backward. The bytes that actually cross between ranks are ``4 * rows to other ranks * D *
element size`` (summed over ranks and layers; the (P, L) int64 count table of each forward is counted apart).

The theoretical minimum: a token needs its D values once on each *remote* rank that holds at least one of
its chosen experts, and one combined D-vector back from that rank (that rank sums its local experts' gated
outputs); experts on the token's own rank cost nothing. So the minimum is ``4 * (distinct (token,
remote rank) pairs) * D * element size``, counted from the routing each forward actually used (a forward hook
on each router). Our dispatcher sends one row per assignment, so with K > 1 a token whose several experts sit
on the same remote rank goes there (and comes back) once per such expert: that is the gap. For E=8, K=2,
P=2 and even routing a token has both experts on the other rank with probability C(4,2)/C(8,2) = 3/14, so
the expected ratio is 1 / (1 - 3/14) = 1.27.

On one machine with W processes over gloo the all-to-alls buy nothing: they are copies through local
sockets that EP=1 does not make. What EP=P saves even here is the gradient all-reduce of the expert weights
(EP=1 averages all of them every step; EP=P, at W = P, none) and the optimizer update of the experts it no
longer holds. The all-to-all grows with tokens per step, those savings with expert parameters, so which side
wins on one machine depends on the shape; the output says which did. EP's purpose is memory per device (the
expert parameters, gradients and optimizer state per rank shrink P times, printed below) and scaling across
devices. With ``--device cuda`` each rank takes one GPU (NCCL); one GPU cannot hold two ranks' experts apart,
so with fewer GPUs than processes the script says so and exits.

    python benchmarks/expert_parallel.py                              # 2 processes, gloo, the defaults
    python benchmarks/expert_parallel.py --top-k 4 --experts 16       # more same-rank duplicates
    python benchmarks/expert_parallel.py --device cuda --json ep.json # 2 GPUs, NCCL
    torchrun --nproc-per-node 2 benchmarks/expert_parallel.py         # under an existing launcher
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe.dispatch import DISPATCHERS
from lightning_moe.layers import MoELayer
from lightning_moe.parallel import is_expert_parameter, reduce_expert_gradients, setup_expert_parallel
from lightning_moe.routing import TopKRouter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_layer import device_name  # noqa: E402  (a sibling script: one way to name the hardware)

A2A_PER_STEP = 4  # forward dispatch, forward combine, and their transposes in backward
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
    sent, received = list(layer.exchange["sent_rows"]), list(layer.exchange["received_rows"])
    return {"assignments": int(expert_A.numel()), "sent_rows": sent, "received_rows": received,
            "self_rows": sent[groups.rank], "remote_rows": sum(sent) - sent[groups.rank],
            "routing_remote_rows": int(remote_A.sum()), "min_remote_rows": int(pairs.numel())}


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


def worker(rank: int, args: argparse.Namespace, world: int, init_method: str | None) -> None:
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
    actual_mb: float
    minimum_mb: float
    ratio: float


def layer_bytes(per_rank: list[dict], layer: int, row_bytes: int) -> LayerBytes:
    steps = len(per_rank[0]["rows"])

    def total(key: str) -> float:
        return sum(r["rows"][s][layer][key] for r in per_rank for s in range(steps)) / steps

    remote, minimum = total("remote_rows"), total("min_remote_rows")
    return LayerBytes(layer, total("assignments"), total("self_rows"), remote, minimum,
                      A2A_PER_STEP * remote * row_bytes / MB, A2A_PER_STEP * minimum * row_bytes / MB,
                      remote / minimum if minimum else float("nan"))


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
          f"{A2A_PER_STEP} all-to-alls x rows to other ranks):\n")
    print("| layer | assignment rows | rows to self | rows to other ranks | minimum rows | MB/step | "
          "minimum MB/step | actual / minimum |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for b in layers:
        print(f"| {b.layer} | {b.assignment_rows:.0f} | {b.self_rows:.0f} | {b.remote_rows:.0f} "
              f"| {b.min_remote_rows:.0f} | {b.actual_mb:.3f} | {b.minimum_mb:.3f} | {b.ratio:.3f} |")
    actual, minimum = sum(b.actual_mb for b in layers), sum(b.minimum_mb for b in layers)
    print(f"| all | {sum(b.assignment_rows for b in layers):.0f} | {sum(b.self_rows for b in layers):.0f} "
          f"| {sum(b.remote_rows for b in layers):.0f} | {sum(b.min_remote_rows for b in layers):.0f} "
          f"| {actual:.3f} | {minimum:.3f} | {actual / minimum if minimum else float('nan'):.3f} |")
    local = args.experts // args.ep_size
    count_bytes = world * (args.ep_size - 1) * local * 8 * args.layers
    print(f"\nPlus the (P, L) int64 count tables: {count_bytes} B per step in all (one all-to-all per layer "
          "forward). Last step's rows per rank (self included), layer 0:")
    for r in per_rank:
        last = r["rows"][-1][0]
        print(f"- rank {r['rank']}: sent_rows {last['sent_rows']}, received_rows {last['received_rows']}")
    return actual, count_bytes


def print_notes(args: argparse.Namespace, device: torch.device, ep_name: str, per_rank: list[dict],
                med: dict[str, float], a2a_mb: float, expert_mb: float) -> None:
    mismatched = sum(layer["remote_rows"] != layer["routing_remote_rows"]
                     for r in per_rank for step in r["rows"] for layer in step)
    if mismatched:
        print(f"- WARNING: in {mismatched} (rank, step, layer) cases `layer.exchange` disagrees with the routing "
              "about the rows sent to other ranks.")
    if args.top_k == 1:
        print("- With top-k = 1 each token has one expert, so the rows sent are the minimum.")
    else:
        print(f"- The gap: our dispatcher sends one row per (token, expert) assignment, so with top-k = {args.top_k} "
              "a token whose several experts sit on the same remote rank is sent there (and its outputs sent back) "
              "once per such expert; the minimum sends each token once per remote rank holding any of its experts "
              "and combines there. Rows for experts on the token's own rank cross no link.")
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


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="G, tokens of the global batch (split over ranks)")
    parser.add_argument("--d-model", type=int, default=256, help="D")
    parser.add_argument("--d-ff", type=int, default=512, help="F, the hidden width of each expert")
    parser.add_argument("--experts", type=int, default=8, help="E, experts per layer")
    parser.add_argument("--top-k", type=int, default=2, help="K, experts per token")
    parser.add_argument("--layers", type=int, default=2, help="MoE blocks")
    parser.add_argument("--ep-size", type=int, default=2, help="P, the expert-parallel size of the sharded model")
    parser.add_argument("--processes", type=int, default=None, help="W (default P); must be a multiple of P")
    parser.add_argument("--dispatcher", default="grouped", help=f"local experts' backend, one of {sorted(DISPATCHERS)}")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.device_count() >= 2 else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads per process (default on CPU: cores / processes, at least 1)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    for flag in ("tokens", "d_model", "d_ff", "experts", "top_k", "layers", "ep_size", "processes", "steps",
                 "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.ep_size < 2:
        parser.error("--ep-size must be >= 2: EP=1 is the baseline this compares against")
    args.processes = args.processes or int(os.environ.get("WORLD_SIZE", args.ep_size))
    if args.processes % args.ep_size:
        parser.error(f"--processes {args.processes} must be a multiple of --ep-size {args.ep_size}")
    if args.experts % args.ep_size:
        parser.error(f"--ep-size {args.ep_size} must divide --experts {args.experts}")
    if args.top_k > args.experts:
        parser.error(f"--top-k {args.top_k} exceeds --experts {args.experts}")
    if args.tokens % args.processes:
        parser.error(f"--tokens {args.tokens} must be a multiple of the {args.processes} processes")
    if args.dispatcher not in DISPATCHERS:
        parser.error(f"--dispatcher {args.dispatcher!r} is not in {sorted(DISPATCHERS)}")
    if args.device == "cpu" and args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // args.processes)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
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
