"""Routing metrics: hand-computed values, accumulation, reset, and a real 2-process gloo reduction."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_moe.layers import RoutingStats
from lightning_moe.metrics import DroppedFraction, ExpertLoad, RoutingEntropy, load_summary
from lightning_moe.routing.routing import Routing


def make_stats(counts: list[int], entropy: float = 0.0, dropped: int = 0,
               num_tokens: int | None = None) -> RoutingStats:
    counts_E = torch.tensor(counts, dtype=torch.long)
    return RoutingStats(
        tokens_per_expert_E=counts_E,
        mean_score_E=torch.full((len(counts),), 1.0 / len(counts)),
        entropy=torch.tensor(entropy),
        num_dropped=torch.tensor(dropped, dtype=torch.long),
        num_tokens=int(counts_E.sum()) if num_tokens is None else num_tokens,
    )


# ---------------------------------------------------------------- RoutingEntropy


def test_routing_entropy_is_token_weighted() -> None:
    metric = RoutingEntropy()
    metric.update(make_stats([2, 0], entropy=1.0, num_tokens=2))
    metric.update(make_stats([8, 0], entropy=0.4, num_tokens=8))
    assert metric.compute().item() == pytest.approx((2 * 1.0 + 8 * 0.4) / 10)


def test_metrics_of_a_real_routing() -> None:
    # Token 0 spreads its score uniformly over 4 experts (entropy log 4), token 1 is certain (0).
    scores_TE = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    routing = Routing(scores_TE=scores_TE, logits_TE=scores_TE.log(), token_A=torch.tensor([0, 0, 1]),
                      expert_A=torch.tensor([1, 2, 0]), weight_A=torch.ones(3), num_dropped=1)
    stats = RoutingStats.from_routing(routing)
    entropy, load, dropped = RoutingEntropy(), ExpertLoad(4), DroppedFraction()
    for metric in (entropy, load, dropped):
        metric.update(stats)
    assert entropy.compute().item() == pytest.approx(math.log(4) / 2)
    assert load.compute().tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0])
    assert dropped.compute().item() == pytest.approx(1 / 4)


def test_routing_entropy_reset_and_empty_updates() -> None:
    metric = RoutingEntropy()
    metric.update(make_stats([4], entropy=2.0))
    metric.reset()
    metric.update(make_stats([0], entropy=float("nan"), num_tokens=0))  # a forward of no tokens is ignored
    metric.update(make_stats([3], entropy=0.5))
    assert metric.compute().item() == pytest.approx(0.5)


# ---------------------------------------------------------------- ExpertLoad


def test_expert_load_accumulates_counts() -> None:
    metric = ExpertLoad(4)
    metric.update(make_stats([3, 1, 0, 0]))
    metric.update(make_stats([1, 1, 2, 0]))
    torch.testing.assert_close(metric.compute(), torch.tensor([4, 2, 2, 0]) / 8.0)
    assert metric.compute().sum().item() == pytest.approx(1.0)
    assert metric.tokens_per_expert_E.tolist() == [4, 2, 2, 0]
    metric.reset()
    metric.update(make_stats([0, 0, 0, 5]))
    torch.testing.assert_close(metric.compute(), torch.tensor([0.0, 0.0, 0.0, 1.0]))


def test_expert_load_validates() -> None:
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="`num_experts` must be an integer >= 1"):
            ExpertLoad(bad)
    metric = ExpertLoad(4)
    with pytest.raises(ValueError, match=r"must have shape \(4,\) \(num_experts=4\), got \(3,\)"):
        metric.update(make_stats([1, 2, 3]))


def test_expert_load_before_any_token_is_zero() -> None:
    metric = ExpertLoad(3)
    metric.update(make_stats([0, 0, 0]))
    assert metric.compute().tolist() == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------- DroppedFraction


def test_dropped_fraction() -> None:
    metric = DroppedFraction()
    metric.update(make_stats([3, 3], dropped=2))  # 2 of 8
    assert metric.compute().item() == pytest.approx(0.25)
    metric.update(make_stats([1, 1], dropped=0))  # 2 of 10
    assert metric.compute().item() == pytest.approx(0.2)
    metric.reset()
    metric.update(make_stats([0, 0], dropped=0))
    assert metric.compute().item() == 0.0
    metric.update(make_stats([0, 0], dropped=4))
    assert metric.compute().item() == 1.0


def test_dropped_fraction_matches_routing_stats() -> None:
    stats = make_stats([5, 2, 1], dropped=3)
    metric = DroppedFraction()
    metric.update(stats)
    assert metric.compute().item() == pytest.approx(stats.dropped_fraction.item())


# ---------------------------------------------------------------- load_summary


def summary(values: list[float]) -> dict[str, float]:
    return {k: v.item() for k, v in load_summary(torch.tensor(values)).items()}


def test_load_summary_balanced_and_collapsed() -> None:
    assert summary([0.25] * 4) == pytest.approx({"load_entropy": 1.0, "max_share": 0.25, "min_share": 0.25,
                                                 "load_cv": 0.0})
    assert summary([1.0, 0.0, 0.0, 0.0]) == pytest.approx({"load_entropy": 0.0, "max_share": 1.0, "min_share": 0.0,
                                                           "load_cv": math.sqrt(3)}, abs=1e-6)


def test_load_summary_hand_computed() -> None:
    # shares (0.5, 0.5, 0, 0): entropy log 2 / log 4 = 0.5; mean 0.25, population std 0.25 -> cv 1.
    assert summary([0.5, 0.5, 0.0, 0.0]) == pytest.approx({"load_entropy": 0.5, "max_share": 0.5, "min_share": 0.0,
                                                           "load_cv": 1.0})
    shares = [0.5, 0.3, 0.2]
    entropy = -sum(p * math.log(p) for p in shares) / math.log(3)
    std = math.sqrt(sum((p - 1 / 3) ** 2 for p in shares) / 3)
    assert summary(shares) == pytest.approx({"load_entropy": entropy, "max_share": 0.5, "min_share": 0.2,
                                             "load_cv": std * 3})
    assert summary([5.0, 3.0, 2.0]) == pytest.approx(summary(shares))  # counts are normalised first


def test_load_summary_edge_cases() -> None:
    assert summary([1.0]) == pytest.approx({"load_entropy": 1.0, "max_share": 1.0, "min_share": 1.0, "load_cv": 0.0})
    assert summary([0.0, 0.0]) == pytest.approx({"load_entropy": 0.0, "max_share": 0.0, "min_share": 0.0,
                                                 "load_cv": 0.0})
    for bad in (torch.tensor([]), torch.ones(2, 2), torch.tensor(1.0)):
        with pytest.raises(ValueError, match="`load_fraction_E` must be a non-empty 1-D tensor"):
            load_summary(bad)


# ---------------------------------------------------------------- across ranks (gloo)

WORKER = r'''
import json, sys
import torch
import torch.distributed as dist
from lightning_moe.layers import RoutingStats
from lightning_moe.metrics import DroppedFraction, ExpertLoad, RoutingEntropy

rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

def stats(counts, entropy, dropped, tokens):
    return RoutingStats(torch.tensor(counts), torch.zeros(len(counts)), torch.tensor(entropy),
                        torch.tensor(dropped), tokens)

updates = {0: [([3, 1, 0, 0], 1.0, 2, 4), ([0, 2, 2, 0], 0.2, 0, 4)],
           1: [([0, 0, 0, 8], 0.5, 6, 12), ([1, 1, 1, 1], 1.3, 1, 2)]}[rank]
entropy, load, dropped = RoutingEntropy(), ExpertLoad(4), DroppedFraction()
results = []
for update in updates:
    for metric in (entropy, load, dropped):
        metric.update(stats(*update))
    with load.sync_context():
        summed = load.tokens_per_expert_E.tolist()
    results.append({"entropy": entropy.compute().item(), "load": load.compute().tolist(),
                    "dropped": dropped.compute().item(), "counts": summed, "local": load.tokens_per_expert_E.tolist()})
dist.barrier()
dist.destroy_process_group()
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(results, f)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_metrics_sum_over_two_gloo_ranks(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), port, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    # After the first update: rank 0 saw 4 tokens (entropy 1.0), rank 1 saw 12 (entropy 0.5).
    # After both: rank 0 adds 4 tokens at 0.2, rank 1 adds 2 at 1.3.
    expected = [
        {"entropy": (4 * 1.0 + 12 * 0.5) / 16, "counts": [3, 1, 0, 8], "dropped": (2 + 6) / (12 + 8)},
        {"entropy": (4 * 1.0 + 12 * 0.5 + 4 * 0.2 + 2 * 1.3) / 22, "counts": [4, 4, 3, 9],
         "dropped": (2 + 6 + 0 + 1) / (20 + 9)},
    ]
    for step, want in enumerate(expected):
        for result in (r0[step], r1[step]):
            assert result["entropy"] == pytest.approx(want["entropy"])
            assert result["counts"] == want["counts"]
            assert result["load"] == pytest.approx([c / sum(want["counts"]) for c in want["counts"]])
            assert result["dropped"] == pytest.approx(want["dropped"])
    # compute() and sync_context() leave each rank's own (unreduced) state in place.
    assert r0[1]["local"] == [3, 3, 2, 0] and r1[1]["local"] == [1, 1, 1, 9]
