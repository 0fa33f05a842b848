"""Fine-tune a Hugging Face MoE with our routers: a tiny Qwen2-MoE, attention-scorer routers, routers only.

    python examples/finetune_hf_moe.py [--max-steps 30] [--log-dir runs]
    tensorboard --logdir runs

The Qwen2-MoE is randomly initialised from a small config (no hub download) with a vocabulary
of 256, so the byte-level ``TextDataModule`` and its built-in corpus feed it. ``HFMoEFineTune``
swaps a ``TopKRouter`` with an ``AttentionScorer`` in for the gate of every MoE block
(``swap_routers``; the experts, the shared expert and attention are untouched) and, with
``train="routers"``, trains only those routers, plus a Switch balancing loss. The script prints
what changed: which tensors moved, the language-model loss, and each layer's routing entropy and
expert loads on a held-out batch. For a pre-trained model pass ``model="Qwen/Qwen1.5-MoE-A2.7B"``
(a hub name: it is downloaded) or a local directory instead of ``config``.
"""

from __future__ import annotations

import argparse
import functools
import warnings
from pathlib import Path

from lightning_moe.extras import require

require("hf", "examples/finetune_hf_moe.py (a Hugging Face Qwen2-MoE)", modules=("transformers",))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from lightning_moe.balancing.losses import SwitchAuxLoss  # noqa: E402
from lightning_moe.callbacks import RoutingMonitor  # noqa: E402
from lightning_moe.data import TextDataModule  # noqa: E402
from lightning_moe.discovery import find_moe_layers  # noqa: E402
from lightning_moe.hf_module import HFMoEFineTune  # noqa: E402
from lightning_moe.layers import MoEConfig  # noqa: E402
from lightning_moe.routing import AttentionScorer, TopKRouter  # noqa: E402

SEQ_LEN = 64
QWEN2_MOE = dict(
    model_type="qwen2_moe", vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    num_experts=8, num_experts_per_tok=2, max_position_embeddings=SEQ_LEN,
)


@torch.no_grad()
def probe(module: HFMoEFineTune, batch: dict[str, torch.Tensor]) -> tuple[float, list[tuple[float, list[int]]]]:
    """LM loss on ``batch`` and, per MoE layer, (routing entropy, tokens per expert)."""
    module.eval()
    ids_BS1 = batch["input_ids"]
    logits_BSV = module(ids_BS1[:, :-1])
    loss = F.cross_entropy(logits_BSV.flatten(0, 1).float(), ids_BS1[:, 1:].flatten())
    layers = [(float(v.stats.entropy), v.stats.tokens_per_expert_E.tolist()) for v in find_moe_layers(module)]
    module.train()
    return float(loss), layers


def main(max_steps: int, log_dir: Path) -> None:
    L.seed_everything(0)
    data = TextDataModule(seq_len=SEQ_LEN, batch_size=8)
    data.setup()
    held_out = next(iter(data.val_dataloader()))
    router = functools.partial(TopKRouter, top_k=2, scorer=functools.partial(AttentionScorer, d_key=16,
                                                                            temperature=0.3))
    module = HFMoEFineTune(
        config=QWEN2_MOE, train="routers", optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
        moe=MoEConfig(router=router, balancers=[SwitchAuxLoss(0.01)]),
    )
    before_state = {k: v.clone() for k, v in module.state_dict().items()}
    before = probe(module, held_out)

    trainer = L.Trainer(
        max_steps=max_steps, logger=TensorBoardLogger(log_dir, name="finetune_hf_moe"), log_every_n_steps=5,
        callbacks=[RoutingMonitor(image_every_n_steps=10)], limit_val_batches=0, accelerator="cpu",
        devices=1, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, datamodule=data)
    after = probe(module, held_out)

    moved = [k for k, v in module.state_dict().items() if not torch.equal(v, before_state[k])]
    print(f"\n{len(moved)} of {len(before_state)} tensors changed, all in the swapped routers: "
          f"{all('.gate.router.' in k for k in moved)}")
    for name in moved:
        print(f"  {name}")
    print(f"held-out LM loss: {before[0]:.3f} -> {after[0]:.3f}")
    for i, ((h0, load0), (h1, load1)) in enumerate(zip(before[1], after[1], strict=True)):
        print(f"layer {i}: routing entropy {h0:.3f} -> {h1:.3f} nats; tokens per expert {load0} -> {load1}")
    print(f"TensorBoard logs: {trainer.logger.log_dir}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=30, help="optimizer steps (default 30, a few seconds)")
    parser.add_argument("--log-dir", type=Path, default=Path("runs"), help="TensorBoard root (default runs/)")
    args = parser.parse_args()
    main(args.max_steps, args.log_dir)
