"""Discovery adapters for Hugging Face ``transformers`` MoE blocks.

Legend: ``T`` tokens, ``D`` model width, ``E`` routed experts, ``K`` experts per token,
``A`` assignments (``T * K``; these blocks are dropless).

:func:`~lightning_moe.discovery.find_moe_layers` registers :func:`hf_moe_view` as an adapter when
``transformers`` is installed (discovery imports this module, never the other way round). Nothing here imports
``transformers``: blocks are matched by class name (the block's class or one of its base
classes) and by structure, so the adapters survive other ``transformers`` versions.

Supported families (``family`` of the view, block class; each is one :class:`HFFamily` entry of
:data:`HF_FAMILIES`, which discovery, conversion, ``swap_routers`` and the error messages all read):

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

Another family with this structure is one more :data:`HF_FAMILIES` entry (a block sharing a
family's structure and rule: one more name in that entry's ``block_classes``); it needs its own
view class only when :class:`HFFamily` cannot describe its scoring rule.

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

from lightning_moe.integrations.hf_families import TOP_K_NAMES, HFFamily, read_setting
from lightning_moe.layers.record import RoutingRecorder
from lightning_moe.layers.stats import RoutingStats
from lightning_moe.layers.view import MoELayerView, RecorderView
from lightning_moe.routing.routing import Router
from lightning_moe.routing.topk import group_limited_mask

__all__ = [
    "HF_FAMILIES",
    "DeepseekV3View",
    "HFFamily",
    "HFMoEView",
    "MixtralView",
    "OlmoeView",
    "Qwen2MoeView",
    "Qwen3MoeView",
    "SwappedRouterView",
    "disable_router_aux_loss",
    "family_of",
    "find_hf_blocks",
    "fused_expert_tensors",
    "hf_moe_view",
    "supported_families",
    "transformers_version",
]


class HFMoEView(MoELayerView):
    """View of a Hugging Face sparse MoE block (``gate`` + ``experts``) of the family ``spec``.

    Its routing rule (softmax or sigmoid scores, a selection bias, group-limited top-k,
    renormalisation, scaling) is the one ``spec`` describes, as our routers compute it; a family
    whose rule ``spec`` cannot describe overrides :meth:`normalised_scores` and :meth:`select_experts`.
    ``family`` is ``spec.name``.
    """

    def __init__(self, name: str, module: nn.Module, num_experts: int, spec: HFFamily) -> None:
        super().__init__(name, module, num_experts)
        self.spec = spec
        self.family = spec.name
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
    def expert_bias(self) -> Tensor | None:
        return self.spec.expert_bias_of(self.gate)

    @property
    def top_k(self) -> int:
        return int(read_setting(self.module, *TOP_K_NAMES))

    def remove_hook(self) -> None:
        """Remove the gate hook; ``stats`` then stays at the last forward seen."""
        self._hook.remove()

    # -- routing rule -------------------------------------------------------------------------

    def _affinity(self, logits_TE: Tensor) -> Tensor:
        """``(T, E)`` scores the gate weights come from: softmax, or sigmoid per expert."""
        return logits_TE.softmax(dim=-1) if self.spec.score_func == "softmax" else logits_TE.sigmoid()

    def normalised_scores(self, logits_TE: Tensor) -> Tensor:
        """``(T, E)`` float32 scores summing to 1 per token (softmax, or sigmoid over its sum)."""
        scores_TE = self._affinity(logits_TE)
        return scores_TE if self.spec.score_func == "softmax" else scores_TE / scores_TE.sum(dim=-1, keepdim=True)

    def select_experts(self, logits_TE: Tensor) -> tuple[Tensor, Tensor]:
        """The family's own top-k rule: ``(T, K)`` indices and gate weights, from float32 logits.

        Used only when the gate's output does not carry the chosen experts (4.x ``nn.Linear`` gate).
        """
        settings = self.spec.routing_settings(self.module)
        scores_TE = self._affinity(logits_TE)
        choice_TE = scores_TE
        bias_E = self.expert_bias
        if bias_E is not None:
            choice_TE = scores_TE + bias_E.float()
        if self.spec.group_score is not None:
            mask_TE = group_limited_mask(choice_TE, settings["num_groups"], settings["topk_groups"],
                                         self.spec.group_score)
            choice_TE = choice_TE.masked_fill(~mask_TE, float("-inf"))
        indices_TK = torch.topk(choice_TE, settings["top_k"], dim=-1).indices
        weights_TK = scores_TE.gather(1, indices_TK)
        if settings["renormalize"]:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return indices_TK, weights_TK * settings["scaling_factor"]

    # -- parameters ---------------------------------------------------------------------------

    def router_rows(self) -> list[Tensor]:
        gate = self.gate
        rows = [gate.weight]
        bias = getattr(gate, "bias", None)
        if isinstance(bias, Tensor) and bias.dim() >= 1 and bias.shape[0] == self.num_experts:
            rows.append(bias)
        return rows

    def router_parameters(self) -> list[nn.Parameter]:
        return list(self.gate.parameters())

    def expert_tensors(self) -> list[Tensor]:
        if not self.fused:
            return []
        return fused_expert_tensors(self.module.experts, self.num_experts)

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


# Named views of the first families, kept for ``isinstance`` checks; their rule is HFMoEView's.
class MixtralView(HFMoEView):
    """Mixtral: softmax top-k, top-k weights always renormalised."""


class Qwen2MoeView(HFMoEView):
    """Qwen2-MoE: softmax top-k; the shared expert and its sigmoid gate are left alone."""


class Qwen3MoeView(HFMoEView):
    """Qwen3-MoE: softmax top-k."""


class OlmoeView(HFMoEView):
    """OLMoE: softmax top-k."""


class DeepseekV3View(HFMoEView):
    """DeepSeek-V3: sigmoid scores, bias-corrected group-limited top-k, routed scaling factor."""


class SwappedRouterView(RecorderView):
    """View of a supported block whose ``gate`` is a ``RouterGate`` (one of our routers, put there by
    :func:`~lightning_moe.integrations.hf_routers.swap_routers`): the same view as our layers', with
    the gate as the recorder (``stats``, ``aux_losses``, ``balancers``, the router's bias and rows)
    and the block's fused experts as expert tensors. ``family`` is the block's family. It registers
    no hook.
    """

    def __init__(self, name: str, module: nn.Module, family: str) -> None:
        super().__init__(name, module, module.gate.router.num_experts, family)

    @property
    def recorder(self) -> RoutingRecorder:
        return self.module.gate

    def expert_tensors(self) -> list[Tensor]:
        return fused_expert_tensors(self.module.experts, self.num_experts)

    def revive(self, dead: Sequence[int], sources: Sequence[int], noise: float,
               generator: torch.Generator | None = None) -> list[tuple[Tensor, list[int] | None]]:
        return MoELayerView.revive(self, dead, sources, noise, generator)


_MODELS = "transformers.models."

#: Family name (= ``config.model_type``) -> :class:`HFFamily`: the one table of supported Hugging Face
#: MoE families. Discovery, conversion, ``swap_routers`` and the error messages read only this.
HF_FAMILIES: dict[str, HFFamily] = {family.name: family for family in (
    HFFamily("mixtral", "Mixtral", ("MixtralSparseMoeBlock",), _MODELS + "mixtral.modeling_mixtral", MixtralView,
             renormalize=True, renormalize_setting=None),
    HFFamily("qwen2_moe", "Qwen2-MoE", ("Qwen2MoeSparseMoeBlock",), _MODELS + "qwen2_moe.modeling_qwen2_moe",
             Qwen2MoeView, shared_expert="shared_expert", shared_expert_gate="shared_expert_gate"),
    HFFamily("qwen3_moe", "Qwen3-MoE", ("Qwen3MoeSparseMoeBlock",), _MODELS + "qwen3_moe.modeling_qwen3_moe",
             Qwen3MoeView),
    HFFamily("olmoe", "OLMoE", ("OlmoeSparseMoeBlock",), _MODELS + "olmoe.modeling_olmoe", OlmoeView),
    HFFamily("deepseek_v3", "DeepSeek-V3", ("DeepseekV3MoE",), _MODELS + "deepseek_v3.modeling_deepseek_v3",
             DeepseekV3View, score_func="sigmoid", renormalize=True, group_score="top2_sum",
             scaling_setting="routed_scaling_factor", expert_bias="e_score_correction_bias",
             shared_expert="shared_experts"),
)}


def family_of(module: nn.Module) -> HFFamily | None:
    """The :data:`HF_FAMILIES` entry whose ``block_classes`` has the name of ``module``'s class or of
    one of its base classes (the nearest class first; the structure is not checked here), else ``None``."""
    for cls in type(module).__mro__:
        for family in HF_FAMILIES.values():
            if cls.__name__ in family.block_classes:
                return family
    return None


def supported_families() -> str:
    """``"Mixtral, ..., OLMoE and DeepSeek-V3"``: the families' titles, for messages."""
    titles = [family.title for family in HF_FAMILIES.values()]
    return f"{', '.join(titles[:-1])} and {titles[-1]}" if len(titles) > 1 else "".join(titles)


def find_hf_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` of every module of ``model`` whose class matches :data:`HF_FAMILIES`,
    outermost only, in module order (``model`` itself included)."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix, _ in found):
            continue
        if family_of(module) is not None:
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
    family = family_of(module)
    if family is None:
        return None
    gate = getattr(module, "gate", None)
    experts = getattr(module, "experts", None)
    if isinstance(getattr(gate, "router", None), Router) and isinstance(experts, nn.Module):  # swap_routers' gate
        return SwappedRouterView(name, module, family.name)
    weight = getattr(gate, "weight", None)
    if not (isinstance(gate, nn.Module) and isinstance(experts, nn.Module) and isinstance(weight, Tensor)
            and weight.dim() == 2):
        return _unsupported(name, module, "no `gate` with a 2-D (E, D) weight and `experts` module")
    num_experts = weight.shape[0]
    if isinstance(experts, nn.ModuleList):
        if len(experts) != num_experts:
            return _unsupported(name, module, f"{len(experts)} expert modules for {num_experts} router rows")
    elif not fused_expert_tensors(experts, num_experts):
        return _unsupported(name, module, f"no expert parameter whose dim 0 has the {num_experts} experts")
    # A deep-copied or unpickled model carries the views its gates' hooks belong to: reuse them.
    for hook in gate._forward_hooks.values():
        view = getattr(hook, "__self__", None)
        if isinstance(view, HFMoEView) and view._module_ref() is module:
            view.name = name
            return view
    return family.view(name, module, num_experts, family)


def fused_expert_tensors(experts: nn.Module, num_experts: int) -> list[Tensor]:
    """The parameters of a fused ``experts`` module whose dim 0 indexes its ``num_experts`` experts."""
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
    """``RoutingStats.from_routing`` without its ``bincount`` (which synchronises on CUDA).

    ``indices_TK`` holds each token's experts in token-major order (``T * K`` of them), so the
    assignments' tokens are ``0, 0, ..., 1, 1, ...``, ``K`` each.
    """
    num_tokens = scores_TE.shape[0]
    expert_A = indices_TK.reshape(-1).long()
    per_token = expert_A.numel() // max(num_tokens, 1)
    # expand + reshape, not repeat_interleave (which reads its output size from the device).
    token_A = torch.arange(num_tokens, device=expert_A.device)[:, None].expand(num_tokens, per_token).reshape(-1)
    counts_E = torch.zeros(num_experts, dtype=torch.long, device=expert_A.device)
    counts_E.scatter_add_(0, expert_A, torch.ones_like(expert_A))
    entropy_T = -torch.special.xlogy(scores_TE, scores_TE).sum(dim=-1)
    return RoutingStats(
        tokens_per_expert_E=counts_E,
        mean_score_E=scores_TE.mean(dim=0),
        entropy=entropy_T.mean(),
        num_dropped=torch.zeros((), dtype=torch.long, device=scores_TE.device),
        num_tokens=num_tokens,
        token_A=token_A,
        expert_A=expert_A,
    )
