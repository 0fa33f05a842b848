"""Dispatchers: ``dispatch(x_TD, routing, experts) -> y_TD``; backends compute the same function."""

from lightning_moe.dispatch.backends import DISPATCHERS, Dispatcher, get_dispatcher, grouped_dispatch, loop_dispatch

__all__ = ["DISPATCHERS", "Dispatcher", "get_dispatcher", "grouped_dispatch", "loop_dispatch"]
