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
- ``aux_losses`` and ``balancers`` (our layers; empty for Hugging Face blocks);
- ``expert_bias``: the auxiliary-loss-free bias buffer when the router has one
  (``expert_bias_E`` in ours, ``e_score_correction_bias`` in DeepSeek-V3), else ``None``;
- ``revive(dead, sources, noise, generator)``: re-initialise dead experts from live ones.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from lightning_moe.balancing.losses import Balancer
from lightning_moe.layers.record import RoutingRecorder
from lightning_moe.layers.stats import RoutingStats
from lightning_moe.layers.view import MoELayerView, cached_view, forget_view, remember_view

__all__ = ["LightningMoEView", "MoELayerView", "RecorderView", "find_moe_layers", "forget_view", "register_moe_adapter"]


class RecorderView(MoELayerView):
    """The view of every module that records its own routing
    (:class:`~lightning_moe.layers.RoutingRecorder`: :class:`~lightning_moe.layers.MoELayer`,
    ``DeepSpeedMoELayer``): stats, losses, balancers, bias offsets and router rows read from the
    module; expert tensors from its ``expert_parameters()`` when it has grouped expert weights.
    ``family`` is the module's ``view_family``."""

    def __init__(self, name: str, module: nn.Module) -> None:
        super().__init__(name, module, module.num_experts)
        self.family = module.view_family

    @property
    def stats(self) -> RoutingStats | None:
        return self.module.stats

    @property
    def aux_losses(self) -> dict[str, Tensor]:
        return self.module.aux_losses

    @property
    def balancers(self) -> list[Balancer]:
        return self.module.balancers

    @property
    def expert_bias(self) -> Tensor | None:
        return getattr(self.module.router, "expert_bias_E", None)

    def router_rows(self) -> list[Tensor]:
        scorer = getattr(self.module.router, "scorer", None)
        return scorer.expert_rows() if scorer is not None else []

    def expert_tensors(self) -> list[Tensor]:
        # Grouped expert weights whose dim 0 indexes experts (SwiGLU: w_gate, w_up, w_out; MLP experts
        # also their biases); under expert parallelism this rank's rows.
        expert_parameters = getattr(self.module, "expert_parameters", None)
        return [] if expert_parameters is None else [p for _, p in expert_parameters()]

    @torch.no_grad()
    def revive(self, dead: Sequence[int], sources: Sequence[int], noise: float,
               generator: torch.Generator | None = None) -> list[tuple[Tensor, list[int] | None]]:
        module = self.module
        if getattr(module, "expert_parameters", None) is None:
            raise NotImplementedError(
                f"{self.name}: DeadExpertDetector(action='revive') does not support {type(module).__name__} (its "
                "experts are not grouped tensors); use action='warn' or 'raise', or MoELayer.")
        rows = module.expert_rows
        if rows == slice(0, self.num_experts):
            return super().revive(dead, sources, noise, generator)
        # Expert parallelism: a dead expert and its source may sit on different ranks. Every rank of the
        # group gathers the whole tensors (a collective of the layer's dispatcher), revives them
        # identically (same loads, same seeded noise) and keeps its own rows.
        shards = self.expert_tensors()
        whole = [module.dispatcher.gather_experts(shard) for shard in shards]
        changed = self._revive(whole, dead, sources, noise, generator)
        for shard, tensor in zip(shards, whole, strict=True):
            shard.copy_(tensor[rows])
        mine = [d - rows.start for d in dead if rows.start <= d < rows.stop]
        replaced = {id(t): s for t, s in zip(whole, shards, strict=True)}
        return [(replaced[id(t)], mine) if id(t) in replaced else (t, changed_rows) for t, changed_rows in changed]


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
