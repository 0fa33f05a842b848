"""Run under torchrun by test_lazy_build.py with world = P (2 or 4): expert-parallel models built
lazily, one rank's experts at a time, against the P = 1 model built whole in the same process.
Writes ``rank{r}.pt``, a dict of cases.

- ``memory`` (P = 2 only, run first): the peak resident memory that building and sharding a model
  whose experts are ~1 GB adds, then one forward, backward and SGD step at EP = 2.
- ``same_model``: the sharded model's state equals the P = 1 model's (its rows of the experts), and
  one SGD step gives the P = 1 losses (before and after the step) on the same global batch.
- ``upcycled``: ``upcycle_state_dict`` after sharding (as ``MoELanguageModel.setup`` calls it)
  writes the rows P = 1 writes (split into 4 slices, with noise), and no more than this rank's.
"""

import os
import re
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from ddp_launch import save_rank_results

from lightning_moe.layers import MoEConfig
from lightning_moe.models import MoETransformer
from lightning_moe.parallel import reduce_expert_gradients, setup_expert_parallel
from lightning_moe.upcycling import upcycle_state_dict

V, S = 64, 12  # vocabulary, sequence length
SMALL = dict(max_seq_len=S, d_model=16, n_layers=2, n_heads=2, d_ff=32)


def peak_rss() -> int:
    """This process's peak resident memory since the last reset, in bytes (``VmHWM``)."""
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1)) * 1024


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear:  # "5": reset the peak to the current resident size
        clear.write("5")


def batch(rank: int, world: int, rows_per_rank: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch ``(world * rows_per_rank, S + 1)`` and this rank's rows of it."""
    ids = torch.randint(0, V, (world * rows_per_rank, S + 1), generator=torch.Generator().manual_seed(seed))
    return ids, ids[rank * rows_per_rank:(rank + 1) * rows_per_rank]


def lm_loss(model: MoETransformer, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def sharded_sgd_step(model: MoETransformer, ids: torch.Tensor, expert_names: list[str], lr: float) -> float:
    """One SGD step of the global mean loss, this rank's share ``ids``: dense gradients averaged as DDP
    does, expert gradients by ``reduce_expert_gradients``. Returns this rank's loss before the step."""
    model.zero_grad()
    loss = lm_loss(model, ids)
    loss.backward()
    world = dist.get_world_size()
    for name, param in model.named_parameters():
        if name not in expert_names and param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad.div_(world)
    reduce_expert_gradients(model)
    with torch.no_grad():
        for param in model.parameters():
            if param.grad is not None:
                param.sub_(lr * param.grad)
    return loss.item()


def memory_case(rank: int, world: int) -> dict:
    # Two MoE layers of 32 experts of D=512, F=2048: 3 * 32 * 512 * 2048 * 4 B = 403 MB each, 805 MB whole.
    E, D, Fe = 32, 512, 2048
    moe = MoEConfig(num_experts=E, expert_d_ff=Fe, balancers=[], expert_parallel_size=world)
    reset_peak_rss()
    start = peak_rss()
    torch.manual_seed(0)
    model = MoETransformer(V, max_seq_len=S, d_model=D, n_layers=2, n_heads=8, d_ff=32, moe=moe)
    built = peak_rss()
    lazy = all(p.is_meta for layer in model.moe_layers() for p in layer.experts.parameters())
    names = setup_expert_parallel(model)
    sharded = peak_rss()
    _, ids = batch(rank, world, 2)
    loss = sharded_sgd_step(model, ids, names, lr=0.1)
    stepped = peak_rss()
    local_bytes = sum(p.numel() * p.element_size() for layer in model.moe_layers() for p in layer.experts.parameters())
    return {"whole_bytes": 2 * 3 * E * D * Fe * 4, "local_bytes": local_bytes, "lazy_before_sharding": lazy,
            "build": built - start, "build_and_shard": sharded - start, "with_step": stepped - start,
            "loss": loss, "expert_shape": tuple(model.blocks[0].ffn.experts.w_gate_EDF.shape)}


def small_model(world: int, **moe: object) -> MoETransformer:
    torch.manual_seed(0)
    config = MoEConfig(num_experts=8, expert_d_ff=8, num_shared_experts=1, balancers=[], expert_parallel_size=world,
                       **moe)
    return MoETransformer(V, **SMALL, moe=config)


def same_model_case(rank: int, world: int) -> dict:
    model = small_model(world)
    lazy = all(p.is_meta for layer in model.moe_layers() for p in layer.experts.parameters())
    names = setup_expert_parallel(model)
    reference = small_model(1)
    rows = model.moe_layers()[0].expert_rows
    mismatched = []
    reference_state = reference.state_dict()
    for key, value in model.state_dict().items():
        expected = reference_state[key][rows] if ".experts." in key else reference_state[key]
        if not torch.equal(value, expected):
            mismatched.append(key)

    global_ids, ids = batch(rank, world, 2)
    lr = 0.5
    losses = []
    for _ in range(2):  # the loss before the step, and after it
        local = sharded_sgd_step(model, ids, names, lr)
        mean = torch.tensor(local)
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    reference_losses = []
    for _ in range(2):
        loss = lm_loss(reference, global_ids)
        reference.zero_grad()
        loss.backward()
        with torch.no_grad():
            for param in reference.parameters():
                param.sub_(lr * param.grad)
        reference_losses.append(loss.item())
    return {"lazy_before_sharding": lazy, "rows": (rows.start, rows.stop), "mismatched": mismatched,
            "losses": losses, "reference_losses": reference_losses, "expert_names": names}


def upcycled_case(world: int) -> dict:
    torch.manual_seed(5)
    dense = MoETransformer(V, **SMALL, moe_every=0).state_dict()

    def moe_model(size: int) -> MoETransformer:
        # 2 x 4 = 8 experts of width 8, slices of the dense d_ff = 32; at P = 4 rank 1 holds experts 2 and 3
        # (slices 2 and 3), so rows upcycled by local index would be wrong.
        torch.manual_seed(6)
        return MoETransformer(V, **SMALL, moe=MoEConfig(num_experts=2, expert_d_ff=32, granularity=4,
                                                        expert_parallel_size=size))

    model = moe_model(world)
    setup_expert_parallel(model)
    upcycle_state_dict(model, dense, "split", noise=0.05, seed=3)
    reference = moe_model(1)
    upcycle_state_dict(reference, dense, "split", noise=0.05, seed=3)
    rows = model.moe_layers()[0].expert_rows
    reference_state = reference.state_dict()
    mismatched = [key for key, value in model.state_dict().items()
                  if not torch.equal(value, reference_state[key][rows] if ".experts." in key else reference_state[key])]
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items() if ".experts." in key}
    return {"mismatched": mismatched, "expert_shapes": shapes}


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    results = {}
    if world == 2:  # first, while the process holds nothing else
        results["memory"] = memory_case(rank, world)
    results["same_model"] = same_model_case(rank, world)
    results["upcycled"] = upcycled_case(world)
    save_rank_results(results, sys.argv[1])


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
