"""What DeepSpeed's engine needs to see to treat our expert-parallel layers as MoE layers, and to
checkpoint their experts in its own per-expert files.

Legend: ``E`` experts of a layer, ``L = E / P`` experts this rank holds (P: expert-parallel size).

DeepSpeed decides whether a model "has MoE layers" by ``isinstance(module, deepspeed.moe.layer.MoE)``,
and only then reduces gradients marked ``allreduce = False`` over the expert-data-parallel groups
(and lets ZeRO partition those parameters' optimizer state over the same groups). A
:class:`DeepSpeedExpertMarker` child, holding no parameters, makes that check true for our layers
without using DeepSpeed's own dispatch.

Checkpoints: DeepSpeed writes each MoE module's state-dict keys
``deepspeed_moe.experts.deepspeed_experts.{local id}.*`` to one file per global expert
(``layer_{moe layer id}_expert_{global id}_mp_rank_00_model_states.pt``, on expert-data-parallel
rank 0 of each expert-parallel rank), and on load reads the files of this rank's global experts
back under the same keys. Inside :func:`deepspeed_expert_files` the marker shows its layer's ``L``
local experts under those keys (``deepspeed_moe.experts.deepspeed_experts.1.w_gate_EDF`` is row 1 of
``experts.w_gate_EDF``) and the layer leaves its grouped ``(L, ...)`` expert tensors out of its
state dict, so DeepSpeed's non-expert file holds no expert rows. Loading always takes such keys back
into the rows of the grouped tensors. Outside the context the state dict is the ordinary one.
Imported only when DeepSpeed runs the job.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from deepspeed.moe.layer import MoE
from torch import nn

from lightning_moe.parallel.groups import expert_parallel_groups, group_name

EXPERT_KEY = "deepspeed_moe.experts.deepspeed_experts"
"""DeepSpeed-MoE's state-dict path of an MoE module's experts; ``{EXPERT_KEY}.{i}.{name}`` is expert ``i``'s
tensor ``name``, the names relative to the layer's ``experts``."""


class DeepSpeedExpertMarker(MoE):
    """A parameter-free stand-in for ``deepspeed.moe.layer.MoE`` inside an expert-parallel
    :class:`~lightning_moe.layers.MoELayer` (attached by
    :func:`~lightning_moe.parallel.shard_experts` when DeepSpeed owns the process groups).

    ``num_local_experts`` is the ``L = E / P`` experts the layer holds on this rank: DeepSpeed
    numbers its per-expert checkpoint files with it (global id = expert-parallel rank * L + local
    id). The marker reads and writes its layer's experts once :meth:`bind` names the layer
    (:func:`deepspeed_expert_files` does).
    """

    def __init__(self, num_experts: int, ep_size: int) -> None:
        nn.Module.__init__(self)  # not MoE.__init__: no gate, no experts, no parameters
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.expert_group_name = group_name(ep_size)
        self.num_local_experts = num_experts // ep_size
        self.enable_expert_tensor_parallelism = False
        self.per_expert_state = False
        """Whether the state dict shows the layer's experts as DeepSpeed's per-expert keys."""

    @property
    def layer(self) -> nn.Module | None:
        """The :class:`~lightning_moe.layers.MoELayer` this marker stands for, once bound."""
        return self.__dict__.get("_layer")

    def bind(self, layer: nn.Module) -> None:
        """Stand for ``layer`` (this marker's parent) in checkpoints: its state dict leaves out the
        grouped expert tensors while :attr:`per_expert_state` is on, and its ``load_state_dict``
        takes DeepSpeed's per-expert keys back into them. Once per layer; a second call does nothing."""
        if self.layer is layer:
            return
        if self.layer is not None:
            raise RuntimeError("This DeepSpeedExpertMarker already stands for another layer.")
        if layer.experts.num_experts != self.num_local_experts:
            raise ValueError(f"The layer holds {layer.experts.num_experts} experts on this rank; the marker was built "
                             f"for num_experts={self.num_experts} over ep_size={self.ep_size} "
                             f"({self.num_local_experts} each).")
        # Kept out of the module tree: the layer is the marker's parent, not its child.
        object.__setattr__(self, "_layer", layer)
        layer.register_state_dict_post_hook(_leave_out_grouped_experts)
        layer.register_load_state_dict_pre_hook(_stack_expert_rows)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by DeepSpeed's engine on every module that has it: make sure the groups exist."""
        if use_data_before_expert_parallel_:
            raise ValueError("lightning_moe's expert parallelism uses DeepSpeed's default 'E + D' group layout; "
                             "`use_data_before_expert_parallel_` is not supported.")
        expert_parallel_groups(self.ep_size)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        if not self.per_expert_state or self.layer is None:
            return
        for name, param in self.layer.expert_parameters():
            rows = param if keep_vars else param.detach()
            for i in range(self.num_local_experts):
                destination[f"{prefix}{EXPERT_KEY}.{i}.{name}"] = rows[i]

    def forward(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("DeepSpeedExpertMarker only marks an expert-parallel MoELayer for DeepSpeed; it has no "
                           "forward.")

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, ep_size={self.ep_size}"


def _marker_of(layer: nn.Module) -> tuple[str, DeepSpeedExpertMarker] | None:
    for name, child in layer.named_children():
        if isinstance(child, DeepSpeedExpertMarker):
            return name, child
    return None


def _leave_out_grouped_experts(layer: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    # State-dict post-hook of a bound layer: its marker carries the experts' rows instead.
    found = _marker_of(layer)
    if found is not None and found[1].per_expert_state:
        for name, _param in layer.expert_parameters():
            state_dict.pop(f"{prefix}experts.{name}", None)


def _stack_expert_rows(layer: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    # Load-state-dict pre-hook of a bound layer, run before its children load: the per-expert keys
    # DeepSpeed read from its files (local ids 0..L-1) -> the grouped (L, ...) tensors.
    found = _marker_of(layer)
    if found is None:
        return
    marker_name, marker = found
    for name, _param in layer.expert_parameters():
        keys = [f"{prefix}{marker_name}.{EXPERT_KEY}.{i}.{name}" for i in range(marker.num_local_experts)]
        if all(key in state_dict for key in keys):
            state_dict[f"{prefix}experts.{name}"] = torch.stack([state_dict.pop(key) for key in keys])


@contextmanager
def deepspeed_expert_files(model: nn.Module) -> Iterator[list[DeepSpeedExpertMarker]]:
    """Within: every :class:`DeepSpeedExpertMarker` of ``model`` is bound to its layer and shows the
    layer's experts as DeepSpeed's per-expert state-dict keys, which the layer leaves out of its own
    (so ``deepspeed_engine.save_checkpoint`` writes one file per expert and none of them elsewhere).
    Yields the markers, in DeepSpeed's MoE-layer order (``named_modules``)."""
    markers = []
    for parent in model.modules():
        found = _marker_of(parent)
        if found is not None:
            found[1].bind(parent)
            markers.append(found[1])
    for marker in markers:
        marker.per_expert_state = True
    try:
        yield markers
    finally:
        for marker in markers:
            marker.per_expert_state = False
