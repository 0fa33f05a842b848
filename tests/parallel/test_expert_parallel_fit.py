"""Expert parallelism through Lightning: DDP and DeepSpeed (ZeRO-1/2, CPU, gloo) fits with EP=2 on two
processes match one process with EP=1, and checkpoints reshard between EP sizes both ways.

Each run is ``ep_fit_worker.py``: a tiny MoELanguageModel, 4 steps of plain SGD on the same global
batches (SGD is scale-sensitive: an expert gradient averaged over the wrong group, or scaled by
the expert-parallel size, changes the losses from the second step). DeepSpeed's CPU
shared-memory op is not built (``cpu_shm_comm=False``), so no run waits for g++.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_moe.layers import MoEConfig
from lightning_moe.module import MoELanguageModel

pytestmark = pytest.mark.slow  # README: `-m 'not slow'` leaves these out

WORKER = Path(__file__).with_name("ep_fit_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fit(out: Path, strategy: str, ep: int, *args: str, processes: int = 1) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port())]
    else:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        cmd = [sys.executable]
    result = subprocess.run([*cmd, str(WORKER), str(out), strategy, str(ep), *args], capture_output=True, text=True,
                            timeout=600, env=env, cwd=out)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(processes)]


def fixed_batch_loss(logits: torch.Tensor) -> float:
    """Cross-entropy of ``ep_fit_worker``'s logits of its fixed batch (the first 4 rows of its first global batch)."""
    ids = torch.randint(0, 64, (64, 17), generator=torch.Generator().manual_seed(3))[:4]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item()


def initial_logits() -> torch.Tensor:
    """``ep_fit_worker``'s model as built (same seed and sizes) on its fixed batch, before any step."""
    L.seed_everything(0, verbose=False)
    model = MoELanguageModel(64, 17, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                             moe=MoEConfig(num_experts=4, expert_d_ff=8)).eval()
    ids = torch.randint(0, 64, (64, 17), generator=torch.Generator().manual_seed(3))[:4]
    with torch.no_grad():
        return model(ids[:, :-1])


def mean_losses(ranks: list[dict]) -> list[float]:
    # Every rank's loss is the mean over its equal share of the global batch.
    return [sum(r["losses"][i] for r in ranks) / len(ranks) for i in range(len(ranks[0]["losses"]))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ep_fit")


@pytest.fixture(scope="module")
def single(runs: Path) -> list[dict]:
    return fit(runs / "single", "single", 1, "--save", str(runs / "single.ckpt"))


@pytest.fixture(scope="module")
def ddp_ep2(runs: Path) -> list[dict]:
    return fit(runs / "ddp", "ddp", 2, "--save", str(runs / "ddp_ep2.ckpt"), processes=2)


# 4 SGD steps in float32 agree to ~3e-7; a wrong expert gradient moves the second loss by >1e-3.
LOSS_TOL = 1e-5


@pytest.mark.distributed
def test_ddp_ep2_matches_one_process(single: list[dict], ddp_ep2: list[dict]) -> None:
    assert mean_losses(ddp_ep2) == pytest.approx(single[0]["losses"], rel=LOSS_TOL, abs=LOSS_TOL)
    # The steps trained: the rows of the first batch are predicted better than by the initial model (the
    # per-step losses are over other random batches each step, so their trend is noise).
    assert fixed_batch_loss(single[0]["logits"]) < fixed_batch_loss(initial_logits())
    for rank in ddp_ep2:
        torch.testing.assert_close(rank["logits"], single[0]["logits"], rtol=0, atol=1e-5)
        assert rank["expert_shapes"]["model.blocks.0.ffn.experts.w_gate_EDF"] == (2, 16, 8)  # 4 experts over 2


@pytest.fixture(scope="module")
def zero2(runs: Path) -> list[dict]:
    return fit(runs / "zero2", "deepspeed", 2, "--stage", "2", "--save", str(runs / "zero2_ep2"), processes=2)


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_ep2_matches_one_process(runs: Path, single: list[dict], stage: int,
                                                request: pytest.FixtureRequest) -> None:
    ranks = request.getfixturevalue("zero2") if stage == 2 else fit(runs / "zero1", "deepspeed", 2, "--stage", "1",
                                                                      processes=2)
    assert mean_losses(ranks) == pytest.approx(single[0]["losses"], rel=LOSS_TOL, abs=LOSS_TOL)
    for rank in ranks:
        torch.testing.assert_close(rank["logits"], single[0]["logits"], rtol=0, atol=1e-5)
        assert rank["expert_shapes"]["model.blocks.1.ffn.experts.w_out_EFD"] == (2, 8, 16)


@pytest.mark.distributed
def test_an_ep2_checkpoint_loads_with_ep1(runs: Path, ddp_ep2: list[dict]) -> None:
    # Lightning restores the EP=2 checkpoint into a one-process EP=1 model (the fit stops at once).
    resumed = fit(runs / "ep2_to_ep1", "single", 1, "--load", str(runs / "ddp_ep2.ckpt"))
    assert resumed[0]["losses"] == []
    assert resumed[0]["expert_shapes"]["model.blocks.0.ffn.experts.w_gate_EDF"] == (4, 16, 8)
    torch.testing.assert_close(resumed[0]["logits"], ddp_ep2[0]["logits"], rtol=0, atol=1e-6)
    # Lightning's own loader, too: the file holds whole expert tensors.
    # Its hyperparameters hold the plain fields of its MoEConfig; override the expert-parallel size only.
    saved = torch.load(runs / "ddp_ep2.ckpt", map_location="cpu", weights_only=True)["hyper_parameters"]["moe"]
    assert saved["expert_parallel_size"] == 2 and saved["num_experts"] == 4
    model = MoELanguageModel.load_from_checkpoint(runs / "ddp_ep2.ckpt", map_location="cpu", weights_only=False,
                                                  moe={**saved, "expert_parallel_size": 1})
    assert model.model.blocks[0].ffn.experts.w_gate_EDF.shape == (4, 16, 8)


@pytest.mark.distributed
def test_an_ep1_checkpoint_loads_with_ep2(runs: Path, single: list[dict]) -> None:
    resumed = fit(runs / "ep1_to_ep2", "ddp", 2, "--load", str(runs / "single.ckpt"), processes=2)
    for rank in resumed:
        assert rank["expert_shapes"]["model.blocks.0.ffn.experts.w_gate_EDF"] == (2, 16, 8)
        torch.testing.assert_close(rank["logits"], single[0]["logits"], rtol=0, atol=1e-6)


@pytest.mark.distributed
def test_a_deepspeed_ep2_checkpoint_reshards_to_one_process(runs: Path, single: list[dict], zero2: list[dict]) -> None:
    written, stage, saved = runs / "zero2_ep2", "2", zero2[0]
    restored = fit(runs / "ds_to_ep1", "deepspeed", 1, "--stage", stage, "--load", str(written))
    assert restored[0]["expert_shapes"]["model.blocks.0.ffn.experts.w_gate_EDF"] == (4, 16, 8)
    torch.testing.assert_close(restored[0]["logits"], saved["logits"], rtol=0, atol=1e-6)
    # Training on from the resharded weights (ZeRO's own fp32 copy must be refreshed from them) goes as
    # training on from the one-process checkpoint of the same weights (SGD: no optimizer state to lose).
    resumed = fit(runs / "ds_to_ep1_on", "deepspeed", 1, "--stage", stage, "--load", str(written), "--steps", "8")
    reference = fit(runs / "single_on", "single", 1, "--load", str(runs / "single.ckpt"), "--steps", "8")
    assert len(resumed[0]["losses"]) == 4
    assert resumed[0]["losses"] == pytest.approx(reference[0]["losses"], rel=LOSS_TOL, abs=LOSS_TOL)


@pytest.mark.distributed
def test_adam_state_reshards_with_the_weights(runs: Path) -> None:
    # Adam's moments are per expert row: resuming an EP=1 checkpoint with EP=2 must continue exactly as
    # EP=1 does (each rank gets its rows of the moments; rank 1 must not get rank 0's).
    fit(runs / "adam", "single", 1, "--optimizer", "adam", "--save", str(runs / "adam.ckpt"))
    ckpt = str(runs / "adam.ckpt")
    one = fit(runs / "adam_ep1", "single", 1, "--optimizer", "adam", "--load", ckpt, "--steps", "8")
    two = fit(runs / "adam_ep2", "ddp", 2, "--optimizer", "adam", "--load", ckpt, "--steps", "8", processes=2)
    assert len(one[0]["losses"]) == 4
    assert mean_losses(two) == pytest.approx(one[0]["losses"], rel=LOSS_TOL, abs=LOSS_TOL)


@pytest.mark.distributed
def test_bias_updates_and_revival_under_ep2_match_one_process(runs: Path) -> None:
    # BiasOffsetUpdater and DeadExpertDetector(action="revive") reduce loads over all ranks (each rank
    # routes its own tokens to all E experts); revival copies experts across the two ranks' shards.
    one = fit(runs / "callbacks_ep1", "single", 1, "--callbacks")[0]
    two = fit(runs / "callbacks_ep2", "ddp", 2, "--callbacks", processes=2)
    assert one["revived"] > 0 and all(rank["revived"] == one["revived"] for rank in two)
    assert any(bias.abs().sum() > 0 for bias in one["biases"])  # a layer's +-rate steps may cancel out
    for rank in two:
        for bias, expected in zip(rank["biases"], one["biases"], strict=True):
            assert torch.equal(bias, expected)
        torch.testing.assert_close(rank["logits"], one["logits"], rtol=0, atol=1e-5)
    assert mean_losses(two) == pytest.approx(one["losses"], rel=LOSS_TOL, abs=LOSS_TOL)


def test_an_expert_parallel_size_that_does_not_divide_the_processes_stops_before_training(tmp_path: Path) -> None:
    model = MoELanguageModel(
        64, 16, d_model=16, n_layers=1, n_heads=2, d_ff=32,
        moe=MoEConfig(num_experts=4, expert_d_ff=8, expert_parallel_size=2),
    )
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    loader = torch.utils.data.DataLoader([{"input_ids": torch.zeros(17, dtype=torch.long)}] * 4, batch_size=2)
    with pytest.raises(ValueError, match=r"`expert_parallel_size`=2 must divide the number of processes \(1\)"):
        trainer.fit(model, loader)
    assert trainer.global_step == 0
