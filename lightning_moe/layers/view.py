"""The view of one MoE layer that callbacks read: discovery returns one per layer, adapters subclass it.

Legend: ``T`` tokens, ``E`` experts.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_moe.balancing.losses import Balancer
from lightning_moe.layers.record import RoutingRecorder
from lightning_moe.layers.stats import RoutingStats
from lightning_moe.routing.routing import LossWeight


class MoELayerView:
    """One MoE layer as callbacks see it; subclasses adapt a layer family.

    Attributes:
        name: the layer's qualified name in the model searched (``named_modules`` order).
        module: the layer itself.
        num_experts: E.
    """

    family: str = "moe"

    def __init__(self, name: str, module: nn.Module, num_experts: int) -> None:
        self.name = name
        self.module = module
        self.num_experts = num_experts

    # The layer is held weakly: discovery caches views in a WeakKeyDictionary keyed by the layer,
    # and a strong reference from the value would keep every model ever searched alive.
    @property
    def module(self) -> nn.Module:
        module = self._module_ref()
        if module is None:
            raise ReferenceError(f"The MoE layer {self.name!r} of this view no longer exists.")
        return module

    @module.setter
    def module(self, module: nn.Module) -> None:
        self._module_ref = weakref.ref(module)

    # A view reachable from its model (through a forward hook) is copied with it by deepcopy and
    # pickle; the copy then refers to the copied layer.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_module_ref"] = self._module_ref()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        module = state.pop("_module_ref")
        self.__dict__.update(state)
        self._module_ref = weakref.ref(module) if module is not None else _no_module

    @property
    def stats(self) -> RoutingStats | None:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def aux_losses(self) -> dict[str, Tensor]:
        return {}

    @property
    def balancers(self) -> list[Balancer]:
        return []

    @property
    def loss_weights(self) -> list[LossWeight]:
        """The weights of the losses the layer's router brings itself (``Router.scheduled_coefficients``),
        each with a ``name`` and a run-time ``coeff`` like a balancer's; ``[]`` for most routers."""
        return []

    @property
    def expert_bias(self) -> Tensor | None:
        return None

    def expert_tensors(self) -> list[Tensor]:
        """Expert weights whose first dimension indexes experts (fused layouts)."""
        return []

    def router_rows(self) -> list[Tensor]:
        """Router parameters whose first dimension indexes experts."""
        return []

    def router_parameters(self) -> list[nn.Parameter]:
        """Every parameter of the layer's router (what ``RoutingDriftMonitor(action="freeze")`` freezes);
        by default those of its :meth:`router_rows`."""
        return [p for p in self.router_rows() if isinstance(p, nn.Parameter)]

    @torch.no_grad()
    def revive(self, dead: Sequence[int], sources: Sequence[int], noise: float,
               generator: torch.Generator | None = None) -> list[tuple[Tensor, list[int] | None]]:
        """Re-initialise each ``dead[i]`` expert as a copy of ``sources[i]`` plus noise.

        The expert's weights and its router row become the source's, each perturbed by Gaussian
        noise of standard deviation ``noise`` times the source row's standard deviation (so the
        two experts split the source's tokens and then drift apart); the bias offset, where there
        is one, becomes the source's. Noise is drawn on the CPU from ``generator``, so ranks that
        pass equally seeded generators make identical changes. Returns ``(tensor, rows)`` for every
        tensor changed (``rows`` the first-dimension indices changed, ``None`` for the whole
        tensor), so a caller can reset their optimizer state.
        """
        return self._revive(self.expert_tensors(), dead, sources, noise, generator)

    def _revive(self, expert_tensors: list[Tensor], dead: Sequence[int], sources: Sequence[int], noise: float,
                generator: torch.Generator | None) -> list[tuple[Tensor, list[int] | None]]:
        # `revive` on the given (whole) expert tensors, this view's router rows and bias.
        if len(dead) != len(sources):
            raise ValueError(f"`dead` ({len(dead)}) and `sources` ({len(sources)}) must have the same length.")
        tensors = [*expert_tensors, *self.router_rows()]
        for dst, src in zip(dead, sources, strict=True):
            for tensor in tensors:
                row = tensor[src]
                scale = row.float().std() if row.numel() > 1 else row.float().abs()
                eps = torch.randn(row.shape, generator=generator, dtype=torch.float32)
                tensor[dst] = (row.float() + noise * scale * eps.to(row.device)).to(tensor.dtype)
        changed: list[tuple[Tensor, list[int] | None]] = [(t, list(dead)) for t in tensors]
        bias = self.expert_bias
        if bias is not None:
            for dst, src in zip(dead, sources, strict=True):
                bias[dst] = bias[src]
            changed.append((bias, list(dead)))
        return changed

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, family={self.family!r}, num_experts={self.num_experts})"


def _no_module() -> None:
    return None


class RecorderView(MoELayerView):
    """The view of every layer whose routing is recorded by a
    :class:`~lightning_moe.layers.RoutingRecorder` (:class:`~lightning_moe.layers.MoELayer`,
    ``DeepSpeedMoELayer``, a Hugging Face block whose gate is our ``RouterGate``): stats, losses,
    balancers, bias offsets and router rows read from the recorder (:attr:`recorder`, the layer
    itself unless a subclass says otherwise); expert tensors from the layer's
    ``expert_parameters()`` when it has grouped expert weights. ``family`` defaults to the
    recorder's ``view_family``."""

    def __init__(self, name: str, module: nn.Module, num_experts: int | None = None,
                 family: str | None = None) -> None:
        super().__init__(name, module, module.num_experts if num_experts is None else num_experts)
        self.family = self.recorder.view_family if family is None else family

    @property
    def recorder(self) -> RoutingRecorder:
        """The module that records this layer's routing."""
        return self.module

    @property
    def router(self) -> nn.Module:
        return self.recorder.router

    @property
    def stats(self) -> RoutingStats | None:
        return self.recorder.stats

    @property
    def aux_losses(self) -> dict[str, Tensor]:
        return self.recorder.aux_losses

    @property
    def balancers(self) -> list[Balancer]:
        return self.recorder.balancers

    @property
    def loss_weights(self) -> list[LossWeight]:
        offered = getattr(self.router, "scheduled_coefficients", None)
        return list(offered()) if callable(offered) else []

    @property
    def expert_bias(self) -> Tensor | None:
        return getattr(self.router, "expert_bias_E", None)

    def router_rows(self) -> list[Tensor]:
        scorer = getattr(self.router, "scorer", None)
        return scorer.expert_rows() if scorer is not None else []

    def router_parameters(self) -> list[nn.Parameter]:
        return list(self.router.parameters())

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



# Discovery caches one view per layer, keyed weakly by the layer, so hooks a view registers are
# registered once; code that changes a layer's layout (swapping its router) forgets the view.
_VIEWS: weakref.WeakKeyDictionary[nn.Module, MoELayerView] = weakref.WeakKeyDictionary()


def cached_view(module: nn.Module) -> MoELayerView | None:
    """The view discovery made of ``module`` earlier, if any."""
    return _VIEWS.get(module)


def remember_view(module: nn.Module, view: MoELayerView) -> None:
    """Cache ``view`` as the view of ``module``."""
    _VIEWS[module] = view


def forget_view(module: nn.Module) -> MoELayerView | None:
    """Drop the cached view of ``module`` (after its layout changed, e.g. its router was swapped) and
    return it; the next :func:`~lightning_moe.discovery.find_moe_layers` builds a new one."""
    return _VIEWS.pop(module, None)
