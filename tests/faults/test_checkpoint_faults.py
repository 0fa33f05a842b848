"""Checkpoints under real faults: a SIGKILL in the middle of a write, a NaN, a directory the run may not
write to. Each is a real ``lightning-moe fit`` process."""

from __future__ import annotations

import os
import shutil
import signal
import time
import uuid
from pathlib import Path

import pytest
import torch
from faultrun import checkpoints, environment, finish, losses, run, start, stop_group, wait_for_step

from lightning_moe.callbacks.checkpoint import TEMP_INFIX

pytestmark = pytest.mark.slow  # README: `-m 'not slow'` leaves these out


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc/*/stat, which every Linux kernel has)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if TEMP_INFIX in p.name] if folder.is_dir() else []


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm, a tmpfs: another filesystem than /tmp")
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path: Path) -> None:
    tmpdir = Path("/dev/shm") / f"lightning-moe-test-{uuid.uuid4().hex}"
    tmpdir.mkdir()
    try:
        # A checkpoint every step (~10 MB at this width), TMPDIR on another filesystem than the checkpoints.
        process = start(tmp_path, env=environment(TMPDIR=str(tmpdir)), every=1, d_model=64, max_steps=40)
        folder = checkpoints(tmp_path)
        deadline = time.monotonic() + 240
        try:
            while not ((folder / "last.ckpt").exists() and temp_files(folder)):  # a write after a complete one
                assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "out.txt").read_text()
                time.sleep(0.001)
            os.killpg(process.pid, signal.SIGKILL)
        finally:
            finish(process)
        last = (folder / "last.ckpt").resolve(strict=True)
        saved = torch.load(last, map_location="cpu", weights_only=True)  # complete: it loads
        assert last.name == f"epoch=0-step={saved['global_step']}.ckpt"
        assert list(tmpdir.iterdir()) == []  # nothing was ever written to $TMPDIR

        rc, out = run(tmp_path, "--ckpt_path", "last", "--trainer.max_steps", str(saved["global_step"] + 2),
                      every=1, d_model=64, max_steps=40)
        assert rc == 0, out[-3000:]
        assert "a kill interrupted" in out or not temp_files(folder)
        assert temp_files(folder) == []  # the orphan of the killed write is gone
        assert torch.load(folder / "last.ckpt", weights_only=True, mmap=True)["global_step"] == saved["global_step"] + 2
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def test_a_nan_stops_the_run_and_never_replaces_the_good_checkpoint(tmp_path: Path) -> None:
    rc, out = run(tmp_path, "--model.optimizer.init_args.lr", "1e6", every=1, max_steps=20)
    assert rc == 3, out[-3000:]
    # Whichever comes first names the quantity: the loss or a layer's router logits before the optimizer
    # step, or the weights an update made non-finite before they are checkpointed.
    assert ("NonFiniteError: Non-finite values in training step" in out and "router logits" in out) or \
        ("NonFiniteError: Refusing to checkpoint step" in out and "hold NaN or infinite values" in out), out[-3000:]
    assert "Traceback" not in out
    last = checkpoints(tmp_path) / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] < max(losses(tmp_path))
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values() if t.is_floating_point())


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_a_read_only_checkpoint_directory_stops_the_run_naming_it(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    # As root, drop the capability that ignores permissions, so that the child really cannot write.
    wrapper = ["setpriv", "--bounding-set", "-dac_override", "--inh-caps", "-dac_override"] \
        if os.geteuid() == 0 else []
    if wrapper and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: the directory would be writable")
    try:
        process = start(tmp_path / "run", every=2, max_steps=4, dirpath=str(locked), wrapper=wrapper)
        rc = finish(process, timeout=180)
    finally:
        locked.chmod(0o755)
    out = (tmp_path / "run" / "out.txt").read_text()
    assert rc == 74, out[-3000:]
    assert f"CheckpointWriteError: Could not write the checkpoint {locked}" in out
    assert "Permission denied" in out
    assert list(locked.iterdir()) == []


@pytest.mark.distributed
def test_a_hung_rank_makes_the_others_fail_after_the_timeout(tmp_path: Path) -> None:
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2",
           "--trainer.strategy", "lightning.pytorch.strategies.DDPStrategy",
           "--trainer.strategy.init_args.timeout", "0:00:20"]
    process = start(tmp_path, *ddp, max_steps=200)
    try:
        wait_for_step(tmp_path, process, 2)
        children = child_pids(process.pid)
        assert children, "Lightning started no process for rank 1"
        os.kill(children[0], signal.SIGSTOP)  # rank 1 hangs
        stopped = time.monotonic()
        rc = process.wait(120)
        waited = time.monotonic() - stopped
    finally:
        stop_group(process)
    out = (tmp_path / "out.txt").read_text()
    assert rc == 1, out[-3000:]
    assert "did not complete within the collective timeout (0:00:20" in out
    assert waited < 90
