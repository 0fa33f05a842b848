"""Expert parallelism in plain PyTorch: a stack of MoE layers whose experts are split over 2 processes.

    torchrun --nproc_per_node 2 examples/expert_parallel.py          # CPU, gloo (any laptop)
    torchrun --nproc_per_node 2 examples/expert_parallel.py --cuda   # 2 GPUs, NCCL
    python examples/expert_parallel.py                               # starts torchrun itself, 2 CPU processes

Each rank builds the model with ``expert_parallel_size=2``: the routed experts get no storage, and
``setup_expert_parallel`` allocates and initialises only this rank's half of every layer's experts
(expert ``e`` from the seed and ``e``, so the values are those of the whole model). Each token goes
once to each rank holding any of its experts (a dropless all-to-all), so any router works unchanged.
The script checks the sharded model against the whole one (built with ``expert_parallel_size=1``
from the same seed) on this rank's batch, then trains a few steps, reducing gradients as DDP would
(dense ones over all ranks, expert ones over the ranks that hold the same experts). With Lightning, ``MoELanguageModel(
moe=MoEConfig(expert_parallel_size=2))`` does all of this (see the README); with DeepSpeed, use
``MoEDeepSpeedStrategy``.
"""

import argparse
import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist
from torch import nn

from lightning_moe.layers import MoELayer
from lightning_moe.parallel import (
    is_expert_parameter,
    moe_param_groups,
    reduce_expert_gradients,
    setup_expert_parallel,
)
from lightning_moe.routing import TopKRouter


class Stack(nn.Module):
    def __init__(self, d_model: int, num_experts: int, layers: int, ep: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            MoELayer(d_model, 2 * d_model, num_experts, router=TopKRouter(d_model, num_experts, top_k=2),
                     expert_parallel_size=ep) for _ in range(layers))
        self.head = nn.Linear(d_model, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x).squeeze(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda", action="store_true", help="one GPU per process, NCCL")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if "LOCAL_RANK" not in os.environ:  # plain `python`: run this script in 2 processes through torchrun
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", str(port), __file__, *sys.argv[1:]]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        sys.exit(subprocess.call(command, env=env))
    dist.init_process_group("nccl" if args.cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if args.cuda else torch.device("cpu")

    torch.manual_seed(0)  # the same model on every rank
    model = Stack(d_model=32, num_experts=8, layers=2, ep=world).to(device)  # experts without storage yet
    setup_expert_parallel(model)  # storage and initial values for this rank's 8 / world experts per layer
    torch.manual_seed(0)
    whole = Stack(d_model=32, num_experts=8, layers=2, ep=1).to(device)  # the same model, all experts here

    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(rank)).to(device)  # this rank's batch
    target = x.sum(-1).sin()
    with torch.no_grad():
        error = (model(x) - whole(x)).abs().max().item()
    local = model.layers[0].experts.w_gate_EDF.shape[0]
    print(f"rank {rank}: {local} of 8 experts per layer here; max |sharded - whole| = {error:.2e}")

    optimizer = torch.optim.AdamW(moe_param_groups(model), lr=3e-3)
    for step in range(args.steps):
        loss = (model(x) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        for p in model.parameters():  # DDP's job for the dense parameters: average over all ranks
            if not is_expert_parameter(p):
                dist.all_reduce(p.grad)
                p.grad /= world
        reduce_expert_gradients(model)  # experts: over the ranks holding the same experts
        optimizer.step()
        if step % 5 == 0 or step == args.steps - 1:
            total = loss.detach().clone()
            dist.all_reduce(total)
            if rank == 0:
                print(f"step {step:3d}  loss {total.item() / world:.4f}  sent rows per rank "
                      f"{model.layers[0].exchange['sent_rows']}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
