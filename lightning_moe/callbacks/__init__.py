"""Callbacks usable in any Lightning project (one class per file), re-exported here.

They find MoE layers with :func:`lightning_moe.discovery.find_moe_layers`, so they work on our
models and on Hugging Face MoE models alike. ``class_path: lightning_moe.callbacks.<Name>`` works
in YAML after ``pip install``. Fault tolerance: :class:`StepCheckpoint` (atomic, verified, the last N
kept), :class:`Preemption` (SIGTERM/SIGINT/SIGUSR1: save, exit 128 + signal) and
:class:`NonFiniteGuard` (a NaN loss or router logits: stop or skip, never checkpointed); the exit
statuses are in :mod:`lightning_moe.callbacks.stops`. :class:`RoutingDriftMonitor` watches a fixed probe
batch's routing drift from where training began (fine-tuning) and warns, raises or freezes the routers.
``RoutingEntropyLogger`` is ``RoutingMonitor``'s former name.
"""

from lightning_moe.callbacks.bias_offset_updater import BiasOffsetUpdater
from lightning_moe.callbacks.checkpoint import AtomicCheckpointIO, StepCheckpoint
from lightning_moe.callbacks.dead_expert_detector import DeadExpertDetector, DeadExpertError
from lightning_moe.callbacks.non_finite import NonFiniteGuard
from lightning_moe.callbacks.preemption import Preemption
from lightning_moe.callbacks.routing_drift import RoutingDriftError, RoutingDriftMonitor, RoutingDriftWarning
from lightning_moe.callbacks.routing_entropy_logger import RoutingEntropyLogger, RoutingMonitor
from lightning_moe.callbacks.schedule import Schedule
from lightning_moe.callbacks.stops import CheckpointWriteError, NonFiniteError, Preempted, TrainingStopped
from lightning_moe.callbacks.text_writer import GeneratedTextWriter
from lightning_moe.callbacks.zloss_scheduler import ZLossScheduler

__all__ = [
    "AtomicCheckpointIO", "BiasOffsetUpdater", "CheckpointWriteError", "DeadExpertDetector", "DeadExpertError",
    "GeneratedTextWriter", "NonFiniteError", "NonFiniteGuard", "Preempted", "Preemption", "RoutingDriftError",
    "RoutingDriftMonitor", "RoutingDriftWarning", "RoutingEntropyLogger", "RoutingMonitor", "Schedule",
    "StepCheckpoint", "TrainingStopped", "ZLossScheduler",
]
