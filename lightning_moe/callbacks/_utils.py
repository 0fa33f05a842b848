"""Helpers shared by the callbacks: discovery with a clear error, and sums across ranks."""

from __future__ import annotations

import lightning as L
from torch import Tensor, nn

from lightning_moe.discovery import MoELayerView, find_moe_layers


def discover(pl_module: nn.Module, callback: str) -> list[MoELayerView]:
    """Every MoE layer of ``pl_module``; ``ValueError`` naming the callback when there is none."""
    views = find_moe_layers(pl_module)
    if not views:
        raise ValueError(
            f"{callback} found no MoE layer in {type(pl_module).__name__}: it supports lightning_moe's MoELayer "
            "and Hugging Face Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and DeepSeek-V3 blocks."
        )
    return views


def reduce_sum(trainer: L.Trainer, tensor: Tensor) -> Tensor:
    """The element-wise sum of ``tensor`` over all ranks (the tensor itself on one process).

    Goes through ``trainer.strategy.reduce``, so it follows whatever strategy runs (DDP,
    DeepSpeed, FSDP, single device). Every rank must call it at the same point.
    """
    return trainer.strategy.reduce(tensor.clone(), reduce_op="sum")
