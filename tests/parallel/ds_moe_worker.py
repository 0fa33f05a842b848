"""Run in subprocesses by test_deepspeed_moe.py: DeepSpeedMoELayer under a real DeepSpeed
(``deepspeed.init_distributed``, gloo, CPU). Writes what it saw to ``OUTDIR``; the test compares.

``python ds_moe_worker.py single OUTDIR`` (one process, RANK/WORLD_SIZE/... set by the test):
forward and backward of several layers, their routes, and one DeepSpeed engine step with a
checkpoint. ``torchrun --nproc_per_node 2 ds_moe_worker.py ep OUTDIR``: ``ep_size=2`` against
the ``ep_size=1`` layer in the same process, and the engine's gradient reduction.
"""

import functools
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when DeepSpeed is imported

import deepspeed  # noqa: E402
import deepspeed.ops  # noqa: E402
import torch  # noqa: E402
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer  # noqa: E402

from lightning_moe.balancing import SequenceAuxLoss, SwitchAuxLoss, ZLoss  # noqa: E402
from lightning_moe.parallel.deepspeed_moe import DeepSpeedMoELayer  # noqa: E402
from lightning_moe.routing import LinearScorer, TopKRouter  # noqa: E402

D, F, E, T = 12, 10, 4, 13  # awkward sizes; T tokens per rank


def expert_weights(seed: int) -> list[dict[str, torch.Tensor]]:
    """Weights of the E SwiGLU experts, from a seed shared by every rank and every layer."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"gate.weight": (F, D), "up.weight": (F, D), "out.weight": (D, F)}
    return [{name: torch.randn(shape, generator=g) * 0.3 for name, shape in shapes.items()} for _ in range(E)]


def build(router_kwargs: dict, bias: list[float] | None = None, **layer_kwargs) -> DeepSpeedMoELayer:
    torch.manual_seed(0)
    # Uncentred: the single-process reference routes other batches than each rank's.
    router = TopKRouter(D, E, scorer=functools.partial(LinearScorer, center_input=False), **router_kwargs)
    layer = DeepSpeedMoELayer(D, F, E, router=router, **layer_kwargs)
    if bias is not None:
        layer.router.expert_bias_E.copy_(torch.tensor(bias))
    return layer


def load_experts(layer: DeepSpeedMoELayer, weights: list[dict], first: int) -> None:
    """Give local expert i the weights of global expert ``first + i``."""
    with torch.no_grad():
        for i, expert in enumerate(layer.experts):
            expert.load_state_dict(weights[first + i])


def run(layer: DeepSpeedMoELayer, x: torch.Tensor, dy: torch.Tensor) -> dict:
    """Forward and backward of ``(y * dy).sum() + aux``; everything the test compares."""
    captured = []
    hook = layer.gate.register_forward_hook(lambda module, args, out: captured.append(out))
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    y = layer(x)
    hook.remove()
    ((y * dy).sum() + sum(layer.aux_losses.values())).backward()
    _, capacity, _, expert_KS, location_KS, gate_KS, exp_counts = captured[0]
    return {
        "y": y.detach(), "x_grad": x.grad,
        "router_grads": {n: p.grad.clone() for n, p in layer.router.named_parameters()},
        "expert_grads": [{n: p.grad.clone() for n, p in e.named_parameters()} for e in layer.experts],
        "aux_losses": {k: v.detach() for k, v in layer.aux_losses.items()},
        "tokens_per_expert": layer.stats.tokens_per_expert_E, "num_dropped": int(layer.stats.num_dropped),
        "capacity": capacity, "expert_KS": expert_KS, "location_KS": location_KS, "gate_KS": gate_KS.detach(),
        "exp_counts": exp_counts,
    }


SINGLE_CASES = {
    # name: (router kwargs, expert bias, layer kwargs, input shape)
    "softmax": ({"top_k": 2}, None, {"capacity_factor": 4.0, "balancers": [SwitchAuxLoss(0.1), ZLoss(0.01)]},
                (T, D)),
    "sigmoid": ({"top_k": 2, "score_func": "sigmoid", "scaling_factor": 2.5, "expert_bias": True},
                [0.04, -0.03, 0.02, 0.0], {"drop_tokens": False, "balancers": [SequenceAuxLoss(0.1)]}, (1, T, D)),
    "top3_position": ({"top_k": 3}, None, {"capacity_factor": 0.5, "min_capacity": 1}, (T, D)),
    "position": ({"top_k": 2}, None, {"capacity_factor": 0.5, "min_capacity": 1}, (T, D)),
    "score": ({"top_k": 2}, None, {"capacity_factor": 0.25, "min_capacity": 3, "drop_policy": "score"}, (T, D)),
    "first_choice": ({"top_k": 2}, None, {"capacity_factor": 0.5, "min_capacity": 1, "drop_policy": "first_choice"},
                     (T, D)),
}


def single(out: Path) -> None:
    weights = expert_weights(7)
    results = {}
    for name, (router_kwargs, bias, layer_kwargs, shape) in SINGLE_CASES.items():
        layer = build(router_kwargs, bias, **layer_kwargs)
        load_experts(layer, weights, 0)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        dy = torch.randn(shape, generator=torch.Generator().manual_seed(2))
        result = run(layer, x, dy)
        layer.eval()
        with torch.no_grad():
            layer(x)
        result.update(x=x, dy=dy, router=layer.router, balancers=layer_kwargs.get("balancers", []),
                      layer_kwargs={k: v for k, v in layer_kwargs.items() if k != "balancers"},
                      eval_num_dropped=int(layer.stats.num_dropped))
        results[name] = result
    results["engine"] = engine_step(out)
    results["weights"] = weights
    torch.save(results, out / "single.pt")


def engine_step(out: Path) -> dict:
    """One ZeRO-1 step in a DeepSpeed engine, a checkpoint with DeepSpeed's per-expert files, and
    that checkpoint loaded into a second engine. The router has an ``expert_bias_E`` buffer: a key
    with "expert" in it that must stay with the model, not with the experts."""
    config = {"train_batch_size": 1, "zero_optimization": {"stage": 1}}

    def engine_of(layer: DeepSpeedMoELayer):  # noqa: ANN202
        groups = split_params_into_different_moe_groups_for_optimizer({"params": list(layer.parameters()),
                                                                         "name": "all"})
        return deepspeed.initialize(model=layer, optimizer=torch.optim.AdamW(groups, lr=1e-2), config=config)[0]

    layer = build({"top_k": 2, "expert_bias": True}, [0.01, 0.0, 0.0, -0.01], capacity_factor=2.0,
                  balancers=[SwitchAuxLoss(0.01)])
    engine = engine_of(layer)
    before = [p.detach().clone() for p in layer.experts[0].parameters()]
    y = engine(torch.randn(2, T, D, generator=torch.Generator().manual_seed(3)))
    engine.backward(y.square().mean() + sum(layer.aux_losses.values()))
    engine.step()
    engine.save_checkpoint(str(out / "ckpt"), tag="step1")

    fresh = build({"top_k": 2, "expert_bias": True}, capacity_factor=2.0)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    engine_of(fresh).load_checkpoint(str(out / "ckpt"), tag="step1")
    return {
        "has_moe_layers": engine.has_moe_layers, "ep_group_set": layer.gate.ep_group is not None,
        "moe_param_groups": [bool(g.get("moe")) for g in engine.optimizer.param_groups],
        "expert0_moved": any(not torch.equal(b, p) for b, p in zip(before, layer.experts[0].parameters(), strict=True)),
        "state": {n: t.detach().clone() for n, t in layer.state_dict().items()},
        "loaded_state": {n: t.detach().clone() for n, t in fresh.state_dict().items()},
        "files": sorted(str(p.relative_to(out / "ckpt")) for p in (out / "ckpt").rglob("*.pt")),
    }


EP_CASES = {
    "drop": {"capacity_factor": 0.75, "min_capacity": 1},
    "dropless": {"drop_tokens": False},
}


def expert_parallel(out: Path) -> None:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    weights = expert_weights(11)
    x_full = torch.randn(world * T, D, generator=torch.Generator().manual_seed(1))
    dy_full = torch.randn(world * T, D, generator=torch.Generator().manual_seed(2))
    halves = [(x_full[r * T:(r + 1) * T], dy_full[r * T:(r + 1) * T]) for r in range(world)]
    results = {"rank": rank, "x_full": x_full, "dy_full": dy_full, "weights": weights}
    for name, layer_kwargs in EP_CASES.items():
        layer = build({"top_k": 2}, expert_parallel_size=world, balancers=[SwitchAuxLoss(0.1)], **layer_kwargs)
        layer.moe.set_deepspeed_parallelism()  # what deepspeed.initialize would do
        load_experts(layer, weights, rank * E // world)
        reference = build({"top_k": 2}, expert_parallel_size=1, balancers=[SwitchAuxLoss(0.1)], **layer_kwargs)
        load_experts(reference, weights, 0)
        results[name] = {"ep": run(layer, *halves[rank]), "reference": [run(reference, *half) for half in halves],
                         "router": layer.router}
    results["engine"] = engine_gradients(halves[rank], rank, world, weights)
    torch.save(results, out / f"ep_rank{rank}.pt")


def engine_gradients(half: tuple, rank: int, world: int, weights: list[dict]) -> dict:
    """Gradients after ``engine.backward`` (ZeRO-0): the engine's own reduction over the groups."""
    layer = build({"top_k": 2}, expert_parallel_size=world, capacity_factor=4.0)
    load_experts(layer, weights, rank * E // world)
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(layer.parameters()), "name": "all"})
    config = {"train_batch_size": world, "zero_optimization": {"stage": 0}}
    engine, *_ = deepspeed.initialize(model=layer, optimizer=torch.optim.SGD(groups, lr=0.0), config=config)
    x, dy = half
    engine.backward((engine(x) * dy).sum())
    return {"router": layer.router, "router_grads": {n: p.grad.clone() for n, p in layer.router.named_parameters()},
            "expert_grads": [{n: p.grad.clone() for n, p in e.named_parameters()} for e in layer.experts]}


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    # Skip DeepSpeed's ~60 s g++ build of its CPU shared-memory op; gloo does the communication.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    single(out) if mode == "single" else expert_parallel(out)


if __name__ == "__main__":
    main()
