"""MoELanguageModel under a real Trainer: the loss falls, and resuming continues the same trajectory."""

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_moe.data import TextDataModule
from lightning_moe.layers import MoEConfig
from lightning_moe.module import MoELanguageModel
from lightning_moe.optim import WarmupCosineLR


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.losses[trainer.global_step] = outputs["loss"].item()


def tiny_model(total_steps: int = 12) -> MoELanguageModel:
    return MoELanguageModel(
        max_seq_len=32, d_model=32, n_layers=2, n_heads=2, d_ff=64,
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
        lr_scheduler=lambda opt: WarmupCosineLR(opt, warmup_steps=3, total_steps=total_steps),
        moe=MoEConfig(num_experts=4, expert_d_ff=32),
    )


def fit(tmp_path: Path, max_steps: int, ckpt_path: str | None = None) -> dict[int, float]:
    L.seed_everything(0)
    recorder = LossRecorder()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = L.Trainer(
        max_steps=max_steps, limit_train_batches=5, limit_val_batches=2, val_check_interval=3,
        check_val_every_n_epoch=None, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[recorder, saver], accelerator="cpu", devices=1,
    )
    trainer.fit(tiny_model(), TextDataModule(seq_len=32, batch_size=4), ckpt_path=ckpt_path)
    return recorder.losses


@pytest.mark.parametrize("stop_at", [7, 5], ids=["mid-epoch", "end-of-epoch"])
def test_resume_continues_the_same_loss_trajectory(tmp_path: Path, stop_at: int) -> None:
    # Epochs of 5 batches: step 5 ends epoch 0, step 7 is inside epoch 1; validation every 3.
    full = fit(tmp_path / "full", max_steps=12)
    fit(tmp_path / "part", max_steps=stop_at)
    checkpoint = tmp_path / "part" / "ckpt" / f"step={stop_at}.ckpt"
    resumed = fit(tmp_path / "resumed", max_steps=12, ckpt_path=str(checkpoint))
    assert sorted(full) == list(range(1, 13))
    assert sorted(resumed) == list(range(stop_at + 1, 13))
    for step in resumed:
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), f"step {step}"
    assert len(set(full.values())) == 12  # the comparison is over distinct losses, not a constant


def test_training_lowers_validation_loss() -> None:
    L.seed_everything(0)
    model = tiny_model(total_steps=60)
    dm = TextDataModule(seq_len=32, batch_size=8)
    trainer = L.Trainer(max_steps=60, limit_val_batches=4, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", devices=1)
    before = trainer.validate(model, dm, verbose=False)[0]["val/loss"]
    trainer.fit(model, dm)
    after = trainer.validate(model, dm, verbose=False)[0]["val/loss"]
    assert before == pytest.approx(torch.log(torch.tensor(256.0)).item(), abs=0.3)
    assert after < before - 1.5, (before, after)
    assert set(trainer.callback_metrics) >= {"val/loss", "val/aux_loss", "val/z_loss"}


def test_test_runs_on_the_test_split() -> None:
    model = tiny_model()
    dm = TextDataModule(seq_len=32, batch_size=8)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_test_batches=2,
                        accelerator="cpu", devices=1)
    metrics = trainer.test(model, dm, verbose=False)[0]
    assert metrics["test/loss"] == pytest.approx(torch.log(torch.tensor(256.0)).item(), abs=0.3)
    assert dm.train_set is None and dm.val_set is None  # test reads the test plays alone
    assert bytes(dm.test_set[0]["input_ids"].tolist()).startswith(b"AS YOU LIKE IT")
