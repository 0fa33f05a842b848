"""Resumes that do what the command asks, bad inputs that stop before training with a usage error, and
the non-finite guard's two actions, in-process (the real signals and kills are in the other files)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from lightning_moe.callbacks import NonFiniteError, NonFiniteGuard, Preemption, StepCheckpoint
from lightning_moe.cli import run_cli
from lightning_moe.module import MoELanguageModel

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "cli_configs" / "tiny.yaml")
SMALL = ["--model.d_model", "32", "--model.n_layers", "2", "--model.max_seq_len", "32", "--data.corpus", "pydoc",
         "--data.batch_size", "4", "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.callbacks", "lightning_moe.callbacks.StepCheckpoint",
         "--trainer.callbacks.every_n_train_steps", "2"]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-moe"])
    monkeypatch.chdir(tmp_path)


def fit(*args: str, steps: int = 2, name: str = "ft") -> object:
    return run_cli(["fit", "--config", TINY, *SMALL, "--trainer.max_steps", str(steps),
                    "--trainer.logger.init_args.name", name, *args])


def usage_error(capsys: pytest.CaptureFixture, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_ckpt_path_last_resumes_the_newest_of_this_run_in_its_own_folder(tmp_path: Path, one_thread: None) -> None:
    fit("--trainer.log_every_n_steps", "1", steps=2)  # runs/ft/version_0
    fit("--trainer.log_every_n_steps", "1", steps=4)  # runs/ft/version_1, the newest of run "ft"
    fit(steps=2, name="other")  # written last, but another run
    cli = fit("--ckpt_path", "last", "--trainer.log_every_n_steps", "1", steps=6)
    assert Path(cli.trainer.ckpt_path) == Path("runs/ft/version_1/checkpoints/last.ckpt")
    assert cli.trainer.global_step == 6
    assert sorted(p.name for p in Path("runs/ft").iterdir()) == ["version_0", "version_1"]  # no version_2
    assert Path(cli.trainer.log_dir) == Path("runs/ft/version_1")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator("runs/ft/version_1", size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(6))  # one continuous curve


def test_ckpt_path_last_without_a_checkpoint_starts_from_scratch(capsys: pytest.CaptureFixture,
                                                                 one_thread: None) -> None:
    cli = fit("--ckpt_path", "last", steps=1)
    assert cli.trainer.ckpt_path is None and cli.trainer.global_step == 1
    assert "no checkpoint of this run" in capsys.readouterr().err


def test_resume_refuses_a_shape_change_and_applies_the_rest(capsys: pytest.CaptureFixture, one_thread: None) -> None:
    fit(steps=2)
    err = usage_error(capsys, "fit", "--config", TINY, *SMALL, "--trainer.logger.init_args.name", "ft",
                      "--model.moe.num_experts", "16", "--ckpt_path", "last")
    assert "model.moe.num_experts = 16 here, 8 in the checkpoint" in err
    assert "was saved by a model of another shape" in err

    # Tied and untied models have the same tensors; resuming one as the other is refused all the same.
    err = usage_error(capsys, "fit", "--config", TINY, *SMALL, "--trainer.logger.init_args.name", "ft",
                      "--model.tie_embeddings", "false", "--ckpt_path", "last")
    assert "model.tie_embeddings = False here, True in the checkpoint" in err
    assert "tied to the embedding in one and not in the other" in err

    cli = fit("--model.optimizer.init_args.lr", "0.001", "--ckpt_path", "last", steps=4)
    err = capsys.readouterr().err
    assert "model.optimizer.init_args.lr = 0.001 here, 0.003 in the checkpoint" in err
    group = cli.trainer.optimizers[0].param_groups[0]
    assert group["initial_lr"] == pytest.approx(0.001)
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs[0] == pytest.approx(0.001) and scheduler.total_steps == 4


def test_a_checkpoint_from_a_defaults_only_command_keeps_its_own_model(one_thread: None) -> None:
    fit(steps=2)
    # No config file: every model setting is at its default, so the checkpoint's (d_model 32...) are used.
    cli = run_cli(["fit", "--data.corpus", "pydoc", "--data.batch_size", "4", "--trainer.max_steps", "3",
                   "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
                   "--trainer.logger", "false", "--ckpt_path", "runs/ft/version_0/checkpoints/last.ckpt"])
    assert cli.model.hparams["d_model"] == 32 and cli.trainer.global_step == 3


def test_incomplete_checkpoints_are_named_with_the_previous_good_one(capsys: pytest.CaptureFixture,
                                                                     one_thread: None) -> None:
    fit(steps=2)
    folder = Path("runs/ft/version_0/checkpoints")
    good = folder / "epoch=0-step=2.ckpt"
    empty = folder / "empty.ckpt"
    empty.write_bytes(b"")
    err = usage_error(capsys, "fit", "--config", TINY, *SMALL, "--ckpt_path", str(empty))
    assert f"`ckpt_path` {empty}: it is empty (0 bytes)" in err
    assert f"resume with --ckpt_path {folder / 'last.ckpt'}" in err or f"--ckpt_path {good}" in err
    truncated = folder / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    err = usage_error(capsys, "fit", "--config", TINY, *SMALL, "--ckpt_path", str(truncated))
    assert f"`ckpt_path` {truncated}: it is incomplete" in err


def test_bad_inputs_are_usage_errors_before_training(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    small = tmp_path / "small.txt"
    small.write_text("To be, or not to be, that is the question.\n" * 11)  # 484 bytes: 14 blocks of 33, 1 val, 1 test
    err = usage_error(capsys, "fit", "--config", TINY, *SMALL, "--data.data_files", str(small),
                      "--data.batch_size", "16")
    assert f"The training text (['{small}']) gives 12 training blocks of seq_len + 1 = 33 tokens; one batch " \
           "needs batch_size = 16" in err

    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    err = usage_error(capsys, "fit", "--config", TINY, *SMALL, "--data.data_files", str(binary))
    assert f"`data_files`: {binary} is not UTF-8 text (byte 128" in err

    err = usage_error(capsys, "fit", "--config", TINY, *SMALL, "--model.optimizer.init_args.lr", "-0.1")
    assert "`model.optimizer.init_args.lr` (--model.optimizer.init_args.lr) must be >= 0, got -0.1" in err


def test_default_root_dir_holds_the_logs_and_checkpoints(tmp_path: Path) -> None:
    cli = run_cli(["--config", TINY, "--trainer.default_root_dir", str(tmp_path / "out")], run=False)
    assert Path(cli.trainer.log_dir).is_relative_to(tmp_path / "out")
    assert Path(cli.trainer.log_dir) == tmp_path / "out" / "runs" / "tiny" / "version_0"


class InfiniteInput(Callback):
    """Makes layer 1's router see infinite hidden states in the given steps, or batches (a real overflow)."""

    def __init__(self, steps: set[int] = frozenset(), batches: set[int] = frozenset()) -> None:
        self.steps, self.batches = steps, batches
        self.batch_idx = -1
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object,
                             batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def overflow(module: torch.nn.Module, args: tuple) -> tuple | None:
            bad = trainer.global_step + 1 in self.steps or self.batch_idx in self.batches
            return (args[0] * float("inf"), *args[1:]) if bad and module.training else None
        pl_module.model.blocks[1].ffn.router.register_forward_pre_hook(overflow)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        self.weights[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}


def _trainer(callbacks: list[Callback], steps: int, **kwargs: object) -> L.Trainer:
    settings = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                "enable_model_summary": False, **kwargs}
    return L.Trainer(max_steps=steps, callbacks=callbacks, **settings)


def _data() -> DataLoader:
    ids = torch.randint(0, 256, (12, 2, 17), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"input_ids": x} for x in ids], batch_size=None)


def test_the_guard_names_the_layer_whose_router_logits_overflowed(one_thread: None) -> None:
    L.seed_everything(0)
    model = MoELanguageModel(d_model=32, n_layers=2, max_seq_len=16)
    injector = InfiniteInput({3})
    with pytest.raises(NonFiniteError, match=r"training step 3.*Layer model\.blocks\.1\.ffn: .* router logits are NaN"):
        _trainer([NonFiniteGuard(), injector], steps=5).fit(model, _data())
    # Stopped before the optimizer step: the weights are those after step 2.
    for name, value in model.named_parameters():
        assert torch.equal(value, injector.weights[2][name]), name


def test_skip_drops_the_step_and_stops_after_max_skipped(one_thread: None) -> None:
    L.seed_everything(0)
    model = MoELanguageModel(d_model=32, n_layers=2, max_seq_len=16)
    guard, injector = NonFiniteGuard(action="skip", max_skipped=1), InfiniteInput({3})
    with pytest.warns(UserWarning, match="Skipping this step"):
        _trainer([guard, injector], steps=5).fit(model, _data())
    assert guard.skipped == 1
    before, after = injector.weights[2], injector.weights[3]
    assert all(torch.equal(before[k], after[k]) for k in before)  # step 3 changed nothing
    assert not all(torch.equal(after[k], injector.weights[4][k]) for k in after)  # step 4 trained

    L.seed_everything(0)
    model = MoELanguageModel(d_model=32, n_layers=2, max_seq_len=16)
    with pytest.raises(NonFiniteError, match=r"1 steps were skipped before it \(max_skipped=1\)"), \
            pytest.warns(UserWarning, match="Skipping this step"):
        _trainer([NonFiniteGuard(action="skip", max_skipped=1), InfiniteInput({2, 4})], steps=5).fit(model, _data())


def test_skip_under_gradient_accumulation_drops_the_whole_window(one_thread: None) -> None:
    L.seed_everything(0)
    model = MoELanguageModel(d_model=32, n_layers=2, max_seq_len=16)
    guard, injector = NonFiniteGuard(action="skip"), InfiniteInput(batches={2})  # first micro-batch of step 2
    with pytest.warns(UserWarning, match="Skipping this step"):
        _trainer([guard, injector], steps=3, accumulate_grad_batches=2).fit(model, _data())
    assert guard.skipped == 1
    after_step_1, after_step_2 = injector.weights[1], injector.weights[2]
    for name, _ in model.named_parameters():  # the window's clean second micro-batch did not step either
        assert torch.equal(after_step_1[name], after_step_2[name]), name
    # The running means the overflowing forward changed were put back; step 3 trained on.
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    assert not all(torch.equal(after_step_2[k], injector.weights[3][k]) for k in after_step_2)


def test_preemption_puts_back_the_handlers_it_found(one_thread: None) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    model = MoELanguageModel(d_model=32, n_layers=1, max_seq_len=16)
    _trainer([Preemption()], steps=2).fit(model, _data())
    assert {s: signal.getsignal(s) for s in before} == before


def test_keep_one_never_leaves_last_dangling(tmp_path: Path, one_thread: None) -> None:
    class Watch(Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
            last = tmp_path / "ckpts" / "last.ckpt"
            assert not last.is_symlink() or last.exists(), "last.ckpt points at a removed file"

    model = MoELanguageModel(d_model=32, n_layers=1, max_seq_len=16)
    checkpoint = StepCheckpoint(every_n_train_steps=1, keep=1, dirpath=str(tmp_path / "ckpts"))
    _trainer([checkpoint, Watch()], steps=4, enable_checkpointing=True).fit(model, _data())
    files = sorted(p.name for p in (tmp_path / "ckpts").iterdir())
    assert files == ["epoch=0-step=4.ckpt", "last.ckpt"]
    assert (tmp_path / "ckpts" / "last.ckpt").resolve().name == "epoch=0-step=4.ckpt"


def test_last_looks_in_a_checkpoint_dirpath_and_names_a_dangling_link(capsys: pytest.CaptureFixture,
                                                                        one_thread: None) -> None:
    ckpts = ["--trainer.callbacks.dirpath", "ckpts"]
    fit(*ckpts, steps=2)
    cli = fit(*ckpts, "--ckpt_path", "last", steps=3)
    assert Path(cli.trainer.ckpt_path) == Path("ckpts/last.ckpt") and cli.trainer.global_step == 3
    for path in Path("ckpts").glob("epoch=*"):
        path.unlink()
    err = usage_error(capsys, "fit", "--config", TINY, *SMALL, *ckpts, "--ckpt_path", "last")
    assert "--ckpt_path last: ckpts/last.ckpt points at epoch=" in err and "which is missing" in err
