"""Run by test_expert_parallel_fit.py, once per process (torchrun) or alone: fit a tiny
MoELanguageModel a few steps under a strategy and record the per-step losses.

Usage: ep_fit_worker.py OUT STRATEGY EP [--stage S] [--save CKPT] [--load CKPT]
  STRATEGY: single (1 process, no strategy), ddp, deepspeed (MoEDeepSpeedStrategy on CPU).
Writes OUT/rank{r}.pt: {"losses": [...], "logits": logits of a fixed batch after training,
"expert_shapes": {...}, "world_size": W}.
"""

import argparse
import functools
import json
import os
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_moe.balancing import ZLoss
from lightning_moe.callbacks import BiasOffsetUpdater, DeadExpertDetector
from lightning_moe.layers import MoEConfig
from lightning_moe.module import MoELanguageModel
from lightning_moe.parallel import MoEDeepSpeedStrategy
from lightning_moe.routing import TopKRouter

GLOBAL_BATCH, SEQ, STEPS, MAX_STEPS, VOCAB = 8, 17, 4, 8, 64


class Sequences(Dataset):
    """This rank's share of every global batch, in order: global batch ``s`` is rows
    ``[s*G, (s+1)*G)`` and rank ``r`` of ``W`` takes its ``r``-th ``G/W`` of them (Lightning's own
    distributed sampler would shuffle)."""

    def __init__(self, rank: int = 0, world: int = 1) -> None:
        ids = torch.randint(0, VOCAB, (GLOBAL_BATCH * MAX_STEPS, SEQ), generator=torch.Generator().manual_seed(3))
        per = GLOBAL_BATCH // world
        self.ids = ids.view(MAX_STEPS, world, per, SEQ)[:, rank].reshape(-1, SEQ)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i]}


class Losses(L.Callback):
    def __init__(self) -> None:
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.losses.append(float(outputs["loss"]))


def sgd(params):  # noqa: ANN001, ANN201 - scale-sensitive: a wrongly scaled expert gradient shows
    return torch.optim.SGD(params, lr=0.5)


def adam(params):  # noqa: ANN001, ANN201 - has per-element state, which must reshard with the weights
    return torch.optim.AdamW(params, lr=0.01)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("strategy", choices=["single", "ddp", "deepspeed"])
    parser.add_argument("ep", type=int)
    parser.add_argument("--stage", type=int, default=1)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--callbacks", action="store_true",
                        help="bias offsets (BiasOffsetUpdater) and dead-expert revival (DeadExpertDetector)")
    parser.add_argument("--save")
    parser.add_argument("--load")
    parser.add_argument("--model-kwargs", default="{}",
                        help="JSON of further MoELanguageModel arguments (e.g. attention, mla, mtp_depth)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    router = functools.partial(TopKRouter, expert_bias=args.callbacks)
    model = MoELanguageModel(
        VOCAB, SEQ, d_model=16, n_layers=2, n_heads=2, d_ff=32, optimizer=sgd if args.optimizer == "sgd" else adam,
        moe=MoEConfig(
            router=router, num_experts=4, expert_d_ff=8, balancers=[ZLoss(0.01)], expert_parallel_size=args.ep,
        ),
        **json.loads(args.model_kwargs),
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.strategy == "single":
        strategy, batch = "auto", GLOBAL_BATCH
    elif args.strategy == "ddp":
        strategy, batch = "ddp", GLOBAL_BATCH // world
    else:
        config = {"zero_optimization": {"stage": args.stage}, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
                  "zero_allow_untested_optimizer": True}
        strategy, batch = MoEDeepSpeedStrategy(config=config, cpu_shm_comm=False), GLOBAL_BATCH // world
    losses = Losses()
    callbacks = [losses]
    if args.callbacks:
        # threshold 0.9 of the fair share over 2-batch windows: some expert is "dead" at every check.
        detector = DeadExpertDetector(window=2, threshold=0.9, action="revive", noise=0.05)
        callbacks += [BiasOffsetUpdater(rate=0.05), detector]
    trainer = L.Trainer(accelerator="cpu", devices=world if args.strategy != "single" else 1, strategy=strategy,
                        max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0,
                        use_distributed_sampler=False)
    loader = DataLoader(Sequences(int(os.environ.get("RANK", "0")), world), batch_size=batch, shuffle=False)
    trainer.fit(model, loader, ckpt_path=args.load)
    if args.save:
        trainer.save_checkpoint(args.save)
    model.eval()
    with torch.no_grad():
        logits = model(Sequences().ids[:4, :-1])
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if "experts" in n}
    biases = [layer.router.expert_bias_E.clone() for layer in model.model.moe_layers() if args.callbacks]
    revived = callbacks[-1].revived if args.callbacks else 0
    torch.save({"losses": losses.losses, "logits": logits, "expert_shapes": shapes, "world_size": world,
                "biases": biases, "revived": revived},
               Path(args.out) / f"rank{trainer.global_rank}.pt")
    if torch.distributed.is_initialized():
        # Leaving gloo's threads to interpreter shutdown sometimes aborts ("terminate called without an
        # active exception") after the work is done.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
