"""Run by test_expert_parallel_fit.py and test_sharded_checkpoint.py, once per process (torchrun) or alone: fit a tiny
MoELanguageModel a few steps under a strategy and record the per-step losses.

Usage: ep_fit_worker.py OUT STRATEGY EP [--stage S] [--save CKPT] [--load CKPT] [--experts E]
                        [--checkpoint-dir DIR] [--start-state] [--record-reads] [--universal]
  STRATEGY: single (1 process, no strategy), ddp, deepspeed (MoEDeepSpeedStrategy on CPU), moe_ddp
  (MoEDDPStrategy: sharded DCP checkpoint directories).
Writes OUT/rank{r}.pt: {"losses": [...], "logits": logits of a fixed batch after training,
"start_logits": the same when training starts (after a checkpoint is restored; with --start-state),
"start_optimizer_state": the optimizer's state then, by parameter name (with --start-state),
"expert_shapes": {...}, "world_size": W, "reads": what DCP read on this rank (with --record-reads:
``(key, saved chunk offset, offsets in it, lengths)`` per read)}.
"""

import argparse
import functools
import json
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.distributed.checkpoint import FileSystemReader
from torch.utils.data import DataLoader, Dataset

from lightning_moe.balancing import ZLoss
from lightning_moe.callbacks import BiasOffsetUpdater, DeadExpertDetector
from lightning_moe.layers import MoEConfig
from lightning_moe.module import MoELanguageModel
from lightning_moe.parallel import MoEDDPStrategy, MoEDeepSpeedStrategy
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


class StartState(L.Callback):
    """The logits of the fixed batch and the optimizer state (by parameter name) when training starts:
    after Lightning restored a checkpoint."""

    def __init__(self) -> None:
        self.logits = None
        self.optimizer_state = None

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        pl_module.eval()
        with torch.no_grad():
            self.logits = pl_module(Sequences().ids[:4, :-1])
        pl_module.train()
        names = {id(p): name for name, p in pl_module.named_parameters()}
        self.optimizer_state = {names[id(p)]: {key: value.clone() for key, value in state.items()}
                                for p, state in trainer.optimizers[0].state.items()}


class RecordingReader(FileSystemReader):
    """A DCP reader that notes each read: the saved chunk (key, global offset) and the box read in it."""

    def __init__(self, path: Path, reads: list) -> None:
        super().__init__(path)
        self.reads = reads

    def read_data(self, plan, planner):  # noqa: ANN001, ANN201
        for item in plan.items:
            offset = item.storage_index.offset
            self.reads.append((item.storage_index.fqn, None if offset is None else tuple(offset),
                               tuple(item.storage_offsets), tuple(item.lengths)))
        return super().read_data(plan, planner)


class RecordingMoEDDPStrategy(MoEDDPStrategy):
    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.reads = []

    def storage_reader(self, path: Path) -> RecordingReader:
        return RecordingReader(path, self.reads)


def sgd(params):  # noqa: ANN001, ANN201 - scale-sensitive: a wrongly scaled expert gradient shows
    return torch.optim.SGD(params, lr=0.5)


def adam(params):  # noqa: ANN001, ANN201 - has per-element state, which must reshard with the weights
    return torch.optim.AdamW(params, lr=0.01)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("strategy", choices=["single", "ddp", "deepspeed", "moe_ddp"])
    parser.add_argument("ep", type=int)
    parser.add_argument("--stage", type=int, default=1)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--callbacks", action="store_true",
                        help="bias offsets (BiasOffsetUpdater) and dead-expert revival (DeadExpertDetector)")
    parser.add_argument("--save")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--checkpoint-dir", help="ModelCheckpoint every step there: top-1 and last")
    parser.add_argument("--start-state", action="store_true", help="record logits and optimizer state at train start")
    parser.add_argument("--record-reads", action="store_true", help="moe_ddp: note what DCP reads on each rank")
    parser.add_argument("--load")
    parser.add_argument("--universal", action="store_true",
                        help="deepspeed: --load is a converted universal checkpoint (load_universal=True)")
    parser.add_argument("--model-kwargs", default="{}",
                        help="JSON of further MoELanguageModel arguments (e.g. attention, mla, mtp_depth)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    router = functools.partial(TopKRouter, expert_bias=args.callbacks)
    model = MoELanguageModel(
        VOCAB, SEQ, d_model=16, n_layers=2, n_heads=2, d_ff=32, optimizer=sgd if args.optimizer == "sgd" else adam,
        moe=MoEConfig(
            router=router, num_experts=args.experts, expert_d_ff=8, balancers=[ZLoss(0.01)],
            expert_parallel_size=args.ep,
        ),
        **json.loads(args.model_kwargs),
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.strategy == "single":
        strategy, batch = "auto", GLOBAL_BATCH
    elif args.strategy == "ddp":
        strategy, batch = "ddp", GLOBAL_BATCH // world
    elif args.strategy == "moe_ddp":
        strategy = RecordingMoEDDPStrategy() if args.record_reads else "moe_ddp"
        batch = GLOBAL_BATCH // world
    else:
        config = {"zero_optimization": {"stage": args.stage}, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
                  "zero_allow_untested_optimizer": True}
        strategy = MoEDeepSpeedStrategy(config=config, cpu_shm_comm=False, load_universal=args.universal)
        batch = GLOBAL_BATCH // world
    losses = Losses()
    callbacks = [losses]
    if args.callbacks:
        # threshold 0.9 of the fair share over 2-batch windows: some expert is "dead" at every check.
        detector = DeadExpertDetector(window=2, threshold=0.9, action="revive", noise=0.05)
        callbacks += [BiasOffsetUpdater(rate=0.05), detector]
    start = StartState()
    if args.start_state:
        callbacks.append(start)
    if args.checkpoint_dir:
        callbacks.append(ModelCheckpoint(args.checkpoint_dir, every_n_train_steps=1, save_top_k=1, save_last=True))
    trainer = L.Trainer(accelerator="cpu", devices=world if args.strategy != "single" else 1, strategy=strategy,
                        max_steps=args.steps, logger=False, enable_checkpointing=bool(args.checkpoint_dir),
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                        num_sanity_val_steps=0, use_distributed_sampler=False)
    loader = DataLoader(Sequences(int(os.environ.get("RANK", "0")), world), batch_size=batch, shuffle=False)
    trainer.fit(model, loader, ckpt_path=args.load)
    if args.save:
        trainer.save_checkpoint(args.save)
    model.eval()
    with torch.no_grad():
        logits = model(Sequences().ids[:4, :-1])
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if "experts" in n}
    biases = [layer.router.expert_bias_E.clone() for layer in model.model.moe_layers() if args.callbacks]
    revived = detector.revived if args.callbacks else 0
    torch.save({"losses": losses.losses, "logits": logits, "expert_shapes": shapes, "world_size": world,
                "biases": biases, "revived": revived, "start_logits": start.logits,
                "start_optimizer_state": start.optimizer_state,
                "reads": getattr(trainer.strategy, "reads", None)},
               Path(args.out) / f"rank{trainer.global_rank}.pt")
    if torch.distributed.is_initialized():
        # Leaving gloo's threads to interpreter shutdown sometimes aborts ("terminate called without an
        # active exception") after the work is done.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
