"""The self-supervised router, both ways: trained with the model, and pre-trained alone then frozen.

    python examples/self_supervised_router.py [--steps 40] [--log-dir runs]
    tensorboard --logdir runs        # train/ssl_loss next to train/aux_loss, schedule/ssl_loss_coeff

Each MoE layer routes with a ``SelfSupervisedScorer``: a small feature extractor g(x) whose features a
linear routing head turns into expert logits. The extractor learns from an InfoNCE pretext task (the
same token's hidden state under two dropout masks is the positive pair, the batch's other tokens the
negatives), which the scorer brings as its router's own auxiliary loss ``ssl_loss``.

1. Trained together: a tiny MoE language model on the built-in corpus; the pretext loss is logged as
   ``train/ssl_loss``, added to the training loss, and warmed up by ``ZLossScheduler`` like a balancer.
2. Pre-trained alone: each layer's router inputs are collected from that model (``router_inputs``),
   every extractor is pre-trained on them (``scorer.pretrain``) and frozen; training goes on with the
   routing heads learning and the extractors fixed.
"""

from __future__ import annotations

import argparse
import math
import warnings
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_moe.balancing import SwitchAuxLoss
from lightning_moe.callbacks import Schedule, ZLossScheduler
from lightning_moe.data import TextDataModule
from lightning_moe.layers import MoEConfig
from lightning_moe.module import MoELanguageModel
from lightning_moe.routing import SelfSupervisedScorer, TopKRouter


class PretextLosses(L.Callback):
    """The unweighted pretext loss of each layer's scorer, every step."""

    def __init__(self) -> None:
        self.per_step: list[list[float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        scorers = [layer.router.scorer for layer in pl_module.model.moe_layers()]
        if all(s.last_pretext_loss is not None for s in scorers):
            self.per_step.append([float(s.last_pretext_loss) for s in scorers])


def trainer(steps: int, log_dir: Path, name: str, callbacks: list) -> L.Trainer:
    return L.Trainer(max_steps=steps, logger=TensorBoardLogger(log_dir, name=name), log_every_n_steps=5,
                     callbacks=callbacks, limit_val_batches=4, val_check_interval=steps, accelerator="cpu",
                     devices=1, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)


def main(steps: int, log_dir: Path) -> None:
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    L.seed_everything(0)
    scorer = partial(SelfSupervisedScorer, d_feature=32, depth=2, temperature=0.1, coeff=0.01)
    model = MoELanguageModel(
        max_seq_len=64, d_model=64, n_layers=2, n_heads=4, d_ff=128,
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
        moe=MoEConfig(num_experts=8, expert_d_ff=64, router=partial(TopKRouter, top_k=2, scorer=scorer),
                      balancers=[SwitchAuxLoss(0.01)]),
    )
    data = TextDataModule(seq_len=64, batch_size=8)

    # 1. Trained together, the pretext weight warmed up from 0 to 0.01 over the first steps.
    pretext = PretextLosses()
    warmup = ZLossScheduler(Schedule("linear", value=0.01, start_value=0.0, warmup_steps=steps // 4),
                            balancer="ssl_loss")
    fit = trainer(steps, log_dir, "self_supervised_together", [warmup, pretext])
    fit.fit(model, data)
    first, last = pretext.per_step[0], pretext.per_step[-1]
    anchors = min(model.model.moe_layers()[0].router.scorer.num_anchors, 8 * 64)
    print(f"1. trained together, {steps} steps: val/loss {float(fit.callback_metrics['val/loss']):.4f}")
    for i, (a, b) in enumerate(zip(first, last, strict=True)):
        print(f"   layer {i}: pretext (InfoNCE) loss {a:.3f} at the first step with one, {b:.3f} at the last "
              f"(log N = {math.log(anchors):.3f} for features that carry nothing)")

    # 2. Pre-trained alone on the model's own router inputs (held-out plays), then frozen.
    data.setup("validate")
    held_out = torch.cat([batch["input_ids"][:, :-1] for _, batch in zip(range(4), data.val_dataloader(),
                                                                             strict=False)])
    print("2. pre-trained alone on each layer's router inputs (held-out text), then frozen:")
    layers = model.model.moe_layers(include_mtp=False)
    for i, (layer, h_TD) in enumerate(zip(layers, model.model.router_inputs(held_out), strict=True)):
        losses = layer.router.scorer.pretrain(h_TD, steps=100, lr=1e-3, progress=False)
        print(f"   layer {i}: {h_TD.shape[0]} tokens, pretext loss {losses[0]:.3f} -> {losses[-1]:.3f} in 100 steps; "
              f"frozen: {layer.router.scorer.frozen}")
    extractors = [[p.detach().clone() for p in layer.router.scorer.extractor_parameters()]
                  for layer in model.model.moe_layers()]
    heads = [layer.router.scorer.head_EH.detach().clone() for layer in model.model.moe_layers()]
    more = trainer(steps // 2, log_dir, "self_supervised_frozen", [])
    more.fit(model, data)
    moved = [max(float((p - q).abs().max()) for p, q in zip(layer.router.scorer.extractor_parameters(), before,
                                                            strict=True))
             for layer, before in zip(model.model.moe_layers(), extractors, strict=True)]
    head_moved = [float((layer.router.scorer.head_EH.detach() - h).abs().max())
                  for layer, h in zip(model.model.moe_layers(), heads, strict=True)]
    print(f"   {steps // 2} more steps: val/loss {float(more.callback_metrics['val/loss']):.4f}; the frozen extractors "
          f"moved by at most {max(moved):.1e}, the routing heads by {max(head_moved):.1e}")
    print(f"TensorBoard logs: {log_dir}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log-dir", type=Path, default=Path("runs"))
    args = parser.parse_args()
    main(args.steps, args.log_dir)
