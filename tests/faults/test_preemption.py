"""Real signals to a real ``lightning-moe fit``: the run saves the step it reached, exits 128 + signal,
and ``--ckpt_path last`` continues it with the same per-step losses as a run never interrupted."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from faultrun import checkpoints, finish, group_alive, losses, run, start, wait_for_step

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """Per-step losses of an uninterrupted 8-step run on one process."""
    folder = tmp_path_factory.mktemp("reference")
    rc, out = run(folder)
    assert rc == 0, out[-3000:]
    return losses(folder)


def saved_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_step_and_resume_matches_an_uninterrupted_run(
        signum: int, reference: dict[int, float], tmp_path: Path) -> None:
    process = start(tmp_path, sleep=0.4)  # checkpoints every 100 steps: none would be written before step 8
    wait_for_step(tmp_path, process, 3)
    process.send_signal(signum)
    rc = finish(process, timeout=120)
    out = (tmp_path / "out.txt").read_text()
    assert rc == 128 + signum, out[-3000:]
    step = saved_step(checkpoints(tmp_path) / "last.ckpt")
    assert 3 <= step < 8
    assert losses(tmp_path) == {s: reference[s] for s in range(1, step + 1)}  # it stopped after the saved step
    assert f"Stopped by {signal.Signals(signum).name} after step {step}" in out
    assert "Traceback" not in out
    if signum != signal.SIGTERM:
        return  # the same checkpoint either way: one resume shows it continues exactly

    rc, out = run(tmp_path, "--ckpt_path", "last")
    assert rc == 0, out[-3000:]
    assert losses(tmp_path) == reference  # bit for bit, step by step
    assert sorted(p.name for p in (tmp_path / "runs" / "ft").iterdir()) == ["version_0"]  # one run, one folder


def test_sigterm_under_ddp_saves_on_every_rank_and_resumes_exactly(tmp_path: Path) -> None:
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    reference_dir = tmp_path / "reference"
    rc, out = run(reference_dir, *ddp)
    assert rc == 0, out[-3000:]

    cut = tmp_path / "cut"
    process = start(cut, *ddp, sleep=0.4)
    wait_for_step(cut, process, 3)
    os.kill(process.pid, signal.SIGTERM)  # the main process only, as a scheduler may do: the ranks agree
    try:
        rc = process.wait(180)
        deadline = time.monotonic() + 30
        while group_alive(process.pid) and time.monotonic() < deadline:  # no rank is left behind
            time.sleep(0.1)
        assert not group_alive(process.pid)
    finally:
        finish(process)
    out = (cut / "out.txt").read_text()
    assert rc == 143, out[-3000:]
    assert 3 <= saved_step(checkpoints(cut) / "last.ckpt") < 8

    rc, out = run(cut, *ddp, "--ckpt_path", "last")
    assert rc == 0, out[-3000:]
    assert losses(cut) == losses(reference_dir)
