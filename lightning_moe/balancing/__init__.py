"""Balancers: auxiliary losses that keep experts evenly loaded and router logits small, and the
bias update of auxiliary-loss-free balancing."""

from lightning_moe.balancing.losses import (
    Balancer,
    CommBalanceLoss,
    DeviceAuxLoss,
    SequenceAuxLoss,
    SwitchAuxLoss,
    ZLoss,
    bias_update,
)

__all__ = ["Balancer", "CommBalanceLoss", "DeviceAuxLoss", "SequenceAuxLoss", "SwitchAuxLoss", "ZLoss", "bias_update"]
