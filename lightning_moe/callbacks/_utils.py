"""Helpers shared by the callbacks: discovery with a clear error, sums across ranks, renamed checkpoint states."""

from __future__ import annotations

from typing import Any

import lightning as L
from torch import Tensor, nn

from lightning_moe.discovery import MoELayerView, find_moe_layers
from lightning_moe.integrations.hf import supported_families


def discover(pl_module: nn.Module, callback: str) -> list[MoELayerView]:
    """Every MoE layer of ``pl_module``; ``ValueError`` naming the callback when there is none."""
    views = find_moe_layers(pl_module)
    if not views:
        raise ValueError(
            f"{callback} found no MoE layer in {type(pl_module).__name__}: it supports lightning_moe's MoELayer "
            f"and Hugging Face {supported_families()} blocks."
        )
    return views


def reduce_sum(trainer: L.Trainer, tensor: Tensor) -> Tensor:
    """The element-wise sum of ``tensor`` over all ranks (the tensor itself on one process).

    Goes through ``trainer.strategy.reduce``, so it follows whatever strategy runs (DDP,
    DeepSpeed, FSDP, single device). Every rank must call it at the same point.
    """
    return trainer.strategy.reduce(tensor.clone(), reduce_op="sum")


def adopt_former_state(checkpoint: dict[str, Any], state_key: str, former_key: str) -> None:
    """Let a checkpoint that saved a callback's state under ``former_key`` restore it under ``state_key``.

    For checkpoints written before the callback's ``state_key`` changed (a rename, or arguments
    added to the key). Call it from ``on_load_checkpoint``, which Lightning runs before it looks
    the states up by ``state_key``; Lightning has by then warned about ``former_key`` as the state
    of a missing callback, but the state is restored all the same.
    """
    states = checkpoint.get("callbacks") or {}
    if state_key not in states and former_key in states:
        states[state_key] = states[former_key]
