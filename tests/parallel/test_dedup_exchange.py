"""The deduplicated expert-parallel all-to-all: real processes over gloo, world = P = 2 and 4.

``dedup_exchange_worker.py`` runs, in one torchrun launch per P, top-1, 2, 4 and 8 routings, routings
where every token's experts sit on one remote rank or where a rank receives nothing, expert choice,
capacity drops, a rank with no tokens and autocast. Each rank's output, input gradient, router gradient
and expert gradients must equal the whole layer's in one process (float64: tight tolerances), and the
rows through the collective must be exactly the minimum: one per distinct (token, other rank) pair,
counted here from the routing, four times a step (dispatch, combine and their transposes).
"""

from pathlib import Path

import pytest
import torch
from ddp_launch import run_torchrun

pytestmark = pytest.mark.distributed

D = 6  # the worker's model width: a row through the all-to-all is D values
CASES = ["top1", "top2", "top4", "top8", "top2-loop", "all-remote", "all-remote-top1", "idle-rank", "expert-choice",
         "capacity", "empty-rank", "autocast"]



def run_workers(world: int, out: Path) -> list[dict[str, dict]]:
    """Each rank's cases by name."""
    return [{c["name"]: c for c in cases} for cases in run_torchrun("dedup_exchange_worker.py", world, out)]


@pytest.fixture(scope="module")
def ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict]]:
    return run_workers(request.param, tmp_path_factory.mktemp(f"dedup{request.param}"))


both_sizes = pytest.mark.parametrize("ranks", [2, 4], indirect=True, ids=["P2", "P4"])


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float, msg: str) -> None:
    scale = max(expected.abs().max().item(), 1e-3) if expected.numel() else 1.0
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=0, atol=tol * scale, msg=msg)


def minimum_rows(case: dict) -> list[int]:
    """Rows this rank must send to each rank: its distinct tokens with an expert there (0 to itself)."""
    world, local = case["world"], case["num_experts"] // case["world"]
    dest_A = case["expert_A"] // local
    rows = []
    for dest in range(world):
        tokens = case["token_A"][dest_A == dest]
        rows.append(0 if dest == case["rank"] else len(set(tokens.tolist())))
    return rows


@both_sizes
@pytest.mark.parametrize("name", CASES)
def test_outputs_and_gradients_match_the_whole_layer(ranks: list[dict[str, dict]], name: str) -> None:
    for rank in ranks:
        case = rank[name]
        tol = 2e-2 if name == "autocast" else 1e-10  # float64 everywhere else
        where = f"{name}, rank {case['rank']} of {case['world']}"
        assert case["y"].dtype == case["dtype"], where
        close(case["y"], case["ref_y"], tol, f"{where}: y")
        close(case["dx"], case["ref_dx"], tol, f"{where}: dx")
        assert set(case["grads"]) == set(case["ref_grads"])
        for param, grad in case["grads"].items():
            assert grad is not None and grad.shape == case["ref_grads"][param].shape, (where, param)
            close(grad, case["ref_grads"][param], tol, f"{where}: {param}")


@both_sizes
@pytest.mark.parametrize("name", CASES)
def test_the_rows_through_the_all_to_all_are_the_minimum(ranks: list[dict[str, dict]], name: str) -> None:
    cases = [rank[name] for rank in ranks]
    total_minimum, total_sent = 0, 0
    for case in cases:
        rank, world, local = case["rank"], case["world"], case["num_experts"] // case["world"]
        minimum = minimum_rows(case)
        exchange = case["exchange"]
        assert exchange["sent_rows"] == minimum, name
        # The assignments all arrive: to other ranks through the collective, to this rank's experts locally.
        per_rank = torch.bincount(case["expert_A"] // local, minlength=world).tolist()
        assert [s + k for s, k in zip(exchange["sent_assignments"], exchange["local_assignments"], strict=True)] \
            == per_rank, name
        assert exchange["local_rows"][rank] == minimum_rows({**case, "rank": -1})[rank]
        # What the collective actually carried: D-wide rows, none to this rank; the first is the dispatch.
        rows_calls = [c for c in case["forward_calls"] + case["backward_calls"] if c["shape"][1:] == (D,)]
        assert len(rows_calls) == 4, name  # dispatch, combine, and their transposes in backward
        assert rows_calls[0]["in_splits"] == minimum, name
        assert all(c["in_splits"][rank] == 0 for c in rows_calls), name
        total_minimum += sum(minimum)
        total_sent += sum(c["shape"][0] for c in rows_calls)
    assert total_sent == 4 * total_minimum, name
    sent = torch.tensor([c["exchange"]["sent_rows"] for c in cases])  # [source, destination]
    received = torch.tensor([c["exchange"]["received_rows"] for c in cases])  # [destination, source]
    assert torch.equal(sent, received.T), name


@both_sizes
def test_the_routings_cover_the_edge_cases(ranks: list[dict[str, dict]]) -> None:
    world = len(ranks)
    # all-remote: no rank keeps a row; every token goes to the next rank once, with all its experts.
    for rank in ranks:
        ex = rank["all-remote"]["exchange"]
        assert sum(ex["local_rows"]) == 0 and ex["sent_rows"][(rank["all-remote"]["rank"] + 1) % world] == 9
        assert sum(ex["sent_assignments"]) == 9 * min(4, 8 // world)
    # idle-rank: the last rank receives nothing and keeps nothing for its own experts.
    last = ranks[-1]["idle-rank"]["exchange"]
    assert sum(last["received_rows"]) == 0 and sum(last["local_rows"]) == 0 and sum(last["sent_rows"]) > 0
    # top-8 at E=16: duplicates to a rank are sent once (fewer rows than assignments).
    top8 = ranks[0]["top8"]["exchange"]
    assert sum(top8["sent_rows"]) < sum(top8["sent_assignments"])
    assert any(rank["capacity"]["num_dropped"] > 0 for rank in ranks)
    empty = ranks[0]["empty-rank"]
    assert empty["y"].shape == (0, D) and sum(empty["exchange"]["sent_rows"]) == 0
    assert sum(empty["exchange"]["received_rows"]) > 0
    for rank in ranks:  # expert choice: tokens reach varying numbers of experts
        experts_per_token = torch.bincount(rank["expert-choice"]["token_A"], minlength=9)
        assert experts_per_token.min() < experts_per_token.max()
