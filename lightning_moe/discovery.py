"""Discovery: find every MoE layer in any ``nn.Module`` and give callbacks one view of each.

Legend: ``T`` tokens, ``E`` experts.

``find_moe_layers(model)`` returns a :class:`MoELayerView` per MoE layer, whether the layer is
our :class:`~lightning_moe.layers.MoELayer` or a Hugging Face MoE block (Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE, DeepSeek-V3; see :mod:`lightning_moe.integrations.hf`). Callbacks use only
this view, so they work in projects that never used our model class. For Hugging Face blocks the
view captures the router's decision with a forward hook on the block's gate; the user's code
does not change.

Each view exposes:

- ``stats``: a detached :class:`~lightning_moe.layers.RoutingStats` of the layer's last forward
  (tokens per expert, mean scores, entropy, dropped assignments), ``None`` before the first;
- ``aux_losses`` (the balancers' and those the router brings), ``balancers`` and ``loss_weights`` (the weights
  of the losses the router brings) (our layers; empty for Hugging Face blocks);
- ``expert_bias``: the auxiliary-loss-free bias buffer when the router has one
  (``expert_bias_E`` in ours, ``e_score_correction_bias`` in DeepSeek-V3), else ``None``;
- ``revive(dead, sources, noise, generator)``: re-initialise dead experts from live ones.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from torch import nn

from lightning_moe.layers.record import RoutingRecorder
from lightning_moe.layers.view import MoELayerView, RecorderView, cached_view, forget_view, remember_view

__all__ = ["LightningMoEView", "MoELayerView", "RecorderView", "find_moe_layers", "forget_view", "register_moe_adapter"]


LightningMoEView = RecorderView
"""The view of our :class:`~lightning_moe.layers.MoELayer` (the name before recorders shared one view)."""


ViewFactory = Callable[[str, nn.Module], "MoELayerView | None"]
_ADAPTERS: list[ViewFactory] = []


def register_moe_adapter(factory: ViewFactory) -> ViewFactory:
    """Teach :func:`find_moe_layers` a new layer family.

    ``factory(name, module)`` returns a view when ``module`` is an MoE layer of its family, else
    ``None``. It is called once per module; the view is cached, so hooks it registers are
    registered once.
    """
    _ADAPTERS.append(factory)
    return factory


def _recorder(name: str, module: nn.Module) -> MoELayerView | None:
    return RecorderView(name, module) if isinstance(module, RoutingRecorder) and isinstance(module, nn.Module) \
        else None


register_moe_adapter(_recorder)


def _view_of(name: str, module: nn.Module) -> MoELayerView | None:
    view = cached_view(module)
    if view is not None:
        view.name = name
        return view
    for factory in _ADAPTERS:
        view = factory(name, module)
        if view is not None:
            remember_view(module, view)
            return view
    return None


def find_moe_layers(model: nn.Module) -> list[MoELayerView]:
    """Every MoE layer inside ``model`` (``model`` included), outermost first, in module order.

    The search does not look inside a layer it has found. Calling it again returns the same view
    objects. Hugging Face families register themselves when ``lightning_moe.integrations.hf`` is
    importable (it is imported here when ``transformers`` is installed).
    """
    _load_integrations()
    views: list[MoELayerView] = []
    found: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in found):
            continue
        view = _view_of(name, module)
        if view is not None:
            views.append(view)
            found.append(name)
    return views


_INTEGRATIONS_LOADED = False


def _load_integrations() -> None:
    global _INTEGRATIONS_LOADED
    if _INTEGRATIONS_LOADED:
        return
    if importlib.util.find_spec("transformers") is not None:
        from lightning_moe.integrations.hf import hf_moe_view

        register_moe_adapter(hf_moe_view)
    _INTEGRATIONS_LOADED = True
