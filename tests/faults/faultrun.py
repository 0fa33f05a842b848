"""Running the real ``lightning-moe`` command for the fault-tolerance tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "cli_configs" / "tiny.yaml"
HERE = Path(__file__).resolve().parent


def exe() -> str:
    path = shutil.which("lightning-moe", path=os.path.dirname(sys.executable)) or shutil.which("lightning-moe")
    assert path, "the lightning-moe console script is not installed"
    return path


def overlay(folder: Path, *, sleep: float = 0.0, every: int = 100, keep: int = 3, max_steps: int = 8,
            d_model: int = 32, dirpath: str | None = None) -> Path:
    """A config on top of tiny.yaml: a small model on the pydoc corpus, our three fault callbacks after a
    per-step loss log (``folder/steps.jsonl``), TensorBoard under ``folder/runs/ft``."""
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint_args = {"every_n_train_steps": every, "keep": keep, **({"dirpath": dirpath} if dirpath else {})}
    config = {
        "trainer": {
            "max_steps": max_steps, "limit_val_batches": 1, "val_check_interval": 1000, "num_sanity_val_steps": 0,
            "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(folder / "runs"), "name": "ft"}},
            "callbacks": [
                {"class_path": "fault_callbacks.StepLog",
                 "init_args": {"path": str(folder / "steps.jsonl"), "sleep": sleep}},
                {"class_path": "lightning_moe.callbacks.StepCheckpoint", "init_args": checkpoint_args},
                {"class_path": "lightning_moe.callbacks.Preemption"},
                {"class_path": "lightning_moe.callbacks.NonFiniteGuard"},
            ],
        },
        "model": {"d_model": d_model, "n_layers": 2, "max_seq_len": 32},
        "data": {"corpus": "pydoc", "batch_size": 4},
    }
    path = folder / "overlay.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def environment(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def start(folder: Path, *args: str, env: dict[str, str] | None = None, wrapper: list[str] | None = None,
          **overlay_args) -> subprocess.Popen:  # noqa: ANN003 - overlay's keywords
    """``lightning-moe fit`` on tiny.yaml + :func:`overlay`, in its own process group, output in
    ``folder/out.txt``."""
    config = overlay(folder, **overlay_args)
    out = open(folder / "out.txt", "a")  # noqa: SIM115 - closed with the process
    command = [*(wrapper or []), exe(), "fit", "--config", str(TINY), "--config", str(config), *args]
    return subprocess.Popen(command, cwd=folder, env=env or environment(), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> int:
    try:
        return process.wait(timeout)
    finally:
        stop_group(process)


def stop_group(process: subprocess.Popen) -> None:
    """Kill whatever is left of the process's group (its other ranks)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def run(folder: Path, *args: str, **overlay_args) -> tuple[int, str]:  # noqa: ANN003
    rc = finish(start(folder, *args, **overlay_args))
    return rc, (folder / "out.txt").read_text()


def losses(folder: Path) -> dict[int, float]:
    """Step -> training loss from the run's log; a later line for a step replaces an earlier one."""
    path = folder / "steps.jsonl"
    if not path.exists():
        return {}
    return {row["step"]: row["loss"] for row in map(json.loads, path.read_text().splitlines())}


def wait_for_step(folder: Path, process: subprocess.Popen, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while max(losses(folder), default=0) < step:
        assert process.poll() is None, (folder / "out.txt").read_text()[-3000:]
        assert time.monotonic() < deadline, f"the run did not reach step {step}"
        time.sleep(0.05)


def checkpoints(folder: Path) -> Path:
    return folder / "runs" / "ft" / "version_0" / "checkpoints"
