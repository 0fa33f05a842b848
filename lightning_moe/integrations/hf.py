"""Discovery adapters for Hugging Face ``transformers`` MoE blocks.

Legend: ``T`` tokens, ``D`` model width, ``E`` routed experts, ``K`` experts per token,
``A`` assignments (``T * K``; these blocks are dropless).

:func:`~lightning_moe.discovery.find_moe_layers` registers :func:`hf_moe_view` as an adapter when
``transformers`` is installed (discovery imports this module, never the other way round). Nothing here imports
``transformers``: blocks are matched by class name (the block's class or one of its base
classes) and by structure, so the adapters survive other ``transformers`` versions.

Supported families (``family`` of the view, block class):

- ``mixtral``: ``MixtralSparseMoeBlock``; softmax scores, top-k.
- ``qwen2_moe``: ``Qwen2MoeSparseMoeBlock``; softmax top-k. Its shared expert and the sigmoid
  ``shared_expert_gate`` are not routed experts: they are not counted and ``revive`` leaves them.
- ``qwen3_moe``: ``Qwen3MoeSparseMoeBlock``; softmax top-k.
- ``olmoe``: ``OlmoeSparseMoeBlock``; softmax top-k.
- ``deepseek_v3``: ``DeepseekV3MoE``; sigmoid scores, the ``e_score_correction_bias`` added for
  the choice only, group-limited top-k (``n_group`` groups scored by their top-2 sum, the best
  ``topk_group`` kept), routed scaling factor. The normalised scores of the statistics are the
  sigmoid scores divided by their sum (no bias). Shared experts are not routed experts; the first
  ``first_k_dense_replace`` layers are plain MLPs and are not found.

Layouts:

- ``transformers`` 5.x (fused): ``gate`` is a router module with a ``(E, D)`` ``weight`` that
  returns ``(logits, top-k weights, top-k indices)``; ``experts`` holds 3-D parameters whose dim
  0 indexes experts (``gate_up_proj``, ``down_proj``). Fully supported: statistics, router rows,
  expert tensors, bias, and the generic :meth:`~lightning_moe.discovery.MoELayerView.revive`.
- ``transformers`` 4.x (per expert): ``gate`` is an ``nn.Linear`` returning logits (DeepSeek-V3:
  a router returning ``(indices, weights)``) and ``experts`` an ``nn.ModuleList`` of MLPs.
  Supported: statistics (indices taken from the gate's output when it has them, else recomputed
  with the family's rule), router rows, bias, and ``revive``, which copies each expert module's
  parameters. ``expert_tensors()`` is empty for this layout (no tensor's dim 0 indexes experts),
  and ``revive`` returns whole per-expert parameters, whose rows do not index experts.

Each view registers one forward hook on the block's gate when it is created. The hook reads the
gate's input and output under ``torch.no_grad()`` and changes neither; it stores a detached
:class:`~lightning_moe.layers.RoutingStats` built without a host-device synchronisation. The
view holds its block through a weak reference, so a cached view does not keep a model alive; a
deep copy (or pickle) of a model carries copies of the views, bound to the copied blocks, and
``find_moe_layers`` on the copy returns those rather than hooking the gates a second time.

Other blocks with one of these structures and routing rules can be added to
:data:`HF_BLOCK_VIEWS` (class name -> view class).

A supported 5.x block whose gate :func:`~lightning_moe.integrations.hf_routers.swap_routers`
replaced with one of our routers gets a :class:`SwappedRouterView` instead: statistics, aux
losses, balancers, bias and router rows then come from that router, with no hook.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe.balancing.losses import Balancer
from lightning_moe.layers.stats import RoutingStats
from lightning_moe.layers.view import MoELayerView
from lightning_moe.routing.routing import Router

__all__ = [
    "HF_BLOCK_VIEWS",
    "DeepseekV3View",
    "HFMoEView",
    "MixtralView",
    "OlmoeView",
    "Qwen2MoeView",
    "Qwen3MoeView",
    "SwappedRouterView",
    "block_view_class",
    "disable_router_aux_loss",
    "find_hf_blocks",
    "hf_moe_view",
    "transformers_version",
]


class HFMoEView(MoELayerView):
    """View of a Hugging Face sparse MoE block (``gate`` + ``experts``) with softmax top-k routing.

    Subclasses set ``family`` and, for other scoring rules, override :meth:`normalised_scores`
    and :meth:`select_experts`.
    """

    family = "hf_moe"
    #: ``norm_topk_prob`` when neither the gate nor the block says (only the weights depend on it).
    default_norm_topk_prob = False

    def __init__(self, name: str, module: nn.Module, num_experts: int) -> None:
        super().__init__(name, module, num_experts)
        self._stats: RoutingStats | None = None
        self.fused = not isinstance(module.experts, nn.ModuleList)
        self._hook = module.gate.register_forward_hook(self._on_gate_forward, with_kwargs=True)

    @property
    def gate(self) -> nn.Module:
        return self.module.gate

    @property
    def stats(self) -> RoutingStats | None:
        return self._stats

    @property
    def top_k(self) -> int:
        return int(self._setting("top_k", "num_experts_per_tok"))

    def remove_hook(self) -> None:
        """Remove the gate hook; ``stats`` then stays at the last forward seen."""
        self._hook.remove()

    # -- routing rule -------------------------------------------------------------------------

    def normalised_scores(self, logits_TE: Tensor) -> Tensor:
        """``(T, E)`` float32 scores summing to 1 per token (softmax of the logits)."""
        return torch.softmax(logits_TE, dim=-1)

    def select_experts(self, logits_TE: Tensor) -> tuple[Tensor, Tensor]:
        """The family's own top-k rule: ``(T, K)`` indices and gate weights, from float32 logits.

        Used only when the gate's output does not carry the chosen experts (4.x ``nn.Linear`` gate).
        """
        probs_TE = torch.softmax(logits_TE, dim=-1)
        weights_TK, indices_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self._setting("norm_topk_prob", default=self.default_norm_topk_prob):
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return indices_TK, weights_TK

    # -- parameters ---------------------------------------------------------------------------

    def router_rows(self) -> list[Tensor]:
        gate = self.gate
        rows = [gate.weight]
        bias = getattr(gate, "bias", None)
        if isinstance(bias, Tensor) and bias.dim() >= 1 and bias.shape[0] == self.num_experts:
            rows.append(bias)
        return rows

    def expert_tensors(self) -> list[Tensor]:
        if not self.fused:
            return []
        return _fused_expert_tensors(self.module.experts, self.num_experts)

    @torch.no_grad()
    def revive(self, dead: Sequence[int], sources: Sequence[int], noise: float,
               generator: torch.Generator | None = None) -> list[tuple[Tensor, list[int] | None]]:
        if self.fused:
            return super().revive(dead, sources, noise, generator)
        if len(dead) != len(sources):
            raise ValueError(f"`dead` ({len(dead)}) and `sources` ({len(sources)}) must have the same length.")
        experts = self.module.experts
        changed: list[tuple[Tensor, list[int] | None]] = []
        for dst, src in zip(dead, sources, strict=True):
            for p_dst, p_src in zip(experts[dst].parameters(), experts[src].parameters(), strict=True):
                source = p_src.float()
                scale = source.std() if source.numel() > 1 else source.abs()
                eps = torch.randn(source.shape, generator=generator, dtype=torch.float32)
                p_dst.copy_((source + noise * scale * eps.to(source.device)).to(p_dst.dtype))
                changed.append((p_dst, None))  # the whole tensor belongs to the revived expert
        # Router rows and the bias offset: the base class (expert_tensors() is empty here).
        return changed + super().revive(dead, sources, noise, generator)

    # -- hook ---------------------------------------------------------------------------------

    def _setting(self, *names: str, default: Any = None) -> Any:
        """First of ``names`` found on the gate, the block, then the block's config."""
        module = self.module
        holders = (module.gate, module, getattr(module, "config", None))
        for holder in holders:
            if holder is None:
                continue
            for name in names:
                value = getattr(holder, name, None)
                if value is not None:
                    return value
        if default is None:
            raise AttributeError(f"{type(module).__name__} {self.name!r} has none of {names}.")
        return default

    @torch.no_grad()
    def _on_gate_forward(self, gate: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
        if not isinstance(hidden, Tensor):
            return
        weight = gate.weight
        num_experts = weight.shape[0]
        hidden_TD = hidden.detach().reshape(-1, weight.shape[1])

        logits, indices_TK = _parse_gate_output(output, num_experts)
        if logits is None or logits.numel() != hidden_TD.shape[0] * num_experts:
            bias = getattr(gate, "bias", None)
            bias = bias.detach().float() if isinstance(bias, Tensor) else None
            logits = F.linear(hidden_TD.float(), weight.detach().float(), bias)
        logits_TE = logits.detach().reshape(-1, num_experts).float()
        if indices_TK is None or indices_TK.numel() % hidden_TD.shape[0] != 0:
            indices_TK = self.select_experts(logits_TE)[0]
        self._stats = _stats_from(self.normalised_scores(logits_TE), indices_TK.detach(), num_experts)


class MixtralView(HFMoEView):
    """Mixtral: softmax top-k, top-k weights renormalised."""

    family = "mixtral"
    default_norm_topk_prob = True


class Qwen2MoeView(HFMoEView):
    """Qwen2-MoE: softmax top-k; the shared expert and its sigmoid gate are left alone."""

    family = "qwen2_moe"


class Qwen3MoeView(HFMoEView):
    """Qwen3-MoE: softmax top-k."""

    family = "qwen3_moe"


class OlmoeView(HFMoEView):
    """OLMoE: softmax top-k."""

    family = "olmoe"


class DeepseekV3View(HFMoEView):
    """DeepSeek-V3: sigmoid scores, bias-corrected group-limited top-k, routed scaling factor."""

    family = "deepseek_v3"
    default_norm_topk_prob = True

    @property
    def expert_bias(self) -> Tensor | None:
        return getattr(self.gate, "e_score_correction_bias", None)

    def normalised_scores(self, logits_TE: Tensor) -> Tensor:
        scores_TE = logits_TE.sigmoid()
        return scores_TE / scores_TE.sum(dim=-1, keepdim=True)

    def select_experts(self, logits_TE: Tensor) -> tuple[Tensor, Tensor]:
        num_experts = logits_TE.shape[-1]
        scores_TE = logits_TE.sigmoid()
        choice_TE = scores_TE
        bias = self.expert_bias
        if bias is not None:
            choice_TE = scores_TE + bias.float()
        num_group = int(self._setting("num_group", "n_group", default=1))
        topk_group = int(self._setting("topk_group", default=num_group))
        if num_group > 1:
            grouped = choice_TE.view(-1, num_group, num_experts // num_group)
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1)[0].sum(dim=-1)
            group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
            score_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, num_experts)
            choice_TE = choice_TE.masked_fill(~score_mask.bool(), float("-inf"))
        indices_TK = torch.topk(choice_TE, k=self.top_k, dim=-1, sorted=False)[1]
        weights_TK = scores_TE.gather(1, indices_TK)
        if self._setting("norm_topk_prob", default=self.default_norm_topk_prob):
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return indices_TK, weights_TK * float(self._setting("routed_scaling_factor", default=1.0))


class SwappedRouterView(MoELayerView):
    """View of a supported block whose ``gate`` is a ``RouterGate`` (one of our routers, put there by
    :func:`~lightning_moe.integrations.hf_routers.swap_routers`).

    Everything comes from the gate and the block's fused experts: ``stats``, ``aux_losses`` and
    ``balancers`` are the gate's, ``expert_bias`` the router's ``expert_bias_E``, ``router_rows()``
    its scorer's ``expert_rows()``. ``family`` is the block's family. It registers no hook.
    """

    def __init__(self, name: str, module: nn.Module, family: str) -> None:
        super().__init__(name, module, module.gate.router.num_experts)
        self.family = family

    @property
    def router(self) -> Router:
        return self.module.gate.router

    @property
    def stats(self) -> RoutingStats | None:
        return self.module.gate.stats

    @property
    def aux_losses(self) -> dict[str, Tensor]:
        return self.module.gate.aux_losses

    @property
    def balancers(self) -> list[Balancer]:
        return self.module.gate.balancers

    @property
    def expert_bias(self) -> Tensor | None:
        return getattr(self.router, "expert_bias_E", None)

    def router_rows(self) -> list[Tensor]:
        scorer = getattr(self.router, "scorer", None)
        return scorer.expert_rows() if scorer is not None else []

    def expert_tensors(self) -> list[Tensor]:
        return _fused_expert_tensors(self.module.experts, self.num_experts)


#: Block class name -> view class. A block matches when its class or one of its base classes has
#: one of these names (and it has the structure). Add entries for blocks that share a family's
#: structure and routing rule.
HF_BLOCK_VIEWS: dict[str, type[HFMoEView]] = {
    "MixtralSparseMoeBlock": MixtralView,
    "Qwen2MoeSparseMoeBlock": Qwen2MoeView,
    "Qwen3MoeSparseMoeBlock": Qwen3MoeView,
    "OlmoeSparseMoeBlock": OlmoeView,
    "DeepseekV3MoE": DeepseekV3View,
}


def block_view_class(module: nn.Module) -> type[HFMoEView] | None:
    """The view class of ``module``'s family when its class or a base class is in
    :data:`HF_BLOCK_VIEWS` (matched by name; the structure is not checked here), else ``None``."""
    return next((HF_BLOCK_VIEWS[c.__name__] for c in type(module).__mro__ if c.__name__ in HF_BLOCK_VIEWS), None)


def find_hf_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` of every module of ``model`` whose class matches :data:`HF_BLOCK_VIEWS`,
    outermost only, in module order (``model`` itself included)."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix, _ in found):
            continue
        if block_view_class(module) is not None:
            found.append((name, module))
    return found


def transformers_version() -> str:
    """The installed ``transformers`` version, for error messages (``"not installed"`` without it)."""
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def disable_router_aux_loss(model: nn.Module, why: str) -> bool:
    """Set ``output_router_logits = False`` on every config inside ``model`` that has it on, with a
    warning that starts with ``why``: the models' own load-balancing loss reads logits recorded by
    their original gates, which conversion and ``swap_routers`` remove. Returns whether any was on."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    turned_off = [c for c in configs.values() if getattr(c, "output_router_logits", False) is True]
    for config in turned_off:
        config.output_router_logits = False
    if turned_off:
        warnings.warn(f"{why} set `config.output_router_logits = False`: the model's own router aux loss reads the "
                      "original gates, which are gone. Use our balancers' aux losses (find_moe_layers views' "
                      "`aux_losses`) instead.", stacklevel=3)
    return bool(turned_off)


def hf_moe_view(name: str, module: nn.Module) -> MoELayerView | None:
    """The view of ``module`` when it is a supported Hugging Face MoE block, else ``None``."""
    view_cls = block_view_class(module)
    if view_cls is None:
        return None
    gate = getattr(module, "gate", None)
    experts = getattr(module, "experts", None)
    if isinstance(getattr(gate, "router", None), Router) and isinstance(experts, nn.Module):  # swap_routers' gate
        return SwappedRouterView(name, module, view_cls.family)
    weight = getattr(gate, "weight", None)
    if not (isinstance(gate, nn.Module) and isinstance(experts, nn.Module) and isinstance(weight, Tensor)
            and weight.dim() == 2):
        return _unsupported(name, module, "no `gate` with a 2-D (E, D) weight and `experts` module")
    num_experts = weight.shape[0]
    if isinstance(experts, nn.ModuleList):
        if len(experts) != num_experts:
            return _unsupported(name, module, f"{len(experts)} expert modules for {num_experts} router rows")
    elif not _fused_expert_tensors(experts, num_experts):
        return _unsupported(name, module, f"no expert parameter whose dim 0 has the {num_experts} experts")
    # A deep-copied or unpickled model carries the views its gates' hooks belong to: reuse them.
    for hook in gate._forward_hooks.values():
        view = getattr(hook, "__self__", None)
        if isinstance(view, HFMoEView) and view._module_ref() is module:
            view.name = name
            return view
    return view_cls(name, module, num_experts)




def _fused_expert_tensors(experts: nn.Module, num_experts: int) -> list[Tensor]:
    return [p for p in experts.parameters(recurse=False) if p.dim() >= 1 and p.shape[0] == num_experts]


def _unsupported(name: str, module: nn.Module, why: str) -> None:
    warnings.warn(f"{type(module).__name__} {name!r} looks like a Hugging Face MoE block but its layout is not "
                  f"supported ({why}); it is skipped by find_moe_layers.", stacklevel=3)
    return None


def _parse_gate_output(output: Any, num_experts: int) -> tuple[Tensor | None, Tensor | None]:
    """``(logits, indices)`` from a gate's output, ``None`` where it does not carry them.

    5.x routers return ``(logits, top-k weights, top-k indices)``; a 4.x ``nn.Linear`` gate returns
    the logits; the 4.x DeepSeek-V3 router returns ``(indices, weights)``.
    """
    if isinstance(output, Tensor):
        return (output if output.is_floating_point() and output.shape[-1] == num_experts else None), None
    if not isinstance(output, (tuple, list)) or not output:
        return None, None
    indices = next((t for t in output if isinstance(t, Tensor) and not t.is_floating_point()), None)
    first = output[0]
    is_logits = isinstance(first, Tensor) and first.is_floating_point() and first.shape[-1] == num_experts
    return (first if is_logits else None), indices


def _stats_from(scores_TE: Tensor, indices_TK: Tensor, num_experts: int) -> RoutingStats:
    """``RoutingStats.from_routing`` without its ``bincount`` (which synchronises on CUDA)."""
    expert_A = indices_TK.reshape(-1).long()
    counts_E = torch.zeros(num_experts, dtype=torch.long, device=expert_A.device)
    counts_E.scatter_add_(0, expert_A, torch.ones_like(expert_A))
    entropy_T = -torch.special.xlogy(scores_TE, scores_TE).sum(dim=-1)
    return RoutingStats(
        tokens_per_expert_E=counts_E,
        mean_score_E=scores_TE.mean(dim=0),
        entropy=entropy_T.mean(),
        num_dropped=torch.zeros((), dtype=torch.long, device=scores_TE.device),
        num_tokens=scores_TE.shape[0],
    )
