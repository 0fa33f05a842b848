"""Forward+backward time of MoELayer (grouped, loop) against a dense SwiGLU with the same active FLOPs.

The dense equivalent is a SwiGLU FFN of width K*F: per token it does exactly the expert matmuls
of K experts of width F. The implementations are interleaved round by round (these machines
are noisy) and the ratios of medians and of minimums to the dense time are printed.

    python benchmarks/moe_layer.py                       # T=4096 D=512 E=8 K=2 F=1024, float32
    python benchmarks/moe_layer.py --experts 64 --top-k 8 --d-ff 128
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_moe.experts import SwiGLU
from lightning_moe.layers import MoELayer
from lightning_moe.routing import TopKRouter


def fwd_bwd_seconds(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    module.zero_grad(set_to_none=True)
    x.grad = None
    start = time.perf_counter()
    module(x).backward(grad)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    d, e, k, f = args.d_model, args.experts, args.top_k, args.d_ff
    candidates = {"dense": SwiGLU(d, k * f)}
    for backend in ("grouped", "loop"):
        layer = MoELayer(d, f, e, router=TopKRouter(d, e, top_k=k), dispatcher=backend)
        candidates[backend] = layer
    candidates["loop"].load_state_dict(candidates["grouped"].state_dict())
    x = torch.randn(args.tokens, d, requires_grad=True)
    grad = torch.randn(args.tokens, d)  # a real (not expanded) incoming gradient

    times: dict[str, list[float]] = {name: [] for name in candidates}
    for round_ in range(args.warmup + args.rounds):
        for name, module in candidates.items():
            seconds = fwd_bwd_seconds(module, x, grad)
            if round_ >= args.warmup:
                times[name].append(seconds)

    print(f"T={args.tokens} D={d} E={e} K={k} F={f} float32, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds after {args.warmup} warm-up")
    dense_med, dense_min = statistics.median(times["dense"]), min(times["dense"])
    print(f"{'path':<10}{'median ms':>11}{'min ms':>9}{'median/dense':>14}{'min/dense':>11}{'tokens/s':>12}")
    for name, ts in times.items():
        med, low = statistics.median(ts), min(ts)
        print(f"{name:<10}{med * 1e3:>11.1f}{low * 1e3:>9.1f}{med / dense_med:>14.3f}{low / dense_min:>11.3f}"
              f"{args.tokens / med:>12.0f}")


if __name__ == "__main__":
    main()
