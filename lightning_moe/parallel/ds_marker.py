"""What DeepSpeed's engine needs to see to treat our expert-parallel layers as MoE layers.

DeepSpeed decides whether a model "has MoE layers" by ``isinstance(module, deepspeed.moe.layer.MoE)``,
and only then reduces gradients marked ``allreduce = False`` over the expert-data-parallel groups
(and lets ZeRO partition those parameters' optimizer state over the same groups). A
:class:`DeepSpeedExpertMarker` child, holding no parameters, makes that check true for our layers
without using DeepSpeed's own dispatch. Imported only when DeepSpeed runs the job.
"""

from __future__ import annotations

from deepspeed.moe.layer import MoE
from torch import nn

from lightning_moe.parallel.groups import expert_parallel_groups, group_name


class DeepSpeedExpertMarker(MoE):
    """A parameter-free stand-in for ``deepspeed.moe.layer.MoE`` inside an expert-parallel
    :class:`~lightning_moe.layers.MoELayer` (attached by
    :func:`~lightning_moe.parallel.shard_experts` when DeepSpeed owns the process groups).

    ``num_local_experts`` is 0 on purpose: DeepSpeed's per-expert checkpoint files would look
    for its own ``deepspeed_moe.experts`` keys, which our layers do not have; our checkpoints
    carry whole expert tensors instead (``MoELanguageModel.on_save_checkpoint``).
    """

    def __init__(self, num_experts: int, ep_size: int) -> None:
        nn.Module.__init__(self)  # not MoE.__init__: no gate, no experts, no parameters
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.expert_group_name = group_name(ep_size)
        self.num_local_experts = 0
        self.enable_expert_tensor_parallelism = False

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by DeepSpeed's engine on every module that has it: make sure the groups exist."""
        if use_data_before_expert_parallel_:
            raise ValueError("lightning_moe's expert parallelism uses DeepSpeed's default 'E + D' group layout; "
                             "`use_data_before_expert_parallel_` is not supported.")
        expert_parallel_groups(self.ep_size)

    def forward(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("DeepSpeedExpertMarker only marks an expert-parallel MoELayer for DeepSpeed; it has no "
                           "forward.")

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, ep_size={self.ep_size}"
