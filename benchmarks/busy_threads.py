"""Torch threads on a busy machine: the demo model's training step with 1 and with N threads, while other
processes keep some of the cores busy.

torch starts one intra-op thread per core. When another process holds a core, a step split over every core
waits for the thread that shares it, so it can be much slower than a step on fewer threads. This script
times the demo model's training step (``cli_configs/tiny.yaml``'s model: 4 layers, width 128, 32 fine-grained
experts, 8 per token, batch 16 x 128, AdamW) in fresh subprocesses with ``OMP_NUM_THREADS`` 1 and N (default:
the number of cores), each alone and then beside ``--hogs`` busy-looping processes, alternating the thread
counts between rounds. Printed: the median ms/step of each case and the ratio to one thread.

    python benchmarks/busy_threads.py                 # 1 vs all cores, idle and with one busy core
    python benchmarks/busy_threads.py --hogs 1 --rounds 3 --steps 8
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

STEP_SCRIPT = r"""
import json, statistics, sys, time
import torch
import torch.nn.functional as F
from lightning_moe.balancing import SwitchAuxLoss, ZLoss
from lightning_moe.layers import MoEConfig
from lightning_moe.models import MoETransformer
from lightning_moe.routing import TokenScorer, TopKRouter

steps = int(sys.argv[1])
torch.manual_seed(0)
model = MoETransformer(256, max_seq_len=128, d_model=128, n_layers=4, n_heads=4, d_ff=512, moe=MoEConfig(
    num_experts=8, expert_d_ff=256, granularity=4, balancers=[SwitchAuxLoss(0.01), ZLoss(0.001)],
    router=lambda d, e: TopKRouter(d, e, top_k=2, scorer=lambda d, e: TokenScorer(d, e, vocab_size=256))))
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
ids = torch.randint(0, 256, (16, 129))
times = []
for step in range(steps + 2):  # two warm-up steps
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    logits = model(ids[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()) + sum(model.aux_losses().values())
    loss.backward()
    optimizer.step()
    if step >= 2:
        times.append(time.perf_counter() - start)
print(json.dumps({"ms": 1000 * statistics.median(times), "threads": torch.get_num_threads()}))
"""

HOG = "while True: pass"


def time_steps(threads: int, steps: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", STEP_SCRIPT, str(steps)], env=env, capture_output=True, text=True,
                         check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["threads"] == threads, result
    return result["ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                        help="the many-thread case (default: the cores)")
    parser.add_argument("--hogs", type=int, default=1, help="busy-looping processes beside the busy runs (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each times every case once (default 3)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run, after 2 warm-up steps (default 8)")
    args = parser.parse_args()
    cases = {(threads, busy): [] for busy in (False, True) for threads in (1, args.threads)}
    for round_ in range(args.rounds):
        for busy in (False, True):
            hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(args.hogs if busy else 0)]
            try:
                time.sleep(0.5 if hogs else 0)
                order = (1, args.threads) if round_ % 2 == 0 else (args.threads, 1)
                for threads in order:
                    cases[(threads, busy)].append(time_steps(threads, args.steps))
            finally:
                for hog in hogs:
                    hog.kill()
                    hog.wait()
    print(f"{datetime.date.today()}, {os.cpu_count()} cores, torch threads 1 vs {args.threads}, "
          f"{args.hogs} busy-looping process(es) in the busy runs; median of {args.rounds} runs of the median of "
          f"{args.steps} steps")
    print("| machine | threads | ms/step | vs 1 thread |")
    print("|---|---:|---:|---:|")
    for busy in (False, True):
        base = statistics.median(cases[(1, busy)])
        for threads in (1, args.threads):
            ms = statistics.median(cases[(threads, busy)])
            print(f"| {'busy' if busy else 'idle'} | {threads} | {ms:.0f} | {ms / base:.2f}x |")


if __name__ == "__main__":
    main()
