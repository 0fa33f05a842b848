"""Run by test_ddp_drift.py: 2-process DDP on CPU (gloo) with a RoutingDriftMonitor that freezes.

Lightning re-launches this script once per rank. Each rank's validation data differ (seeded by the
rank), so only the broadcast makes the ranks probe the same tokens. Every rank saves what it saw to
``OUT/rank{r}.pt``: its own first validation sequences, the probe and reference it used, the drift
history, what froze, the drift metrics it logged and router and expert weights at the freeze and at
the end.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_moe.callbacks import RoutingDriftMonitor
from lightning_moe.discovery import find_moe_layers
from lightning_moe.layers import MoEConfig
from lightning_moe.module import MoELanguageModel

PROBE_SIZE = 2


class RandomIds(Dataset):
    def __init__(self, n: int, seed: int, seq_len: int = 33) -> None:
        self.ids = torch.randint(0, 256, (n, seq_len), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i]}


class PerRankData(L.LightningDataModule):
    """The same training set (Lightning shards it), validation data that differ per rank."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RandomIds(64, seed=1), batch_size=4)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(RandomIds(8, seed=10 + self.trainer.global_rank), batch_size=4)


class Weights(L.Callback):
    """Router and expert weights right after the first freeze (put it after the monitor) and at the end."""

    def __init__(self, monitor: RoutingDriftMonitor) -> None:
        self.monitor = monitor
        self.at_freeze: dict[str, list[torch.Tensor]] | None = None

    @staticmethod
    def read(pl_module: L.LightningModule) -> dict[str, list[torch.Tensor]]:
        views = find_moe_layers(pl_module)
        return {"routers": [p.detach().clone() for v in views for p in v.router_parameters()],
                "experts": [v.expert_tensors()[0].detach().clone() for v in views]}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if self.at_freeze is None and self.monitor.frozen_layers:
            self.at_freeze = self.read(pl_module)


def main(out: Path) -> None:
    L.seed_everything(0)
    model = MoELanguageModel(
        max_seq_len=32, d_model=32, n_layers=2, n_heads=2, d_ff=64,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
        moe=MoEConfig(num_experts=4, expert_d_ff=32),
    )
    monitor = RoutingDriftMonitor(every_n_steps=2, probe_size=PROBE_SIZE, changed_share_threshold=0.0,
                                  load_kl_threshold=None, entropy_change_threshold=None, action="freeze")
    weights = Weights(monitor)
    data = PerRankData()
    trainer = L.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_steps=6, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1, limit_val_batches=0,
        callbacks=[monitor, weights],
    )
    trainer.fit(model, datamodule=data)
    own = monitor.measure(model)  # this rank's own measurement, no reduction over ranks
    state = monitor.state_dict()
    torch.save({
        "own_val": next(iter(data.val_dataloader()))["input_ids"][:PROBE_SIZE, :-1],
        "probe": monitor.probe_ids,
        "reference": state["reference"],
        "history": monitor.drift_history,
        "own": [[d.changed_share, d.load_kl, d.entropy_change] for d in own],
        "steps": monitor.measurement_steps,
        "frozen": sorted(monitor.frozen_layers),
        "warned_at": monitor.warned_at,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("drift/")},
        "at_freeze": weights.at_freeze,
        "at_end": Weights.read(model),
    }, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
