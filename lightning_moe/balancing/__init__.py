"""Balancers: auxiliary losses that keep experts evenly loaded and router logits small."""

from lightning_moe.balancing.losses import Balancer, SwitchAuxLoss, ZLoss

__all__ = ["Balancer", "SwitchAuxLoss", "ZLoss"]
