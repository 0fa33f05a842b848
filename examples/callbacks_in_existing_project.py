"""lightning_moe's callbacks in someone else's project: a plain LightningModule around Hugging Face Mixtral.

    python examples/callbacks_in_existing_project.py [LOG_DIR]      # default: runs/
    tensorboard --logdir runs

The LightningModule below is what any Lightning user would write around a Hugging Face causal LM;
it knows nothing of lightning_moe. The Mixtral is randomly initialised from a small config (no hub
download) and trained for 60 steps on byte tokens of CPython's pydoc topics. Attaching the
callbacks is the only change: they find Mixtral's sparse MoE blocks themselves and capture the
router's decisions with forward hooks.
"""

import sys
import warnings
from pathlib import Path
from pydoc_data.topics import topics

from lightning_moe.extras import require

require("hf", "examples/callbacks_in_existing_project.py (a Hugging Face Mixtral)", modules=("transformers",))

import lightning as L  # noqa: E402 - after the check that names the missing extra
import torch  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from transformers import MixtralConfig, MixtralForCausalLM  # noqa: E402

from lightning_moe.callbacks import DeadExpertDetector, RoutingMonitor  # noqa: E402
from lightning_moe.discovery import find_moe_layers  # noqa: E402

SEQ_LEN = 64


class ByteWindows(Dataset):
    """Random windows of UTF-8 bytes of the pydoc topics (vocabulary 256)."""

    def __init__(self, num: int = 2048) -> None:
        data = torch.frombuffer(bytearray("\n".join(topics.values()).encode()), dtype=torch.uint8).long()
        starts = torch.randint(0, len(data) - SEQ_LEN, (num,), generator=torch.Generator().manual_seed(0))
        self.windows = torch.stack([data[s : s + SEQ_LEN] for s in starts.tolist()])

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.windows[i]


class MixtralLM(L.LightningModule):
    """The user's own module: Hugging Face Mixtral, its own loss (cross-entropy + router aux loss)."""

    def __init__(self) -> None:
        super().__init__()
        config = MixtralConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=SEQ_LEN,
            output_router_logits=True, router_aux_loss_coef=0.01,
        )
        self.model = MixtralForCausalLM(config)

    def training_step(self, ids: torch.Tensor, batch_idx: int) -> torch.Tensor:
        out = self.model(input_ids=ids, labels=ids)
        self.log("train/loss", out.loss, prog_bar=True)
        return out.loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def main(log_dir: Path) -> None:
    L.seed_everything(0)
    module = MixtralLM()
    logger = TensorBoardLogger(log_dir, name="hf_mixtral_callbacks")
    callbacks = [
        RoutingMonitor(image_every_n_steps=20),
        DeadExpertDetector(window=20, threshold=0.1, action="warn"),
    ]
    trainer = L.Trainer(
        max_steps=60, logger=logger, callbacks=callbacks, log_every_n_steps=5, accelerator="cpu", devices=1,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, DataLoader(ByteWindows(), batch_size=16, shuffle=True))

    print(f"MoE layers found in {type(module.model).__name__}:")
    for view in find_moe_layers(module):
        share = view.stats.load_fraction_E
        print(f"  {view.name} ({view.family}): load share per expert {[round(x, 3) for x in share.tolist()]}")
    metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.startswith("routing/")
               and "/layer" not in k}
    print(f"last logged routing metrics: {metrics}")
    print(f"dead experts in the last window: {callbacks[1].dead_experts or 'none'}")
    print(f"TensorBoard logs (scalars, expert-load histograms, load heatmap): {logger.log_dir}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs"))
