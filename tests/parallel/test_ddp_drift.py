"""RoutingDriftMonitor under real 2-process DDP on CPU (gloo): one probe, identical measurements, a freeze."""

import pytest
import torch
from ddp_launch import run_ranks


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_ranks("ddp_drift_worker.py", tmp_path_factory.mktemp("ddp_drift"))


@pytest.mark.distributed
def test_both_ranks_probe_rank_zeros_tokens(ranks: list[dict]) -> None:
    r0, r1 = ranks
    assert not torch.equal(r0["own_val"], r1["own_val"]), "the ranks' validation data should differ"
    assert torch.equal(r0["probe"], r0["own_val"]) and torch.equal(r1["probe"], r0["own_val"])
    for a, b in zip(r0["reference"], r1["reference"], strict=True):
        assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.distributed
def test_both_ranks_hold_and_log_the_same_drift(ranks: list[dict]) -> None:
    r0, r1 = ranks
    # Each rank's own, unreduced measurement of the probe (the logged history is averaged over ranks, so it
    # agrees by construction): the same tokens and weights give the same drift on both.
    torch.testing.assert_close(torch.tensor(r0["own"]), torch.tensor(r1["own"]), rtol=0, atol=1e-6)
    assert r0["own"][1][0] > 0
    assert r0["steps"] == r1["steps"] == [2, 4]
    assert torch.equal(r0["history"], r1["history"]) and float(r0["history"][:, :, 0].min()) > 0
    assert r0["metrics"] and r0["metrics"] == r1["metrics"]
    assert r0["metrics"]["drift/layer1/changed_share"] == pytest.approx(float(r0["history"][-1, 1, 0]))


@pytest.mark.distributed
def test_freeze_under_ddp_holds_the_routers_on_both_ranks(ranks: list[dict]) -> None:
    r0, r1 = ranks
    assert r0["frozen"] == r1["frozen"] == [0, 1] and r0["warned_at"] == r1["warned_at"] == {0: 2, 1: 2}
    for r in ranks:  # DDP kept working after the freeze (requires_grad stays on); the routers did not move
        assert all(torch.equal(a, b) for a, b in zip(r["at_freeze"]["routers"], r["at_end"]["routers"], strict=True))
        assert not any(torch.equal(a, b) for a, b in zip(r["at_freeze"]["experts"], r["at_end"]["experts"],
                                                         strict=True))
    for key in ("routers", "experts"):
        assert all(torch.equal(a, b) for a, b in zip(r0["at_end"][key], r1["at_end"][key], strict=True))
