"""Callbacks usable in any Lightning project (one class per file), re-exported here.

They find MoE layers with :func:`lightning_moe.discovery.find_moe_layers`, so they work on our
models and on Hugging Face MoE models alike. ``class_path: lightning_moe.callbacks.<Name>`` works
in YAML after ``pip install``. ``RoutingEntropyLogger`` is ``RoutingMonitor``'s former name.
"""

from lightning_moe.callbacks.bias_offset_updater import BiasOffsetUpdater
from lightning_moe.callbacks.dead_expert_detector import DeadExpertDetector, DeadExpertError
from lightning_moe.callbacks.routing_entropy_logger import RoutingEntropyLogger, RoutingMonitor
from lightning_moe.callbacks.schedule import Schedule
from lightning_moe.callbacks.zloss_scheduler import ZLossScheduler

__all__ = [
    "BiasOffsetUpdater", "DeadExpertDetector", "DeadExpertError", "RoutingEntropyLogger", "RoutingMonitor", "Schedule",
    "ZLossScheduler",
]
