"""RoutingDriftMonitor under real 2-process DDP on CPU (gloo): one probe, identical measurements, a freeze."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp_drift")
    worker = Path(__file__).with_name("ddp_drift_worker.py")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    result = subprocess.run([sys.executable, str(worker), str(out)], capture_output=True, text=True, timeout=600,
                            env=env, cwd=out)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


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
