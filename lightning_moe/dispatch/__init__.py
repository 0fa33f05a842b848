"""Dispatchers: ``dispatcher(x_TD, routing, experts) -> y_TD`` in three named steps (permute, compute,
combine); backends compute the same function, ``loop`` is the reference. A registry maps names to
backends (:func:`register_dispatcher`)."""

from lightning_moe.dispatch.base import Dispatcher, Plan
from lightning_moe.dispatch.engines import ENGINES, clear_engine_choices, engine_choices, expert_swiglu
from lightning_moe.dispatch.grouped import GroupedDispatcher, grouped_dispatch, grouped_swiglu, release_recycled_buffers
from lightning_moe.dispatch.loop import LoopDispatcher, loop_dispatch
from lightning_moe.dispatch.registry import DISPATCHERS, get_dispatcher, register_dispatcher
from lightning_moe.dispatch.triton import AutoDispatcher, TritonDispatcher, fallback_reason, triton_dispatch

__all__ = [
    "DISPATCHERS", "ENGINES", "AutoDispatcher", "Dispatcher", "GroupedDispatcher", "LoopDispatcher", "Plan",
    "TritonDispatcher",
    "clear_engine_choices", "engine_choices", "expert_swiglu", "fallback_reason", "get_dispatcher",
    "grouped_dispatch", "grouped_swiglu", "loop_dispatch", "register_dispatcher", "release_recycled_buffers",
    "triton_dispatch",
]
