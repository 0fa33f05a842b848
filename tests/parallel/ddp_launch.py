"""Starting the 2-process DDP workers of the tests in this folder: a free port, one subprocess, each rank's output."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: str, out: Path, ranks: int = 2, timeout: int = 600) -> list[dict]:
    """Run ``worker`` (a script next to this file, given ``out``; Lightning re-launches it once per rank) and
    return what each rank saved to ``out/rank{r}.pt``; fails the test with the worker's stderr if it fails."""
    script = Path(__file__).with_name(worker)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    result = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=timeout,
                            env=env, cwd=out)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(ranks)]


def run_torchrun(worker: str, world: int, out: Path, timeout: int = 300) -> list:
    """Run ``worker`` (a script next to this file, given ``out``) in ``world`` processes through torchrun and
    return what each rank saved to ``out/rank{r}.pt``; fails the test with the workers' stderr if they fail."""
    script = Path(__file__).with_name(worker)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(script), str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=out)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def save_rank_results(results: object, out: str) -> None:
    """A torchrun worker's end: this rank's ``results`` to ``out/rank{r}.pt``, then leave the process group together."""
    import torch.distributed as dist

    torch.save(results, Path(out) / f"rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()
