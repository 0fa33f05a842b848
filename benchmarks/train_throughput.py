"""Training throughput (tokens/s) of the tiny MoE transformer against the dense model with the same active parameters.

Both models are ``MoETransformer`` with the tiny model's sizes (``cli_configs/tiny.yaml``: vocabulary 256,
D=128, 4 layers, 4 heads, E=8 experts of width F=256, top-2, an MoE FFN in every layer, Switch aux loss
0.01 and z-loss 0.001, AdamW lr 3e-3 weight decay 0.1). The dense model is ``moe_every=0`` with FFN width
K*F (``cli_configs/dense_baseline.yaml``), so its active parameters equal the MoE's, the routers'
``n_layers * E * D`` weights aside; both counts are printed (``parameter_counts()``).

One training step is plain PyTorch: ``zero_grad(set_to_none=True)``, forward on a random token batch
``(B, S+1)`` (inputs ``[:, :-1]``, targets ``[:, 1:]``), cross-entropy plus the MoE's aux losses,
backward, ``AdamW.step()``. The two models train in the same process, one step each per round, the order
alternating between rounds (these machines are noisy); on CUDA each step is bracketed by
``torch.cuda.synchronize``. Printed: a markdown table (ms/step, tokens/s, parameters, last loss) and the
MoE/dense tokens/s ratio of medians and of minimums. Target on CPU: >= 0.8.

    python benchmarks/train_throughput.py                       # tiny model, batch 16 x 128, 30 steps
    python benchmarks/train_throughput.py --dispatcher loop --steps 10
    python benchmarks/train_throughput.py --device cuda --dtype bfloat16 --batch-size 64
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_moe.balancing import SwitchAuxLoss, ZLoss
from lightning_moe.dispatch import DISPATCHERS
from lightning_moe.layers import MoEConfig
from lightning_moe.models import MoETransformer
from lightning_moe.routing import TopKRouter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_layer import device_name  # noqa: E402  (a sibling script: one way to name the hardware)

TARGET = 0.8
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_models(args: argparse.Namespace, device: torch.device) -> dict[str, MoETransformer]:
    common = dict(vocab_size=args.vocab_size, max_seq_len=args.seq_len, d_model=args.d_model,
                  n_layers=args.n_layers, n_heads=args.n_heads)
    top_k = args.top_k

    def router(d_model: int, num_experts: int) -> TopKRouter:
        return TopKRouter(d_model, num_experts, top_k=top_k)

    balancers = [] if args.no_aux_losses else [SwitchAuxLoss(0.01), ZLoss(0.001)]
    torch.manual_seed(0)
    moe = MoETransformer(
        **common, d_ff=top_k * args.expert_d_ff, moe_every=1,
        moe=MoEConfig(
            num_experts=args.experts, expert_d_ff=args.expert_d_ff, router=router, balancers=balancers,
            dispatcher=args.dispatcher,
        ),
    )
    torch.manual_seed(0)
    dense = MoETransformer(**common, d_ff=top_k * args.expert_d_ff, moe_every=0, moe=MoEConfig(balancers=[]))
    return {"dense": dense.to(device), f"moe ({args.dispatcher})": moe.to(device)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model: MoETransformer, optimizer: torch.optim.Optimizer, ids_BS1: Tensor,
               autocast: contextlib.AbstractContextManager) -> Tensor:
    optimizer.zero_grad(set_to_none=True)
    with autocast:
        logits_BSV = model(ids_BS1[:, :-1])
        loss = F.cross_entropy(logits_BSV.flatten(0, 1).float(), ids_BS1[:, 1:].flatten())
        loss = loss + sum(model.aux_losses().values())
    loss.backward()
    optimizer.step()
    return loss.detach()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128, help="input tokens per sequence")
    parser.add_argument("--dispatcher", default="grouped", help=f"MoE dispatch backend, one of {sorted(DISPATCHERS)}")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=[*DTYPES], default="float32",
                        help="bfloat16: autocast around forward and loss (weights stay float32)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--vocab-size", type=int, default=256)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-d-ff", type=int, default=256, help="F; the dense FFN width is top-k * F")
    parser.add_argument("--no-aux-losses", action="store_true", help="train the MoE without its balancing losses")
    args = parser.parse_args(argv)
    for flag in ("steps", "batch_size", "seq_len", "threads", "vocab_size", "d_model", "n_layers", "n_heads",
                 "experts", "top_k", "expert_d_ff"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.top_k > args.experts:
        parser.error(f"--top-k {args.top_k} exceeds --experts {args.experts}")
    if args.dispatcher not in DISPATCHERS:
        parser.error(f"--dispatcher {args.dispatcher!r} is not in lightning_moe.dispatch.DISPATCHERS "
                     f"({sorted(DISPATCHERS)})")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    models = build_models(args, device)
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
                  for name, model in models.items()}
    bf16 = args.dtype == "bfloat16"
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1), generator=generator).to(device)
               for _ in range(4)]
    tokens_per_step = args.batch_size * args.seq_len

    times: dict[str, list[float]] = {name: [] for name in models}
    last_loss: dict[str, Tensor] = {}
    names = list(models)
    for round_ in range(args.warmup + args.steps):
        ids = batches[round_ % len(batches)]
        for name in names if round_ % 2 == 0 else names[::-1]:
            autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            synchronize(device)
            start = time.perf_counter()
            last_loss[name] = train_step(models[name], optimizers[name], ids, autocast)
            synchronize(device)
            if round_ >= args.warmup:
                times[name].append(time.perf_counter() - start)

    counts = {name: model.parameter_counts() for name, model in models.items()}
    hardware = device_name(device)
    print(f"### {datetime.date.today().isoformat()}, {hardware}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.dtype}\n")
    print(f"`python benchmarks/train_throughput.py {' '.join(sys.argv[1:] if argv is None else argv)}`: vocabulary "
          f"{args.vocab_size}, D={args.d_model}, {args.n_layers} layers, {args.n_heads} heads; MoE E={args.experts} "
          f"K={args.top_k} F={args.expert_d_ff} ({args.dispatcher}), dense FFN width {args.top_k * args.expert_d_ff}; "
          f"batch {args.batch_size} x {args.seq_len} tokens; {args.steps} interleaved steps after {args.warmup} "
          f"warm-up\n")
    print("| model | median ms/step | min ms/step | tokens/s (median) | tokens/s (best) | params total "
          "| params active | last loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, ts in times.items():
        med, low = statistics.median(ts), min(ts)
        print(f"| {name} | {med * 1e3:.1f} | {low * 1e3:.1f} | {tokens_per_step / med:.0f} "
              f"| {tokens_per_step / low:.0f} | {counts[name]['total']:,} | {counts[name]['active']:,} "
              f"| {last_loss[name].item():.3f} |")
    moe_name = names[1]
    by_median = statistics.median(times["dense"]) / statistics.median(times[moe_name])
    by_min = min(times["dense"]) / min(times[moe_name])
    router_params = args.n_layers * args.experts * args.d_model
    print(f"\nActive parameters: MoE {counts[moe_name]['active']:,} (of which routers {router_params:,}), dense "
          f"{counts['dense']['active']:,}.")
    verdict = "met" if by_median >= TARGET else "not met"
    print(f"MoE/dense tokens/s: {by_median:.3f} (medians), {by_min:.3f} (minimums); target >= {TARGET} on CPU "
          f"(medians): {verdict}.", flush=True)


if __name__ == "__main__":
    main()
