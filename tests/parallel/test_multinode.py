"""The multi-node path on one machine: two torchrun launches, one per "node" (static rendezvous through
--node_rank and --master_addr/--master_port, as on a cluster), train cli_configs/deepspeed/zero1_ep2.yaml
with one process each, so each MoE layer's experts are split across the two nodes (EP=2)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # README: `-m 'not slow'` leaves these out

pytest.importorskip("deepspeed", reason="install the `deepspeed` extra: pip install -e '.[deepspeed]'")

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "cli_configs" / "deepspeed" / "zero1_ep2.yaml"
ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
STEPS, TIMEOUT_S = 5, 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_command(node_rank: int, port: int, save_dir: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
            "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
            "-m", "lightning_moe.cli", "fit", "--config", str(CONFIG),
            "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.accelerator", "cpu",
            "--trainer.max_steps", str(STEPS), "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.strategy.init_args.cpu_shm_comm", "false",
            "--model.lr_scheduler", "null",  # a constant LR: no warm-up, so a few steps show the loss falling
            "--trainer.logger.init_args.save_dir", str(save_dir)]


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:]


def run_nodes(tmp_path: Path) -> None:
    """Start both nodes at once (each waits for the other at the rendezvous). When one fails, or at
    the timeout, kill both process trees (the survivor would wait for its peer) and show each node's
    output."""
    port, procs, logs = free_port(), [], []
    try:
        for rank in (0, 1):
            logs.append(tmp_path / f"node{rank}.log")
            with logs[-1].open("w") as log:
                procs.append(subprocess.Popen(node_command(rank, port, tmp_path / "runs"), cwd=tmp_path,
                                              env={**os.environ, **ENV}, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))  # its own group: kill torchrun's workers too
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            codes = [proc.poll() for proc in procs]
            if None not in codes or any(code for code in codes):
                break
            time.sleep(0.5)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    report = "\n".join(f"--- node {rank} ---\n{tail(log)}" for rank, log in enumerate(logs))
    assert codes == [0, 0], f"exit codes {codes} (None: still running, killed; limit {TIMEOUT_S} s)\n{report}"


@pytest.mark.distributed
def test_two_nodes_train_with_experts_split_across_them(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_moe.parallel.strategy import LAYOUT_KEY, load_full_state_dict

    run_nodes(tmp_path)
    run_dir = tmp_path / "runs" / "zero1_ep2" / "version_0"
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert len(losses) == STEPS and losses[-1] < losses[0], losses

    # The checkpoint records the layout it was written with; each node wrote its own 4 of the 8 experts of
    # each layer, one DeepSpeed file per expert, and DeepSpeed's module file holds no expert tensor.
    last = run_dir / "checkpoints" / "last.ckpt"
    tag = last / (last / "latest").read_text().strip()
    client = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert client[LAYOUT_KEY] == {"world_size": 2, "sizes": {"model.blocks.0.ffn": 2, "model.blocks.1.ffn": 2}}
    assert not [key for key in client["module"] if ".experts." in key]
    assert sorted(p.name for p in tag.glob("layer_*_expert_*_mp_rank_00_model_states.pt")) == sorted(
        f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt" for layer in (0, 1) for expert in range(8))
    full = load_full_state_dict(last)
    experts = [key for key in full if ".experts." in key]
    assert experts and all(full[key].shape[0] == 8 for key in experts)
