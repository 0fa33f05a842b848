"""Run by test_ddp_callbacks.py: 2-process DDP on CPU (gloo) with the callbacks attached.

Lightning re-launches this script once per rank; every rank saves what it saw to
``OUT/rank{r}.pt``: its own per-batch loads, the final biases and weights, the detector's report
and the routing metrics it logged.
"""

import sys
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_moe.callbacks import BiasOffsetUpdater, DeadExpertDetector, RoutingEntropyLogger
from lightning_moe.layers import MoEConfig
from lightning_moe.module import MoELanguageModel
from lightning_moe.routing import TopKRouter


class RandomIds(Dataset):
    def __init__(self, n: int = 64, seq_len: int = 33) -> None:
        self.ids = torch.randint(0, 256, (n, seq_len), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i]}


class Recorder(L.Callback):
    """This rank's own (unreduced) loads per batch, read after the other callbacks."""

    def __init__(self) -> None:
        self.loads: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.loads.append(torch.stack([m.stats.tokens_per_expert_E.clone() for m in pl_module.model.moe_layers()]))


def main(out: Path) -> None:
    L.seed_everything(0)
    model = MoELanguageModel(
        max_seq_len=32, d_model=32, n_layers=2, n_heads=2, d_ff=64,
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
        moe=MoEConfig(num_experts=4, expert_d_ff=32, router=partial(TopKRouter, top_k=2, expert_bias=True)),
    )
    recorder = Recorder()
    detector = DeadExpertDetector(window=3, threshold=1.0, action="warn")  # threshold 1: any below-uniform expert
    trainer = L.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_steps=6, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
        callbacks=[BiasOffsetUpdater(rate=0.05), detector, RoutingEntropyLogger(), recorder],
    )
    trainer.fit(model, DataLoader(RandomIds(), batch_size=4))
    torch.save({
        "loads": recorder.loads,
        "biases": [m.router.expert_bias_E.clone() for m in model.model.moe_layers()],
        "weights": model.model.moe_layers()[0].experts.w_up_EDF.detach().clone(),
        "dead": detector.dead_experts,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("routing/")},
    }, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
