"""``MoEDeepSpeedStrategy``: Lightning's DeepSpeed strategy, also on CPU (gloo), and aware of
expert parallelism (MoE parameter groups, resharding checkpoints).

Lightning's ``DeepSpeedStrategy`` refuses a CPU accelerator and reads ``root_device.index``,
which is ``None`` on CPU; three overrides lift that (``setup_environment``, ``setup_distributed``,
``_setup_model_and_optimizer``), so a laptop or CI runs the same DeepSpeed code path (ZeRO 0-2,
expert parallelism) with ``accelerator="cpu"`` as a GPU cluster does with ``"gpu"``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_moe.parallel.expert_parallel import expert_parallel_layers, is_expert_parameter

STATE_KEY = "lightning_moe_state_dict"
"""Where a checkpoint of an expert-parallel model keeps its whole (gathered) model state dict."""
LAYOUT_KEY = "lightning_moe_expert_parallel"
"""Where it records the process count and expert-parallel sizes it was written with."""


def expert_parallel_layout(model: nn.Module, world_size: int) -> dict[str, Any]:
    """The layout a checkpoint is written with: ``{"world_size": W, "sizes": {layer: P}}``."""
    return {"world_size": world_size, "sizes": {name: layer.expert_parallel_size
                                                for name, layer in expert_parallel_layers(model)}}


def disable_cpu_shm_comm() -> None:
    """Skip DeepSpeed's shared-memory CPU all-reduce op, whose first use compiles C++ with g++
    (about a minute; cached in ``TORCH_EXTENSIONS_DIR``); collectives then go through gloo."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class MoEDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` that also runs on CPU with gloo, and handles expert parallelism.

    Takes every argument of Lightning's ``DeepSpeedStrategy`` (``stage``, ``config`` as a dict or
    a path to an editable DeepSpeed JSON, ...), plus:

    Args:
        cpu_shm_comm: on CPU, build and use DeepSpeed's shared-memory all-reduce op (compiled
            with g++ on first use, ~1 minute, then cached). ``False`` uses gloo for everything and
            starts at once (tests, CI).

    With expert-parallel layers (``MoELanguageModel(expert_parallel_size=P)``) it checks that
    the optimizer keeps the expert parameters in DeepSpeed's MoE parameter groups
    (:func:`~lightning_moe.parallel.moe_param_groups`; ``MoELanguageModel`` does), so that ZeRO
    reduces and partitions them over the expert-data-parallel groups. Its checkpoints are
    DeepSpeed's directories (optimizer state included) plus the whole model state dict, experts
    gathered, under ``"lightning_moe_state_dict"``: resuming with the same process count and
    expert-parallel sizes restores everything; with another layout (resharding, e.g. EP=2 to
    EP=1) the model weights are restored and the optimizer state starts afresh, with a warning.
    :func:`load_full_state_dict` reads those weights for any other use.
    """

    strategy_name = "moe_deepspeed"

    def __init__(self, *args: Any, cpu_shm_comm: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cpu_shm_comm = cpu_shm_comm

    @property
    def _on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    def setup_environment(self) -> None:
        if self._on_cpu:
            # DeepSpeedStrategy's check refuses anything but CUDA; DDP's set-up is what follows it.
            DDPStrategy.setup_environment(self)
        else:
            super().setup_environment()

    def setup_distributed(self) -> None:
        if self._on_cpu and not self.cpu_shm_comm:
            disable_cpu_shm_comm()
        if not self._on_cpu:
            super().setup_distributed()
            return
        # As DeepSpeedStrategy, without its device-index validation (CPU devices have no index).
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                                   lr_scheduler: Any = None) -> tuple[Any, Any]:
        import deepspeed

        if optimizer is not None:
            check_moe_param_groups(model, optimizer)
        device_rank = self.root_device.index if self.root_device.index is not None else self.local_rank
        model_parameters = filter(lambda p: p.requires_grad, model.parameters())
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=device_rank), config=self.config, model=model,
            model_parameters=model_parameters, optimizer=optimizer, lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        module = self.lightning_module
        if module is not None and any(True for _ in expert_parallel_layers(module)):
            # Lightning's DeepSpeedStrategy drops "state_dict"; DeepSpeed's own module file has rank 0's
            # expert shards only. Keep the whole state dict (gathered in on_save_checkpoint) as client state.
            checkpoint = {**checkpoint, STATE_KEY: checkpoint["state_dict"],
                          LAYOUT_KEY: expert_parallel_layout(module, self.world_size)}
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        module = self.lightning_module
        saved = _read_client_state(checkpoint_path)
        if module is None or saved is None or LAYOUT_KEY not in saved:
            return super().load_checkpoint(checkpoint_path, weights_only)
        current = expert_parallel_layout(module, self.world_size)
        if saved[LAYOUT_KEY] == current:
            return super().load_checkpoint(checkpoint_path, weights_only)
        rank_zero_warn(
            f"Resharding {checkpoint_path}: it was written with {saved[LAYOUT_KEY]}, this run has {current}. The model "
            "weights are restored (whole expert tensors, resliced); the optimizer state starts afresh.")
        saved.pop("optimizer_states", None)
        return saved

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False  # DeepSpeed restores it in load_checkpoint (or, when resharding, nothing does)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if STATE_KEY in checkpoint:
            # After DeepSpeed's own load (rank 0's expert shards on every rank): the whole tensors, resliced.
            self.lightning_module.load_state_dict(checkpoint[STATE_KEY], strict=strict)
            # ZeRO-1/2 step from their own fp32 copy of the weights: refresh it, or the first step would
            # bring back the weights from before the load.
            refresh = getattr(getattr(self.deepspeed_engine, "optimizer", None), "refresh_fp32_params", None)
            if refresh is not None:
                refresh()
        else:
            super().load_model_state_dict(checkpoint, strict)


def check_moe_param_groups(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Raise ``ValueError`` if an expert-parallel parameter sits in an optimizer group not marked
    ``moe=True`` with its ``name``: ZeRO would reduce its gradient over every rank."""
    expert_params = {id(p) for p in model.parameters() if is_expert_parameter(p)}
    for index, group in enumerate(optimizer.param_groups):
        mixed = [p for p in group["params"] if id(p) in expert_params]
        if mixed and (not group.get("moe") or any(group.get("name") != p.group_name for p in mixed)):
            raise ValueError(
                f"Optimizer parameter group {index} holds expert-parallel parameters but is not a DeepSpeed MoE group "
                "(`moe=True`, `name='ep_size_<P>'`). Build the optimizer from "
                "`lightning_moe.parallel.moe_param_groups(model)` in `configure_optimizers`."
            )


def _client_state_file(checkpoint_path: Any) -> Path | None:
    path = Path(checkpoint_path)
    if not path.is_dir():
        return None
    latest = path / "latest"
    tag = latest.read_text().strip() if latest.is_file() else "checkpoint"
    candidates = sorted((path / tag).glob("mp_rank_*_model_states.pt")) or sorted(
        (path / tag).glob("*mp_rank_00_model_states.pt"))
    return candidates[0] if candidates else None


def _read_client_state(checkpoint_path: Any) -> dict[str, Any] | None:
    file = _client_state_file(checkpoint_path)
    if file is None:
        return None
    return torch.load(file, map_location="cpu", weights_only=False)


def load_full_state_dict(checkpoint_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The whole model state dict (experts unsharded) of a checkpoint written by an expert-parallel
    run: a Lightning ``.ckpt`` file (any strategy) or a :class:`MoEDeepSpeedStrategy` directory.
    Load it into a model of any expert-parallel size with ``load_state_dict``."""
    path = Path(checkpoint_path)
    if path.is_dir():
        state = _read_client_state(path)
        if state is None or STATE_KEY not in state:
            raise ValueError(f"{path} is not a checkpoint directory written by MoEDeepSpeedStrategy for an "
                             f"expert-parallel model (no {STATE_KEY!r} in its client state).")
        return state[STATE_KEY]
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
