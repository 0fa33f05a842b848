"""``MoEDeepSpeedStrategy``: Lightning's DeepSpeed strategy, also on CPU (gloo), and aware of
expert parallelism (MoE parameter groups, sharded checkpoints in DeepSpeed's layout, resharding).

Lightning's ``DeepSpeedStrategy`` refuses a CPU accelerator and reads ``root_device.index``,
which is ``None`` on CPU; three overrides lift that (``setup_environment``, ``setup_distributed``,
``_setup_model_and_optimizer``), so a laptop or CI runs the same DeepSpeed code path (ZeRO 0-2,
expert parallelism) with ``accelerator="cpu"`` as a GPU cluster does with ``"gpu"``.

Legend: ``E`` experts of a layer, ``P`` its expert-parallel size, ``L = E / P`` experts per rank,
``W`` processes.

A checkpoint is DeepSpeed's directory, ``<path>/checkpoint/``, written by every rank at once:

- ``layer_{i}_expert_{e}_mp_rank_00_model_states.pt``: expert ``e`` (global index) of the ``i``-th
  expert-parallel layer, its rows only, written by the rank that holds it (expert-data-parallel
  rank 0 of its expert-parallel rank); ``E`` files per layer, whatever ``P``;
- ``mp_rank_00_model_states.pt`` (rank 0): every non-expert tensor, and the client state:
  Lightning's loops, callbacks and hyperparameters, and the layout it was written with;
- ``zero_pp_rank_{r}_mp_rank_00_optim_states.pt`` (each rank ``r``, ZeRO-1/2): that rank's
  partitions of the optimizer state, the expert groups' over the expert-data-parallel group (no
  ZeRO: ``expp_rank_{p}_mp_rank_00_optim_states.pt``, one per expert-parallel rank). No rank ever
  gathers experts or their optimizer state.

:func:`to_universal_checkpoint` adds DeepSpeed's universal form beside them (``zero/<parameter>/``,
every parameter's fp32 copy and optimizer state whole), from which a run of any layout resumes with
its optimizer state; :func:`load_full_state_dict` joins the weights into one state dict.
"""

from __future__ import annotations

import argparse
import os
import shutil
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
"""Where checkpoints written before per-expert files kept the whole (gathered) model state dict;
:func:`load_full_state_dict` still reads them."""
LAYOUT_KEY = "lightning_moe_expert_parallel"
"""Where a checkpoint records the process count and expert-parallel sizes it was written with."""
EXPERT_KEY = ".deepspeed_moe.experts.deepspeed_experts."
"""DeepSpeed-MoE's key path of an expert in its per-expert files (``ds_marker.EXPERT_KEY``)."""


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
        load_universal: resume from a checkpoint converted by :func:`to_universal_checkpoint`
            (DeepSpeed's ``checkpoint.load_universal``), at any process count and expert-parallel
            size, optimizer state included.

    With expert-parallel layers (``MoELanguageModel(expert_parallel_size=P)``) it checks that
    the optimizer keeps the expert parameters in DeepSpeed's MoE parameter groups
    (:func:`~lightning_moe.parallel.moe_param_groups`; ``MoELanguageModel`` does), so that ZeRO
    reduces and partitions them over the expert-data-parallel groups. Its checkpoints are
    DeepSpeed's directories in DeepSpeed-MoE's layout (see the module docstring): each rank writes
    its own experts, one file per expert, and its own optimizer partitions; nothing is gathered.
    Resuming with the same process count and expert-parallel sizes restores everything through
    DeepSpeed's own load. With another layout (resharding, e.g. EP=2 on 2 processes to EP=1 on 1)
    each rank reads the non-expert file and the files of the experts it now holds, and the
    optimizer state starts afresh, with a warning: DeepSpeed's ZeRO partitions load only at the
    data-parallel size they were written with. To carry the optimizer state too (ZeRO-1/2),
    convert the checkpoint offline with :func:`to_universal_checkpoint` and resume from the
    converted directory with ``load_universal=True``. :func:`load_full_state_dict` consolidates
    the weights offline, for any other use.
    """

    strategy_name = "moe_deepspeed"
    writes_expert_shards = True
    """Checkpoints hold each rank's experts as they are (``MoELanguageModel`` gathers nothing)."""

    def __init__(self, *args: Any, cpu_shm_comm: bool = True, load_universal: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cpu_shm_comm = cpu_shm_comm
        self.load_universal = load_universal

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
        if self.load_universal:
            self.config.setdefault("checkpoint", {})["load_universal"] = True
        model_parameters = filter(lambda p: p.requires_grad, model.parameters())
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=device_rank), config=self.config, model=model,
            model_parameters=model_parameters, optimizer=optimizer, lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        from lightning_moe.parallel.ds_marker import deepspeed_expert_files

        module = self.lightning_module
        if module is None:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        if _has_moe_layers(module):
            checkpoint = {**checkpoint, LAYOUT_KEY: expert_parallel_layout(module, self.world_size)}
        # Lightning's DeepSpeedStrategy drops "state_dict" (whole experts, if MoELanguageModel gathered them):
        # DeepSpeed writes the weights, each rank's experts to their own files.
        with deepspeed_expert_files(module):
            super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        from lightning_moe.parallel.ds_marker import deepspeed_expert_files

        module = self.lightning_module
        saved = _read_client_state(checkpoint_path)
        if self.load_universal:
            return self._load_universal_checkpoint(checkpoint_path, saved, weights_only)
        if module is None or saved is None or LAYOUT_KEY not in saved:
            return super().load_checkpoint(checkpoint_path, weights_only)
        if STATE_KEY in saved:  # written before per-expert files: whole expert tensors, no expert files to read
            rank_zero_warn(
                f"{checkpoint_path} was written by an earlier version (whole expert tensors in its client state, no "
                "per-expert files). The model weights are restored from it, each rank keeping its experts' rows; the "
                "optimizer state starts afresh. Checkpoints written from now on keep it.")
            saved.pop("optimizer_states", None)
            saved["state_dict"] = saved.pop(STATE_KEY)
            return saved
        current = expert_parallel_layout(module, self.world_size)
        if saved[LAYOUT_KEY] == current:
            with deepspeed_expert_files(module):  # DeepSpeed reads this rank's expert files into the grouped tensors
                return super().load_checkpoint(checkpoint_path, weights_only)
        rank_zero_warn(
            f"Resharding {checkpoint_path}: it was written with {saved[LAYOUT_KEY]}, this run has {current}. The model "
            "weights are restored (each rank reads the files of the experts it holds); the optimizer state starts "
            "afresh (DeepSpeed's ZeRO partitions load only at the layout they were written with). To keep it, convert "
            "the checkpoint with lightning_moe.parallel.strategy.to_universal_checkpoint and resume from the copy with "
            "MoEDeepSpeedStrategy(load_universal=True).")
        saved.pop("optimizer_states", None)
        saved["state_dict"] = resharded_state_dict(checkpoint_path, module, saved)
        return saved

    def _load_universal_checkpoint(self, checkpoint_path: Any, saved: Mapping[str, Any] | None,
                                   weights_only: bool | None) -> dict[str, Any]:
        if saved is None or not (Path(checkpoint_path) / "latest_universal").is_file():
            raise ValueError(f"`load_universal=True` resumes from a checkpoint converted by to_universal_checkpoint; "
                             f"{checkpoint_path} has no 'latest_universal' file.")
        module = self.lightning_module
        # DeepSpeed reads the ZeRO state of this rank's partitions (an expert's: its rows) from zero/ and sets the
        # trainable parameters from their fp32 copies; it loads nothing else of the module. The rest (buffers,
        # frozen parameters) comes from the non-expert file.
        client_state = super().load_checkpoint(checkpoint_path, weights_only)
        trainable = {name for name, param in module.named_parameters() if param.requires_grad}
        module.load_state_dict({k: v for k, v in saved["module"].items() if k not in trainable}, strict=False)
        return client_state

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False  # DeepSpeed restores it in load_checkpoint (or, when resharding, nothing does)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if "state_dict" in checkpoint:
            # Resharded in load_checkpoint (DeepSpeed's own load has already loaded the weights otherwise).
            self.lightning_module.load_state_dict(checkpoint["state_dict"], strict=strict)
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


def _has_moe_layers(model: nn.Module) -> bool:
    from lightning_moe.layers.moe_layer import MoELayer

    return any(isinstance(module, MoELayer) for module in model.modules())


def _tag_dir(checkpoint_path: Any) -> Path | None:
    """The folder of a DeepSpeed checkpoint directory's latest tag (Lightning's: ``checkpoint``)."""
    path = Path(checkpoint_path)
    if not path.is_dir():
        return None
    latest = path / "latest"
    return path / (latest.read_text().strip() if latest.is_file() else "checkpoint")


def _client_state_file(checkpoint_path: Any) -> Path | None:
    tag = _tag_dir(checkpoint_path)
    if tag is None:
        return None
    candidates = sorted(tag.glob("mp_rank_*_model_states.pt")) or sorted(
        tag.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))  # ZeRO-3
    return candidates[0] if candidates else None


def _read_client_state(checkpoint_path: Any) -> dict[str, Any] | None:
    file = _client_state_file(checkpoint_path)
    if file is None:
        return None
    # Memory-mapped: a tensor is read from disk only when used (a same-layout resume uses none of them).
    return torch.load(file, map_location="cpu", weights_only=False, mmap=True)


def _expert_file(tag: Path, layer_id: int, expert: int) -> Path:
    # DeepSpeedEngine._get_expert_ckpt_name: MoE layers numbered in `named_modules` order, experts globally.
    return tag / f"layer_{layer_id}_expert_{expert}_mp_rank_00_model_states.pt"


def _read_expert_rows(tag: Path, layer_id: int, experts: range) -> tuple[str, dict[str, torch.Tensor]]:
    """``(layer name, {tensor name: (len(experts), ...) tensor})`` of the ``layer_id``-th MoE layer of a
    DeepSpeed checkpoint, read from the per-expert files of ``experts`` (global indices) alone; names
    relative to the layer's ``experts``."""
    layer, rows = None, {}
    for expert in experts:
        file = _expert_file(tag, layer_id, expert)
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing: a checkpoint of MoEDeepSpeedStrategy holds one file per "
                                    f"expert of each expert-parallel layer (expert {expert} of MoE layer {layer_id}).")
        for key, value in torch.load(file, map_location="cpu", weights_only=True).items():
            marker, _, rest = key.partition(EXPERT_KEY)
            number, _, name = rest.partition(".")
            if not name or number != str(expert):
                raise ValueError(f"{file} holds {key!r}, not a tensor of expert {expert} in DeepSpeed-MoE's layout "
                                 f"('<marker>{EXPERT_KEY}{expert}.<name>').")
            layer = marker.rpartition(".")[0]  # the marker is a child of the layer
            rows.setdefault(name, []).append(value)
    return layer or "", {name: torch.stack(values) for name, values in rows.items()}


def resharded_state_dict(checkpoint_path: Any, model: nn.Module, saved: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` (this rank's experts only) from a :class:`MoEDeepSpeedStrategy`
    checkpoint written with another layout: ``saved`` (its non-expert file: ``module`` and the layout
    record) and the per-expert files of the experts each layer of ``model`` now holds on this rank.
    Layers expert-parallel when saved are read from their files; the others' whole tensors are in
    ``module`` and :class:`~lightning_moe.layers.MoELayer`'s load hook keeps this rank's rows."""
    tag = _tag_dir(checkpoint_path)
    state = dict(saved["module"])
    for layer_id, name in enumerate(saved[LAYOUT_KEY]["sizes"]):
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{checkpoint_path} has experts of the layer {name!r}, which this model does not have."
                             ) from None
        rows = layer.expert_rows
        written_by, tensors = _read_expert_rows(tag, layer_id, range(rows.start, rows.stop))
        if written_by != name:
            raise ValueError(f"{checkpoint_path}: MoE layer {layer_id}'s expert files belong to {written_by!r}, its "
                             f"layout record says {name!r}.")
        state.update({f"{name}.experts.{tensor_name}": value for tensor_name, value in tensors.items()})
    return state


def load_full_state_dict(checkpoint_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The whole model state dict (experts unsharded) of a checkpoint written by an expert-parallel
    run: a Lightning ``.ckpt`` file (any strategy) or a :class:`MoEDeepSpeedStrategy` directory,
    consolidated offline from its non-expert file and every per-expert file (one process, no
    DeepSpeed needed). Load it into a model of any expert-parallel size with ``load_state_dict``."""
    from lightning_moe.parallel.ddp_strategy import is_sharded_checkpoint, sharded_state_dict

    if is_sharded_checkpoint(checkpoint_path):  # MoEDDPStrategy's DCP directory: its shards, joined here
        return sharded_state_dict(checkpoint_path)
    path = Path(checkpoint_path)
    if path.is_dir():
        state = _read_client_state(path)
        if state is None or "module" not in state:
            raise ValueError(f"{path} is not a checkpoint directory written by MoEDeepSpeedStrategy (no "
                             "mp_rank_00_model_states.pt with a 'module' state dict in its latest tag).")
        if STATE_KEY in state:  # written before per-expert files
            return state[STATE_KEY]
        return _consolidate(_tag_dir(path), state["module"])
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def _consolidate(tag: Path, module: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # The non-expert tensors, then each MoE layer's whole expert tensors from all its per-expert files.
    whole, layer_id = dict(module), 0
    while experts := len(list(tag.glob(f"layer_{layer_id}_expert_*_mp_rank_00_model_states.pt"))):
        layer, tensors = _read_expert_rows(tag, layer_id, range(experts))
        whole.update({f"{layer}.experts.{name}": value for name, value in tensors.items()})
        layer_id += 1
    return whole


def to_universal_checkpoint(checkpoint_path: str | os.PathLike, output_path: str | os.PathLike) -> Path:
    """Convert a ZeRO-1/2 checkpoint directory of :class:`MoEDeepSpeedStrategy` into DeepSpeed's
    universal format at ``output_path`` (offline, one process), so that a run with any process count
    and expert-parallel sizes resumes from it with its optimizer state:
    ``MoEDeepSpeedStrategy(load_universal=True)`` (``--trainer.strategy.init_args.load_universal true``).

    Every parameter's fp32 copy and optimizer state (AdamW's moments, ``step``) is joined from the
    ranks' ZeRO partitions into ``zero/<name>/<state>.pt``; an expert parameter's joins its
    expert-parallel ranks' rows into the whole ``(E, ...)`` tensor, marked as DeepSpeed's universal
    loader expects (``is_expert_param``, ``ep_num_experts``), so each rank of the new run takes its own
    rows. (DeepSpeed's own ``ds_to_universal`` would join the partitions of all ranks as if they
    held the same experts.) The source's files are copied alongside, so the output also loads as the
    original checkpoint (same layout, ``load_universal=False``) and through :func:`load_full_state_dict`.
    Returns ``output_path``."""
    from deepspeed.checkpoint.constants import EP_IS_EXPERT_PARAM, EP_NUM_EXPERTS, PARAM

    source, out = _tag_dir(checkpoint_path), Path(output_path)
    saved = _read_client_state(checkpoint_path)
    if source is None or saved is None or LAYOUT_KEY not in saved:
        raise ValueError(f"{checkpoint_path} is not a checkpoint directory written by MoEDeepSpeedStrategy (no "
                         f"{LAYOUT_KEY!r} record in its mp_rank_00_model_states.pt).")
    world = saved["dp_world_size"]
    files = [source / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in range(world)]
    if not all(file.is_file() for file in files):
        raise ValueError(f"{checkpoint_path} has no ZeRO optimizer partitions (zero_pp_rank_*_optim_states.pt): "
                         "to_universal_checkpoint converts ZeRO stage 1 or 2 checkpoints.")
    shards = [torch.load(file, map_location="cpu", weights_only=False)["optimizer_state_dict"] for file in files]
    sizes = {f"{layer}.experts.": size for layer, size in saved[LAYOUT_KEY]["sizes"].items()}
    target = out / source.name
    shutil.copytree(source, target)
    for group, shapes in enumerate(saved["param_shapes"]):  # rank 0's shapes: L of the E rows of an expert
        for name, local in shapes.items():
            size = next((p for prefix, p in sizes.items() if name.startswith(prefix)), 1)
            for key, value in _joined_states(shards, group, name, size).items():
                if torch.is_tensor(value) and value.dim() == 1 and key != "step":
                    if size == 1:
                        value = {PARAM: value.view(local)}
                    else:
                        experts = local[0] * size
                        value = {PARAM: value.view(experts, *local[1:]), EP_IS_EXPERT_PARAM: True,
                                 EP_NUM_EXPERTS: experts}
                (target / "zero" / name).mkdir(parents=True, exist_ok=True)
                torch.save(value, target / "zero" / name / f"{key}.pt")
    sharded = ("base_optimizer_state", "param_slice_mappings", "single_partition_of_fp32_groups")
    global_state = {k: v for k, v in shards[0].items() if k not in sharded}
    # The new run's groups keep their own MoE marks (another expert-parallel size names other groups).
    global_state["param_groups"] = [{k: v for k, v in g.items() if k not in ("params", "moe", "name")}
                                    for g in shards[0]["base_optimizer_state"]["param_groups"]]
    torch.save(global_state, target / "zero" / "optimizer_state.pt")
    for latest in ("latest", "latest_universal"):
        (out / latest).write_text(source.name)
    return out


def _joined_states(shards: list[dict[str, Any]], group: int, name: str, size: int) -> dict[str, Any]:
    """``{state: flat whole tensor}`` (``fp32`` and the optimizer's per-element state, ``step`` as saved) of
    parameter ``name`` of ZeRO parameter group ``group``, from every rank's partition. A parameter of an
    expert-parallel group of size ``size`` is partitioned over its expert-data-parallel group (ranks
    ``e, e + size, ...`` hold expert-parallel rank ``e``'s rows): its pieces join in that order, then the
    expert-parallel ranks' rows in theirs."""
    pieces: dict[str, list[torch.Tensor]] = {}
    joined: dict[str, Any] = {}
    world = len(shards)
    for rank in [e + size * d for e in range(size) for d in range(world // size)]:
        shard = shards[rank]
        fragment = shard["param_slice_mappings"][group].get(name)
        flat = shard["single_partition_of_fp32_groups"][group]
        states = {"fp32": flat, **shard["base_optimizer_state"]["state"].get(group, {})}
        for key, value in states.items():
            if torch.is_tensor(value) and value.shape == flat.shape:
                if fragment is not None:  # a rank may hold no piece of a small parameter
                    pieces.setdefault(key, []).append(value.narrow(0, fragment.start, fragment.numel))
            else:
                joined[key] = value  # `step`: the same on every rank
    return {**joined, **{key: torch.cat(values) for key, values in pieces.items()}}
