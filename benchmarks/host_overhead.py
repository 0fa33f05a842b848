"""Host (CPU) time per MoE-layer step, eager and replayed from one CUDA graph: where a GPU waits on Python.

On a GPU a small MoE layer is host-bound: the kernels of a step take less time than the Python and
dispatcher work that launches them (BENCHMARKS.md, H100, T=4096 D=512: 0.75 ms of kernels in a 4 ms
step). This script measures, per path, in one process, interleaved round by round:

- ``host ms``: wall time from the step's start until Python returns, *without* synchronising (the
  time the CPU spends launching; a path that syncs (``grouped`` reads its per-expert counts on the
  host) waits for the GPU in there too);
- ``step ms``: wall time of the step with a ``torch.cuda.synchronize`` at its end (what a training
  loop sees);
- ``graph host ms`` / ``graph step ms``: the same for one replay of a CUDA graph that captured the
  forward and backward (``torch.cuda.graph``, warm-up on a side stream, gradients set to ``None``
  before capture, as PyTorch's whole-network capture recipe does). Paths that cannot be captured
  (a host sync inside: ``grouped``) print ``-`` and the reason.

The paths: ``dense`` (a SwiGLU of width K*F, the same active FLOPs) and ``MoELayer`` with each
dispatcher in ``--dispatchers`` (default ``grouped,triton-kernels,triton-grouped_mm,triton``).

    python benchmarks/host_overhead.py --device cuda                      # T=4096 D=512 E=8 K=2 F=1024, bf16
    python benchmarks/host_overhead.py --device cuda --experts 64 --top-k 8 --d-ff 128
    python benchmarks/host_overhead.py --device cpu --tokens 256 --d-model 64 --dtype float32   # a smoke run

On CPU there is no graph and no asynchrony: host ms = step ms, and the graph columns are ``-``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_moe.dispatch import DISPATCHERS
from lightning_moe.experts import SwiGLU
from lightning_moe.layers import MoELayer
from lightning_moe.routing import TopKRouter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_layer import device_name, synchronize  # noqa: E402  (a sibling script)


def build(path: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    if path == "dense":
        module = SwiGLU(args.d_model, args.top_k * args.d_ff)
    else:
        module = MoELayer(args.d_model, args.d_ff, args.experts,
                          router=TopKRouter(args.d_model, args.experts, top_k=args.top_k), dispatcher=path)
    return module.to(device, dtype)


class Step:
    """One fwd+bwd of ``module`` on static input/gradient tensors; optionally captured in a CUDA graph."""

    def __init__(self, module: nn.Module, x: Tensor, dy: Tensor) -> None:
        self.module, self.x, self.dy = module, x, dy
        self.graph: torch.cuda.CUDAGraph | None = None

    def eager(self) -> None:
        self.module.zero_grad(set_to_none=True)
        self.x.grad = None
        self.module(self.x).backward(self.dy)

    def capture(self) -> str | None:
        """Capture one fwd+bwd; the reason if it cannot be captured, else ``None``."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.eager()
        torch.cuda.current_stream().wait_stream(side)
        self.module.zero_grad(set_to_none=True)
        self.x.grad = None
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.module(self.x).backward(self.dy)
        except Exception as error:  # what capture raises for a host sync or an uncapturable op
            torch.cuda.synchronize()
            return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160]}"
        self.graph = graph
        return None

    def replay(self) -> None:
        self.graph.replay()


def host_and_step_ms(run: Callable[[], None], device: torch.device) -> tuple[float, float]:
    synchronize(device)
    start = time.perf_counter()
    run()
    host = time.perf_counter() - start
    synchronize(device)
    return 1e3 * host, 1e3 * (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on CPU by default")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--dispatchers", default="grouped,triton-kernels,triton-grouped_mm,triton")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    paths, notes = ["dense"], []
    for name in args.dispatchers.split(","):
        (paths.append(name) if name in DISPATCHERS else notes.append(f"skipped {name}: not a registered dispatcher"))

    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.d_model, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)
    steps, graphs = {}, {}
    for path in paths:
        step = Step(build(path, args, device, dtype), x, dy)
        for _ in range(args.warmup):
            step.eager()
        steps[path] = step
        if device.type == "cuda":
            reason = step.capture()
            if reason is None:
                graphs[path] = step
            else:
                notes.append(f"{path}: not captured in a CUDA graph ({reason})")

    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for round_ in range(args.rounds):
        order = paths if round_ % 2 == 0 else paths[::-1]
        for path in order:
            times.setdefault((path, "eager"), []).append(host_and_step_ms(steps[path].eager, device))
            if path in graphs:
                times.setdefault((path, "graph"), []).append(host_and_step_ms(graphs[path].replay, device))

    def median(path: str, mode: str, which: int) -> str:
        values = times.get((path, mode))
        return f"{statistics.median(v[which] for v in values):.3f}" if values else "-"

    print(f"### {datetime.date.today()}, {device_name(device)}, torch {torch.__version__}, "
          f"{str(dtype).removeprefix('torch.')}")
    print(f"\nT={args.tokens} D={args.d_model} E={args.experts} K={args.top_k} F={args.d_ff}, {args.rounds} "
          f"interleaved rounds after {args.warmup} warm-up; medians\n")
    print("| path | host ms | step ms | host/step | graph host ms | graph step ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for path in paths:
        host, step = (statistics.median(v[i] for v in times[(path, "eager")]) for i in (0, 1))
        print(f"| {path} | {host:.3f} | {step:.3f} | {host / step:.2f} | {median(path, 'graph', 0)} | "
              f"{median(path, 'graph', 1)} |")
    for note in notes:
        print(f"\n{note}")


if __name__ == "__main__":
    main()
