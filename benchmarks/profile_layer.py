"""Where the time of one MoELayer forward+backward goes: router, dispatch, and the kernels inside.

Prints, for one configuration, the median fwd+bwd time of the whole layer, of its dispatcher
alone on a fixed routing, and of the router alone, then the profiler's busiest ops. A diagnosis
tool for ``benchmarks/moe_layer.py``'s figures, not a benchmark of its own.

    python benchmarks/profile_layer.py --device cuda --dtype bfloat16 --dispatcher triton
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from lightning_moe.layers import MoELayer
from lightning_moe.routing import TopKRouter


def median_ms(step, device: str, rounds: int = 20) -> float:
    times = []
    for _ in range(rounds + 3):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("tokens", 4096), ("d-model", 512), ("experts", 64), ("top-k", 8), ("d-ff", 128)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--dispatcher", default="grouped")
    parser.add_argument("--rows", type=int, default=25, help="profiler rows to print")
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    d, e, k, f = args.d_model, args.experts, args.top_k, args.d_ff
    layer = MoELayer(d, f, e, router=TopKRouter(d, e, top_k=k), dispatcher=args.dispatcher).to(args.device, dtype)
    x = torch.randn(args.tokens, d, device=args.device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    with torch.no_grad():
        routing = layer.router(x)  # fixed routing; its gates still take a gradient below
    routing.weight_A.requires_grad_(True)

    def whole() -> None:
        layer.zero_grad(set_to_none=True)
        layer(x).backward(grad)

    def dispatch_only() -> None:
        layer.zero_grad(set_to_none=True)
        layer.dispatcher(x, routing, layer.experts).backward(grad)

    def router_only() -> None:
        layer.router(x)

    print(f"T={args.tokens} D={d} E={e} K={k} F={f} {args.device} {args.dtype} dispatcher={args.dispatcher}")
    for name, step in (("layer fwd+bwd", whole), ("dispatch fwd+bwd", dispatch_only), ("router fwd", router_only)):
        print(f"{name:18s} {median_ms(step, args.device):8.3f} ms")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            whole()
        if args.device == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
