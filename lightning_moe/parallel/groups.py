"""Expert-parallel process groups: DeepSpeed's (``deepspeed.utils.groups``) when DeepSpeed runs the
job, otherwise ``torch.distributed`` groups with the same layout.

With world size ``W`` and expert-parallel size ``P`` (DeepSpeed's "E + D" layout):

- expert-parallel groups are ``W / P`` blocks of consecutive ranks, ``[0..P-1], [P..2P-1], ...``;
  the E experts of a layer are split evenly over the ranks of a block, and tokens move between
  them by all-to-all;
- expert-data-parallel groups are the ranks that hold the same experts, ``[i, i+P, i+2P, ...]``;
  expert gradients are reduced over these only, all other gradients over the whole world.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch.distributed as dist

from lightning_moe._validate import check_positive_int, divisors


@dataclass(frozen=True)
class ExpertParallelGroups:
    """The groups one rank belongs to for expert-parallel size ``size``.

    Attributes:
        size: ranks per expert-parallel group (P).
        rank: this rank's index inside its expert-parallel group, in ``[0, P)``.
        world_size: all ranks (W).
        group: the expert-parallel group (all-to-all).
        data_group: the expert-data-parallel group (expert gradient reduction), ``W / P`` ranks.
        name: DeepSpeed's name for the groups and for parameters reduced over them,
            ``ep_size_{P}``.
        backend: ``"deepspeed"`` when the groups are DeepSpeed's (its engine then reduces expert
            gradients), ``"torch"`` otherwise (:func:`~lightning_moe.parallel.reduce_expert_gradients`
            does).
    """

    size: int
    rank: int
    world_size: int
    group: object
    data_group: object
    name: str
    backend: str = "torch"

    def rows(self, num_experts: int) -> slice:
        """This rank's rows of a whole ``(E, ...)`` expert tensor: experts ``rank*E/P .. (rank+1)*E/P - 1``."""
        local = num_experts // self.size
        return slice(self.rank * local, (self.rank + 1) * local)


def group_name(size: int) -> str:
    """DeepSpeed's name of the expert groups of size ``size`` (also the ``group_name`` it reads
    from expert parameters)."""
    return f"ep_size_{size}"


def check_expert_parallel_size(size: int, world_size: int, num_experts: int | None = None) -> int:
    """Raise ``ValueError`` unless ``size`` divides ``world_size`` (and ``num_experts``, if given)."""
    check_positive_int("expert_parallel_size", size)
    if world_size % size:
        raise ValueError(
            f"`expert_parallel_size`={size} must divide the number of processes ({world_size}); valid values for "
            f"{world_size} processes are {divisors(world_size)}."
        )
    if num_experts is not None and num_experts % size:
        raise ValueError(
            f"`expert_parallel_size`={size} must divide the number of experts ({num_experts}); valid values are "
            f"{divisors(num_experts)}."
        )
    return size


def _deepspeed_comm_initialized() -> bool:
    # Not imported here when nothing imported it: then it cannot have been initialised.
    ds_dist = sys.modules.get("deepspeed.comm")
    return ds_dist is not None and ds_dist.is_initialized()


_TORCH_GROUPS: dict[tuple[int, int], ExpertParallelGroups] = {}


def expert_parallel_groups(size: int) -> ExpertParallelGroups:
    """This rank's expert-parallel groups of size ``size``, created on first use.

    Collective: every rank must call it, in the same order (``MoELanguageModel.setup`` and
    :func:`~lightning_moe.parallel.setup_expert_parallel` do). Uses DeepSpeed's groups when
    ``deepspeed.comm`` is initialised (the DeepSpeed strategy, ``deepspeed.initialize``), so that
    DeepSpeed's ZeRO optimizer reduces expert gradients over the same groups; otherwise plain
    ``torch.distributed`` groups of the same layout (DDP).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"Expert parallelism (expert_parallel_size={size}) needs torch.distributed to be initialised: run "
            "under a distributed strategy (DDP or DeepSpeed) with several processes."
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    check_expert_parallel_size(size, world)
    if _deepspeed_comm_initialized():
        from deepspeed.utils import groups

        name = group_name(size)
        if name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(size)
        return ExpertParallelGroups(size, groups._get_expert_parallel_rank(name), world,
                                    groups._get_expert_parallel_group(name),
                                    groups._get_expert_data_parallel_group(name), name, "deepspeed")
    key = (size, world)
    if key not in _TORCH_GROUPS:
        ep_group = data_group = None
        for start in range(0, world, size):  # every rank creates every group, in the same order
            ranks = list(range(start, start + size))
            group = dist.new_group(ranks)
            if rank in ranks:
                ep_group = group
        for offset in range(size):
            ranks = list(range(offset, world, size))
            group = dist.new_group(ranks)
            if rank in ranks:
                data_group = group
        _TORCH_GROUPS[key] = ExpertParallelGroups(size, rank % size, world, ep_group, data_group, group_name(size))
    return _TORCH_GROUPS[key]
