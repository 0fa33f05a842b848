"""`cli_configs/deepspeed/`: every YAML builds an expert-parallel model under `MoEDeepSpeedStrategy`, and
`zero2_ep2.yaml` trains through the real entry point with 2 processes on CPU (torchrun, gloo), writes its
experts one file each, and resumes with `--ckpt_path` exactly where it stopped."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("deepspeed", reason="install the `deepspeed` extra: pip install -e '.[deepspeed]'")

from lightning_moe.cli import run_cli  # noqa: E402

pytestmark = pytest.mark.slow  # README: `-m 'not slow'` leaves these out

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = ROOT / "cli_configs" / "deepspeed"
CONFIGS = sorted(DEEPSPEED.glob("*.yaml"))
# What each process of a launched run needs: DeepSpeed on CPU, one thread each (2 cores), no hub.
ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_scalars(log_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The JSON config's path in zero2_ep2_json.yaml is relative to the repository root, where the
    # README's commands run; LightningCLI warns when both `args` and sys.argv (pytest's) are present.
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["lightning-moe"])
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")


def test_configs_exist() -> None:
    assert {p.name for p in CONFIGS} >= {"zero1_ep2.yaml", "zero2_ep2.yaml", "zero2_ep2_json.yaml"}
    assert (DEEPSPEED / "ds_config.json").is_file()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_builds_an_expert_parallel_deepspeed_run(path: Path, cli_env: None) -> None:
    from lightning_moe.parallel import MoEDeepSpeedStrategy

    spec = yaml.safe_load(path.read_text())
    cli = run_cli(["--config", str(path)], run=False)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, MoEDeepSpeedStrategy)
    init_args = spec["trainer"]["strategy"]["init_args"]
    if "config" in init_args:  # a DeepSpeed JSON: the stage and the rest come from it
        assert strategy.config == json.loads((ROOT / init_args["config"]).read_text())
    else:
        assert strategy.config["zero_optimization"]["stage"] == init_args["stage"]
    ep = spec["model"]["moe"]["expert_parallel_size"]
    assert ep > 1 and cli.model.expert_parallel_size == ep
    assert spec["model"]["moe"]["num_experts"] * spec["model"]["moe"].get("granularity", 1) % ep == 0
    assert cli.trainer.num_devices * cli.trainer.num_nodes % ep == 0
    layers = cli.model.model.moe_layers()
    assert layers and all(layer.expert_parallel_size == ep for layer in layers)


def test_ds_config_json_matches_its_yaml() -> None:
    config = json.loads((DEEPSPEED / "ds_config.json").read_text())
    spec = yaml.safe_load((DEEPSPEED / "zero2_ep2_json.yaml").read_text())
    assert spec["trainer"]["strategy"]["init_args"]["config"] == "cli_configs/deepspeed/ds_config.json"
    assert config["train_micro_batch_size_per_gpu"] == spec["data"]["batch_size"]
    zero = config["zero_optimization"]
    assert zero["stage"] == 2 and zero["contiguous_gradients"] is True
    assert zero["reduce_bucket_size"] > 0 and zero["allgather_bucket_size"] > 0
    assert config["gradient_clipping"] > 0
    assert config["bf16"]["enabled"] is False  # the README says how to turn it on for GPUs
    assert "gradient_accumulation_steps" not in config  # Lightning refuses it: --trainer.accumulate_grad_batches


def test_multi_node_flags_of_the_readme_parse(cli_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # The `deepspeed` launcher recipe: 2 nodes x 8 GPUs, ranks read from the launcher's RANK/WORLD_SIZE.
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "16"}.items():
        monkeypatch.setenv(name, value)
    cli = run_cli(["--config", str(DEEPSPEED / "zero2_ep2.yaml"), "--trainer.num_nodes", "2", "--trainer.devices", "8",
                   "--trainer.accelerator", "cpu",
                   "--trainer.plugins", "lightning.pytorch.plugins.environments.TorchElasticEnvironment"], run=False)
    assert (cli.trainer.num_nodes, cli.trainer.num_devices, cli.trainer.world_size) == (2, 8, 16)
    assert type(cli.trainer.strategy.cluster_environment).__name__ == "TorchElasticEnvironment"


def launch_fit(config: Path, cwd: Path, save_dir: Path, *args: str) -> None:
    """`lightning-moe fit --config config` on 2 processes (torchrun, CPU, gloo), logging under ``save_dir``."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "lightning_moe.cli", "fit", "--config", str(config),
         "--trainer.accelerator", "cpu", "--trainer.log_every_n_steps", "1",
         "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
         "--trainer.strategy.init_args.cpu_shm_comm", "false",
         "--trainer.logger.init_args.save_dir", str(save_dir), *args],
        cwd=cwd, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def zero2_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`zero2_ep2.yaml` as shipped but for a checkpoint every 3 steps."""
    spec = yaml.safe_load((DEEPSPEED / "zero2_ep2.yaml").read_text())
    step_checkpoint, = [c for c in spec["trainer"]["callbacks"] if c["class_path"].endswith(".StepCheckpoint")]
    step_checkpoint["init_args"]["every_n_train_steps"] = 3
    config = tmp_path_factory.mktemp("config") / "zero2_ep2.yaml"
    config.write_text(yaml.safe_dump(spec))
    return config


@pytest.fixture(scope="module")
def zero2_run(zero2_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 steps of ``zero2_config``: a step-3 checkpoint to resume from, and the uninterrupted losses after it.
    Returns the run's version folder."""
    tmp_path = tmp_path_factory.mktemp("zero2_ep2")
    launch_fit(zero2_config, tmp_path, tmp_path / "runs", "--trainer.max_steps", "5")
    return tmp_path / "runs" / "zero2_ep2" / "version_0"


@pytest.mark.distributed
def test_zero2_ep2_trains_with_two_processes(zero2_run: Path) -> None:
    losses = read_scalars(zero2_run)["train/loss"]
    assert len(losses) == 5 and all(0 < loss < 6 for loss in losses), losses
    # A DeepSpeed checkpoint is a directory: ZeRO's partitioned optimizer state, one file per rank, and
    # each MoE layer's experts one file each (2 layers x 8 experts), written by the rank that holds them.
    last = zero2_run / "checkpoints" / "last.ckpt"
    assert (last / "latest").is_file()
    assert len(list(last.glob("*/zero_pp_rank_*_optim_states.pt"))) == 2
    assert len(list(last.glob("*/layer_*_expert_*_mp_rank_00_model_states.pt"))) == 2 * 8
    assert (zero2_run / "config.yaml").is_file()


@pytest.mark.distributed
def test_zero2_ep2_resumes_through_the_cli(zero2_config: Path, zero2_run: Path, tmp_path: Path) -> None:
    # Resuming from the step-3 checkpoint (copied out of the run, so that the resumed run logs to its own
    # folder) restores the weights, ZeRO-2's AdamW state, the scheduler and the data position: steps 4 and 5
    # have the uninterrupted run's losses.
    checkpoint = tmp_path / "step3.ckpt"
    shutil.copytree(zero2_run / "checkpoints" / "epoch=0-step=3.ckpt", checkpoint)
    launch_fit(zero2_config, tmp_path, tmp_path / "runs", "--trainer.max_steps", "5", "--ckpt_path", str(checkpoint))
    resumed = read_scalars(tmp_path / "runs" / "zero2_ep2" / "version_0")["train/loss"]
    uninterrupted = read_scalars(zero2_run)["train/loss"]
    assert resumed == pytest.approx(uninterrupted[3:], rel=1e-5, abs=1e-5), (resumed, uninterrupted)
