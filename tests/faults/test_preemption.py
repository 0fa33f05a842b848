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

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # README: `-m 'not slow'` leaves these out


def saved_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]


def test_sigterm_and_sigint_save_the_step_and_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    # Three runs at once (their results do not depend on timing): one never interrupted, one sent SIGTERM,
    # one SIGINT. Checkpoints every 100 steps: none would be written before step 8 otherwise.
    reference = start(tmp_path / "reference")
    cut = {signum: start(tmp_path / signal.Signals(signum).name, sleep=0.4)
           for signum in (signal.SIGTERM, signal.SIGINT)}
    for signum, process in cut.items():
        wait_for_step(tmp_path / signal.Signals(signum).name, process, 3)
        process.send_signal(signum)
    codes = {signum: finish(process, timeout=180) for signum, process in cut.items()}
    assert finish(reference) == 0, (tmp_path / "reference" / "out.txt").read_text()[-3000:]
    expected = losses(tmp_path / "reference")
    assert sorted(expected) == list(range(1, 9))

    for signum, rc in codes.items():
        folder = tmp_path / signal.Signals(signum).name
        out = (folder / "out.txt").read_text()
        assert rc == 128 + signum, out[-3000:]  # 143 and 130
        step = saved_step(checkpoints(folder) / "last.ckpt")
        assert 3 <= step < 8
        assert losses(folder) == {s: expected[s] for s in range(1, step + 1)}  # it stopped after the saved step
        assert f"Stopped by {signal.Signals(signum).name} after step {step}" in out
        assert "Traceback" not in out

    # The same checkpoint either way: one resume shows that it continues exactly.
    folder = tmp_path / "SIGTERM"
    rc, out = run(folder, "--ckpt_path", "last")
    assert rc == 0, out[-3000:]
    assert losses(folder) == expected  # bit for bit, step by step
    assert sorted(p.name for p in (folder / "runs" / "ft").iterdir()) == ["version_0"]  # one run, one folder


def test_sigterm_under_ddp_saves_on_every_rank_and_resumes_exactly(tmp_path: Path) -> None:
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    reference = start(tmp_path / "reference", *ddp)  # at the same time as the interrupted run
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
    assert finish(reference) == 0, (tmp_path / "reference" / "out.txt").read_text()[-3000:]

    rc, out = run(cut, *ddp, "--ckpt_path", "last")
    assert rc == 0, out[-3000:]
    assert losses(cut) == losses(tmp_path / "reference")
