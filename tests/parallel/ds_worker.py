"""Run in a subprocess by test_deepspeed.py: train a tiny MoETransformer with a DeepSpeed engine
(ZeRO-1, CPU, gloo) and with plain torch AdamW from the same initialisation; print both losses."""

import copy
import json
import os

os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", DS_ACCELERATOR="cpu")
os.environ.setdefault("MASTER_PORT", "29517")

import deepspeed  # noqa: E402
import deepspeed.ops  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lightning_moe.balancing import SwitchAuxLoss, ZLoss  # noqa: E402
from lightning_moe.layers import MoEConfig
from lightning_moe.models import MoETransformer  # noqa: E402


def loss_of(model: MoETransformer, module: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = module(ids[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()) + sum(model.aux_losses().values())


def main() -> None:
    torch.manual_seed(0)
    model = MoETransformer(
        256, max_seq_len=32, d_model=32, n_layers=2, n_heads=2, d_ff=64,
        moe=MoEConfig(num_experts=4, expert_d_ff=16, balancers=[SwitchAuxLoss(0.01), ZLoss(0.001)]),
    )
    reference = copy.deepcopy(model)
    batches = [torch.randint(0, 256, (4, 33))] * 8  # one batch, repeated: the loss must fall

    # No g++ build of DeepSpeed's CPU shared-memory all-reduce (a minute on first use): gloo does it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    # torch's AdamW as DeepSpeed's client optimizer, which ZeRO-1 wraps: the two runs then differ
    # only by what the engine does (partitioning, flattening, gradient reduction).
    config = {"train_batch_size": 4, "zero_optimization": {"stage": 1}}
    client = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    engine, *_ = deepspeed.initialize(model=model, optimizer=client, config=config)
    ds_losses = []
    for ids in batches:
        loss = loss_of(model, engine, ids)
        engine.backward(loss)
        engine.step()
        ds_losses.append(loss.item())

    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.01)
    torch_losses = []
    for ids in batches:
        loss = loss_of(reference, reference, ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        torch_losses.append(loss.item())
    print("RESULT " + json.dumps({"deepspeed": ds_losses, "torch": torch_losses}))


if __name__ == "__main__":
    main()
