"""The everyday loop around `fit`: short CLI errors with suggestions, one run one folder, quiet and truthful
output (no hp_metric, real FLOPs in the summary, no known third-party noise), the bias-updater warning."""

import functools
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelSummary, RichProgressBar

from lightning_moe.callbacks.bias_offset_updater import BiasWithoutUpdaterWarning
from lightning_moe.cli import _quiet_trainer, friendly_parse_error, run_cli
from lightning_moe.data import TextDataModule
from lightning_moe.layers import MoEConfig
from lightning_moe.module import MoELanguageModel
from lightning_moe.routing import RandomRouter

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "cli_configs" / "tiny.yaml")
SMALL = ["--model.d_model", "32", "--model.n_layers", "2", "--model.n_heads", "2", "--model.max_seq_len", "32",
         "--model.moe.num_experts", "4", "--model.moe.granularity", "1", "--model.moe.expert_d_ff", "32",
         "--data.corpus", "pydoc", "--data.batch_size", "4", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false"]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-moe"])


def cli_error(capsys: pytest.CaptureFixture, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", TINY, *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage:" not in err, err  # one message, not the whole usage
    return err


@pytest.mark.parametrize("args, expected", [
    # An abbreviation is not taken for the option it starts (argparse's prefix matching is off).
    (["--model.moe.num_expert", "8"],
     "unknown option `--model.moe.num_expert` (did you mean `--model.moe.num_experts`?)"),
    (["--trainer.max_step", "3"], "unknown option `--trainer.max_step` (did you mean `--trainer.max_steps`?)"),
    # A typo.
    (["--model.moe.num_experst", "8"], "(did you mean `--model.moe.num_experts`?)"),
    (["--model.d_modle", "8"], "(did you mean `--model.d_model`?)"),
])
def test_unknown_options_get_the_closest_valid_name(args: list[str], expected: str, capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    err = cli_error(capsys, *args)
    assert expected in err
    assert "lightning-moe fit --help lists every option" in err
    assert len(err.splitlines()) <= 3


def test_a_wrong_nested_option_names_the_class_and_what_it_accepts(capsys: pytest.CaptureFixture,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    err = cli_error(capsys, "--config", str(ROOT / "cli_configs/routers/expert_choice.yaml"),
                    "--model.moe.router.jitter", "0.1")
    assert ("`--model.moe.router.jitter`: lightning_moe.routing.ExpertChoiceRouter has no option `jitter`; "
            "it accepts capacity_factor, scorer.") in err
    assert "collections.abc.Callable" not in err and "Namespace(" not in err
    err = cli_error(capsys, "--model.moe.router.top_kk", "1")
    assert "has no option `top_kk`" in err and "(did you mean `--model.moe.router.top_k`?)" in err


def test_a_bad_value_is_said_under_its_flag(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    err = cli_error(capsys, "--model.moe.num_experts", "eight")
    assert "`--model.moe.num_experts`: expected int. Got value: eight" in err


def test_a_typo_in_a_config_file_and_a_bad_nested_value(capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  moe:\n    num_expert: 4\n")
    err = cli_error(capsys, "--config", str(typo))
    assert "unknown option `model.moe.num_expert` (in a config file) (did you mean `model.moe.num_experts`?)" in err
    err = cli_error(capsys, "--model.moe.router.top_k", "x")
    assert "`--model.moe.router.top_k`: expected int. Got value: x\n" in err and "Namespace(" not in err


def test_friendly_parse_error_leaves_other_messages_alone() -> None:
    assert friendly_parse_error("The MoE settings moved", ["--a"]) == "The MoE settings moved"
    assert friendly_parse_error("unrecognized arguments: --zzz -3", ["--model.d_model"]) == "unknown option `--zzz`."


def test_resume_validate_test_and_predict_stay_in_the_run_folder(capsys: pytest.CaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tests.test_cli import read_scalars

    monkeypatch.chdir(tmp_path)
    common = ["--config", TINY, *SMALL, "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "1",
              "--trainer.val_check_interval", "4"]
    run_cli(["fit", *common, "--trainer.max_steps", "4"])
    run_dir = tmp_path / "runs" / "tiny" / "version_0"
    err = capsys.readouterr().err
    assert f"Run folder: {Path('runs/tiny/version_0')} (checkpoints in {Path('runs/tiny/version_0/checkpoints')})" \
        in err
    assert f"lightning-moe report {Path('runs/tiny/version_0')}" in err
    run_cli(["fit", *common, "--trainer.max_steps", "8", "--ckpt_path", "last"])
    fit_config = (run_dir / "config.yaml").read_text()
    run_cli(["validate", *common, "--ckpt_path", "last"])
    run_cli(["test", *common, "--ckpt_path", "last", "--trainer.limit_test_batches", "1"])
    run_cli(["predict", *common, "--ckpt_path", "last", "--data.prompts", '["def ", "The "]',
             "--model.generate_max_new_tokens", "4"])  # the CLI adds GeneratedTextWriter itself
    assert (run_dir / "predictions.txt").read_text().count("--- continuation") == 2
    assert [p.name for p in (tmp_path / "runs" / "tiny").iterdir()] == ["version_0"]
    captured = capsys.readouterr()
    assert "dirpath" not in captured.err  # no "checkpoint directory has changed" warning
    assert "Predictions written to" in captured.out
    scalars = read_scalars(run_dir)  # every events file of the folder: one curve for TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    assert sorted(e.step for e in acc.Scalars("train/loss")) == list(range(8))  # one series, no gap, no repeat
    assert "test/loss" in scalars and len(scalars["val/loss"]) == 3  # steps 4 and 8, then validate
    assert "hp_metric" not in scalars
    assert (run_dir / "config.yaml").read_text() == fit_config  # validate and test keep the fit's config
    assert all((run_dir / f"{sub}_config.yaml").is_file() for sub in ("validate", "test", "predict"))


def _tiny_model(**kwargs: object) -> MoELanguageModel:
    return MoELanguageModel(max_seq_len=32, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                            moe=MoEConfig(num_experts=4, expert_d_ff=32, **kwargs))


def _fit(model: MoELanguageModel, tmp_path: Path, callbacks: list, steps: int = 2, summary: bool = True) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=callbacks, default_root_dir=tmp_path,
                        enable_model_summary=summary)
    trainer.fit(model, TextDataModule(corpus="pydoc", seq_len=32, batch_size=4))
    return trainer


class FlopsSummary(ModelSummary):
    """Lightning's summary, recording the total FLOPs it would print."""

    flops: list[int] = []

    @staticmethod
    def summarize(*args: object, total_flops: int, **kwargs: object) -> None:
        FlopsSummary.flops.append(total_flops)


def test_model_summary_counts_real_flops_and_leaves_the_rng_alone(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import Callback

    class RngAtTrainStart(Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.state = torch.random.get_rng_state()

    def run(summary: bool) -> torch.Tensor:
        L.seed_everything(0)
        model = _tiny_model(router=functools.partial(RandomRouter, top_k=2))
        rng = RngAtTrainStart()
        _fit(model, tmp_path, [rng] + ([FlopsSummary()] if summary else []), steps=1, summary=summary)
        assert model.example_input_array is None  # dropped once the summary has it
        return rng.state

    FlopsSummary.flops.clear()
    with_summary = run(True)
    model = _tiny_model()
    per_sequence = model.model.flops_per_token() * 32
    assert FlopsSummary.flops and 0.5 * per_sequence < FlopsSummary.flops[0] < 1.5 * per_sequence
    assert torch.equal(with_summary, run(False))  # the summary's forward drew nothing from the RNG


def test_a_bias_nothing_updates_warns_once(tmp_path: Path) -> None:
    from lightning_moe.callbacks import BiasOffsetUpdater
    from lightning_moe.routing import TopKRouter

    def biased(d: int, e: int) -> TopKRouter:
        return TopKRouter(d, e, top_k=2, score_func="sigmoid", expert_bias=True)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(_tiny_model(router=biased), tmp_path, [], steps=3)
    mine = [w for w in caught if issubclass(w.category, BiasWithoutUpdaterWarning)]
    assert len(mine) == 1
    assert "--trainer.callbacks+=lightning_moe.callbacks.BiasOffsetUpdater" in str(mine[0].message)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(_tiny_model(router=biased), tmp_path, [BiasOffsetUpdater()], steps=1)
        _fit(_tiny_model(), tmp_path, [], steps=1)  # no bias: nothing to say
    assert not [w for w in caught if issubclass(w.category, BiasWithoutUpdaterWarning)]


def test_step_bounded_runs_show_the_epoch_without_a_negative_maximum() -> None:
    bar = RichProgressBar()
    trainer = L.Trainer(max_steps=5, callbacks=[bar], logger=False)
    _quiet_trainer(trainer)
    assert bar._get_train_description(0) == "Epoch 0"
    bounded = RichProgressBar()
    trainer = L.Trainer(max_epochs=3, callbacks=[bounded], logger=False)
    _quiet_trainer(trainer)
    assert bounded._get_train_description(1) == "Epoch 1/2"


def test_the_known_leafspec_deprecation_is_filtered_and_nothing_else() -> None:
    from lightning.pytorch.utilities._pytree import _tree_flatten

    from lightning_moe._warnings import filter_known_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # pytest's own "always" would hide the module filter
        filter_known_warnings()
        _tree_flatten(1)
        warnings.warn("another FutureWarning", FutureWarning, stacklevel=1)
    messages = [str(w.message) for w in caught]
    assert not any("LeafSpec" in m for m in messages)
    assert "another FutureWarning" in messages


@pytest.mark.parametrize("validate_last, accumulate", [(True, 1), (False, 1), (False, 2)])
def test_a_resumed_run_logs_every_step_once(validate_last: bool, accumulate: int, tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_moe.callbacks import StepCheckpoint

    def fit(steps: int, ckpt_path: str | None) -> None:
        L.seed_everything(0)
        trainer = L.Trainer(
            max_steps=steps, log_every_n_steps=1, accumulate_grad_batches=accumulate,
            limit_val_batches=1 if validate_last else 0, val_check_interval=3 * accumulate,
            check_val_every_n_epoch=None, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[StepCheckpoint(every_n_train_steps=100)],
            logger=TensorBoardLogger(tmp_path, name="run", version=0, default_hp_metric=False))
        trainer.fit(_tiny_model(), TextDataModule(corpus="pydoc", seq_len=32, batch_size=4), ckpt_path=ckpt_path)

    fit(3, None)  # the last checkpoint is the one saved when training ends (after a validation, or not)
    fit(6, str(tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt"))
    acc = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    # One point per optimizer step, none skipped, none twice (sorted: both runs are in this process, so their
    # events files may sort either way by name).
    assert sorted(steps) == list(range(6))
