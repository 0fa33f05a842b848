"""The `lightning-moe` CLI: every shipped YAML parses, the real entry point trains and logs to TensorBoard."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_moe.cli import run_cli
from lightning_moe.layers import MoELayer
from lightning_moe.module import MoELanguageModel

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "cli_configs"
WHOLE = sorted(CONFIGS.glob("*.yaml"))  # complete experiments
CALLBACKS = sorted((CONFIGS / "callbacks").glob("*.yaml"))  # appended with --trainer.callbacks+=FILE
HF = sorted((CONFIGS / "hf").glob("*.yaml"))  # lightning-moe-hf (tests/test_hf_cli.py)
DEEPSPEED = sorted((CONFIGS / "deepspeed").glob("*.yaml"))  # whole experiments (tests/test_deepspeed_cli.py)
FRAGMENTS = sorted(p for p in CONFIGS.glob("*/**/*.yaml") if p not in CALLBACKS + HF + DEEPSPEED)  # on tiny.yaml


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    # LightningCLI warns when both `args` and sys.argv (pytest's here) are present.
    monkeypatch.setattr(sys, "argv", ["lightning-moe"])


def test_configs_exist() -> None:
    names = {p.name for p in WHOLE}
    assert {"tiny.yaml", "dense_baseline.yaml"} <= names
    assert FRAGMENTS, "cli_configs/ should hold fragments such as routers/"


def build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *args: str) -> MoELanguageModel:
    monkeypatch.chdir(tmp_path)  # the trainer's logger would otherwise claim ./runs
    cli = run_cli(list(args), run=False)
    assert isinstance(cli.model, MoELanguageModel)
    return cli.model


@pytest.mark.parametrize("path", WHOLE, ids=lambda p: p.name)
def test_whole_config_parses_and_builds(path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model = build(monkeypatch, tmp_path, "--config", str(path))
    config = yaml.safe_load(path.read_text())["model"]
    moe_layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    moe_every = config.get("moe_every", 1)
    assert len(moe_layers) == (0 if moe_every == 0 else config["n_layers"] // moe_every)
    assert model.model.max_seq_len == config["max_seq_len"]


MODEL_KEYS = {"first_dense_layers", "moe_every", "d_ff"}
MOE_KEYS = {"granularity", "num_shared_experts", "shared_expert_gate"}


@pytest.mark.parametrize("path", FRAGMENTS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_fragment_config_parses_on_top_of_tiny(path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model = build(monkeypatch, tmp_path, "--config", str(CONFIGS / "tiny.yaml"), "--config", str(path))
    model_fragment = yaml.safe_load(path.read_text())["model"]
    fragment = model_fragment.get("moe", {})
    if "router" in fragment:
        router = model.model.moe_layers()[0].router
        assert type(router).__name__ == fragment["router"]["class_path"].rsplit(".", 1)[1]
        for key, value in fragment["router"].get("init_args", {}).items():
            if key == "scorer":
                assert type(router.scorer).__name__ == value["class_path"].rsplit(".", 1)[1]
                for scorer_key, scorer_value in value.get("init_args", {}).items():
                    assert getattr(router.scorer, scorer_key) == scorer_value, scorer_key
            elif key == "expert_bias":
                assert (router.expert_bias_E is not None) == value
            elif key == "vocab_size":
                assert router.expert_of_id_V.numel() == value
            elif key in ("top_k", "capacity_factor"):  # multiplied by tiny.yaml's fine-grained split
                assert getattr(router, key) == value * model.hparams["moe"]["granularity"], key
            else:
                assert getattr(router, key) == value, key
    if "balancers" in fragment:
        names = [b["class_path"].rsplit(".", 1)[1] for b in fragment["balancers"]]
        assert [type(b).__name__ for b in model.model.moe_layers()[0].balancers] == names
        for spec, balancer in zip(fragment["balancers"], model.model.moe_layers()[0].balancers, strict=True):
            for key, value in spec.get("init_args", {}).items():
                assert getattr(balancer, key) == value, key
    for key in MODEL_KEYS & model_fragment.keys():
        assert model.hparams[key] == model_fragment[key], key
    for key in MOE_KEYS & fragment.keys():
        assert model.hparams["moe"][key] == fragment[key], key
    if "granularity" in fragment:
        layer = model.model.moe_layers()[0]
        assert layer.num_experts == 8 * fragment["granularity"]
        assert layer.experts.d_ff == 256 // fragment["granularity"]
        assert layer.router.top_k == 2 * fragment["granularity"]
    if "capacity" in fragment:
        capacity = model.model.moe_layers()[0].capacity
        for key, value in fragment["capacity"]["init_args"].items():
            assert getattr(capacity, key) == value, key


ROUTER_FRAGMENTS = [p for folder in ("routers", "balancing", "architectures")
                    for p in sorted((CONFIGS / folder).glob("*.yaml"))]


@pytest.mark.parametrize("path", ROUTER_FRAGMENTS, ids=lambda p: p.stem)
def test_every_router_config_trains_through_the_cli(path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", str(CONFIGS / "tiny.yaml"), "--config", str(path),
                   "--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "2",
                   "--trainer.logger", "false", "--trainer.callbacks", "null",
                   "--trainer.enable_checkpointing", "false",
                   "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                   "--model.d_model", "64", "--model.n_layers", "2"])
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 4
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["val/loss"])
    stats = cli.model.model.moe_layers()[0].stats
    assert int(stats.tokens_per_expert_E.sum()) > 0


def test_every_callback_config_trains_through_the_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from lightning_moe import callbacks

    monkeypatch.chdir(tmp_path)
    assert {p.stem for p in CALLBACKS} == {"bias_offset_updater", "dead_expert_detector", "routing_drift_monitor",
                                          "routing_entropy_logger", "zloss_scheduler"}
    in_tiny = {c["class_path"] for c in yaml.safe_load((CONFIGS / "tiny.yaml").read_text())["trainer"]["callbacks"]}
    assert {"lightning_moe.callbacks.RoutingMonitor", "lightning_moe.callbacks.DeadExpertDetector"} <= in_tiny
    cli = run_cli(["fit", "--config", str(CONFIGS / "tiny.yaml"),
                   "--config", str(CONFIGS / "routers/sigmoid_bias.yaml"),
                   *[f"--trainer.callbacks+={p}" for p in CALLBACKS
                     if yaml.safe_load(p.read_text())["class_path"] not in in_tiny],
                   "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
                   "--trainer.enable_progress_bar", "false",
                   "--model.d_model", "64", "--model.n_layers", "2"])
    found = {type(c).__name__: c for c in cli.trainer.callbacks}
    for path in CALLBACKS:
        spec = yaml.safe_load(path.read_text())
        name = spec["class_path"].rsplit(".", 1)[1]
        assert isinstance(found[name], getattr(callbacks, name))
    assert found["BiasOffsetUpdater"].num_updates == 3
    assert found["DeadExpertDetector"].batches_in_window == 3
    assert found["ZLossScheduler"].coeff == pytest.approx(2 / 200 * 1e-3)
    biases = [m.router.expert_bias_E for m in cli.model.model.moe_layers()]
    assert all(b.abs().sum() > 0 for b in biases)


def test_scheduled_bias_rate_from_the_command_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", str(CONFIGS / "tiny.yaml"),
                   "--config", str(CONFIGS / "routers/sigmoid_bias.yaml"),
                   "--trainer.callbacks+=lightning_moe.callbacks.BiasOffsetUpdater",
                   "--trainer.callbacks.rate=lightning_moe.callbacks.Schedule",
                   "--trainer.callbacks.rate.kind=cosine", "--trainer.callbacks.rate.total_steps=10",
                   "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
                   "--trainer.enable_progress_bar", "false",
                   "--model.d_model", "64", "--model.n_layers", "2"])
    from lightning_moe.callbacks import BiasOffsetUpdater

    updater = next(c for c in cli.trainer.callbacks if isinstance(c, BiasOffsetUpdater))
    assert updater.rate.kind == "cosine" and updater.rate.total_steps == 10


def test_scorer_chosen_on_the_command_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model = build(monkeypatch, tmp_path, "--config", str(CONFIGS / "tiny.yaml"), "--config",
                  str(CONFIGS / "routers" / "attention.yaml"), "--model.moe.router.scorer.temperature", "0.3",
                  "--model.moe.router.top_k", "3", "--model.moe.granularity", "1")
    router = model.model.moe_layers()[0].router
    assert (type(router.scorer).__name__, router.scorer.temperature, router.top_k) == ("AttentionScorer", 0.3, 3)


@pytest.mark.parametrize("args, message", [
    (["--model.moe.router.top_k", "9"], "top_k"),
    (["--config", str(CONFIGS / "routers" / "group_limited.yaml"), "--model.moe.router.num_groups", "3"], "num_groups"),
    (["--config", str(CONFIGS / "routers" / "expert_choice.yaml"), "--model.moe.router.capacity_factor", "0"],
     "capacity_factor"),
    (["--config", str(CONFIGS / "routers" / "attention.yaml"), "--model.moe.router.scorer.temperature", "0"],
     "temperature"),
    (["--config", str(CONFIGS / "routers" / "expert_choice.yaml"), "--model.moe.router.jitter", "0.1"], "jitter"),
])
def test_bad_router_values_are_usage_errors(args: list[str], message: str, capsys: pytest.CaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(CONFIGS / "tiny.yaml"), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_router_swapped_on_the_command_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model = build(monkeypatch, tmp_path, "--config", str(CONFIGS / "tiny.yaml"),
                  "--model.moe.router.top_k", "1", "--model.moe.router.renormalize", "false",
                  "--model.moe.dispatcher", "loop", "--model.moe.num_experts", "6", "--model.moe.granularity", "1")
    layer = model.model.moe_layers()[0]
    settings = (layer.router.top_k, layer.router.renormalize, layer.num_experts, layer.dispatcher.name)
    assert settings == (1, False, 6, "loop")


def test_triton_dispatcher_is_a_valid_choice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model = build(monkeypatch, tmp_path, "--config", str(CONFIGS / "tiny.yaml"), "--model.moe.dispatcher", "triton")
    assert {layer.dispatcher.name for layer in model.model.moe_layers()} == {"triton"}


@pytest.mark.parametrize("args, message", [
    (["--model.routr.top_k", "1"], "routr"),
    (["--model.moe.dispatcher", "trition"], "trition"),
    (["--model.moe.router.init_args.top_kk", "3"], "top_kk"),
])
def test_config_typo_gives_the_cli_message(args: list[str], message: str, capsys: pytest.CaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(CONFIGS / "tiny.yaml"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err and "Traceback" not in err


def test_yaml_typo_gives_the_cli_message(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_modle: 64\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", str(CONFIGS / "tiny.yaml"), "--config", str(bad)])
    assert "d_modle" in capsys.readouterr().err


def test_old_flat_moe_keys_name_their_new_place(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  d_model: 64\n  granularity: 2\n  router:\n    class_path: lightning_moe.TopKRouter\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(CONFIGS / "tiny.yaml"), "--config", str(old), "--model.num_experts=4",
                 "--model.router.top_k", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for moved in ("--model.num_experts -> --model.moe.num_experts", "--model.router.top_k -> --model.moe.router.top_k",
                  "old.yaml: model.granularity -> model.moe.granularity", "old.yaml: model.router -> model.moe.router"):
        assert moved in err, moved
    assert "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--data.data_files", "nothere.txt"], "`data_files`: no such file 'nothere.txt'"),
    (["--model.moe.router.top_k", "9", "--model.moe.granularity", "1"], r"`top_k` must be an integer in [1, 8], got 9"),
    (["--model.d_model", "0"], "`d_model` must be an integer >= 1, got 0"),
])
def test_bad_values_are_usage_errors(args: list[str], message: str, capsys: pytest.CaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["--config", str(CONFIGS / "tiny.yaml"), *args], run=False)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def read_scalars(log_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_tiny_fits_through_the_real_entry_point(tmp_path: Path) -> None:
    exe = shutil.which("lightning-moe", path=os.path.dirname(sys.executable)) or shutil.which("lightning-moe")
    assert exe, "the lightning-moe console script is not installed"
    result = subprocess.run(
        [exe, "fit", "--config", str(CONFIGS / "tiny.yaml"), "--trainer.max_steps", "8",
         "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "2", "--trainer.log_every_n_steps", "1",
         "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny" / "version_0"
    scalars = read_scalars(run_dir)
    for tag in ("train/loss", "train/lm_loss", "train/aux_loss", "train/z_loss", "val/loss", "val/aux_loss"):
        assert tag in scalars, (tag, sorted(scalars))
    assert len(scalars["train/loss"]) == 8 and len(scalars["val/loss"]) == 2
    # The logged total is the LM loss plus the aux losses, step by step.
    series = (scalars[t] for t in ("train/loss", "train/lm_loss", "train/aux_loss", "train/z_loss"))
    for total, lm, aux, z in zip(*series, strict=True):
        assert total == pytest.approx(lm + aux + z, rel=1e-5)
    assert (run_dir / "config.yaml").is_file()
    assert list((run_dir / "checkpoints").glob("*.ckpt"))


def test_deepseek_v3_config_trains_with_mla_and_mtp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The DeepSeek-V3 recipe, with its own callbacks (the bias updater among them) and TensorBoard:
    MLA, one MTP module, its loss logged and in the total."""
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", str(CONFIGS / "tiny.yaml"),
                   "--config", str(CONFIGS / "architectures" / "deepseek_v3.yaml"),
                   "--trainer.max_steps", "6", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2",
                   "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
                   "--trainer.enable_model_summary", "false", "--model.max_seq_len", "32",
                   "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])
    model = cli.model.model
    assert model.attention == "mla" and model.mtp_depth == 1 and not model.tie_embeddings
    assert [type(b.ffn).__name__ for b in model.blocks] == ["SwiGLU", "MoELayer", "MoELayer", "MoELayer"]
    assert type(model.mtp[0].block.ffn).__name__ == "MoELayer"
    bias = model.moe_layers()[0].router.expert_bias_E
    assert bias is not None and bool(bias.any()), "BiasOffsetUpdater moved the selection bias"
    scalars = read_scalars(tmp_path / "runs" / "deepseek_v3" / "version_0")
    for tag in ("train/mtp_loss", "train/mtp_loss_1", "val/mtp_loss", "train/seq_aux_loss", "val/loss",
                "model/kv_cache_per_token", "model/params_mtp"):
        assert tag in scalars, (tag, sorted(scalars))
    assert scalars["model/kv_cache_per_token"] == [4 * (32 + 16)]
    series = (scalars[t] for t in ("train/loss", "train/lm_loss", "train/seq_aux_loss", "train/mtp_loss"))
    for total, lm, aux, mtp in zip(*series, strict=True):
        assert total == pytest.approx(lm + aux + 0.3 * mtp, rel=1e-5)


def test_upcycle_from_a_dense_checkpoint_through_the_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    quiet = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
             "--trainer.enable_model_summary", "false", "--trainer.limit_val_batches", "2",
             "--trainer.val_check_interval", "4", "--model.d_model", "64", "--model.n_layers", "2",
             "--model.max_seq_len", "32"]
    dense = run_cli(["fit", "--config", str(CONFIGS / "dense_baseline.yaml"), "--trainer.max_steps", "4", *quiet])
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    upcycle_yaml = str(CONFIGS / "upcycle_from_dense.yaml")

    # The YAML's model, upcycled from the checkpoint, computes the dense model's function.
    upcycled = run_cli(["--config", upcycle_yaml, *quiet, "--model.upcycle_from", str(checkpoint)], run=False).model
    upcycled.upcycle(str(checkpoint))
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    dense_model, moe_model = dense.model.eval(), upcycled.eval()
    assert len(moe_model.model.moe_layers()) == 2
    torch.testing.assert_close(moe_model(ids), dense_model(ids), atol=1e-5, rtol=1e-5)

    # Fine-tuning through the CLI upcycles when fitting starts, then trains.
    cli = run_cli(["fit", "--config", upcycle_yaml, *quiet, "--model.upcycle_from", str(checkpoint),
                   "--trainer.max_steps", "4", "--trainer.callbacks", "null",
                   "--trainer.enable_checkpointing", "false"])
    assert cli.model._upcycled and cli.trainer.global_step == 4
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])

    # A checkpoint of other widths is refused before anything changes, naming the keys.
    wrong = run_cli(["--config", upcycle_yaml, *quiet, "--model.d_model", "32"], run=False).model
    expected = r"(?s)does not fit this model.*embed.weight is \[256, 64\] in the checkpoint, the model expects"
    with pytest.raises(ValueError, match=expected):
        wrong.upcycle(str(checkpoint))


def test_the_self_supervised_router_trains_through_the_cli_its_loss_logged_and_scheduled(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", str(CONFIGS / "tiny.yaml"),
                   "--config", str(CONFIGS / "routers/self_supervised.yaml"), "--trainer.callbacks", "null",
                   "--trainer.callbacks+=lightning_moe.callbacks.ZLossScheduler",
                   "--trainer.callbacks.balancer", "ssl_loss", "--trainer.callbacks.schedule", "0.05",
                   "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
                   "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
                   "--trainer.enable_model_summary", "false", "--model.d_model", "64", "--model.n_layers", "2"])
    metrics = cli.trainer.callback_metrics
    scorers = [layer.router.scorer for layer in cli.model.model.moe_layers()]
    assert all(s.coeff == 0.05 for s in scorers)  # scheduled: the YAML's 0.01 replaced
    expected = sum(0.05 * float(s.last_pretext_loss) for s in scorers)
    assert float(metrics["train/ssl_loss"]) == pytest.approx(expected, rel=1e-5)
    parts = ("train/lm_loss", "train/aux_loss", "train/z_loss", "train/ssl_loss")
    assert float(metrics["train/loss"]) == pytest.approx(sum(float(metrics[k]) for k in parts), rel=1e-5)
