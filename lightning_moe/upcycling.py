"""Sparse upcycling: turn a dense model's FFNs into MoE layers whose experts start from them.

Two ways to build the experts from one dense FFN of width F (Komatsuzaki et al., "Sparse
Upcycling"; LLaMA-MoE and Qwen1.5-MoE for the fine-grained split):

- ``method="copy"``: every expert is the whole FFN.
- ``method="split"`` with ``granularity = m``: the FFN's F hidden neurons are cut into ``m``
  slices of width ``F / m`` (neurons ``[s F/m, (s+1) F/m)`` form slice ``s``); there are
  ``E / m`` copies of the set of slices and expert ``e`` is slice ``e % m`` of copy ``e // m``.
  Each slice's output projection is multiplied by ``m`` (LLaMA-MoE's scaling), so the experts
  average back to the FFN (below).

Optional ``noise >= 0`` perturbs every expert tensor: ``w + noise * std(w) * eps`` with ``eps``
standard normal, so that copies differ. Expert ``e`` of MoE layer ``l`` draws its noise from its
own generator, :func:`~lightning_moe.experts.protocol.expert_generator` ``(seed, l, e)``: the
upcycled model is the same whichever experts a rank holds, so under expert parallelism each rank
builds its own experts only (``experts``, the global indices; :func:`upcycle_state_dict` fills a
sharded model's rows).

Function preservation (``noise = 0``; ``FFN_s`` is the FFN restricted to slice ``s``, so that
``FFN = sum_s FFN_s`` for SwiGLU, and ``sum_s FFN_s + b_out`` with an output bias):

- ``copy`` with a router whose gates sum to 1 per token (``TopKRouter(renormalize=True)``, any
  ``top_k``, any router weights) gives exactly the dense output, to float rounding:
  ``sum_k g_k FFN(x) = FFN(x)``.
- ``split`` gives exactly the dense output only when every expert is active (``top_k = E``)
  with equal gates ``1/E`` (e.g. ``zero_router=True``: zeroed router rows give equal logits):
  ``sum_e (1/E) m FFN_{e % m}(x) = sum_s FFN_s(x)``. With ``top_k < E`` it is a different
  function. Under uniform routing (a uniformly random ``k``-subset with gates ``1/k``; each
  expert is chosen with probability ``k/E``) its expectation is the dense output, so it is an
  unbiased estimate of the dense FFN, not the same function; a learned router is not uniform.
- ``noise > 0`` breaks preservation in every case.

Output biases (MLP experts, BERT): the input bias is split with the neurons and the output
projection scaled by ``m``, but every expert keeps the whole output bias ``b_out``, unscaled:
``expert_e(x) = m W_out,s act(x W_in,s + b_in,s) + b_out``. The bias is a constant that gates
summing to 1 reproduce as is (``sum_e g_e b_out = b_out``), while the ``m`` on the projection
makes up for each expert holding ``1/m`` of the neurons; equivalently each slice carries
``b_out / m`` before the factor ``m``. Scaling the bias by ``m`` would add ``m b_out``.

Legend: ``D`` model width, ``F`` dense FFN width, ``E`` experts, ``m`` granularity,
``Fe`` expert width (``F`` for copy, ``F / m`` for split). Dense weights are in ``nn.Linear``
layout (out, in): ``w_gate_FD``, ``w_out_DF``; expert weights in grouped layout: ``w_gate_EDF``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_moe._validate import check_non_negative, check_positive_int, divisors
from lightning_moe.balancing.losses import Balancer
from lightning_moe.experts.mlp import MLPExperts
from lightning_moe.experts.protocol import expert_generator
from lightning_moe.experts.swiglu import SwiGLU
from lightning_moe.layers.config import MoEConfig
from lightning_moe.layers.moe_layer import MoELayer
from lightning_moe.models.transformer import MoETransformer
from lightning_moe.routing.capacity import ExpertCapacity
from lightning_moe.routing.factory import RouterFactory, build_router
from lightning_moe.routing.routing import Router
from lightning_moe.routing.topk import TopKRouter

__all__ = ["METHODS", "upcycle", "upcycle_hf_bert", "upcycle_mlp", "upcycle_moe_layer", "upcycle_state_dict",
           "upcycle_swiglu", "zero_router_rows"]

METHODS = ("copy", "split")
UpcycleMethod = Literal["copy", "split"]

# ---------------------------------------------------------------------------------------------
# Argument checks


def _check_method_and_noise(method: str, noise: float) -> float:
    if method not in METHODS:
        raise ValueError(f"Unknown upcycling `method` {method!r}; valid values are {list(METHODS)}.")
    return check_non_negative("noise", noise)


def _check_granularity(method: str, granularity: int, d_ff: int, num_experts: int) -> int:
    """Raise unless ``granularity`` fits ``method``, the FFN width and the expert count."""
    check_positive_int("granularity", granularity)
    if method == "copy" and granularity != 1:
        raise ValueError(f"`granularity` must be 1 with method='copy' (got {granularity}); use method='split'.")
    if d_ff % granularity:
        raise ValueError(f"`granularity` ({granularity}) must divide the dense FFN width d_ff={d_ff}; "
                         f"valid values: {divisors(d_ff)}.")
    check_positive_int("num_experts", num_experts)
    if num_experts % granularity:
        raise ValueError(f"`num_experts` ({num_experts}) must be a multiple of `granularity` ({granularity}) "
                         f"with method='split' (E / m copies of the m slices), e.g. {granularity * 2}.")
    return granularity


def _expert_indices(experts: Sequence[int] | None, num_experts: int) -> list[int]:
    """The global experts to build (all E when ``None``), checked against ``num_experts``."""
    indices = list(range(num_experts)) if experts is None else [int(e) for e in experts]
    if not indices or any(not 0 <= e < num_experts for e in indices):
        raise ValueError(f"`experts` must be global expert indices in [0, {num_experts}), got {experts!r}.")
    return indices


def _noise_generators(seed: int, layer: int, experts: Sequence[int]) -> list[torch.Generator]:
    """One generator per expert, seeded from ``(seed, layer, expert)``."""
    return [expert_generator(seed, layer, e) for e in experts]


# ---------------------------------------------------------------------------------------------
# Core: dense tensors -> grouped expert tensors


def _experts_from(t: Tensor, neuron_dim: int | None, experts: Sequence[int], granularity: int, scale: float,
                  noise: float, generators: Sequence[torch.Generator]) -> Tensor:
    """``(len(experts), ...)``: global expert ``e`` holds slice ``e % m`` of ``t`` along ``neuron_dim``
    (the whole tensor when ``None``), times ``scale``, plus noise from its own generator."""
    t = t.detach()
    if neuron_dim is None:
        pieces = [t] * len(experts)
    else:
        slices = t.chunk(granularity, dim=neuron_dim)
        pieces = [slices[e % granularity] for e in experts]
    stacked = torch.stack(pieces) * scale
    if noise == 0:
        return stacked
    # Each expert's noise is scaled by the std of its own (pre-noise) tensor.
    dtype = torch.promote_types(stacked.dtype, torch.float32)
    flat = stacked.to(dtype).flatten(1)
    std_E = flat.std(dim=1) if flat.shape[1] > 1 else flat.abs().squeeze(1)
    eps = torch.stack([torch.randn(stacked.shape[1:], generator=g, dtype=dtype) for g in generators])
    return (stacked.to(dtype) + noise * std_E.view(-1, *[1] * (stacked.dim() - 1)) * eps.to(stacked.device)).to(
        stacked.dtype)


def upcycle_swiglu(
    w_gate_FD: Tensor,
    w_up_FD: Tensor,
    w_out_DF: Tensor,
    num_experts: int,
    method: UpcycleMethod = "copy",
    granularity: int = 1,
    noise: float = 0.0,
    seed: int = 0,
    experts: Sequence[int] | None = None,
    layer: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """A dense SwiGLU FFN's weights -> ``(w_gate_EDF, w_up_EDF, w_out_EFD)`` of E experts.

    Takes ``SwiGLU``'s ``gate.weight`` ``(F, D)``, ``up.weight`` ``(F, D)`` and ``out.weight``
    ``(D, F)``; returns :class:`~lightning_moe.experts.SwiGLUExperts`' layout with
    ``Fe = F`` (copy) or ``F / granularity`` (split). See the module docstring for which
    routers preserve the dense function. ``experts`` (global indices in ``[0, num_experts)``,
    default all) chooses the rows built, e.g. one rank's under expert parallelism; expert ``e``'s
    noise comes from ``(seed, layer, e)`` whichever rows are built.
    """
    noise = _check_method_and_noise(method, noise)
    d_ff, d_model = w_gate_FD.shape
    if w_up_FD.shape != (d_ff, d_model) or w_out_DF.shape != (d_model, d_ff):
        raise ValueError(f"SwiGLU weights must be gate (F, D), up (F, D), out (D, F); got {tuple(w_gate_FD.shape)}, "
                         f"{tuple(w_up_FD.shape)}, {tuple(w_out_DF.shape)}.")
    m = _check_granularity(method, granularity, d_ff, num_experts)
    rows = _expert_indices(experts, num_experts)
    gens = _noise_generators(seed, layer, rows)
    w_gate_EDF = _experts_from(w_gate_FD.t(), 1, rows, m, 1.0, noise, gens)
    w_up_EDF = _experts_from(w_up_FD.t(), 1, rows, m, 1.0, noise, gens)
    w_out_EFD = _experts_from(w_out_DF.t(), 0, rows, m, float(m), noise, gens)
    return w_gate_EDF, w_up_EDF, w_out_EFD


def upcycle_mlp(
    w_in_FD: Tensor,
    b_in_F: Tensor | None,
    w_out_DF: Tensor,
    b_out_D: Tensor | None,
    num_experts: int,
    method: UpcycleMethod = "copy",
    granularity: int = 1,
    noise: float = 0.0,
    seed: int = 0,
    experts: Sequence[int] | None = None,
    layer: int = 0,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """A dense MLP ``act(x W_in^T + b_in) W_out^T + b_out`` -> ``(w_in_EDF, b_in_EF, w_out_EFD, b_out_ED)``.

    ``nn.Linear`` layout in (``(F, D)``, ``(D, F)``), :class:`~lightning_moe.experts.MLPExperts`'
    layout out. With split, ``b_in`` is cut with the neurons, ``W_out`` is multiplied by ``m``
    and ``b_out`` is copied whole and unscaled (module docstring). Missing biases stay ``None``.
    ``experts`` and ``layer`` as in :func:`upcycle_swiglu`.
    """
    noise = _check_method_and_noise(method, noise)
    d_ff, d_model = w_in_FD.shape
    if w_out_DF.shape != (d_model, d_ff):
        raise ValueError(f"MLP weights must be in (F, D) and out (D, F); got {tuple(w_in_FD.shape)}, "
                         f"{tuple(w_out_DF.shape)}.")
    m = _check_granularity(method, granularity, d_ff, num_experts)
    rows = _expert_indices(experts, num_experts)
    gens = _noise_generators(seed, layer, rows)
    w_in_EDF = _experts_from(w_in_FD.t(), 1, rows, m, 1.0, noise, gens)
    b_in_EF = None if b_in_F is None else _experts_from(b_in_F, 0, rows, m, 1.0, noise, gens)
    w_out_EFD = _experts_from(w_out_DF.t(), 0, rows, m, float(m), noise, gens)
    b_out_ED = None if b_out_D is None else _experts_from(b_out_D, None, rows, m, 1.0, noise, gens)
    return w_in_EDF, b_in_EF, w_out_EFD, b_out_ED


# ---------------------------------------------------------------------------------------------
# One MoE layer


def _router_rows(router: Router) -> list[Tensor]:
    scorer = getattr(router, "scorer", None)
    rows = scorer.expert_rows() if scorer is not None else []
    if not rows:
        raise ValueError(f"`zero_router=True` needs a router whose scorer has per-expert rows "
                         f"(`router.scorer.expert_rows()`); {type(router).__name__} has none.")
    return rows


def zero_router_rows(router: Router) -> None:
    """Zero ``router.scorer.expert_rows()``: equal logits, so equal gates (split's exact case)."""
    with torch.no_grad():
        for row in _router_rows(router):
            row.zero_()


def _split_factor(method: str, d_ff: int, expert_d_ff: int) -> int:
    """``m``: the dense width over the expert width, checked against ``method``."""
    if method == "copy" and d_ff != expert_d_ff:
        raise ValueError(f"Width mismatch: the dense FFN has d_ff={d_ff} but the experts have d_ff={expert_d_ff}; "
                         "method='copy' needs equal widths (method='split' needs d_ff = granularity * expert width).")
    if d_ff % expert_d_ff:
        raise ValueError(f"Width mismatch: the dense FFN width d_ff={d_ff} is not a multiple of the expert width "
                         f"{expert_d_ff}; method='split' needs d_ff = granularity * expert width.")
    return d_ff // expert_d_ff


@torch.no_grad()
def upcycle_moe_layer(
    layer: MoELayer,
    dense_ffn: SwiGLU | Mapping[str, Tensor],
    method: UpcycleMethod = "copy",
    noise: float = 0.0,
    seed: int = 0,
    layer_index: int = 0,
    zero_router: bool = False,
) -> None:
    """Fill ``layer``'s SwiGLU experts from a dense SwiGLU (or its state_dict: ``gate.weight``,
    ``up.weight``, ``out.weight``), in place.

    The granularity is the dense width over the expert width (1 for copy). Only the experts the
    layer holds are built (``layer.expert_rows``: this rank's once sharded for expert
    parallelism), expert ``e``'s noise from ``(seed, layer_index, e)``; lazily built experts of a
    layer not sharded yet get all E rows first (:meth:`MoELayer.materialize`). Shared experts, if the
    layer has them, get a zero output projection so that they add nothing at first (the function
    is kept; they learn from there). ``zero_router`` zeroes the router's expert rows.
    """
    state = dense_ffn.state_dict() if isinstance(dense_ffn, nn.Module) else dense_ffn
    if not {"gate.weight", "up.weight", "out.weight"} <= set(state):
        raise ValueError(f"`dense_ffn` must be a SwiGLU or hold 'gate.weight', 'up.weight', 'out.weight'; "
                         f"got keys {sorted(state)}.")
    w_gate_FD, w_up_FD, w_out_DF = state["gate.weight"], state["up.weight"], state["out.weight"]
    experts = layer.experts
    if zero_router:
        _router_rows(layer.router)  # fail before changing anything
    if not hasattr(experts, "w_gate_EDF"):
        raise ValueError(f"upcycle_moe_layer fills SwiGLUExperts; this layer has {type(experts).__name__}.")
    if w_gate_FD.shape[1] != layer.d_model:
        raise ValueError(f"Width mismatch: the dense FFN has d_model={w_gate_FD.shape[1]}, the MoE layer "
                         f"d_model={layer.d_model}.")
    m = _split_factor(method, w_gate_FD.shape[0], experts.d_ff)
    layer.materialize()
    rows = layer.expert_rows
    weights = upcycle_swiglu(w_gate_FD, w_up_FD, w_out_DF, layer.num_experts, method, m, noise, seed,
                             experts=range(rows.start, rows.stop), layer=layer_index)
    for target, source in zip((experts.w_gate_EDF, experts.w_up_EDF, experts.w_out_EFD), weights, strict=True):
        target.copy_(source)
    if layer.shared_expert is not None:
        layer.shared_expert.out.weight.zero_()
    if zero_router:
        zero_router_rows(layer.router)


# ---------------------------------------------------------------------------------------------
# MoETransformer


def _dense_config(model: MoETransformer) -> dict:
    """The constructor arguments that fix a dense MoETransformer's shapes."""
    if not isinstance(model, MoETransformer):
        raise TypeError(f"`model` must be a dense MoETransformer, got {type(model).__name__}.")
    moe = [i for i, block in enumerate(model.blocks) if isinstance(block.ffn, MoELayer)]
    if moe:
        raise ValueError(f"`model` already has MoE layers (blocks {moe}); upcycling needs a dense model "
                         "(MoETransformer(..., moe_every=0)).")
    return dict(vocab_size=model.embed.num_embeddings, max_seq_len=model.max_seq_len, d_model=model.d_model,
                n_layers=model.n_layers, n_heads=model.blocks[0].attn.n_heads, d_ff=model.blocks[0].ffn.d_ff,
                attention=model.attention, mla=model.mla, rope_base=model.rope_base,
                tie_embeddings=model.tie_embeddings, mtp_depth=model.mtp_depth, mtp_weight=model.mtp_weight.coeff)


def upcycle(
    model: MoETransformer,
    num_experts: int,
    router: RouterFactory = TopKRouter,
    method: UpcycleMethod = "copy",
    granularity: int = 1,
    noise: float = 0.0,
    seed: int = 0,
    moe_every: int = 1,
    dispatcher: str = "auto",
    balancers: Sequence[Balancer] = (),
    capacity: ExpertCapacity | None = None,
    first_dense_layers: int = 0,
    zero_router: bool = False,
) -> MoETransformer:
    """A new MoETransformer with ``model``'s dims and weights whose FFNs (where ``moe_every`` and
    ``first_dense_layers`` say) are MoE layers of ``num_experts`` experts upcycled from them.

    ``num_experts`` is the total E. For split the model is built as a fine-grained one,
    ``MoETransformer(moe=MoEConfig(num_experts=E // m, expert_d_ff=d_ff, granularity=m))``: E experts of width
    ``d_ff / m``, and each token reaches ``m`` times the router's ``top_k`` (so ``router``
    describes the same active width for either method, and ``model.granularity`` records ``m``
    for :func:`upcycle_state_dict`). ``model`` is not changed; the result is on its device and
    dtype, in its train/eval mode. Preservation: module docstring (e.g. copy with
    ``TopKRouter(renormalize=True)`` is exact).

    Args:
        model: a dense MoETransformer (``moe_every=0``); ``ValueError`` if it has MoE layers.
        num_experts: experts E per MoE layer, >= 1; a multiple of ``granularity`` for split.
        router: router factory ``router(d_model, E)``; freshly initialised from torch's global RNG.
        method: ``"copy"`` or ``"split"``.
        granularity: slices m per FFN for split, dividing ``d_ff``; must be 1 for copy.
        noise: relative noise added to each expert tensor, >= 0 (0 keeps exact copies/slices).
        seed: seeds the noise: expert ``e`` of the ``l``-th MoE layer draws from ``(seed, l, e)``.
        moe_every, first_dense_layers, dispatcher, balancers, capacity: as in MoETransformer.
        zero_router: zero the routers' expert rows (equal gates; split's exact case).
    """
    config = _dense_config(model)
    _check_method_and_noise(method, noise)
    m = _check_granularity(method, granularity, config["d_ff"], num_experts)
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    vocab_size = config.pop("vocab_size")
    moe = MoEConfig(num_experts=num_experts // m, expert_d_ff=config["d_ff"], router=router, balancers=list(balancers),
                    dispatcher=dispatcher, capacity=capacity, granularity=m)
    moe_model = MoETransformer(vocab_size, **config, moe=moe, moe_every=moe_every,
                               first_dense_layers=first_dense_layers).to(device, dtype)
    upcycle_state_dict(moe_model, model.state_dict(), method, noise, seed, zero_router=zero_router)
    return moe_model.train(model.training)


def _moe_blocks(model: MoETransformer) -> dict[str, MoELayer]:
    """``{state-dict prefix: MoE layer}`` of every MoE block, the MTP modules' blocks included."""
    blocks = {f"blocks.{i}.": b for i, b in enumerate(model.blocks)}
    blocks.update({f"mtp.{k}.block.": m.block for k, m in enumerate(model.mtp_modules())})
    return {prefix + "ffn.": b.ffn for prefix, b in blocks.items() if isinstance(b.ffn, MoELayer)}


def _expected_dense_shapes(model: MoETransformer, method: str) -> dict[str, tuple[int, ...]]:
    """Every key a fitting dense state_dict has, with its shape."""
    moe = _moe_blocks(model)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith(tuple(moe))}
    d = model.d_model
    for ffn_prefix, layer in moe.items():
        f = layer.experts.d_ff * (model.granularity if method == "split" else 1)
        shapes.update({ffn_prefix + "gate.weight": (f, d), ffn_prefix + "up.weight": (f, d),
                       ffn_prefix + "out.weight": (d, f)})
    return shapes


def _fit_problems(expected: Mapping[str, tuple[int, ...]], source: Mapping[str, Tensor]) -> list[str]:
    """Missing and unexpected keys first (a different structure), then shapes (different dims)."""
    problems = [f"missing: {k} (model expects {list(s)})" for k, s in expected.items() if k not in source]
    problems += [f"unexpected: {k} {list(v.shape)}" for k, v in source.items() if k not in expected]
    problems += [f"shape: {k} is {list(source[k].shape)} in the checkpoint, the model expects {list(s)}"
                 for k, s in expected.items() if k in source and tuple(source[k].shape) != s]
    return problems


@torch.no_grad()
def upcycle_state_dict(
    model: MoETransformer,
    dense_state_dict: Mapping[str, Tensor],
    method: UpcycleMethod = "copy",
    noise: float = 0.0,
    seed: int = 0,
    prefix: str = "",
    zero_router: bool = False,
) -> None:
    """Fill an already-built MoETransformer from a dense MoETransformer's state_dict, in place.

    Keys outside ``prefix`` are ignored and ``prefix`` is stripped (``"model."`` for a Lightning
    checkpoint of ``MoELanguageModel``). Every non-FFN tensor and every dense layer's FFN is
    copied; each MoE layer's experts are upcycled from the dense FFN at the same block
    (``blocks.{i}.ffn.{gate,up,out}.weight``) with :func:`upcycle_moe_layer`, the split
    granularity being ``model.granularity``. Routers keep their initialisation unless
    ``zero_router``. The noise of expert ``e`` of the ``l``-th MoE layer (the MTP modules' last)
    comes from ``(seed, l, e)``. Under expert parallelism, call it after sharding: each rank
    writes its own experts only, the same rows as at P = 1. Raises ``ValueError`` listing every
    missing, unexpected and mis-shaped key when the checkpoint does not fit (other dims, other
    depth, or MoE keys in the checkpoint).
    """
    _check_method_and_noise(method, noise)
    source = {k[len(prefix):]: v for k, v in dense_state_dict.items() if k.startswith(prefix)}
    moe_keys = sorted(k for k in source if ".ffn.experts." in k or ".ffn.router." in k)
    if moe_keys:
        raise ValueError(f"`dense_state_dict` is not dense: it has MoE keys ({', '.join(moe_keys[:3])}, ...); "
                         "upcycling starts from a dense model.")
    problems = _fit_problems(_expected_dense_shapes(model, method), source)
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ValueError(f"`dense_state_dict` (prefix={prefix!r}) does not fit this model for method={method!r} "
                         f"(granularity {model.granularity}):\n  {shown}")
    if model.tie_embeddings and not torch.equal(source["embed.weight"], source["lm_head.weight"]):
        raise ValueError("`dense_state_dict` has an output head of its own (an untied model) but this model ties it "
                         "to the embedding: build the MoE model with tie_embeddings=False.")
    moe = _moe_blocks(model)
    for layer in moe.values() if zero_router else ():
        _router_rows(layer.router)  # fail before changing anything
    model.load_state_dict({k: v for k, v in source.items() if not k.startswith(tuple(moe))}, strict=False)
    for index, (ffn_prefix, layer) in enumerate(moe.items()):
        dense = {name: source[ffn_prefix + name] for name in ("gate.weight", "up.weight", "out.weight")}
        upcycle_moe_layer(layer, dense, method, noise, seed, layer_index=index, zero_router=zero_router)


# ---------------------------------------------------------------------------------------------
# Hugging Face BERT (and encoders built like it: RoBERTa, MiniLM, ...)

HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                  "silu": "silu", "swish": "silu"}
"""Hugging Face ``hidden_act`` names -> :class:`~lightning_moe.experts.MLPExperts` activations."""


def _bert_ffn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` for every module with BERT's FFN: ``intermediate.dense`` and ``output.dense``."""
    found = []
    for name, module in model.named_modules():
        intermediate, output = getattr(module, "intermediate", None), getattr(module, "output", None)
        if isinstance(intermediate, MoELayer):
            raise ValueError(f"`model` already has MoE layers ({name}.intermediate); upcycling needs a dense model.")
        if isinstance(getattr(intermediate, "dense", None), nn.Linear) and isinstance(
                getattr(output, "dense", None), nn.Linear):
            found.append((name, module))
    if not found:
        raise ValueError("`model` has no BERT-style FFN (a module with `intermediate.dense` and `output.dense`).")
    return found


def _hf_activation(model: nn.Module) -> str:
    act = getattr(getattr(model, "config", None), "hidden_act", None)
    if act not in HF_ACTIVATIONS:
        raise ValueError(f"Unsupported `config.hidden_act` {act!r}; upcycle_hf_bert supports {sorted(HF_ACTIVATIONS)}.")
    return HF_ACTIVATIONS[act]


@torch.no_grad()
def _fill_mlp_experts(experts: MLPExperts, w_in: nn.Linear, w_out: nn.Linear, method: str, granularity: int,
                      noise: float, seed: int, layer: int) -> None:
    weights = upcycle_mlp(w_in.weight, w_in.bias, w_out.weight, w_out.bias, experts.num_experts, method,
                          granularity, noise, seed, layer=layer)
    targets = (experts.w_in_EDF, experts.b_in_EF, experts.w_out_EFD, experts.b_out_ED)
    for target, source in zip(targets, weights, strict=True):
        if target is not None:
            target.copy_(source)


def upcycle_hf_bert(
    model: nn.Module,
    num_experts: int,
    router: RouterFactory = TopKRouter,
    method: UpcycleMethod = "copy",
    granularity: int = 1,
    noise: float = 0.0,
    seed: int = 0,
    dispatcher: str = "auto",
    balancers: Sequence[Balancer] = (),
    capacity: ExpertCapacity | None = None,
    zero_router: bool = False,
) -> list[str]:
    """Replace every BERT layer's FFN with an MoE layer of GELU experts with biases, in place.

    ``layer.intermediate`` (D -> F, GELU) becomes an :class:`MoELayer` of
    :class:`~lightning_moe.experts.MLPExperts` returning width D, and ``layer.output.dense``
    (F -> D) becomes ``nn.Identity``; ``output.dropout``, ``output.LayerNorm`` and the residual
    (``LayerNorm(dropout(ffn(x)) + x)``) are unchanged. Routers are built as
    ``router(D, num_experts)`` and, for split, reach ``granularity`` times their ``top_k`` (as
    :class:`MoETransformer` does). Returns the names of the new MoE modules. The layers are not
    tied to the model's config, so ``save_pretrained``/``from_pretrained`` do not round-trip
    them: save the ``state_dict``. Preservation: module docstring.
    """
    _check_method_and_noise(method, noise)
    layers = _bert_ffn_layers(model)
    activation = _hf_activation(model)
    for _, bert_layer in layers:
        _check_granularity(method, granularity, bert_layer.intermediate.dense.out_features, num_experts)
    m = granularity
    new_layers = []  # built first and swapped in at the end, so that an error leaves the model as it was
    for index, (_, bert_layer) in enumerate(layers):
        w_in, w_out = bert_layer.intermediate.dense, bert_layer.output.dense
        d_ff, d_model = w_in.weight.shape
        layer_router = build_router(router, d_model, num_experts, m)
        if zero_router:
            zero_router_rows(layer_router)
        experts = partial(MLPExperts, activation=activation, bias=w_in.bias is not None)
        layer = MoELayer(d_model, d_ff // m, num_experts, router=layer_router, balancers=balancers,
                         dispatcher=dispatcher, capacity=capacity, experts=experts)
        _fill_mlp_experts(layer.experts, w_in, w_out, method, m, noise, seed, index)
        new_layers.append(layer.to(w_in.weight.device, w_in.weight.dtype))
    for (_, bert_layer), layer in zip(layers, new_layers, strict=True):
        bert_layer.intermediate = layer
        bert_layer.output.dense = nn.Identity()
    return [f"{name}.intermediate" if name else "intermediate" for name, _ in layers]
