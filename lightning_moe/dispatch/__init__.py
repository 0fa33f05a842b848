"""Dispatchers: ``dispatch(x_TD, routing, experts) -> y_TD``; backends compute the same function."""

from lightning_moe.dispatch.backends import DISPATCHERS, Dispatcher, get_dispatcher, loop_dispatch
from lightning_moe.dispatch.fused import triton_dispatch
from lightning_moe.dispatch.grouped import GroupedSwiGLU, grouped_dispatch

__all__ = ["DISPATCHERS", "Dispatcher", "GroupedSwiGLU", "get_dispatcher", "grouped_dispatch", "loop_dispatch",
           "triton_dispatch"]
