"""Conversion both ways between Hugging Face ``transformers`` MoE blocks and :class:`MoELayer`.

Legend: ``T`` tokens, ``D`` model width, ``E`` routed experts, ``F`` expert hidden width,
``S`` shared-expert hidden width (all shared experts together).

Supported blocks (the families of :data:`~lightning_moe.integrations.hf.HF_FAMILIES`; a block
matches by its class or a base class name) and the router each one becomes (everything below is
read from the family's :class:`~lightning_moe.integrations.hf_families.HFFamily` entry):

- ``mixtral`` (``MixtralSparseMoeBlock``): :class:`TopKRouter`, softmax, always renormalised. The
  block's ``jitter_noise`` becomes our ``jitter`` (with a warning: Mixtral also jitters the experts'
  input, ours only the router's, so training-mode outputs differ; eval outputs are the same).
- ``qwen2_moe`` (``Qwen2MoeSparseMoeBlock``): softmax, ``renormalize=norm_topk_prob``, plus the
  shared expert and its sigmoid ``shared_expert_gate`` (``shared_gate=True``).
- ``qwen3_moe`` (``Qwen3MoeSparseMoeBlock``) and ``olmoe`` (``OlmoeSparseMoeBlock``): softmax,
  ``renormalize=norm_topk_prob``.
- ``deepseek_v3`` (``DeepseekV3MoE``): :class:`GroupLimitedTopKRouter` with sigmoid scores,
  ``group_score="top2_sum"``, ``num_groups=n_group``, ``topk_groups=topk_group``,
  ``renormalize=norm_topk_prob``, ``scaling_factor=routed_scaling_factor`` and ``expert_bias=True``
  holding ``e_score_correction_bias``; plus the (ungated) shared experts, absent from our layer
  when the block's are zero-width (``n_shared_experts=0``: their output is exactly 0).

Only the fused layout of ``transformers`` >= 5 converts (``experts`` holds 3-D tensors); the
per-expert 4.x layout (``experts`` an ``nn.ModuleList``) raises a ``ValueError`` naming the
installed version. Every expert must use ``silu`` (SwiGLU).

Weight layout, HF 5.x -> ours (HF applies ``F.linear(x, W) = x @ W.T``, we apply ``x @ W``):

- ``gate.weight`` (E, D) -> ``router.scorer.weight_ED`` (E, D), as is;
- ``gate.e_score_correction_bias`` (E) -> ``router.expert_bias_E`` (E), as is (DeepSeek-V3);
- ``experts.gate_up_proj`` (E, 2F, D): rows ``[:F]`` -> ``experts.w_gate_EDF`` and rows ``[F:]``
  -> ``experts.w_up_EDF``, both (E, D, F), transposed;
- ``experts.down_proj`` (E, D, F) -> ``experts.w_out_EFD`` (E, F, D), transposed;
- ``shared_expert`` (Qwen2-MoE) or ``shared_experts`` (DeepSeek-V3) ``gate_proj``/``up_proj``/
  ``down_proj`` -> ``shared_expert.gate``/``up``/``out`` (``nn.Linear`` weights, S = their width), as is;
- ``shared_expert_gate.weight`` (1, D) -> ``shared_expert_gate.weight`` (1, D), as is.

Converted tensors keep the block's device, dtype and ``requires_grad``. Our scorers compute the
router logits in float32; Mixtral and the Qwen/OLMoE gates compute them in the model's dtype, so in
bf16 the two can pick different experts on near-ties (in float32 they agree).

Both 5.x blocks and :class:`MoELayer` map ``(batch, seq, D)`` to the same shape, so a layer is a drop-in
for a block inside a decoder layer: :func:`to_lightning_moe` and :func:`to_hugging_face` swap them
in a whole model. After :func:`to_lightning_moe` the state-dict keys of the MoE layers are ours:
call :func:`to_hugging_face` before ``save_pretrained``.

The load-balancing loss. Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE models add
``router_aux_loss_coef * load_balancing_loss_func(...)`` (DeepSeek-V3 has none); conversion does
not carry it over (the ``balancers`` argument does). With ``c = router_aux_loss_coef``, top-``K``
routing, ``E`` experts and ``L`` MoE blocks (the layers whose gates record logits, not
``num_hidden_layers`` when some are dense), ``transformers`` computes ``c * E * sum_e fbar_e * Pbar_e``
where ``fbar_e`` counts a token's ``K`` choices as ``K`` (it sums to ``K``) and both ``fbar`` and
``Pbar`` are pooled over all ``L`` layers' tokens; :class:`~lightning_moe.balancing.SwitchAuxLoss`
divides its counts by the assignments (they sum to 1) and is computed per layer. Hence, exactly:

- one block: ``c * HF loss == SwitchAuxLoss(coeff=K * c)`` on the same routing;
- ``L`` blocks: ``c * HF loss == SwitchAuxLoss(coeff=K * c)`` on all layers' tokens pooled in one
  routing. Per layer, ``SwitchAuxLoss(coeff=K * c / L)`` puts the same pressure on each layer's
  scores, with that layer's own expert load in place of the load averaged over layers: the losses
  and their gradients are equal when every layer has the same load, and otherwise the sum over
  layers exceeds ``c * HF loss`` by ``K * c * E * sum_e Cov_l(f_le, P_le)`` (covariance over the
  layers of each expert's load fraction and mean score).

So ``router_aux_loss_coef=0.001`` on a 32-layer top-2 Mixtral becomes ``SwitchAuxLoss(6.25e-5)``
per layer. ``transformers`` leaves padding tokens (``attention_mask``) out of its loss; ours counts
every token routed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_moe.balancing.losses import Balancer
from lightning_moe.integrations.hf import (
    HF_FAMILIES,
    HFFamily,
    disable_router_aux_loss,
    family_of,
    find_hf_blocks,
    transformers_version,
)
from lightning_moe.layers.moe_layer import MoELayer
from lightning_moe.routing.routing import Router
from lightning_moe.routing.scorers import LinearScorer
from lightning_moe.routing.topk import GroupLimitedTopKRouter, TopKRouter

__all__ = ["hf_family", "moe_layer_from_hf", "moe_layer_to_hf", "to_hugging_face", "to_lightning_moe"]

# -- family and layout --------------------------------------------------------------------------


def _spec(block: nn.Module) -> HFFamily:
    """The block's :data:`~lightning_moe.integrations.hf.HF_FAMILIES` entry; ``ValueError`` listing the
    supported block classes for any other module."""
    family = family_of(block)
    if family is None:
        classes = ", ".join(c for f in HF_FAMILIES.values() for c in f.block_classes)
        raise ValueError(f"{type(block).__name__} is not a supported Hugging Face MoE block; supported block classes "
                         f"(or subclasses): {classes}.")
    return family


def hf_family(block: nn.Module) -> str:
    """The family of a Hugging Face MoE block (``"mixtral"``, ..., ``"deepseek_v3"``).

    Matched by class name, as discovery does (:data:`~lightning_moe.integrations.hf.HF_FAMILIES`).
    Raises ``ValueError`` listing the supported class names for any other module.
    """
    return _spec(block).name


def _is_silu(act: object) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation" or act is nn.functional.silu


def _check_layout(block: nn.Module, family: HFFamily) -> None:
    """Raise ``ValueError`` unless ``block`` has the fused 5.x layout with SwiGLU experts."""
    name = type(block).__name__
    experts = getattr(block, "experts", None)
    if isinstance(experts, nn.ModuleList):
        raise ValueError(f"{name} has the per-expert layout of transformers 4.x (`experts` is an nn.ModuleList); "
                         f"conversion needs transformers>=5 (installed: {transformers_version()}).")
    gate = getattr(block, "gate", None)
    if isinstance(getattr(gate, "router", None), Router):
        raise ValueError(f"{name}'s gate is a {type(gate).__name__} holding our {type(gate.router).__name__} "
                         "(swap_routers); convert the block before swapping its router.")
    if not isinstance(getattr(gate, "weight", None), Tensor) or not all(
            isinstance(getattr(experts, p, None), Tensor) for p in ("gate_up_proj", "down_proj")):
        raise ValueError(f"{name} has no `gate.weight` and fused `experts.gate_up_proj`/`experts.down_proj`; "
                         f"conversion needs the transformers>=5 layout (installed: {transformers_version()}).")
    flags = {"is_transposed": False, "is_concatenated": True, "has_bias": False, "has_gate": True,
             "has_post_expert_norm": False}
    odd = {k: getattr(experts, k) for k, v in flags.items() if getattr(experts, k, v) != v}
    if odd:
        raise ValueError(f"{name}.experts has an unsupported weight layout {odd}; expected {flags}.")
    for owner_name, owner in (("experts", experts), (family.shared_expert, family.shared_mlp(block))):
        act = getattr(owner, "act_fn", None)
        if owner is not None and not _is_silu(act):
            raise ValueError(f"{name}.{owner_name} uses the activation {type(act).__name__}; only silu (SwiGLU) "
                             f"experts convert to MoELayer.")


def _slots(block: nn.Module, family: HFFamily) -> list[tuple[str, str, Tensor]]:
    """``(our name, HF name, HF tensor viewed in our layout)`` for every tensor conversion copies.

    The views share storage with the block, so copying into them writes the block's weights.
    """
    experts = block.experts
    d_ff = experts.gate_up_proj.shape[1] // 2
    slots = [
        ("router.scorer.weight_ED", "gate.weight", block.gate.weight),
        ("experts.w_gate_EDF", "experts.gate_up_proj[:, :F] (transposed)", experts.gate_up_proj[:, :d_ff].mT),
        ("experts.w_up_EDF", "experts.gate_up_proj[:, F:] (transposed)", experts.gate_up_proj[:, d_ff:].mT),
        ("experts.w_out_EFD", "experts.down_proj (transposed)", experts.down_proj.mT),
    ]
    if family.expert_bias is not None:
        slots.append(("router.expert_bias_E", f"gate.{family.expert_bias}", family.expert_bias_of(block.gate)))
    shared = family.shared_mlp(block)
    if shared is not None:
        prefix = family.shared_expert
        slots += [(f"shared_expert.{ours}.weight", f"{prefix}.{theirs}.weight", getattr(shared, theirs).weight)
                  for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("out", "down_proj"))]
    shared_gate = family.shared_gate(block)
    if shared_gate is not None:
        slots.append(("shared_expert_gate.weight", f"{family.shared_expert_gate}.weight", shared_gate.weight))
    return slots


# -- HF -> ours ----------------------------------------------------------------------------------


def _assign(layer: nn.Module, name: str, tensor: Tensor, requires_grad: bool) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = layer.get_submodule(owner_name)
    if attr in owner._buffers:
        setattr(owner, attr, tensor)
    else:
        setattr(owner, attr, nn.Parameter(tensor, requires_grad=requires_grad))


def _no_meta_left(module: nn.Module, what: str, mapping: str) -> None:
    """After filling a module built on the meta device: ``RuntimeError`` naming any tensor ``mapping`` missed."""
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:  # pragma: no cover - a new tensor that the mapping does not know
        raise RuntimeError(f"{what} left {left} uninitialised; {mapping} must map them.")


def moe_layer_from_hf(block: nn.Module, dispatcher: str = "auto", balancers: Sequence[Balancer] = (),
                      gating_kernel: str = "auto") -> MoELayer:
    """A :class:`MoELayer` computing the same function as a 5.x Hugging Face MoE block.

    The router follows the family's exact rule (see the module docstring) and every weight is
    copied (router, experts, shared expert(s), shared gate, DeepSeek's correction bias), on the
    block's device and dtype. The layer is built on the meta device first, so no second full-size
    copy of the experts is allocated. The block is left unchanged.

    The model's own load-balancing loss (``router_aux_loss_coef``) is not carried over. To keep its
    pressure, pass ``balancers=[SwitchAuxLoss(coeff=K * router_aux_loss_coef / L)]`` for a model of
    ``L`` MoE blocks routing to top-``K`` (``K * router_aux_loss_coef`` for a single block: exact;
    for ``L`` blocks, exact when the layers' loads agree; the module docstring gives the relation).

    Args:
        block: a supported block (:func:`hf_family`).
        dispatcher: our dispatch backend (``loop``, ``grouped``, ...).
        balancers: auxiliary losses the layer computes.
        gating_kernel: :class:`TopKRouter`'s ``gating_kernel`` (softmax families; DeepSeek's
            group-limited router always uses torch).

    Raises:
        ValueError: not a supported block, the 4.x per-expert layout, a non-silu activation.
    """
    if gating_kernel not in ("auto", "triton", "torch"):
        raise ValueError(f"`gating_kernel` must be 'auto', 'triton' or 'torch', got {gating_kernel!r}.")
    family = _spec(block)
    _check_layout(block, family)
    num_experts, d_model = block.gate.weight.shape
    d_ff = block.experts.gate_up_proj.shape[1] // 2
    settings = family.routing_settings(block)
    if settings["jitter"] > 0:
        warnings.warn(f"{type(block).__name__}.jitter_noise={settings['jitter']} becomes the router's `jitter`: in "
                      "training the block also jitters the experts' input, ours only the router's (eval is "
                      "identical).", stacklevel=2)
    shared = family.shared_mlp(block)
    with torch.device("meta"):
        router = family.build_router(d_model, num_experts, settings, gating_kernel)
        layer = MoELayer(d_model=d_model, d_ff=d_ff, num_experts=num_experts, router=router, balancers=balancers,
                         dispatcher=dispatcher, shared_d_ff=0 if shared is None else shared.gate_proj.weight.shape[0],
                         shared_gate=family.shared_gate(block) is not None)
    for ours, _, theirs in _slots(block, family):
        _assign(layer, ours, theirs.detach().clone(memory_format=torch.contiguous_format), theirs.requires_grad)
    _no_meta_left(layer, "moe_layer_from_hf", "_slots")
    return layer.train(block.training)


# -- ours -> HF ----------------------------------------------------------------------------------


def _differs(setting: str, ours: object, theirs: object, family: HFFamily) -> ValueError:
    return ValueError(f"The router's `{setting}` is {ours!r} but the {family.name} block needs {theirs!r}; "
                      f"this router cannot be represented by the block.")


def _check_router(layer: MoELayer, block: nn.Module, family: HFFamily) -> None:
    """Raise ``ValueError`` naming the first router setting the block cannot represent."""
    router = layer.router
    if type(router) not in (TopKRouter, GroupLimitedTopKRouter):
        grouped = [f.name for f in HF_FAMILIES.values() if f.group_score is not None]
        raise ValueError(f"The router is a {type(router).__name__}; {family.name} blocks represent only TopKRouter "
                         f"(and GroupLimitedTopKRouter for {', '.join(grouped) or 'no family'}).")
    if type(router.scorer) is not LinearScorer:
        raise ValueError(f"The router's scorer is a {type(router.scorer).__name__}; HF blocks have a linear gate "
                         "(LinearScorer).")
    want = family.routing_settings(block)
    for setting in ("score_func", "top_k", "renormalize", "scaling_factor", "jitter"):
        ours, theirs = getattr(router, setting), want[setting]
        if ours != theirs and not (isinstance(ours, float) and math.isclose(ours, theirs, rel_tol=1e-6)):
            raise _differs(setting, ours, theirs, family)
    _check_groups(router, want, family)
    bias = router.expert_bias_E
    if family.expert_bias is None and bias is not None and bool(bias.any()):
        raise ValueError(f"The router has a non-zero `expert_bias_E`; {family.name} blocks have no expert bias.")
    if layer.capacity is not None:
        raise ValueError(f"The layer has an expert `capacity` ({layer.capacity}); HF blocks are dropless.")
    if router.scorer.center_input:
        raise ValueError("The router's scorer centres its input (`center_input=True`); HF gates score the raw hidden "
                         "states. Build the scorer with center_input=False to convert.")


def _check_groups(router: TopKRouter, want: dict, family: HFFamily) -> None:
    """Group-limited selection must match the family's (an unrestricted one matches any unrestricted one)."""
    grouped = isinstance(router, GroupLimitedTopKRouter)
    if family.group_score is None:
        if grouped and router.topk_groups < router.num_groups:
            raise _differs("topk_groups", router.topk_groups, router.num_groups, family)
        return
    ours = (router.num_groups, router.topk_groups) if grouped else (1, 1)
    theirs = (want["num_groups"], want["topk_groups"])
    if ours[0] == ours[1] and theirs[0] == theirs[1]:
        return  # no group restriction on either side
    for setting, o, t in zip(("num_groups", "topk_groups"), ours, theirs, strict=True):
        if o != t:
            raise _differs(setting, o, t, family)
    if router.group_score != family.group_score:
        raise _differs("group_score", router.group_score, family.group_score, family)


def _check_shared(layer: MoELayer, block: nn.Module, family: HFFamily) -> None:
    has_shared = family.shared_mlp(block) is not None
    has_gate = family.shared_gate(block) is not None
    if (layer.shared_expert is not None) != has_shared:
        raise ValueError(f"The layer has shared_d_ff={layer.shared_d_ff} but the {family.name} block "
                         f"{'has' if has_shared else 'has no'} shared expert.")
    if (layer.shared_expert_gate is not None) != has_gate:
        raise ValueError(f"The layer {'has' if layer.shared_expert_gate is not None else 'has no'} "
                         f"`shared_expert_gate` but the {family.name} block {'has' if has_gate else 'has none'}.")


def moe_layer_to_hf(layer: MoELayer, block: nn.Module) -> nn.Module:
    """Copy ``layer``'s weights into ``block``, an existing HF block of a supported family; returns it.

    Everything is checked before anything is copied: the block's layout (:func:`moe_layer_from_hf`),
    the router (a :class:`TopKRouter` or, for DeepSeek-V3, :class:`GroupLimitedTopKRouter` with a
    :class:`LinearScorer` and the block's score function, ``top_k``, renormalisation, scaling, jitter
    and groups), the shared expert and its gate, no capacity limit, and every tensor's shape. The
    block keeps its device and dtype. Our balancers and dispatcher have no HF counterpart.

    Raises:
        ValueError: naming the incompatible setting, or the tensor and both shapes.
    """
    if not isinstance(layer, MoELayer):
        raise ValueError(f"`layer` must be a MoELayer, got {type(layer).__name__}.")
    family = _spec(block)
    _check_layout(block, family)
    _check_shared(layer, block, family)
    _check_router(layer, block, family)
    ours = dict(layer.named_parameters()) | dict(layer.named_buffers())
    if family.expert_bias is not None and layer.router.expert_bias_E is None:
        ours["router.expert_bias_E"] = torch.zeros(layer.num_experts)
    slots = _slots(block, family)
    for name, hf_name, theirs in slots:
        if ours[name].shape != theirs.shape:
            raise ValueError(f"Shape mismatch: our `{name}` has shape {tuple(ours[name].shape)} but the block's "
                             f"`{hf_name}` has {tuple(theirs.shape)} in our layout; build the block from a config "
                             "with the layer's sizes.")
    with torch.no_grad():
        for name, _, theirs in slots:
            theirs.copy_(ours[name])
    return block


# -- whole models --------------------------------------------------------------------------------


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def to_lightning_moe(model: nn.Module, dispatcher: str = "auto", balancers: Sequence[Balancer] = ()) -> list[str]:
    """Replace every supported HF MoE block inside ``model`` by its :class:`MoELayer`, in place.

    Returns the qualified names replaced, in module order. The model's forward (and its loss with
    ``labels``) then runs through our layers; their auxiliary losses, from ``balancers`` (the same
    instances in every layer, as :class:`~lightning_moe.models.MoETransformer` does), are read
    through :func:`~lightning_moe.discovery.find_moe_layers` views' ``aux_losses``. HF's own
    load-balancing loss reads router logits recorded from the replaced gates, so a true
    ``config.output_router_logits`` is set to False (with a warning); do not pass
    ``output_router_logits=True`` to the converted model. Its pressure corresponds to
    ``SwitchAuxLoss(coeff=K * config.router_aux_loss_coef / L)`` for ``L`` = ``len(returned names)``
    (the module docstring gives the exact relation).

    Raises:
        ValueError: ``model`` is itself a block (convert it with :func:`moe_layer_from_hf`), or a
            block cannot convert (:func:`moe_layer_from_hf`).
    """
    if family_of(model) is not None:
        raise ValueError(f"`model` is itself a {type(model).__name__}; convert it with moe_layer_from_hf().")
    names = [name for name, _ in find_hf_blocks(model)]
    for name in names:
        _replace(model, name, moe_layer_from_hf(model.get_submodule(name), dispatcher, balancers))
    if names:
        disable_router_aux_loss(model, "to_lightning_moe")
    return names


def _family_of_type(model_type: str) -> HFFamily:
    if model_type not in HF_FAMILIES:
        raise ValueError(f"config.model_type={model_type!r} has no supported MoE block; supported model types: "
                         f"{', '.join(HF_FAMILIES)}.")
    return HF_FAMILIES[model_type]


def _empty_block(family: HFFamily, config: object, layer: MoELayer) -> nn.Module:
    """A block built from ``config`` on the layer's device, each tensor in the dtype of the tensor of ours
    it will receive (the router weight and the expert bias may be kept wider than the experts)."""
    weight = layer.experts.w_gate_EDF
    with torch.device(weight.device):
        block = family.block_class()(config).to(weight.dtype)
    scorer_weight = getattr(getattr(layer.router, "scorer", None), "weight_ED", None)
    if isinstance(scorer_weight, Tensor):
        block.gate.weight = nn.Parameter(block.gate.weight.to(scorer_weight.dtype))
    bias = family.expert_bias_of(block.gate)
    if isinstance(bias, Tensor):
        ours = getattr(layer.router, "expert_bias_E", None)  # float32 when absent: HF keeps this bias in float32
        setattr(block.gate, family.expert_bias, bias.to(torch.float32 if ours is None else ours.dtype))
    return block


def to_hugging_face(model: nn.Module) -> list[str]:
    """Replace every :class:`MoELayer` inside ``model`` by the HF block of ``model.config``'s family, in place.

    Each block is built from ``model.config`` with the family's class (``HFFamily.block_class``) on
    the layer's device, each tensor in the dtype of the tensor of ours it receives (so a round trip
    keeps a float32 router or correction bias in a bf16 model), then filled by
    :func:`moe_layer_to_hf`. Returns the qualified names replaced.

    Raises:
        ValueError: ``model`` has no ``config`` of a supported ``model_type``, or a layer does not fit
            the block the config describes (:func:`moe_layer_to_hf`).
    """
    if isinstance(model, MoELayer):
        raise ValueError("`model` is itself a MoELayer; convert it with moe_layer_to_hf(layer, block).")
    names = [name for name, module in model.named_modules() if isinstance(module, MoELayer)]
    if not names:
        return []
    config = getattr(model, "config", None)
    family = _family_of_type(getattr(config, "model_type", None))
    for name in names:
        layer = model.get_submodule(name)
        block = _empty_block(family, config, layer)
        _replace(model, name, moe_layer_to_hf(layer, block).train(layer.training))
    return names
