"""Watch routing drift while LoRA fine-tunes a Qwen2-MoE with swapped routers on 100 lines of Shakespeare.

    python examples/routing_drift_finetune.py [--pretrain-steps 300] [--finetune-steps 60] [--log-dir runs]
    tensorboard --logdir runs

The case of the router study: a pre-trained MoE, our routers swapped in for its gates, LoRA
fine-tuning (the routers train with the adapters) on a small slice of Shakespeare, which is where
"the routing distribution can shift dramatically with small datasets". Nothing is downloaded, so
the "pre-trained" model is made here first: a tiny, randomly initialised Qwen2-MoE (vocabulary 256,
fed bytes by ``TextDataModule``) trained briefly on the built-in ``pydoc`` corpus (technical
English: Python's help pages). Then, twice, from the same weights:

1. ``HFMoEFineTune(train="lora", moe=..., init_from_gate=True)``: ``swap_routers`` puts a
   ``TopKRouter`` with a ``LinearScorer`` in every MoE block, started from the trained gate (so it
   routes exactly as the gate did; ``renormalize=False`` like Qwen2-MoE's ``norm_topk_prob=False``),
   and LoRA adapts the attention's query and value projections while the routers train too;
2. on 100 lines of *Hamlet* (a text the pre-training never saw), with a ``RoutingDriftMonitor``
   that measures every 5 steps how each layer's routing of a fixed probe (the fine-tuning data's
   held-out lines) moved since fine-tuning began: once with ``action="warn"``, once with
   ``action="freeze"`` (a router is frozen the first time its layer crosses a threshold).

Each run writes TensorBoard logs (``drift/...`` scalars and the layer x step ``changed_share``
heatmap) under ``--log-dir``, and the script prints per run the fine-tuning losses and each layer's
drift at the end (:meth:`RoutingDriftMonitor.measure` after the last step).
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
import warnings
from pathlib import Path

from lightning_moe.extras import require

require("hf", "examples/routing_drift_finetune.py (a Hugging Face Qwen2-MoE, LoRA)", modules=("transformers", "peft"))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from lightning_moe.balancing.losses import SwitchAuxLoss  # noqa: E402
from lightning_moe.callbacks import RoutingDriftMonitor, RoutingDriftWarning  # noqa: E402
from lightning_moe.data import TextDataModule  # noqa: E402
from lightning_moe.data.corpus import shakespeare_texts  # noqa: E402
from lightning_moe.hf_module import HFMoEFineTune  # noqa: E402
from lightning_moe.layers import MoEConfig  # noqa: E402
from lightning_moe.routing import LinearScorer, TopKRouter  # noqa: E402

SEQ_LEN = 64
QWEN2_MOE = dict(
    model_type="qwen2_moe", vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, max_position_embeddings=SEQ_LEN,
    output_router_logits=True, router_aux_loss_coef=0.01,  # Qwen2-MoE's own balancing loss while pre-training
)
FINETUNE_LINES = 100


def quiet_trainer(**kwargs: object) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, enable_checkpointing=False, enable_model_summary=False,
                     enable_progress_bar=False, **kwargs)


def pretrain(steps: int, out: Path) -> None:
    """Train the tiny Qwen2-MoE (every parameter, its own gates) on the pydoc corpus; save it to ``out``."""
    module = HFMoEFineTune(config=QWEN2_MOE, train="all", optimizer=functools.partial(torch.optim.AdamW, lr=3e-3))
    trainer = quiet_trainer(max_steps=steps, logger=False, limit_val_batches=0)
    started = time.perf_counter()
    trainer.fit(module, TextDataModule(corpus="pydoc", seq_len=SEQ_LEN, batch_size=16))
    print(f"pre-trained {steps} steps on pydoc in {time.perf_counter() - started:.0f} s: train LM loss "
          f"{float(trainer.callback_metrics['train/lm_loss']):.3f}")
    module.model.config.output_router_logits = False  # its gates are swapped out next: our balancer takes over
    module.model.save_pretrained(out)


def hamlet_slice(out: Path) -> Path:
    """100 lines of Hamlet from the first scene on (the cast list skipped), as a text file."""
    lines = shakespeare_texts()["hamlet"].read_text(encoding="utf-8").splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("ACT I."))
    path = out / "hamlet_100_lines.txt"
    path.write_text("".join(lines[start : start + FINETUNE_LINES]), encoding="utf-8")
    return path


def finetune(pretrained: Path, text: Path, action: str, steps: int, log_dir: Path) -> dict:
    """LoRA + swapped routers on ``text``, watched by a RoutingDriftMonitor with ``action``."""
    L.seed_everything(0)
    router = functools.partial(TopKRouter, top_k=2, renormalize=False,
                               scorer=functools.partial(LinearScorer, center_input=False))
    module = HFMoEFineTune(model=str(pretrained), moe=MoEConfig(router=router, balancers=[SwitchAuxLoss(0.01)]),
                           init_from_gate=True, train="lora", lora_r=8,
                           optimizer=functools.partial(torch.optim.AdamW, lr=3e-3))
    data = TextDataModule(data_files=str(text), seq_len=SEQ_LEN, batch_size=8, val_fraction=0.2, test_fraction=0.0)
    monitor = RoutingDriftMonitor(every_n_steps=5, probe_size=8, action=action)
    logger = TensorBoardLogger(log_dir, name="routing_drift_finetune", version=f"action_{action}")
    trainer = quiet_trainer(max_steps=steps, logger=logger, log_every_n_steps=5, callbacks=[monitor],
                            limit_val_batches=0)
    val_before = held_out_loss(module, data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RoutingDriftWarning)
        trainer.fit(module, datamodule=data)
    drift_warnings = [w for w in caught if issubclass(w.category, RoutingDriftWarning)]
    val_loss = held_out_loss(module, data)
    return {"monitor": monitor, "module": module, "warnings": len(drift_warnings), "log_dir": logger.log_dir,
            "steps": trainer.global_step,
            "train_loss": float(trainer.callback_metrics["train/lm_loss"]), "val_before": val_before,
            "val_loss": val_loss}


def held_out_loss(module: HFMoEFineTune, data: TextDataModule) -> float:
    """LM loss on the fine-tuning data's held-out lines (the probe's text)."""
    return quiet_trainer(logger=False).validate(module, datamodule=data, verbose=False)[0]["val/loss"]


def report(action: str, run: dict) -> None:
    monitor: RoutingDriftMonitor = run["monitor"]
    batch, length = monitor.probe_ids.shape
    print(f"\n== action={action!r}: fine-tuning LM loss {run['train_loss']:.3f} (last batch), held-out lines "
          f"{run['val_before']:.3f} -> {run['val_loss']:.3f}; {run['warnings']} drift warnings; probe of {batch} x "
          f"{length} tokens")
    print(f"  drift after the last step ({run['steps']}) against the routing at step {monitor.reference_step}:")
    for layer in monitor.measure(run["module"]):
        when = monitor.warned_at.get(layer.index)
        status = "never crossed a threshold" if when is None else (
            f"crossed at step {when}" + (", router frozen" if layer.index in monitor.frozen_layers else ""))
        print(f"  layer {layer.index}: changed share {layer.changed_share:6.1%}  load KL {layer.load_kl:.4f}  "
              f"entropy change {layer.entropy_change:+.3f} nats  ({status})")
    history = monitor.drift_history[:, :, 0]
    print(f"  changed share per measurement (rows: layers; columns: steps {monitor.measurement_steps}):")
    for i, row in enumerate(history.T.tolist()):
        print(f"    layer {i}: " + " ".join(f"{v:.2f}" for v in row))
    print(f"  TensorBoard: {run['log_dir']}")


def main(pretrain_steps: int, finetune_steps: int, log_dir: Path) -> None:
    started = time.perf_counter()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread (and shares the cores best)
    L.seed_everything(0)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*val_dataloader.*")
    with tempfile.TemporaryDirectory() as tmp:
        pretrained = Path(tmp) / "qwen2_moe_pydoc"
        pretrain(pretrain_steps, pretrained)
        text = hamlet_slice(Path(tmp))
        runs = {action: finetune(pretrained, text, action, finetune_steps, log_dir) for action in ("warn", "freeze")}
    for action, run in runs.items():
        report(action, run)
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=300, help="pre-training steps (default 300)")
    parser.add_argument("--finetune-steps", type=int, default=60, help="fine-tuning steps per run (default 60)")
    parser.add_argument("--log-dir", type=Path, default=Path("runs"), help="TensorBoard root (default runs/)")
    args = parser.parse_args()
    main(args.pretrain_steps, args.finetune_steps, args.log_dir)
