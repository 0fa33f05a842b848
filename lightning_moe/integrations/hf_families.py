"""What one Hugging Face MoE family is: the :class:`HFFamily` record that the table reads.

Legend: ``T`` tokens, ``D`` model width, ``E`` routed experts.

The table itself, :data:`~lightning_moe.integrations.hf.HF_FAMILIES` (family name -> record), sits
in :mod:`~lightning_moe.integrations.hf` next to the discovery views it names. Discovery, conversion
(:mod:`~lightning_moe.integrations.hf_convert`), :func:`~lightning_moe.integrations.hf_routers.swap_routers`
and the error messages read only these records, so a new family whose block has the usual structure
(``gate`` with an ``(E, D)`` weight, fused ``experts``) is one new entry; it needs its own view
class only when its scoring rule is not one :class:`HFFamily` can describe.

A setting is read as the family's forward reads it, from the first holder that has it: the
block's ``gate``, the block, then the block's ``config`` (``transformers`` 5.x gates carry their
settings; 4.x blocks or configs carry them for the per-expert layout).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from torch import Tensor, nn

from lightning_moe.layers.view import MoELayerView
from lightning_moe.routing.scorers import LinearScorer
from lightning_moe.routing.topk import GroupLimitedTopKRouter, TopKRouter

__all__ = ["HFFamily", "read_setting"]

#: Names a block's settings go by (first found wins), common to every family.
TOP_K_NAMES = ("top_k", "num_experts_per_tok")
NUM_GROUPS_NAMES = ("num_group", "n_group")
TOPK_GROUPS_NAMES = ("topk_group",)
JITTER_NAMES = ("jitter_noise",)


def read_setting(block: nn.Module, *names: str, default: Any = None) -> Any:
    """The first of ``names`` that is not ``None`` on ``block.gate``, ``block``, then ``block.config``.

    Raises ``AttributeError`` naming the block and ``names`` when none has it and ``default`` is ``None``.
    """
    for holder in (getattr(block, "gate", None), block, getattr(block, "config", None)):
        if holder is None:
            continue
        for name in names:
            value = getattr(holder, name, None)
            if value is not None:
                return value
    if default is None:
        raise AttributeError(f"{type(block).__name__} has none of {names} on its gate, itself or its config.")
    return default


@dataclass(frozen=True)
class HFFamily:
    """One Hugging Face MoE family: how to recognise its block, read its routing rule and map its weights.

    Every supported block has a ``gate`` (``(E, D)`` ``weight``; top-k read from ``top_k`` or
    ``num_experts_per_tok``) and ``experts``; a training-time ``jitter_noise`` on the block is read
    for every family (only Mixtral has one).

    Attributes:
        name: the family, equal to its ``config.model_type`` (``"mixtral"``).
        title: the family as prose names it in messages (``"Mixtral"``).
        block_classes: class names of its MoE block; a module matches when its class or a base class has
            one (discovery never imports ``transformers``). The first is the 5.x block that
            :func:`~lightning_moe.integrations.hf_convert.to_hugging_face` builds.
        block_module: the ``transformers`` module defining ``block_classes[0]``.
        view: the discovery view class (:class:`~lightning_moe.integrations.hf.HFMoEView` implements the
            rule these fields describe; a subclass only for a rule they cannot describe).
        score_func: ``"softmax"`` over the experts or ``"sigmoid"`` per expert (our ``score_func``).
        renormalize: whether the top-k weights are divided by their sum when ``renormalize_setting``
            is ``None`` or not found.
        renormalize_setting: the setting that says it (``norm_topk_prob``); ``None``: always ``renormalize``.
        group_score: group-limited selection (``"top2_sum"``: DeepSeek-V3), its groups read from
            ``num_group``/``n_group`` and ``topk_group``; ``None``: plain top-k.
        scaling_setting: the setting multiplying the top-k weights (``routed_scaling_factor``); ``None``: 1.
        expert_bias: the gate's buffer added to the scores for the choice only (``e_score_correction_bias``).
        shared_expert: the block's attribute holding its shared expert(s) MLP (``gate_proj``/``up_proj``/
            ``down_proj``); a zero-width one counts as none.
        shared_expert_gate: the block's attribute holding the shared expert's sigmoid gate (a ``(1, D)`` linear).
    """

    name: str
    title: str
    block_classes: tuple[str, ...]
    block_module: str
    view: type[MoELayerView]  # an HFMoEView subclass, built as view(name, block, num_experts, family)
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    renormalize: bool = False
    renormalize_setting: str | None = "norm_topk_prob"
    group_score: Literal["max", "top2_sum"] | None = None
    scaling_setting: str | None = None
    expert_bias: str | None = None
    shared_expert: str | None = None
    shared_expert_gate: str | None = None

    # -- routing rule ---------------------------------------------------------------------------

    def routing_settings(self, block: nn.Module) -> dict[str, Any]:
        """The block's routing rule as our router's keyword arguments (``num_groups`` and
        ``topk_groups`` only for a group-limited family)."""
        renormalize = self.renormalize
        if self.renormalize_setting is not None:
            renormalize = read_setting(block, self.renormalize_setting, default=renormalize)
        scaling = 1.0 if self.scaling_setting is None else read_setting(block, self.scaling_setting, default=1.0)
        settings = dict(top_k=int(read_setting(block, *TOP_K_NAMES)), renormalize=bool(renormalize),
                        score_func=self.score_func, scaling_factor=float(scaling),
                        jitter=float(read_setting(block, *JITTER_NAMES, default=0.0) or 0.0))
        if self.group_score is not None:
            num_groups = int(read_setting(block, *NUM_GROUPS_NAMES, default=1))
            settings.update(num_groups=num_groups, topk_groups=int(read_setting(block, *TOPK_GROUPS_NAMES,
                                                                                  default=num_groups)))
        return settings

    def build_router(self, d_model: int, num_experts: int, settings: dict[str, Any],
                     gating_kernel: Literal["auto", "triton", "torch"] = "auto") -> TopKRouter:
        """Our router for ``settings`` (:meth:`routing_settings`): a :class:`TopKRouter`, or a
        :class:`GroupLimitedTopKRouter` for a group-limited family (always torch: no ``gating_kernel``),
        with an ``expert_bias_E`` buffer when the family has an expert bias."""
        scorer = partial(LinearScorer, center_input=False)  # HF gates score the raw hidden states
        has_bias = self.expert_bias is not None
        if self.group_score is not None:
            return GroupLimitedTopKRouter(d_model, num_experts, group_score=self.group_score, expert_bias=has_bias,
                                          scorer=scorer, **settings)
        return TopKRouter(d_model, num_experts, expert_bias=has_bias, gating_kernel=gating_kernel, scorer=scorer,
                          **settings)

    def expert_bias_of(self, gate: nn.Module) -> Tensor | None:
        """The gate's selection bias (``(E,)``), ``None`` for a family without one."""
        return None if self.expert_bias is None else getattr(gate, self.expert_bias, None)

    # -- shared expert --------------------------------------------------------------------------

    def shared_mlp(self, block: nn.Module) -> nn.Module | None:
        """The block's shared expert(s) MLP, ``None`` without one or when it has zero width
        (DeepSeek-V3 with ``n_shared_experts=0`` builds one whose output is exactly 0)."""
        shared = None if self.shared_expert is None else getattr(block, self.shared_expert, None)
        weight = getattr(getattr(shared, "gate_proj", None), "weight", None)
        return None if isinstance(weight, Tensor) and weight.shape[0] == 0 else shared

    def shared_gate(self, block: nn.Module) -> nn.Module | None:
        """The shared expert's sigmoid gate, ``None`` without one (or without a shared expert to gate)."""
        if self.shared_expert_gate is None or self.shared_mlp(block) is None:
            return None
        return getattr(block, self.shared_expert_gate, None)

    # -- block class ----------------------------------------------------------------------------

    def block_class(self) -> type[nn.Module]:
        """The 5.x block class, imported from ``transformers``."""
        return getattr(importlib.import_module(self.block_module), self.block_classes[0])
