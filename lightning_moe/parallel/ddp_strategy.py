"""``MoEDDPStrategy``: Lightning's DDP strategy writing sharded checkpoints with
``torch.distributed.checkpoint`` (DCP), each rank its own expert rows; and the offline readers of such
checkpoints (:func:`sharded_state_dict`, :func:`consolidate_checkpoint`).

Legend: ``E`` experts of a layer, ``P`` its expert-parallel size, ``L = E / P`` experts held by each
rank, ``W`` processes, ``Q = W / P`` ranks holding the same experts (an expert-data-parallel group).

A checkpoint is a directory (the ``filepath`` Lightning gives, e.g. ``last.ckpt/``) holding:

- ``__{r}_0.distcp``: what rank ``r`` writes: its ``L`` rows of every expert weight and of their
  per-element optimizer state (Adam's ``exp_avg``/``exp_avg_sq``, a momentum buffer), and its share of
  the replicated tensors (dense weights, their optimizer state, step counts), each of which DCP writes
  once, from one rank. With ``Q > 1`` one rank of each expert-data-parallel group writes a row.
- ``.metadata``: DCP's index: every tensor's whole shape and which file holds which chunk of it.
- ``meta.pt``: the rest of the Lightning checkpoint (loops, callbacks' state, hyperparameters, lr
  schedulers, the optimizers' parameter groups and parameter names), written by rank 0.

Inside the DCP files the model's state dict is under ``state_dict.<name>`` and optimizer ``n``'s
per-parameter state under ``optimizer_{n}.state.<parameter name>.<key>`` (keyed by name, not index).
Expert tensors are saved as DTensors over a ``(Q, P)`` device mesh built from the expert-data-parallel
and expert-parallel groups (:mod:`lightning_moe.parallel.groups`: rows are the consecutive blocks of
``P`` ranks, columns the strides), placed ``(Replicate(), Shard(0))``: DCP records each rank's rows as
one chunk at its global offset. Loading gives DCP a template whose expert entries are this run's local
rows (as DTensors of the same kind) and DCP's planner reads only the saved chunks that overlap them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from torch import Tensor, nn
from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from lightning_moe.layers.moe_layer import MoELayer
from lightning_moe.parallel.expert_parallel import sharded_expert_parameters
from lightning_moe.parallel.groups import ExpertParallelGroups

META_FILE = "meta.pt"
"""The small file of a sharded checkpoint, written by rank 0 (Lightning's own name for it)."""
OPTIMIZERS_KEY = "lightning_moe_optimizers"
"""Where ``meta.pt`` keeps each optimizer's parameter groups, parameter names and non-tensor state."""
LAYOUT_KEY = "lightning_moe_sharded"
"""Where ``meta.pt`` records the process count and expert-parallel sizes the checkpoint was written with."""
PARAM_NAMES_KEY = "param_names"
"""In the optimizer states :meth:`MoEDDPStrategy.load_checkpoint` returns: the name of each parameter index."""
#: Temporary folders are ``.<name>.tmp-<pid>`` beside the destination, as ``StepCheckpoint`` writes its
#: files (its ``remove_orphans`` clears those a kill left).
TEMP_INFIX = ".tmp-"


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a checkpoint directory written by :class:`MoEDDPStrategy`."""
    path = Path(path)
    return path.is_dir() and (path / META_FILE).is_file() and (path / ".metadata").is_file()


def parameter_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name (in ``module``) of each parameter of ``optimizer``, in the order of its state indices."""
    names = {id(p): name for name, p in module.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError(f"The optimizer's parameters {missing} are not parameters of {type(module).__name__}: "
                         "MoEDDPStrategy checkpoints optimizer state by parameter name.")
    return [names[id(p)] for p in params]


def _as_shard(local: Tensor, groups: ExpertParallelGroups, meshes: dict[tuple[int, str], DeviceMesh]) -> DTensor:
    """``local`` (this rank's rows) as a DTensor of the whole ``(E, ...)`` tensor: ``Shard(0)`` over the
    expert-parallel group, ``Replicate()`` over the expert-data-parallel one. ``meshes`` caches the
    ``(Q, P)`` meshes, built over the existing groups (no new process group, no collective)."""
    key = (groups.size, local.device.type)
    if key not in meshes:
        ranks_QP = torch.arange(groups.world_size).view(-1, groups.size)  # row: an expert-parallel group
        meshes[key] = DeviceMesh.from_group([groups.data_group, groups.group], local.device.type, mesh=ranks_QP,
                                            mesh_dim_names=("expert_data", "expert"))
    return DTensor.from_local(local, meshes[key], [Replicate(), Shard(0)], run_check=False)


class MoEDDPStrategy(DDPStrategy):
    """``DDPStrategy`` whose checkpoints are sharded: no rank ever holds all experts, at save or load.

    Takes every argument of Lightning's ``DDPStrategy``; ``--trainer.strategy moe_ddp`` chooses it
    (registered under that name when ``lightning_moe.cli`` or this module is imported).

    A checkpoint is a directory written with ``torch.distributed.checkpoint``: each rank writes its own
    rows of every expert weight and of their optimizer state (Adam's moments), the replicated dense
    weights and their optimizer state are written once, and rank 0 writes the rest of the Lightning
    checkpoint (loops, callbacks, hyperparameters, lr schedulers) to ``meta.pt``; see
    :mod:`lightning_moe.parallel.ddp_strategy` for the files. ``ModelCheckpoint`` works as with files
    (``save_last``, removal of old top-k directories).

    Resharding: resume the directory (``ckpt_path``) with another ``moe.expert_parallel_size`` or process
    count; each rank reads only the saved chunks that overlap its own expert rows, weights and
    optimizer state alike, and training continues as it would have at the saved layout. A
    single-file ``.ckpt`` (written under plain ``ddp``, whole experts) also loads.

    Export: :func:`~lightning_moe.parallel.load_full_state_dict` reads a directory, offline and in one
    process, into the whole model state dict (experts unsharded); :func:`consolidate_checkpoint` into a
    whole Lightning checkpoint, which ``torch.save`` writes as one ``.ckpt`` file that any strategy,
    ``load_from_checkpoint`` and any expert-parallel size load.
    """

    strategy_name = "moe_ddp"
    writes_expert_shards = True
    """``MoELanguageModel.on_save_checkpoint`` leaves the expert shards as they are (no gathering)."""

    def storage_writer(self, path: Path) -> dcp.StorageWriter:
        """The DCP writer of a checkpoint directory (override to write elsewhere)."""
        return dcp.FileSystemWriter(path, single_file_per_rank=True)

    def storage_reader(self, path: Path) -> dcp.StorageReader:
        """The DCP reader of a checkpoint directory (override to read elsewhere, or to watch what is read)."""
        return dcp.FileSystemReader(path)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """Write ``checkpoint`` as a directory at ``filepath``; collective (every rank calls it, as
        ``Trainer.save_checkpoint`` does). Written beside the destination, then the previous checkpoint
        is renamed aside, the new one into place, and the previous one removed: a kill or an error while
        writing leaves the previous checkpoint whole (and a failed write removes its temporary folder)."""
        if storage_options is not None:
            raise TypeError("MoEDDPStrategy.save_checkpoint takes no `storage_options`: it writes with "
                            "torch.distributed.checkpoint, not with a CheckpointIO plugin.")
        if not _is_local_file_protocol(filepath):
            raise ValueError(f"MoEDDPStrategy writes checkpoints to local (or mounted) folders; got {filepath!r}.")
        path = Path(self.broadcast(str(filepath)))
        temp = Path(self.broadcast(str(path.with_name(f".{path.name}{TEMP_INFIX}{os.getpid()}"))))
        tensors, meta = self._split_checkpoint(checkpoint)
        if self.is_global_zero:
            shutil.rmtree(temp, ignore_errors=True)
            temp.mkdir(parents=True)
        self.barrier("MoEDDPStrategy.save_checkpoint")
        try:
            # Returns on every rank once .metadata is written.
            dcp.save(tensors, storage_writer=self.storage_writer(temp))
            if self.is_global_zero:
                torch.save(meta, temp / META_FILE)
                # The previous checkpoint is moved aside, not removed, until the new one is in place.
                old = path.with_name(f".{path.name}.old{TEMP_INFIX}{os.getpid()}")
                if path.exists() or path.is_symlink():
                    os.replace(path, old)
                os.replace(temp, path)
                _remove(old)
        except BaseException:
            if self.is_global_zero:
                shutil.rmtree(temp, ignore_errors=True)
            raise

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            _remove(Path(filepath))

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """The checkpoint at ``checkpoint_path`` as Lightning restores it: ``state_dict`` and
        ``optimizer_states`` hold this rank's expert rows, read from a directory without reading
        other ranks' rows; collective. A ``.ckpt`` file loads as under ``DDPStrategy``."""
        path = Path(self.broadcast(str(checkpoint_path)))
        if not is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only)
        meta = torch.load(path / META_FILE, map_location="cpu", weights_only=weights_only)
        reader = self.storage_reader(path)
        saved = reader.read_metadata().state_dict_metadata
        module = self.lightning_module
        if getattr(module, "strict_loading", True):
            # DCP reads only the keys the template asks for: report the others as load_state_dict(strict=True) would.
            own = set(module.state_dict())
            unexpected = sorted(key.removeprefix("state_dict.") for key in saved
                                if key.startswith("state_dict.") and key.removeprefix("state_dict.") not in own)
            if unexpected:
                raise RuntimeError(f"Error loading {path}: unexpected key(s) in state_dict: "
                                   f"{', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''} "
                                   f"({len(unexpected)} in all). Load it into the model it was saved from, or set "
                                   "`strict_loading = False` on the LightningModule to ignore them.")
        template = self._load_template(meta.get(OPTIMIZERS_KEY, []), saved)
        dcp.load(template, storage_reader=reader)
        return _join(meta, _to_local(template), names=True)

    def load_optimizer_state_dict(self, checkpoint: dict[str, Any]) -> None:
        states = []
        for n, (optimizer, state) in enumerate(zip(self.optimizers, checkpoint["optimizer_states"], strict=False)):
            saved = state.get(PARAM_NAMES_KEY)
            if saved is not None and saved != parameter_names(self.lightning_module, optimizer):
                raise ValueError(f"Optimizer {n} of the checkpoint holds other parameters, or in another order, than "
                                 f"this run's optimizer {n}: build it from the same parameter groups "
                                 "(MoELanguageModel uses `moe_param_groups`).")
            states.append({key: value for key, value in state.items() if key != PARAM_NAMES_KEY})
        super().load_optimizer_state_dict({**checkpoint, "optimizer_states": states})

    def _split_checkpoint(self, checkpoint: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(tensors for DCP, the rest for meta.pt)``; expert shards become DTensors."""
        module = self.lightning_module
        shards = sharded_expert_parameters(module)
        meshes: dict[tuple[int, str], DeviceMesh] = {}

        def place(name: str, value: Any) -> Any:
            layer = shards.get(name)
            if layer is None or not isinstance(value, Tensor) or value.dim() == 0:
                return value  # replicated on every rank: DCP writes it once
            if value.shape[0] != layer.experts.num_experts:
                raise ValueError(f"`{name}` holds {layer.experts.num_experts} expert rows on this rank, but a tensor "
                                 f"saved with it has shape {tuple(value.shape)}: only per-row state can be sharded.")
            return _as_shard(value, layer.expert_parallel, meshes)

        tensors = {"state_dict": {name: place(name, value) for name, value in checkpoint["state_dict"].items()}}
        meta = {key: value for key, value in checkpoint.items() if key not in ("state_dict", "optimizer_states")}
        if "optimizer_states" in checkpoint:
            meta[OPTIMIZERS_KEY] = []
            for n, (optimizer, state) in enumerate(zip(self.optimizers, checkpoint["optimizer_states"], strict=True)):
                layout, by_name = _split_optimizer_state(state, parameter_names(module, optimizer))
                tensors[f"optimizer_{n}"] = {"state": {name: {key: place(name, value) for key, value in entry.items()}
                                                       for name, entry in by_name.items()}}
                meta[OPTIMIZERS_KEY].append(layout)
        sizes = {name: layer.expert_parallel_size for name, layer in shards.items()}
        meta[LAYOUT_KEY] = {"world_size": self.world_size, "expert_parallel_sizes": sizes}
        return tensors, meta

    def _load_template(self, layouts: list[dict[str, Any]], saved: dict[str, Any]) -> dict[str, Any]:
        """What DCP fills: this model's state dict (expert entries: DTensors of this rank's rows) and each
        saved optimizer's tensor state, shaped from the saved whole shapes, expert rows sharded alike."""
        module = self.lightning_module
        shards = sharded_expert_parameters(module)
        meshes: dict[tuple[int, str], DeviceMesh] = {}

        def empty(name: str, shape: torch.Size, dtype: torch.dtype) -> Tensor:
            layer: MoELayer | None = shards.get(name)
            if layer is None or len(shape) == 0 or shape[0] != layer.num_experts:
                return torch.empty(shape, dtype=dtype)  # read whole
            local = torch.empty((layer.experts.num_experts, *shape[1:]), dtype=dtype)  # this rank's rows
            return _as_shard(local, layer.expert_parallel, meshes)

        state_dict = {}
        for name, value in module.state_dict().items():
            entry = saved.get(f"state_dict.{name}")
            if entry is None:
                continue  # missing from the checkpoint: load_state_dict reports it (or not, when not strict)
            if isinstance(value, Tensor) and hasattr(entry, "size"):
                state_dict[name] = empty(name, entry.size, value.dtype)
            else:
                state_dict[name] = value
        template: dict[str, Any] = {"state_dict": state_dict}
        for n, layout in enumerate(layouts):
            state: dict[str, dict[str, Tensor]] = {}
            for index, keys in layout["tensors"].items():
                name = layout[PARAM_NAMES_KEY][index]
                for key in keys:
                    entry = saved[f"optimizer_{n}.state.{name}.{key}"]
                    state.setdefault(name, {})[key] = empty(name, entry.size, entry.properties.dtype)
            template[f"optimizer_{n}"] = {"state": state}
        return template


def _split_optimizer_state(state: dict[str, Any],
                           names: list[str]) -> tuple[dict[str, Any], dict[str, dict[str, Tensor]]]:
    """A torch optimizer's ``state_dict()`` as ``(layout for meta.pt, tensors by parameter name)``: the
    layout keeps the parameter groups, ``names`` (of each index), each index's non-tensor state
    (``values``) and the keys of its tensor state (``tensors``)."""
    layout: dict[str, Any] = {"param_groups": state["param_groups"], PARAM_NAMES_KEY: names, "values": {},
                              "tensors": {}}
    by_name = {}
    for index, entry in state["state"].items():
        layout["values"][index] = {key: value for key, value in entry.items() if not isinstance(value, Tensor)}
        layout["tensors"][index] = [key for key, value in entry.items() if isinstance(value, Tensor)]
        by_name[names[index]] = {key: value for key, value in entry.items() if isinstance(value, Tensor)}
    return layout, by_name


def _to_local(value: Any) -> Any:
    """``value`` (nested dicts) with every DTensor replaced by this rank's local tensor."""
    if isinstance(value, dict):
        return {key: _to_local(v) for key, v in value.items()}
    return value.to_local() if isinstance(value, DTensor) else value


def _join(meta: dict[str, Any], tensors: dict[str, Any], names: bool = False) -> dict[str, Any]:
    """The Lightning checkpoint of ``meta.pt``'s contents and the tensors read from DCP: ``state_dict`` and
    ``optimizer_states`` as torch optimizers' ``state_dict()`` (with ``names``, also each index's
    parameter name under ``"param_names"``)."""
    checkpoint = {key: value for key, value in meta.items() if key not in (OPTIMIZERS_KEY, LAYOUT_KEY)}
    checkpoint["state_dict"] = tensors.get("state_dict", {})
    if OPTIMIZERS_KEY not in meta:  # a weights-only checkpoint
        return checkpoint
    checkpoint["optimizer_states"] = []
    for n, layout in enumerate(meta[OPTIMIZERS_KEY]):
        by_name = tensors.get(f"optimizer_{n}", {}).get("state", {})
        state = {}
        for index, values in layout["values"].items():
            read = by_name.get(layout[PARAM_NAMES_KEY][index], {})
            state[index] = {**values, **{key: read[key] for key in layout["tensors"][index]}}
        joined = {"state": state, "param_groups": layout["param_groups"]}
        if names:
            joined[PARAM_NAMES_KEY] = layout[PARAM_NAMES_KEY]
        checkpoint["optimizer_states"].append(joined)
    return checkpoint


def _remove(path: Path) -> None:
    """Remove a checkpoint file, directory or link (not what a link points at)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _read_whole(path: Path, keys: set[str] | None) -> dict[str, Any]:
    """The DCP tensors of the directory ``path`` (only the top-level ``keys``, or all), whole, in this process."""
    if not is_sharded_checkpoint(path):
        raise ValueError(f"{str(path)!r} is not a checkpoint directory written by MoEDDPStrategy (no {META_FILE} "
                         "and .metadata in it).")
    tensors: dict[str, Any] = {}
    # The private loader, as Lightning's own consolidation uses it: `dcp.load` fills only the keys its
    # argument already has, and here the planner builds them from the saved metadata.
    _load_state_dict(tensors, storage_reader=dcp.FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(keys=keys),
                     no_dist=True)
    return tensors


def sharded_state_dict(checkpoint_path: str | os.PathLike) -> dict[str, Tensor]:
    """The whole model state dict (experts unsharded) of a :class:`MoEDDPStrategy` checkpoint directory,
    read in this process with no process group (offline export). Loads into a model of any
    expert-parallel size with ``load_state_dict``."""
    return _read_whole(Path(checkpoint_path), {"state_dict"}).get("state_dict", {})


def consolidate_checkpoint(checkpoint_path: str | os.PathLike) -> dict[str, Any]:
    """The whole Lightning checkpoint of a :class:`MoEDDPStrategy` checkpoint directory: whole expert
    tensors and whole optimizer state, as plain ``ddp`` writes it; read in this process with no process
    group. ``torch.save(consolidate_checkpoint(directory), "whole.ckpt")`` writes one file that any
    strategy, ``load_from_checkpoint`` and any expert-parallel size load."""
    path = Path(checkpoint_path)
    tensors = _read_whole(path, None)
    return _join(torch.load(path / META_FILE, map_location="cpu", weights_only=False), tensors)


StrategyRegistry.register("moe_ddp", MoEDDPStrategy, override=True,
                          description="DDP writing sharded checkpoints (torch.distributed.checkpoint): each rank "
                                      "its own expert rows")
