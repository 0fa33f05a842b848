"""Expert parallelism and DeepSpeed: expert-parallel groups, the dropless all-to-all dispatch,
expert-gradient reduction, resharding checkpoints, a DDP strategy writing sharded checkpoints, and a
DeepSpeed strategy that also runs on CPU.

The strategies (``MoEDDPStrategy``, ``consolidate_checkpoint``; ``MoEDeepSpeedStrategy``,
``load_full_state_dict``, ``to_universal_checkpoint``) load Lightning, and
``DeepSpeedMoELayer`` (DeepSpeed-MoE's own layer with our router as its gate) DeepSpeed, on first
use, so the plain-PyTorch parts import without either.
"""

from typing import Any

from lightning_moe.parallel.all_to_all import all_to_all
from lightning_moe.parallel.expert_parallel import (
    ExpertParallelDispatcher,
    expert_parallel_layers,
    gather_expert_optimizer_state,
    gather_expert_state_dict,
    is_expert_parameter,
    moe_param_groups,
    reduce_expert_gradients,
    setup_expert_parallel,
    shard_experts,
    slice_expert_optimizer_state,
)
from lightning_moe.parallel.groups import ExpertParallelGroups, check_expert_parallel_size, expert_parallel_groups

__all__ = [
    "DeepSpeedMoELayer",
    "all_to_all", "check_expert_parallel_size", "ExpertParallelDispatcher", "expert_parallel_groups",
    "expert_parallel_layers", "ExpertParallelGroups", "gather_expert_optimizer_state", "gather_expert_state_dict",
    "is_expert_parameter", "load_full_state_dict", "moe_param_groups", "MoEDDPStrategy", "MoEDeepSpeedStrategy",
    "consolidate_checkpoint", "to_universal_checkpoint",
    "reduce_expert_gradients", "setup_expert_parallel", "shard_experts", "slice_expert_optimizer_state",
]


def __getattr__(name: str) -> Any:
    if name in ("MoEDDPStrategy", "consolidate_checkpoint"):
        from lightning_moe.parallel import ddp_strategy  # registers the strategy name "moe_ddp"

        return getattr(ddp_strategy, name)
    if name in ("MoEDeepSpeedStrategy", "load_full_state_dict", "to_universal_checkpoint"):
        from lightning_moe.parallel import strategy

        return getattr(strategy, name)
    if name == "DeepSpeedMoELayer":
        from lightning_moe.parallel.deepspeed_moe import DeepSpeedMoELayer

        return DeepSpeedMoELayer
    raise AttributeError(f"module 'lightning_moe.parallel' has no attribute {name!r}")
