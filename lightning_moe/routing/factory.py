"""Router factories: models and conversions build routers from ``(d_model, num_experts)``, so YAML
never repeats widths."""

from __future__ import annotations

import warnings
from collections.abc import Callable

from lightning_moe.routing.routing import Router

RouterFactory = Callable[[int, int], Router]
"""Builds a router from ``(d_model, num_experts)``: the model passes its widths, YAML never repeats them."""


def build_router(factory: RouterFactory, d_model: int, num_experts: int, granularity: int = 1) -> Router:
    """``factory(d_model, num_experts)``, its experts per token then multiplied by ``granularity``
    (fine-grained experts: :meth:`Router.scale_experts_per_token`)."""
    with warnings.catch_warnings():
        if granularity > 1:  # top_k=1 is not final here: it is multiplied by the granularity next
            warnings.filterwarnings("ignore", message=r".*\(top_k=1, renormalize=True\)")
        router = factory(d_model, num_experts)
    if granularity > 1:
        router.scale_experts_per_token(granularity)
    return router
